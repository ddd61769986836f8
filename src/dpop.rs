//! DPoP (RFC 9449), the resource server's side: a token bound to a key (`cnf.jkt`) passes only
//! with `Authorization: DPoP <token>` and a `DPoP` proof, a JWT signed by that key for this very
//! request, never seen before.
//!
//! What a proof must be, cheapest check first (each failure is `invalid_dpop_proof`):
//! - one `DPoP` header (Envoy joins repeated headers with `,`, which a compact JWS never holds)
//!   of at most [`MAX_PROOF_BYTES`], a compact JWS;
//! - header: `typ` `dpop+jwt`; `alg` on the JWT_ALGORITHMS allowlist (never `none` or HMAC);
//!   `jwk` a public key (no private members) that [`VerifyingKey::from_jwk`] accepts for `alg`;
//! - claims: `jti` (1 to [`MAX_JTI_BYTES`] bytes), `htm` the request's method, `htu` the
//!   request's URI without query and fragment (scheme and host compared case-insensitively,
//!   default ports dropped), `iat` no older than DPOP_PROOF_MAX_AGE and no further ahead than
//!   JWT_LEEWAY_SECONDS, `ath` the base64url SHA-256 of the access token;
//! - the RFC 7638 thumbprint of `jwk` equals the token's `cnf.jkt`;
//! - the signature verifies with `jwk` (the only new public-key operation per Check);
//! - then `jti` (scoped to the key) was not seen within the window: `dpop_replay` if it was.
//!
//! The replay window is DPOP_PROOF_MAX_AGE plus the leeway: no proof older than that passes the
//! `iat` check, so no `jti` need be remembered longer. With the Redis backend the check is
//! shared by every replica (one `SET NX EX`), under REVOCATION_FAILURE_MODE: closed, a Redis
//! that cannot be asked is a 503; open, the local check alone decides and the Check is
//! counted as `revocation_fail_open`.
//!
//! Server nonces (`DPoP-Nonce`, `use_dpop_nonce`) are not supported: a proof with a `nonce`
//! claim is accepted without checking it, and no nonce is ever asked for.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use crate::decision::Denial;
use crate::jwt::{self, JwtPolicy};
use crate::keys::VerifyingKey;
use crate::redis::StoreError;
use crate::replay::{Claimed, ReplayGuard};
use crate::revocation::{Backend, FailureMode};

/// Longest `DPoP` header read, in bytes: room for an RSA-8192 key and signature; a longer one
/// is refused before any decoding.
pub const MAX_PROOF_BYTES: usize = 8192;

/// Longest `jti` accepted, in bytes (RFC 9449 asks for 96 bits of randomness, ~16-43 chars).
pub const MAX_JTI_BYTES: usize = 256;

/// The `typ` a proof carries (RFC 9449 4.2).
const PROOF_TYPE: &str = "dpop+jwt";

/// JWK members that belong to a private or symmetric key (RFC 7518 6.2.2, 6.3.2, 6.4; RFC 8037
/// 2): a proof carrying one leaks its key, and is refused.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// The DPoP settings (the `DPOP_*` settings), built by `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpopSettings {
    /// Oldest proof accepted, by its `iat`.
    pub proof_max_age: Duration,
    /// Proof `jti`s remembered in process for the replay check.
    pub replay_cache_max_entries: u64,
    /// Redis backend: prefix of the shared replay keys.
    pub replay_key_prefix: String,
    /// Whether the request's scheme is read from `x-forwarded-proto` (set by a TLS terminator
    /// in front of Envoy) rather than from the connection Envoy received.
    pub trust_forwarded_proto: bool,
}

/// The request a proof must have been made for, as Envoy received it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProofTarget<'r> {
    pub method: &'r str,
    /// `http` or `https` (any case).
    pub scheme: &'r str,
    /// `:authority`, with a port when the client sent one.
    pub authority: &'r str,
    /// `:path`, with the query if any.
    pub path: &'r str,
}

/// Why a proof was refused: for the debug log and the unit tests; the client sees only
/// `invalid_dpop_proof`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// The rules a proof is checked against.
#[derive(Debug, Clone)]
pub struct ProofRules {
    /// JWT_ALGORITHMS, [`MAX_PROOF_BYTES`]; `typ` is checked here, not by the JWT parser.
    policy: JwtPolicy,
    max_age: i64,
    leeway: i64,
}

impl ProofRules {
    pub fn new(settings: &DpopSettings, token_policy: &JwtPolicy) -> Self {
        ProofRules {
            policy: JwtPolicy {
                max_token_bytes: MAX_PROOF_BYTES,
                require_at_jwt: false,
                require_jti: false,
                ..token_policy.clone()
            },
            max_age: settings.proof_max_age.as_secs().min(i64::MAX as u64) as i64,
            leeway: token_policy.leeway_seconds.max(0),
        }
    }
}

/// A proof that passed every rule but the replay check.
#[derive(Debug, PartialEq, Eq)]
pub struct CheckedProof {
    pub jti: String,
}

/// Checks one request's `DPoP` header (`None`: absent) against the request, the access token
/// and the token's `cnf.jkt`. Pure: `now` is unix seconds.
pub fn verify_proof(
    header: Option<&str>,
    target: &ProofTarget<'_>,
    token: &str,
    jkt: &str,
    rules: &ProofRules,
    now: i64,
) -> Result<CheckedProof, Invalid> {
    let proof = header.ok_or(Invalid("no DPoP header"))?.trim();
    if proof.contains(',') {
        return Err(Invalid("more than one DPoP header"));
    }
    let jwt = jwt::parse(proof, &rules.policy).map_err(|denial| match denial {
        Denial::DisallowedAlgorithm => Invalid("alg is not an allowed asymmetric algorithm"),
        Denial::TokenTooLarge => Invalid("the proof is too large"),
        _ => Invalid("not a compact JWS"),
    })?;
    let typ = jwt.header.get("typ").and_then(Value::as_str);
    if !typ.is_some_and(|t| t.eq_ignore_ascii_case(PROOF_TYPE)) {
        return Err(Invalid("typ is not dpop+jwt"));
    }
    let Some(Value::Object(jwk)) = jwt.header.get("jwk") else {
        return Err(Invalid("no jwk in the header"));
    };
    if PRIVATE_MEMBERS.iter().any(|m| jwk.contains_key(*m)) {
        return Err(Invalid("jwk holds private key material"));
    }
    let claims = &jwt.claims;
    let jti = claims.jti.as_deref().unwrap_or_default();
    if jti.is_empty() || jti.len() > MAX_JTI_BYTES {
        return Err(Invalid("jti is missing or too long"));
    }
    if claims.all.get("htm").and_then(Value::as_str) != Some(target.method) {
        return Err(Invalid("htm is not the request's method"));
    }
    let htu = claims.all.get("htu").and_then(Value::as_str);
    let expected = normalized_uri(target.scheme, target.authority, target.path)
        .ok_or(Invalid("the request's URI is unknown (no scheme or host)"))?;
    if htu.and_then(normalized_htu) != Some(expected) {
        return Err(Invalid("htu is not the request's URI"));
    }
    let iat = claims.iat.ok_or(Invalid("iat is missing"))?;
    if iat > now.saturating_add(rules.leeway) {
        return Err(Invalid("iat is in the future"));
    }
    if iat < now.saturating_sub(rules.max_age) {
        return Err(Invalid("iat is older than DPOP_PROOF_MAX_AGE"));
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let ath = claims.all.get("ath").and_then(Value::as_str);
    if ath != Some(URL_SAFE_NO_PAD.encode(digest.as_ref()).as_str()) {
        return Err(Invalid("ath is not the access token's hash"));
    }
    if jwk_thumbprint(jwk).as_deref() != Some(jkt) {
        return Err(Invalid(
            "the proof's key is not the one the token is bound to",
        ));
    }
    let key = serde_json::from_value(Value::Object(jwk.clone()))
        .ok()
        .and_then(|jwk| VerifyingKey::from_jwk(&jwk).ok())
        .ok_or(Invalid("jwk is not a usable public key"))?;
    jwt::verify_signature(&jwt, &key).map_err(|_| Invalid("the signature does not verify"))?;
    Ok(CheckedProof {
        jti: jti.to_owned(),
    })
}

/// The RFC 7638 thumbprint: base64url SHA-256 of the key's required members (RFC 7638 3.2 for
/// EC and RSA, RFC 8037 2 for OKP), in lexicographic order, no whitespace. `None` for another
/// key type or a required member that is not a string.
pub fn jwk_thumbprint(jwk: &Map<String, Value>) -> Option<String> {
    let required: &[&str] = match jwk.get("kty")?.as_str()? {
        "EC" => &["crv", "kty", "x", "y"],
        "RSA" => &["e", "kty", "n"],
        "OKP" => &["crv", "kty", "x"],
        _ => return None,
    };
    let mut canonical = String::with_capacity(256);
    canonical.push('{');
    for (i, name) in required.iter().enumerate() {
        let value = jwk.get(*name)?.as_str()?;
        if i > 0 {
            canonical.push(',');
        }
        canonical.push('"');
        canonical.push_str(name);
        canonical.push_str("\":");
        // JSON string escaping; base64url and curve names never need any.
        canonical.push_str(&Value::from(value).to_string());
    }
    canonical.push('}');
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    Some(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

/// `htu` as the request's URI would read: see [`normalized_uri`].
fn normalized_htu(htu: &str) -> Option<String> {
    let (scheme, rest) = htu.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    normalized_uri(scheme, &rest[..end], &rest[end..])
}

/// `scheme://authority/path` with RFC 3986 6.2.2 and 6.2.3 normalisation: scheme and host in
/// lower case, the scheme's default port dropped, an empty path as `/`, percent-encodings in
/// upper case; query and fragment dropped (RFC 9449 4.3). Paths otherwise compare as sent
/// (no dot-segment removal). `None` for a scheme other than http(s) or an empty host.
fn normalized_uri(scheme: &str, authority: &str, path: &str) -> Option<String> {
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let mut authority = authority.to_ascii_lowercase();
    if authority.ends_with(default_port) {
        authority.truncate(authority.len() - default_port.len());
    } else if authority.ends_with(':') {
        authority.pop();
    }
    if authority.is_empty() {
        return None;
    }
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    let mut out = String::with_capacity(scheme.len() + 3 + authority.len() + path.len() + 1);
    out.push_str(&scheme);
    out.push_str("://");
    out.push_str(&authority);
    if path.is_empty() {
        out.push('/');
    }
    let mut hex_left = 0;
    for c in path.chars() {
        if c == '%' {
            hex_left = 2;
            out.push(c);
        } else if hex_left > 0 {
            hex_left -= 1;
            out.push(c.to_ascii_uppercase());
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// What a DPoP-bound request's proof came to.
#[derive(Debug)]
pub enum ProofOutcome {
    /// Valid and first seen (everywhere, with Redis).
    Valid,
    /// Valid and first seen here; Redis could not be asked and REVOCATION_FAILURE_MODE is open.
    ValidHereOnly(StoreError),
    /// `InvalidDpopProof` or `DpopReplay`.
    Refused(Denial),
    /// Redis could not be asked and REVOCATION_FAILURE_MODE is closed.
    Unavailable(StoreError),
}

/// Proof checks and the replay cache, shared by every Check.
pub struct DpopVerifier {
    rules: ProofRules,
    replay: ReplayGuard,
    /// The revocation backend: with Redis, replays are refused across replicas.
    store: Option<Arc<Backend>>,
    failure_mode: FailureMode,
    trust_forwarded_proto: bool,
    /// The challenge's `algs`: JWT_ALGORITHMS, space-separated.
    algs: String,
}

impl DpopVerifier {
    /// `store`: the revocation backend (`None`, or the memory backend: a local replay cache
    /// only).
    pub fn new(
        settings: &DpopSettings,
        token_policy: &JwtPolicy,
        store: Option<Arc<Backend>>,
        failure_mode: FailureMode,
    ) -> Self {
        let rules = ProofRules::new(settings, token_policy);
        let window = Duration::from_secs((rules.max_age + rules.leeway).max(1) as u64);
        let algs = token_policy
            .algorithms
            .iter()
            .map(|alg| format!("{alg:?}"))
            .collect::<Vec<_>>()
            .join(" ");
        DpopVerifier {
            replay: ReplayGuard::new(
                settings.replay_cache_max_entries,
                window,
                settings.replay_key_prefix.clone(),
            )
            .on_check_path(),
            rules,
            store,
            failure_mode,
            trust_forwarded_proto: settings.trust_forwarded_proto,
            algs,
        }
    }

    /// The algorithms a proof may use, space-separated, for the `algs` challenge parameter.
    pub fn algs(&self) -> &str {
        &self.algs
    }

    pub fn trusts_forwarded_proto(&self) -> bool {
        self.trust_forwarded_proto
    }

    /// Checks the proof, then claims its `jti` (scoped to the key, so one client cannot use
    /// up another's identifiers).
    pub async fn check(
        &self,
        header: Option<&str>,
        target: &ProofTarget<'_>,
        token: &str,
        jkt: &str,
        now: i64,
    ) -> ProofOutcome {
        let proof = match verify_proof(header, target, token, jkt, &self.rules, now) {
            Ok(proof) => proof,
            Err(Invalid(why)) => {
                tracing::debug!(why, "DPoP proof refused");
                return ProofOutcome::Refused(Denial::InvalidDpopProof);
            }
        };
        let key = ReplayGuard::key(&[jkt, &proof.jti]);
        match self.replay.claim(key, self.store.as_deref()).await {
            Claimed::First => ProofOutcome::Valid,
            Claimed::Replay => ProofOutcome::Refused(Denial::DpopReplay),
            Claimed::Failed(error) => match self.failure_mode {
                FailureMode::Open => ProofOutcome::ValidHereOnly(error),
                FailureMode::Closed => {
                    // Not served: the client's retry of this request is not a replay.
                    self.replay.forget_local(&key);
                    ProofOutcome::Unavailable(error)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn thumbprints_follow_rfc_7638() {
        // The key of RFC 9449's examples, and the `jkt` those examples bind to it.
        let ec = json!({"kty": "EC", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
            "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA", "crv": "P-256", "kid": "ignored"});
        assert_eq!(
            jwk_thumbprint(ec.as_object().unwrap()).as_deref(),
            Some("0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I")
        );
        // RFC 8037 A.3.
        let okp = json!({"kty": "OKP", "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert_eq!(
            jwk_thumbprint(okp.as_object().unwrap()).as_deref(),
            Some("kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k")
        );
        let rsa = json!({"kty": "RSA", "n": "AQAB", "e": "AQAB", "alg": "RS256"});
        let rsa_only_required = json!({"e": "AQAB", "kty": "RSA", "n": "AQAB"});
        assert_eq!(
            jwk_thumbprint(rsa.as_object().unwrap()),
            jwk_thumbprint(rsa_only_required.as_object().unwrap())
        );
        for bad in [
            json!({"kty": "oct", "k": "c2VjcmV0"}),
            json!({"kty": "EC", "crv": "P-256", "x": "a"}),
            json!({"kty": "RSA", "n": 5, "e": "AQAB"}),
            json!({"n": "a", "e": "AQAB"}),
        ] {
            assert_eq!(jwk_thumbprint(bad.as_object().unwrap()), None, "{bad}");
        }
    }

    #[test]
    fn uris_compare_after_normalisation() {
        let uri = |s, a, p| normalized_uri(s, a, p);
        let request = uri("https", "api.test", "/orders?x=1");
        assert_eq!(request.as_deref(), Some("https://api.test/orders"));
        for same in [
            "https://api.test/orders",
            "HTTPS://API.Test/orders",
            "https://api.test:443/orders",
            "https://api.test/orders?y=2",
            "https://api.test/orders#frag",
        ] {
            assert_eq!(normalized_htu(same), request, "{same}");
        }
        for other in [
            "http://api.test/orders",
            "https://api.test:8443/orders",
            "https://api.test/Orders",
            "https://api.test/orders/",
            "https://other.test/orders",
            "api.test/orders",
            "ftp://api.test/orders",
        ] {
            assert_ne!(normalized_htu(other), request, "{other}");
        }
        assert_eq!(
            normalized_htu("http://h:80").as_deref(),
            Some("http://h/"),
            "default port and empty path"
        );
        assert_eq!(
            uri("http", "[::1]:8080", "/a%2fb").as_deref(),
            Some("http://[::1]:8080/a%2Fb")
        );
        assert_eq!(uri("", "api.test", "/"), None);
        assert_eq!(uri("https", "", "/"), None);
    }
}
