//! The filter: a config (the sidecar's components and the runtime their background work runs
//! on), a per-route config (the route's `context_extensions`), and per stream the Check.
//!
//! A Check that can answer at once (a cached token, a revocation cache hit) is answered on
//! Envoy's worker thread inside the request-headers hook. One that must wait (a Redis lookup, a
//! JWKS fetch) goes to the module's runtime; the request waits, and Envoy's scheduler brings
//! the answer back to the worker thread. Envoy's threads never block on the module.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use authz_sidecar::check::CheckService;
use authz_sidecar::config::{Config, LogConfig, Settings};
use authz_sidecar::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use authz_sidecar::revocation::Backend;
use tokio::task::{AbortHandle, JoinSet};

use crate::ffi::{HeadersStatus, MetadataValue, Stream};
use crate::memo::AllowMemo;
use crate::replay::{Change, Replay};
use crate::settings::ModuleSettings;
use crate::translate::{Answer, HeaderWrite, StreamFacts, answer, check_request};

type Service = CheckService<Arc<Backend>>;

/// One `DynamicModuleFilter` config: built on Envoy's main thread, shared by every worker.
pub struct FilterConfig {
    service: Arc<Service>,
    settings: ModuleSettings,
    /// Allows given again without a full Check (`ALLOW_MEMO_ENTRIES`; `None`: off).
    memo: Option<AllowMemo>,
    /// Stopped before the runtime (Drop).
    background: Option<JoinSet<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FilterConfig {
    /// Parses the filter config (a JSON object of the sidecar's env vars and the module's own
    /// keys) and builds the components, starting their background work on a runtime of the
    /// module's own threads.
    pub fn new(json: &str) -> Result<FilterConfig, String> {
        let pairs: serde_json::Map<String, serde_json::Value> = match json.trim() {
            "" => serde_json::Map::new(),
            text => serde_json::from_str(text)
                .map_err(|e| format!("the filter config is not a JSON object: {e}"))?,
        };
        let mut sidecar = Vec::new();
        let mut module = Vec::new();
        for (name, value) in &pairs {
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => return Err(format!("{name}: a string, number or boolean, not {other}")),
            };
            match ModuleSettings::owns(name) {
                true => module.push((name.clone(), value)),
                false => sidecar.push((name.clone(), value)),
            }
        }
        let settings = ModuleSettings::from_pairs(&module)?;
        let parsed =
            Settings::from_env_pairs(sidecar.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .and_then(|s| {
                    let config = Config::from_settings(&s)?;
                    Ok((config, LogConfig::from_settings(&s)?))
                })
                .map_err(|e| e.to_string())?;
        let (config, log) = parsed;
        crate::logging::init(&log.filter);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.threads)
            .thread_name("authz-module")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the module's runtime: {e}"))?;
        let metrics_addr = config.server.metrics_listen_addr;
        let logout_addr = config.logout.as_ref().map(|l| l.listen_addr);
        let built = runtime.block_on(async {
            let metrics = match metrics_addr {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            };
            let logout = match logout_addr {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            };
            authz_sidecar::server::build(config, metrics, logout)
                .await
                .map_err(|e| e.to_string())
        })?;
        Ok(FilterConfig {
            service: Arc::new(built.service),
            memo: AllowMemo::new(settings.memo_entries),
            settings,
            background: Some(built.background),
            runtime: Some(runtime),
        })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until Drop")
    }
}

impl Drop for FilterConfig {
    fn drop(&mut self) {
        // Abort the background tasks, then let the runtime's threads go without waiting on
        // Envoy's main thread.
        drop(self.background.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// A route's `context_extensions`: the per-route filter config, a JSON object of strings.
pub struct RouteConfig {
    /// Unique for the process's life, so the memo never mistakes a new route for one gone
    /// (0 is a stream with no per-route config).
    pub id: u64,
    pub extensions: HashMap<String, String>,
}

/// The next route config's id.
static ROUTE_IDS: AtomicU64 = AtomicU64::new(1);

/// The `context_extensions` of a stream with no per-route config.
static NO_EXTENSIONS: LazyLock<HashMap<String, String>> = LazyLock::new(HashMap::new);

impl RouteConfig {
    pub fn new(json: &str) -> Result<RouteConfig, String> {
        let map: HashMap<String, serde_json::Value> = serde_json::from_str(json)
            .map_err(|e| format!("the per-route config is not a JSON object: {e}"))?;
        let extensions = map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k, s)),
                other => Err(format!("{k}: context_extensions are strings, not {other}")),
            })
            .collect::<Result<_, _>>()?;
        Ok(RouteConfig {
            id: ROUTE_IDS.fetch_add(1, Ordering::Relaxed),
            extensions,
        })
    }
}

/// A Check on the module's runtime, for a stream that waits for it.
struct Pending {
    answer: Arc<Mutex<Option<CheckResponse>>>,
    task: AbortHandle,
}

/// One stream.
pub struct Filter {
    config: *const FilterConfig,
    pending: Option<Pending>,
    /// Added to the upstream's response (the RateLimit fields of an allow).
    response_headers: Vec<HeaderWrite>,
}

impl Filter {
    /// Safety (for the hooks): `config` outlives the stream; Envoy destroys a filter config
    /// only after every stream made from it.
    pub fn new(config: *const FilterConfig) -> Filter {
        Filter {
            config,
            pending: None,
            response_headers: Vec::new(),
        }
    }

    fn config(&self) -> &FilterConfig {
        // SAFETY: see `new`: the config outlives every filter made from it.
        unsafe { &*self.config }
    }

    /// Decides the request: at once when it can, else later on the runtime.
    pub fn on_request_headers(
        &mut self,
        stream: &Stream,
        route: Option<&RouteConfig>,
    ) -> HeadersStatus {
        let config = self.config();
        let arrived = Instant::now();
        let (route_id, extensions) = match route {
            Some(route) => (route.id, &route.extensions),
            None => (0, &*NO_EXTENSIONS),
        };
        if let Some(memo) = &config.memo {
            let token_header = config.service.token_header();
            let found = stream
                .with_single_request_header(token_header, |header| memo.find(route_id, header))
                .flatten();
            if let Some(found) = found {
                if config.service.allows_again(&found.allow, arrived) {
                    // A remembered pass has no response headers (`remember` keeps none).
                    self.write_changes(stream, found.replay.changes());
                    return HeadersStatus::Continue;
                }
                memo.forget(&found);
            }
        }
        let headers = stream.request_headers();
        // Envoy keeps the scheme as a pseudo-header; ask for the attribute only without one.
        let scheme = match headers.iter().any(|(name, _)| name == ":scheme") {
            true => String::new(),
            false => stream.scheme().unwrap_or_default(),
        };
        let request = check_request(StreamFacts {
            headers,
            source: stream.source_address(),
            extensions: extensions.clone(),
            scheme,
        });
        let mut check = Box::pin(checking(
            config.service.clone(),
            request,
            config.settings.check_timeout,
        ));
        let at_once = {
            let _runtime = config.runtime().enter();
            check.as_mut().poll(&mut Context::from_waker(Waker::noop()))
        };
        match at_once {
            Poll::Ready(checked) => {
                let answer = answer(checked);
                if let (Some(memo), Answer::Pass(_)) = (&config.memo, &answer) {
                    // Before the answer is applied: it may remove the token's header.
                    remember(config, memo, stream, route_id, extensions);
                }
                self.apply(stream, answer)
            }
            Poll::Pending => {
                let scheduler = stream.scheduler();
                let answer = Arc::new(Mutex::new(None));
                let slot = answer.clone();
                let task = config.runtime().spawn(async move {
                    let checked = check.await;
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(checked);
                    scheduler.commit(0);
                });
                self.pending = Some(Pending {
                    answer,
                    task: task.abort_handle(),
                });
                HeadersStatus::StopAllIterationAndWatermark
            }
        }
    }

    /// The waiting Check answered: apply it on the worker thread and resume or reply.
    pub fn on_scheduled(&mut self, stream: &Stream) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let answered = pending
            .answer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // The task stores its answer before it commits the event: none is a bug, and a 503.
        let Some(response) = answered else {
            crate::ffi::log(crate::ffi::LogLevel::Error, "a resumed Check had no answer");
            stream.send_response(503, &[], "", "authz_error");
            return;
        };
        if self.apply(stream, answer(response)) == HeadersStatus::Continue {
            stream.continue_decoding();
        }
    }

    /// Adds the RateLimit fields an allow carried to the upstream's response.
    pub fn on_response_headers(&mut self, stream: &Stream) {
        for header in self.response_headers.drain(..) {
            stream.write_header(true, &header.name, &header.value, header.replace);
        }
    }

    /// What ext_authz does with a Check's answer.
    fn apply(&mut self, stream: &Stream, answer: Answer) -> HeadersStatus {
        match answer {
            Answer::Pass(pass) => {
                self.write_changes(stream, pass.changes());
                self.response_headers = pass.response_headers;
                HeadersStatus::Continue
            }
            Answer::Reply {
                status,
                headers,
                body,
            } => {
                stream.send_response(status, &headers, &body, "authz_denied");
                HeadersStatus::StopIteration
            }
        }
    }

    /// An allow's changes to the request: its headers, and the claims as dynamic metadata (the
    /// strings in one batch call, before any other metadata change).
    fn write_changes<'c>(&self, stream: &Stream, changes: impl Iterator<Item = Change<'c>>) {
        let namespace = &self.config().settings.metadata_namespace;
        let mut strings = StringBatch::default();
        for change in changes {
            if !strings.is_empty() && !matches!(change, Change::MetadataString(..)) {
                stream.set_metadata_strings(namespace, strings.as_slice());
                strings.clear();
            }
            match change {
                Change::Header {
                    name,
                    value,
                    replace,
                } => stream.write_header(false, name, value, replace),
                Change::Remove(name) => stream.remove_request_header(name),
                Change::MetadataString(key, value) => strings.push((key, value)),
                Change::MetadataNumber(key, n) => {
                    stream.set_metadata(namespace, key, MetadataValue::Number(n))
                }
                Change::MetadataBool(key, b) => {
                    stream.set_metadata(namespace, key, MetadataValue::Bool(b))
                }
                Change::MetadataStruct(serialized) => stream.merge_metadata(namespace, serialized),
            }
        }
        if !strings.is_empty() {
            stream.set_metadata_strings(namespace, strings.as_slice());
        }
    }
}

/// Metadata strings gathered for one batch call: on the stack up to a few, as most allows
/// carry a few claims, and no allocation per request.
#[derive(Default)]
struct StringBatch<'a> {
    on_stack: [(&'a str, &'a str); StringBatch::ON_STACK],
    len: usize,
    on_heap: Vec<(&'a str, &'a str)>,
}

impl<'a> StringBatch<'a> {
    const ON_STACK: usize = 8;

    fn push(&mut self, field: (&'a str, &'a str)) {
        if self.len < Self::ON_STACK {
            self.on_stack[self.len] = field;
        } else {
            if self.len == Self::ON_STACK {
                self.on_heap.extend_from_slice(&self.on_stack);
            }
            self.on_heap.push(field);
        }
        self.len += 1;
    }

    fn as_slice(&self) -> &[(&'a str, &'a str)] {
        match self.len <= Self::ON_STACK {
            true => &self.on_stack[..self.len],
            false => &self.on_heap,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        self.len = 0;
        self.on_heap.clear();
    }
}

/// After a Check allowed at once: remembers the allow, if the core says the token alone
/// decides it and it can be given again.
fn remember(
    config: &FilterConfig,
    memo: &AllowMemo,
    stream: &Stream,
    route_id: u64,
    extensions: &HashMap<String, String>,
) {
    let service = &config.service;
    stream.with_single_request_header(service.token_header(), |header| {
        let (allow, response) =
            service.repeatable_allow(std::str::from_utf8(header).ok()?, extensions)?;
        let Answer::Pass(pass) = answer(response) else {
            return None;
        };
        // A pass with RateLimit fields is never repeatable; checked, not assumed.
        let replay = Replay::new(pass.changes())?;
        pass.response_headers
            .is_empty()
            .then(|| memo.remember(route_id, header, allow, replay))
    });
}

impl Drop for Filter {
    fn drop(&mut self) {
        // The stream is gone: stop its Check (its scheduler is deleted with the task).
        if let Some(pending) = self.pending.take() {
            pending.task.abort();
        }
    }
}

/// One Check through the sidecar's own service, within the module's deadline as ext_authz's
/// `timeout` would bound it.
async fn checking(
    service: Arc<Service>,
    request: CheckRequest,
    timeout: Duration,
) -> CheckResponse {
    service.answer(request, Instant::now(), Some(timeout)).await
}

#[cfg(test)]
mod tests {
    use super::StringBatch;

    #[test]
    fn a_string_batch_keeps_every_field_in_order_past_the_stack() {
        let keys: Vec<String> = (0..11).map(|i| format!("k{i}")).collect();
        let mut batch = StringBatch::default();
        assert!(batch.is_empty());
        for (i, key) in keys.iter().enumerate() {
            batch.push((key, "v"));
            let seen: Vec<&str> = batch.as_slice().iter().map(|(k, _)| *k).collect();
            assert_eq!(
                seen,
                keys[..=i].iter().map(String::as_str).collect::<Vec<_>>()
            );
        }
        batch.clear();
        assert!(batch.is_empty() && batch.as_slice().is_empty());
        batch.push(("again", "v"));
        assert_eq!(batch.as_slice(), &[("again", "v")]);
    }
}
