//! Development keys and tokens, so `make run` and `make token` work on a fresh machine without
//! an identity provider. Also used by the test suite to mint tokens. Never for production keys.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The file names `dev-keys` writes into its folder.
pub const KEY_FILE: &str = "signing-key.pem";
pub const JWKS_FILE: &str = "jwks.json";
pub const REVOCATION_FILE: &str = "revoked.txt";

#[derive(Debug, thiserror::Error)]
pub enum DevKeyError {
    #[error("key generation failed for {0:?}")]
    Generate(Algorithm),
    #[error("unsupported algorithm {0:?}")]
    Unsupported(Algorithm),
    #[error("{0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A private key with its `kid`, able to sign tokens and describe its public half as a JWK.
pub struct SigningKey {
    pub alg: Algorithm,
    pub kid: String,
    pem: String,
    encoding: EncodingKey,
}

impl SigningKey {
    /// A fresh key: RSA 2048 for RS*/PS*, P-256/P-384 for ES*, Ed25519 for EdDSA.
    pub fn generate(alg: Algorithm, kid: &str) -> Result<Self, DevKeyError> {
        use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair};
        let failed = |_| DevKeyError::Generate(alg);
        let pkcs8: Vec<u8> = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => {
                let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                    .map_err(failed)?;
                pair.as_der().map_err(failed)?.as_ref().to_vec()
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                let curve = if alg == Algorithm::ES256 {
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING
                } else {
                    &signature::ECDSA_P384_SHA384_FIXED_SIGNING
                };
                let pair = EcdsaKeyPair::generate(curve).map_err(failed)?;
                pair.to_pkcs8v1().map_err(failed)?.as_ref().to_vec()
            }
            Algorithm::EdDSA => {
                let pair = Ed25519KeyPair::generate().map_err(failed)?;
                pair.to_pkcs8v1().map_err(failed)?.as_ref().to_vec()
            }
            other => return Err(DevKeyError::Unsupported(other)),
        };
        Self::from_pem(alg, kid, &pem_encode("PRIVATE KEY", &pkcs8))
    }

    /// A key from a PKCS#8 PEM.
    pub fn from_pem(alg: Algorithm, kid: &str, pem: &str) -> Result<Self, DevKeyError> {
        let encoding = match alg.family() {
            jsonwebtoken::AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pem.as_bytes())?,
            jsonwebtoken::AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem.as_bytes())?,
            jsonwebtoken::AlgorithmFamily::Ed => EncodingKey::from_ed_pem(pem.as_bytes())?,
            _ => return Err(DevKeyError::Unsupported(alg)),
        };
        Ok(SigningKey {
            alg,
            kid: kid.to_owned(),
            pem: pem.to_owned(),
            encoding,
        })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The public half as a JWK with `kid`, `use` and `alg` set.
    pub fn jwk(&self) -> Result<Value, DevKeyError> {
        let mut jwk = Jwk::from_encoding_key(&self.encoding, self.alg)?;
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        serde_json::to_value(jwk).map_err(|e| DevKeyError::Invalid(e.to_string()))
    }

    /// Signs `claims` with a standard header (`alg`, `kid`, `typ: JWT`).
    pub fn sign(&self, claims: &Value) -> Result<String, DevKeyError> {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }
}

/// A JWKS document holding the public halves of `keys`.
pub fn jwks(keys: &[&SigningKey]) -> Result<Value, DevKeyError> {
    Ok(json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Result<Vec<_>, _>>()? }))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or(""))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Random hex for `kid`s and `jti`s.
pub fn random_id() -> String {
    let mut bytes = [0u8; 12];
    // Only fails if the OS RNG is unavailable; then a time-based id is still unique enough here.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes.copy_from_slice(&nanos.to_be_bytes()[4..]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates `<dir>/signing-key.pem` (RS256), `<dir>/jwks.json` and an empty `<dir>/revoked.txt`
/// unless the key already exists. Returns whether anything was created.
pub fn write_dev_keys(dir: &Path) -> Result<bool, DevKeyError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DevKeyError::Io { path, source }
    };
    let key_path = dir.join(KEY_FILE);
    if key_path.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = SigningKey::generate(Algorithm::RS256, &format!("dev-{}", &random_id()[..8]))?;
    let jwks_path = dir.join(JWKS_FILE);
    let document = serde_json::to_string_pretty(&jwks(&[&key])?)
        .map_err(|e| DevKeyError::Invalid(e.to_string()))?;
    std::fs::write(&jwks_path, document + "\n").map_err(io(&jwks_path))?;
    let revoked = dir.join(REVOCATION_FILE);
    if !revoked.exists() {
        let header = "# Revoked tokens for the memory backend: `jti <jti>`, `sub <iss> <sub> <unix>`, `sid <iss> <sid> <unix>`\n";
        std::fs::write(&revoked, header).map_err(io(&revoked))?;
    }
    write_private(&key_path, key.pem()).map_err(io(&key_path))?;
    Ok(true)
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

/// `authz-sidecar token`: a token signed with the development key.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// Folder written by `dev-keys`.
    #[arg(long, default_value = ".dev")]
    pub dir: PathBuf,
    /// `iss` claim; use the issuer the sidecar trusts.
    #[arg(long)]
    pub issuer: String,
    /// `sub` claim.
    #[arg(long, default_value = "dev-user")]
    pub subject: String,
    /// `aud` claim; omitted when empty.
    #[arg(long, default_value = "")]
    pub audience: String,
    /// Lifetime (e.g. 15m, 1h).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Make a token that expired an hour ago.
    #[arg(long)]
    pub expired: bool,
    /// `jti` claim; random when empty.
    #[arg(long, default_value = "")]
    pub jti: String,
}

/// Mints the token `authz-sidecar token` prints.
pub fn dev_token(args: &TokenArgs) -> Result<String, DevKeyError> {
    let read = |name: &str| {
        let path = args.dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| DevKeyError::Io { path, source })
    };
    let jwks: Value = serde_json::from_str(&read(JWKS_FILE)?)
        .map_err(|e| DevKeyError::Invalid(format!("{JWKS_FILE}: {e}")))?;
    let kid = jwks["keys"][0]["kid"]
        .as_str()
        .ok_or_else(|| DevKeyError::Invalid(format!("{JWKS_FILE} has no kid")))?;
    let key = SigningKey::from_pem(Algorithm::RS256, kid, &read(KEY_FILE)?)?;
    let ttl = crate::config::parse::duration(&args.ttl).map_err(DevKeyError::Invalid)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (iat, exp) = if args.expired {
        (now - 7200, now - 3600)
    } else {
        (now, now + ttl.as_secs() as i64)
    };
    let jti = if args.jti.is_empty() {
        random_id()
    } else {
        args.jti.clone()
    };
    let mut claims =
        json!({"iss": args.issuer, "sub": args.subject, "iat": iat, "exp": exp, "jti": jti});
    if !args.audience.is_empty() {
        claims["aud"] = json!(args.audience);
    }
    key.sign(&claims)
}

/// `authz-sidecar tokens`: a mixed token set for load tests, one JSON object per line:
/// `{"token": "...", "kind": "valid|expired|bad_signature|revoked", "expect": 200|401}`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenSetArgs {
    /// Folder written by `dev-keys`.
    #[arg(long, default_value = ".dev")]
    pub dir: PathBuf,
    /// `iss` claim; use the issuer the sidecar trusts.
    #[arg(long)]
    pub issuer: String,
    /// `aud` claim; omitted when empty.
    #[arg(long, default_value = "")]
    pub audience: String,
    /// How many tokens.
    #[arg(long, default_value = "1000")]
    pub count: usize,
    /// Percentages valid,expired,bad_signature,revoked (the seed's load test: 70,10,10,10).
    #[arg(long, default_value = "70,10,10,10")]
    pub mix: String,
    /// Where to write `<jti> <exp>` lines for the revoked tokens (feed to `revoke jti --from-file`).
    #[arg(long)]
    pub revoked_out: PathBuf,
    /// Lifetime of the non-expired tokens.
    #[arg(long, default_value = "2h")]
    pub ttl: String,
}

/// Writes the token set (JSON lines) to `out` and the revoked jtis to `args.revoked_out`.
pub fn token_set(args: &TokenSetArgs, out: &mut impl std::io::Write) -> Result<usize, DevKeyError> {
    let shares: Vec<usize> = args
        .mix
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .map_err(|_| DevKeyError::Invalid(format!("--mix: {n:?} is not a number")))
        })
        .collect::<Result<_, _>>()?;
    if shares.len() != 4 || shares.iter().sum::<usize>() != 100 {
        return Err(DevKeyError::Invalid(
            "--mix takes four percentages that add up to 100".into(),
        ));
    }
    let jwks: Value = serde_json::from_str(
        &std::fs::read_to_string(args.dir.join(JWKS_FILE)).map_err(|source| DevKeyError::Io {
            path: args.dir.join(JWKS_FILE),
            source,
        })?,
    )
    .map_err(|e| DevKeyError::Invalid(format!("{JWKS_FILE}: {e}")))?;
    let kid = jwks["keys"][0]["kid"]
        .as_str()
        .ok_or_else(|| DevKeyError::Invalid("no kid".into()))?
        .to_owned();
    let pem_path = args.dir.join(KEY_FILE);
    let pem = std::fs::read_to_string(&pem_path).map_err(|source| DevKeyError::Io {
        path: pem_path,
        source,
    })?;
    let key = SigningKey::from_pem(Algorithm::RS256, &kid, &pem)?;
    // Same kid, different key: verifies as a bad signature, not an unknown kid.
    let impostor = SigningKey::generate(Algorithm::RS256, &kid)?;
    let ttl = crate::config::parse::duration(&args.ttl)
        .map_err(DevKeyError::Invalid)?
        .as_secs() as i64;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;

    let mut revoked = String::new();
    let io = |e: std::io::Error| DevKeyError::Io {
        path: PathBuf::from("<output>"),
        source: e,
    };
    for i in 0..args.count {
        // Spread the kinds evenly through the file, in the requested proportions.
        let slot = (i * 100 / args.count.max(1)) % 100;
        let kind = match slot {
            s if s < shares[0] => "valid",
            s if s < shares[0] + shares[1] => "expired",
            s if s < shares[0] + shares[1] + shares[2] => "bad_signature",
            _ => "revoked",
        };
        let jti = random_id();
        let (iat, exp) = if kind == "expired" {
            (now - 7200, now - 3600)
        } else {
            (now, now + ttl)
        };
        let mut claims = json!({"iss": args.issuer, "sub": format!("load-user-{i}"), "iat": iat, "exp": exp, "jti": jti});
        if !args.audience.is_empty() {
            claims["aud"] = json!(args.audience);
        }
        let token = if kind == "bad_signature" {
            impostor.sign(&claims)?
        } else {
            key.sign(&claims)?
        };
        if kind == "revoked" {
            revoked.push_str(&format!("{jti} {exp}\n"));
        }
        let expect = if kind == "valid" { 200 } else { 401 };
        writeln!(
            out,
            "{}",
            json!({"token": token, "kind": kind, "expect": expect})
        )
        .map_err(io)?;
    }
    std::fs::write(&args.revoked_out, revoked).map_err(|source| DevKeyError::Io {
        path: args.revoked_out.clone(),
        source,
    })?;
    Ok(args.count)
}
