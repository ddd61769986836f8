//! Sender-constrained tokens: a token bound to a key its holder must prove (the `cnf` claim,
//! RFC 7800) passes only with that proof on this very request, so a stolen copy is useless.
//!
//! - `cnf["x5t#S256"]` (RFC 8705, certificate-bound): the base64url SHA-256 of the client
//!   certificate the request came with, which Envoy forwards with `include_peer_certificate`.
//! - `cnf.jkt` (RFC 9449, DPoP-bound): the token must come with the DPoP scheme, and the
//!   caller checks the request's proof against the thumbprint ([`crate::dpop`]). Sent as a
//!   Bearer token it is refused (`invalid_dpop_proof`): accepted, its binding would mean
//!   nothing (RFC 9449 7.2).
//! - Any other `cnf` member alone: refused, a binding this sidecar cannot check.
//!
//! A token sent with the DPoP scheme must be DPoP-bound (`invalid_dpop_proof` otherwise): a
//! proof only proves something about the token if the token names its key. Other unbound
//! tokens pass, unless the route (`require_sender_constraint`) or `REQUIRE_SENDER_CONSTRAINT`
//! asks for a binding. Runs on every Check, cache hit or not: the binding is to the request,
//! not to the token.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::Value;

use crate::claims::{Claims, KeptClaims, ReadsClaims};
use crate::decision::Denial;

/// The confirmation claim (RFC 7800).
const CONFIRMATION: &str = "cnf";
/// The certificate thumbprint member (RFC 8705 3.1).
const CERTIFICATE_THUMBPRINT: &str = "x5t#S256";
/// The DPoP key thumbprint member (RFC 9449 6.1).
const DPOP_KEY_THUMBPRINT: &str = "jkt";

/// The binding check as a claim reader: it reads `cnf`, so the token cache keeps it.
pub struct SenderConstraint;

impl ReadsClaims for SenderConstraint {
    fn claims_read(&self) -> KeptClaims {
        KeptClaims::Named([CONFIRMATION.to_owned()].into())
    }
}

/// The authorization scheme the token came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `Bearer`, a custom header or a cookie.
    Bearer,
    /// `Authorization: DPoP <token>` (RFC 9449 7.1).
    Dpop,
}

/// What else the request must prove once [`check`] passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// Nothing: unbound, or certificate-bound and the certificate matched.
    Done,
    /// A DPoP proof by the key with this RFC 7638 thumbprint (`cnf.jkt`).
    Dpop(String),
}

/// Whether the verified token may be used on this request. `certificate`: Envoy's URL-encoded
/// PEM client certificate (empty without TLS or `include_peer_certificate`); `scheme`: how the
/// token was sent; `required`: an unbound token is refused.
pub fn check(
    claims: &Claims,
    certificate: &str,
    scheme: Scheme,
    required: bool,
) -> Result<Proof, Denial> {
    let Some(confirmation) = claims.value(CONFIRMATION) else {
        return match (scheme, required) {
            (Scheme::Dpop, _) => Err(Denial::InvalidDpopProof),
            (Scheme::Bearer, true) => Err(Denial::UnboundToken),
            (Scheme::Bearer, false) => Ok(Proof::Done),
        };
    };
    let Value::Object(members) = &*confirmation else {
        return Err(Denial::UnsupportedBinding);
    };
    let dpop = match (members.get(DPOP_KEY_THUMBPRINT), scheme) {
        (Some(Value::String(jkt)), Scheme::Dpop) => Some(jkt.clone()),
        // Bound, sent as a bearer token; or a thumbprint that is no string; or a DPoP
        // request whose token names no key.
        (Some(_), _) | (None, Scheme::Dpop) => return Err(Denial::InvalidDpopProof),
        (None, Scheme::Bearer) => None,
    };
    match members.get(CERTIFICATE_THUMBPRINT) {
        Some(Value::String(expected)) => match certificate_thumbprint(certificate) {
            Some(presented) if presented == *expected => {}
            _ => return Err(Denial::CertificateMismatch),
        },
        Some(_) => return Err(Denial::CertificateMismatch),
        None if dpop.is_none() => return Err(Denial::UnsupportedBinding),
        None => {}
    }
    Ok(dpop.map_or(Proof::Done, Proof::Dpop))
}

/// The RFC 8705 thumbprint of Envoy's URL-encoded PEM certificate: base64url (no padding) of
/// the SHA-256 of its DER. `None` when there is no certificate or it is not PEM.
pub fn certificate_thumbprint(url_encoded_pem: &str) -> Option<String> {
    if url_encoded_pem.is_empty() {
        return None;
    }
    let pem = percent_decode(url_encoded_pem)?;
    let pem = std::str::from_utf8(&pem).ok()?;
    let body = pem
        .split_once("-----BEGIN CERTIFICATE-----")?
        .1
        .split_once("-----END CERTIFICATE-----")?
        .0;
    let base64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let der = STANDARD.decode(base64).ok()?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
    Some(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

/// Strict `%XX` decoding (a `+` stays a `+`: it is base64 here, not a space). `None` on a bad
/// escape.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use serde_json::json;

    fn claims(all: Value) -> Claims {
        Claims::from_object(all.as_object().unwrap().clone()).unwrap()
    }

    /// A throwaway certificate, PEM, and Envoy's URL encoding of it.
    fn certificate() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = rcgen::CertificateParams::new(vec!["client.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem();
        let encoded: String = pem
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect();
        (pem, encoded)
    }

    #[test]
    fn the_thumbprint_is_the_base64url_sha256_of_the_der() {
        let (pem, encoded) = certificate();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let expected = URL_SAFE_NO_PAD
            .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref()).as_ref());
        assert_eq!(certificate_thumbprint(&encoded), Some(expected.clone()));
        assert_eq!(expected.len(), 43);
        assert_eq!(certificate_thumbprint(""), None);
        assert_eq!(certificate_thumbprint("%ZZ"), None);
        assert_eq!(certificate_thumbprint("not a pem"), None);
    }

    #[test]
    fn a_bound_token_needs_its_certificate_and_unbound_ones_pass_unless_required() {
        let (_, encoded) = certificate();
        let (_, other) = certificate();
        let thumbprint = certificate_thumbprint(&encoded).unwrap();
        let bearer = Scheme::Bearer;
        let bound = claims(json!({"cnf": {"x5t#S256": thumbprint}}));
        assert_eq!(check(&bound, &encoded, bearer, true), Ok(Proof::Done));
        assert_eq!(
            check(&bound, &other, bearer, false),
            Err(Denial::CertificateMismatch)
        );
        assert_eq!(
            check(&bound, "", bearer, false),
            Err(Denial::CertificateMismatch)
        );
        let unbound = claims(json!({"sub": "a"}));
        assert_eq!(check(&unbound, "", bearer, false), Ok(Proof::Done));
        assert_eq!(
            check(&unbound, &encoded, bearer, true),
            Err(Denial::UnboundToken)
        );
        for (cnf, denial) in [
            (json!({"jkt": "abc"}), Denial::InvalidDpopProof),
            (
                json!({"x5t#S256": thumbprint, "jkt": "abc"}),
                Denial::InvalidDpopProof,
            ),
            (json!({"kid": "k1"}), Denial::UnsupportedBinding),
            (json!("x"), Denial::UnsupportedBinding),
            (json!({"x5t#S256": 5}), Denial::CertificateMismatch),
        ] {
            let token = claims(json!({"cnf": cnf}));
            assert_eq!(check(&token, &encoded, bearer, false), Err(denial), "{cnf}");
        }
    }

    #[test]
    fn dpop_bound_tokens_need_the_dpop_scheme_and_the_dpop_scheme_a_bound_token() {
        let (_, encoded) = certificate();
        let dpop = Scheme::Dpop;
        let jkt = |cnf: Value| claims(json!({"cnf": cnf}));
        assert_eq!(
            check(&jkt(json!({"jkt": "k"})), "", dpop, false),
            Ok(Proof::Dpop("k".into()))
        );
        assert_eq!(
            check(&jkt(json!({"jkt": 7})), "", dpop, false),
            Err(Denial::InvalidDpopProof)
        );
        assert_eq!(
            check(&claims(json!({"sub": "a"})), "", dpop, false),
            Err(Denial::InvalidDpopProof)
        );
        let certificate_only = jkt(json!({"x5t#S256": certificate_thumbprint(&encoded)}));
        assert_eq!(
            check(&certificate_only, &encoded, dpop, false),
            Err(Denial::InvalidDpopProof)
        );
        // Both bindings: both are checked.
        let both = jkt(json!({"jkt": "k", "x5t#S256": certificate_thumbprint(&encoded)}));
        assert_eq!(
            check(&both, &encoded, dpop, false),
            Ok(Proof::Dpop("k".into()))
        );
        assert_eq!(
            check(&both, "", dpop, false),
            Err(Denial::CertificateMismatch)
        );
    }
}
