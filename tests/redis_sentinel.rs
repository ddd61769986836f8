//! The Redis backend behind Sentinel (`redis-sentinel://`): one master, one replica and three
//! sentinels, all real. Lookups and `revoke` go to whichever node the sentinels name, and when
//! the master is killed under load the sidecar follows the promotion by itself: every Check is
//! answered within a bound set by the lookup timeout, the ones that cannot be decided meanwhile
//! are the failure policy's 503s, and afterwards Checks are allowed, revocations written to the
//! new master are enforced and the revocation cache is live again.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use authz_sidecar::pb::envoy::service::auth::v3::CheckRequest;
use authz_sidecar::tools::devkeys::SigningKey;
use authz_sidecar::tools::loadgen::{Target, closed_loop};
use common::topology::Sentinels;
use common::*;
use jsonwebtoken::Algorithm;

/// The lookup budget the sidecars here run with, and the bound every answer must meet: fifteen
/// budgets, generous for a debug build on two shared cores (faults.rs uses the same).
const LOOKUP_TIMEOUT: &str = "50ms";
const ANSWER_BOUND: Duration = Duration::from_millis(750);

struct Fixture {
    sentinels: Sentinels,
    jwks: JwksServer,
    key: SigningKey,
}

impl Fixture {
    async fn new() -> Fixture {
        let sentinels = tokio::task::spawn_blocking(Sentinels::start).await.unwrap();
        let key = key(Algorithm::ES256, "sentinel-1");
        Fixture {
            sentinels,
            jwks: JwksServer::start(&[&key]).await,
            key,
        }
    }

    /// A sidecar on the sentinel URL (revocation cache on, failing closed: the defaults),
    /// once its cache is live.
    async fn sidecar(&self) -> Sidecar {
        let url = self.sentinels.url();
        let flags = [
            "--revocation-backend",
            "redis",
            "--redis-url",
            &url,
            "--redis-lookup-timeout",
            LOOKUP_TIMEOUT,
        ];
        let sidecar = start_sidecar(config(&["--jwks-url", &self.jwks.jwks_url()], &flags)).await;
        assert!(
            http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(10)).await,
            "ready"
        );
        assert!(
            cache_live_within(&sidecar, Duration::from_secs(15)).await,
            "the revocation cache turns live through the sentinel URL"
        );
        sidecar
    }

    fn token(&self, jti: &str) -> String {
        let mut claims = valid_claims();
        claims["jti"] = jti.into();
        self.key.sign(&claims).unwrap()
    }

    /// `authz-sidecar revoke jti <jti>` on the sentinel URL, through the real binary.
    async fn revoke(&self, jti: &str) -> String {
        let url = self.sentinels.url();
        let exp = (now() + 300).to_string();
        let jti = jti.to_owned();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
                .env_clear()
                .env("REVOCATION_BACKEND", "redis")
                .env("REDIS_URL", url)
                .env("JWT_ISSUER", ISSUER)
                .args(["revoke", "jti", &jti, "--exp", &exp])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "revoke: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

/// Whether Checks with `token` are denied as `reason` within a second.
async fn denied_soon(sidecar: &Sidecar, token: &str, reason: &str) -> bool {
    eventually(Duration::from_secs(1), || async {
        sidecar.reason(token).await == reason
    })
    .await
}

/// `ext_authz_requests_total` by `result,reason`, from one scrape.
fn checks_by_outcome(scrape: &str) -> HashMap<String, f64> {
    scrape
        .lines()
        .filter_map(|line| {
            let labels = line.strip_prefix("ext_authz_requests_total{")?;
            let (labels, value) = labels.split_once("} ")?;
            Some((labels.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_and_revoke_go_to_the_master_the_sentinels_name() {
    let f = Fixture::new().await;
    let sidecar = f.sidecar().await;
    let token = f.token("sentinel-a");
    for _ in 0..3 {
        assert!(sidecar.allows(&token).await, "not revoked, then cached");
    }

    assert_eq!(f.revoke("sentinel-a").await, "revoked 1");
    assert!(
        denied_soon(&sidecar, &token, "revoked").await,
        "the revocation written through the sentinels is enforced"
    );
    let (master, replica) = (f.sentinels.master(), f.sentinels.replica());
    assert_eq!(master, f.sentinels.data[0].port, "no failover happened");
    assert_eq!(
        f.sentinels.cli(master, &["GET", "revoked:jti:sentinel-a"]),
        "1",
        "written to the master"
    );
    let replicated = eventually(Duration::from_secs(5), || async {
        f.sentinels.cli(replica, &["GET", "revoked:jti:sentinel-a"]) == "1"
    })
    .await;
    assert!(replicated, "and replicated");
    assert!(
        sidecar.allows(&f.token("sentinel-b")).await,
        "other tokens are still allowed"
    );
    sidecar.shutdown().await;
}

/// What the closed loop saw while the master was killed and the replica promoted.
#[derive(Default)]
struct Totals {
    sent: u64,
    allowed: u64,
    denied: u64,
    errors: u64,
    slowest: Duration,
    /// HTTP status code and reason of the denials seen by probe Checks between rounds.
    probe_denials: Vec<(i32, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_is_followed_to_the_promoted_replica() {
    let mut f = Fixture::new().await;
    let sidecar = Arc::new(f.sidecar().await);
    let token = f.token("steady");
    let target = Target::connect(
        &format!("http://{}", sidecar.addr),
        2,
        vec![bearer(&token)],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let healthy = closed_loop(&target, 8, Duration::from_millis(500)).await;
    assert_eq!(healthy.allowed, healthy.sent, "{}", healthy.summary());
    let before = checks_by_outcome(&sidecar.http_get("/metrics").await.1);

    // Load in short rounds until told to stop, with one probe Check between rounds whose
    // denial code is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn({
        let (target, sidecar, token) = (target.clone(), sidecar.clone(), token.clone());
        let (stop, rounds) = (stop.clone(), rounds.clone());
        async move {
            let mut totals = Totals::default();
            while !stop.load(Ordering::Acquire) {
                let report = closed_loop(&target, 8, Duration::from_millis(250)).await;
                totals.sent += report.sent;
                totals.allowed += report.allowed;
                totals.denied += report.denied;
                totals.errors += report.errors;
                totals.slowest = totals.slowest.max(report.slowest_answer());
                let probe = sidecar.check(&token).await;
                if probe.status.as_ref().is_some_and(|s| s.code != 0) {
                    let (denied, _, reason) = expect_deny(&probe);
                    let code = denied.status.as_ref().map_or(0, |s| s.code);
                    totals.probe_denials.push((code, reason.to_owned()));
                }
                rounds.fetch_add(1, Ordering::AcqRel);
            }
            totals
        }
    });
    // The cache's live gauge, sampled every 20 ms from the scrape for the whole switch.
    let watch = tokio::spawn({
        let (sidecar, stop) = (sidecar.clone(), stop.clone());
        async move {
            let mut samples = vec![];
            while !stop.load(Ordering::Acquire) {
                let live = revocation_cache_live(&sidecar).await;
                if samples.last() != Some(&live) {
                    samples.push(live);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            rounds.load(Ordering::Acquire) >= 2
        })
        .await
    );

    let killed_at = Instant::now();
    let old = f.sentinels.kill_master();
    let sentinels = &f.sentinels;
    let new = tokio::task::block_in_place(|| sentinels.wait_for_new_master(SETTLE));
    let promoted = killed_at.elapsed();
    let recovered = eventually(SETTLE, || async {
        let report = closed_loop(&target, 4, Duration::from_millis(200)).await;
        report.sent > 0 && report.allowed == report.sent
    })
    .await;
    let allowed_again = killed_at.elapsed();
    stop.store(true, Ordering::Release);
    let totals = load.await.unwrap();
    let live_samples = watch.await.unwrap();
    let after = checks_by_outcome(&sidecar.http_get("/metrics").await.1);
    eprintln!(
        "master {old} killed; {new} promoted after {promoted:?}; Checks allowed again after \
         {allowed_again:?}; during: sent {}, allowed {}, denied {}, errors {}, slowest {:?}; \
         probe denials {:?}; cache live samples {live_samples:?}",
        totals.sent,
        totals.allowed,
        totals.denied,
        totals.errors,
        totals.slowest,
        totals.probe_denials
    );

    assert!(recovered, "Checks are allowed again after the promotion");
    assert_ne!(new, old);
    assert_eq!(totals.errors, 0, "every Check was answered (none hung)");
    assert!(
        totals.slowest < ANSWER_BOUND,
        "every answer within {ANSWER_BOUND:?} (lookup timeout {LOOKUP_TIMEOUT}): slowest {:?}",
        totals.slowest
    );
    assert!(
        totals.denied > 0,
        "with no master the lookups fail, and fail closed"
    );
    // Every denial of the switch is the failure policy's, counted as such: nothing else.
    let delta = |labels: &str| {
        after.get(labels).copied().unwrap_or(0.0) - before.get(labels).copied().unwrap_or(0.0)
    };
    let unavailable = delta(r#"result="error",reason="revocation_unavailable""#);
    let other_denials: f64 = after
        .keys()
        .filter(|labels| !labels.starts_with(r#"result="allow""#))
        .filter(|labels| !labels.contains("revocation_unavailable"))
        .map(|labels| delta(labels))
        .sum();
    assert_eq!(other_denials, 0.0, "{after:?}");
    assert!(
        unavailable >= totals.denied as f64,
        "the load's {} denials are all revocation_unavailable ({unavailable})",
        totals.denied
    );
    assert!(
        totals
            .probe_denials
            .iter()
            .all(|(code, reason)| *code == 503 && reason == "revocation_unavailable"),
        "fail closed answers 503 revocation_unavailable: {:?}",
        totals.probe_denials
    );

    // The cache went dark when the master died and came back live on the new one.
    assert!(
        live_samples.windows(3).any(|w| w == [1.0, 0.0, 1.0]),
        "the cache gauge went 1 -> 0 -> 1: {live_samples:?}"
    );
    assert!(cache_live_within(&sidecar, Duration::from_secs(15)).await);

    // Revocations written to the new master are enforced: through the sentinels by the CLI,
    // and by another writer straight on the new master (its push reaches the cache).
    let by_cli = f.token("after-failover-cli");
    assert!(sidecar.allows(&by_cli).await);
    assert_eq!(f.revoke("after-failover-cli").await, "revoked 1");
    assert_eq!(
        f.sentinels
            .cli(new, &["GET", "revoked:jti:after-failover-cli"]),
        "1",
        "the CLI wrote to the promoted master"
    );
    assert!(denied_soon(&sidecar, &by_cli, "revoked").await);

    let by_other = f.token("after-failover-set");
    for _ in 0..3 {
        assert!(sidecar.allows(&by_other).await, "cached as not revoked");
    }
    let invalidations = metric_value(
        &sidecar.http_get("/metrics").await.1,
        "ext_authz_revocation_cache_invalidations_total",
    );
    f.sentinels.cli(
        new,
        &["SET", "revoked:jti:after-failover-set", "1", "EX", "300"],
    );
    assert!(denied_soon(&sidecar, &by_other, "revoked").await);
    assert!(
        metric_value(
            &sidecar.http_get("/metrics").await.1,
            "ext_authz_revocation_cache_invalidations_total",
        ) > invalidations,
        "the new master pushes invalidations to the cache"
    );
    drop(target);
    Arc::into_inner(sidecar)
        .expect("the load has stopped")
        .shutdown()
        .await;
}

/// Long enough for a failover and a reconnect on a loaded machine (one takes 2-5 s here).
const SETTLE: Duration = Duration::from_secs(30);

fn bearer(token: &str) -> CheckRequest {
    check_request(&[("authorization", &format!("Bearer {token}"))])
}
