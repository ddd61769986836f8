//! TLS, and mTLS, on the Check listener, with the certificate files re-read when they change.
//!
//! Plaintext stays the default: a same-pod Envoy talks over loopback. Across pods, set
//! `GRPC_TLS_CERT`/`GRPC_TLS_KEY`; add `GRPC_TLS_CLIENT_CA` so only clients with a certificate
//! from that CA (Envoy's) may call Check. cert-manager rotates the files in place: they are
//! compared by content every `FILE_POLL_INTERVAL`, and a new set serves new connections while
//! live ones keep the session they have. A set that fails to load is logged and counted, and
//! the last good one keeps serving.
//!
//! Handshakes run in their own tasks, under a timeout, so a slow or silent client cannot hold
//! up the accept loop.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the server to take them.
const ACCEPT_QUEUE: usize = 128;

/// Where the PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates must chain to; `None`: no client certificate asked.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// SHA-256 over every file's bytes: changes when any file does, however it was replaced.
    fn fingerprint(&self) -> io::Result<[u8; 32]> {
        let mut all = Vec::new();
        for path in self.paths() {
            all.extend_from_slice(&std::fs::read(path)?);
            all.push(0);
        }
        Ok(crate::token_cache::digest_bytes(&all))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("GRPC_TLS_CLIENT_CA: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

fn file_error(path: &Path, problem: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        problem: problem.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    crate::pem::certificates(path).map_err(|problem| TlsError::File {
        path: path.to_owned(),
        problem,
    })
}

/// Builds the server configuration from the files: TLS 1.2/1.3 with aws-lc-rs, ALPN `h2`
/// (gRPC), and client certificates required when a client CA is set.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates(&files.cert)?;
    let key = crate::pem::private_key(&files.key).map_err(|problem| TlsError::File {
        path: files.key.clone(),
        problem,
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(path)? {
                roots.add(ca).map_err(|e| file_error(path, e))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    // Also checks that the key belongs to the leaf certificate.
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration new connections get; replaced when the files change.
pub struct ReloadingTls {
    files: TlsFiles,
    /// Read once per new connection to clone the Arc; written on a reload. A std lock: never
    /// held across an await.
    current: RwLock<(Arc<ServerConfig>, [u8; 32])>,
    metrics: Arc<Metrics>,
}

impl ReloadingTls {
    pub fn new(files: TlsFiles, metrics: Arc<Metrics>) -> Result<Arc<Self>, TlsError> {
        let fingerprint = files
            .fingerprint()
            .map_err(|e| file_error(&files.cert, e))?;
        let config = load(&files)?;
        Ok(Arc::new(ReloadingTls {
            files,
            current: RwLock::new((config, fingerprint)),
            metrics,
        }))
    }

    /// A read lock held for an Arc clone only: never across an await.
    fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(guard) => guard.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Re-reads the files if their content changed. Returns whether a new set was installed.
    pub fn reload_if_changed(&self) -> bool {
        let fingerprint = match self.files.fingerprint() {
            Ok(fingerprint) => fingerprint,
            Err(error) => {
                warn!(%error, "TLS files unreadable; keeping the current certificate");
                self.metrics.tls_reloaded(false);
                return false;
            }
        };
        let unchanged = match self.current.read() {
            Ok(guard) => guard.1 == fingerprint,
            Err(poisoned) => poisoned.into_inner().1 == fingerprint,
        };
        if unchanged {
            return false;
        }
        match load(&self.files) {
            Ok(config) => {
                match self.current.write() {
                    Ok(mut guard) => *guard = (config, fingerprint),
                    Err(poisoned) => *poisoned.into_inner() = (config, fingerprint),
                }
                info!("TLS certificate reloaded");
                self.metrics.tls_reloaded(true);
                true
            }
            Err(error) => {
                // Remember the bad set so it is reported once, not on every poll.
                match self.current.write() {
                    Ok(mut guard) => guard.1 = fingerprint,
                    Err(poisoned) => poisoned.into_inner().1 = fingerprint,
                }
                warn!(%error, "new TLS files do not load; keeping the current certificate");
                self.metrics.tls_reloaded(false);
                false
            }
        }
    }

    pub async fn reload_forever(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.reload_if_changed();
        }
    }
}

/// One accepted TLS connection, as tonic takes it.
pub struct TlsConnection(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Accepts TCP connections and hands over those that complete a handshake. At most
/// `max_handshakes` run at once: a connection beyond them is closed at once (and counted as a
/// failed handshake), so a flood of silent connections costs a bounded number of tasks and
/// cannot keep the listener from accepting. The accept loop ends, closing the listener, once
/// the server stops taking connections (the drain).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    max_handshakes: usize,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let (ready, accepted) = mpsc::channel(ACCEPT_QUEUE);
    let handshakes = Arc::new(Semaphore::new(max_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = ready.closed() => break,
                next = listener.accept() => match next {
                    Ok(next) => next,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                tls.metrics.tls_handshake_failed();
                debug!(%peer, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let (ready, metrics) = (ready.clone(), tls.metrics.clone());
            tokio::spawn(async move {
                let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(handshake);
                match outcome {
                    Ok(Ok(stream)) => {
                        let _ = ready.send(Ok(TlsConnection(stream))).await;
                    }
                    Ok(Err(error)) => {
                        metrics.tls_handshake_failed();
                        debug!(%peer, %error, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.tls_handshake_failed();
                        debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(accepted)
}
