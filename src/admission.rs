//! Admission control at the door: a Check takes its `MAX_IN_FLIGHT` permit when its HTTP/2
//! stream arrives, not when its handler first runs.
//!
//! Under CPU overload the backlog is not in the handler: arrived streams wait as runtime tasks
//! before they are ever polled, so a limit checked inside the handler never sees them and
//! every Check just gets later (measured with src/loadgen.rs: at twice the peak, nothing was
//! shed and allowed Checks took over a second). This layer runs in the connection's own task
//! as each stream is accepted, so waiting Checks hold permits and the excess is shed. It also
//! stamps the arrival time, so a deadline counts the time spent waiting.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;
use tower::{Layer, Service};

/// The Check method's path; other RPCs (gRPC health) pass untouched.
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// What the door decided for one Check, found in the request's extensions.
#[derive(Clone)]
pub enum Ticket {
    /// Holds a permit for as long as any clone lives (the handler keeps one to the end).
    Admitted {
        permit: Arc<OwnedSemaphorePermit>,
        arrived: Instant,
    },
    /// MAX_IN_FLIGHT Checks were in already: answer at once, do no work.
    Shed,
}

#[derive(Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
}

impl AdmissionLayer {
    pub fn new(max_in_flight: usize) -> Self {
        AdmissionLayer {
            permits: Arc::new(Semaphore::new(
                max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
            )),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if request.uri().path() == CHECK_PATH {
            let ticket = match self.permits.clone().try_acquire_owned() {
                Ok(permit) => Ticket::Admitted {
                    permit: Arc::new(permit),
                    arrived: Instant::now(),
                },
                Err(_) => Ticket::Shed,
            };
            request.extensions_mut().insert(ticket);
        }
        self.inner.call(request)
    }
}
