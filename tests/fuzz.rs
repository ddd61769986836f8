//! Property-based fuzzing of every parser that reads untrusted or operator-written bytes, with
//! proptest on the stable toolchain (cargo-fuzz would need nightly's sanitizer flags): token
//! parsing and verification, CheckRequests through a real sidecar, JWKS documents, and the
//! config file. Each property must hold for any input: no panic, no allow that is not earned.
//!
//! `make test` runs proptest's default 256 cases per property; `make fuzz` runs many more
//! (PROPTEST_CASES). A failing case is written under proptest-regressions/ and replayed first
//! from then on: commit it with the fix.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use authz_sidecar::authorizer::{Authorizer, Issuer};
use authz_sidecar::cli::Cli;
use authz_sidecar::config::Config;
use authz_sidecar::decision::Decision;
use authz_sidecar::jwks::KeySet;
use authz_sidecar::jwt;
use authz_sidecar::metrics::Metrics;
use authz_sidecar::pb::envoy::service::auth::v3::CheckRequest;
use authz_sidecar::revocation::{FailureMode, MemoryStore};
use authz_sidecar::route::RouteRequirements;
use clap::Parser;
use common::*;
use jsonwebtoken::Algorithm;
use proptest::prelude::*;
use prost::Message;
use tokio::runtime::Runtime;

/// One runtime, one key, one in-process authorizer over a JWKS file, shared by every case.
struct World {
    runtime: Runtime,
    authorizer: Authorizer<MemoryStore>,
    token: String,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let key = key(Algorithm::ES256, "fuzz-1");
        let dir = std::env::temp_dir().join(format!("authz-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks_path = dir.join("jwks.json");
        let document = authz_sidecar::tools::devkeys::jwks(&[&key]).unwrap();
        std::fs::write(&jwks_path, document.to_string()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let issuer = Issuer {
            keys: file_issuer_keys(ISSUER, jwks_path),
            audiences: vec![AUDIENCE.into()],
        };
        let authorizer = Authorizer::new(
            HashMap::from([(ISSUER.to_owned(), issuer)]),
            jwt_policy(),
            MemoryStore::open(None).unwrap(),
            FailureMode::Closed,
            Arc::new(Metrics::new(&[ISSUER.to_owned()])),
            None,
        );
        let token = key.sign(&valid_claims()).unwrap();
        let world = World {
            runtime,
            authorizer,
            token,
        };
        assert!(
            world.allows(&world.token),
            "the unmodified token is allowed"
        );
        world
    })
}

impl World {
    fn allows(&self, token: &str) -> bool {
        let route = RouteRequirements::default();
        let decision = self
            .runtime
            .block_on(self.authorizer.decide(Some(token), &route, now()));
        matches!(decision, Ok(Decision::Allow(..)))
    }
}

/// One edit of a token: flip a byte, cut it, insert a character, or swap two segments.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, char),
    Truncate(usize),
    Insert(usize, char),
    SwapSegments(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let any_char = prop_oneof![
        proptest::char::range('A', 'z'),
        Just('.'),
        Just('='),
        Just(' '),
        any::<char>()
    ];
    prop_oneof![
        (any::<usize>(), any_char.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any_char).prop_map(|(i, c)| Edit::Insert(i, c)),
        (0..3usize, 0..3usize).prop_map(|(a, b)| Edit::SwapSegments(a, b)),
    ]
}

/// One of these exact strings.
fn known(values: &'static [&'static str]) -> BoxedStrategy<String> {
    proptest::sample::select(values)
        .prop_map(str::to_owned)
        .boxed()
}

fn apply(token: &str, edit: &Edit) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    match *edit {
        Edit::Insert(i, c) => chars.insert(i % (chars.len() + 1), c),
        _ if chars.is_empty() => {}
        Edit::Replace(i, c) => {
            let i = i % chars.len();
            chars[i] = c;
        }
        Edit::Truncate(i) => chars.truncate(i % chars.len()),
        Edit::SwapSegments(a, b) => {
            let mut parts: Vec<&str> = token.split('.').collect();
            if a < parts.len() && b < parts.len() {
                parts.swap(a, b);
            }
            return parts.join(".");
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #[test]
    fn any_text_parses_or_is_denied_without_panicking(text in ".{0,600}") {
        let _ = jwt::parse(&text, &jwt_policy());
    }

    #[test]
    fn any_three_segments_of_base64_are_denied(
        header in "[A-Za-z0-9_-]{0,200}",
        payload in "[A-Za-z0-9_-]{0,400}",
        signature in "[A-Za-z0-9_-]{0,400}",
    ) {
        let token = format!("{header}.{payload}.{signature}");
        prop_assert!(!world().allows(&token));
    }

    #[test]
    fn no_edit_of_a_valid_token_is_allowed(edits in proptest::collection::vec(edit(), 1..4)) {
        let world = world();
        let mut token = world.token.clone();
        for edit in &edits {
            token = apply(&token, edit);
        }
        prop_assume!(token != world.token);
        prop_assert!(!world.allows(&token), "edited token allowed: {token}");
    }

    #[test]
    fn any_jwks_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = KeySet::parse(&bytes);
    }

    #[test]
    fn jwks_shaped_documents_never_yield_a_symmetric_or_weak_key(
        keys in proptest::collection::vec(
            (
                prop_oneof![known(&["RSA", "EC", "OKP", "oct"]), ".{0,5}".boxed()],
                prop_oneof![known(&["RS256", "ES256", "HS256", "none"]), ".{0,6}".boxed()],
                "[A-Za-z0-9_-]{0,90}",
                prop_oneof![known(&["AQAB"]), "[A-Za-z0-9_-]{0,8}".boxed()],
                prop_oneof![known(&["P-256", "Ed25519"]), ".{0,6}".boxed()],
            ),
            0..6,
        )
    ) {
        let keys: Vec<serde_json::Value> = keys
            .into_iter()
            .map(|(kty, alg, n, e, crv)| serde_json::json!({
                "kty": kty, "alg": alg, "kid": "k", "n": n, "e": e, "k": n,
                "crv": crv, "x": n, "y": n,
            }))
            .collect();
        let document = serde_json::to_vec(&serde_json::json!({"keys": keys})).unwrap();
        // None of these is a usable key: RSA moduli of at most 67 bytes are too weak, an `oct`
        // key never is, and the coordinates are never a P-256 point. Only an OKP key whose
        // random `x` is 32 bytes may be a real Ed25519 key, and then it must verify nothing.
        if let Ok(set) = KeySet::parse(&document) {
            let key = set.find(Some("k"), Algorithm::EdDSA);
            let only_eddsa = key.is_some_and(|key| {
                key.accepts(Algorithm::EdDSA)
                    && [Algorithm::RS256, Algorithm::ES256, Algorithm::PS256]
                        .iter()
                        .all(|alg| !key.accepts(*alg))
            });
            prop_assert!(only_eddsa, "a key that is not Ed25519 loaded from {document:?}");
        }
    }

    #[test]
    fn any_config_file_is_read_or_refused(text in "(.|\n){0,400}", toml in any::<bool>()) {
        let dir = std::env::temp_dir().join(format!("authz-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(if toml { "c.toml" } else { "c.yaml" });
        std::fs::write(&path, &text).unwrap();
        let cli = Cli::try_parse_from(["authz-sidecar", "--config", path.to_str().unwrap()]).unwrap();
        let _ = Config::from_settings(&cli.settings);
    }

    #[test]
    fn rate_limit_sections_are_read_or_refused(
        names in proptest::collection::vec("[a-z-]{0,8}", 0..4),
        keys in proptest::collection::vec(prop_oneof![
            Just("subject".to_owned()), Just("client_ip".to_owned()), Just("global".to_owned()),
            "claim:[a-z]{0,5}", ".{0,8}"
        ], 0..4),
        rates in proptest::collection::vec(0u64..5_000_000, 0..4),
        pers in proptest::collection::vec(prop_oneof![Just("1s".to_owned()), Just("1m".to_owned()), "[0-9]{0,4}(ms|s|m|h|d)?"], 0..4),
    ) {
        let mut yaml = String::from("policies:\n");
        for (((name, key), rate), per) in names.iter().zip(&keys).zip(&rates).zip(&pers) {
            yaml.push_str(&format!("  '{name}': {{key: '{key}', rate: {rate}, per: '{per}'}}\n"));
        }
        let parsed = serde_yaml_ng::from_str::<authz_sidecar::rate_limit::RateLimitSection>(&yaml);
        if let Ok(config) = parsed.map_err(|_| ()).and_then(|s| s.validate().map_err(|_| ())) {
            for policy in &config.policies {
                prop_assert!(policy.interval() >= Duration::from_micros(1));
                prop_assert!(policy.burst >= 1 && policy.rate >= 1);
            }
        }
    }
}

/// Arbitrary bytes decoded as a CheckRequest, and structured requests with random headers and
/// context_extensions, through a real sidecar over gRPC: every one gets a definite answer, and
/// none without the valid token is allowed.
#[test]
fn check_requests_of_any_shape_get_an_answer_and_no_free_pass() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = key(Algorithm::ES256, "fuzz-1");
    let (sidecar, _jwks) = runtime.block_on(async {
        let jwks = JwksServer::start(&[&key]).await;
        let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
        (sidecar, jwks)
    });
    let mut runner = proptest::test_runner::TestRunner::default();
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::hash_map(
            prop_oneof![
                Just("authorization".to_owned()),
                Just("cookie".to_owned()),
                "[a-z-]{1,12}"
            ],
            ".{0,80}",
            0..5,
        ),
        proptest::collection::hash_map(
            prop_oneof![
                Just("required_scopes".to_owned()),
                Just("audiences".to_owned()),
                Just("allow_anonymous".to_owned()),
                Just("rate_limit".to_owned()),
                "[a-z_]{1,10}"
            ],
            ".{0,20}",
            0..4,
        ),
    );
    runner
        .run(&strategy, |(bytes, headers, extensions)| {
            let decoded = CheckRequest::decode(bytes.as_slice()).unwrap_or_default();
            let mut structured = check_request(&[]);
            if let Some(attributes) = structured.attributes.as_mut() {
                attributes.context_extensions = extensions;
                if let Some(http) = attributes.request.as_mut().and_then(|r| r.http.as_mut()) {
                    http.headers = headers;
                }
            }
            for request in [decoded, structured] {
                // No request here carries a valid token: an allow must be an anonymous route's.
                let anonymous_route = request
                    .attributes
                    .as_ref()
                    .and_then(|a| a.context_extensions.get("allow_anonymous"))
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
                let mut client = sidecar.client();
                let response = runtime
                    .block_on(client.check(request))
                    .map_err(|status| TestCaseError::fail(format!("RPC error {status:?}")))?
                    .into_inner();
                let status = response
                    .status
                    .ok_or_else(|| TestCaseError::fail("no status"))?;
                prop_assert!(
                    status.code != 0 || anonymous_route,
                    "allowed without a token on a route that requires one"
                );
            }
            Ok(())
        })
        .unwrap();
    runtime.block_on(sidecar.shutdown());
}
