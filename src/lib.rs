//! An Envoy ext_authz gRPC sidecar: verifies each request's JWT against its issuer's cached
//! JWKS, checks the token against a revocation store, and tells Envoy to allow or deny.
//!
//! # Layout
//! - [`cli`]: the command line and the dispatch to serving and the operator's commands.
//! - [`config`]: the only place that reads flags and env (each setting declared once, with its
//!   env var, default, unit and parser) and the one place that builds every component's settings.
//! - [`server`]: builds the components and serves Check until shutdown (`run`).
//! - [`listener`]: the Check listener's connections (TCP, TLS, a unix socket) as one stream.
//! - [`tls`]: TLS/mTLS on the Check listener, certificates reloaded when their files change.
//! - [`pem`]: PEM files into rustls types, for the Check listener's TLS and the Redis client's.
//! - [`admission`]: MAX_IN_FLIGHT taken as each Check's stream arrives; the excess is shed, and
//!   a stream that does not deliver its request within GRPC_REQUEST_READ_TIMEOUT is answered.
//! - [`check`]: the Check RPC: what is read from Envoy's request, the handler and its deadline,
//!   what is answered, and when an allow may be given again without one (the in-Envoy
//!   module's memo); the only module that knows Envoy's message shapes.
//! - [`authorizer`]: token -> decision: parse, issuer, claims, key, signature, revocation.
//! - [`binding`]: sender-constrained tokens: a `cnf`-bound token passes only with its proof on
//!   the request (the client certificate of RFC 8705, the DPoP proof of RFC 9449).
//! - [`dpop`]: DPoP proofs (RFC 9449): the proof JWT against the request, the token and its
//!   key thumbprint (RFC 7638), then the replay check.
//! - [`replay`]: one-time identifiers seen before (DPoP proofs, logout tokens): in process, and
//!   shared through Redis with the Redis backend.
//! - [`route`]: per-route requirements from Envoy's context_extensions (scopes, audiences,
//!   anonymous, step-up, the CEL rule, dry run).
//! - [`policy`]: per-route CEL rules over the claims and the request: compiled once, the claims
//!   they read declared, evaluated per Check.
//! - [`audit`]: the decision log: a JSON line per Check (denials all, allows sampled), written
//!   by its own thread through a bounded queue that drops rather than blocks.
//! - [`decision`]: `Decision`, `Denial` reasons and `CheckError` failures, with their labels.
//! - [`claims`]: verified claims, and which of them a cached token keeps (what readers declare).
//! - [`keys`]: public keys from a JWKS and the checks a key must pass before it is used.
//! - [`jwt`]: pure verification, no I/O.
//! - [`token_cache`]: verified tokens by SHA-256, so a repeated token skips the signature.
//! - [`jwks`]: per-issuer key sets: fetch, cache, refresh, unknown-kid single flight, stale.
//! - [`revocation`]: the store trait; the embedded memory backend and the Redis (fred) backend.
//! - [`logout`]: the OpenID Connect Back-Channel Logout endpoint: a logout token from the
//!   identity provider, validated, becomes a session or subject revocation in the store.
//! - [`rate_limit`]: per-subject, per-client and global GCRA limits, local or shared in Redis.
//! - [`redis`]: what every Redis user shares: the pool, reconnect policy, call budget, errors.
//! - [`breaker`]: the circuit breaker that makes a dead Redis cost microseconds, not timeouts.
//! - [`metrics`]: every Prometheus series, declared once; labels from enums.
//! - [`health`]: readiness from named components, kept in step with gRPC health.
//! - [`ops_server`]: the operations listener: `/metrics`, `/healthz`, `/readyz`.
//! - [`throttle`]: one warning per interval when a dependency fails on every Check.
//! - [`tools`]: dev keys and token minting, the load generator and the one-shot Check client,
//!   behind the default-on `tools` feature.
//! - [`pb`]: generated code for `proto/`.
//!
//! Dependencies between these modules point one way: `tests/layout.rs` fails on a cycle, and
//! on a module this list does not name.

pub mod admission;
pub mod audit;
pub mod authorizer;
pub mod binding;
pub mod breaker;
pub mod check;
pub mod claims;
pub mod cli;
pub mod config;
pub mod decision;
pub mod dpop;
pub mod health;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod listener;
pub mod logout;
pub mod metrics;
pub mod ops_server;
pub mod pb;
pub mod pem;
pub mod policy;
pub mod rate_limit;
pub mod redis;
pub mod replay;
pub mod revocation;
pub mod route;
pub mod server;
pub mod throttle;
pub mod tls;
pub mod token_cache;
#[cfg(feature = "tools")]
pub mod tools;
