#!/usr/bin/env bash
# Instructions per Check under callgrind, and where they go: the sidecar answering cache hits
# against the allow-all example (the hop alone), the same Checks for each. Run by `make profile`
# (BENCHMARKS.md, "Where the CPU goes"). Needs valgrind; release builds. Valgrind does not run
# SHA-NI, so aws-lc hashes with AVX under it: the SHA-256 row is ~4x what the CPU pays natively.
#
#   benches/callgrind_check.sh [CHECKS]        default 20,000
#
# Environment: CALLERS (default 8) concurrent Checks over CONNECTIONS (default 4) HTTP/2
# connections; WORKERS (default: one per core) runtime threads in both servers, 1 being a
# current-thread runtime. Envoy's shape is CONNECTIONS=1 CALLERS=50 (one connection per Envoy
# worker, many streams on it).
set -euo pipefail
callers=${CALLERS:-8}
connections=${CONNECTIONS:-4}
workers=${WORKERS:-$(nproc)}

cd "$(dirname "$0")/.."
checks=${1:-20000}
sidecar=target/release/authz-sidecar
allow_all=target/release/examples/allow_all
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

"$sidecar" dev-keys --dir "$work/keys" >/dev/null
"$sidecar" tokens --dir "$work/keys" --issuer https://profile.test --audience api \
    --count 100 --mix 100,0,0,0 --revoked-out "$work/revoked-set.txt" >"$work/distinct.jsonl" 2>/dev/null
# The 100 tokens over and over: after the first round every Check is a cache hit.
for _ in $(seq $((checks / 100))); do cat "$work/distinct.jsonl"; done >"$work/checks.jsonl"
touch "$work/revoked.txt"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Runs "$@" under callgrind with collection off, warms it up, then counts exactly the Checks
# of checks.jsonl. Prints the callgrind output file.
profile() {
    local name=$1 port=$2; shift 2
    local out="$work/callgrind.$name"
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" "$@" \
        >"$work/$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    "$sidecar" loadgen --addr "http://127.0.0.1:$port" --tokens "$work/distinct.jsonl" \
        --concurrency "$callers" --connections "$connections" --once --timeout-ms 60000 >/dev/null
    callgrind_control --instr=on "$pid" >/dev/null 2>&1
    "$sidecar" loadgen --addr "http://127.0.0.1:$port" --tokens "$work/checks.jsonl" \
        --concurrency "$callers" --connections "$connections" --once --timeout-ms 60000 \
        >"$work/$name.loadgen"
    callgrind_control --instr=off "$pid" >/dev/null 2>&1
    callgrind_control --dump "$pid" >/dev/null 2>&1
    kill "$pid"; wait "$pid" 2>/dev/null || true
    cp "$out.1" "target/callgrind.$name"   # the --dump: exactly the counted Checks
    echo "target/callgrind.$name"
}

port=$(free_port)
allow_out=$(profile allow_all "$port" "$allow_all" "127.0.0.1:$port" "$workers")
port=$(free_port)
sidecar_out=$(
    export GRPC_LISTEN_ADDR="127.0.0.1:$port" METRICS_LISTEN_ADDR="127.0.0.1:$(free_port)" \
        JWT_ISSUER=https://profile.test JWT_AUDIENCE=api JWKS_FILE="$work/keys/jwks.json" \
        REVOCATION_FILE="$work/revoked.txt" RUST_LOG=warn SHUTDOWN_DRAIN_DELAY=0s \
        GRPC_NUM_STREAM_WORKERS="$workers"
    profile sidecar "$port" "$sidecar"
)

# Instructions per Check: the whole process, then the inclusive cost of the functions that
# say where it goes (a function's callees included; the rows overlap).
per_check() { awk -v n="$checks" '/^totals:/ {printf "%9.0f", $2 / n}' "$1"; }
inclusive() {
    callgrind_annotate --inclusive=yes "$1" 2>/dev/null \
        | awk -v n="$checks" -v pat="$2" 'index($0, pat) { gsub(",", "", $1); printf "%9.0f", $1 / n; exit }'
}
echo "instructions per Check ($checks Checks, $callers callers on $connections connection(s), $workers worker(s), valid tokens, token cache hits):"
echo "                                         allow-all  sidecar"
echo "  whole process                          $(per_check "$allow_out") $(per_check "$sidecar_out")"
for row in \
    "decoding the CheckRequest (prost)|<tonic::codec::decode::Streaming<T> as futures_core::stream::Stream>::poll_next" \
    "the Check handler (tonic's CheckSvc)|::call::CheckSvc<T> as tonic::server::service::UnaryService" \
    "  Authorizer::decide|authz_sidecar::authorizer::Authorizer<S>::decide" \
    "    SHA-256 of the token|authz_sidecar::token_cache::digest" \
    "  building the OkResponse|authz_sidecar::check::response::allow" \
    "memcpy|__memcpy_avx_unaligned_erms" \
    "malloc|malloc.c:malloc " \
    "free|malloc.c:free "; do
    label=${row%%|*}; pattern=${row#*|}
    printf "  %-38s %9s %9s\n" "$label" "$(inclusive "$allow_out" "$pattern")" \
        "$(inclusive "$sidecar_out" "$pattern")"
done
echo "(callgrind_annotate --inclusive=yes target/callgrind.sidecar for the rest)"
