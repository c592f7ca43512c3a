//! Job kinds: what a job does. One module per kind, each implementing [`Job`].
//!
//! A job does not know when or why it runs; the scheduler decides that and governs
//! the run (timeout, retries, overlap, ledger).

pub mod cgroupfs;
pub mod command;
pub mod mongo_sync;
pub mod retention;
pub mod system_metrics;

use std::sync::Arc;

use uuid::Uuid;

use crate::config::{JobSettings, JobSpec, Kinds, Scope, SettingsReader};
use crate::store::{Store, StoreError};
use crate::telemetry::metrics::Metrics;

/// One job kind: its name in `jobs.toml`, where it runs by default, how its
/// `[jobs.settings]` are read and how a job of it is built. A new kind is a module
/// with one of these and a line in [`Registry::builtin`].
#[derive(Clone, Copy)]
pub struct Kind {
    pub name: &'static str,
    pub default_scope: Scope,
    pub read: fn(&mut SettingsReader<'_, '_>) -> Option<JobSettings>,
    pub build: Build,
    /// What a run of this kind takes as input (`POST /api/jobs/{name}/runs` with a
    /// JSON body, `vigil trigger --input`).
    pub input: InputSpec,
}

/// A kind's input: its JSON schema (published in `openapi.json`) and the check a
/// request's input passes before any run starts.
#[derive(Clone, Copy)]
pub struct InputSpec {
    pub schema: fn() -> serde_json::Value,
    pub check: fn(&serde_json::Value) -> Result<(), InputError>,
}

impl InputSpec {
    /// The kind takes no input: any is refused.
    pub const NONE: InputSpec = InputSpec {
        schema: || serde_json::json!({ "not": {} }),
        check: |_| {
            Err(InputError {
                field: String::new(),
                message: "this kind of job takes no input".into(),
            })
        },
    };
}

/// Why an input was refused, and where in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("`{field}`: ") })]
pub struct InputError {
    /// A JSON pointer-ish path (`filter.$where`), empty for the whole input.
    pub field: String,
    pub message: String,
}

impl InputError {
    pub fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads an input as `T` (`deny_unknown_fields`), naming the field serde names.
pub fn typed_input<T: serde::de::DeserializeOwned>(
    input: &serde_json::Value,
) -> Result<T, InputError> {
    serde_path_to_error::deserialize(input).map_err(|e| {
        // The path includes an unknown key itself; "." is the whole input.
        let field = match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        InputError {
            field,
            message: e.inner().to_string(),
        }
    })
}

/// Makes a job from its validated spec.
pub type Build = fn(&JobSpec, &Deps) -> Result<Arc<dyn Job>, JobError>;

/// The kinds a vigil knows; implements config's [`Kinds`].
#[derive(Clone)]
pub struct Registry {
    kinds: Vec<Kind>,
}

impl Registry {
    /// The kinds vigil ships.
    pub fn builtin() -> Self {
        Self::with(vec![
            system_metrics::KIND,
            mongo_sync::KIND,
            retention::KIND,
            command::KIND,
        ])
    }

    /// Exactly these kinds (an embedding program's, or a test's own).
    pub fn with(kinds: Vec<Kind>) -> Self {
        Self { kinds }
    }

    /// These kinds and one more.
    pub fn and(mut self, kind: Kind) -> Self {
        self.kinds.push(kind);
        self
    }

    fn kind(&self, name: &str) -> Option<&Kind> {
        self.kinds.iter().find(|k| k.name == name)
    }

    /// Checks a run's input for a job of `kind` against the kind's own rules.
    pub fn check_input(&self, kind: &str, input: &serde_json::Value) -> Result<(), InputError> {
        match self.kind(kind) {
            Some(k) => (k.input.check)(input),
            None => Err(InputError::at("", format!("unknown job kind {kind:?}"))),
        }
    }

    /// Each kind's input schema, by kind name.
    pub fn input_schemas(&self) -> Vec<(&'static str, serde_json::Value)> {
        self.kinds
            .iter()
            .map(|k| (k.name, (k.input.schema)()))
            .collect()
    }

    /// Makes the job a validated spec describes.
    pub fn build(&self, spec: &JobSpec, deps: &Deps) -> Result<Arc<dyn Job>, JobError> {
        let kind = self
            .kind(spec.kind)
            .ok_or_else(|| JobError::Permanent(format!("unknown job kind {:?}", spec.kind)))?;
        (kind.build)(spec, deps)
    }
}

impl Kinds for Registry {
    fn names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.name).collect()
    }

    fn default_scope(&self, kind: &str) -> Scope {
        self.kind(kind).map_or(Scope::Cluster, |k| k.default_scope)
    }

    fn read_settings(
        &self,
        kind: &str,
        reader: &mut SettingsReader<'_, '_>,
    ) -> Option<JobSettings> {
        (self.kind(kind)?.read)(reader)
    }
}

/// A spec's settings as its kind's type: the kind made them, so they are.
pub fn settings<T: std::any::Any>(spec: &JobSpec) -> Result<&T, JobError> {
    spec.settings.get::<T>().ok_or_else(|| {
        JobError::Permanent(format!(
            "job \"{}\": its settings are not those of kind {:?}",
            spec.name, spec.kind
        ))
    })
}

/// What a run needs to know about itself.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub job: Arc<str>,
    pub run_id: Uuid,
    /// Why the run started; a job only passes it on (a program sees `VIGIL_TRIGGER`),
    /// it never decides anything by it.
    pub trigger: crate::store::Trigger,
    /// When the scheduler will cancel this attempt; long jobs stop starting new work
    /// before it.
    pub deadline: tokio::time::Instant,
    /// The input the run was invoked with, checked by the kind's [`InputSpec`].
    pub input: Option<Arc<serde_json::Value>>,
    /// Where the run leaves its output (a `command` job's stdout).
    pub output: OutputSink,
    /// Where the run leaves what it used (a `command` job's process tree).
    pub resources: ResourcesSink,
}

impl RunContext {
    pub fn new(
        job: &str,
        run_id: Uuid,
        trigger: crate::store::Trigger,
        deadline: tokio::time::Instant,
    ) -> Self {
        Self {
            job: job.into(),
            run_id,
            trigger,
            deadline,
            input: None,
            output: OutputSink::default(),
            resources: ResourcesSink::default(),
        }
    }
}

pub use crate::store::runs::{RunOutput, RunResources};

/// Where a run puts the resources it used; the scheduler takes them when the attempt
/// ends, also one cut off by a timeout (the job sets them as it is dropped).
#[derive(Debug, Clone, Default)]
pub struct ResourcesSink {
    slot: Arc<std::sync::Mutex<Option<RunResources>>>,
}

impl ResourcesSink {
    pub fn set(&self, r: RunResources) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    pub fn is_set(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub fn take(&self) -> Option<RunResources> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Where a run puts its output; the scheduler takes it when the attempt ends. Only
/// runs someone invoked keep one (a scheduled run's stdout is in its logs): a chatty
/// job on a short schedule would otherwise store a megabyte a firing.
#[derive(Debug, Clone, Default)]
pub struct OutputSink {
    slot: Arc<std::sync::Mutex<Option<RunOutput>>>,
    wanted: bool,
}

impl OutputSink {
    /// A sink whose output is kept (`wanted`) or not asked for.
    pub fn new(wanted: bool) -> Self {
        Self {
            slot: Arc::default(),
            wanted,
        }
    }

    /// Whether anyone will read the output: a job need not capture it otherwise.
    pub fn wanted(&self) -> bool {
        self.wanted
    }

    pub fn set(&self, output: RunOutput) {
        if self.wanted {
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(output);
        }
    }

    pub fn take(&self) -> Option<RunOutput> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// How a run ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Work done; `items` counts what the kind counts (rows deleted, documents loaded…).
    Completed { items: Option<u64> },
    /// The job decided not to work this time (for instance another replica holds it).
    Skipped { reason: String },
}

/// Why a run failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Retried per the job's `retries`.
    #[error("{0}")]
    Failed(String),
    /// Never retried: the same attempt would fail the same way (a program that does
    /// not exist, an invalid URI or input).
    #[error("{0}")]
    Permanent(String),
    /// Retried after this pause rather than the policy's backoff (still within
    /// `max_attempts`): the job knows when it is worth trying again.
    #[error("{message}")]
    RetryAfter {
        after: std::time::Duration,
        message: String,
    },
}

impl JobError {
    /// Whether trying again cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            JobError::Permanent(_) => true,
            JobError::Store(e) => e.is_permanent(),
            _ => false,
        }
    }

    /// `Permanent` when `e` says trying again cannot help, else `Failed`; the message
    /// either way.
    pub fn from_store(e: &StoreError, message: String) -> Self {
        if e.is_permanent() {
            JobError::Permanent(message)
        } else {
            JobError::Failed(message)
        }
    }

    /// The pause the job asked for before the next attempt, if any.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            JobError::RetryAfter { after, .. } => Some(*after),
            _ => None,
        }
    }
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
    /// The environment vigil was started with (programs get only part of it).
    pub env: crate::config::Environment,
    /// Where the host's root is mounted when vigil runs in a container.
    pub host_root: Option<std::path::PathBuf>,
    /// Where jobs that buffer rows for PostgreSQL spill them to disk (and how much
    /// each may keep there); `None`: in memory only.
    pub spool: Option<SpoolPlace>,
    /// Whether a `command` run may get a cgroup of its own for its measurement (where
    /// the machine lets vigil make one); `false`: its process tree is accounted.
    pub run_cgroups: bool,
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

/// Builds the job a validated spec of a built-in kind describes.
pub fn build(spec: &JobSpec, deps: &Deps) -> Result<Arc<dyn Job>, JobError> {
    Registry::builtin().build(spec, deps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_in_an_input_name_their_field() {
        let e = typed_input::<retention::RetentionInput>(&serde_json::json!({ "dry_run": 1 }))
            .unwrap_err();
        assert_eq!(e.field, "dry_run");
        let e = typed_input::<retention::RetentionInput>(&serde_json::json!({ "dry": true }))
            .unwrap_err();
        assert_eq!(e.field, "dry");
        assert!(
            e.to_string().starts_with("`dry`: unknown field `dry`"),
            "{e}"
        );
        let e = typed_input::<retention::RetentionInput>(&serde_json::json!("all")).unwrap_err();
        assert_eq!(e.field, "", "the whole input");
    }
}
