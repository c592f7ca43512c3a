//! Configuration: the `jobs.toml` model and the runner settings, validated together.
//!
//! This is the only module that reads the environment or configuration files.

mod alerts;
mod diagnostic;
mod file;
mod job;
mod kinds;
mod schedule;
mod settings;
mod types;

pub use alerts::{
    AlertOn, AlertRule, DEFAULT_ALERT_ON, DEFAULT_NOTIFIER_TIMEOUT, Heartbeat, Notifier,
    NotifierKind,
};
pub use diagnostic::{Diagnostic, Diagnostics, Origin, SourceMap};
pub use file::{JobsFile, RunnerEntry, Validate, digest, unreadable};
pub use job::{CatchUp, JobSpec, Overlap, RetryConfig, RetryPolicy, Scope};
pub use kinds::{JobSettings, Kinds, SettingsReader};
pub use schedule::{CronExpr, Schedule, TimeZone};
pub use settings::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_INPUT_BYTES, DEFAULT_MAX_WAITING, DatabaseTarget,
    Environment, Secret, Settings, parse_bytes, redact, redact_url, register_secret,
};
pub use types::{HumanDuration, Ident, Slug};

use std::path::Path;

/// Everything vigil needs to start, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: JobsFile,
    pub settings: Settings,
    /// The environment the settings were read from; a reload reads the file against it.
    pub env: Environment,
}

/// Loads `jobs.toml` (its jobs of `kinds`) and the settings layered over it, reporting
/// every problem at once.
pub fn load(path: &Path, env: &Environment, kinds: &dyn Kinds) -> Result<Config, Diagnostics> {
    combine(file::load(path, kinds, env), env)
}

/// Like [`load`], with the file's contents already read (`text`, as if read from `path`).
pub fn load_text(
    path: &Path,
    text: &str,
    env: &Environment,
    kinds: &dyn Kinds,
) -> Result<Config, Diagnostics> {
    combine(file::parse_keeping_runner(path, text, kinds, env), env)
}

fn combine(
    file: Result<JobsFile, (Diagnostics, Vec<RunnerEntry>)>,
    env: &Environment,
) -> Result<Config, Diagnostics> {
    let runner = match &file {
        Ok(f) => f.runner.as_slice(),
        Err((_, runner)) => runner.as_slice(),
    };
    let settings = Settings::load(runner, env);
    match (file, settings) {
        (Ok(file), Ok(settings)) => Ok(Config {
            file,
            settings,
            env: env.clone(),
        }),
        (file, settings) => {
            let mut all = Vec::new();
            if let Err(Diagnostics(d)) = settings {
                all.extend(d);
            }
            if let Err((Diagnostics(d), _)) = file {
                all.extend(d);
            }
            // One order for everything: by position in the file, environment first.
            all.sort_by_key(|d| match &d.origin {
                Origin::File { line, col, .. } => (1, *line, *col),
                _ => (0, 0, 0),
            });
            Err(Diagnostics(all))
        }
    }
}

/// Parses jobs of `kinds` from a string, as if read from `path`; for tests and tools
/// (secrets named by `{ env = "…" }` are not found: there is no environment).
pub fn parse_jobs(path: &Path, text: &str, kinds: &dyn Kinds) -> Result<JobsFile, Diagnostics> {
    file::parse(path, text, kinds, &Environment::default())
}
