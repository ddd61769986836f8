#!/usr/bin/env bash
# Checks/s of sidecar binaries inside a CPU quota, as a pod with a CPU limit runs them: each
# binary in turn (A B A B ...) in a cgroup v1 `cpu` group with cfs_quota/period, the Redis
# backend with its revocation cache, GRPC_NUM_STREAM_WORKERS unset (the quota decides the
# workers), `loadgen` 50 callers on one HTTP/2 connection (Envoy's shape), 1,000 valid tokens.
# Needs root and a writable /sys/fs/cgroup/cpu (BENCHMARKS.md, "CPU per request under Envoy").
#
#   benches/cpu_quota.sh QUOTA_MILLICPU ROUNDS BINARY...
set -euo pipefail
millicpu=$1 rounds=$2; shift 2
cg=/sys/fs/cgroup/cpu/authz-bench
work=$(mktemp -d)
mkdir -p "$cg"
echo 100000 >"$cg/cpu.cfs_period_us"
echo $((millicpu * 100)) >"$cg/cpu.cfs_quota_us"
client=$1   # the first binary also makes the keys and tokens and runs loadgen
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$client" dev-keys --dir "$work/keys" >/dev/null
"$client" tokens --dir "$work/keys" --issuer https://quota.test --audience api --count 1000 \
    --mix 100,0,0,0 --revoked-out "$work/rev.txt" >"$work/valid.jsonl" 2>/dev/null
redis_port=$(free_port)
redis-server --port "$redis_port" --save '' --appendonly no >/dev/null 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true; rm -rf "$work"; rmdir "$cg" 2>/dev/null || true' EXIT
sleep 0.5
echo "round binary checks_per_s cpu_s"
for round in $(seq "$rounds"); do
    for binary in "$@"; do
        port=$(free_port)
        env JWT_ISSUER=https://quota.test JWT_AUDIENCE=api JWKS_FILE="$work/keys/jwks.json" \
            REVOCATION_BACKEND=redis REDIS_URL="redis://127.0.0.1:$redis_port" \
            GRPC_LISTEN_ADDR="127.0.0.1:$port" METRICS_LISTEN_ADDR="127.0.0.1:$(free_port)" \
            RUST_LOG=error sh -c "echo \$\$ >$cg/cgroup.procs; exec $binary" 2>>"$work/sidecar.log" &
        pid=$!
        for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
        load() { "$client" loadgen --json --addr "http://127.0.0.1:$port" --tokens "$work/valid.jsonl" \
            --concurrency 50 --connections 1 --seconds "$1"; }
        load 2 >/dev/null
        before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        report=$(load 6)
        after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        rate=$(echo "$report" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(round((r["allowed"]+r["denied"])/r["seconds"]))')
        echo "$round $binary $rate $(awk -v t=$((after - before)) 'BEGIN { printf "%.2f", t / 100 }')"
        kill "$pid"; wait "$pid" 2>/dev/null || true
    done
done
