//! The listener's tuning settings change behaviour a client can see: Checks over a unix domain
//! socket, connections closed at GRPC_MAX_CONNECTION_AGE (so new replicas get load), and dead
//! clients found by keepalive PINGs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use authz_sidecar::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use common::*;
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint};

fn socket_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "authz-{name}-{}.sock",
        authz_sidecar::tools::devkeys::random_id()
    ))
}

/// A Check client whose connections go to the unix socket at `path`.
async fn unix_client(path: std::path::PathBuf) -> AuthorizationClient<Channel> {
    let channel = Endpoint::from_static("http://unix.socket")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect over the unix socket");
    AuthorizationClient::new(channel)
}

#[tokio::test]
async fn checks_are_served_on_the_unix_socket_as_well_as_tcp() {
    let signing = key(Algorithm::ES256, "uds-1");
    let jwks = JwksServer::start(&[&signing]).await;
    let path = socket_path("uds");
    // A socket file left by an earlier run is replaced, not an error.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let flag = path.to_str().unwrap().to_owned();
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--grpc-unix-socket", &flag],
    ))
    .await;
    let token = signing.sign(&valid_claims()).unwrap();
    let mut client = unix_client(path.clone()).await;
    let response = client
        .check(check_request(&[(
            "authorization",
            &format!("Bearer {token}"),
        )]))
        .await
        .unwrap()
        .into_inner();
    expect_allow(&response);
    let denied = client
        .check(check_request(&[("authorization", "Bearer junk")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expect_deny(&denied).2, "malformed");
    assert!(sidecar.allows(&token).await, "TCP still serves");
    sidecar.shutdown().await;
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_regular_file_at_the_socket_path_is_refused_not_removed() {
    let path = socket_path("not-a-socket");
    std::fs::write(&path, "precious").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
        .env_clear()
        .env("GRPC_LISTEN_ADDR", "127.0.0.1:0")
        .env("METRICS_LISTEN_ADDR", "")
        .env("JWT_ISSUER", ISSUER)
        .env("JWKS_FILE", "/nonexistent/jwks.json")
        .env("GRPC_UNIX_SOCKET", &path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    std::fs::remove_file(&path).unwrap();
}

/// Checks every 100 ms for `run` on one client; how many TCP connections it had to open.
async fn connections_opened(addr: std::net::SocketAddr, token: &str, run: Duration) -> usize {
    let opened = Arc::new(AtomicUsize::new(0));
    let counter = opened.clone();
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, std::io::Error>(TokioIo::new(TcpStream::connect(addr).await?)) }
        }))
        .await
        .unwrap();
    let mut client = AuthorizationClient::new(channel);
    let request = check_request(&[("authorization", &format!("Bearer {token}"))]);
    let started = Instant::now();
    while started.elapsed() < run {
        // A Check racing the GOAWAY may fail; the next one goes on a new connection.
        if let Ok(response) = client.check(request.clone()).await {
            expect_allow(&response.into_inner());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    opened.load(Ordering::SeqCst)
}

#[tokio::test]
async fn connections_are_closed_at_max_connection_age_and_clients_reconnect() {
    let signing = key(Algorithm::ES256, "age-1");
    let jwks = JwksServer::start(&[&signing]).await;
    let token = signing.sign(&valid_claims()).unwrap();
    let aged = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &[
            "--grpc-max-connection-age",
            "1s",
            "--grpc-max-connection-age-grace",
            "500ms",
        ],
    ))
    .await;
    let ageless = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let (with_age, without) = tokio::join!(
        connections_opened(aged.addr, &token, Duration::from_millis(3500)),
        connections_opened(ageless.addr, &token, Duration::from_millis(3500)),
    );
    // 3.5 s at an age of 0.9-1.1 s: at least 3 connections in all; without an age, one.
    assert!(with_age >= 3, "{with_age} connections with a 1 s age");
    assert_eq!(
        without, 1,
        "without an age the first connection serves throughout"
    );
    aged.shutdown().await;
    ageless.shutdown().await;
}

/// Opens an HTTP/2 connection that never answers anything; the frame types the server sent
/// and whether it closed the connection within `within`.
async fn silent_client(addr: std::net::SocketAddr, within: Duration) -> (Vec<u8>, bool) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
    let mut received = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    // Walk the frames: 3 bytes length, 1 byte type, 1 flags, 4 stream id, then the payload.
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= received.len() {
        let length = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]);
        types.push(received[at + 3]);
        at += 9 + length as usize;
    }
    (types, closed)
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_disconnected() {
    const PING: u8 = 6;
    let signing = key(Algorithm::ES256, "ka-1");
    let jwks = JwksServer::start(&[&signing]).await;
    let pinging = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &[
            "--grpc-keepalive-interval",
            "500ms",
            "--grpc-keepalive-timeout",
            "500ms",
        ],
    ))
    .await;
    let quiet = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--grpc-keepalive-interval", "0s"],
    ))
    .await;
    let started = Instant::now();
    let ((pinged, closed), (quiet_frames, quiet_closed)) = tokio::join!(
        silent_client(pinging.addr, Duration::from_secs(5)),
        silent_client(quiet.addr, Duration::from_secs(3)),
    );
    assert!(
        pinged.contains(&PING),
        "the server pinged: frames {pinged:?}"
    );
    assert!(closed, "and closed the unanswering connection");
    assert!(
        !quiet_frames.contains(&PING) && !quiet_closed,
        "with keepalive off the idle connection stays: frames {quiet_frames:?}, {:?}",
        started.elapsed()
    );
    pinging.shutdown().await;
    quiet.shutdown().await;
}
