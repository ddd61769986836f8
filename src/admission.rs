//! Admission control at the door: a Check takes its `MAX_IN_FLIGHT` permit when its HTTP/2
//! stream arrives, not when its handler first runs, and must deliver its request within
//! `GRPC_REQUEST_READ_TIMEOUT` of arriving.
//!
//! Under CPU overload the backlog is not in the handler: arrived streams wait as runtime tasks
//! before they are ever polled, so a limit checked inside the handler never sees them and
//! every Check just gets later (measured with src/tools/loadgen.rs: at twice the peak, nothing was
//! shed and allowed Checks took over a second). This layer runs in the connection's own task
//! as each stream is accepted, so waiting Checks hold permits and the excess is shed. It also
//! stamps the arrival time, so a deadline counts the time spent waiting.
//!
//! A permit taken at HEADERS would be held for ever by a stream that never sends its DATA (a
//! slow-loris client: `MAX_IN_FLIGHT` such streams and every Check is shed). So a stream whose
//! request has not been decoded by its read deadline is answered here, with the Check failure
//! the caller supplies (a 503 deny, never an RPC error that `failure_mode_allow` would pass),
//! and its permit is released. No timer exists for a Check whose request is already there when
//! it is first polled, which is every Check Envoy sends (HEADERS and DATA arrive together).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::StreamBody;
use metrics::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::body::Body;
use tonic::codegen::http;
use tower::{Layer, Service};

/// The Check method's path; other RPCs (gRPC health) pass untouched.
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// What the door decided for one Check stream, found in the request's extensions. Cloned by
/// the handler, which keeps it to the end: the permit is held while any clone lives.
#[derive(Clone)]
pub struct Ticket(Arc<Arrival>);

struct Arrival {
    /// `None`: MAX_IN_FLIGHT Checks were in already; answer at once, do no work.
    permit: Option<OwnedSemaphorePermit>,
    arrived: Instant,
    /// Set by the handler as it starts: the request was read and decoded in time.
    decoded: AtomicBool,
}

impl Ticket {
    /// Whether the Check got a permit (else it is shed).
    pub fn admitted(&self) -> bool {
        self.0.permit.is_some()
    }

    /// When the stream's headers arrived.
    pub fn arrived(&self) -> Instant {
        self.0.arrived
    }

    /// Called by the handler when it starts: the read deadline no longer applies.
    pub fn mark_decoded(&self) {
        self.0.decoded.store(true, Ordering::Release);
    }

    fn decoded(&self) -> bool {
        self.0.decoded.load(Ordering::Acquire)
    }
}

/// The answer to a Check whose request did not arrive in time: the encoded message (supplied
/// by the Check service, which knows its shape) and the counter it is counted in.
#[derive(Clone)]
pub struct LateAnswer {
    pub message: Bytes,
    pub counter: Counter,
}

impl LateAnswer {
    /// A complete gRPC response: the length-prefixed message, then `grpc-status: 0`.
    fn response(&self) -> http::Response<Body> {
        let mut framed = Vec::with_capacity(5 + self.message.len());
        framed.push(0); // not compressed
        framed.extend_from_slice(&(self.message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&self.message);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = [Frame::data(Bytes::from(framed)), Frame::trailers(trailers)];
        let body = StreamBody::new(tokio_stream::iter(
            frames.map(Ok::<_, std::convert::Infallible>),
        ));
        let mut response = http::Response::new(Body::new(body));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }
}

#[derive(Clone)]
pub struct AdmissionLayer {
    door: Arc<Door>,
}

/// What every connection's copy of the layer shares.
struct Door {
    permits: Arc<Semaphore>,
    read_timeout: Duration,
    late: LateAnswer,
}

impl AdmissionLayer {
    pub fn new(max_in_flight: usize, read_timeout: Duration, late: LateAnswer) -> Self {
        AdmissionLayer {
            door: Arc::new(Door {
                permits: Arc::new(Semaphore::new(
                    max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
                )),
                read_timeout,
                late,
            }),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            door: self.door.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    door: Arc<Door>,
}

impl<S, B> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = ReadDeadline<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let ticket = (request.uri().path() == CHECK_PATH).then(|| {
            let ticket = Ticket(Arc::new(Arrival {
                permit: self.door.permits.clone().try_acquire_owned().ok(),
                arrived: Instant::now(),
                decoded: AtomicBool::new(false),
            }));
            request.extensions_mut().insert(ticket.clone());
            ticket
        });
        ReadDeadline {
            inner: self.inner.call(request),
            timer: None,
            ticket,
            door: self.door.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A Check's response future, answered with the late answer if the request is not decoded
    /// by the read deadline.
    pub struct ReadDeadline<F> {
        #[pin]
        inner: F,
        // Armed only once a poll found the request not yet decoded: boxed, so the common
        // future stays small and pays no allocation.
        timer: Option<Pin<Box<Sleep>>>,
        // `None` for other RPCs, and once the request was decoded.
        ticket: Option<Ticket>,
        door: Arc<Door>,
    }
}

impl<F, E> Future for ReadDeadline<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.inner.poll(cx) {
            return Poll::Ready(output);
        }
        let Some(ticket) = this.ticket.as_ref() else {
            return Poll::Pending;
        };
        if ticket.decoded() {
            *this.ticket = None;
            *this.timer = None;
            return Poll::Pending;
        }
        let deadline = ticket.arrived() + this.door.read_timeout;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        if timer.as_mut().poll(cx).is_ready() {
            this.door.late.counter.increment(1);
            return Poll::Ready(Ok(this.door.late.response()));
        }
        Poll::Pending
    }
}
