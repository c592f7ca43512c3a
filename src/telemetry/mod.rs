//! Logging (readable text on a terminal, JSON lines otherwise, and Loki when
//! `LOKI_URL` is set) and vigil's own metrics.

mod json;
pub mod loki;
pub mod metrics;
pub mod writer;

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::Environment;

/// Default level: vigil's own info events, warnings from the libraries it uses.
const DEFAULT_FILTER: &str = "warn,vigil=info";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("environment variable {var}: invalid value {value:?}, expected {expected}")]
    BadVar {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("a logger is already installed")]
    AlreadyInstalled,
    #[error("{0}")]
    Loki(String),
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// `vigil run`: stdout, where the container log agent reads.
    Stdout,
    /// One-shot commands, whose stdout carries their result.
    Stderr,
}

/// The logging choices, read from `VIGIL_LOG_FORMAT` and `VIGIL_LOG` (or `RUST_LOG`).
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub format: LogFormat,
    pub filter: String,
    pub target: LogTarget,
    /// Most bytes of log lines held while the reader of the target is slow.
    pub buffer_bytes: usize,
    /// `RUST_BACKTRACE` is set: panics also go to stderr the standard way.
    pub backtrace: bool,
}

impl LogOptions {
    pub fn from_env(env: &Environment, target: LogTarget) -> Result<Self, TelemetryError> {
        let is_terminal = match target {
            LogTarget::Stdout => std::io::stdout().is_terminal(),
            LogTarget::Stderr => std::io::stderr().is_terminal(),
        };
        let format = match env.get("VIGIL_LOG_FORMAT").map(str::trim) {
            None | Some("") | Some("auto") => {
                if is_terminal {
                    LogFormat::Text
                } else {
                    LogFormat::Json
                }
            }
            Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                return Err(TelemetryError::BadVar {
                    var: "VIGIL_LOG_FORMAT",
                    value: other.to_owned(),
                    expected: "json, text or auto",
                });
            }
        };
        let filter = env
            .get("VIGIL_LOG")
            .or_else(|| env.get("RUST_LOG"))
            .filter(|s| !s.trim().is_empty())
            .unwrap_or(DEFAULT_FILTER)
            .to_owned();
        if EnvFilter::try_new(&filter).is_err() {
            return Err(TelemetryError::BadVar {
                var: if env.get("VIGIL_LOG").is_some() {
                    "VIGIL_LOG"
                } else {
                    "RUST_LOG"
                },
                value: filter,
                expected: "a tracing filter such as \"info\" or \"warn,vigil=debug\"",
            });
        }
        let buffer_bytes = match env.get("VIGIL_LOG_BUFFER").map(str::trim) {
            None | Some("") => writer::DEFAULT_CAP_BYTES,
            Some(raw) => crate::config::parse_bytes(raw)
                .filter(|b| *b >= 64 << 10)
                .ok_or_else(|| TelemetryError::BadVar {
                    var: "VIGIL_LOG_BUFFER",
                    value: raw.to_owned(),
                    expected: "a size such as 1MiB or 256KiB, at least 64KiB",
                })?,
        };
        Ok(Self {
            format,
            filter,
            target,
            buffer_bytes,
            backtrace: env.get("RUST_BACKTRACE").is_some(),
        })
    }
}

/// What `init` installed; shut it down last, to flush what Loki and the log reader
/// have not received.
#[derive(Default)]
pub struct Telemetry {
    pub loki: Option<loki::LokiHandle>,
    pub lines: Option<writer::WriterHandle>,
}

impl Telemetry {
    /// Flushes queued Loki events and log lines, waiting at most `wait` for each.
    pub fn shutdown(self, wait: std::time::Duration) {
        if let Some(loki) = self.loki {
            loki.shutdown(wait);
        }
        if let Some(lines) = self.lines {
            lines.shutdown(wait);
        }
    }
}

/// Installs the global subscriber: the level filter, stdout (text or JSON lines) and,
/// with `loki`, direct shipping whose drops count in `loki_dropped`.
pub fn init(
    options: &LogOptions,
    loki: Option<loki::LokiOptions>,
    metrics: &metrics::Metrics,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_new(&options.filter).map_err(|_| TelemetryError::BadVar {
        var: "VIGIL_LOG",
        value: options.filter.clone(),
        expected: "a tracing filter",
    })?;
    let (loki_sink, loki_handle) = match loki {
        Some(o) => {
            let (sink, handle) =
                loki::start(o, metrics).map_err(|e| TelemetryError::Loki(e.to_string()))?;
            (Some(sink), Some(handle))
        }
        None => (None, None),
    };
    let (lines, lines_handle) = writer::start(
        options.target,
        options.buffer_bytes,
        metrics.log_lines.clone(),
        metrics.log_dropped.clone(),
    )
    .map_err(|e| TelemetryError::Loki(format!("cannot start the log writer: {e}")))?;
    let text = (options.format == LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_writer(writer::Queued(lines.clone())));
    let stdout = (options.format == LogFormat::Json).then_some(lines);
    let sink = (stdout.is_some() || loki_sink.is_some()).then_some(json::EventSink {
        stdout,
        loki: loki_sink,
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(json::SpanFields)
        .with(text)
        .with(sink)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    install_panic_hook(options.backtrace);
    Ok(Telemetry {
        loki: loki_handle,
        lines: Some(lines_handle),
    })
}

/// A subscriber that only ships to Loki, without touching the global one (tests,
/// embedding).
pub fn loki_subscriber(
    options: loki::LokiOptions,
    metrics: &metrics::Metrics,
) -> Result<(impl tracing::Subscriber + Send + Sync, loki::LokiHandle), TelemetryError> {
    let (sink, handle) =
        loki::start(options, metrics).map_err(|e| TelemetryError::Loki(e.to_string()))?;
    let subscriber = tracing_subscriber::registry()
        .with(json::SpanFields)
        .with(json::EventSink {
            stdout: None,
            loki: Some(sink),
        });
    Ok((subscriber, handle))
}

/// Panics become log events, inside whatever span (job, run) they happened in.
fn install_panic_hook(backtrace: bool) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %message, %location, "panic");
        if backtrace {
            previous(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Result<LogOptions, TelemetryError> {
        LogOptions::from_env(
            &Environment::from_pairs(pairs.iter().copied()),
            LogTarget::Stdout,
        )
    }

    #[test]
    fn the_format_can_be_forced_and_a_bad_one_is_named() {
        assert_eq!(
            opts(&[("VIGIL_LOG_FORMAT", "json")]).unwrap().format,
            LogFormat::Json
        );
        assert_eq!(
            opts(&[("VIGIL_LOG_FORMAT", "text")]).unwrap().format,
            LogFormat::Text
        );
        let err = opts(&[("VIGIL_LOG_FORMAT", "xml")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("VIGIL_LOG_FORMAT") && err.contains("xml"),
            "{err}"
        );
    }

    #[test]
    fn vigil_log_wins_over_rust_log_and_bad_filters_are_named() {
        let o = opts(&[("VIGIL_LOG", "debug"), ("RUST_LOG", "error")]).unwrap();
        assert_eq!(o.filter, "debug");
        assert_eq!(opts(&[("RUST_LOG", "error")]).unwrap().filter, "error");
        assert_eq!(opts(&[]).unwrap().filter, DEFAULT_FILTER);
        let err = opts(&[("RUST_LOG", "vigil=loud")]).unwrap_err().to_string();
        assert!(err.contains("RUST_LOG"), "{err}");
    }
}
