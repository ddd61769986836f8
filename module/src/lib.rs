//! authz-sidecar inside Envoy: the sidecar's Check service as an Envoy 1.40 dynamic module (an
//! HTTP filter), so a request's authorization costs no gRPC hop.
//!
//! # Layout
//! - this file: the hooks Envoy calls (`envoy_dynamic_module_on_*`), each guarded so a panic
//!   becomes a 503 or a no-op, never an unwind into Envoy.
//! - [`ffi`]: the ABI's types and callbacks, and every `unsafe` of the crate.
//! - [`filter`]: the config, the per-route config and a stream's Check.
//! - [`memo`]: allows remembered by token and route, given again while the core says so.
//! - [`translate`]: stream facts into a CheckRequest, a CheckResponse into what the filter does.
//! - [`settings`]: the keys only the module has; [`logging`]: logs into Envoy's logger.

mod ffi;
mod filter;
mod logging;
mod memo;
mod replay;
mod settings;
mod translate;

use std::panic::{AssertUnwindSafe, catch_unwind};

use ffi::{
    BodyStatus, EnvoyBuffer, FilterConfigEnvoyPtr, FilterConfigModulePtr, FilterEnvoyPtr,
    FilterModulePtr, HeadersStatus, LogLevel, PerRouteConfigModulePtr, Stream, TrailersStatus,
    hook_text, log,
};
use filter::{Filter, FilterConfig, RouteConfig};

/// Runs a hook's body; a panic is logged and becomes `fallback`.
fn guarded<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        log(
            LogLevel::Critical,
            &format!("authz module: {hook} panicked: {what}"),
        );
        fallback
    })
}

/// The filter behind a hook's module pointer.
///
/// Safety: `ptr` came from `envoy_dynamic_module_on_http_filter_new` and the filter is not
/// destroyed yet; hooks of one stream run one at a time on its worker thread.
unsafe fn filter_of<'a>(ptr: FilterModulePtr) -> &'a mut Filter {
    // SAFETY: as the caller promises.
    unsafe { &mut *(ptr as *mut Filter) }
}

/// Refuses to load (a null version is Envoy's load failure) into an Envoy that lacks any
/// callback of the 1.40 ABI; Envoy itself only warns on an ABI version mismatch.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    let missing = ffi::missing_callbacks();
    if missing.is_empty() {
        return ffi::ABI_VERSION.as_ptr().cast();
    }
    // Envoy's logger may be the very thing missing: stderr is where Envoy's own log goes.
    eprintln!(
        "authz_sidecar_module: built for Envoy {} (dynamic module ABI {}), refusing to load: \
         this Envoy lacks {}",
        ffi::ENVOY_VERSION,
        std::str::from_utf8(&ffi::ABI_VERSION[..ffi::ABI_VERSION.len() - 1]).unwrap_or("?"),
        missing.join(", ")
    );
    std::ptr::null()
}

/// # Safety
/// Envoy's contract: `name` and `config` are valid for the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: FilterConfigEnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> FilterConfigModulePtr {
    guarded("config_new", std::ptr::null(), || {
        // SAFETY: the config buffer is valid for this hook.
        let json = unsafe { hook_text(config) };
        match FilterConfig::new(&json) {
            Ok(config) => Box::into_raw(Box::new(config)) as FilterConfigModulePtr,
            Err(problem) => {
                // A null config is Envoy's refusal: the listener does not start with a filter
                // that would pass or fail every request.
                log(
                    LogLevel::Critical,
                    &format!(
                        "authz module (built for Envoy {}): invalid filter config: {problem}",
                        ffi::ENVOY_VERSION
                    ),
                );
                std::ptr::null()
            }
        }
    })
}

/// # Safety
/// `config` came from `config_new`, and no stream of it is left.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    config: FilterConfigModulePtr,
) {
    guarded("config_destroy", (), || {
        // SAFETY: made by Box::into_raw in config_new, destroyed once.
        drop(unsafe { Box::from_raw(config as *mut FilterConfig) });
    })
}

/// # Safety
/// Envoy's contract: `config` is valid for the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> PerRouteConfigModulePtr {
    guarded("per_route_config_new", std::ptr::null(), || {
        // SAFETY: the config buffer is valid for this hook.
        let json = unsafe { hook_text(config) };
        match RouteConfig::new(&json) {
            Ok(route) => Box::into_raw(Box::new(route)) as PerRouteConfigModulePtr,
            Err(problem) => {
                log(
                    LogLevel::Critical,
                    &format!("authz module: invalid route config: {problem}"),
                );
                std::ptr::null()
            }
        }
    })
}

/// # Safety
/// `config` came from `per_route_config_new`, and no stream uses it any more.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    config: PerRouteConfigModulePtr,
) {
    guarded("per_route_config_destroy", (), || {
        // SAFETY: made by Box::into_raw in per_route_config_new, destroyed once.
        drop(unsafe { Box::from_raw(config as *mut RouteConfig) });
    })
}

/// # Safety
/// `config` came from `config_new` and outlives the stream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: FilterConfigModulePtr,
    _filter_envoy: FilterEnvoyPtr,
) -> FilterModulePtr {
    guarded("filter_new", std::ptr::null(), || {
        Box::into_raw(Box::new(Filter::new(config as *const FilterConfig))) as FilterModulePtr
    })
}

/// # Safety
/// Both pointers belong to the live stream whose hook this is.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
    _end_of_stream: bool,
) -> HeadersStatus {
    // SAFETY: this hook's own filter pointer.
    let stream = unsafe { Stream::from_hook(filter_envoy) };
    let decided = catch_unwind(AssertUnwindSafe(|| {
        let route = stream.route_config();
        // SAFETY: the route pointer is ours (per_route_config_new) and lives for the stream;
        // the filter is this stream's.
        let route = unsafe { (route as *const RouteConfig).as_ref() };
        unsafe { filter_of(filter) }.on_request_headers(&stream, route)
    }));
    decided.unwrap_or_else(|_| {
        // Never a pass on a fault: answer as a failed Check is answered.
        log(
            LogLevel::Critical,
            "authz module: the Check panicked; answering 503",
        );
        stream.send_response(503, &[], "", "authz_panic");
        HeadersStatus::StopIteration
    })
}

/// # Safety
/// Both pointers belong to the live stream whose hook this is.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    filter_envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
    _event_id: u64,
) {
    // SAFETY: this hook's own filter pointer.
    let stream = unsafe { Stream::from_hook(filter_envoy) };
    let resumed = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: this stream's filter.
        unsafe { filter_of(filter) }.on_scheduled(&stream)
    }));
    if resumed.is_err() {
        log(
            LogLevel::Critical,
            "authz module: a resumed Check panicked; answering 503",
        );
        stream.send_response(503, &[], "", "authz_panic");
    }
}

/// # Safety
/// Both pointers belong to the live stream whose hook this is.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy: FilterEnvoyPtr,
    filter: FilterModulePtr,
    _end_of_stream: bool,
) -> HeadersStatus {
    guarded("response_headers", HeadersStatus::Continue, || {
        // SAFETY: this hook's own pointers.
        let stream = unsafe { Stream::from_hook(filter_envoy) };
        unsafe { filter_of(filter) }.on_response_headers(&stream);
        HeadersStatus::Continue
    })
}

/// # Safety
/// `filter` came from `filter_new`; destroyed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: FilterModulePtr) {
    guarded("filter_destroy", (), || {
        // SAFETY: made by Box::into_raw in filter_new, destroyed once.
        drop(unsafe { Box::from_raw(filter as *mut Filter) });
    })
}

// The hooks Envoy requires but this filter has no use for: the body and trailers pass (a
// waiting Check stops them with StopAllIterationAndWatermark), the rest do nothing.

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _end_of_stream: bool,
) -> BodyStatus {
    BodyStatus::Continue
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) -> TrailersStatus {
    TrailersStatus::Continue
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _end_of_stream: bool,
) -> BodyStatus {
    BodyStatus::Continue
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) -> TrailersStatus {
    TrailersStatus::Continue
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _callout_id: u64,
    _result: u32,
    _headers: *const std::ffi::c_void,
    _headers_size: usize,
    _body_chunks: *const std::ffi::c_void,
    _body_chunks_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _headers: *const std::ffi::c_void,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _data: *const std::ffi::c_void,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _trailers: *const std::ffi::c_void,
    _trailers_size: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) {
}
