//! The ceiling of the ext_authz hop: a Check server that allows everything without looking at
//! the request. BENCHMARKS.md compares the sidecar against it, directly and through Envoy.
//!
//! cargo run --release --example allow_all -- 127.0.0.1:9292

use std::net::SocketAddr;

use authz_sidecar::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use authz_sidecar::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use authz_sidecar::pb::google::rpc;
use tonic::{Request, Response, Status};

struct AllowAll;

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status::default()),
            ..CheckResponse::default()
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9292".into())
        .parse()?;
    // The same transport settings the sidecar uses by default, so only the work differs.
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    eprintln!("allow-all Check server on {addr}");
    tonic::transport::Server::builder()
        .max_concurrent_streams(100)
        .add_service(AuthorizationServer::new(AllowAll))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
