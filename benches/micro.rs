//! criterion micro-benchmarks of the Check path's parts: parse + signature per algorithm, a
//! verified-token cache hit, and one whole in-process Check (`decide`) with the memory and
//! Redis revocation backends, token cache hit and miss, and what a route's CEL rule adds to a
//! Check (`policy`: the rule's evaluation over a cached token's claims and the request), and
//! what a DPoP proof adds to a Check (`dpop`: the proof's checks and signature, then the replay
//! check in process or in Redis), and what a certificate-bound token adds (`binding`: the client
//! certificate's thumbprint against `cnf`). criterion gives each a confidence
//! interval and compares with the last run (`-- --save-baseline NAME`, `--baseline NAME`);
//! the A/B ratios of BENCHMARKS.md come from check_path's interleaved rounds instead.
//!
//!     cargo bench --bench micro            (or: make bench)
//!     cargo bench --bench micro -- dpop    (one group)

mod common;

use std::sync::Arc;
use std::time::Duration;

use authz_sidecar::decision::Decision;
use authz_sidecar::dpop::{
    DpopSettings, DpopVerifier, ProofOutcome, ProofRules, ProofTarget, jwk_thumbprint, verify_proof,
};
use authz_sidecar::jwt::{self};
use authz_sidecar::keys::VerifyingKey;
use authz_sidecar::policy::{InlinePolicies, Policies, PolicyConfig, RequestFacts};
use authz_sidecar::revocation::{Backend, FailureMode, MemoryStore, RedisStore, RevocationStore};
use authz_sidecar::route::{RoutePolicy, RouteRequirements};
use authz_sidecar::token_cache::{self, TokenCache, VerifiedToken};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Fixture, RedisServer, now, redis_settings, valid_claims};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use jsonwebtoken::Algorithm;

const ALGORITHMS: [Algorithm; 5] = [
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `jwt::parse` and the signature check: what a cache miss pays for a valid token.
fn verify(c: &mut Criterion) {
    let fixture = Fixture::new(&ALGORITHMS);
    let mut group = c.benchmark_group("verify");
    for key in &fixture.keys {
        let token = key.sign(&valid_claims()).unwrap();
        let jwk = serde_json::from_value(key.jwk().unwrap()).unwrap();
        let verifying = VerifyingKey::from_jwk(&jwk).unwrap();
        group.bench_function(format!("{:?}", key.alg), |b| {
            b.iter(|| {
                let parsed = jwt::parse(&token, &fixture.policy).unwrap();
                jwt::verify_signature(&parsed, &verifying).unwrap();
            })
        });
    }
    group.finish();
}

/// SHA-256 of the token and the lookup: what a hit pays instead of the signature.
fn cache_hit(c: &mut Criterion) {
    let fixture = Fixture::new(&[Algorithm::ES256]);
    let key = &fixture.keys[0];
    let token = key.sign(&valid_claims()).unwrap();
    let parsed = jwt::parse(&token, &fixture.policy).unwrap();
    let jwk = serde_json::from_value(key.jwk().unwrap()).unwrap();
    let cache = TokenCache::new(100_000, Duration::from_secs(300)).unwrap();
    cache.insert(
        token_cache::digest(&token),
        VerifiedToken {
            claims: parsed.claims.into(),
            alg: Algorithm::ES256,
            named_kid: true,
            key: VerifyingKey::from_jwk(&jwk).unwrap().into(),
            revocation_stamp: 0,
        },
        now(),
    );
    let t = now();
    c.bench_function("token_cache/digest + hit", |b| {
        b.iter(|| cache.get(&token_cache::digest(&token), t).unwrap())
    });
}

/// One `decide` for a valid ES256 token: parse, keys, signature (on a miss), revocation.
fn check<S: RevocationStore + 'static>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    backend: &str,
    store: impl Fn() -> S,
) {
    let fixture = Fixture::new(&[Algorithm::ES256]);
    let token = fixture.keys[0].sign(&valid_claims()).unwrap();
    let cache = || TokenCache::new(100_000, Duration::from_secs(300));
    let mut group = c.benchmark_group(format!("check/{backend}"));
    for (name, authorizer) in [
        ("miss", fixture.authorizer(store(), None)),
        ("hit", fixture.authorizer(store(), cache())),
    ] {
        let route = RouteRequirements::default();
        let decided = rt.block_on(authorizer.decide(Some(&token), &route, now()));
        assert!(matches!(decided, Ok(Decision::Allow(..))), "{decided:?}");
        let t = now();
        group.bench_function(name, |b| {
            b.to_async(rt)
                .iter(|| async { authorizer.decide(Some(&token), &route, t).await.unwrap() })
        });
    }
    group.finish();
}

fn checks(c: &mut Criterion) {
    let rt = runtime();
    check(c, &rt, "memory", || MemoryStore::open(None).unwrap());
    let redis = RedisServer::start();
    let settings = redis_settings(&redis, 4, 0);
    check(c, &rt, "redis", || {
        rt.block_on(RedisStore::connect(&settings)).unwrap()
    });
}

/// What `Policies::check` adds to an allowed Check: no rule; a typical named rule (tenant in
/// the path); an inline one (its compiled program found by text); a regex on a claim.
fn policy(c: &mut Criterion) {
    let config = PolicyConfig::build(
        [(
            "tenant-in-path".to_string(),
            "request.path_segments[1] == claims.tenant".to_string(),
        )],
        None,
        InlinePolicies::AnyClaim,
    )
    .unwrap();
    let metrics = authz_sidecar::metrics::Metrics::new(&[]);
    let policies = Policies::new(&config, &metrics);
    let mut claims = valid_claims();
    claims["tenant"] = "acme".into();
    claims["roles"] = serde_json::json!(["user", "admin"]);
    claims["email"] = "ann@example.com".into();
    claims["scope"] = "orders:read orders:write".into();
    let claims =
        authz_sidecar::claims::Claims::from_object(claims.as_object().unwrap().clone()).unwrap();
    let headers: std::collections::HashMap<String, String> = [
        ("authorization", "Bearer x"),
        ("x-tenant", "acme"),
        ("user-agent", "bench"),
        ("accept", "*/*"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let request = RequestFacts {
        method: "GET",
        path: "/tenants/acme/orders?page=2",
        host: "api.test",
        headers: Some(&headers),
        ..RequestFacts::default()
    };
    let mut group = c.benchmark_group("policy");
    for (name, choice) in [
        ("none", RoutePolicy::Default),
        ("named_tenant_in_path", RoutePolicy::Named("tenant-in-path")),
        (
            "inline_role",
            RoutePolicy::Inline("\"admin\" in claims.roles"),
        ),
        (
            "inline_email_regex",
            RoutePolicy::Inline("claims.email.matches(\"@example\\\\.com$\")"),
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| policies.check(&choice, &claims, &request, now()).unwrap())
        });
    }
    group.finish();
}

/// A client's DPoP key: signs proofs for `GET https://api.test/orders` with a given token.
struct ProofSigner {
    alg: Algorithm,
    header: String,
    jkt: String,
    encoding: jsonwebtoken::EncodingKey,
}

impl ProofSigner {
    fn new(alg: Algorithm) -> Self {
        let key = authz_sidecar::tools::devkeys::SigningKey::generate(alg, "client").unwrap();
        let pem = key.pem().as_bytes();
        let encoding = match alg {
            Algorithm::EdDSA => jsonwebtoken::EncodingKey::from_ed_pem(pem),
            _ => jsonwebtoken::EncodingKey::from_ec_pem(pem),
        }
        .unwrap();
        let jwk = key.jwk().unwrap();
        let header = serde_json::json!({"typ": "dpop+jwt", "alg": format!("{alg:?}"), "jwk": jwk});
        ProofSigner {
            alg,
            header: URL_SAFE_NO_PAD.encode(header.to_string()),
            jkt: jwk_thumbprint(jwk.as_object().unwrap()).unwrap(),
            encoding,
        }
    }

    fn proof(&self, token: &str) -> String {
        let ath = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let claims = serde_json::json!({
            "jti": authz_sidecar::tools::devkeys::random_id(),
            "htm": "GET",
            "htu": "https://api.test/orders",
            "iat": now(),
            "ath": URL_SAFE_NO_PAD.encode(ath.as_ref()),
        });
        let input = format!(
            "{}.{}",
            self.header,
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature =
            jsonwebtoken::crypto::sign(input.as_bytes(), &self.encoding, self.alg).unwrap();
        format!("{input}.{signature}")
    }
}

/// What DPoP adds to a Check over a cached token (whose own cost is `check/*/hit`): the proof's
/// checks and signature (`verify`, the same proof each time), and with the replay check in
/// process (`memory`) or in Redis (`redis`), a fresh proof each time (signed outside the
/// measurement).
fn dpop(c: &mut Criterion) {
    let rt = runtime();
    let fixture = Fixture::new(&[Algorithm::ES256]);
    let token = fixture.keys[0].sign(&valid_claims()).unwrap();
    let settings = DpopSettings {
        proof_max_age: Duration::from_secs(60),
        replay_cache_max_entries: 1_000_000,
        replay_key_prefix: "dpop-jti:".into(),
        trust_forwarded_proto: false,
    };
    let rules = ProofRules::new(&settings, &fixture.policy);
    let target = ProofTarget {
        method: "GET",
        scheme: "https",
        authority: "api.test",
        path: "/orders",
    };
    let redis = RedisServer::start();
    let redis_store = rt
        .block_on(RedisStore::connect(&redis_settings(&redis, 4, 0)))
        .unwrap();
    let backends = [
        ("memory", None),
        ("redis", Some(Arc::new(Backend::Redis(redis_store)))),
    ];
    let mut group = c.benchmark_group("dpop");
    for alg in [Algorithm::ES256, Algorithm::EdDSA] {
        let signer = ProofSigner::new(alg);
        let proof = signer.proof(&token);
        group.bench_function(format!("{alg:?}/verify"), |b| {
            b.iter(|| {
                verify_proof(Some(&proof), &target, &token, &signer.jkt, &rules, now()).unwrap()
            })
        });
        for (name, store) in &backends {
            let verifier = DpopVerifier::new(
                &settings,
                &fixture.policy,
                store.clone(),
                FailureMode::Closed,
            );
            group.bench_function(format!("{alg:?}/verify+replay/{name}"), |b| {
                b.to_async(&rt).iter_batched(
                    || signer.proof(&token),
                    |proof| {
                        let verifier = &verifier;
                        let (token, jkt, target) = (&token, &signer.jkt, &target);
                        async move {
                            let outcome = verifier
                                .check(Some(&proof), target, token, jkt, now())
                                .await;
                            assert!(matches!(outcome, ProofOutcome::Valid), "{outcome:?}");
                        }
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}

/// What a certificate-bound token (RFC 8705) adds to a Check: the client certificate's
/// thumbprint (percent-decoding Envoy's PEM, base64, SHA-256 of the DER) compared with `cnf`.
fn certificate_binding(c: &mut Criterion) {
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = rcgen::CertificateParams::new(vec!["client.bench".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem();
    let forwarded: String = pem
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    let thumbprint = authz_sidecar::binding::certificate_thumbprint(&forwarded).unwrap();
    let mut claims = valid_claims();
    claims["cnf"] = serde_json::json!({ "x5t#S256": thumbprint });
    let claims =
        authz_sidecar::claims::Claims::from_object(claims.as_object().unwrap().clone()).unwrap();
    c.bench_function("binding/certificate", |b| {
        b.iter(|| {
            authz_sidecar::binding::check(
                &claims,
                &forwarded,
                authz_sidecar::binding::Scheme::Bearer,
                false,
            )
            .unwrap()
        })
    });
}

fn config() -> Criterion {
    // Short runs: 2 shared cores drift over minutes more than longer sampling would gain.
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = micro;
    config = config();
    targets = verify, cache_hit, checks, policy, dpop, certificate_binding
}
criterion_main!(micro);
