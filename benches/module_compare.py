#!/usr/bin/env python3
"""The in-Envoy module against jwt_authn, no auth and the ext_authz sidecar (`make bench-module`).

One Envoy (--concurrency 1) with a listener per variant, every route a direct 200, so the only
work is authorization:

  no auth | jwt_authn with jwt_cache_config (cannot revoke) |
  jwt_authn, claims out: `sub` in x-jwt-sub (claim_to_headers) and the payload in the dynamic
  metadata (payload_in_metadata), what the module gives by default |
  ext_authz -> sidecar (Redis backend, unix socket, allowed_headers: the best ext_authz variant) |
  the module inside Envoy (Redis backend, its revocation cache on), as configured by default
  (`sub` in x-jwt-sub, iss and sub in the dynamic metadata) and with no claims out (as the plain
  jwt_authn listener)

Each module variant is also compared with the jwt_authn listener that gives the same outputs.

Rounds of A B C D, each round starting one variant later (medians reported), closed loop with wrk (one thread, 50 HTTP/1.1 connections):
requests/s and Envoy's CPU per request (the module's threads are Envoy's, so its CPU is in
there; the sidecar's own CPU is reported beside it), for valid tokens and the seed's 70/10/10/10
mix. Needs `make build module` (release). Prints markdown; raw reports go to --out (JSON).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "locust"))
from envoy_compare import (  # noqa: E402  (the Envoy bench's stack and listeners)
    AUDIENCE, ISSUER, Stack, cpu_seconds, listener, port_open)
from run_stack import free_port, http_ok, wait_for  # noqa: E402

VARIANTS = ["no auth", "jwt_authn + cache", "jwt_authn + cache + claims out",
            "ext_authz -> sidecar", "module", "module with no claims out"]

# The jwt_authn listener whose outputs (claim headers, dynamic metadata) each module variant
# matches.
SAME_OUTPUTS = {"module": "jwt_authn + cache + claims out",
                "module with no claims out": "jwt_authn + cache"}


def envoy_config(ports, jwks_json, sidecar_socket, module_settings):
    def jwt_authn(claims_out):
        outputs = """
                          claim_to_headers: [ { header_name: x-jwt-sub, claim_name: sub } ]
                          payload_in_metadata: jwt_payload""" if claims_out else ""
        return f"""
                  - name: envoy.filters.http.jwt_authn
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
                      providers:
                        bench:
                          issuer: {ISSUER}
                          audiences: [{AUDIENCE}]
                          local_jwks: {{ inline_string: {json.dumps(jwks_json)} }}
                          jwt_cache_config: {{ jwt_cache_size: 1000 }}{outputs}
                      rules:
                        - match: {{ prefix: "/" }}
                          requires: {{ provider_name: bench }}"""
    ext_authz = """
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      grpc_service:
                        envoy_grpc: { cluster_name: sidecar }
                        timeout: 0.25s
                      failure_mode_allow: false
                      status_on_error: { code: ServiceUnavailable }
                      allowed_headers: { patterns: [ { exact: authorization } ] }"""
    def module(settings):
        settings = "".join(f"\n                          {k}: {json.dumps(v)}"
                           for k, v in settings.items())
        return f"""
                  - name: authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
                      dynamic_module_config: {{ name: authz_sidecar_module, do_not_close: true }}
                      filter_name: authz
                      filter_config:
                        "@type": type.googleapis.com/google.protobuf.Struct
                        value:{settings}"""

    listeners = [
        listener("no_auth", ports["no auth"], []),
        listener("jwt_authn", ports["jwt_authn + cache"], [jwt_authn(False)]),
        listener("jwt_authn_claims_out", ports["jwt_authn + cache + claims out"],
                 [jwt_authn(True)]),
        listener("ext_authz", ports["ext_authz -> sidecar"], [ext_authz]),
        listener("module", ports["module"], [module(module_settings)]),
        # As the plain jwt_authn listener: no claim headers, nothing in the dynamic metadata.
        listener("module_no_claims_out", ports["module with no claims out"],
                 [module({**module_settings, "CLAIM_HEADERS": "",
                          "DYNAMIC_METADATA_CLAIMS": ""})]),
    ]
    cluster = f"""
    - name: sidecar
      type: STATIC
      connect_timeout: 0.25s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      load_assignment:
        cluster_name: sidecar
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ pipe: {{ path: {sidecar_socket} }} }} }}"""
    return ("static_resources:\n  listeners:" + "".join(listeners)
            + "\n  clusters:" + cluster + "\n")


def wrk(url, tokens, seconds, connections):
    """Closed loop: requests/s and the requests answered, from wrk's summary."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                          "-s", str(ROOT / "benches/wrk_tokens.lua"), url, "--", str(tokens)],
                         capture_output=True, text=True, check=True).stdout
    fields = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            fields["rps"] = float(line.split()[1])
        elif " requests in " in line:
            fields["requests"] = int(line.split()[0])
        elif line.startswith("Non-2xx or 3xx responses:"):
            fields["non_2xx"] = int(line.split()[-1])
    fields.setdefault("non_2xx", 0)
    return fields


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sidecar-bin", default=str(ROOT / "target/release/authz-sidecar"))
    parser.add_argument("--module-dir", default=str(ROOT / "target/release"))
    parser.add_argument("--envoy-bin", default=os.environ.get("ENVOY_BIN", str(ROOT / ".venv/bin/envoy")))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=50, help="wrk connections")
    parser.add_argument("--out", default=str(ROOT / "target/bench-module.json"))
    parser.add_argument("--module-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="another filter config key for the module (repeatable)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset, e.g. `module` to profile it alone")
    args = parser.parse_args()
    module = Path(args.module_dir) / "libauthz_sidecar_module.so"
    for tool in (args.sidecar_bin, args.envoy_bin, "redis-server", "wrk", str(module)):
        if not shutil.which(tool) and not Path(tool).exists():
            sys.exit(f"missing {tool}: `make bench-module` builds and installs what it needs")

    work = Path(tempfile.mkdtemp(prefix="authz-bench-module-"))
    stack = Stack(args, work)
    try:
        keys = work / "keys"
        subprocess.run([args.sidecar_bin, "dev-keys", "--dir", str(keys)], check=True,
                  capture_output=True)

        def token_set(name, mix):
            out = subprocess.run([args.sidecar_bin, "tokens", "--dir", str(keys), "--issuer",
                                  ISSUER, "--audience", AUDIENCE, "--count", "1000", "--mix", mix,
                                  "--revoked-out", str(work / f"{name}-revoked.txt")],
                                 capture_output=True, text=True, check=True).stdout
            path = work / f"{name}.txt"
            path.write_text("".join(json.loads(line)["token"] + "\n"
                                    for line in out.splitlines()))
            return path

        token_sets = {"valid": token_set("valid", "100,0,0,0"),
                      "mixed": token_set("mixed", "70,10,10,10")}
        redis_port = free_port()
        stack.spawn("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"])
        wait_for("redis", lambda: port_open(redis_port))
        redis_url = f"redis://127.0.0.1:{redis_port}"
        subprocess.run([args.sidecar_bin, "revoke", "jti", "--from-file",
                   str(work / "mixed-revoked.txt")], check=True, capture_output=True,
                  env={**os.environ, "REVOCATION_BACKEND": "redis", "REDIS_URL": redis_url})

        socket_path = work / "sidecar.sock"
        sidecar, _, _ = stack.sidecar("sidecar", {
            "REVOCATION_BACKEND": "redis", "REDIS_URL": redis_url,
            "GRPC_UNIX_SOCKET": str(socket_path)})
        module_settings = {
            "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE,
            "JWKS_FILE": str(keys / "jwks.json"),
            "REVOCATION_BACKEND": "redis", "REDIS_URL": redis_url,
            "METRICS_LISTEN_ADDR": "", "RUST_LOG": "warn", "CHECK_TIMEOUT": "250ms",
            **dict(setting.split("=", 1) for setting in args.module_setting)}
        ports = {name: free_port() for name in VARIANTS}
        admin = free_port()
        jwks_json = json.loads((keys / "jwks.json").read_text())
        config = envoy_config(ports, json.dumps(jwks_json), socket_path, module_settings)
        config += f"admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\n"
        (work / "envoy.yaml").write_text(config)
        envoy = stack.spawn("envoy", [args.envoy_bin, "-c", str(work / "envoy.yaml"),
                                      "--concurrency", "1", "--disable-hot-restart",
                                      "--log-level", "warn"],
                            env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(module.parent)})
        wait_for("envoy", lambda: http_ok(f"http://127.0.0.1:{admin}/ready"))

        variants = args.variants.split(",")
        runs = {}
        for tokens_name, tokens in token_sets.items():
            for name in variants:  # warm up: every cache filled
                wrk(f"http://127.0.0.1:{ports[name]}/", tokens, 1, args.concurrency)
            for round_ in range(args.rounds):
                # Each round starts one variant later, so none always runs first or last.
                shift = round_ % len(variants)
                for name in variants[shift:] + variants[:shift]:
                    envoy_before, sidecar_before = cpu_seconds(envoy.pid), cpu_seconds(sidecar.pid)
                    report = wrk(f"http://127.0.0.1:{ports[name]}/", tokens, args.seconds,
                                 args.concurrency)
                    answered = max(1, report["requests"])
                    report["envoy_cpu_us"] = (cpu_seconds(envoy.pid) - envoy_before) * 1e6 / answered
                    report["sidecar_cpu_us"] = (cpu_seconds(sidecar.pid) - sidecar_before) * 1e6 / answered
                    runs.setdefault(f"{name}, {tokens_name}", []).append(report)
        Path(args.out).write_text(json.dumps(runs, indent=1))
        print_table(runs, args)
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


def print_table(runs, args):
    """Medians of requests/s and CPU per request; each ratio is the median of the per-round
    ratios (each round's variants ran back to back), which cancels the machine's slow drifts."""
    def med(key, field):
        return statistics.median(r[field] for r in runs[key])

    def ratio(key, base, field):
        if key not in runs or base not in runs:
            return ""
        pairs = zip(runs[key], runs[base])
        return f"{statistics.median(a[field] / b[field] for a, b in pairs):.2f}x"

    print(f"\nThrough Envoy (--concurrency 1), {args.concurrency} closed-loop callers, medians of "
          f"{args.rounds} interleaved rounds of {args.seconds} s; ratios are medians of the "
          "per-round ratios\n")
    for tokens in ("valid", "mixed"):
        print(f"{tokens} tokens\n")
        print("| path through Envoy | requests/s | vs jwt_authn + cache | vs jwt_authn, same outputs "
              "| Envoy CPU µs/request | vs no auth | sidecar CPU µs/request |")
        print("|---|---|---|---|---|---|---|")
        for name in VARIANTS:
            key = f"{name}, {tokens}"
            if key not in runs:
                continue
            rps, cpu = med(key, "rps"), med(key, "envoy_cpu_us")
            sidecar = med(key, "sidecar_cpu_us") if name == "ext_authz -> sidecar" else 0
            same = (ratio(key, f"{SAME_OUTPUTS[name]}, {tokens}", "rps")
                    if name in SAME_OUTPUTS else "")
            print(f"| {name} | {rps:,.0f} | {ratio(key, f'jwt_authn + cache, {tokens}', 'rps')} "
                  f"| {same} | {cpu:.1f} | {ratio(key, f'no auth, {tokens}', 'envoy_cpu_us')} "
                  f"| {sidecar:.1f} |")
        print()


if __name__ == "__main__":
    main()
