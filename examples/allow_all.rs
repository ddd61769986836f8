//! The ceiling of the ext_authz hop: a Check server that allows everything without looking at
//! the request. BENCHMARKS.md compares the sidecar against it, directly and through Envoy.
//!
//! cargo run --release --example allow_all -- 127.0.0.1:9292 [WORKERS]

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

/// `allow_all [ADDR] [WORKERS]`: WORKERS runtime threads, 1 being a current-thread runtime as in
/// the sidecar (`GRPC_NUM_STREAM_WORKERS`); default one per core, as `#[tokio::main]`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:9292").parse()?;
    let workers = match args.next() {
        Some(n) => n.parse()?,
        None => std::thread::available_parallelism()?.get(),
    };
    authz_sidecar::server::build_runtime(workers)?.block_on(serve(addr, workers))
}

async fn serve(addr: SocketAddr, workers: usize) -> Result<(), Box<dyn std::error::Error>> {
    // The same transport settings the sidecar uses by default, so only the work differs.
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    eprintln!("allow-all Check server on {addr}, {workers} runtime worker(s)");
    tonic::transport::Server::builder()
        .max_concurrent_streams(100)
        .add_service(AuthorizationServer::new(AllowAll))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
