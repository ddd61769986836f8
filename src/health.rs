//! Readiness. Ready means "serving, keys loaded, not draining":
//! - `keys`: every issuer has usable signing keys;
//! - `draining`: the process has not been asked to stop.
//!
//! The revocation store is reported beside them (`/readyz?verbose`) but does not decide
//! readiness: a Redis outage hits every replica at once, so following it would pull the whole
//! fleet out of the Service (and keep new pods from starting), turning the failure policy's
//! fast 503s into connection failures at Envoy. A failing store shows in metrics, logs and
//! alerts instead.
//!
//! Served as HTTP `/readyz` on the operations listener, and as `grpc.health.v1.Health` on the
//! gRPC port (kept in step here).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::breaker::BreakerState;
use crate::jwks::IssuerKeys;
use crate::revocation::{Backend, FailureMode};

/// The gRPC service name Envoy's health checks (and `grpc_health_probe -service`) ask about.
pub const CHECK_SERVICE: &str = "envoy.service.auth.v3.Authorization";

pub struct Health {
    draining: AtomicBool,
    issuers: Vec<Arc<IssuerKeys>>,
    store: Arc<Backend>,
    failure_mode: FailureMode,
}

/// One line of `/readyz?verbose`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub name: &'static str,
    pub ready: bool,
    /// Whether readiness follows this component; the others are reported only.
    pub gates_readiness: bool,
    pub detail: String,
}

impl Component {
    /// The mark of its `/readyz?verbose` line: `+` ready, `-` not ready, `!` not ready but
    /// reported only.
    pub fn mark(&self) -> char {
        match (self.ready, self.gates_readiness) {
            (true, _) => '+',
            (false, true) => '-',
            (false, false) => '!',
        }
    }
}

impl Health {
    pub fn new(
        issuers: Vec<Arc<IssuerKeys>>,
        store: Arc<Backend>,
        failure_mode: FailureMode,
    ) -> Self {
        Health {
            draining: AtomicBool::new(false),
            issuers,
            store,
            failure_mode,
        }
    }

    /// The issuers whose keys readiness follows.
    pub fn issuers(&self) -> &[Arc<IssuerKeys>] {
        &self.issuers
    }

    /// The revocation store readiness follows.
    pub fn store(&self) -> &Backend {
        &self.store
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn components(&self) -> [Component; 3] {
        let missing: Vec<&str> = self
            .issuers
            .iter()
            .filter(|i| i.usable().is_none())
            .map(|i| i.issuer())
            .collect();
        let keys = Component {
            name: "keys",
            ready: missing.is_empty(),
            gates_readiness: true,
            detail: if missing.is_empty() {
                format!("{} issuer(s) with usable keys", self.issuers.len())
            } else {
                format!("no usable keys for {}", missing.join(", "))
            },
        };
        let revocation = match &*self.store {
            Backend::Memory(_) => Component {
                name: "revocation",
                ready: true,
                gates_readiness: false,
                detail: "memory".into(),
            },
            Backend::Redis(redis) => {
                let (connected, breaker) = (redis.connected(), redis.breaker_state());
                let answering = connected > 0 && breaker != BreakerState::Open;
                let fail_open = self.failure_mode == FailureMode::Open;
                Component {
                    name: "revocation",
                    ready: answering,
                    gates_readiness: false,
                    detail: format!(
                        "redis: {connected} connection(s) up, breaker {}{}",
                        breaker.label(),
                        match (answering, fail_open) {
                            (true, _) => "",
                            (false, true) => ", failing open (Checks skip revocation)",
                            (false, false) => ", failing closed (Checks answer 503)",
                        }
                    ),
                }
            }
        };
        let draining = self.draining.load(Ordering::SeqCst);
        let serving = Component {
            name: "draining",
            ready: !draining,
            gates_readiness: true,
            detail: if draining {
                "shutting down".into()
            } else {
                "serving".into()
            },
        };
        [keys, revocation, serving]
    }

    pub fn is_ready(&self) -> bool {
        is_ready(&self.components())
    }

    /// Keeps the gRPC health status in step with readiness until the task is aborted.
    pub async fn report_forever(self: Arc<Self>, reporter: HealthReporter, every: Duration) {
        let mut last = None;
        loop {
            let ready = self.is_ready();
            if last != Some(ready) {
                set_grpc_status(&reporter, ready).await;
                last = Some(ready);
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Whether every component readiness follows is ready.
pub fn is_ready(components: &[Component]) -> bool {
    components.iter().all(|c| c.ready || !c.gates_readiness)
}

/// Sets both the overall ("") and the Check service's gRPC health status.
pub async fn set_grpc_status(reporter: &HealthReporter, ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(CHECK_SERVICE, status).await;
}
