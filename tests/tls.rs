//! TLS and mTLS on the Check listener, with real handshakes: who may call, and certificates
//! rotated on disk without a restart and without dropping live connections.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use authz_sidecar::cli::Cli;
use authz_sidecar::config::Config;
use authz_sidecar::pb::envoy::service::auth::v3::CheckResponse;
use authz_sidecar::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use clap::Parser;
use common::tls::{self, Ca, write_atomically};
use common::*;
use jsonwebtoken::Algorithm;
use tonic::transport::Channel;

struct Fixture {
    dir: PathBuf,
    ca: Ca,
    jwks: JwksServer,
    token: String,
    cert: PathBuf,
    key: PathBuf,
}

impl Fixture {
    async fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("authz-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("server CA");
        let (cert, key) = ca.server("authz-sidecar").write(&dir, "server");
        let signing = common::key(Algorithm::ES256, "tls-1");
        let jwks = JwksServer::start(&[&signing]).await;
        let token = signing.sign(&valid_claims()).unwrap();
        Fixture {
            dir,
            ca,
            jwks,
            token,
            cert,
            key,
        }
    }

    fn flags(&self, client_ca: Option<&PathBuf>) -> Vec<String> {
        let mut flags = vec![
            "--grpc-tls-cert".to_owned(),
            self.cert.display().to_string(),
            "--grpc-tls-key".to_owned(),
            self.key.display().to_string(),
        ];
        if let Some(ca) = client_ca {
            flags.extend(["--grpc-tls-client-ca".to_owned(), ca.display().to_string()]);
        }
        flags
    }

    /// A sidecar serving TLS (and mTLS with `client_ca`). Its plaintext helper client cannot
    /// talk to it, so Checks go through [`tls::client`].
    async fn sidecar(&self, client_ca: Option<&PathBuf>) -> Sidecar {
        let flags = self.flags(client_ca);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        start_sidecar_tls(config(&["--jwks-url", &self.jwks.jwks_url()], &flags)).await
    }

    fn request(&self) -> authz_sidecar::pb::envoy::service::auth::v3::CheckRequest {
        check_request(&[("authorization", &format!("Bearer {}", self.token))])
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a Check through this client is answered and allowed.
async fn allowed(client: &mut AuthorizationClient<Channel>, f: &Fixture) -> bool {
    match client.check(f.request()).await {
        Ok(response) => is_allow(&response.into_inner()),
        Err(_) => false,
    }
}

fn is_allow(response: &CheckResponse) -> bool {
    response.status.as_ref().is_some_and(|s| s.code == 0)
}

/// Whether a client with these credentials gets a Check answered at all.
async fn answered(
    f: &Fixture,
    addr: std::net::SocketAddr,
    ca: &str,
    id: Option<&tls::Issued>,
) -> bool {
    match tls::client(addr, ca, id).await {
        Ok(mut client) => client.check(f.request()).await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn tls_serves_checks_and_refuses_plaintext() {
    let f = Fixture::new("tls").await;
    let sidecar = f.sidecar(None).await;
    let mut client = tls::client(sidecar.addr, &f.ca.pem, None).await.unwrap();
    assert!(allowed(&mut client, &f).await, "a TLS client is served");

    let plaintext = AuthorizationClient::connect(format!("http://{}", sidecar.addr)).await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(mut client) => client.check(f.request()).await.is_err(),
    };
    assert!(refused, "plaintext h2c to a TLS listener gets no answer");

    let other = Ca::new("somebody else");
    assert!(
        !answered(&f, sidecar.addr, &other.pem, None).await,
        "the client checks the server's certificate"
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn mtls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let f = Fixture::new("mtls").await;
    let envoy_ca = Ca::new("envoy CA");
    let ca_path = f.dir.join("client-ca.pem");
    std::fs::write(&ca_path, &envoy_ca.pem).unwrap();
    let sidecar = f.sidecar(Some(&ca_path)).await;

    let envoy = envoy_ca.client("envoy");
    let mut client = tls::client(sidecar.addr, &f.ca.pem, Some(&envoy))
        .await
        .unwrap();
    assert!(
        allowed(&mut client, &f).await,
        "Envoy's certificate is admitted"
    );

    assert!(
        !answered(&f, sidecar.addr, &f.ca.pem, None).await,
        "no client certificate: refused"
    );
    let stranger = Ca::new("stranger CA").client("envoy");
    assert!(
        !answered(&f, sidecar.addr, &f.ca.pem, Some(&stranger)).await,
        "a certificate from another CA: refused"
    );
    let metrics = sidecar.http_get("/metrics").await.1;
    assert!(
        metric_value(&metrics, "ext_authz_tls_handshake_failures_total") >= 2.0,
        "refusals are counted"
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_and_live_ones_stay() {
    let f = Fixture::new("rotate").await;
    let sidecar = f.sidecar(None).await;
    let mut live = tls::client(sidecar.addr, &f.ca.pem, None).await.unwrap();
    assert!(allowed(&mut live, &f).await);

    // cert-manager renews from a new CA: files replaced in place.
    let renewed = Ca::new("renewed CA");
    let issued = renewed.server("authz-sidecar");
    write_atomically(&f.key, &issued.key_pem);
    write_atomically(&f.cert, &issued.cert_pem);
    let reloaded = eventually(Duration::from_secs(10), || async {
        let metrics = sidecar.http_get("/metrics").await.1;
        metric_value(&metrics, "ext_authz_tls_reloads_total{outcome=\"updated\"}") >= 1.0
    })
    .await;
    assert!(
        reloaded,
        "the new files are picked up (FILE_POLL_INTERVAL 50ms)"
    );

    assert!(
        answered(&f, sidecar.addr, &renewed.pem, None).await,
        "new connections get the renewed certificate"
    );
    assert!(
        !answered(&f, sidecar.addr, &f.ca.pem, None).await,
        "and no longer the old one"
    );
    assert!(
        allowed(&mut live, &f).await,
        "a connection made before the rotation keeps working"
    );

    // A broken renewal (key and cert that do not match) is refused; the renewed set serves on.
    let mismatched = renewed.server("other");
    write_atomically(&f.key, &mismatched.key_pem);
    let failed = eventually(Duration::from_secs(10), || async {
        let metrics = sidecar.http_get("/metrics").await.1;
        metric_value(&metrics, "ext_authz_tls_reloads_total{outcome=\"failed\"}") >= 1.0
    })
    .await;
    assert!(failed, "the bad set is counted");
    assert!(answered(&f, sidecar.addr, &renewed.pem, None).await);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn bad_tls_settings_are_configuration_errors() {
    let f = Fixture::new("config").await;
    let garbage = f.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let cert = f.cert.display().to_string();
    let key = f.key.display().to_string();
    let bad = garbage.display().to_string();
    let cases: [(&[&str], &str); 4] = [
        (&["--grpc-tls-cert", &cert], "together"),
        (&["--grpc-tls-client-ca", &cert], "GRPC_TLS_CLIENT_CA needs"),
        (
            &["--grpc-tls-cert", &bad, "--grpc-tls-key", &key],
            "garbage.pem",
        ),
        (
            &[
                "--grpc-tls-cert",
                &cert,
                "--grpc-tls-key",
                &key,
                "--grpc-tls-client-ca",
                &bad,
            ],
            "garbage.pem",
        ),
    ];
    for (flags, expected) in cases {
        let mut argv = vec![
            "authz-sidecar",
            "--jwt-issuer",
            ISSUER,
            "--jwks-file",
            "k.json",
        ];
        argv.extend_from_slice(flags);
        let cli = Cli::try_parse_from(argv).unwrap();
        let problems = Config::from_settings(&cli.settings).unwrap_err().0;
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{flags:?}: {expected:?} not in {problems:?}"
        );
    }
}

#[tokio::test]
async fn silent_connections_cannot_pile_up_handshakes_beyond_the_cap() {
    let f = Fixture::new("handshake-cap").await;
    let mut flags = f.flags(None);
    flags.extend(["--grpc-tls-max-handshakes".to_owned(), "2".to_owned()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sidecar = start_sidecar_tls(config(&["--jwks-url", &f.jwks.jwks_url()], &flags)).await;
    let mut client = tls::client(sidecar.addr, &f.ca.pem, None).await.unwrap();
    assert!(allowed(&mut client, &f).await);

    // Two connections that never send a ClientHello take both handshake slots.
    let silent: Vec<_> = futures_util::future::join_all(
        (0..2).map(|_| tokio::net::TcpStream::connect(sidecar.addr)),
    )
    .await;
    let failures = || async {
        metric_value(
            &sidecar.http_get("/metrics").await.1,
            "ext_authz_tls_handshake_failures_total",
        )
    };
    let before = failures().await;
    let refused = eventually(Duration::from_secs(5), || async {
        tls::client(sidecar.addr, &f.ca.pem, None).await.is_err()
    })
    .await;
    assert!(
        refused,
        "a third handshake is refused while two are in progress"
    );
    assert!(failures().await > before, "and counted");
    assert!(
        allowed(&mut client, &f).await,
        "connections already up are not affected"
    );

    drop(silent);
    let back = eventually(Duration::from_secs(5), || async {
        tls::client(sidecar.addr, &f.ca.pem, None).await.is_ok()
    })
    .await;
    assert!(back, "the slots free up when the silent connections go");
    sidecar.shutdown().await;
}
