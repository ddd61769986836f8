//! The Redis backend on a real Redis Cluster (three masters, one replica each) with the default
//! `REVOKED_KEY_PREFIX`: revocations spread over the shards, a Check reads each of its keys
//! from its own shard in one parallel round, `revoke` waits for replicas when asked, and the
//! revocation cache follows a `CLUSTER FAILOVER` and a slot move under load: a revocation
//! written afterwards, to a master the sidecar never tracked before, is enforced at once.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use authz_sidecar::pb::envoy::service::auth::v3::CheckRequest;
use authz_sidecar::tools::devkeys::SigningKey;
use authz_sidecar::tools::loadgen::{Report, Target, closed_loop};
use common::topology::Cluster;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

/// Generous for a debug build on two shared cores, while other suites run (faults.rs uses the
/// same): the lookup budget is 50 ms.
const ANSWER_BOUND: Duration = Duration::from_millis(750);

struct Fixture {
    cluster: Cluster,
    jwks: JwksServer,
    key: SigningKey,
}

impl Fixture {
    async fn new() -> Fixture {
        let cluster = tokio::task::spawn_blocking(|| Cluster::start(3, 1))
            .await
            .unwrap();
        let key = key(Algorithm::ES256, "cluster-1");
        Fixture {
            cluster,
            jwks: JwksServer::start(&[&key]).await,
            key,
        }
    }

    async fn sidecar(&self, extra: &[&str]) -> Sidecar {
        let url = self.cluster.url();
        let mut flags = vec![
            "--revocation-backend",
            "redis",
            "--redis-url",
            &url,
            "--redis-lookup-timeout",
            "50ms",
        ];
        flags.extend_from_slice(extra);
        let sidecar = start_sidecar(config(&["--jwks-url", &self.jwks.jwks_url()], &flags)).await;
        assert!(
            http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(10)).await,
            "ready"
        );
        sidecar
    }

    fn token(&self, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = valid_claims();
        change(&mut claims);
        self.key.sign(&claims).unwrap()
    }

    fn token_with_jti(&self, jti: &str) -> String {
        self.token(|c| c["jti"] = json!(jti))
    }

    /// `authz-sidecar <args>` on the cluster URL through the real binary, with `env` added.
    async fn admin(&self, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"));
        command
            .env_clear()
            .env("REVOCATION_BACKEND", "redis")
            .env("REDIS_URL", self.cluster.url())
            .env("JWT_ISSUER", ISSUER)
            .args(args);
        for (name, value) in env {
            command.env(name, value);
        }
        tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap()
    }

    async fn revoke_jti(&self, jti: &str) {
        let exp = (now() + 300).to_string();
        let out = self
            .admin(&[], &["revoke", "jti", jti, "--exp", &exp])
            .await;
        assert!(
            out.status.success(),
            "revoke {jti}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Calls of `command` summed over every master (INFO commandstats).
    fn calls_on_masters(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.cluster
            .masters()
            .into_iter()
            .map(|port| {
                self.cluster
                    .cli(port, &["INFO", "commandstats"])
                    .lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .and_then(|rest| rest.split(',').next())
                    .map_or(0, |n| n.parse::<u64>().unwrap())
            })
            .sum()
    }
}

/// Whether Checks with `token` get `reason` ("" = allowed) within `within`.
async fn answers_within(sidecar: &Sidecar, token: &str, reason: &str, within: Duration) -> bool {
    eventually(within, || async { sidecar.reason(token).await == reason }).await
}

/// A jti whose revocation key lands in `slot`: a hash tag pins it there. The tag is the first
/// short string that hashes to that slot.
fn jti_in_slot(slot: u16, name: &str) -> String {
    let tag = (0..1_000_000)
        .map(|n| format!("t{n}"))
        .find(|tag| fred::util::redis_keyslot(tag.as_bytes()) == slot)
        .expect("some short tag hashes to every slot");
    format!("{{{tag}}}{name}")
}

/// Which masters have a connection with client tracking on (`flags` has `t`), for messages.
fn tracking_masters(cluster: &Cluster) -> Vec<(u16, bool)> {
    cluster
        .masters()
        .into_iter()
        .map(|port| {
            let clients = cluster.cli(port, &["CLIENT", "LIST"]);
            let tracked = clients.lines().any(|l| {
                l.split(' ')
                    .any(|f| f.starts_with("flags=") && f.contains('t'))
            });
            (port, tracked)
        })
        .collect()
}

fn bearer(token: &str) -> CheckRequest {
    check_request(&[("authorization", &format!("Bearer {token}"))])
}

/// Load on the sidecar for `duration` (from its own task) while `change` runs on this thread.
async fn under_load(target: &Arc<Target>, duration: Duration, change: impl FnOnce()) -> Report {
    let target = Arc::clone(target);
    let load = tokio::spawn(async move { closed_loop(&target, 8, duration).await });
    tokio::task::block_in_place(change);
    load.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_prefix_spreads_revocations_and_a_check_reads_each_shard_once() {
    let f = Fixture::new().await;
    // Cache off: every Check reads Redis, so the reads can be counted.
    let sidecar = f.sidecar(&["--revocation-cache-max-entries", "0"]).await;
    let token = f.token(|c| {
        c["jti"] = json!("spread-0");
        c["sid"] = json!("session-0");
    });
    let (get, mget) = (f.calls_on_masters("get"), f.calls_on_masters("mget"));
    expect_allow(&sidecar.check(&token).await);
    assert_eq!(
        f.calls_on_masters("get") - get,
        3,
        "one GET per key: jti, subject and session"
    );
    assert_eq!(
        f.calls_on_masters("mget"),
        mget,
        "no MGET: it crosses slots"
    );

    // Forty revocations in one bulk write land on every shard.
    let dir = std::env::temp_dir().join(format!("authz-cluster-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jtis.txt");
    let exp = now() + 300;
    let lines: String = (0..40).map(|i| format!("spread-{i} {exp}\n")).collect();
    std::fs::write(&file, lines).unwrap();
    let out = f
        .admin(
            &[],
            &["revoke", "jti", "--from-file", file.to_str().unwrap()],
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    for port in f.cluster.masters() {
        let keys: u64 = f.cluster.cli(port, &["DBSIZE"]).parse().unwrap();
        assert!(keys > 0, "master {port} holds none of the 40 revocations");
    }
    assert_eq!(sidecar.reason(&token).await, "revoked");
    for i in [1, 17, 39] {
        let revoked = f.token_with_jti(&format!("spread-{i}"));
        assert_eq!(sidecar.reason(&revoked).await, "revoked", "spread-{i}");
    }

    // Subject and session cut-offs, and taking one back.
    let bob = f.token(|c| c["sub"] = json!("bob"));
    let carol = f.token(|c| {
        c["sub"] = json!("carol");
        c["sid"] = json!("s-carol");
    });
    expect_allow(&sidecar.check(&bob).await);
    let at = (now() + 1).to_string();
    for args in [
        ["revoke", "sub", ISSUER, "bob", "--at", &at],
        ["revoke", "sid", ISSUER, "s-carol", "--at", &at],
    ] {
        let out = f.admin(&[], &args).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(sidecar.reason(&bob).await, "revoked_subject");
    assert_eq!(sidecar.reason(&carol).await, "revoked_session");
    let out = f.admin(&[], &["unrevoke", "sub", ISSUER, "bob"]).await;
    assert!(out.status.success());
    expect_allow(&sidecar.check(&bob).await);
    sidecar.shutdown().await;

    // The other layout: a hash tag puts a token's keys in one slot, read with one MGET.
    let tagged = f
        .sidecar(&[
            "--revocation-cache-max-entries",
            "0",
            "--revoked-key-prefix",
            "{revoked}:",
        ])
        .await;
    let dave = f.token(|c| c["sub"] = json!("dave"));
    let (get, mget) = (f.calls_on_masters("get"), f.calls_on_masters("mget"));
    expect_allow(&tagged.check(&dave).await);
    assert_eq!(f.calls_on_masters("mget") - mget, 1, "one MGET");
    assert_eq!(f.calls_on_masters("get"), get, "and no GET");
    let out = f
        .admin(
            &[("REVOKED_KEY_PREFIX", "{revoked}:")],
            &["revoke", "sub", ISSUER, "dave", "--at", &at],
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tagged.reason(&dave).await, "revoked_subject");
    tagged.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_waits_for_replicas_and_reports_partial_acknowledgement() {
    let f = Fixture::new().await;
    let exp = (now() + 300).to_string();
    let waited = f
        .admin(
            &[("REVOKE_WAIT_REPLICAS", "1")],
            &["revoke", "jti", "acked-1", "--exp", &exp],
        )
        .await;
    assert!(
        waited.status.success(),
        "every master has a replica: {}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let master = f.cluster.node_for_key("revoked:jti:acked-1");
    let replica = f.cluster.replicas_of(master)[0];
    assert_eq!(
        f.cluster.cli(replica, &["READONLY"]),
        "OK",
        "read the replica directly"
    );
    let partial = f
        .admin(
            &[
                ("REVOKE_WAIT_REPLICAS", "2"),
                ("REVOKE_WAIT_TIMEOUT", "200ms"),
            ],
            &["revoke", "jti", "acked-2", "--exp", &exp],
        )
        .await;
    let stderr = String::from_utf8_lossy(&partial.stderr);
    assert_eq!(partial.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("only 1 of 2 replica(s) acknowledged"),
        "{stderr}"
    );
    let owner = f.cluster.node_for_key("revoked:jti:acked-2");
    assert_eq!(
        f.cluster.cli(owner, &["EXISTS", "revoked:jti:acked-2"]),
        "1",
        "written all the same: running it again is safe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocation_cache_follows_a_failover_and_a_slot_move_under_load() {
    let f = Fixture::new().await;
    let sidecar = f.sidecar(&[]).await;
    assert!(
        cache_live_within(&sidecar, Duration::from_secs(15)).await,
        "tracking runs on every master"
    );
    let valid: Vec<CheckRequest> = (0..8)
        .map(|i| bearer(&f.token(|c| c["sub"] = json!(format!("user-{i}")))))
        .collect();
    let target = Arc::new(
        Target::connect(
            &format!("http://{}", sidecar.addr),
            2,
            valid,
            Duration::from_secs(5),
        )
        .await
        .unwrap(),
    );

    // Before anything moves: a revocation on each master is pushed to the cache.
    for (i, master) in f.cluster.masters().into_iter().enumerate() {
        let slot = f
            .cluster
            .view()
            .into_iter()
            .find(|n| n.port == master)
            .unwrap()
            .slots[0]
            .0;
        let jti = jti_in_slot(slot, &format!("before-{i}"));
        let token = f.token_with_jti(&jti);
        assert_eq!(sidecar.reason(&token).await, "", "allowed, and now cached");
        f.revoke_jti(&jti).await;
        assert!(
            answers_within(&sidecar, &token, "revoked", Duration::from_secs(2)).await,
            "pushed by master {master}; tracking on: {:?}",
            tracking_masters(&f.cluster)
        );
    }

    // CLUSTER FAILOVER of the master owning slot 0, under load.
    let old_master = f.cluster.masters()[0];
    let promoted = f.cluster.replicas_of(old_master)[0];
    let kept = jti_in_slot(0, "kept");
    let kept_token = f.token_with_jti(&kept);
    f.revoke_jti(&kept).await;
    assert!(answers_within(&sidecar, &kept_token, "revoked", Duration::from_secs(2)).await);
    let report = under_load(&target, Duration::from_secs(3), || {
        f.cluster.failover(promoted)
    })
    .await;
    eprintln!("during CLUSTER FAILOVER: {}", report.summary());
    assert_eq!(
        report.errors,
        0,
        "every Check answered: {}",
        report.summary()
    );
    assert!(
        report.slowest_answer() < ANSWER_BOUND,
        "within the bound: {}",
        report.summary()
    );
    assert!(
        report.allowed > 0,
        "valid tokens keep passing: {}",
        report.summary()
    );
    assert!(
        f.cluster.masters().contains(&promoted),
        "the replica took over"
    );
    assert!(
        cache_live_within(&sidecar, Duration::from_secs(15)).await,
        "the cache comes back live after the switch"
    );
    assert_eq!(sidecar.reason(&kept_token).await, "revoked", "nothing lost");
    let after = jti_in_slot(0, "after-failover");
    let after_token = f.token_with_jti(&after);
    assert!(
        answers_within(&sidecar, &after_token, "", Duration::from_secs(5)).await,
        "allowed, and cached"
    );
    f.revoke_jti(&after).await;
    assert!(
        answers_within(&sidecar, &after_token, "revoked", Duration::from_secs(2)).await,
        "a revocation written to the promoted master is pushed to the cache"
    );

    // Move a slot holding a revocation to another master, under load.
    let slot = 100;
    let moved = jti_in_slot(slot, "moved");
    let moved_token = f.token_with_jti(&moved);
    f.revoke_jti(&moved).await;
    assert!(answers_within(&sidecar, &moved_token, "revoked", Duration::from_secs(2)).await);
    let owner = f.cluster.node_for_key(&format!("revoked:jti:{moved}"));
    let destination = *f.cluster.masters().iter().find(|&&m| m != owner).unwrap();
    let report = under_load(&target, Duration::from_secs(2), || {
        f.cluster.move_slot(slot, destination)
    })
    .await;
    eprintln!("during the slot move: {}", report.summary());
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert!(
        report.slowest_answer() < ANSWER_BOUND,
        "{}",
        report.summary()
    );
    assert_eq!(
        f.cluster.node_for_key(&format!("revoked:jti:{moved}")),
        destination
    );
    assert_eq!(
        sidecar.reason(&moved_token).await,
        "revoked",
        "the moved revocation is still enforced"
    );
    assert!(
        cache_live_within(&sidecar, Duration::from_secs(15)).await,
        "live after the move"
    );
    let later = jti_in_slot(slot, "after-move");
    let later_token = f.token_with_jti(&later);
    assert!(answers_within(&sidecar, &later_token, "", Duration::from_secs(5)).await);
    f.revoke_jti(&later).await;
    assert!(
        answers_within(&sidecar, &later_token, "revoked", Duration::from_secs(2)).await,
        "a revocation in the moved slot is pushed by its new master"
    );
    sidecar.shutdown().await;
}
