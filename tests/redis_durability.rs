//! Losing nothing: a revocation `revoke --wait-replicas 1` reported written survives the loss
//! of the master it was written to, once Sentinel promotes the replica.

mod common;

use std::process::Command;
use std::time::Duration;

use common::topology::Sentinels;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_acknowledged_by_a_replica_survives_the_master_s_death() {
    let mut sentinels = tokio::task::spawn_blocking(Sentinels::start).await.unwrap();
    let key = key(Algorithm::ES256, "durable-1");
    let jwks = JwksServer::start(&[&key]).await;
    let url = sentinels.url();
    let exp = now() + 300;
    let mut claims = valid_claims();
    claims["jti"] = json!("durable-jti");
    claims["exp"] = json!(exp);
    let token = key.sign(&claims).unwrap();

    let revoke = {
        let url = url.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
                .env_clear()
                .env("REVOCATION_BACKEND", "redis")
                .env("REDIS_URL", url)
                .env("JWT_ISSUER", ISSUER)
                .env("REVOKE_WAIT_REPLICAS", "1")
                .args(["revoke", "jti", "durable-jti", "--exp", &exp.to_string()])
                .output()
                .unwrap()
        }
    };
    let out = tokio::task::spawn_blocking(revoke).await.unwrap();
    assert!(
        out.status.success(),
        "the replica acknowledged: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // At once, before anything else can replicate it: the master dies.
    let old = sentinels.kill_master();
    let new = tokio::task::spawn_blocking(move || {
        let new = sentinels.wait_for_new_master(Duration::from_secs(30));
        (sentinels, new)
    })
    .await
    .unwrap();
    let (sentinels, promoted) = new;
    assert_ne!(promoted, old);
    assert_eq!(
        sentinels.cli(promoted, &["EXISTS", "revoked:jti:durable-jti"]),
        "1",
        "the promoted replica has the revocation"
    );

    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--revocation-backend", "redis", "--redis-url", &url],
    ))
    .await;
    let enforced = eventually(Duration::from_secs(10), || async {
        sidecar.reason(&token).await == "revoked"
    })
    .await;
    assert!(enforced, "the token stays revoked after the failover");
    sidecar.shutdown().await;
}
