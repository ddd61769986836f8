//! Wiring: builds the components from a [`Config`] and serves Check on a listener until the
//! shutdown future resolves. Tests call the same [`run`] as `main`, on `127.0.0.1:0`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::authorizer::{Authorizer, Issuer};
use crate::authz::CheckService;
use crate::config::Config;
use crate::jwks::IssuerKeys;
use crate::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use crate::revocation::{
    Backend, FileError, MemoryStore, RedisStore, RevocationConfig, StoreError,
};

/// Why the server could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("revocation file: {0}")]
    RevocationFile(#[from] FileError),
    #[error("Redis: {0}")]
    Redis(#[from] StoreError),
    #[error("HTTP client for JWKS: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` resolves, then drains in-flight Checks. Background refreshers live
/// in a JoinSet, so they stop when this returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let mut background = JoinSet::new();

    let http = reqwest::Client::builder()
        .timeout(config.jwks.fetch_timeout)
        .connect_timeout(config.jwks.fetch_timeout)
        .user_agent(concat!("authz-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let mut issuers = HashMap::new();
    for issuer in &config.issuers {
        let keys = IssuerKeys::new(
            issuer.issuer.clone(),
            issuer.jwks.clone(),
            config.jwks.clone(),
            http.clone(),
        );
        background.spawn(keys.clone().refresh_forever());
        issuers.insert(
            issuer.issuer.clone(),
            Issuer {
                keys,
                audiences: issuer.audiences.clone(),
            },
        );
    }

    let store = match config.revocation {
        RevocationConfig::Memory { file } => {
            let store = Arc::new(MemoryStore::open(file)?);
            background.spawn(store.clone().reload_forever(config.jwks.file_poll_interval));
            Backend::Memory(store)
        }
        RevocationConfig::Redis(settings) => Backend::Redis(RedisStore::connect(&settings).await?),
    };

    let authorizer = Authorizer::new(issuers, config.jwt, store, config.revocation_failure_mode);
    let service = CheckService::new(authorizer, config.token_source, config.upstream);

    info!(addr = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        issuers = config.issuers.len(), "serving ext_authz Check");
    Server::builder()
        .add_service(AuthorizationServer::new(service))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    background.shutdown().await;
    info!("stopped");
    Ok(())
}
