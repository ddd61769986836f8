"""Runs a bounded locust load against a local stack and checks every answer.

Starts redis-server, the sidecar (Redis revocation), an upstream app and Envoy with
deploy/envoy/envoy.yaml, all on free 127.0.0.1 ports; mints the 70/10/10/10 token mix with the
dev key and revokes its revoked share in Redis; runs locust headless for each user class; stops
everything it started, also on failure. Exits non-zero on any wrong outcome.

    python locust/run_stack.py --sidecar-bin target/release/authz-sidecar --users 1000 \
        --spawn-rate 100 --run-time 60s ExtAuthzHeaderUser
"""

import argparse
import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ISSUER = "https://dev.authz-sidecar.local"
AUDIENCE = "dev-api"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, probe, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} did not come up within {timeout:.0f} s")


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class App(BaseHTTPRequestHandler):
    """The upstream behind Envoy: answers 200 to anything that got through. Keep-alive, so
    Envoy reuses connections instead of opening one per request.

    Each response leaves in one write, on a TCP_NODELAY socket. Written as it was, head then
    body on an unbuffered socket with Nagle on, the body waited for Envoy's delayed ACK of the
    head: ~40 ms on every allowed request, which the load results then put on the sidecar."""

    protocol_version = "HTTP/1.1"
    # socketserver.StreamRequestHandler: a buffered wfile, which handle_one_request flushes once
    # after do_GET (head and body in one send), and TCP_NODELAY on the accepted connection.
    wbufsize = -1
    disable_nagle_algorithm = True

    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class AppServer(ThreadingHTTPServer):
    # The default listen backlog is 5: under load Envoy's new connections would be refused
    # and show up as 503s that have nothing to do with authorization.
    request_queue_size = 1024
    daemon_threads = True


class Stack:
    def __init__(self, args, workdir):
        self.args, self.workdir = args, workdir
        self.processes = []
        self.ports = {name: free_port() for name in ("redis", "grpc", "metrics", "gateway", "admin")}

    def spawn(self, name, command, **kwargs):
        log = open(self.workdir / f"{name}.log", "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **kwargs)
        self.processes.append((name, process))
        return process

    def sidecar(self, *args, env=None):
        full_env = {"PATH": os.environ.get("PATH", ""), **(env or {})}
        return subprocess.run([self.args.sidecar_bin, *args], env=full_env, check=True,
                              capture_output=True, text=True).stdout

    def start(self):
        p = self.ports
        self.spawn("redis", ["redis-server", "--port", str(p["redis"]), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"])
        wait_for("redis-server", lambda: socket.create_connection(("127.0.0.1", p["redis"]), 1).close() is None)
        redis_env = {"REVOCATION_BACKEND": "redis", "REDIS_URL": f"redis://127.0.0.1:{p['redis']}"}

        dev = Path(self.args.dev_dir)
        self.sidecar("dev-keys", "--dir", str(dev))
        self.tokens = self.workdir / "tokens.jsonl"
        revoked = self.workdir / "revoked.txt"
        self.tokens.write_text(self.sidecar(
            "tokens", "--dir", str(dev), "--issuer", ISSUER, "--audience", AUDIENCE,
            "--count", str(self.args.token_count), "--revoked-out", str(revoked)))
        print(self.sidecar("revoke", "jti", "--from-file", str(revoked), env=redis_env).strip(),
              "jtis in Redis")

        self.spawn("sidecar", [self.args.sidecar_bin], env={
            "PATH": os.environ.get("PATH", ""),
            "GRPC_LISTEN_ADDR": f"127.0.0.1:{p['grpc']}",
            "METRICS_LISTEN_ADDR": f"127.0.0.1:{p['metrics']}",
            "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE,
            "JWKS_FILE": str(dev / "jwks.json"),
            "TOKEN_COOKIE": "access_token",
            "SHUTDOWN_DRAIN_DELAY": "0s", "RUST_LOG": "warn",
            **redis_env,
        })
        wait_for("the sidecar", lambda: http_ok(f"http://127.0.0.1:{p['metrics']}/readyz"))

        app = AppServer(("127.0.0.1", 0), App)
        threading.Thread(target=app.serve_forever, daemon=True).start()
        self.app = app

        config = (ROOT / "deploy/envoy/envoy.yaml").read_text()
        for old, new in ((8080, p["gateway"]), (8081, app.server_address[1]),
                         (9191, p["grpc"]), (9901, p["admin"])):
            config = config.replace(f"port_value: {old} ", f"port_value: {new} ")
        envoy_config = self.workdir / "envoy.yaml"
        envoy_config.write_text(config)
        self.spawn("envoy", [self.args.envoy_bin, "-c", str(envoy_config), "--concurrency",
                             str(self.args.envoy_concurrency), "--disable-hot-restart",
                             "--log-level", "warn"])
        wait_for("Envoy", lambda: http_ok(f"http://127.0.0.1:{p['admin']}/ready"))

    def stop(self):
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
        if getattr(self, "app", None):
            self.app.shutdown()


def sidecar_view(metrics_port):
    """The sidecar's own numbers from /metrics: Checks by result, and p50/p99 of a Check
    computed from the histogram buckets the way histogram_quantile does (upper bucket bound)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    by_result, buckets = {}, []
    for line in text.splitlines():
        if line.startswith("ext_authz_requests_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            by_result[result] = by_result.get(result, 0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("ext_authz_request_duration_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0

    def quantile(q):
        return next((bound for bound, count in buckets if total and count >= q * total), float("nan"))

    counts = ", ".join(f"{k} {int(v)}" for k, v in sorted(by_result.items()))
    return f"sidecar saw: {counts}; Check p50 <= {quantile(0.5) * 1000:g} ms, p99 <= {quantile(0.99) * 1000:g} ms"


def aggregated(stats_csv):
    with open(stats_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                return row
    return None


def run_locust(stack, user_class, results):
    p = stack.ports
    host = (f"grpc://127.0.0.1:{p['grpc']}" if user_class == "ExtAuthzGrpcUser"
            else f"http://127.0.0.1:{p['gateway']}")
    files = str(ROOT / "locust/locustfile.py")
    if stack.args.shape:
        files += "," + str(ROOT / "locust/shapes" / f"{stack.args.shape}.py")
    prefix = results / user_class
    command = [sys.executable, "-m", "locust", "-f", files, "--headless", "--host", host,
               "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
               "--stop-timeout", "5", "--loglevel", "WARNING", user_class]
    if not stack.args.shape:
        command += ["--users", str(stack.args.users), "--spawn-rate", str(stack.args.spawn_rate),
                    "--run-time", stack.args.run_time]
    env = {**os.environ, "TOKEN_FILE": str(stack.tokens), "TOKEN_COOKIE": "access_token"}
    code = subprocess.run(command, env=env).returncode
    row = aggregated(f"{prefix}_stats.csv")
    if row is None:
        print(f"{user_class}: no statistics written")
        return False
    requests, failures = int(row["Request Count"]), int(row["Failure Count"])
    print(f"{user_class}: {requests} requests, {failures} wrong outcomes or errors, "
          f"{float(row['Requests/s']):.0f} req/s, p50 {row['50%']} ms, p95 {row['95%']} ms, "
          f"p99 {row['99%']} ms")
    return code == 0 and requests > 0 and failures == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("classes", nargs="+", help="locust user classes to run, one after another")
    parser.add_argument("--sidecar-bin", default=str(ROOT / "target/release/authz-sidecar"))
    parser.add_argument("--envoy-bin", default=os.environ.get("ENVOY_BIN", str(ROOT / ".venv/bin/envoy")))
    parser.add_argument("--envoy-concurrency", type=int, default=1)
    parser.add_argument("--dev-dir", default=str(ROOT / ".dev"))
    parser.add_argument("--token-count", type=int, default=1000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--spawn-rate", type=float, default=100)
    parser.add_argument("--run-time", default="60s")
    parser.add_argument("--shape", choices=["step", "spike"], help="a load shape instead of --users")
    parser.add_argument("--results", default=str(ROOT / "locust/results"))
    args = parser.parse_args()
    for tool in ("redis-server", args.sidecar_bin, args.envoy_bin):
        if not shutil.which(tool) and not Path(tool).exists():
            sys.exit(f"{tool} not found (make deps / make build)")

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="authz-load-"))
    stack = Stack(args, workdir)
    ok = False
    try:
        stack.start()
        ok = all([run_locust(stack, user_class, results) for user_class in args.classes])
        print(sidecar_view(stack.ports["metrics"]))
    finally:
        stack.stop()
    if not ok:
        sys.exit(f"load run failed; logs in {workdir}, reports in {results}")
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"reports (CSV, HTML) in {results}")


if __name__ == "__main__":
    main()
