//! `retention`: deletes rows older than a configured age, in bounded batches.

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Deps, InputSpec, Job, JobError, Kind, RunContext, RunOutcome};
use crate::config::{HumanDuration, Ident, JobSettings, JobSpec, Scope, Validate};
use crate::store::Store;

/// Work done once per firing across replicas.
pub const KIND: Kind = Kind {
    name: "retention",
    default_scope: Scope::Cluster,
    read: |r| r.read::<RetentionConfig>().map(JobSettings::new),
    build,
    input: InputSpec {
        schema: || {
            serde_json::json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "dry_run": {
                        "type": "boolean",
                        "description": "Count what would be deleted (the run's items); delete nothing."
                    }
                }
            })
        },
        check: |v| super::typed_input::<RetentionInput>(v).map(|_| ()),
    },
};

/// A run's input: `{"dry_run": true}`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionInput {
    #[serde(default)]
    pub dry_run: bool,
}

fn build(spec: &JobSpec, deps: &Deps) -> Result<std::sync::Arc<dyn Job>, JobError> {
    let c: &RetentionConfig = super::settings(spec)?;
    Ok(std::sync::Arc::new(Retention::new(
        c.clone(),
        deps.store.clone(),
    )))
}

/// ```toml
/// [jobs.settings]
/// batch_size = 5000
/// tables = [
///   { table = "system_metrics", column = "ts", older_than = "30d" },
/// ]
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    pub tables: Spanned<Vec<RetentionTarget>>,
    /// Rows deleted per statement; each batch is its own short transaction.
    #[serde(default = "default_batch_size")]
    pub batch_size: Spanned<u32>,
    /// Pause between batches, to leave I/O for everyone else.
    #[serde(default)]
    pub pause: Option<HumanDuration>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionTarget {
    pub table: Ident,
    /// A timestamp column; rows whose value is older than `older_than` go.
    pub column: Ident,
    pub older_than: HumanDuration,
}

/// Small enough that one batch holds its locks for milliseconds.
const DEFAULT_BATCH_SIZE: u32 = 5_000;
const MAX_BATCH_SIZE: u32 = 1_000_000;

fn default_batch_size() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_BATCH_SIZE)
}

impl Validate for RetentionConfig {
    fn validate(&self) -> Vec<(Option<Range<usize>>, String)> {
        let mut problems = Vec::new();
        if self.tables.get_ref().is_empty() {
            problems.push((
                Some(self.tables.span()),
                "`tables` must list at least one { table, column, older_than }".to_owned(),
            ));
        }
        let size = *self.batch_size.get_ref();
        if !(1..=MAX_BATCH_SIZE).contains(&size) {
            problems.push((
                Some(self.batch_size.span()),
                format!("`batch_size` must be between 1 and {MAX_BATCH_SIZE}, found {size}"),
            ));
        }
        problems
    }
}

pub struct Retention {
    config: RetentionConfig,
    store: Store,
}

impl Retention {
    pub fn new(config: RetentionConfig, store: Store) -> Self {
        Self { config, store }
    }

    /// Counts what a real run would delete now; deletes nothing.
    async fn dry_run(&self) -> Result<RunOutcome, JobError> {
        let mut total = 0u64;
        for target in self.config.tables.get_ref() {
            let age = chrono::Duration::from_std(target.older_than.get()).map_err(|_| {
                JobError::Failed(format!("older_than {} is too large", target.older_than))
            })?;
            let cutoff = chrono::Utc::now() - age;
            let n = self
                .store
                .count_older_than(&target.table, &target.column, cutoff)
                .await
                .map_err(|e| {
                    let message = format!(
                        "counting {} where {} < {cutoff}: {e}",
                        target.table, target.column
                    );
                    JobError::from_store(&e, message)
                })?;
            tracing::info!(table = %target.table, would_delete = n, %cutoff, "retention dry run");
            total += n;
        }
        Ok(RunOutcome::Completed { items: Some(total) })
    }
}

#[async_trait::async_trait]
impl Job for Retention {
    async fn run(&self, ctx: RunContext) -> Result<RunOutcome, JobError> {
        let input: RetentionInput = match ctx.input.as_deref() {
            Some(v) => super::typed_input(v).map_err(|e| JobError::Permanent(e.to_string()))?,
            None => RetentionInput::default(),
        };
        if input.dry_run {
            return self.dry_run().await;
        }
        let batch = i64::from(*self.config.batch_size.get_ref());
        let pause = self.config.pause.map_or(Duration::ZERO, HumanDuration::get);
        let mut total = 0u64;
        for target in self.config.tables.get_ref() {
            // One cutoff per run, so the loop ends even while new rows age past it.
            let age = chrono::Duration::from_std(target.older_than.get()).map_err(|_| {
                JobError::Failed(format!("older_than {} is too large", target.older_than))
            })?;
            let cutoff = chrono::Utc::now() - age;
            let mut deleted_here = 0u64;
            // A table partitioned on the column loses whole partitions first.
            let dropped = self
                .store
                .drop_partitions_older_than(&target.table, &target.column, cutoff)
                .await
                .map_err(|e| {
                    let message = format!(
                        "dropping partitions of {} older than {cutoff}: {e}",
                        target.table
                    );
                    JobError::from_store(&e, message)
                })?;
            if let Some(dropped) = &dropped {
                deleted_here += dropped.iter().map(|(_, rows)| rows).sum::<u64>();
            }
            loop {
                let n = self
                    .store
                    .delete_batch_older_than(&target.table, &target.column, cutoff, batch)
                    .await
                    .map_err(|e| {
                        let message = format!(
                            "deleting from {} where {} < {cutoff}: {e}",
                            target.table, target.column
                        );
                        JobError::from_store(&e, message)
                    })?;
                deleted_here += n;
                if n < batch as u64 {
                    break;
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            tracing::info!(
                table = %target.table,
                deleted = deleted_here,
                partitions_dropped = dropped.as_ref().map_or(0, Vec::len),
                %cutoff,
                "retention pass done"
            );
            total += deleted_here;
        }
        Ok(RunOutcome::Completed { items: Some(total) })
    }
}
