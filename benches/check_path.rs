//! Baseline cost of one Check on the cache-less path. A plain loop, not criterion: each round
//! runs every variant once (A B C A B C ...), and the median of the rounds is reported, so a
//! noisy neighbour on the 2 shared cores hits all variants alike.
//!
//!     cargo bench --bench check_path            (or: make bench)

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use authz_sidecar::decision::Decision;
use authz_sidecar::revocation::MemoryStore;
use authz_sidecar::route::RouteRequirements;
use authz_sidecar::token_cache::TokenCache;
use authz_sidecar::tools::devkeys::SigningKey;
use common::{AUDIENCE, Fixture, ISSUER, median, now, valid_claims};
use jsonwebtoken::Algorithm;
use serde_json::json;

const ROUNDS: usize = 9;
const OPS_PER_ROUND: usize = 2000;

#[tokio::main]
async fn main() {
    let fixture = Fixture::new(&[
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::EdDSA,
    ]);
    let keys = &fixture.keys;
    // Two authorizers over the same keys: without and with the verified-token cache.
    let memory = || MemoryStore::open(None).unwrap();
    let authorizer = fixture.authorizer(memory(), None);
    let cached = fixture.authorizer(memory(), TokenCache::new(100_000, Duration::from_secs(300)));

    let mut variants: Vec<(String, String, _)> = keys
        .iter()
        .map(|k| {
            (
                format!("allow {:?}", k.alg),
                k.sign(&valid_claims()).unwrap(),
                authorizer.clone(),
            )
        })
        .collect();
    variants.push((
        "allow RS256, verified-token cache hit".into(),
        variants[0].1.clone(),
        cached.clone(),
    ));
    let mut expired = valid_claims();
    expired["exp"] = json!(now() - 3600);
    variants.push((
        "deny expired (no signature work)".into(),
        keys[0].sign(&expired).unwrap(),
        authorizer.clone(),
    ));
    variants.push((
        "deny malformed".into(),
        "not.a-token".into(),
        authorizer.clone(),
    ));

    // Warm up: loads the key set, fills the cache, checks every variant decides as expected.
    for (name, token, authorizer) in &variants {
        let decision = authorizer
            .decide(Some(token), &RouteRequirements::default(), now())
            .await
            .unwrap();
        assert_eq!(
            name.starts_with("allow"),
            matches!(decision, Decision::Allow(..)),
            "{name}"
        );
    }

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, token, authorizer)) in variants.iter().enumerate() {
            let t = now();
            let start = Instant::now();
            for _ in 0..OPS_PER_ROUND {
                std::hint::black_box(
                    authorizer
                        .decide(Some(token), &RouteRequirements::default(), t)
                        .await
                        .unwrap(),
                );
            }
            samples[i].push(start.elapsed().as_secs_f64() * 1e6 / OPS_PER_ROUND as f64);
        }
    }
    println!(
        "decide() in process, median of {ROUNDS} rounds x {OPS_PER_ROUND} ops, microseconds per Check:"
    );
    for ((name, _, _), s) in variants.iter().zip(samples) {
        let (lo, hi) = (
            s.iter().cloned().fold(f64::MAX, f64::min),
            s.iter().cloned().fold(0.0, f64::max),
        );
        println!(
            "  {name:<36} {:>8.1} us   (min {lo:.1}, max {hi:.1})",
            median(s)
        );
    }

    grpc_round_trip(&fixture.dir, &keys[0]).await;
}

/// Sequential Checks over loopback gRPC: the hop's latency with one request in flight.
async fn grpc_round_trip(dir: &std::path::Path, key: &SigningKey) {
    use authz_sidecar::cli::Cli;
    use authz_sidecar::config::Config;
    use authz_sidecar::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use authz_sidecar::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use authz_sidecar::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use clap::Parser;

    let jwks_file = dir.join("jwks.json");
    let cli = Cli::try_parse_from([
        "authz-sidecar",
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
        "--jwks-file",
        jwks_file.to_str().unwrap(),
        "--log-filter",
        "warn",
    ])
    .unwrap();
    let config = Config::from_settings(&cli.settings).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listeners = authz_sidecar::server::Listeners {
        grpc: listener,
        grpc_unix: None,
        metrics: None,
        logout: None,
    };
    tokio::spawn(authz_sidecar::server::run(
        config,
        listeners,
        std::future::pending(),
    ));
    let mut client = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let request = |token: &str| CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    headers: HashMap::from([("authorization".into(), format!("Bearer {token}"))]),
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    };
    let allow = request(&key.sign(&valid_claims()).unwrap());
    let deny = request("not.a-token");
    for r in [&allow, &deny] {
        client.check(r.clone()).await.unwrap();
    }
    let mut samples = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, r) in [&allow, &deny].into_iter().enumerate() {
            let start = Instant::now();
            for _ in 0..OPS_PER_ROUND / 2 {
                std::hint::black_box(client.check(r.clone()).await.unwrap());
            }
            samples[i].push(start.elapsed().as_secs_f64() * 1e6 / (OPS_PER_ROUND / 2) as f64);
        }
    }
    let [allow_s, deny_s] = samples;
    println!(
        "Check over loopback gRPC, one in flight, median of {ROUNDS} rounds, microseconds per Check:"
    );
    println!("  {:<36} {:>8.1} us", "allow RS256", median(allow_s));
    println!("  {:<36} {:>8.1} us", "deny malformed", median(deny_s));
}
