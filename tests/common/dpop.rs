//! DPoP proofs (RFC 9449) built by hand (header, claims, signature), so each test can break one
//! rule: for tests/dpop.rs (the gRPC path) and tests/e2e.rs (through Envoy).

use authz_sidecar::tools::devkeys::{SigningKey, random_id};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::now;

/// The URI every request here is for, as Envoy sees it: `https`, `api.test`, `/orders`.
pub const HTU: &str = "https://api.test/orders";

/// A client's DPoP key pair.
pub struct ProofKey {
    pub alg: Algorithm,
    pub jwk: Value,
    pub encoding: EncodingKey,
}

impl ProofKey {
    pub fn new(alg: Algorithm) -> ProofKey {
        let key = SigningKey::generate(alg, "client").unwrap();
        let pem = key.pem().as_bytes();
        let encoding = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
            _ => EncodingKey::from_rsa_pem(pem),
        }
        .unwrap();
        ProofKey {
            alg,
            jwk: key.jwk().unwrap(),
            encoding,
        }
    }

    /// RFC 7638, written out here rather than taken from the crate: the required members in
    /// lexicographic order, no whitespace, SHA-256, base64url.
    pub fn thumbprint(&self) -> String {
        let j = &self.jwk;
        let canonical = match j["kty"].as_str().unwrap() {
            "EC" => format!(
                r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
                j["crv"].as_str().unwrap(),
                j["x"].as_str().unwrap(),
                j["y"].as_str().unwrap()
            ),
            "OKP" => format!(
                r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#,
                j["crv"].as_str().unwrap(),
                j["x"].as_str().unwrap()
            ),
            "RSA" => format!(
                r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                j["e"].as_str().unwrap(),
                j["n"].as_str().unwrap()
            ),
            other => panic!("{other}"),
        };
        sha256_b64(canonical.as_bytes())
    }

    /// The header of a good proof by this key.
    pub fn header(&self) -> Value {
        json!({"typ": "dpop+jwt", "alg": format!("{:?}", self.alg), "jwk": self.jwk})
    }

    /// The claims of a good proof for `GET https://api.test/orders` with this token.
    pub fn claims(token: &str) -> Value {
        json!({
            "jti": random_id(),
            "htm": "GET",
            "htu": HTU,
            "iat": now(),
            "ath": sha256_b64(token.as_bytes()),
        })
    }

    /// A proof with this header and these claims, signed by this key.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!("{}.{}", b64_json(header), b64_json(claims));
        let signature =
            jsonwebtoken::crypto::sign(input.as_bytes(), &self.encoding, self.alg).unwrap();
        format!("{input}.{signature}")
    }

    /// A good proof for `token`, after `change` to its claims.
    pub fn proof(&self, token: &str, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = Self::claims(token);
        change(&mut claims);
        self.sign(&self.header(), &claims)
    }
}

pub fn sha256_b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

pub fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

impl ProofKey {
    /// A good proof for `method` on `htu` (scheme, host and path, as Envoy will see them).
    pub fn proof_for(&self, token: &str, method: &str, htu: &str) -> String {
        self.proof(token, |claims| {
            claims["htm"] = json!(method);
            claims["htu"] = json!(htu);
        })
    }
}
