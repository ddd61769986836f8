//! Pure JWT verification: parsing, claim checks and the signature check. No I/O and no clock:
//! the caller passes the key and the time, so every rule here is testable with a table.
//!
//! The order is cheapest first: size, structure, header, algorithm allowlist and claims are all
//! checked before the key lookup (which may fetch) and the signature check (which costs ~25-60 us).

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use crate::decision::Denial;

/// Every signature algorithm this sidecar can verify with a public key. HMAC is deliberately
/// absent: a JWKS holds public keys, and accepting HS* would let anyone sign with them.
pub const ASYMMETRIC_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// RSA keys shorter than this are refused when a JWKS is loaded (NIST SP 800-57 minimum).
pub const MIN_RSA_MODULUS_BITS: usize = 2048;

/// The token rules shared by every issuer.
#[derive(Debug, Clone)]
pub struct JwtPolicy {
    /// Accepted `alg` values; never empty, never HMAC or `none`.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_seconds: i64,
    /// Whether a token without `jti` is denied (revocation by jti needs one).
    pub require_jti: bool,
    /// Longest token accepted, in bytes; checked before any decoding.
    pub max_token_bytes: usize,
}

/// A token split and decoded, but not yet trusted.
#[derive(Debug)]
pub struct UnverifiedJwt<'t> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub claims: Claims,
    signing_input: &'t str,
    signature: &'t str,
}

/// The claims this sidecar reads, plus the claim set read by name (header mapping, metadata,
/// scopes, rate-limit keys). A cached copy keeps only the names the configuration reads
/// ([`crate::token_cache::KeptClaims`]); read them through [`Claims::value`].
#[derive(Debug, Clone, Default, PartialEq)]
///
/// Boxed strings and slices, not `String` and `Vec`: no spare capacity, 8 bytes less each, and
/// `iss` is shared with the issuer's own name in a cached copy. 100,000 cached tokens hold as
/// many of these (BENCHMARKS.md, "Where the memory goes").
pub struct Claims {
    pub iss: Option<Arc<str>>,
    pub sub: Option<Box<str>>,
    pub aud: Box<[Box<str>]>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
    pub jti: Option<Box<str>>,
    pub sid: Option<Box<str>>,
    pub all: ClaimSet,
}

/// Claims by name, sorted, in one allocation. A `serde_json::Map` is a B-tree whose leaf
/// alone is ~630 bytes however few claims it holds: most of a cached token's memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClaimSet(Box<[(String, Value)]>);

impl ClaimSet {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .binary_search_by(|(claim, _)| claim.as_str().cmp(name))
            .ok()
            .map(|at| &self.0[at].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0.iter().map(|(name, value)| (name, value))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The claims whose names `keep` accepts, in an allocation of exactly their size.
    pub fn only(&self, keep: impl Fn(&str) -> bool) -> ClaimSet {
        ClaimSet(
            self.0
                .iter()
                .filter(|(name, _)| keep(name))
                .cloned()
                .collect(),
        )
    }
}

impl From<Map<String, Value>> for ClaimSet {
    fn from(map: Map<String, Value>) -> Self {
        // A Map iterates in key order, which `get`'s binary search relies on.
        ClaimSet(map.into_iter().collect())
    }
}

/// String claims held typed, which a cached copy need not keep twice.
pub const TYPED_STRING_CLAIMS: [&str; 4] = ["iss", "sub", "jti", "sid"];

impl Claims {
    /// A claim by name, from the claim set or, for one a cached copy dropped because it is
    /// held typed, rebuilt from the typed field (the same JSON string).
    pub fn value(&self, name: &str) -> Option<std::borrow::Cow<'_, Value>> {
        use std::borrow::Cow;
        if let Some(value) = self.all.get(name) {
            return Some(Cow::Borrowed(value));
        }
        let typed = match name {
            "iss" => self.iss.as_deref(),
            "sub" => self.sub.as_deref(),
            "jti" => self.jti.as_deref(),
            "sid" => self.sid.as_deref(),
            _ => return None,
        };
        typed.map(|s| Cow::Owned(Value::String(s.to_owned())))
    }
}

/// Splits and decodes a compact JWS and applies the header rules. Denies; never panics.
pub fn parse<'t>(token: &'t str, policy: &JwtPolicy) -> Result<UnverifiedJwt<'t>, Denial> {
    if token.len() > policy.max_token_bytes {
        return Err(Denial::TokenTooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Denial::Malformed);
    };
    if header.is_empty() || payload.is_empty() {
        return Err(Denial::Malformed);
    }

    let StrictJson(Value::Object(fields)) = decode_json(header)? else {
        return Err(Denial::Malformed);
    };
    let Some(Value::String(alg)) = fields.get("alg") else {
        return Err(Denial::Malformed);
    };
    // Unknown names, `none` and HMAC all fail here: only allowlisted asymmetric algorithms pass.
    let alg: Algorithm = alg.parse().map_err(|_| Denial::DisallowedAlgorithm)?;
    if !policy.algorithms.contains(&alg) {
        return Err(Denial::DisallowedAlgorithm);
    }
    // RFC 7515 4.1.11: extensions listed in `crit` must be understood, and we understand none.
    if fields.contains_key("crit") {
        return Err(Denial::Malformed);
    }
    let kid = match fields.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(Denial::Malformed),
    };
    if signature.is_empty() {
        return Err(Denial::Malformed);
    }

    let StrictJson(Value::Object(object)) = decode_json(payload)? else {
        return Err(Denial::Malformed);
    };
    let claims = Claims::from_object(object)?;
    Ok(UnverifiedJwt {
        alg,
        kid,
        claims,
        signing_input: &token[..header.len() + 1 + payload.len()],
        signature,
    })
}

/// JSON whose objects have unique member names at every depth, in the header and the claims.
/// RFC 7515 section 4 and RFC 7519 section 4 let a parser keep the last of duplicate names
/// instead, but a service behind Envoy that reads the token itself may keep the first: two
/// readers would then disagree on `sub`, a role list or a header field. Refusing is the safe
/// choice.
struct StrictJson(Value);

impl<'de> serde::Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = StrictJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON with unique member names")
    }

    fn visit_bool<E>(self, v: bool) -> Result<StrictJson, E> {
        Ok(StrictJson(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<StrictJson, E> {
        Ok(StrictJson(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<StrictJson, E> {
        Ok(StrictJson(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<StrictJson, E> {
        Ok(StrictJson(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<StrictJson, E> {
        Ok(StrictJson(Value::String(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<StrictJson, E> {
        Ok(StrictJson(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<StrictJson, E> {
        Ok(StrictJson(Value::Null))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<StrictJson, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictJson(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(StrictJson(Value::Array(items)))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<StrictJson, A::Error> {
        let mut object = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if object.contains_key(&name) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate member {name:?}"
                )));
            }
            let StrictJson(value) = map.next_value()?;
            object.insert(name, value);
        }
        Ok(StrictJson(Value::Object(object)))
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(segment: &str) -> Result<T, Denial> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| Denial::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| Denial::Malformed)
}

impl Claims {
    fn from_object(all: Map<String, Value>) -> Result<Self, Denial> {
        Ok(Claims {
            iss: string_claim(&all, "iss")?.map(Arc::from),
            sub: string_claim(&all, "sub")?.map(Box::from),
            aud: match all.get("aud") {
                None | Some(Value::Null) => Box::default(),
                Some(Value::String(one)) => Box::new([Box::from(one.as_str())]),
                Some(Value::Array(many)) => many
                    .iter()
                    .map(|v| v.as_str().map(Box::from).ok_or(Denial::Malformed))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(Denial::Malformed),
            },
            exp: time_claim(&all, "exp")?,
            nbf: time_claim(&all, "nbf")?,
            iat: time_claim(&all, "iat")?,
            jti: string_claim(&all, "jti")?.map(Box::from),
            sid: string_claim(&all, "sid")?.map(Box::from),
            all: ClaimSet::from(all),
        })
    }
}

fn string_claim<'a>(all: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, Denial> {
    match all.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Denial::Malformed),
    }
}

/// NumericDate (RFC 7519 2): seconds, possibly fractional; fractions are truncated.
fn time_claim(all: &Map<String, Value>, name: &str) -> Result<Option<i64>, Denial> {
    match all.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or(Denial::Malformed),
        Some(_) => Err(Denial::Malformed),
    }
}

/// Time, audience and required-claim rules. `now` is unix seconds; `audiences` empty means the
/// issuer does not restrict `aud`. The issuer itself is matched by the caller, which needs it to
/// pick the key set.
pub fn check_claims<A: AsRef<str>>(
    claims: &Claims,
    audiences: &[A],
    policy: &JwtPolicy,
    now: i64,
) -> Result<(), Denial> {
    let leeway = policy.leeway_seconds;
    let exp = claims.exp.ok_or(Denial::MissingClaim)?;
    if now >= exp.saturating_add(leeway) {
        return Err(Denial::Expired);
    }
    if let Some(nbf) = claims.nbf
        && now.saturating_add(leeway) < nbf
    {
        return Err(Denial::NotYetValid);
    }
    if let Some(iat) = claims.iat
        && now.saturating_add(leeway) < iat
    {
        return Err(Denial::NotYetValid);
    }
    if !audiences.is_empty()
        && !claims
            .aud
            .iter()
            .any(|a| audiences.iter().any(|b| b.as_ref() == &**a))
    {
        return Err(Denial::WrongAudience);
    }
    // An empty `jti` names no token (`revoke jti ""` is refused): as good as none.
    if policy.require_jti && claims.jti.as_deref().is_none_or(str::is_empty) {
        return Err(Denial::MissingClaim);
    }
    Ok(())
}

/// Checks the signature with a key from the issuer's JWKS.
pub fn verify_signature(jwt: &UnverifiedJwt<'_>, key: &VerifyingKey) -> Result<(), Denial> {
    if !key.accepts(jwt.alg) {
        return Err(Denial::DisallowedAlgorithm);
    }
    match jsonwebtoken::crypto::verify(
        jwt.signature,
        jwt.signing_input.as_bytes(),
        &key.decoding,
        jwt.alg,
    ) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Denial::BadSignature),
        // Bad base64 in the signature part, or a signature of the wrong length.
        Err(_) => Err(Denial::BadSignature),
    }
}

/// A public key from a JWKS, with the algorithms it may be used with.
pub struct VerifyingKey {
    decoding: DecodingKey,
    /// Every algorithm this key may verify: the intersection of its type/curve and its `alg`.
    algorithms: Vec<Algorithm>,
    /// The JWK's `kid`, which a cached token that named it finds it by again.
    kid: Option<String>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

/// Why a JWK was not loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRejected {
    #[error("key is for encryption (`use` is not `sig`)")]
    NotForSignatures,
    #[error("unsupported key type or curve")]
    Unsupported,
    #[error("`alg` {0} is not a signature algorithm this key type can use")]
    AlgorithmMismatch(String),
    #[error("RSA modulus of {0} bits is below the {MIN_RSA_MODULUS_BITS}-bit minimum")]
    WeakRsaKey(usize),
    #[error("invalid key material")]
    Invalid,
}

impl VerifyingKey {
    /// Builds a key from a JWK, refusing symmetric, encryption-only, weak and mislabelled keys.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, KeyRejected> {
        if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
            return Err(KeyRejected::NotForSignatures);
        }
        let by_type: &[Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(rsa) => {
                let modulus = URL_SAFE_NO_PAD
                    .decode(&rsa.n)
                    .map_err(|_| KeyRejected::Invalid)?;
                let bits = significant_bits(&modulus);
                if bits < MIN_RSA_MODULUS_BITS {
                    return Err(KeyRejected::WeakRsaKey(bits));
                }
                &ASYMMETRIC_ALGORITHMS[..6]
            }
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => &[Algorithm::ES256],
                EllipticCurve::P384 => &[Algorithm::ES384],
                _ => return Err(KeyRejected::Unsupported),
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                &[Algorithm::EdDSA]
            }
            _ => return Err(KeyRejected::Unsupported),
        };
        let algorithms = match jwk.common.key_algorithm {
            None => by_type.to_vec(),
            Some(declared) => match signature_algorithm(declared) {
                Some(alg) if by_type.contains(&alg) => vec![alg],
                _ => return Err(KeyRejected::AlgorithmMismatch(format!("{declared:?}"))),
            },
        };
        check_key_material(&jwk.algorithm)?;
        let decoding = DecodingKey::from_jwk(jwk).map_err(|_| KeyRejected::Invalid)?;
        Ok(VerifyingKey {
            decoding,
            algorithms,
            kid: jwk.common.key_id.clone(),
        })
    }

    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }
}

/// Whether the key material parses as a public key of its type: EC points on their curve with
/// full-length coordinates, 32-byte Ed25519 keys, well-formed RSA integers (up to 8192 bits).
/// The JWK parser only checks the shape, so without this a JWKS of well-shaped junk would load
/// as keys that can never verify, and replace good ones (found by tests/fuzz.rs).
fn check_key_material(algorithm: &AlgorithmParameters) -> Result<(), KeyRejected> {
    use aws_lc_rs::signature::{self, ParsedPublicKey};
    let decode = |field: &str| {
        URL_SAFE_NO_PAD
            .decode(field)
            .map_err(|_| KeyRejected::Invalid)
    };
    let parsed = match algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let der = der_sequence(&[der_integer(&decode(&rsa.n)?), der_integer(&decode(&rsa.e)?)]);
            ParsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, der)
        }
        AlgorithmParameters::EllipticCurve(ec) => {
            let (verification, size): (&'static signature::EcdsaVerificationAlgorithm, usize) =
                match ec.curve {
                    EllipticCurve::P256 => (&signature::ECDSA_P256_SHA256_FIXED, 32),
                    EllipticCurve::P384 => (&signature::ECDSA_P384_SHA384_FIXED, 48),
                    _ => return Err(KeyRejected::Unsupported),
                };
            let (x, y) = (decode(&ec.x)?, decode(&ec.y)?);
            if x.len() != size || y.len() != size {
                return Err(KeyRejected::Invalid);
            }
            let point: Vec<u8> = [&[4u8][..], &x, &y].concat();
            ParsedPublicKey::new(verification, point)
        }
        AlgorithmParameters::OctetKeyPair(okp) => {
            ParsedPublicKey::new(&signature::ED25519, decode(&okp.x)?)
        }
        _ => return Err(KeyRejected::Unsupported),
    };
    parsed.map(|_| ()).map_err(|_| KeyRejected::Invalid)
}

/// DER of an unsigned big-endian INTEGER.
fn der_integer(big_endian: &[u8]) -> Vec<u8> {
    let start = big_endian
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(big_endian.len());
    let mut value = big_endian[start..].to_vec();
    if value.first().is_none_or(|b| b & 0x80 != 0) {
        value.insert(0, 0);
    }
    der_tagged(0x02, &value)
}

fn der_sequence(items: &[Vec<u8>]) -> Vec<u8> {
    der_tagged(0x30, &items.concat())
}

fn der_tagged(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

fn signature_algorithm(declared: KeyAlgorithm) -> Option<Algorithm> {
    Some(match declared {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        // HMAC and encryption algorithms never verify a signature from a JWKS.
        _ => return None,
    })
}

fn significant_bits(big_endian: &[u8]) -> usize {
    match big_endian.iter().position(|&b| b != 0) {
        None => 0,
        Some(i) => (big_endian.len() - i) * 8 - big_endian[i].leading_zeros() as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> JwtPolicy {
        JwtPolicy {
            algorithms: ASYMMETRIC_ALGORITHMS.to_vec(),
            leeway_seconds: 60,
            require_jti: true,
            max_token_bytes: 8192,
        }
    }

    fn segment(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
    }

    fn token(header: Value, claims: Value) -> String {
        format!("{}.{}.c2ln", segment(&header), segment(&claims))
    }

    #[test]
    fn parse_denies_bad_structure_and_headers() {
        let ok_claims = json!({"iss": "i", "exp": 10});
        let cases: Vec<(String, Denial)> = vec![
            ("a.b".into(), Denial::Malformed),
            ("a.b.c.d".into(), Denial::Malformed),
            ("..sig".into(), Denial::Malformed),
            ("!!!.e30.c2ln".into(), Denial::Malformed),
            (
                format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("not json")),
                Denial::Malformed,
            ),
            (
                token(json!({"alg": "none"}), ok_claims.clone()),
                Denial::DisallowedAlgorithm,
            ),
            (
                token(json!({"alg": "HS256"}), ok_claims.clone()),
                Denial::DisallowedAlgorithm,
            ),
            (
                token(json!({"alg": "RS1"}), ok_claims.clone()),
                Denial::DisallowedAlgorithm,
            ),
            (
                token(json!({"kid": "k"}), ok_claims.clone()),
                Denial::Malformed,
            ),
            (
                token(json!({"alg": "RS256", "crit": ["x"]}), ok_claims.clone()),
                Denial::Malformed,
            ),
            (
                token(json!({"alg": "RS256"}), json!({"exp": "soon"})),
                Denial::Malformed,
            ),
            (
                token(json!({"alg": "RS256"}), json!({"aud": [1]})),
                Denial::Malformed,
            ),
            (
                token(json!({"alg": "RS256"}), json!(["not", "an", "object"])),
                Denial::Malformed,
            ),
            ("x".repeat(8193), Denial::TokenTooLarge),
        ];
        for (token, expected) in cases {
            assert_eq!(
                parse(&token, &policy()).err(),
                Some(expected),
                "{token:.80}"
            );
        }
        let none_unsigned = format!(
            "{}.{}.",
            segment(&json!({"alg": "none"})),
            segment(&ok_claims)
        );
        assert_eq!(
            parse(&none_unsigned, &policy()).err(),
            Some(Denial::DisallowedAlgorithm)
        );
    }

    #[test]
    fn parse_reads_header_and_claims() {
        let t = token(
            json!({"alg": "ES256", "kid": "k1", "typ": "JWT"}),
            json!({"iss": "i", "sub": "s", "aud": "a", "exp": 20.9, "jti": "j", "sid": "x"}),
        );
        let jwt = parse(&t, &policy()).unwrap();
        assert_eq!(jwt.alg, Algorithm::ES256);
        assert_eq!(jwt.kid.as_deref(), Some("k1"));
        assert_eq!(*jwt.claims.aud, [Box::from("a")]);
        assert_eq!(jwt.claims.exp, Some(20));
        assert_eq!(jwt.claims.sid.as_deref(), Some("x"));
        assert_eq!(jwt.signing_input, t.rsplit_once('.').unwrap().0);
    }

    #[test]
    fn an_algorithm_outside_the_allowlist_is_denied() {
        let only_es = JwtPolicy {
            algorithms: vec![Algorithm::ES256],
            ..policy()
        };
        let t = token(json!({"alg": "RS256"}), json!({"exp": 1}));
        assert_eq!(parse(&t, &only_es).err(), Some(Denial::DisallowedAlgorithm));
    }

    #[test]
    fn claim_rules() {
        let now = 1_000_000;
        let base = Claims {
            exp: Some(now + 10),
            jti: Some("j".into()),
            aud: Box::new(["api".into()]),
            ..Claims::default()
        };
        let aud = vec!["api".to_string(), "other".to_string()];
        let with = |f: &dyn Fn(&mut Claims)| {
            let mut c = base.clone();
            f(&mut c);
            check_claims(&c, &aud, &policy(), now)
        };
        assert_eq!(with(&|_| {}), Ok(()));
        assert_eq!(with(&|c| c.exp = None), Err(Denial::MissingClaim));
        assert_eq!(
            with(&|c| c.exp = Some(now - 59)),
            Ok(()),
            "inside the leeway"
        );
        assert_eq!(with(&|c| c.exp = Some(now - 60)), Err(Denial::Expired));
        assert_eq!(with(&|c| c.exp = Some(i64::MIN)), Err(Denial::Expired));
        assert_eq!(with(&|c| c.exp = Some(i64::MAX)), Ok(()));
        assert_eq!(with(&|c| c.nbf = Some(now + 60)), Ok(()));
        assert_eq!(with(&|c| c.nbf = Some(now + 61)), Err(Denial::NotYetValid));
        assert_eq!(with(&|c| c.iat = Some(now + 61)), Err(Denial::NotYetValid));
        assert_eq!(
            with(&|c| c.aud = Box::default()),
            Err(Denial::WrongAudience)
        );
        assert_eq!(
            with(&|c| c.aud = Box::new(["x".into(), "other".into()])),
            Ok(())
        );
        assert_eq!(with(&|c| c.jti = None), Err(Denial::MissingClaim));
        let no_aud_rule = check_claims(
            &Claims {
                aud: Box::default(),
                ..base.clone()
            },
            &[] as &[String],
            &policy(),
            now,
        );
        assert_eq!(no_aud_rule, Ok(()));
        let jti_optional = JwtPolicy {
            require_jti: false,
            ..policy()
        };
        let no_jti = Claims {
            jti: None,
            ..base.clone()
        };
        assert_eq!(check_claims(&no_jti, &aud, &jti_optional, now), Ok(()));
    }

    fn jwk(value: Value) -> Jwk {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn key_material_must_be_a_real_public_key() {
        let real = crate::devkeys::SigningKey::generate(Algorithm::ES256, "ec").unwrap();
        let real = real.jwk().unwrap();
        assert!(VerifyingKey::from_jwk(&jwk(real.clone())).is_ok());
        let coordinate = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        for (x, y) in [
            ("aaa_0a0".to_owned(), "aaa_0a0".to_owned()),
            (coordinate(&[1; 32]), coordinate(&[1; 32])),
            (real["x"].as_str().unwrap().to_owned(), coordinate(&[1; 32])),
        ] {
            let junk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y});
            assert_eq!(
                VerifyingKey::from_jwk(&jwk(junk)).err(),
                Some(KeyRejected::Invalid),
                "{x} {y}"
            );
        }
        let short = json!({"kty": "OKP", "crv": "Ed25519", "x": coordinate(&[7; 31])});
        assert_eq!(
            VerifyingKey::from_jwk(&jwk(short)).err(),
            Some(KeyRejected::Invalid)
        );
        let n = URL_SAFE_NO_PAD.encode([0xC5u8; 256]);
        let even_exponent = json!({"kty": "RSA", "n": n, "e": coordinate(&[2])});
        assert!(VerifyingKey::from_jwk(&jwk(even_exponent)).is_err());
        assert_eq!(der_integer(&[0, 0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(der_tagged(0x30, &[0; 200])[..3], [0x30, 0x81, 200]);
    }

    #[test]
    fn keys_are_limited_to_their_type_and_declared_alg() {
        let n = URL_SAFE_NO_PAD.encode([0xC5u8; 256]);
        let rsa = VerifyingKey::from_jwk(&jwk(json!({"kty": "RSA", "n": n, "e": "AQAB"}))).unwrap();
        assert!(rsa.accepts(Algorithm::RS256) && rsa.accepts(Algorithm::PS512));
        assert!(!rsa.accepts(Algorithm::ES256) && !rsa.accepts(Algorithm::HS256));

        let pinned = json!({"kty": "RSA", "n": n, "e": "AQAB", "alg": "PS256"});
        let pinned = VerifyingKey::from_jwk(&jwk(pinned)).unwrap();
        assert!(pinned.accepts(Algorithm::PS256) && !pinned.accepts(Algorithm::RS256));

        let lying = json!({"kty": "RSA", "n": n, "e": "AQAB", "alg": "ES256"});
        assert!(matches!(
            VerifyingKey::from_jwk(&jwk(lying)),
            Err(KeyRejected::AlgorithmMismatch(_))
        ));
        let hmac = json!({"kty": "RSA", "n": n, "e": "AQAB", "alg": "HS256"});
        assert!(VerifyingKey::from_jwk(&jwk(hmac)).is_err());
        let enc = json!({"kty": "RSA", "n": n, "e": "AQAB", "use": "enc"});
        assert_eq!(
            VerifyingKey::from_jwk(&jwk(enc)).err(),
            Some(KeyRejected::NotForSignatures)
        );
        let short = URL_SAFE_NO_PAD.encode([0xC5u8; 128]);
        let weak = json!({"kty": "RSA", "n": short, "e": "AQAB"});
        assert_eq!(
            VerifyingKey::from_jwk(&jwk(weak)).err(),
            Some(KeyRejected::WeakRsaKey(1024))
        );
        let oct = json!({"kty": "oct", "k": "c2VjcmV0"});
        assert_eq!(
            VerifyingKey::from_jwk(&jwk(oct)).err(),
            Some(KeyRejected::Unsupported)
        );
    }

    #[test]
    fn significant_bits_ignores_leading_zero_bytes() {
        assert_eq!(significant_bits(&[0, 0, 1]), 1);
        assert_eq!(significant_bits(&[0x80, 0]), 16);
        assert_eq!(significant_bits(&[]), 0);
    }
}
