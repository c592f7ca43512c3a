//! Job kinds: what a job does. One module per kind, each implementing [`Job`].
//!
//! A job does not know when or why it runs; the scheduler decides that and governs
//! the run (timeout, retries, overlap, ledger).

pub mod command;
pub mod mongo_sync;
pub mod retention;
pub mod system_metrics;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, de::Error as _};
use uuid::Uuid;

use crate::config::JobSpec;
use crate::store::{Store, StoreError};
use crate::telemetry::metrics::Metrics;

/// The kinds a `[[jobs]]` entry can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    SystemMetrics,
    MongoSync,
    Retention,
    Command,
}

impl JobKind {
    pub const ALL: [JobKind; 4] = [
        JobKind::SystemMetrics,
        JobKind::MongoSync,
        JobKind::Retention,
        JobKind::Command,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::SystemMetrics => "system_metrics",
            JobKind::MongoSync => "mongo_sync",
            JobKind::Retention => "retention",
            JobKind::Command => "command",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for JobKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                D::Error::custom(format!(
                    "unknown job kind {s:?}, expected one of {}",
                    JobKind::ALL.map(|k| format!("\"{k}\"")).join(", ")
                ))
            })
    }
}

/// A kind's own settings, from the job's `[jobs.settings]` table.
#[derive(Debug, Clone, PartialEq)]
pub enum KindConfig {
    SystemMetrics(system_metrics::SystemMetricsConfig),
    /// Boxed: by far the largest settings.
    MongoSync(Box<mongo_sync::MongoSyncConfig>),
    Retention(retention::RetentionConfig),
    Command(command::CommandConfig),
}

/// What a run needs to know about itself.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub job: Arc<str>,
    pub run_id: Uuid,
    /// When the scheduler will cancel this attempt; long jobs stop starting new work
    /// before it.
    pub deadline: tokio::time::Instant,
}

/// How a run ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Work done; `items` counts what the kind counts (rows deleted, documents loaded…).
    Completed { items: Option<u64> },
    /// The job decided not to work this time (for instance another replica holds it).
    Skipped { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Failed(String),
}

/// One runnable job. Implementations must be cancel-safe: the scheduler drops the
/// future on timeout, replacement or shutdown.
#[async_trait::async_trait]
pub trait Job: Send + Sync + 'static {
    async fn run(&self, ctx: RunContext) -> Result<RunOutcome, JobError>;

    /// Called once at shutdown, after the last run: flush what the job holds.
    async fn shutdown(&self) {}
}

/// What jobs may use.
#[derive(Clone, Debug)]
pub struct Deps {
    pub store: Store,
    /// The runner's name (the ledger's `host`).
    pub host: String,
    pub metrics: Metrics,
    /// `MONGO_URI`, for sync jobs that do not name their own.
    pub mongo_uri: Option<crate::config::Secret>,
    /// Where jobs that buffer rows for PostgreSQL spill them to disk (and how much
    /// each may keep there); `None`: in memory only.
    pub spool: Option<SpoolPlace>,
}

/// A directory for spools and the bound on each.
#[derive(Clone, Debug)]
pub struct SpoolPlace {
    pub dir: std::path::PathBuf,
    pub max_bytes: u64,
}

impl SpoolPlace {
    /// Opens the spool named `name` here; a directory that cannot be made is logged,
    /// and the caller goes on without one.
    pub fn open(&self, name: &str) -> Option<crate::store::spool::Spool> {
        let dir = self.dir.join(crate::store::spool::dir_name(name));
        match crate::store::spool::Spool::open(&dir, self.max_bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no spool: rows buffered while PostgreSQL is away stay in memory only");
                None
            }
        }
    }
}

/// Builds the job a validated spec describes.
pub fn build(spec: &JobSpec, deps: &Deps) -> Result<Arc<dyn Job>, JobError> {
    Ok(match &spec.settings {
        KindConfig::SystemMetrics(c) => {
            let job = system_metrics::SystemMetrics::new(
                &spec.name,
                c,
                deps.store.clone(),
                &deps.host,
                spec.schedule.typical_interval(),
                &deps.metrics,
            )?;
            let host = c.host.as_deref().unwrap_or(&deps.host);
            if let Some(spool) = deps
                .spool
                .as_ref()
                .and_then(|p| p.open(&format!("samples-{host}")))
            {
                job.queue().set_spool(spool);
            }
            Arc::new(job)
        }
        KindConfig::MongoSync(c) => Arc::new(mongo_sync::MongoSync::new(
            &spec.name,
            (**c).clone(),
            deps.mongo_uri.as_ref(),
            deps.store.clone(),
        )),
        KindConfig::Retention(c) => {
            Arc::new(retention::Retention::new(c.clone(), deps.store.clone()))
        }
        KindConfig::Command(c) => Arc::new(command::CommandJob::new(c.clone())),
    })
}
