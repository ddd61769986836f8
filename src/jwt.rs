//! Pure JWT verification: parsing, claim checks and the signature check. No I/O and no clock:
//! the caller passes the key and the time, so every rule here is testable with a table.
//!
//! The order is cheapest first: size, structure, header, algorithm allowlist and claims are all
//! checked before the key lookup (which may fetch) and the signature check (which costs ~25-60 us).

use std::ops::RangeInclusive;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use crate::claims::Claims;
use crate::decision::Denial;
use crate::keys::{ASYMMETRIC_ALGORITHMS, VerifyingKey};

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
    /// Whether the header's `typ` must say an OAuth access token (`at+jwt`, RFC 9068 2.1), so
    /// an ID token of the same issuer is not accepted as one.
    pub require_at_jwt: bool,
}

impl JwtPolicy {
    /// `JWT_ALGORITHMS`: comma-separated names, each an asymmetric algorithm (HMAC and `none`
    /// are refused), at least one.
    pub fn parse_algorithms(value: &str) -> Result<Vec<Algorithm>, String> {
        let mut algorithms = Vec::new();
        for name in crate::config::parse::split_list(value) {
            let alg: Algorithm = name
                .parse()
                .map_err(|_| format!("unknown algorithm {name:?}"))?;
            if !ASYMMETRIC_ALGORITHMS.contains(&alg) {
                return Err(format!(
                    "{name} is not allowed: only public-key algorithms can use a JWKS"
                ));
            }
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        if algorithms.is_empty() {
            return Err("at least one algorithm is required".into());
        }
        Ok(algorithms)
    }
}

/// A token split and decoded, but not yet trusted.
#[derive(Debug)]
pub struct UnverifiedJwt<'t> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    /// The whole header, for readers of more than `alg` and `kid` (a DPoP proof's `jwk`).
    pub header: Map<String, Value>,
    pub claims: Claims,
    signing_input: &'t str,
    signature: &'t str,
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
    // RFC 9068 4: `at+jwt`, or with the `application/` prefix RFC 7515 4.1.9 lets a writer
    // add; media types compare case-insensitively.
    if policy.require_at_jwt
        && !fields
            .get("typ")
            .and_then(Value::as_str)
            .is_some_and(|typ| {
                let typ = typ.to_ascii_lowercase();
                typ == "at+jwt" || typ == "application/at+jwt"
            })
    {
        return Err(Denial::WrongTokenType);
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
    let claims = Claims::from_object(object).map_err(|_| Denial::Malformed)?;
    Ok(UnverifiedJwt {
        alg,
        kid,
        header: fields,
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

/// The unix seconds during which [`check_claims`]'s time rules (`exp`, `nbf`, `iat`, with the
/// leeway) hold for the claims; `None` if never (no `exp`). Its other rules read no clock.
pub fn claims_hold(claims: &Claims, policy: &JwtPolicy) -> Option<RangeInclusive<i64>> {
    let leeway = policy.leeway_seconds;
    let exp = claims.exp?;
    let valid_from = [claims.nbf, claims.iat]
        .into_iter()
        .flatten()
        .max()
        .map_or(i64::MIN, |t| t.saturating_sub(leeway));
    let valid_until = exp.saturating_add(leeway).checked_sub(1)?;
    Some(valid_from..=valid_until)
}

/// Checks the signature with a key from the issuer's JWKS.
pub fn verify_signature(jwt: &UnverifiedJwt<'_>, key: &VerifyingKey) -> Result<(), Denial> {
    if !key.accepts(jwt.alg) {
        return Err(Denial::DisallowedAlgorithm);
    }
    match jsonwebtoken::crypto::verify(
        jwt.signature,
        jwt.signing_input.as_bytes(),
        key.decoding(),
        jwt.alg,
    ) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Denial::BadSignature),
        // Bad base64 in the signature part, or a signature of the wrong length.
        Err(_) => Err(Denial::BadSignature),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> JwtPolicy {
        JwtPolicy {
            require_at_jwt: false,
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

    /// `claims_hold` is exactly the seconds at which `check_claims` passes the time rules,
    /// checked second by second around every edge.
    #[test]
    fn the_claims_hold_exactly_while_their_time_rules_pass() {
        let times = [
            None,
            Some(-5),
            Some(0),
            Some(1_000),
            Some(1_030),
            Some(i64::MAX),
        ];
        for leeway in [0, 1, 60] {
            let policy = JwtPolicy {
                leeway_seconds: leeway,
                require_jti: false,
                ..policy()
            };
            for exp in times {
                for nbf in times {
                    for iat in [None, Some(990), Some(1_020)] {
                        let claims = Claims {
                            exp,
                            nbf,
                            iat,
                            ..Claims::default()
                        };
                        let hold = claims_hold(&claims, &policy);
                        for now in (-80..80).chain(900..1_120).chain([i64::MAX - 1]) {
                            let passes = check_claims(&claims, &[] as &[&str], &policy, now);
                            assert_eq!(
                                passes.is_ok(),
                                hold.as_ref().is_some_and(|hold| hold.contains(&now)),
                                "exp {exp:?} nbf {nbf:?} iat {iat:?} leeway {leeway} now {now}: \
                                 {passes:?} against {hold:?}"
                            );
                        }
                    }
                }
            }
        }
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
    fn only_access_tokens_pass_when_at_jwt_is_required() {
        let strict = JwtPolicy {
            require_at_jwt: true,
            ..policy()
        };
        let with_typ = |typ: Value| {
            let t = token(json!({"alg": "ES256", "typ": typ}), json!({"exp": 1}));
            parse(&t, &strict).err()
        };
        assert_eq!(with_typ(json!("at+jwt")), None);
        assert_eq!(with_typ(json!("application/AT+JWT")), None);
        for refused in [
            json!("JWT"),
            json!("at+jwt "),
            json!(null),
            json!(["at+jwt"]),
        ] {
            assert_eq!(
                with_typ(refused.clone()),
                Some(Denial::WrongTokenType),
                "{refused}"
            );
        }
        let untyped = token(json!({"alg": "ES256"}), json!({"exp": 1}));
        assert_eq!(parse(&untyped, &strict).err(), Some(Denial::WrongTokenType));
        assert_eq!(parse(&untyped, &policy()).err(), None, "off by default");
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
}
