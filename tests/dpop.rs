//! DPoP (RFC 9449) through the real gRPC path, with the issuer's keys from a real JWKS HTTP
//! server and real redis-servers for the shared replay check: a DPoP-bound token (`cnf.jkt`)
//! passes only with `Authorization: DPoP` and a fresh proof for this request, by its key.
//! Proofs are built here by hand (header, claims, signature), so each can break one rule.

mod common;

use authz_sidecar::pb::envoy::service::auth::v3::CheckResponse;
use authz_sidecar::tools::devkeys::SigningKey;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::dpop::{ProofKey, b64_json};
use common::redis::RedisServer;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use proptest::prelude::*;
use serde_json::{Value, json};

const UNAUTHENTICATED: i32 = 16;
const UNAVAILABLE: i32 = 14;
struct Setup {
    issuer: SigningKey,
    sidecar: Sidecar,
    _jwks: JwksServer,
}

/// One request: its `authorization` value, `DPoP` headers, method, path and scheme.
struct Call<'a> {
    authorization: String,
    proofs: Vec<&'a str>,
    method: &'a str,
    path: &'a str,
    scheme: &'a str,
    forwarded_proto: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn dpop(token: &str, proof: &'a str) -> Call<'a> {
        Call {
            authorization: format!("DPoP {token}"),
            proofs: vec![proof],
            method: "GET",
            path: "/orders",
            scheme: "https",
            forwarded_proto: None,
        }
    }
}

impl Setup {
    async fn start(extra: &[&str]) -> Setup {
        let issuer = key(Algorithm::ES256, "issuer");
        let jwks = JwksServer::start(&[&issuer]).await;
        Self::start_with(issuer, jwks, extra).await
    }

    async fn start_with(issuer: SigningKey, jwks: JwksServer, extra: &[&str]) -> Setup {
        let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], extra)).await;
        Setup {
            issuer,
            sidecar,
            _jwks: jwks,
        }
    }

    /// An access token bound to `key` (`cnf.jkt`).
    fn bound_token(&self, key: &ProofKey) -> String {
        let mut claims = valid_claims();
        claims["cnf"] = json!({"jkt": key.thumbprint()});
        self.issuer.sign(&claims).unwrap()
    }

    async fn call(&self, call: Call<'_>) -> CheckResponse {
        call_on(&self.sidecar, call).await
    }

    /// `DPoP <token>` with this one proof, for `GET https://api.test/orders`.
    async fn dpop(&self, token: &str, proof: &str) -> CheckResponse {
        self.call(Call::dpop(token, proof)).await
    }

    async fn count(&self, series: &str) -> f64 {
        metric_value(&self.sidecar.http_get("/metrics").await.1, series)
    }
}

async fn call_on(sidecar: &Sidecar, call: Call<'_>) -> CheckResponse {
    let joined = call.proofs.join(",");
    let mut headers = vec![("authorization", call.authorization.as_str())];
    if !call.proofs.is_empty() {
        headers.push(("dpop", &joined));
    }
    if let Some(proto) = call.forwarded_proto {
        headers.push(("x-forwarded-proto", proto));
    }
    let mut request = check_request(&headers);
    let http = request
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap();
    http.method = call.method.into();
    http.path = call.path.into();
    http.scheme = call.scheme.into();
    sidecar.client().check(request).await.unwrap().into_inner()
}

fn allowed(response: &CheckResponse) -> bool {
    response.status.as_ref().is_none_or(|s| s.code == 0)
}

/// A 401 with this reason and the DPoP challenge naming `algs`, else the test fails.
fn expect_dpop_401(response: &CheckResponse, reason: &str, algs: &str) {
    let (denied, code, got) = expect_deny(response);
    assert_eq!((code, got), (UNAUTHENTICATED, reason), "{response:?}");
    assert_eq!(denied.status.as_ref().unwrap().code, 401);
    assert_eq!(
        header(&denied.headers, "www-authenticate"),
        Some(
            format!(
                "DPoP error=\"invalid_dpop_proof\", error_description=\"{reason}\", algs=\"{algs}\""
            )
            .as_str()
        )
    );
}

/// The `algs` of the default JWT_ALGORITHMS.
const ALL_ALGS: &str = "RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA";

fn invalid(response: &CheckResponse) {
    expect_dpop_401(response, "invalid_dpop_proof", ALL_ALGS);
}

#[tokio::test]
async fn a_valid_proof_passes_on_a_fresh_token_and_on_a_cached_one() {
    let setup = Setup::start(&[]).await;
    for alg in [Algorithm::ES256, Algorithm::EdDSA] {
        let client = ProofKey::new(alg);
        let token = setup.bound_token(&client);
        let first = client.proof(&token, |_| {});
        assert!(allowed(&setup.dpop(&token, &first).await), "{alg:?}");
        // A cache hit: the proof is still checked against this request.
        let second = client.proof(&token, |_| {});
        assert!(allowed(&setup.dpop(&token, &second).await), "{alg:?}");
        let other = client.proof(&token, |c| c["htm"] = json!("POST"));
        invalid(&setup.dpop(&token, &other).await);
    }
    let hits = "ext_authz_token_cache_requests_total{result=\"hit\"} ";
    assert_eq!(setup.count(hits).await, 4.0);
    let verified = "ext_authz_requests_total{result=\"allow\",reason=\"verified\"} ";
    assert_eq!(setup.count(verified).await, 4.0);
}

#[tokio::test]
async fn a_proof_for_another_method_or_uri_is_refused_and_query_and_fragment_are_ignored() {
    let setup = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let token = setup.bound_token(&client);
    for htu in [
        "https://api.test/other",
        "https://api.test/orders/",
        "http://api.test/orders",
        "https://api.test:8443/orders",
        "https://evil.test/orders",
    ] {
        let proof = client.proof(&token, |c| c["htu"] = json!(htu));
        invalid(&setup.dpop(&token, &proof).await);
    }
    let post = client.proof(&token, |c| c["htm"] = json!("POST"));
    invalid(&setup.dpop(&token, &post).await);
    let lower = client.proof(&token, |c| c["htm"] = json!("get"));
    invalid(&setup.dpop(&token, &lower).await);
    // The same URI written differently, and query and fragment on either side.
    for htu in [
        "HTTPS://API.test:443/orders",
        "https://api.test/orders?page=2",
        "https://api.test/orders#top",
    ] {
        let proof = client.proof(&token, |c| c["htu"] = json!(htu));
        assert!(allowed(&setup.dpop(&token, &proof).await), "{htu}");
    }
    let proof = client.proof(&token, |_| {});
    let with_query = Call {
        path: "/orders?page=3&sort=asc",
        ..Call::dpop(&token, &proof)
    };
    assert!(allowed(&setup.call(with_query).await));
    let proof = client.proof(&token, |_| {});
    let plain_http = Call {
        scheme: "http",
        ..Call::dpop(&token, &proof)
    };
    invalid(&setup.call(plain_http).await);
}

#[tokio::test]
async fn the_scheme_comes_from_x_forwarded_proto_only_when_trusted() {
    let issuer = key(Algorithm::ES256, "issuer");
    let jwks = JwksServer::start(&[&issuer]).await;
    let trusting = Setup::start_with(issuer, jwks, &["--dpop-trust-forwarded-proto", "true"]).await;
    let untrusting = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    for (setup, passes) in [(&trusting, true), (&untrusting, false)] {
        let token = setup.bound_token(&client);
        let proof = client.proof(&token, |_| {});
        // Envoy behind a TLS terminator: a plaintext listener, the client's https forwarded.
        let behind_terminator = Call {
            scheme: "http",
            forwarded_proto: Some("https"),
            ..Call::dpop(&token, &proof)
        };
        let response = setup.call(behind_terminator).await;
        assert_eq!(allowed(&response), passes, "{response:?}");
    }
}

#[tokio::test]
async fn stale_and_future_proofs_are_refused() {
    let setup = Setup::start(&["--dpop-proof-max-age", "30s", "--jwt-leeway-seconds", "5"]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let token = setup.bound_token(&client);
    for iat in [now() - 40, now() + 20, 0] {
        let proof = client.proof(&token, |c| c["iat"] = json!(iat));
        invalid(&setup.dpop(&token, &proof).await);
    }
    let no_iat = client.proof(&token, |c| {
        c.as_object_mut().unwrap().remove("iat");
    });
    invalid(&setup.dpop(&token, &no_iat).await);
    // Inside the window, and ahead by less than the leeway.
    for iat in [now() - 20, now() + 3] {
        let proof = client.proof(&token, |c| c["iat"] = json!(iat));
        assert!(allowed(&setup.dpop(&token, &proof).await), "{iat}");
    }
}

#[tokio::test]
async fn a_proof_for_another_token_or_without_jti_is_refused() {
    let setup = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let token = setup.bound_token(&client);
    let other_token = setup.bound_token(&client);
    let wrong_ath = client.proof(&other_token, |_| {});
    invalid(&setup.dpop(&token, &wrong_ath).await);
    let no_ath = client.proof(&token, |c| {
        c.as_object_mut().unwrap().remove("ath");
    });
    invalid(&setup.dpop(&token, &no_ath).await);
    let no_jti = client.proof(&token, |c| {
        c.as_object_mut().unwrap().remove("jti");
    });
    invalid(&setup.dpop(&token, &no_jti).await);
    let long_jti = client.proof(&token, |c| c["jti"] = json!("j".repeat(257)));
    invalid(&setup.dpop(&token, &long_jti).await);
    // The very same token with a proof of its own passes.
    let right = client.proof(&token, |_| {});
    assert!(allowed(&setup.dpop(&token, &right).await));
}

#[tokio::test]
async fn a_replayed_proof_is_refused() {
    let setup = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let token = setup.bound_token(&client);
    let proof = client.proof(&token, |_| {});
    assert!(allowed(&setup.dpop(&token, &proof).await));
    for _ in 0..2 {
        expect_dpop_401(&setup.dpop(&token, &proof).await, "dpop_replay", ALL_ALGS);
    }
    // Same jti, another key's proof: the identifiers are per key.
    let other = ProofKey::new(Algorithm::ES256);
    let other_token = setup.bound_token(&other);
    let jti = serde_json::from_slice::<Value>(
        &URL_SAFE_NO_PAD
            .decode(proof.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap()["jti"]
        .clone();
    let same_jti = other.proof(&other_token, |c| c["jti"] = jti);
    assert!(allowed(&setup.dpop(&other_token, &same_jti).await));
    let replays = "ext_authz_requests_total{result=\"deny\",reason=\"dpop_replay\"} ";
    assert_eq!(setup.count(replays).await, 2.0);
}

#[tokio::test]
async fn a_proof_by_another_key_or_with_a_bad_signature_is_refused() {
    let setup = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let thief = ProofKey::new(Algorithm::ES256);
    let token = setup.bound_token(&client);
    // The thief's own, valid, proof: its key is not the one the token is bound to.
    let theirs = thief.proof(&token, |_| {});
    invalid(&setup.dpop(&token, &theirs).await);
    // The bound key in the header, the thief's signature.
    let forged = thief.sign(&client.header(), &ProofKey::claims(&token));
    invalid(&setup.dpop(&token, &forged).await);
    // A proof altered after signing.
    let good = client.proof(&token, |_| {});
    let (input, signature) = good.rsplit_once('.').unwrap();
    let mut claims = ProofKey::claims(&token);
    claims["htm"] = json!("GET");
    let tampered = format!(
        "{}.{}.{signature}",
        input.split('.').next().unwrap(),
        b64_json(&claims)
    );
    invalid(&setup.dpop(&token, &tampered).await);
    let denied = "ext_authz_requests_total{result=\"deny\",reason=\"invalid_dpop_proof\"} ";
    assert_eq!(setup.count(denied).await, 3.0);
}

#[tokio::test]
async fn a_proof_carrying_private_key_material_or_a_bad_header_is_refused() {
    let setup = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let token = setup.bound_token(&client);
    let claims = || ProofKey::claims(&token);
    for member in ["d", "p", "q", "dp", "dq", "qi", "k"] {
        let mut header = client.header();
        header["jwk"][member] = json!("AAAA");
        invalid(&setup.dpop(&token, &client.sign(&header, &claims())).await);
    }
    for typ in [json!("JWT"), json!("at+jwt"), Value::Null] {
        let mut header = client.header();
        header["typ"] = typ;
        invalid(&setup.dpop(&token, &client.sign(&header, &claims())).await);
    }
    let mut header = client.header();
    header.as_object_mut().unwrap().remove("jwk");
    invalid(&setup.dpop(&token, &client.sign(&header, &claims())).await);
    // `alg` and the key's type disagree.
    let mut header = client.header();
    header["alg"] = json!("ES384");
    invalid(&setup.dpop(&token, &client.sign(&header, &claims())).await);
    // The header as built here is otherwise good.
    assert!(allowed(
        &setup
            .dpop(&token, &client.sign(&client.header(), &claims()))
            .await
    ));
}

#[tokio::test]
async fn hmac_and_none_proofs_are_refused() {
    let setup = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let token = setup.bound_token(&client);
    let claims = ProofKey::claims(&token);
    // HS256 keyed with the public key's `x` (the classic confusion), and `none`.
    let mut header = client.header();
    header["alg"] = json!("HS256");
    let input = format!("{}.{}", b64_json(&header), b64_json(&claims));
    let hmac = EncodingKey::from_secret(client.jwk["x"].as_str().unwrap().as_bytes());
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &hmac, Algorithm::HS256).unwrap();
    invalid(&setup.dpop(&token, &format!("{input}.{signature}")).await);
    header["alg"] = json!("none");
    let input = format!("{}.{}", b64_json(&header), b64_json(&claims));
    invalid(&setup.dpop(&token, &format!("{input}.")).await);
    // An asymmetric algorithm outside JWT_ALGORITHMS, and the challenge names only those.
    let issuer = key(Algorithm::ES256, "issuer");
    let jwks = JwksServer::start(&[&issuer]).await;
    let narrow = Setup::start_with(issuer, jwks, &["--jwt-algorithms", "ES256,PS256"]).await;
    let eddsa = ProofKey::new(Algorithm::EdDSA);
    let token = narrow.bound_token(&eddsa);
    let proof = eddsa.proof(&token, |_| {});
    expect_dpop_401(
        &narrow.dpop(&token, &proof).await,
        "invalid_dpop_proof",
        "ES256 PS256",
    );
}

#[tokio::test]
async fn a_missing_or_repeated_dpop_header_is_refused() {
    let setup = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let token = setup.bound_token(&client);
    let no_proof = Call {
        proofs: vec![],
        ..Call::dpop(&token, "")
    };
    invalid(&setup.call(no_proof).await);
    let (one, two) = (client.proof(&token, |_| {}), client.proof(&token, |_| {}));
    // Envoy joins repeated headers with ',': two proofs, both valid on their own.
    let repeated = Call {
        proofs: vec![&one, &two],
        ..Call::dpop(&token, "")
    };
    invalid(&setup.call(repeated).await);
    invalid(&setup.dpop(&token, "not.a.proof").await);
    invalid(&setup.dpop(&token, &"a".repeat(9000)).await);
    // Neither was used up by the refusal.
    assert!(allowed(&setup.dpop(&token, &one).await));
}

#[tokio::test]
async fn the_scheme_must_match_the_binding() {
    let setup = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let token = setup.bound_token(&client);
    // A DPoP-bound token as a bearer token, with or without a proof.
    let proof = client.proof(&token, |_| {});
    let as_bearer = Call {
        authorization: format!("Bearer {token}"),
        ..Call::dpop(&token, &proof)
    };
    invalid(&setup.call(as_bearer).await);
    assert!(!allowed(&setup.sidecar.check(&token).await));
    // An unbound token with the DPoP scheme and a proof by some key.
    let unbound = setup.issuer.sign(&valid_claims()).unwrap();
    let proof = client.proof(&unbound, |_| {});
    invalid(&setup.dpop(&unbound, &proof).await);
    // It passes as the bearer token it is.
    assert!(setup.sidecar.allows(&unbound).await);
    // A token bound to a certificate, with the DPoP scheme: refused too.
    let mut claims = valid_claims();
    claims["cnf"] = json!({"x5t#S256": "abc"});
    let certificate_bound = setup.issuer.sign(&claims).unwrap();
    let proof = client.proof(&certificate_bound, |_| {});
    invalid(&setup.dpop(&certificate_bound, &proof).await);
}

/// Two replicas sharing one Redis: a proof used on A is a replay on B.
#[tokio::test]
async fn a_proof_replayed_to_another_replica_is_refused_through_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let shared = ["--revocation-backend", "redis", "--redis-url", &url];
    let issuer = key(Algorithm::ES256, "issuer");
    let jwks = JwksServer::start(&[&issuer]).await;
    let a = Setup::start_with(issuer, jwks, &shared).await;
    let b = start_sidecar(config(&["--jwks-url", &a._jwks.jwks_url()], &shared)).await;
    let client = ProofKey::new(Algorithm::EdDSA);
    let token = a.bound_token(&client);
    let proof = client.proof(&token, |_| {});
    assert!(allowed(&a.dpop(&token, &proof).await));
    expect_dpop_401(
        &call_on(&b, Call::dpop(&token, &proof)).await,
        "dpop_replay",
        ALL_ALGS,
    );
    let fresh = client.proof(&token, |_| {});
    assert!(allowed(&call_on(&b, Call::dpop(&token, &fresh)).await));
    let keys = redis.cli(&["KEYS", "dpop-jti:*"]);
    assert_eq!(keys.lines().count(), 2, "{keys}");
    let ttl: i64 = redis
        .cli(&["TTL", keys.lines().next().unwrap()])
        .parse()
        .unwrap();
    // DPOP_PROOF_MAX_AGE (60 s) plus the leeway (60 s).
    assert!((100..=120).contains(&ttl), "{ttl}");
}

/// Redis down. The token has no `jti`, `sub` or `sid`, so its revocation lookup needs no Redis
/// read: what fails here is the DPoP replay claim alone.
#[tokio::test]
async fn with_redis_down_closed_answers_503_and_open_checks_replays_locally() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let client = ProofKey::new(Algorithm::ES256);
    let issuer = key(Algorithm::ES256, "issuer");
    let jwks = JwksServer::start(&[&issuer]).await;
    let flags = |mode: &'static str| -> Vec<String> {
        [
            "--revocation-backend",
            "redis",
            "--redis-url",
            &url,
            "--revocation-failure-mode",
            mode,
            "--jwt-require-jti",
            "false",
        ]
        .map(String::from)
        .to_vec()
    };
    let closed_flags = flags("closed");
    let closed_args: Vec<&str> = closed_flags.iter().map(String::as_str).collect();
    let closed = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &closed_args)).await;
    let open_flags = flags("open");
    let open_args: Vec<&str> = open_flags.iter().map(String::as_str).collect();
    let open = Setup::start_with(issuer, jwks, &open_args).await;
    let mut claims = valid_claims();
    let object = claims.as_object_mut().unwrap();
    object.remove("jti");
    object.remove("sub");
    object.insert("cnf".into(), json!({"jkt": client.thumbprint()}));
    let token = open.issuer.sign(&claims).unwrap();
    let proof = client.proof(&token, |_| {});
    assert!(allowed(&call_on(&closed, Call::dpop(&token, &proof)).await));
    redis.kill();

    let proof = client.proof(&token, |_| {});
    let response = call_on(&closed, Call::dpop(&token, &proof)).await;
    let (denied, code, reason) = expect_deny(&response);
    assert_eq!(
        (code, reason, denied.status.as_ref().unwrap().code),
        (UNAVAILABLE, "revocation_unavailable", 503)
    );

    let errors = |scrape: &str| -> f64 {
        scrape
            .lines()
            .filter(|l| l.starts_with("ext_authz_revocation_errors_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let proof = client.proof(&token, |_| {});
    let response = open.dpop(&token, &proof).await;
    assert!(allowed(&response), "{response:?}");
    assert_eq!(errors(&open.sidecar.http_get("/metrics").await.1), 1.0);
    let fail_open = "ext_authz_requests_total{result=\"allow\",reason=\"revocation_fail_open\"} ";
    assert_eq!(open.count(fail_open).await, 1.0);
    // Redis cannot tell; this replica still remembers.
    expect_dpop_401(&open.dpop(&token, &proof).await, "dpop_replay", ALL_ALGS);
}

/// One proof for the property below: a valid one for `GET https://api.test/orders`.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    setup: Setup,
    token: String,
    valid: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let client = ProofKey::new(Algorithm::ES256);
        let (setup, token) = runtime.block_on(async {
            // A long proof age: the shrinker may replay a case minutes later.
            let setup = Setup::start(&["--dpop-proof-max-age", "10m"]).await;
            let token = setup.bound_token(&client);
            (setup, token)
        });
        let valid = client.proof(&token, |_| {});
        Fixture {
            runtime,
            setup,
            token,
            valid,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// A mutated proof (a byte flipped, cut short, parts swapped, or junk) is a 401
    /// `invalid_dpop_proof` or `dpop_replay`, never an allow, another answer or a panic.
    #[test]
    fn mutated_proofs_are_only_ever_refused(
        position in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
        junk in "[ -~]{0,300}",
        kind in 0..4u8,
    ) {
        let f = fixture();
        let valid = &f.valid;
        let mutated = match kind {
            0 => {
                let mut bytes = valid.clone().into_bytes();
                let at = position.index(bytes.len());
                if bytes[at] == byte { bytes[at] = byte.wrapping_add(1) } else { bytes[at] = byte }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            1 => valid[..cut.index(valid.len())].to_owned(),
            2 => {
                let parts: Vec<&str> = valid.split('.').collect();
                format!("{}.{}.{}", parts[1], parts[0], parts[2])
            }
            _ => junk,
        };
        prop_assume!(mutated != *valid);
        let response = f.runtime.block_on(f.setup.dpop(&f.token, &mutated));
        let status = response.status.as_ref().expect("a status");
        prop_assert_eq!(status.code, UNAUTHENTICATED, "{:?}", response);
        prop_assert!(
            status.message == "invalid_dpop_proof" || status.message == "dpop_replay",
            "{}", status.message
        );
    }
}

/// The property's fixture is a valid proof: its mutations are refused for the mutation.
#[test]
fn the_fixture_proof_itself_is_allowed() {
    let f = fixture();
    assert!(allowed(
        &f.runtime.block_on(f.setup.dpop(&f.token, &f.valid))
    ));
}

#[tokio::test]
async fn any_denial_of_a_dpop_request_is_challenged_in_the_dpop_scheme() {
    let setup = Setup::start(&[]).await;
    let client = ProofKey::new(Algorithm::ES256);
    let mut claims = valid_claims();
    claims["cnf"] = json!({"jkt": client.thumbprint()});
    claims["exp"] = json!(now() - 3600);
    let expired = setup.issuer.sign(&claims).unwrap();
    let response = setup.dpop(&expired, &client.proof(&expired, |_| {})).await;
    let (denied, code, reason) = expect_deny(&response);
    assert_eq!((code, reason), (UNAUTHENTICATED, "expired"));
    assert_eq!(
        header(&denied.headers, "www-authenticate"),
        Some(
            format!(
                "DPoP error=\"invalid_token\", error_description=\"expired\", algs=\"{ALL_ALGS}\""
            )
            .as_str()
        )
    );
    // The same token as a bearer token keeps the Bearer challenge.
    let bearer = format!("Bearer {expired}");
    let response = call_on(
        &setup.sidecar,
        Call {
            authorization: bearer,
            proofs: vec![],
            ..Call::dpop(&expired, "")
        },
    )
    .await;
    let (denied, _, _) = expect_deny(&response);
    assert_eq!(
        header(&denied.headers, "www-authenticate"),
        Some("Bearer error=\"invalid_token\", error_description=\"expired\"")
    );
}
