//! The module's logs through Envoy's logger (`dynamic_modules`, at Envoy's own level), so they
//! land where the operator already reads Envoy's.

use std::io::Write;
use std::sync::Once;

use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;

use crate::ffi::{LogLevel, log};

/// Installs the module's subscriber once per process, with the first config's `RUST_LOG`
/// filter (already checked by the sidecar's config).
pub fn init(filter: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(ToEnvoy)
            .without_time()
            .with_ansi(false)
            .with_target(false)
            .with_level(false)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

#[derive(Clone, Copy)]
struct ToEnvoy;

/// One formatted event, sent to Envoy as one line when dropped.
struct Line {
    level: LogLevel,
    text: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.text);
        let text = text.trim_end();
        if !text.is_empty() {
            log(self.level, text);
        }
    }
}

impl<'a> MakeWriter<'a> for ToEnvoy {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            level: LogLevel::Info,
            text: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        let level = match *meta.level() {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            Level::INFO => LogLevel::Info,
            Level::DEBUG => LogLevel::Debug,
            Level::TRACE => LogLevel::Trace,
        };
        Line {
            level,
            text: Vec::new(),
        }
    }
}
