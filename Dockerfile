# Build:  docker build -t authz-sidecar:0.1.0 .
# Run:    docker run -p 9191:9191 -p 9090:9090 -e JWT_ISSUER=... -e JWKS_URL=... authz-sidecar:0.1.0

# Build stage: the release binary. protox compiles proto/ in-process, so no protoc is needed;
# aws-lc-sys needs a C compiler and cmake, which the rust image has.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
# The workspace's other member (the Envoy module), so the manifest resolves; not built here.
COPY module module
# Without the default `tools` feature: no dev keys, token minting, load generator or check
# client in the image (and three dependencies fewer).
RUN cargo build --release --locked --bin authz-sidecar --no-default-features

# Runtime: glibc, CA certificates (JWKS and rediss:// over TLS verify against them) and
# nothing else: no shell, no package manager. Runs as the image's non-root user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/authz-sidecar /usr/local/bin/authz-sidecar
USER 65532:65532
# gRPC Check (and gRPC health); HTTP /metrics, /healthz, /readyz.
EXPOSE 9191 9090
ENTRYPOINT ["/usr/local/bin/authz-sidecar"]
