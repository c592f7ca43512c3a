//! Logging (readable text on a terminal, JSON lines otherwise) and vigil's own metrics.

pub mod metrics;

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
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
        Ok(Self {
            format,
            filter,
            target,
        })
    }
}

/// Installs the global subscriber.
pub fn init(options: &LogOptions) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(&options.filter).map_err(|_| TelemetryError::BadVar {
        var: "VIGIL_LOG",
        value: options.filter.clone(),
        expected: "a tracing filter",
    })?;
    let writer = match options.target {
        LogTarget::Stdout => BoxMakeWriter::new(std::io::stdout),
        LogTarget::Stderr => BoxMakeWriter::new(std::io::stderr),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = match options.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true)
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(writer))
            .try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)?;
    install_panic_hook();
    Ok(())
}

/// Panics become log events, inside whatever span (job, run) they happened in.
fn install_panic_hook() {
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
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            previous(info);
        }
    }));
}
