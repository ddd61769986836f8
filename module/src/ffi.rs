//! The part of Envoy 1.40.0's dynamic-module C ABI (`abi.h`, ABI version `v0.2.0`) this
//! filter uses, declared by hand (the SDK is not on crates.io), and safe wrappers over it.
//! Every `unsafe` block of the crate is in this file; each states the contract it relies on.
//!
//! Pointer, enum and struct layouts follow the 1.40 header: enums are C `int`s, buffers are a
//! pointer and a length passed by value, `*_envoy_ptr` and `*_module_ptr` are plain pointers.

use std::ffi::{c_char, c_void};

/// What `envoy_dynamic_module_on_program_init` returns: the ABI this module was built against.
/// Envoy 1.40 logs a mismatch and loads the module anyway, so the hooks check nothing more; the
/// build pins the version (README, "In-Envoy mode").
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// The Envoy release whose ABI this file declares.
pub const ENVOY_VERSION: &str = "1.40.0";

pub type FilterConfigEnvoyPtr = *mut c_void;
pub type FilterConfigModulePtr = *const c_void;
pub type PerRouteConfigModulePtr = *const c_void;
pub type FilterEnvoyPtr = *mut c_void;
pub type FilterModulePtr = *const c_void;
type SchedulerPtr = *mut c_void;

/// Bytes owned by Envoy, valid for the hook (or until the map they came from is changed).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

impl EnvoyBuffer {
    const NULL: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };

    /// The bytes, lossily as text.
    ///
    /// Safety: Envoy's contract for the buffer it handed over: `ptr` points at `length`
    /// readable bytes for as long as the current hook runs; a null `ptr` is empty.
    pub unsafe fn to_text(self) -> String {
        if self.ptr.is_null() || self.length == 0 {
            return String::new();
        }
        // SAFETY: as the caller promises above.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.length) };
        // Header values are nearly always ASCII: validate once, copy once.
        match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        }
    }
}

/// Bytes owned by the module, read by Envoy only during the call they are passed to.
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    const NULL: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
}

/// A header Envoy holds: two views, as [`EnvoyBuffer`].
#[repr(C)]
#[derive(Clone, Copy)]
struct EnvoyHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// A header the module passes: two views, as [`ModuleBuffer`].
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

impl ModuleHeader {
    const EMPTY: ModuleHeader = ModuleHeader {
        key_ptr: std::ptr::null(),
        key_length: 0,
        value_ptr: std::ptr::null(),
        value_length: 0,
    };
}

/// `envoy_dynamic_module_type_http_header_type`.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(dead_code)]
enum HeaderType {
    RequestHeader = 0,
    RequestTrailer = 1,
    ResponseHeader = 2,
    ResponseTrailer = 3,
}

/// `envoy_dynamic_module_type_log_level`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// The headers hooks' status (`..._request_headers_status`, same values for responses).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)]
pub enum HeadersStatus {
    Continue = 0,
    StopIteration = 1,
    ContinueAndDontEndStream = 2,
    StopAllIterationAndBuffer = 3,
    /// Headers, body and trailers wait; the downstream is read-disabled above the buffer's
    /// watermark rather than refused (what ext_authz does while a Check is out).
    StopAllIterationAndWatermark = 4,
}

/// The body hooks' status.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(dead_code)]
pub enum BodyStatus {
    Continue = 0,
    StopIterationAndBuffer = 1,
}

/// The trailers hooks' status.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(dead_code)]
pub enum TrailersStatus {
    Continue = 0,
    StopIteration = 1,
}

/// `envoy_dynamic_module_type_attribute_id`: only the members read here (values are positions
/// in the 1.40 enum).
#[repr(C)]
#[derive(Clone, Copy)]
enum AttributeId {
    RequestScheme = 3,
    SourceAddress = 24,
}

unsafe extern "C" {
    fn envoy_dynamic_module_callback_log(level: LogLevel, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: LogLevel) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: FilterEnvoyPtr,
        header_type: HeaderType,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterEnvoyPtr,
        header_type: HeaderType,
        result: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_header(
        filter: FilterEnvoyPtr,
        header_type: HeaderType,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        values: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoyPtr,
        header_type: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter: FilterEnvoyPtr,
        header_type: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoyPtr,
        status_code: u32,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        filter: FilterEnvoyPtr,
        namespace: ModuleBuffer,
        entries: *const ModuleHeader,
        entries_size: usize,
    );
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_number(
        filter: FilterEnvoyPtr,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        value: f64,
    );
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(
        filter: FilterEnvoyPtr,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        value: bool,
    );
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_struct(
        filter: FilterEnvoyPtr,
        namespace: ModuleBuffer,
        serialized_struct: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: FilterEnvoyPtr,
        attribute: AttributeId,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: FilterEnvoyPtr);
    fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter: FilterEnvoyPtr,
    ) -> SchedulerPtr;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: SchedulerPtr,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: SchedulerPtr);
    fn envoy_dynamic_module_callback_get_most_specific_route_config(
        filter: FilterEnvoyPtr,
    ) -> PerRouteConfigModulePtr;
}

/// Every callback declared above: Envoy loads modules lazily, so a callback this Envoy lacks
/// would otherwise abort the process at its first call instead of refusing the module.
const CALLBACKS: [&str; 18] = [
    "envoy_dynamic_module_callback_log",
    "envoy_dynamic_module_callback_log_enabled",
    "envoy_dynamic_module_callback_http_get_header",
    "envoy_dynamic_module_callback_http_get_headers_size",
    "envoy_dynamic_module_callback_http_get_headers",
    "envoy_dynamic_module_callback_http_set_header",
    "envoy_dynamic_module_callback_http_add_header",
    "envoy_dynamic_module_callback_http_send_response",
    "envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch",
    "envoy_dynamic_module_callback_http_set_dynamic_metadata_number",
    "envoy_dynamic_module_callback_http_set_dynamic_metadata_bool",
    "envoy_dynamic_module_callback_http_set_dynamic_metadata_struct",
    "envoy_dynamic_module_callback_http_filter_get_attribute_string",
    "envoy_dynamic_module_callback_http_filter_continue_decoding",
    "envoy_dynamic_module_callback_http_filter_scheduler_new",
    "envoy_dynamic_module_callback_http_filter_scheduler_commit",
    "envoy_dynamic_module_callback_http_filter_scheduler_delete",
    "envoy_dynamic_module_callback_get_most_specific_route_config",
];

unsafe extern "C" {
    /// glibc's symbol lookup; a null handle is `RTLD_DEFAULT` (the process's global scope).
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// The callbacks this Envoy does not export: an Envoy of another ABI than 1.40's.
pub fn missing_callbacks() -> Vec<&'static str> {
    CALLBACKS
        .into_iter()
        .filter(|name| {
            let symbol = std::ffi::CString::new(*name).expect("no NUL in a symbol name");
            // SAFETY: dlsym only reads the NUL-terminated name; RTLD_DEFAULT searches the
            // global scope, where Envoy's executable exports its callbacks.
            unsafe { dlsym(std::ptr::null_mut(), symbol.as_ptr()) }.is_null()
        })
        .collect()
}

/// Writes a line to Envoy's `dynamic_modules` logger. Callable from any thread (the logger is
/// process-wide and touches no stream).
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the buffer lives across the call, which only reads it; the callbacks are
    // documented as safe from any thread.
    unsafe {
        if envoy_dynamic_module_callback_log_enabled(level) {
            envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes()));
        }
    }
}

/// One stream's filter as Envoy holds it. Only made from the pointer a per-stream hook was
/// given, and used only on that hook's (worker) thread before it returns; not `Send`.
pub struct Stream {
    ptr: FilterEnvoyPtr,
}

impl Stream {
    /// Safety: `ptr` is the `filter_envoy_ptr` of the hook now running on this thread.
    pub unsafe fn from_hook(ptr: FilterEnvoyPtr) -> Stream {
        Stream { ptr }
    }

    /// The request headers, copied (Envoy's views end with the hook).
    pub fn request_headers(&self) -> Vec<(String, String)> {
        // SAFETY: `ptr` is the live filter of the running hook (constructor contract). Envoy
        // fills exactly `get_headers_size` entries into the array we allocated with that
        // length, and its views stay valid until the hook returns or the map changes; we copy
        // them before either.
        unsafe {
            let count = envoy_dynamic_module_callback_http_get_headers_size(
                self.ptr,
                HeaderType::RequestHeader,
            );
            let empty = EnvoyHeader {
                key_ptr: std::ptr::null(),
                key_length: 0,
                value_ptr: std::ptr::null(),
                value_length: 0,
            };
            let mut raw = vec![empty; count];
            if count == 0
                || !envoy_dynamic_module_callback_http_get_headers(
                    self.ptr,
                    HeaderType::RequestHeader,
                    raw.as_mut_ptr(),
                )
            {
                return Vec::new();
            }
            raw.into_iter()
                .map(|h| {
                    let key = EnvoyBuffer {
                        ptr: h.key_ptr,
                        length: h.key_length,
                    };
                    let value = EnvoyBuffer {
                        ptr: h.value_ptr,
                        length: h.value_length,
                    };
                    (key.to_text(), value.to_text())
                })
                .collect()
        }
    }

    /// `read` of the request header's value when it has exactly one (none for an absent or
    /// repeated header), without copying it.
    pub fn with_single_request_header<R>(
        &self,
        name: &str,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Option<R> {
        let mut value = EnvoyBuffer::NULL;
        let mut values = 0usize;
        // SAFETY: live filter of the running hook; the key outlives the call; Envoy writes one
        // view into `value` and the count into `values`. The view stays valid until the hook
        // returns or the header map changes, and the slice lives only for the call of `read`:
        // callers hash, compare or copy it there and change no header inside `read`.
        unsafe {
            let found = envoy_dynamic_module_callback_http_get_header(
                self.ptr,
                HeaderType::RequestHeader,
                ModuleBuffer::of(name.as_bytes()),
                &mut value,
                0,
                &mut values,
            );
            if !found || values != 1 || value.ptr.is_null() {
                return None;
            }
            Some(read(std::slice::from_raw_parts(
                value.ptr.cast::<u8>(),
                value.length,
            )))
        }
    }

    /// Replaces (`replace`) or adds a value of a request or response header.
    pub fn write_header(&self, response: bool, name: &str, value: &str, replace: bool) {
        let header_type = match response {
            true => HeaderType::ResponseHeader,
            false => HeaderType::RequestHeader,
        };
        let (key, value) = (
            ModuleBuffer::of(name.as_bytes()),
            ModuleBuffer::of(value.as_bytes()),
        );
        // SAFETY: live filter of the running hook; the buffers outlive the call, which copies.
        unsafe {
            match replace {
                true => {
                    envoy_dynamic_module_callback_http_set_header(self.ptr, header_type, key, value)
                }
                false => {
                    envoy_dynamic_module_callback_http_add_header(self.ptr, header_type, key, value)
                }
            };
        }
    }

    /// Removes every value of a request header (a null value is the ABI's removal).
    pub fn remove_request_header(&self, name: &str) {
        // SAFETY: live filter of the running hook; the key outlives the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.ptr,
                HeaderType::RequestHeader,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::NULL,
            );
        }
    }

    /// Answers the client in Envoy's name (a local reply); the request goes no further.
    pub fn send_response(
        &self,
        status: u32,
        headers: &[(String, String)],
        body: &str,
        details: &str,
    ) {
        let mut raw: Vec<ModuleHeader> = headers
            .iter()
            .map(|(k, v)| ModuleHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // SAFETY: live filter of the running hook; the header array and the strings it points
        // into, the body and the details all outlive the call, which copies them.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                status,
                raw.as_mut_ptr(),
                raw.len(),
                ModuleBuffer::of(body.as_bytes()),
                ModuleBuffer::of(details.as_bytes()),
            );
        }
    }

    /// Sets one dynamic metadata field, a number or a boolean: no protobuf for Envoy to parse.
    pub fn set_metadata(&self, namespace: &str, key: &str, value: MetadataValue) {
        let (namespace, key) = (
            ModuleBuffer::of(namespace.as_bytes()),
            ModuleBuffer::of(key.as_bytes()),
        );
        // SAFETY: live filter of the running hook; the buffers outlive the call, which copies.
        unsafe {
            match value {
                MetadataValue::Number(n) => {
                    envoy_dynamic_module_callback_http_set_dynamic_metadata_number(
                        self.ptr, namespace, key, n,
                    )
                }
                MetadataValue::Bool(b) => {
                    envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(
                        self.ptr, namespace, key, b,
                    )
                }
            }
        }
    }

    /// Sets string fields of one namespace in one call (one namespace lookup in Envoy).
    pub fn set_metadata_strings(&self, namespace: &str, fields: &[(&str, &str)]) {
        /// Entries passed from the stack, as most allows carry a few claims.
        const ON_STACK: usize = 8;
        let entry = |(k, v): &(&str, &str)| ModuleHeader {
            key_ptr: k.as_ptr().cast(),
            key_length: k.len(),
            value_ptr: v.as_ptr().cast(),
            value_length: v.len(),
        };
        let mut stack = [ModuleHeader::EMPTY; ON_STACK];
        let heap: Vec<ModuleHeader>;
        let entries: &[ModuleHeader] = if fields.len() <= ON_STACK {
            for (slot, field) in stack.iter_mut().zip(fields) {
                *slot = entry(field);
            }
            &stack[..fields.len()]
        } else {
            heap = fields.iter().map(entry).collect();
            &heap
        };
        // SAFETY: live filter of the running hook; the entries and the strings they point into
        // outlive the call, which copies them.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
                self.ptr,
                ModuleBuffer::of(namespace.as_bytes()),
                entries.as_ptr(),
                entries.len(),
            );
        }
    }

    /// Merges a serialized `google.protobuf.Struct` into the stream's dynamic metadata under
    /// `namespace` (for the values a single setter cannot carry: lists, objects, null).
    pub fn merge_metadata(&self, namespace: &str, serialized_struct: &[u8]) {
        // SAFETY: live filter of the running hook; both buffers outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_struct(
                self.ptr,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(serialized_struct),
            );
        }
    }

    fn attribute(&self, id: AttributeId) -> Option<String> {
        let mut result = EnvoyBuffer::NULL;
        // SAFETY: live filter of the running hook; `result` is a valid out-parameter, and the
        // view Envoy writes there is copied before the hook returns.
        unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.ptr,
                id,
                &mut result,
            )
            .then(|| result.to_text())
        }
    }

    /// The downstream peer as `ip:port`.
    pub fn source_address(&self) -> Option<String> {
        self.attribute(AttributeId::SourceAddress)
    }

    pub fn scheme(&self) -> Option<String> {
        self.attribute(AttributeId::RequestScheme)
    }

    /// Resumes a request this filter stopped in an earlier hook.
    pub fn continue_decoding(&self) {
        // SAFETY: live filter of the running hook (never the hook that returned Stop).
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.ptr) }
    }

    /// The pointer `on_http_filter_per_route_config_new` returned for the route's config, if
    /// the route has one.
    pub fn route_config(&self) -> PerRouteConfigModulePtr {
        // SAFETY: live filter of the running hook. Envoy keeps the route (and so our config)
        // alive for the stream.
        unsafe { envoy_dynamic_module_callback_get_most_specific_route_config(self.ptr) }
    }

    /// A way back onto this stream's worker thread from any thread.
    pub fn scheduler(&self) -> Scheduler {
        // SAFETY: live filter of the running hook; Envoy allocates the scheduler and we own
        // it from here (deleted exactly once, in Drop).
        Scheduler(unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.ptr) })
    }
}

/// A dynamic metadata value one setter carries (strings go in one batch).
pub enum MetadataValue {
    Number(f64),
    Bool(bool),
}

/// Envoy's scheduler for one stream: `commit` runs `on_http_filter_scheduled` on the stream's
/// worker thread, or nothing if the stream is gone by then.
pub struct Scheduler(SchedulerPtr);

// SAFETY: the ABI documents commit as callable from any thread, and delete as a plain free of
// the scheduler object (it holds only a weak reference to the stream) from any thread.
unsafe impl Send for Scheduler {}

impl Scheduler {
    pub fn commit(&self, event_id: u64) {
        // SAFETY: the scheduler is live (deleted only in Drop, which needs ownership).
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(self.0, event_id) }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: deleted exactly once; nothing uses it afterwards.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(self.0) }
    }
}

/// Envoy's view of a buffer handed to a hook, copied out.
///
/// Safety: `buffer` was passed to the hook now running and is read before it returns.
pub unsafe fn hook_text(buffer: EnvoyBuffer) -> String {
    // SAFETY: forwarded from the caller's promise.
    unsafe { buffer.to_text() }
}
