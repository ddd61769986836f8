//! A real `redis-server` per test on a free port, which the test can kill, pause, resume and
//! restart on the same port. Inspected with `redis-cli`, never through the sidecar's own code.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// `Some`: the port speaks only TLS, with these files.
    tls: Option<ServerTls>,
}

/// PEM files of a TLS-only redis-server, and of the client redis-cli presents to it.
#[derive(Clone)]
pub struct ServerTls {
    pub cert: String,
    pub key: String,
    /// The CA client certificates must chain to (and redis-cli trusts).
    pub ca: String,
    pub client_cert: String,
    pub client_key: String,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(super::free_port())
    }

    pub fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer {
            port,
            child: None,
            tls: None,
        };
        server.spawn();
        server
    }

    /// A redis-server whose only port is TLS, requiring a client certificate from `tls.ca`.
    pub fn start_tls(tls: ServerTls) -> RedisServer {
        let mut server = RedisServer {
            port: super::free_port(),
            child: None,
            tls: Some(tls),
        };
        server.spawn();
        server
    }

    fn listen_args(&self) -> Vec<String> {
        let port = self.port.to_string();
        match &self.tls {
            None => vec!["--port".into(), port],
            Some(tls) => [
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                &tls.cert,
                "--tls-key-file",
                &tls.key,
                "--tls-ca-cert-file",
                &tls.ca,
                "--tls-auth-clients",
                "yes",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    fn spawn(&mut self) {
        // Its own working directory: a test that turns persistence on must not write into the
        // checkout.
        let dir = std::env::temp_dir().join(format!("authz-redis-{}", self.port));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(self.listen_args())
            .arg("--dir")
            .arg(&dir)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (make test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.try_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let tls = self.tls.as_ref().map_or(Vec::new(), |tls| {
            vec![
                "--tls",
                "--cacert",
                &tls.ca,
                "--cert",
                &tls.client_cert,
                "--key",
                &tls.client_key,
            ]
        });
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(tls)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// Runs a redis-cli command and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    /// SIGKILL: the port stops answering at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new redis-server on the same port (empty: nothing is persisted).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGSTOP: connections stay open but nothing is answered.
    pub fn pause(&self) {
        assert!(
            Command::new("kill")
                .args(["-STOP", &self.pid()])
                .status()
                .unwrap()
                .success()
        );
    }

    pub fn resume(&self) {
        assert!(
            Command::new("kill")
                .args(["-CONT", &self.pid()])
                .status()
                .unwrap()
                .success()
        );
    }

    /// `calls` of one command in INFO commandstats (0 when never called).
    pub fn command_calls(&self, command: &str) -> u64 {
        let stats = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    /// Client connections other than the redis-cli asking.
    pub fn client_count(&self) -> usize {
        self.cli(&["CLIENT", "LIST"])
            .lines()
            .filter(|l| !l.contains("cmd=client|list"))
            .count()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.resume_quietly();
        }
        self.kill();
    }
}

impl RedisServer {
    fn resume_quietly(&self) {
        let _ = Command::new("kill").args(["-CONT", &self.pid()]).status();
    }
}
