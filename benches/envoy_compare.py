#!/usr/bin/env python3
"""The sidecar against the alternatives, in one interleaved run (`make bench-envoy`).

Starts, on free 127.0.0.1 ports: a redis-server, the allow-all example Check server, three
sidecars (memory backend; memory backend with the token cache off; Redis backend; and later a
fresh one for (d) and two for (e)) and one Envoy (--concurrency 1) with a listener per variant, every route a direct 200 so no upstream
costs anything:

  no auth | jwt_authn (local JWKS) | ext_authz -> allow-all | ext_authz -> sidecar (memory) |
  ext_authz -> sidecar (Redis)

Then, with `authz-sidecar loadgen` as the client, rounds of A B C ... (medians reported):
  (a) direct gRPC Checks/s and server CPU per Check: allow-all, sidecar cache hit, cache miss;
  (b) through Envoy, closed loop: requests/s for each listener, with the 70/10/10/10 token mix;
  (c) through Envoy, open loop at 25/50/75 % of the allow-all peak: p50/p99 for allow-all and
      the Redis-backed sidecar;
  (d) RSS after caching 100,000 distinct tokens, in a fresh sidecar and in the one that served
      (a)-(c), and the time to ready with a JWKS file;
  (e) GRPC_TCP_NODELAY on and off, direct gRPC: Checks/s with 50 callers, latency with one;
  (f) through Envoy, the authorization server's own CPU per request (issue 24): allow-all
      against the Redis-backed sidecar, each with one runtime worker (a current-thread runtime)
      and with 2, valid and mixed tokens.
Prints markdown tables; raw reports go to --out (JSON). `--only f` runs (f) alone.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "locust"))
from run_stack import free_port, http_ok, wait_for  # noqa: E402  (the load-test stack's helpers)

ISSUER = "https://bench.authz-sidecar.local"
AUDIENCE = "bench-api"
TICKS = os.sysconf("SC_CLK_TCK")


def port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Stack:
    def __init__(self, args, work):
        self.args, self.work, self.procs = args, work, []

    def spawn(self, name, command, env=None):
        log = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def sidecar(self, name, extra_env):
        grpc, metrics = free_port(), free_port()
        env = {
            "GRPC_LISTEN_ADDR": f"127.0.0.1:{grpc}",
            "METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics}",
            "JWT_ISSUER": ISSUER,
            "JWT_AUDIENCE": AUDIENCE,
            "JWKS_FILE": str(self.work / "keys/jwks.json"),
            "SHUTDOWN_DRAIN_DELAY": "0s",
            "RUST_LOG": "warn",
            **extra_env,
        }
        proc = self.spawn(name, [self.args.sidecar_bin], env)
        wait_for(name, lambda: http_ok(f"http://127.0.0.1:{metrics}/readyz"))
        return proc, grpc, metrics

    def stop(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def listener(name, port, filters):
    """A listener whose every route Envoy answers with a 200 itself, behind `filters` (YAML)."""
    chain = "".join(filters) + """
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"""
    return f"""
    - name: {name}
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: {name}
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          direct_response: {{ status: 200 }}
                http_filters:{chain}"""


def envoy_config(ports, jwks_json):
    """One listener per variant; every route answers 200 itself."""
    def ext_authz(cluster):
        return f"""
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      grpc_service:
                        envoy_grpc: {{ cluster_name: {cluster} }}
                        timeout: 0.25s
                      failure_mode_allow: false
                      status_on_error: {{ code: ServiceUnavailable }}"""

    jwt_authn = f"""
                  - name: envoy.filters.http.jwt_authn
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
                      providers:
                        bench:
                          issuer: {ISSUER}
                          audiences: [{AUDIENCE}]
                          local_jwks: {{ inline_string: {json.dumps(jwks_json)} }}
                      rules:
                        - match: {{ prefix: "/" }}
                          requires: {{ provider_name: bench }}"""

    def cluster(name, port):
        return f"""
    - name: {name}
      type: STATIC
      connect_timeout: 0.25s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      load_assignment:
        cluster_name: {name}
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"""

    listeners = [
        listener("no_auth", ports["no auth"], []),
        listener("jwt_authn", ports["jwt_authn"], [jwt_authn]),
        listener("allow_all", ports["ext_authz -> allow-all"], [ext_authz("allow_all")]),
        listener("allow_all_1w", ports["ext_authz -> allow-all (1 worker)"],
                 [ext_authz("allow_all_1w")]),
        listener("sidecar_memory", ports["ext_authz -> sidecar (memory)"],
                 [ext_authz("sidecar_memory")]),
        listener("sidecar_redis", ports["ext_authz -> sidecar (Redis)"],
                 [ext_authz("sidecar_redis")]),
        listener("sidecar_redis_1w", ports["ext_authz -> sidecar (Redis, 1 worker)"],
                 [ext_authz("sidecar_redis_1w")]),
    ]
    clusters = [
        cluster("allow_all", ports["allow-all gRPC"]),
        cluster("allow_all_1w", ports["allow-all 1 worker gRPC"]),
        cluster("sidecar_memory", ports["sidecar memory gRPC"]),
        cluster("sidecar_redis", ports["sidecar redis gRPC"]),
        cluster("sidecar_redis_1w", ports["sidecar redis 1 worker gRPC"]),
    ]
    return ("static_resources:\n  listeners:" + "".join(listeners)
            + "\n  clusters:" + "".join(clusters) + "\n")


def loadgen(args, addr, tokens, mode, seconds, protocol="grpc"):
    command = [args.sidecar_bin, "loadgen", "--json", "--addr", addr, "--tokens", str(tokens),
               "--seconds", str(seconds), "--protocol", protocol, "--timeout-ms", "2000"]
    command += mode
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def answered_per_second(report):
    return (report["allowed"] + report["denied"]) / report["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sidecar-bin", default=str(ROOT / "target/release/authz-sidecar"))
    parser.add_argument("--allow-all-bin", default=str(ROOT / "target/release/examples/allow_all"))
    parser.add_argument("--envoy-bin", default=os.environ.get("ENVOY_BIN", str(ROOT / ".venv/bin/envoy")))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=50, help="closed-loop callers (wrk's -c50)")
    parser.add_argument("--out", default=str(ROOT / "target/bench-envoy.json"))
    parser.add_argument("--only", choices=["f"], help="run one section alone")
    args = parser.parse_args()
    for tool in (args.sidecar_bin, args.allow_all_bin, args.envoy_bin, "redis-server"):
        if not shutil.which(tool) and not Path(tool).exists():
            sys.exit(f"missing {tool}: make bench-envoy builds and installs what it needs")

    work = Path(tempfile.mkdtemp(prefix="authz-bench-"))
    stack = Stack(args, work)
    results = {}
    try:
        # Keys, a 70/10/10/10 token mix (the seed's load test) and a valid-only set.
        keys = work / "keys"
        subprocess.run([args.sidecar_bin, "dev-keys", "--dir", str(keys)], check=True,
                       capture_output=True)

        def token_set(name, count, mix):
            path = work / f"{name}.jsonl"
            with open(path, "w") as out:
                subprocess.run([args.sidecar_bin, "tokens", "--dir", str(keys), "--issuer", ISSUER,
                                "--audience", AUDIENCE, "--count", str(count), "--mix", mix,
                                "--revoked-out", str(work / f"{name}-revoked.txt")],
                               stdout=out, stderr=subprocess.DEVNULL, check=True)
            return path

        mixed = token_set("mixed", 1000, "70,10,10,10")
        valid = token_set("valid", 1000, "100,0,0,0")
        many = token_set("many", 100_000, "100,0,0,0")

        redis_port = free_port()
        stack.spawn("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"])
        wait_for("redis", lambda: port_open(redis_port))
        redis_url = f"redis://127.0.0.1:{redis_port}"
        revoked = str(work / "mixed-revoked.txt")
        subprocess.run([args.sidecar_bin, "revoke", "jti", "--from-file", revoked], check=True,
                       capture_output=True,
                       env={**os.environ, "REVOCATION_BACKEND": "redis", "REDIS_URL": redis_url})
        revocation_file = work / "revoked.txt"
        revocation_file.touch()
        subprocess.run([args.sidecar_bin, "revoke", "jti", "--from-file", revoked], check=True,
                       capture_output=True,
                       env={**os.environ, "REVOCATION_BACKEND": "memory",
                            "REVOCATION_FILE": str(revocation_file)})

        allow_all_port = free_port()
        allow_all = stack.spawn("allow_all",
                                [args.allow_all_bin, f"127.0.0.1:{allow_all_port}", "2"])
        wait_for("allow-all", lambda: port_open(allow_all_port))
        allow_all_1w_port = free_port()
        allow_all_1w = stack.spawn("allow_all_1w",
                                   [args.allow_all_bin, f"127.0.0.1:{allow_all_1w_port}", "1"])
        wait_for("allow-all, 1 worker", lambda: port_open(allow_all_1w_port))
        # Room for the 100,000 tokens of (d), above the default cap.
        memory, memory_port, memory_metrics = stack.sidecar(
            "sidecar_memory", {"REVOCATION_FILE": str(revocation_file),
                               "TOKEN_CACHE_MAX_ENTRIES": "100000"})
        miss, miss_port, _ = stack.sidecar(
            "sidecar_nocache", {"REVOCATION_FILE": str(revocation_file),
                                "TOKEN_CACHE_MAX_ENTRIES": "0"})
        redis_sidecar, redis_sidecar_port, _ = stack.sidecar(
            "sidecar_redis", {"REVOCATION_BACKEND": "redis", "REDIS_URL": redis_url})
        one_worker, one_worker_port, _ = stack.sidecar(
            "sidecar_redis_1w", {"REVOCATION_BACKEND": "redis", "REDIS_URL": redis_url,
                                 "GRPC_NUM_STREAM_WORKERS": "1"})

        ports = {name: free_port() for name in [
            "no auth", "jwt_authn", "ext_authz -> allow-all", "ext_authz -> sidecar (memory)",
            "ext_authz -> sidecar (Redis)", "ext_authz -> sidecar (Redis, 1 worker)",
            "ext_authz -> allow-all (1 worker)"]}
        ports.update({"allow-all gRPC": allow_all_port, "sidecar memory gRPC": memory_port,
                      "allow-all 1 worker gRPC": allow_all_1w_port,
                      "sidecar redis gRPC": redis_sidecar_port,
                      "sidecar redis 1 worker gRPC": one_worker_port})
        admin = free_port()
        jwks_json = json.loads((keys / "jwks.json").read_text())
        config = envoy_config(ports, json.dumps(jwks_json))
        config += f"admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\n"
        (work / "envoy.yaml").write_text(config)
        stack.spawn("envoy", [args.envoy_bin, "-c", str(work / "envoy.yaml"), "--concurrency", "1",
                              "--disable-hot-restart", "--log-level", "warn"])
        wait_for("envoy", lambda: http_ok(f"http://127.0.0.1:{admin}/ready"))

        closed = ["--concurrency", str(args.concurrency)]
        # (f) through Envoy, the authorization server's CPU per request, same run.
        # One worker is a current-thread runtime in both servers.
        servers = {
            "allow-all example (1 worker)": (allow_all_1w, "ext_authz -> allow-all (1 worker)"),
            "sidecar, Redis (1 worker)": (one_worker, "ext_authz -> sidecar (Redis, 1 worker)"),
            "allow-all example (2 workers)": (allow_all, "ext_authz -> allow-all"),
            "sidecar, Redis (2 workers)": (redis_sidecar, "ext_authz -> sidecar (Redis)"),
        }
        cpu_runs = {}
        for tokens_name, tokens in (("valid", valid), ("mixed", mixed)):
            for name, (_, listener) in servers.items():  # warm up: caches filled
                loadgen(args, f"http://127.0.0.1:{ports[listener]}", tokens, closed, 1, "http")
            for _ in range(args.rounds):
                for name, (proc, listener) in servers.items():
                    before = cpu_seconds(proc.pid)
                    report = loadgen(args, f"http://127.0.0.1:{ports[listener]}", tokens, closed,
                                     args.seconds, "http")
                    report["server_cpu_us_per_check"] = (
                        (cpu_seconds(proc.pid) - before) * 1e6
                        / max(1, report["allowed"] + report["denied"]))
                    cpu_runs.setdefault(f"{name}, {tokens_name} tokens", []).append(report)
        results["cpu_under_envoy"] = cpu_runs
        if args.only == "f":
            return finish(results, args, work, stack)

        # (a) direct gRPC, valid tokens: hits on the cached sidecar, misses on the cache-less one.
        direct = {
            "allow-all example": (allow_all, allow_all_port),
            "sidecar, token cache hit": (memory, memory_port),
            "sidecar, token cache off (RS256 verify)": (miss, miss_port),
        }
        for name, (_, port) in direct.items():  # warm up
            loadgen(args, f"http://127.0.0.1:{port}", valid, closed, 1)
        runs = {name: [] for name in direct}
        for _ in range(args.rounds):
            for name, (proc, port) in direct.items():
                before = cpu_seconds(proc.pid)
                report = loadgen(args, f"http://127.0.0.1:{port}", valid, closed, args.seconds)
                report["server_cpu_us_per_check"] = (
                    (cpu_seconds(proc.pid) - before) * 1e6
                    / max(1, report["allowed"] + report["denied"]))
                runs[name].append(report)
        results["direct"] = runs

        # (b) through Envoy, mixed tokens.
        http = {name: f"http://127.0.0.1:{ports[name]}" for name in [
            "no auth", "jwt_authn", "ext_authz -> allow-all", "ext_authz -> sidecar (memory)",
            "ext_authz -> sidecar (Redis)"]}
        for addr in http.values():
            loadgen(args, addr, mixed, closed, 1, "http")
        runs = {name: [] for name in http}
        for _ in range(args.rounds):
            for name, addr in http.items():
                runs[name].append(loadgen(args, addr, mixed, closed, args.seconds, "http"))
        results["envoy"] = runs
        ceiling = statistics.median(answered_per_second(r) for r in runs["ext_authz -> allow-all"])

        # (c) open loop at shares of the allow-all ceiling.
        open_runs = {}
        for share in (0.25, 0.5, 0.75):
            rate = ["--rate", str(int(ceiling * share))]
            for name in ("ext_authz -> allow-all", "ext_authz -> sidecar (Redis)"):
                open_runs.setdefault(f"{name} @ {int(share * 100)} %", [])
            for _ in range(args.rounds):
                for name in ("ext_authz -> allow-all", "ext_authz -> sidecar (Redis)"):
                    open_runs[f"{name} @ {int(share * 100)} %"].append(
                        loadgen(args, http[name], mixed, rate, args.seconds, "http"))
        results["open_loop"] = open_runs

        # (d) memory with 100,000 distinct cached tokens, in a fresh sidecar (the cache's own
        # cost) and in the one that served the load above; time to ready.
        fresh, fresh_port, fresh_metrics = stack.sidecar(
            "sidecar_fresh", {"REVOCATION_FILE": str(revocation_file),
                              "TOKEN_CACHE_MAX_ENTRIES": "100000"})
        results["memory"] = {
            name: fill_token_cache(args, proc, port, metrics_port, many)
            for name, (proc, port, metrics_port) in {
                "fresh sidecar": (fresh, fresh_port, fresh_metrics),
                "after (a)-(c)": (memory, memory_port, memory_metrics),
            }.items()}
        ready = []
        for _ in range(5):
            metrics = free_port()
            started = time.monotonic()
            proc = stack.spawn("ready", [args.sidecar_bin], {
                "GRPC_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
                "METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics}", "JWT_ISSUER": ISSUER,
                "JWKS_FILE": str(keys / "jwks.json"), "SHUTDOWN_DRAIN_DELAY": "0s"})
            # Polled tightly (wait_for's 100 ms steps would hide the figure).
            while not http_ok(f"http://127.0.0.1:{metrics}/readyz"):
                if time.monotonic() - started > 30:
                    sys.exit("the sidecar did not become ready within 30 s")
                time.sleep(0.002)
            ready.append((time.monotonic() - started) * 1000)
            proc.terminate()
            proc.wait()
        results["ready_ms"] = ready

        # (e) Nagle's algorithm on the Check connection, direct gRPC, valid tokens (cache hits).
        nodelay = {
            f"GRPC_TCP_NODELAY={flag}": stack.sidecar(
                f"sidecar_nodelay_{flag}", {"REVOCATION_FILE": str(revocation_file),
                                            "GRPC_TCP_NODELAY": flag})
            for flag in ("true", "false")}
        one = ["--concurrency", "1"]
        for _, port, _ in nodelay.values():
            loadgen(args, f"http://127.0.0.1:{port}", valid, closed, 1)
        runs = {name: {"closed": [], "one": []} for name in nodelay}
        for _ in range(args.rounds):
            for name, (proc, port, _) in nodelay.items():
                before = cpu_seconds(proc.pid)
                report = loadgen(args, f"http://127.0.0.1:{port}", valid, closed, args.seconds)
                report["server_cpu_us_per_check"] = (
                    (cpu_seconds(proc.pid) - before) * 1e6
                    / max(1, report["allowed"] + report["denied"]))
                runs[name]["closed"].append(report)
                runs[name]["one"].append(
                    loadgen(args, f"http://127.0.0.1:{port}", valid, one, args.seconds))
        results["nodelay"] = runs
    finally:
        stack.stop()
    finish(results, args, work, stack)


def finish(results, args, work, stack):
    stack.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print_tables(results, args)


def fill_token_cache(args, proc, port, metrics_port, tokens):
    """Sends every token once; the RSS before and after, and how many tokens are cached."""
    before = rss_mib(proc.pid)
    loadgen(args, f"http://127.0.0.1:{port}", tokens, ["--concurrency", "64", "--once"], 1)
    cached = None
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith("ext_authz_token_cache_entries "):
                cached = float(line.split()[1])
    return {"rss_mib_before": before, "rss_mib_after": rss_mib(proc.pid), "cached_tokens": cached}


def median(values):
    return statistics.median(values)


def print_tables(results, args):
    print(f"\n(f) through Envoy (--concurrency 1), closed loop {args.concurrency} callers, the "
          f"authorization server's CPU per request, {args.rounds} rounds x {args.seconds} s, medians")
    print("| server, tokens | requests/s | server CPU µs per request | vs allow-all, same runtime |")
    print("|---|---|---|---|")
    runs = results["cpu_under_envoy"]
    for name, reports in runs.items():
        tokens = name.rsplit(", ", 1)[1]
        flavour = name[name.index("("):name.index(")") + 1]
        base = median(r["server_cpu_us_per_check"]
                      for r in runs[f"allow-all example {flavour}, {tokens}"])
        rate = median(answered_per_second(r) for r in reports)
        cpu = median(r["server_cpu_us_per_check"] for r in reports)
        print(f"| {name} | {rate:,.0f} | {cpu:.1f} | {cpu / base:.2f}x |")
    if args.only == "f":
        return

    print(f"\n(a) direct gRPC, closed loop {args.concurrency} callers, "
          f"{args.rounds} rounds x {args.seconds} s, medians")
    print("| server | Checks/s | vs allow-all | server CPU µs per Check |")
    print("|---|---|---|---|")
    base = median(answered_per_second(r) for r in results["direct"]["allow-all example"])
    for name, runs in results["direct"].items():
        rate = median(answered_per_second(r) for r in runs)
        cpu = median(r["server_cpu_us_per_check"] for r in runs)
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {cpu:.1f} |")

    print(f"\n(b) through Envoy (--concurrency 1), HTTP/2, closed loop {args.concurrency} callers, "
          "70/10/10/10 tokens, medians")
    print("| listener | requests/s | vs ext_authz -> allow-all | allowed share | p99 ms |")
    print("|---|---|---|---|---|")
    base = median(answered_per_second(r) for r in results["envoy"]["ext_authz -> allow-all"])
    for name, runs in results["envoy"].items():
        rate = median(answered_per_second(r) for r in runs)
        allowed = median(r["allowed"] / max(1, r["allowed"] + r["denied"]) for r in runs)
        p99 = median(r["answered_latency_us"]["p99"] for r in runs) / 1000
        errors = sum(r["errors"] for r in runs)
        note = f" ({errors} errors)" if errors else ""
        print(f"| {name} | {rate:,.0f}{note} | {rate / base:.2f}x | {allowed:.0%} | {p99:.1f} |")

    print("\n(c) through Envoy, open loop at shares of the allow-all peak, medians")
    print("| listener @ offered | achieved/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, runs in results["open_loop"].items():
        rate = median(answered_per_second(r) for r in runs)
        p50 = median(r["answered_latency_us"]["p50"] for r in runs) / 1000
        p99 = median(r["answered_latency_us"]["p99"] for r in runs) / 1000
        print(f"| {name} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |")

    print("\n(d) RSS with 100,000 distinct tokens sent once")
    print("| sidecar | RSS before | RSS after | cached tokens |")
    print("|---|---|---|---|")
    for name, m in results["memory"].items():
        print(f"| {name} | {m['rss_mib_before']:.1f} MiB | {m['rss_mib_after']:.1f} MiB "
              f"| {m['cached_tokens']:,.0f} |")
    print(f"ready after {', '.join(f'{t:.0f}' for t in results['ready_ms'])} ms "
          f"(median {median(results['ready_ms']):.0f} ms)")

    print(f"\n(e) GRPC_TCP_NODELAY, direct gRPC, valid tokens, {args.rounds} rounds x "
          f"{args.seconds} s, medians")
    print(f"| setting | Checks/s ({args.concurrency} callers) | server CPU µs per Check "
          "| one caller: Checks/s | p50 µs | p99 µs | p99.9 µs | max µs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results["nodelay"].items():
        rate = median(answered_per_second(r) for r in runs["closed"])
        cpu = median(r["server_cpu_us_per_check"] for r in runs["closed"])
        one_rate = median(answered_per_second(r) for r in runs["one"])
        p50 = median(r["answered_latency_us"]["p50"] for r in runs["one"])
        p99 = median(r["answered_latency_us"]["p99"] for r in runs["one"])
        p999 = median(r["answered_latency_us"]["p999"] for r in runs["one"])
        worst = median(r["answered_latency_us"]["max"] for r in runs["one"])
        print(f"| {name} | {rate:,.0f} | {cpu:.1f} | {one_rate:,.0f} | {p50:.0f} | {p99:.0f} "
              f"| {p999:.0f} | {worst:,.0f} |")


if __name__ == "__main__":
    main()
