//! Public keys from a JWKS: which algorithms each may verify, and the checks a key must pass
//! before it is used (a real point on its curve, a well-formed RSA key of at least 2048 bits,
//! a signing key whose declared `alg` fits its type).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

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

    /// The key as jsonwebtoken's signature check takes it.
    pub fn decoding(&self) -> &DecodingKey {
        &self.decoding
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
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{self, ParsedPublicKey};
    let decode = |field: &str| {
        URL_SAFE_NO_PAD
            .decode(field)
            .map_err(|_| KeyRejected::Invalid)
    };
    let parsed = match algorithm {
        AlgorithmParameters::RSA(rsa) => {
            // aws-lc-rs wants the integers without leading zero bytes, which some IdPs send.
            let (n, e) = (decode(&rsa.n)?, decode(&rsa.e)?);
            let unpadded = |b: &[u8]| b[b.iter().take_while(|x| **x == 0).count()..].to_vec();
            let components = signature::RsaPublicKeyComponents {
                n: unpadded(&n),
                e: unpadded(&e),
            };
            // Encoded by aws-lc-rs and parsed back, so the key gets the same checks as any
            // RSA public key it parses (odd modulus and exponent, sizes).
            let der = components.as_der().map_err(|_| KeyRejected::Invalid)?;
            ParsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, der.as_ref())
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
    use serde_json::{Value, json};

    fn jwk(value: Value) -> Jwk {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    #[cfg(feature = "tools")]
    fn key_material_must_be_a_real_public_key() {
        let real = crate::tools::devkeys::SigningKey::generate(Algorithm::ES256, "ec").unwrap();
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
        // A modulus with a leading zero byte (some IdPs send one) is the same key.
        let padded = URL_SAFE_NO_PAD.encode([&[0u8][..], &[0xC5; 256]].concat());
        assert!(
            VerifyingKey::from_jwk(&jwk(json!({"kty": "RSA", "n": padded, "e": "AQAB"}))).is_ok()
        );
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
