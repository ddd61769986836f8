//! The decision log: one JSON line per Check (every denial and failure, a sample of the allows)
//! for "why was I denied" and for audits, written off the request path.
//!
//! A record names the decision and who asked (issuer, subject, a token fingerprint, client IP,
//! request id, route id, the CEL rule that ran) and nothing else: never the token, never other
//! claim values. Records go through a bounded queue to one writer thread; when the queue is full
//! (a slow disk, a stuck pipe) the record is dropped and counted, and the Check never waits.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use metrics::Counter;
use serde::Serialize;
use tracing::warn;

use crate::throttle::LogThrottle;

/// Where records go (`AUDIT_LOG`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuditSink {
    /// No decision log (the default).
    #[default]
    Off,
    /// Standard error, beside the process's own log lines (which are not JSON records unless
    /// LOG_FORMAT=json; each record has `"audit":true` to tell them apart).
    Stderr,
    /// Appended to this file (created if missing). Rotate it with copy-and-truncate.
    File(PathBuf),
}

impl AuditSink {
    /// `AUDIT_LOG`: empty (off), `stderr`, or a file path.
    pub fn parse(value: &str) -> Result<Self, String> {
        Ok(match value.trim() {
            "" => AuditSink::Off,
            "stderr" => AuditSink::Stderr,
            path => AuditSink::File(PathBuf::from(path)),
        })
    }
}

/// The decision log's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    pub sink: AuditSink,
    /// The share of allowed Checks recorded, 0.0-1.0; denials and failures are always recorded.
    pub allow_sample: f64,
    /// Records waiting for the writer before new ones are dropped.
    pub queue_records: usize,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            sink: AuditSink::Off,
            allow_sample: 1.0,
            queue_records: 10_000,
        }
    }
}

impl AuditSettings {
    /// `AUDIT_ALLOW_SAMPLE`: a fraction from 0 to 1.
    pub fn parse_sample(value: &str) -> Result<f64, String> {
        match value.trim().parse::<f64>() {
            Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
            _ => Err(format!("must be a number from 0 to 1, not {value:?}")),
        }
    }
}

/// How many records were written, dropped (queue full) and lost to write errors.
#[derive(Clone)]
pub struct AuditCounters {
    pub written: Counter,
    pub dropped: Counter,
    pub failed: Counter,
}

/// One Check's record. Borrowed: built only when it is kept.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    /// `allow`, `deny` or `error`.
    pub decision: &'static str,
    /// The `ext_authz_requests_total` reason label.
    pub reason: &'static str,
    /// The HTTP status Envoy answers with (200 when allowed).
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
    /// On a dry-run route: what scopes, step-up and the rule would have decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<&'a str>,
    /// The first 8 bytes of the token's SHA-256, in hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
}

/// The running decision log.
pub struct AuditLog {
    queue: SyncSender<String>,
    /// Allowed Checks seen; the sample keeps one where `seen × share` passes an integer, which
    /// keeps exactly the configured share without a random number per Check.
    allows_seen: AtomicU64,
    allow_sample: f64,
    counters: AuditCounters,
}

impl AuditLog {
    /// Opens the sink and starts the writer thread; `Ok(None)` when the log is off. A file that
    /// cannot be opened is a startup error, not a log that silently records nothing.
    pub fn start(
        settings: &AuditSettings,
        counters: AuditCounters,
    ) -> io::Result<Option<AuditLog>> {
        let out: Box<dyn Write + Send> = match &settings.sink {
            AuditSink::Off => return Ok(None),
            AuditSink::Stderr => Box::new(io::stderr()),
            AuditSink::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
        };
        let (queue, records) = mpsc::sync_channel(settings.queue_records.max(1));
        let writer_counters = counters.clone();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || write_forever(out, records, writer_counters))?;
        Ok(Some(AuditLog {
            queue,
            allows_seen: AtomicU64::new(0),
            allow_sample: settings.allow_sample,
            counters,
        }))
    }

    /// Whether this allowed Check is in the sample.
    /// Whether any allowed Check is recorded (`AUDIT_ALLOW_SAMPLE` above 0).
    pub fn records_allows(&self) -> bool {
        self.allow_sample > 0.0
    }

    pub fn sample_allow(&self) -> bool {
        if self.allow_sample >= 1.0 {
            return true;
        }
        let seen = self.allows_seen.fetch_add(1, Ordering::Relaxed) as f64;
        ((seen + 1.0) * self.allow_sample).floor() > (seen * self.allow_sample).floor()
    }

    /// Queues one record; never blocks (a full queue drops it and counts the drop).
    pub fn record(&self, record: &Record<'_>) {
        let Ok(mut line) = serde_json::to_string(&AuditLine {
            audit: true,
            record,
        }) else {
            self.counters.failed.increment(1);
            return;
        };
        line.push('\n');
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.increment(1)
            }
        }
    }
}

#[derive(Serialize)]
struct AuditLine<'r, 'a> {
    audit: bool,
    #[serde(flatten)]
    record: &'r Record<'a>,
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    chrono::DateTime::from_timestamp(now.as_secs() as i64, now.subsec_nanos())
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The writer thread: blocking writes, buffered, flushed whenever the queue runs dry (so a
/// record is on disk within ~a second of its Check under any load).
fn write_forever(
    out: Box<dyn Write + Send>,
    records: mpsc::Receiver<String>,
    counters: AuditCounters,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let warnings = LogThrottle::new(Duration::from_secs(10));
    let mut unflushed = false;
    loop {
        let line = match records.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                if unflushed {
                    flush(&mut out, &warnings);
                    unflushed = false;
                }
                continue;
            }
            // Every sender is gone: the sidecar is shutting down.
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match out.write_all(line.as_bytes()) {
            Ok(()) => {
                counters.written.increment(1);
                unflushed = true;
            }
            Err(error) => {
                counters.failed.increment(1);
                if let Some(held_back) = warnings.allow() {
                    warn!(%error, held_back, "decision log write failed; record lost");
                }
            }
        }
    }
    flush(&mut out, &warnings);
}

fn flush(out: &mut impl Write, warnings: &LogThrottle) {
    if let Err(error) = out.flush()
        && let Some(held_back) = warnings.allow()
    {
        warn!(%error, held_back, "decision log flush failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(share: f64) -> AuditLog {
        let (queue, _records) = mpsc::sync_channel(1);
        let counter = Counter::noop();
        AuditLog {
            queue,
            allows_seen: AtomicU64::new(0),
            allow_sample: share,
            counters: AuditCounters {
                written: counter.clone(),
                dropped: counter.clone(),
                failed: counter,
            },
        }
    }

    #[test]
    fn the_allow_sample_keeps_the_configured_share() {
        for (share, kept) in [(0.0, 0), (0.25, 250), (0.1, 100), (1.0, 1000), (0.333, 333)] {
            let log = log(share);
            let n = (0..1000).filter(|_| log.sample_allow()).count();
            assert_eq!(n, kept, "share {share}");
        }
    }

    #[test]
    fn settings_parse() {
        assert_eq!(AuditSink::parse(" ").unwrap(), AuditSink::Off);
        assert_eq!(AuditSink::parse("stderr").unwrap(), AuditSink::Stderr);
        assert_eq!(
            AuditSink::parse("/var/log/a.jsonl").unwrap(),
            AuditSink::File("/var/log/a.jsonl".into())
        );
        assert_eq!(AuditSettings::parse_sample("0.05").unwrap(), 0.05);
        for bad in ["-0.1", "1.5", "half", "NaN"] {
            assert!(AuditSettings::parse_sample(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_record_is_one_json_line_without_absent_fields() {
        let record = Record {
            time: "2026-11-30T00:00:00.000Z".into(),
            decision: "deny",
            reason: "expired",
            status: 401,
            rule: None,
            dry_run: None,
            route: Some("orders"),
            iss: None,
            sub: None,
            token: Some("00112233aabbccdd".into()),
            client_ip: None,
            request_id: Some("r\"1"),
        };
        let line = serde_json::to_string(&AuditLine {
            audit: true,
            record: &record,
        })
        .unwrap();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["audit"], true);
        assert_eq!(value["reason"], "expired");
        assert_eq!(value["request_id"], "r\"1");
        assert!(value.get("sub").is_none() && value.get("rule").is_none());
        assert!(!line.contains('\n'));
    }
}
