//! Sender-constrained tokens: a token bound to a key its holder must prove (the `cnf` claim,
//! RFC 7800) passes only with that proof on this very request, so a stolen copy is useless.
//!
//! - `cnf["x5t#S256"]` (RFC 8705, certificate-bound): the base64url SHA-256 of the client
//!   certificate the request came with, which Envoy forwards with `include_peer_certificate`.
//! - `cnf.jkt` (RFC 9449, DPoP-bound): DPoP proofs are not verified yet, so such a token is
//!   refused however it is sent; accepted as a bearer token, its binding would mean nothing.
//! - Any other `cnf` member alone: refused for the same reason, a binding this sidecar cannot
//!   check.
//!
//! Unbound tokens pass, unless the route (`require_sender_constraint`) or
//! `REQUIRE_SENDER_CONSTRAINT` asks for a binding. Runs on every Check, cache hit or not: the
//! binding is to the request, not to the token.

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

/// Whether the verified token may be used on this request. `certificate`: Envoy's URL-encoded
/// PEM client certificate (empty without TLS or `include_peer_certificate`); `required`: an
/// unbound token is refused.
pub fn check(claims: &Claims, certificate: &str, required: bool) -> Result<(), Denial> {
    let Some(confirmation) = claims.value(CONFIRMATION) else {
        return match required {
            true => Err(Denial::UnboundToken),
            false => Ok(()),
        };
    };
    let Value::Object(members) = &*confirmation else {
        return Err(Denial::UnsupportedBinding);
    };
    if members.contains_key(DPOP_KEY_THUMBPRINT) {
        return Err(Denial::InvalidDpopProof);
    }
    match members.get(CERTIFICATE_THUMBPRINT) {
        Some(Value::String(expected)) => match certificate_thumbprint(certificate) {
            Some(presented) if presented == *expected => Ok(()),
            _ => Err(Denial::CertificateMismatch),
        },
        Some(_) => Err(Denial::CertificateMismatch),
        None => Err(Denial::UnsupportedBinding),
    }
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
        let bound = claims(json!({"cnf": {"x5t#S256": thumbprint}}));
        assert_eq!(check(&bound, &encoded, true), Ok(()));
        assert_eq!(
            check(&bound, &other, false),
            Err(Denial::CertificateMismatch)
        );
        assert_eq!(check(&bound, "", false), Err(Denial::CertificateMismatch));
        let unbound = claims(json!({"sub": "a"}));
        assert_eq!(check(&unbound, "", false), Ok(()));
        assert_eq!(check(&unbound, &encoded, true), Err(Denial::UnboundToken));
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
            assert_eq!(check(&token, &encoded, false), Err(denial), "{cnf}");
        }
    }
}
