//! `mongo_sync`: documents whose status field says "pending" (by default `status =
//! "ingested"`) are read from MongoDB in `_id` order, transformed to JSON, loaded into
//! PostgreSQL, and only then marked done. Exactly once, by construction:
//! - a document is marked done only after its row is committed;
//! - a crash between the commit and the mark leaves it pending, the next run loads it
//!   again, and `ON CONFLICT (source_id) DO NOTHING` keeps PostgreSQL free of
//!   duplicates before it is marked;
//! - one run at a time per job, across triggers and replicas (an advisory lock);
//! - documents that cannot be loaded are marked failed with `sync_error` and kept in
//!   `sync_rejects`; the rest of the batch goes on.

pub mod transform;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use mongodb::bson::{Bson, RawBsonRef, RawDocument, RawDocumentBuf, doc};
use mongodb::options::{ClientOptions, ConnectionString};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use toml::Spanned;

use super::{Job, JobError, RunContext, RunOutcome};
use crate::config::{Ident, Secret, Validate};
use crate::store::Store;
use crate::store::sync::{LoadRow, Reject};
use transform::{TransformError, document_to_json, occurred_at, source_id};

/// Used when neither the job nor `MONGO_URI` names a server: MongoDB's own default.
pub const DEFAULT_URI: &str = "mongodb://localhost:27017";

/// ```toml
/// [jobs.settings]
/// database = "observability"
/// collection = "readings"
/// occurred_at_field = "timestamp"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSyncConfig {
    /// Default: `MONGO_URI`, else [`DEFAULT_URI`].
    pub uri: Option<Spanned<Secret>>,
    pub database: Spanned<String>,
    pub collection: Spanned<String>,
    #[serde(default = "default_status_field")]
    pub status_field: String,
    #[serde(default = "default_pending")]
    pub pending: String,
    #[serde(default = "default_done")]
    pub done: String,
    #[serde(default = "default_failed")]
    pub failed: String,
    #[serde(default = "default_batch_size")]
    pub batch_size: Spanned<u32>,
    /// Target table: it needs `source_id text UNIQUE`, `payload jsonb`, `occurred_at timestamptz`.
    #[serde(default = "default_table")]
    pub table: Ident,
    /// The field whose value identifies a document in the target table (dots descend).
    #[serde(default = "default_source_id_field")]
    pub source_id_field: String,
    /// The field giving `occurred_at` (a date, an RFC 3339 string or epoch ms).
    pub occurred_at_field: Option<String>,
    /// Top-level fields left out of the payload; default: the status field.
    pub drop_fields: Option<Vec<String>>,
    /// Top-level fields renamed in the payload, `{ old = "new" }`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Larger documents (BSON bytes) are rejected.
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: Spanned<u32>,
}

fn default_status_field() -> String {
    "status".into()
}
fn default_pending() -> String {
    "ingested".into()
}
fn default_done() -> String {
    "processed".into()
}
fn default_failed() -> String {
    "failed".into()
}
/// Big enough to amortise round trips, small enough for one statement and one
/// `$in` list.
fn default_batch_size() -> Spanned<u32> {
    Spanned::new(0..0, 500)
}
fn default_table() -> Ident {
    Ident::parse("reading_analytics").unwrap_or_else(|_| unreachable!("a valid identifier"))
}
fn default_source_id_field() -> String {
    "_id".into()
}
/// 1 MiB: far above a reading, far below MongoDB's 16 MiB cap.
fn default_max_document_bytes() -> Spanned<u32> {
    Spanned::new(0..0, 1 << 20)
}

const MAX_BATCH_SIZE: u32 = 10_000;
const MAX_DOCUMENT_BYTES: u32 = 16 << 20;

impl Validate for MongoSyncConfig {
    fn validate(&self) -> Vec<(Option<Range<usize>>, String)> {
        let mut problems = Vec::new();
        if let Some(uri) = &self.uri
            && ConnectionString::parse(uri.get_ref().expose()).is_err()
        {
            problems.push((
                Some(uri.span()),
                "`uri` is not a MongoDB connection string (mongodb://… or mongodb+srv://…)".into(),
            ));
        }
        for (field, value) in [
            ("database", &self.database),
            ("collection", &self.collection),
        ] {
            if value.get_ref().trim().is_empty() {
                problems.push((Some(value.span()), format!("`{field}` must not be empty")));
            }
        }
        let size = *self.batch_size.get_ref();
        if !(1..=MAX_BATCH_SIZE).contains(&size) {
            problems.push((
                Some(self.batch_size.span()),
                format!("`batch_size` must be between 1 and {MAX_BATCH_SIZE}, found {size}"),
            ));
        }
        let max = *self.max_document_bytes.get_ref();
        if !(1..=MAX_DOCUMENT_BYTES).contains(&max) {
            problems.push((
                Some(self.max_document_bytes.span()),
                format!(
                    "`max_document_bytes` must be between 1 and {MAX_DOCUMENT_BYTES}, found {max}"
                ),
            ));
        }
        if self.pending == self.done || self.pending == self.failed || self.done == self.failed {
            problems.push((
                None,
                "`pending`, `done` and `failed` must be three different values".into(),
            ));
        }
        if self.rename.values().any(|v| v.is_empty()) {
            problems.push((None, "`rename` targets must not be empty".into()));
        }
        problems
    }
}

/// Faults a test can inject to prove the recovery paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail right after the PostgreSQL commit, before marking MongoDB (a crash there).
    CrashAfterCommit,
}

pub struct MongoSync {
    name: String,
    config: MongoSyncConfig,
    uri: Secret,
    store: Store,
    client: OnceCell<mongodb::Client>,
    fault: Mutex<Option<Fault>>,
}

/// How long MongoDB may take to answer before the run fails with "unreachable".
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);

impl MongoSync {
    pub fn new(
        name: &str,
        config: MongoSyncConfig,
        default_uri: Option<&Secret>,
        store: Store,
    ) -> Self {
        let uri = config
            .uri
            .as_ref()
            .map(|u| u.get_ref().clone())
            .or_else(|| default_uri.cloned())
            .unwrap_or_else(|| Secret::new(DEFAULT_URI));
        Self {
            name: name.to_owned(),
            config,
            uri,
            store,
            client: OnceCell::new(),
            fault: Mutex::new(None),
        }
    }

    /// Makes the next run fail at `fault` (tests).
    pub fn inject_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(fault);
    }

    fn take_fault(&self) -> Option<Fault> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The URI without its password, for messages.
    fn shown_uri(&self) -> String {
        crate::config::redact_url(self.uri.expose())
    }

    async fn client(&self) -> Result<&mongodb::Client, JobError> {
        self.client
            .get_or_try_init(|| async {
                let mut options = ClientOptions::parse(self.uri.expose()).await.map_err(|e| {
                    JobError::Failed(format!("MongoDB URI {}: {e}", self.shown_uri()))
                })?;
                options.server_selection_timeout = Some(SERVER_SELECTION_TIMEOUT);
                options.connect_timeout = Some(SERVER_SELECTION_TIMEOUT);
                options.app_name = Some("vigil".into());
                mongodb::Client::with_options(options)
                    .map_err(|e| JobError::Failed(format!("MongoDB {}: {e}", self.shown_uri())))
            })
            .await
    }

    fn mongo_error(&self, what: &str, e: mongodb::error::Error) -> JobError {
        JobError::Failed(format!(
            "MongoDB {} ({}.{}): {what}: {e}",
            self.shown_uri(),
            self.config.database.get_ref(),
            self.config.collection.get_ref()
        ))
    }

    async fn sync(&self, ctx: &RunContext) -> Result<RunOutcome, JobError> {
        let c = &self.config;
        let collection = self
            .client()
            .await?
            .database(c.database.get_ref())
            .collection::<RawDocumentBuf>(c.collection.get_ref());
        let batch = *c.batch_size.get_ref();
        let mut loaded = 0u64;
        let mut rejected = 0u64;
        let mut previous_first: Option<Bson> = None;
        let mut slowest_batch = Duration::ZERO;
        loop {
            // Stop starting batches when one more might not finish before the timeout.
            let margin = (slowest_batch * 2).max(Duration::from_secs(1));
            if Instant::now() + margin >= ctx.deadline {
                tracing::info!(
                    loaded,
                    rejected,
                    "time budget spent; the rest waits for the next run"
                );
                break;
            }
            let started = Instant::now();
            let mut cursor = collection
                .find(doc! { c.status_field.as_str(): c.pending.as_str() })
                .sort(doc! { "_id": 1 })
                .limit(i64::from(batch))
                .batch_size(batch)
                .await
                .map_err(|e| self.mongo_error("reading pending documents", e))?;
            let mut docs = Vec::new();
            while cursor
                .advance()
                .await
                .map_err(|e| self.mongo_error("reading pending documents", e))?
            {
                docs.push(cursor.current().to_raw_document_buf());
            }
            if docs.is_empty() {
                break;
            }
            let first = id_of(&docs[0]);
            if first.is_some() && first == previous_first {
                return Err(JobError::Failed(format!(
                    "document {} is still {:?} after being marked; is `{}` the status field?",
                    first.map(|b| b.to_string()).unwrap_or_default(),
                    c.pending,
                    c.status_field
                )));
            }
            previous_first = first;

            let mut rows = Vec::new();
            let mut good_ids = Vec::new();
            let mut rejects = Vec::new();
            let mut bad_ids = Vec::new();
            for raw in &docs {
                let Some(id) = id_of(raw) else { continue };
                match self.transform(raw) {
                    Ok(row) => {
                        rows.push(row);
                        good_ids.push(id);
                    }
                    Err(e) => {
                        rejects.push(Reject {
                            mongo_id: mongo_id_text(&id),
                            source_id: lookup(raw, &c.source_id_field)
                                .and_then(|v| source_id(v).ok()),
                            error: e.0.clone(),
                            document: document_to_json(raw).ok().map(|v| v.to_string()),
                        });
                        bad_ids.push((id, e.0));
                    }
                }
            }

            self.store
                .load_batch(&c.table, &self.name, &rows, &rejects)
                .await
                .map_err(|e| JobError::Failed(format!("loading into {}: {e}", c.table)))?;

            if self.take_fault() == Some(Fault::CrashAfterCommit) {
                return Err(JobError::Failed(
                    "injected crash after the PostgreSQL commit".into(),
                ));
            }

            // Only documents still pending: never overwrite a status someone else set.
            let now = mongodb::bson::DateTime::now();
            if !good_ids.is_empty() {
                collection
                    .update_many(
                        doc! { "_id": { "$in": good_ids }, c.status_field.as_str(): c.pending.as_str() },
                        doc! { "$set": { c.status_field.as_str(): c.done.as_str(), "processed_at": now } },
                    )
                    .await
                    .map_err(|e| self.mongo_error("marking documents done", e))?;
            }
            for (id, error) in bad_ids {
                collection
                    .update_one(
                        doc! { "_id": id, c.status_field.as_str(): c.pending.as_str() },
                        doc! { "$set": { c.status_field.as_str(): c.failed.as_str(), "sync_error": error, "processed_at": now } },
                    )
                    .await
                    .map_err(|e| self.mongo_error("marking a document failed", e))?;
            }
            loaded += rows.len() as u64;
            rejected += rejects.len() as u64;
            slowest_batch = slowest_batch.max(started.elapsed());
            tracing::debug!(batch = docs.len(), loaded, rejected, "batch synced");
            if docs.len() < batch as usize {
                break;
            }
        }
        if rejected > 0 {
            tracing::warn!(rejected, "documents rejected; see sync_rejects");
        }
        Ok(RunOutcome::Completed {
            items: Some(loaded),
        })
    }

    /// One document to one row, or why not.
    fn transform(&self, raw: &RawDocument) -> Result<LoadRow, TransformError> {
        let c = &self.config;
        let size = raw.as_bytes().len();
        let max = *c.max_document_bytes.get_ref() as usize;
        if size > max {
            return Err(TransformError(format!(
                "document is {size} bytes, over max_document_bytes = {max}"
            )));
        }
        let source = match lookup(raw, &c.source_id_field) {
            Some(v) => source_id(v)?,
            None => {
                return Err(TransformError(format!(
                    "no `{}` field to use as the source id",
                    c.source_id_field
                )));
            }
        };
        let occurred = match &c.occurred_at_field {
            Some(field) => match lookup(raw, field) {
                Some(v) => occurred_at(v).map_err(|e| TransformError(format!("`{field}`: {e}")))?,
                None => None,
            },
            None => None,
        };
        let Value::Object(mut payload) = document_to_json(raw)? else {
            return Err(TransformError("document is not an object".into()));
        };
        let dropped = c
            .drop_fields
            .clone()
            .unwrap_or_else(|| vec![c.status_field.clone()]);
        for field in &dropped {
            payload.remove(field);
        }
        for (from, to) in &c.rename {
            if let Some(v) = payload.remove(from) {
                payload.insert(to.clone(), v);
            }
        }
        Ok(LoadRow {
            source_id: source,
            payload: Value::Object(payload).to_string(),
            occurred_at: occurred,
        })
    }
}

/// A document's `_id`, owned, for filters.
fn id_of(raw: &RawDocument) -> Option<Bson> {
    raw.get("_id")
        .ok()
        .flatten()
        .and_then(|v| Bson::try_from(v).ok())
}

fn mongo_id_text(id: &Bson) -> String {
    match id {
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::String(s) => s.clone(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// The value at `path`: an exact top-level key first (keys may contain dots), else the
/// dotted path through embedded documents.
fn lookup<'a>(doc: &'a RawDocument, path: &str) -> Option<RawBsonRef<'a>> {
    if let Ok(Some(v)) = doc.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut current = doc.get(parts.next()?).ok().flatten()?;
    for part in parts {
        current = match current {
            RawBsonRef::Document(d) => d.get(part).ok().flatten()?,
            _ => return None,
        };
    }
    Some(current)
}

#[async_trait::async_trait]
impl Job for MongoSync {
    async fn run(&self, ctx: RunContext) -> Result<RunOutcome, JobError> {
        let Some(lock) = self
            .store
            .try_job_lock(&self.name)
            .await
            .map_err(|e| JobError::Failed(format!("PostgreSQL: taking the job lock: {e}")))?
        else {
            return Ok(RunOutcome::Skipped {
                reason: format!(
                    "another run of \"{}\" holds its lock (a trigger, or another replica)",
                    self.name
                ),
            });
        };
        let result = self.sync(&ctx).await;
        lock.release().await;
        result
    }
}
