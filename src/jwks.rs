//! Signing keys per issuer: fetched from a URL, a file or OIDC discovery, cached, refreshed in
//! the background, refetched on an unknown `kid`, and served stale while the issuer is down.
//!
//! Rules that keep a bad key source from hurting traffic:
//! - a document that is garbage, too large or holds no usable key never replaces good keys;
//! - every fetch (background or on demand) goes through one async mutex per issuer, so an
//!   unknown-`kid` flood costs at most one fetch per `JWKS_MIN_REFRESH_INTERVAL`;
//! - an on-demand fetch runs in a task of its own that also stores what it fetched, so a Check
//!   that gives up (its deadline passed) neither aborts it nor throws its keys away;
//! - keys are "confirmed" only by the source holding the same good document again (a file is
//!   compared by content): a source that breaks lets the keys age, so `JWKS_MAX_STALE` applies;
//! - keys older than `JWKS_MAX_STALE` are no longer used and Checks fail as unavailable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::keys::{ASYMMETRIC_ALGORITHMS, VerifyingKey};
use crate::metrics::{JwksMetrics, RefreshOutcome};
use crate::throttle::LogThrottle;
use crate::token_cache;

/// Largest JWKS or discovery document read, in bytes. Real key sets are a few KiB.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Keys one document may hold: issuers publish a handful; thousands would make every refresh
/// (and an attacker-provoked unknown-kid refetch) parse and index that many.
pub const MAX_KEYS: usize = 100;

/// Timing knobs shared by every issuer's key source.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// Refresh period when the response has no `Cache-Control: max-age`; also its upper bound.
    pub refresh_interval: Duration,
    /// Lower bound on the time between two fetches of one issuer's keys, whatever asks for them.
    pub min_refresh_interval: Duration,
    /// How long the last good keys keep serving when refreshes fail.
    pub max_stale: Duration,
    /// Whole-request timeout of one JWKS or discovery fetch.
    pub fetch_timeout: Duration,
    /// How often a `JWKS_FILE` is checked for changes.
    pub file_poll_interval: Duration,
    /// `JWKS_ALLOW_HTTP`: plaintext `http://` key sources beyond loopback are allowed.
    pub allow_http: bool,
}

/// Why a key source URL may not be used: `None` when it may. Plaintext `http://` lets anyone on
/// the path replace the keys, so it is allowed only to loopback (a same-host IdP, tests) unless
/// `JWKS_ALLOW_HTTP` says otherwise.
pub fn insecure_url(url: &reqwest::Url, allow_http: bool) -> Option<String> {
    match url.scheme() {
        "https" => None,
        "http" if allow_http || is_loopback(url) => None,
        "http" => Some(format!(
            "{url} is plaintext http to a host that is not loopback: use https, or set \
             JWKS_ALLOW_HTTP=true"
        )),
        other => Some(format!("{url}: scheme {other:?} is not http or https")),
    }
}

/// `localhost` or a loopback address.
pub fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a key fetch may follow a redirect from `from` to `to`: never from https down to
/// http (that would undo the https the operator configured), never to a URL a configured
/// source could not name, and at most 10 hops.
pub fn redirect_refused(
    from: &reqwest::Url,
    to: &reqwest::Url,
    hops: usize,
    allow_http: bool,
) -> Option<String> {
    if hops > 10 {
        return Some("more than 10 redirects".into());
    }
    if from.scheme() == "https" && to.scheme() != "https" {
        return Some(format!("redirect from {from} down to {to} refused"));
    }
    insecure_url(to, allow_http).map(|why| format!("redirect refused: {why}"))
}

/// The redirect policy of the JWKS HTTP client (see [`redirect_refused`]).
pub fn redirect_policy(allow_http: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let hops = attempt.previous().len();
        let refused = attempt
            .previous()
            .last()
            .and_then(|from| redirect_refused(from, attempt.url(), hops, allow_http));
        match refused {
            Some(why) => attempt.error(why),
            None => attempt.follow(),
        }
    })
}

impl JwksSettings {
    /// `JWKS_MIN_REFRESH_INTERVAL`: 0 is refused, since every token with an unknown kid could
    /// then fetch the issuer's JWKS (a flood of forged tokens becomes a flood on the IdP).
    pub fn parse_min_refresh_interval(value: &str) -> Result<Duration, String> {
        let interval = crate::config::parse::duration(value)?;
        if interval.is_zero() {
            return Err(
                "0 lets every token with an unknown kid fetch the issuer's JWKS, so a \
                 flood of forged tokens becomes a flood on the IdP; use 1s or more"
                    .into(),
            );
        }
        Ok(interval)
    }

    /// What these settings weaken on purpose, for the startup log.
    pub fn warnings(&self) -> Vec<String> {
        let interval = self.min_refresh_interval;
        let mut warnings = Vec::new();
        if !interval.is_zero() && interval < Duration::from_secs(1) {
            warnings.push(format!(
                "JWKS_MIN_REFRESH_INTERVAL={interval:?}: tokens with unknown kids may fetch each \
                 issuer's JWKS up to {} times a second (meant for tests; use 1s or more)",
                (1.0 / interval.as_secs_f64()).round()
            ));
        }
        warnings
    }
}

/// One trusted issuer: its name, accepted audiences and key source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    pub issuer: String,
    /// Accepted audiences; empty means `aud` is not checked for this issuer.
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    Url(String),
    File(PathBuf),
    /// `<issuer>/.well-known/openid-configuration` names the `jwks_uri`.
    Discovery,
}

/// Why a key lookup found nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// Keys are loaded and fresh enough, but none matches the token's `kid` and `alg`.
    UnknownKid,
    /// No usable keys: never loaded, or older than `JWKS_MAX_STALE`.
    Unavailable,
}

/// Why a fetch did not produce a key set. The old keys stay in place.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Http(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("document larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("not a JWKS document: {0}")]
    NotJwks(String),
    #[error("{0} keys in the document, more than {MAX_KEYS}")]
    TooManyKeys(usize),
    #[error("no usable signing key in the document ({0} rejected)")]
    NoUsableKeys(usize),
    #[error("discovery document has no usable jwks_uri: {0}")]
    Discovery(String),
    #[error("cannot read file: {0}")]
    Io(String),
}

/// An immutable set of verifying keys, swapped whole on refresh.
#[derive(Debug, Default)]
pub struct KeySet {
    /// Every key under each `kid`, in document order: RFC 7517 lets keys of different types
    /// share a `kid` (an RSA and an EC key during a migration), and the token's `alg` picks.
    by_kid: HashMap<String, Vec<Arc<VerifyingKey>>>,
    without_kid: Vec<Arc<VerifyingKey>>,
}

impl KeySet {
    /// Parses a JWKS document. Keys that cannot be used are skipped with a warning; a document
    /// with no usable key at all is an error, so it can never replace a good set.
    pub fn parse(document: &[u8]) -> Result<Self, FetchError> {
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<Value>,
        }
        let doc: Document =
            serde_json::from_slice(document).map_err(|e| FetchError::NotJwks(e.to_string()))?;
        if doc.keys.len() > MAX_KEYS {
            return Err(FetchError::TooManyKeys(doc.keys.len()));
        }
        let mut set = KeySet::default();
        let mut rejected = 0;
        for raw in doc.keys {
            let kid = raw.get("kid").and_then(Value::as_str).map(str::to_owned);
            let key = serde_json::from_value::<Jwk>(raw)
                .map_err(|e| e.to_string())
                .and_then(|jwk| VerifyingKey::from_jwk(&jwk).map_err(|e| e.to_string()));
            match (key, kid) {
                (Ok(key), Some(kid)) => {
                    let same_kid = set.by_kid.entry(kid).or_default();
                    if let Some(alg) = ASYMMETRIC_ALGORITHMS
                        .into_iter()
                        .find(|alg| key.accepts(*alg) && same_kid.iter().any(|k| k.accepts(*alg)))
                    {
                        warn!(
                            kid = key.kid().unwrap_or("-"),
                            ?alg,
                            "JWKS has two keys with this kid for the same algorithm; the first is used"
                        );
                    }
                    same_kid.push(Arc::new(key));
                }
                (Ok(key), None) => set.without_kid.push(Arc::new(key)),
                (Err(why), kid) => {
                    rejected += 1;
                    warn!(kid = kid.as_deref().unwrap_or("-"), %why, "skipping JWKS key");
                }
            }
        }
        if set.is_empty() {
            return Err(FetchError::NoUsableKeys(rejected));
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.by_kid.values().map(Vec::len).sum::<usize>() + self.without_kid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key for a token's `kid` and `alg`: of the keys under that `kid`, the first that may
    /// verify `alg`, else the first (a known `kid` with the wrong `alg` is then refused as a
    /// disallowed algorithm, without a refetch). A token without `kid` is accepted only when
    /// exactly one key in the set can verify its algorithm, so the choice is never ambiguous.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<VerifyingKey>> {
        match kid {
            Some(kid) => {
                let keys = self.by_kid.get(kid)?;
                keys.iter()
                    .find(|k| k.accepts(alg))
                    .or(keys.first())
                    .cloned()
            }
            None => {
                let mut candidates = self
                    .by_kid
                    .values()
                    .flatten()
                    .chain(&self.without_kid)
                    .filter(|k| k.accepts(alg));
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(only.clone()),
                    _ => None,
                }
            }
        }
    }
}

#[derive(Debug)]
struct Loaded {
    keys: Arc<KeySet>,
    /// SHA-256 of the document the keys came from: an identical document keeps these key
    /// objects, so verified-token cache entries (which hold them) stay valid.
    document: [u8; 32],
    /// Last time the source confirmed these keys (a fetch or an unchanged file).
    confirmed_at: Instant,
}

/// Where the source was last seen, to skip work that would change nothing.
#[derive(Debug, Default)]
struct SourceState {
    /// The `jwks_uri` from discovery; cleared after a failed fetch so it is looked up again.
    discovered_jwks_uri: Option<String>,
}

/// One issuer's keys and the machinery that keeps them fresh.
pub struct IssuerKeys {
    /// Shared: every cached token of this issuer points at this one copy.
    issuer: Arc<str>,
    source: JwksSource,
    settings: JwksSettings,
    http: reqwest::Client,
    /// Read on every Check; a std lock because it is held only to clone an Arc, never across
    /// an await.
    loaded: RwLock<Option<Loaded>>,
    /// Single flight: whoever holds it is the only one fetching for this issuer. A tokio lock
    /// on purpose: the holder awaits the fetch, and the others wait for its result. In an Arc
    /// so an on-demand fetch's own task can hold it past the Check that started it.
    fetch_gate: Arc<tokio::sync::Mutex<FetchGate>>,
    /// A std lock: only the refresh path touches it, for a few field updates, no await.
    source_state: Mutex<SourceState>,
    metrics: Option<JwksMetrics>,
    /// A broken source fails on every attempt (a file on every poll): one warning a minute.
    failure_warnings: LogThrottle,
}

#[derive(Debug, Default)]
struct FetchGate {
    last_attempt: Option<Instant>,
    consecutive_failures: u32,
}

/// What one fetch produced.
enum Fetched {
    Keys {
        keys: KeySet,
        max_age: Option<Duration>,
        /// SHA-256 of the document.
        document: [u8; 32],
    },
    /// A file source that still holds the document in force.
    Unchanged,
}

impl IssuerKeys {
    pub fn new(
        issuer: String,
        source: JwksSource,
        settings: JwksSettings,
        http: reqwest::Client,
        metrics: Option<JwksMetrics>,
    ) -> Arc<Self> {
        Arc::new(IssuerKeys {
            issuer: issuer.into(),
            source,
            settings,
            http,
            loaded: RwLock::new(None),
            fetch_gate: Arc::new(tokio::sync::Mutex::new(FetchGate::default())),
            source_state: Mutex::new(SourceState::default()),
            metrics,
            failure_warnings: LogThrottle::new(Duration::from_secs(60)),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The issuer's name as a shared string, for cached claims to point at.
    pub fn shared_issuer(&self) -> &Arc<str> {
        &self.issuer
    }

    /// The current keys, unless they were never loaded or are older than `max_stale`.
    pub fn usable(&self) -> Option<Arc<KeySet>> {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        loaded
            .as_ref()
            .filter(|l| l.confirmed_at.elapsed() <= self.settings.max_stale)
            .map(|l| l.keys.clone())
    }

    /// The key for a token, refetching once (shared with every concurrent caller, and at most
    /// once per `min_refresh_interval`) when the `kid` is not known yet.
    pub async fn key_for(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<VerifyingKey>, LookupError> {
        if let Some(key) = self.usable().and_then(|set| set.find(kid, alg)) {
            return Ok(key);
        }
        let mut gate = self.fetch_gate.clone().lock_owned().await;
        // Whoever held the gate before us may have just loaded the key.
        if let Some(key) = self.usable().and_then(|set| set.find(kid, alg)) {
            return Ok(key);
        }
        let fetched_recently = gate
            .last_attempt
            .is_some_and(|at| at.elapsed() < self.settings.min_refresh_interval);
        if !fetched_recently {
            debug!(issuer = %self.issuer, kid = kid.unwrap_or("-"), "unknown kid: refetching keys");
            // The fetch and the storing of its keys run in a task that holds the gate: if this
            // Check is dropped (its deadline passed while a cold IdP answers), the keys still
            // land, and the next Check finds them instead of waiting out the interval.
            let this = self.clone();
            let refreshed = tokio::spawn(async move {
                this.refresh(&mut gate).await;
            });
            let _ = refreshed.await;
        } else {
            drop(gate);
        }
        match self.usable() {
            None => Err(LookupError::Unavailable),
            Some(set) => set.find(kid, alg).ok_or(LookupError::UnknownKid),
        }
    }

    /// Keeps the keys fresh until the task is aborted: the first fetch happens at once.
    pub async fn refresh_forever(self: Arc<Self>) {
        loop {
            let next = {
                let mut gate = self.fetch_gate.lock().await;
                self.refresh(&mut gate).await
            };
            tokio::time::sleep(next).await;
        }
    }

    /// Fetches once and stores the outcome (the caller holds the gate, in a task nobody
    /// cancels but shutdown), and returns the delay until the next refresh.
    async fn refresh(&self, gate: &mut FetchGate) -> Duration {
        gate.last_attempt = Some(Instant::now());
        match self.fetch().await {
            Ok(Fetched::Keys {
                max_age, document, ..
            }) if self.document() == Some(document) => {
                gate.consecutive_failures = 0;
                self.record(RefreshOutcome::Unchanged, None);
                self.store(None);
                self.next_refresh(max_age)
            }
            Ok(Fetched::Keys {
                keys,
                max_age,
                document,
            }) => {
                gate.consecutive_failures = 0;
                self.record(RefreshOutcome::Updated, Some(keys.len()));
                info!(issuer = %self.issuer, keys = keys.len(), "loaded signing keys");
                self.store(Some((Arc::new(keys), document)));
                self.next_refresh(max_age)
            }
            Ok(Fetched::Unchanged) => {
                gate.consecutive_failures = 0;
                self.record(RefreshOutcome::Unchanged, None);
                self.store(None);
                self.next_refresh(None)
            }
            Err(error) => {
                gate.consecutive_failures = gate.consecutive_failures.saturating_add(1);
                self.record(RefreshOutcome::Failed, None);
                if let Some(held_back) = self.failure_warnings.allow() {
                    let serving = self.usable().map_or(0, |set| set.len());
                    let age = self.age().map(|age| age.as_secs());
                    warn!(issuer = %self.issuer, %error, serving_keys = serving,
                        confirmed_secs_ago = age, max_stale_secs = self.settings.max_stale.as_secs(),
                        held_back, "JWKS refresh failed; the last good keys serve until JWKS_MAX_STALE");
                }
                self.retry_delay(gate.consecutive_failures)
            }
        }
    }

    fn record(&self, outcome: RefreshOutcome, keys: Option<usize>) {
        if let Some(metrics) = &self.metrics {
            metrics.refreshed(outcome);
            if let Some(keys) = keys {
                metrics.keys.set(keys as f64);
            }
        }
    }

    /// How long ago the source last confirmed the keys; `None` if they were never loaded.
    pub fn age(&self) -> Option<Duration> {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        loaded.as_ref().map(|l| l.confirmed_at.elapsed())
    }

    /// Updates the gauges that are derived from time (called when metrics are scraped).
    pub fn publish_age(&self) {
        if let (Some(metrics), Some(age)) = (&self.metrics, self.age()) {
            metrics.seconds_since_refresh.set(age.as_secs_f64());
        }
    }

    fn document(&self) -> Option<[u8; 32]> {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        loaded.as_ref().map(|l| l.document)
    }

    /// Installs new keys, or with `None` confirms the current ones are still what the source has.
    fn store(&self, keys: Option<(Arc<KeySet>, [u8; 32])>) {
        let mut loaded = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        let (keys, document) = match (keys, loaded.take()) {
            (Some(new), _) => new,
            (None, Some(old)) => (old.keys, old.document),
            (None, None) => return,
        };
        *loaded = Some(Loaded {
            keys,
            document,
            confirmed_at: Instant::now(),
        });
    }

    fn next_refresh(&self, max_age: Option<Duration>) -> Duration {
        match self.source {
            JwksSource::File(_) => self.settings.file_poll_interval,
            _ => refresh_delay(max_age, &self.settings),
        }
    }

    fn retry_delay(&self, failures: u32) -> Duration {
        let floor = self
            .settings
            .min_refresh_interval
            .max(Duration::from_millis(100));
        let backoff = floor.saturating_mul(1u32 << failures.min(16).saturating_sub(1));
        match self.source {
            JwksSource::File(_) => self.settings.file_poll_interval,
            _ => backoff.min(self.settings.refresh_interval),
        }
    }

    async fn fetch(&self) -> Result<Fetched, FetchError> {
        match &self.source {
            JwksSource::Url(url) => self.fetch_url(url).await,
            JwksSource::File(path) => self.read_file(path).await,
            JwksSource::Discovery => {
                let cached = self.source_state().discovered_jwks_uri.clone();
                let url = match cached {
                    Some(url) => url,
                    None => self.discover().await?,
                };
                let fetched = self.fetch_url(&url).await;
                self.source_state().discovered_jwks_uri = fetched.is_ok().then_some(url);
                fetched
            }
        }
    }

    fn source_state(&self) -> std::sync::MutexGuard<'_, SourceState> {
        self.source_state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn fetch_url(&self, url: &str) -> Result<Fetched, FetchError> {
        let (body, max_age) = self.get(url).await?;
        Ok(Fetched::Keys {
            keys: KeySet::parse(&body)?,
            max_age,
            document: token_cache::digest_bytes(&body),
        })
    }

    async fn discover(&self) -> Result<String, FetchError> {
        #[derive(Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let url = discovery_url(&self.issuer);
        let (body, _) = self.get(&url).await?;
        let doc: Discovery =
            serde_json::from_slice(&body).map_err(|e| FetchError::Discovery(e.to_string()))?;
        let jwks_uri = reqwest::Url::parse(&doc.jwks_uri)
            .map_err(|e| FetchError::Discovery(format!("{:?}: {e}", doc.jwks_uri)))?;
        if let Some(why) = insecure_url(&jwks_uri, self.settings.allow_http) {
            return Err(FetchError::Discovery(why));
        }
        info!(issuer = %self.issuer, jwks_uri = %doc.jwks_uri, "discovered JWKS location");
        Ok(doc.jwks_uri)
    }

    /// GET with the size cap, returning the body and any `Cache-Control: max-age`.
    async fn get(&self, url: &str) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
        let mut response = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(FetchError::TooLarge);
        }
        let max_age = response
            .headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_max_age);
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?
        {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, max_age))
    }

    /// Reads the file whole and compares its content with the document in force: the same
    /// bytes confirm the keys (without parsing them again), anything else is parsed, and a file
    /// that does not parse fails on every poll, so the keys age towards `JWKS_MAX_STALE`.
    async fn read_file(&self, path: &Path) -> Result<Fetched, FetchError> {
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| FetchError::Io(e.to_string()))?;
        if meta.len() > MAX_DOCUMENT_BYTES as u64 {
            return Err(FetchError::TooLarge);
        }
        let body = tokio::fs::read(path)
            .await
            .map_err(|e| FetchError::Io(e.to_string()))?;
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(FetchError::TooLarge);
        }
        let document = token_cache::digest_bytes(&body);
        if self.document() == Some(document) {
            return Ok(Fetched::Unchanged);
        }
        Ok(Fetched::Keys {
            keys: KeySet::parse(&body)?,
            max_age: None,
            document,
        })
    }
}

/// `https://issuer/` and `https://issuer` both discover at `https://issuer/.well-known/...`.
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// The `max-age` directive of a Cache-Control header, if any.
pub fn parse_max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("max-age") {
            return None;
        }
        value
            .trim()
            .trim_matches('"')
            .parse()
            .ok()
            .map(Duration::from_secs)
    })
}

/// When to refresh after a good fetch: the server's max-age, bounded by our min and max.
pub fn refresh_delay(max_age: Option<Duration>, settings: &JwksSettings) -> Duration {
    let wanted = max_age.unwrap_or(settings.refresh_interval);
    wanted.clamp(
        settings.min_refresh_interval.min(settings.refresh_interval),
        settings.refresh_interval,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> JwksSettings {
        JwksSettings {
            refresh_interval: Duration::from_secs(300),
            min_refresh_interval: Duration::from_secs(10),
            max_stale: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(2),
            file_poll_interval: Duration::from_secs(5),
            allow_http: false,
        }
    }

    #[test]
    fn plaintext_key_sources_only_to_loopback_and_never_down_from_https() {
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        for ok in [
            "https://idp.example/keys",
            "http://127.0.0.1:8080/keys",
            "http://127.9.9.9/keys",
            "http://[::1]/keys",
            "http://LOCALHOST/keys",
        ] {
            assert_eq!(insecure_url(&url(ok), false), None, "{ok}");
        }
        for bad in [
            "http://idp.example/keys",
            "http://10.0.0.1/keys",
            "ftp://a/keys",
        ] {
            assert!(insecure_url(&url(bad), false).is_some(), "{bad}");
        }
        assert_eq!(insecure_url(&url("http://idp.example/keys"), true), None);

        let https = url("https://idp.example/keys");
        let local_http = url("http://127.0.0.1/keys");
        let remote_http = url("http://idp.example/keys");
        for allow_http in [false, true] {
            assert!(redirect_refused(&https, &remote_http, 1, allow_http).is_some());
            assert!(redirect_refused(&https, &local_http, 1, allow_http).is_some());
            assert_eq!(redirect_refused(&https, &https, 1, allow_http), None);
        }
        assert!(redirect_refused(&local_http, &remote_http, 1, false).is_some());
        assert_eq!(redirect_refused(&local_http, &remote_http, 1, true), None);
        assert_eq!(redirect_refused(&local_http, &https, 1, false), None);
        assert!(redirect_refused(&https, &https, 11, false).is_some());
    }

    #[test]
    fn max_age_is_read_and_bounded() {
        assert_eq!(
            parse_max_age("public, max-age=120"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_max_age("Max-Age=\"7\""), Some(Duration::from_secs(7)));
        assert_eq!(parse_max_age("no-cache"), None);
        assert_eq!(parse_max_age("max-age=soon"), None);
        let s = settings();
        assert_eq!(refresh_delay(None, &s), Duration::from_secs(300));
        assert_eq!(
            refresh_delay(Some(Duration::from_secs(120)), &s),
            Duration::from_secs(120)
        );
        assert_eq!(
            refresh_delay(Some(Duration::from_secs(1)), &s),
            Duration::from_secs(10)
        );
        assert_eq!(
            refresh_delay(Some(Duration::from_secs(86400)), &s),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn discovery_url_ignores_a_trailing_slash() {
        let expected = "https://id.example/.well-known/openid-configuration";
        assert_eq!(discovery_url("https://id.example/"), expected);
        assert_eq!(discovery_url("https://id.example"), expected);
    }

    #[test]
    fn garbage_and_keyless_documents_are_errors() {
        assert!(matches!(
            KeySet::parse(b"<html>"),
            Err(FetchError::NotJwks(_))
        ));
        assert!(matches!(
            KeySet::parse(b"{\"keys\": []}"),
            Err(FetchError::NoUsableKeys(0))
        ));
        let only_bad = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}, 5]});
        let only_bad = serde_json::to_vec(&only_bad).unwrap();
        assert!(matches!(
            KeySet::parse(&only_bad),
            Err(FetchError::NoUsableKeys(2))
        ));
        let flood = json!({"keys": vec![json!({"kty": "oct"}); MAX_KEYS + 1]});
        assert!(matches!(
            KeySet::parse(&serde_json::to_vec(&flood).unwrap()),
            Err(FetchError::TooManyKeys(n)) if n == MAX_KEYS + 1
        ));
    }

    #[test]
    fn a_token_without_kid_needs_exactly_one_candidate() {
        let n = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            [0xC5u8; 256],
        );
        let one = json!({"keys": [{"kty": "RSA", "n": n, "e": "AQAB", "kid": "a"}]});
        let set = KeySet::parse(&serde_json::to_vec(&one).unwrap()).unwrap();
        assert!(set.find(None, Algorithm::RS256).is_some());
        assert!(set.find(None, Algorithm::ES256).is_none());
        assert!(set.find(Some("a"), Algorithm::RS256).is_some());
        assert!(set.find(Some("b"), Algorithm::RS256).is_none());
        let two = json!({"keys": [
            {"kty": "RSA", "n": n, "e": "AQAB", "kid": "a"},
            {"kty": "RSA", "n": n, "e": "AQAB"}
        ]});
        let set = KeySet::parse(&serde_json::to_vec(&two).unwrap()).unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.find(None, Algorithm::RS256).is_none());
    }
}
