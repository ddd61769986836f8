//! Verified claims: one owner for what a token says, and for which of it a cached copy keeps.
//!
//! The typed claims (`iss`, `sub`, `aud`, `exp`, `nbf`, `iat`, `jti`, `sid`) are always held.
//! Every other claim is read by name by someone: a route's scope rule, the claim headers and
//! dynamic metadata sent upstream, a rate-limit key. Each such reader declares the names it
//! reads ([`ReadsClaims`]), and the verified-token cache keeps exactly their union
//! ([`KeptClaims::union`]), so a new reader cannot forget to tell the cache.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value};

/// The claims this sidecar reads, plus the claim set read by name (header mapping, metadata,
/// scopes, rate-limit keys). A cached copy keeps only the names its readers declared
/// ([`KeptClaims`]); read them through [`Claims::value`].
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
    pub fn value(&self, name: &str) -> Option<Cow<'_, Value>> {
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

impl Claims {
    /// The claims of a token's payload object. `Err` when a claim this sidecar reads has the
    /// wrong type (`sub` a number, `exp` a string, `aud` a list of numbers).
    pub fn from_object(all: Map<String, Value>) -> Result<Self, WrongType> {
        Ok(Claims {
            iss: string_claim(&all, "iss")?.map(Arc::from),
            sub: string_claim(&all, "sub")?.map(Box::from),
            aud: match all.get("aud") {
                None | Some(Value::Null) => Box::default(),
                Some(Value::String(one)) => Box::new([Box::from(one.as_str())]),
                Some(Value::Array(many)) => many
                    .iter()
                    .map(|v| v.as_str().map(Box::from).ok_or(WrongType))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(WrongType),
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

fn string_claim<'a>(all: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, WrongType> {
    match all.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(WrongType),
    }
}

/// NumericDate (RFC 7519 2): seconds, possibly fractional; fractions are truncated.
fn time_claim(all: &Map<String, Value>, name: &str) -> Result<Option<i64>, WrongType> {
    match all.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or(WrongType),
        Some(_) => Err(WrongType),
    }
}

/// The claims scopes are read from, alike: `scope` (space-separated, RFC 8693 and RFC 9068),
/// `scp` and `scopes` (a list, or a space-separated string, as Envoy's `jwt_authn` and several
/// IdPs write them). Each may be a string or a list of strings; the scopes are all of them.
pub const SCOPE_CLAIMS: [&str; 3] = ["scope", "scp", "scopes"];

impl Claims {
    /// Every scope the token grants, from [`SCOPE_CLAIMS`].
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        SCOPE_CLAIMS
            .iter()
            .filter_map(|name| self.all.get(name))
            .flat_map(|value| {
                let (spaced, listed) = match value {
                    Value::String(s) => (s.as_str(), &[][..]),
                    Value::Array(items) => ("", items.as_slice()),
                    _ => ("", &[][..]),
                };
                spaced
                    .split_whitespace()
                    .chain(listed.iter().filter_map(Value::as_str))
            })
    }
}

/// A claim this sidecar reads has the wrong JSON type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrongType;

/// Something that reads claims by name, and says which: the cache keeps what readers declare.
pub trait ReadsClaims {
    fn claims_read(&self) -> KeptClaims;
}

/// Which claims a cached token keeps by name, besides its typed fields: the ones its readers
/// declared (dynamic metadata, claim headers, scopes, rate-limit keys). Keeping only those took
/// a cached token from ~1.8 KiB to about half (BENCHMARKS.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeptClaims {
    /// Every claim (`DYNAMIC_METADATA_CLAIMS=*`).
    All,
    Named(HashSet<String>),
}

impl KeptClaims {
    /// The cached copy of verified claims: typed fields as they are, named claims only where
    /// kept and not already typed ([`Claims::value`] rebuilds those), and `iss` pointing at
    /// the issuer's own copy of the same name.
    pub fn compact(&self, claims: &Claims, issuer: &Arc<str>) -> Claims {
        let all = match self {
            KeptClaims::All => claims.all.clone(),
            KeptClaims::Named(names) => claims
                .all
                .only(|name| names.contains(name) && !TYPED_STRING_CLAIMS.contains(&name)),
        };
        let iss = match &claims.iss {
            Some(iss) if **iss == **issuer => Some(issuer.clone()),
            other => other.clone(),
        };
        // Field by field: `..claims.clone()` would copy every claim by name only to drop it.
        Claims {
            iss,
            sub: claims.sub.clone(),
            aud: claims.aud.clone(),
            exp: claims.exp,
            nbf: claims.nbf,
            iat: claims.iat,
            jti: claims.jti.clone(),
            sid: claims.sid.clone(),
            all,
        }
    }
}

impl KeptClaims {
    /// Nothing by name (the typed claims are always kept).
    pub fn none() -> Self {
        KeptClaims::Named(HashSet::new())
    }

    /// What every one of `readers` reads.
    pub fn union<'r>(readers: impl IntoIterator<Item = &'r dyn ReadsClaims>) -> Self {
        readers
            .into_iter()
            .fold(KeptClaims::none(), |kept, reader| {
                match (kept, reader.claims_read()) {
                    (KeptClaims::Named(mut mine), KeptClaims::Named(theirs)) => {
                        mine.extend(theirs);
                        KeptClaims::Named(mine)
                    }
                    _ => KeptClaims::All,
                }
            })
    }

    /// Whether a claim of this name is kept.
    pub fn keeps(&self, name: &str) -> bool {
        match self {
            KeptClaims::All => true,
            KeptClaims::Named(names) => names.contains(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Reads(KeptClaims);

    impl ReadsClaims for Reads {
        fn claims_read(&self) -> KeptClaims {
            self.0.clone()
        }
    }

    fn named(names: &[&str]) -> KeptClaims {
        KeptClaims::Named(names.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn the_cache_keeps_what_every_reader_declared() {
        let (a, b) = (Reads(named(&["email"])), Reads(named(&["scope", "tenant"])));
        let kept = KeptClaims::union([&a as &dyn ReadsClaims, &b]);
        assert_eq!(kept, named(&["email", "scope", "tenant"]));
        let all = Reads(KeptClaims::All);
        assert_eq!(
            KeptClaims::union([&a as &dyn ReadsClaims, &all]),
            KeptClaims::All
        );
        assert_eq!(KeptClaims::union([]), KeptClaims::none());
    }

    #[test]
    fn scopes_come_from_scope_and_scp_alike() {
        let claims = |all: Value| Claims {
            all: all.as_object().unwrap().clone().into(),
            ..Claims::default()
        };
        let granted = |all: Value| claims(all).scopes().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(granted(json!({"scope": " a  b "})), ["a", "b"]);
        assert_eq!(granted(json!({"scp": ["a", 7, "b"]})), ["a", "b"]);
        assert_eq!(
            granted(json!({"scope": "a", "scp": "b c"})),
            ["a", "b", "c"]
        );
        assert_eq!(granted(json!({"scopes": ["a", "b"]})), ["a", "b"]);
        assert_eq!(granted(json!({"scopes": "a b"})), ["a", "b"]);
        assert_eq!(
            granted(json!({"scope": "a", "scp": ["b"], "scopes": "c"})),
            ["a", "b", "c"]
        );
        assert!(granted(json!({"scope": 5})).is_empty());
    }
}
