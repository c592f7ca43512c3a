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

pub mod demo;
pub mod transform;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mongodb::bson::{Bson, RawBsonRef, RawDocument, RawDocumentBuf, doc};
use mongodb::options::{ClientOptions, ConnectionString};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use toml::Spanned;

use super::{Deps, Job, JobError, Kind, RunContext, RunOutcome};
use crate::config::{Ident, JobSettings, JobSpec, Scope, Secret, Validate};
use crate::store::sync::{LoadRow, Reject};
use crate::store::{Store, StoreError, pg_text};
use transform::{TransformError, document_to_json, occurred_at, source_id};

/// Work done once per firing across replicas.
pub const KIND: Kind = Kind {
    name: "mongo_sync",
    default_scope: Scope::Cluster,
    read: |r| r.read::<MongoSyncConfig>().map(JobSettings::new),
    build,
    input: super::InputSpec {
        schema: || {
            serde_json::json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "filter": {
                        "type": "object",
                        "description": "A MongoDB query (extended JSON) that pending documents must also match: it narrows the pending filter, never replaces it. $where, $function and $accumulator are refused."
                    },
                    "limit": {
                        "type": "integer", "minimum": 1, "maximum": MAX_INPUT_LIMIT,
                        "description": "Take at most this many pending documents in this run."
                    }
                }
            })
        },
        check: |v| SyncInput::parse(v).map(|_| ()),
    },
};

/// The most documents one invoked run may be asked to take.
const MAX_INPUT_LIMIT: u64 = 100_000_000;

/// Operators that run JavaScript on the server: never from a request.
const REFUSED_OPERATORS: [&str; 3] = ["$where", "$function", "$accumulator"];

/// A run's input: which pending documents to take.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncInput {
    pub filter: Option<mongodb::bson::Document>,
    pub limit: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyncInput {
    filter: Option<serde_json::Map<String, serde_json::Value>>,
    limit: Option<u64>,
}

impl SyncInput {
    pub fn parse(v: &serde_json::Value) -> Result<Self, super::InputError> {
        let raw: RawSyncInput = super::typed_input(v)?;
        if let Some(n) = raw.limit
            && !(1..=MAX_INPUT_LIMIT).contains(&n)
        {
            return Err(super::InputError::at(
                "limit",
                format!("must be between 1 and {MAX_INPUT_LIMIT}, found {n}"),
            ));
        }
        let filter = match raw.filter {
            None => None,
            Some(map) => {
                let json = serde_json::Value::Object(map);
                refuse_operators(&json, "filter")?;
                match Bson::try_from(json) {
                    Ok(Bson::Document(d)) => Some(d),
                    Ok(_) => {
                        return Err(super::InputError::at("filter", "must be an object"));
                    }
                    Err(e) => {
                        return Err(super::InputError::at(
                            "filter",
                            format!("not a MongoDB query in extended JSON: {e}"),
                        ));
                    }
                }
            }
        };
        Ok(Self {
            filter,
            limit: raw.limit,
        })
    }
}

fn refuse_operators(v: &serde_json::Value, path: &str) -> Result<(), super::InputError> {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{path}.{k}");
                if REFUSED_OPERATORS.contains(&k.as_str()) {
                    return Err(super::InputError::at(
                        here,
                        "runs JavaScript on the server; not allowed in a request",
                    ));
                }
                refuse_operators(v, &here)?;
            }
            Ok(())
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| refuse_operators(v, &format!("{path}[{i}]"))),
        _ => Ok(()),
    }
}

fn build(spec: &JobSpec, deps: &Deps) -> Result<std::sync::Arc<dyn Job>, JobError> {
    let c: &MongoSyncConfig = super::settings(spec)?;
    Ok(std::sync::Arc::new(MongoSync::new(
        &spec.name,
        c.clone(),
        deps.mongo_uri.as_ref(),
        deps.store.clone(),
    )))
}

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
    /// Neither the job nor `MONGO_URI` named a server: [`DEFAULT_URI`] is a guess.
    uri_is_default: bool,
    /// Whether "waiting for MongoDB" was logged already.
    said_waiting: AtomicBool,
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
        let configured = config
            .uri
            .as_ref()
            .map(|u| u.get_ref().clone())
            .or_else(|| default_uri.cloned());
        Self {
            name: name.to_owned(),
            config,
            uri_is_default: configured.is_none(),
            uri: configured.unwrap_or_else(|| Secret::new(DEFAULT_URI)),
            store,
            client: OnceCell::new(),
            fault: Mutex::new(None),
            said_waiting: AtomicBool::new(false),
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
                // An invalid URI stays invalid: not worth a retry. (A host that
                // does not resolve is the network's doing, and is retried.)
                let mut options = ClientOptions::parse(self.uri.expose()).await.map_err(|e| {
                    let message = format!("MongoDB URI {}: {e}", self.shown_uri());
                    match e.kind.as_ref() {
                        mongodb::error::ErrorKind::InvalidArgument { .. } => {
                            JobError::Permanent(message)
                        }
                        _ => JobError::Failed(message),
                    }
                })?;
                // vigil's bounds, unless the URI sets its own
                // (`serverSelectionTimeoutMS`, `connectTimeoutMS`).
                options
                    .server_selection_timeout
                    .get_or_insert(SERVER_SELECTION_TIMEOUT);
                options
                    .connect_timeout
                    .get_or_insert(SERVER_SELECTION_TIMEOUT);
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

    /// Nobody said where MongoDB is and it is not at the default address: a fresh
    /// install without MongoDB. The run waits (recorded `skipped`, not failed and
    /// retried), and the log says so once, with what to set.
    fn waiting_for_mongodb(&self, e: &mongodb::error::Error) -> Option<RunOutcome> {
        if !self.uri_is_default
            || !matches!(
                e.kind.as_ref(),
                mongodb::error::ErrorKind::ServerSelection { .. }
            )
        {
            return None;
        }
        let reason = format!(
            "waiting for MongoDB: none answers at {DEFAULT_URI} and MONGO_URI is not set; \
             set MONGO_URI (or the job's `uri`) to where it runs"
        );
        if !self.said_waiting.swap(true, Ordering::Relaxed) {
            tracing::warn!(job = %self.name, "{reason}");
        }
        Some(RunOutcome::Skipped { reason })
    }

    async fn sync(&self, ctx: &RunContext) -> Result<RunOutcome, JobError> {
        let c = &self.config;
        let collection = self
            .client()
            .await?
            .database(c.database.get_ref())
            .collection::<RawDocumentBuf>(c.collection.get_ref());
        let batch = *c.batch_size.get_ref();
        let max = *c.max_document_bytes.get_ref() as usize;
        let mut loaded = 0u64;
        let mut rejected = 0u64;
        let mut previous_first: Option<Bson> = None;
        let mut slowest_batch = Duration::ZERO;
        let input = match ctx.input.as_deref() {
            Some(v) => SyncInput::parse(v).map_err(|e| JobError::Permanent(e.to_string()))?,
            None => SyncInput::default(),
        };
        let pending = doc! { c.status_field.as_str(): c.pending.as_str() };
        // The request narrows what is pending; it never widens it.
        let query = match &input.filter {
            Some(f) => doc! { "$and": [pending, f.clone()] },
            None => pending,
        };
        let mut left = input.limit;
        loop {
            if left == Some(0) {
                tracing::info!(loaded, rejected, "the run's input limit is reached");
                break;
            }
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
            let take = left.map_or(u64::from(batch), |n| n.min(u64::from(batch)));
            let found = collection
                .find(query.clone())
                .sort(doc! { "_id": 1 })
                .limit(i64::try_from(take).unwrap_or(i64::MAX))
                .batch_size(batch)
                .await;
            let mut cursor = match found {
                Ok(cursor) => cursor,
                Err(e) => {
                    if let Some(waiting) = self.waiting_for_mongodb(&e) {
                        return Ok(waiting);
                    }
                    return Err(self.mongo_error("reading pending documents", e));
                }
            };
            let mut docs = Vec::new();
            while cursor
                .advance()
                .await
                .map_err(|e| self.mongo_error("reading pending documents", e))?
            {
                // Sized in place: an oversize document is never copied whole.
                docs.push(Fetched::read(cursor.current(), max, &c.source_id_field));
            }
            if docs.is_empty() {
                break;
            }
            let first = docs[0].id();
            if first.is_some() && first == previous_first {
                // The configuration is wrong; the next attempt would find the same.
                return Err(JobError::Permanent(format!(
                    "document {} is still {:?} after being marked; is `{}` the status field?",
                    first.map(|b| b.to_string()).unwrap_or_default(),
                    c.pending,
                    c.status_field
                )));
            }
            previous_first = first;
            let fetched = docs.len();
            if let Some(n) = &mut left {
                *n = n.saturating_sub(fetched as u64);
            }

            let outcome = self.load_documents(docs).await?;

            if self.take_fault() == Some(Fault::CrashAfterCommit) {
                return Err(JobError::Failed(
                    "injected crash after the PostgreSQL commit".into(),
                ));
            }

            // Only documents still pending: never overwrite a status someone else set.
            let now = mongodb::bson::DateTime::now();
            if !outcome.done.is_empty() {
                collection
                    .update_many(
                        doc! { "_id": { "$in": outcome.done.clone() }, c.status_field.as_str(): c.pending.as_str() },
                        doc! { "$set": { c.status_field.as_str(): c.done.as_str(), "processed_at": now } },
                    )
                    .await
                    .map_err(|e| self.mongo_error("marking documents done", e))?;
            }
            for (id, error) in &outcome.failed {
                collection
                    .update_one(
                        doc! { "_id": id.clone(), c.status_field.as_str(): c.pending.as_str() },
                        doc! { "$set": { c.status_field.as_str(): c.failed.as_str(), "sync_error": error.as_str(), "processed_at": now } },
                    )
                    .await
                    .map_err(|e| self.mongo_error("marking a document failed", e))?;
            }
            loaded += outcome.inserted;
            rejected += outcome.failed.len() as u64;
            slowest_batch = slowest_batch.max(started.elapsed());
            tracing::debug!(batch = fetched, loaded, rejected, "batch synced");
            if fetched < batch as usize {
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

    /// Transforms and loads one batch of documents, quarantining every one that cannot
    /// be loaded; says which to mark done and which failed. Fails only when PostgreSQL
    /// itself is unusable, never for what a document holds. (Public so the load path
    /// can be tested without MongoDB.)
    pub async fn load_documents(&self, docs: Vec<Fetched>) -> Result<BatchOutcome, JobError> {
        let mut outcome = BatchOutcome::default();
        let mut rejects: Vec<(Bson, Reject)> = Vec::new();
        // Rows to load, each with the document it came from, in rounds: a source id
        // seen again in the batch waits for the next round, so each copy is judged
        // against what the table holds by then (the same content, or a conflict).
        let mut rounds: Vec<Vec<(Bson, RawDocumentBuf, LoadRow)>> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for doc in docs {
            let (id, raw) = match doc {
                Fetched::Whole { id, raw } => (id, raw),
                Fetched::Oversize { id, reject } => {
                    rejects.push((id, reject));
                    continue;
                }
                Fetched::NoId { raw } => {
                    tracing::warn!(
                        size = raw.as_bytes().len(),
                        "a pending document without `_id` cannot be marked; left as it is"
                    );
                    continue;
                }
            };
            match self.transform(&raw) {
                Ok(row) => {
                    let round = seen.entry(row.source_id.clone()).or_default();
                    if rounds.len() <= *round {
                        rounds.push(Vec::new());
                    }
                    rounds[*round].push((id, raw, row));
                    *round += 1;
                }
                Err(e) => rejects.push((id.clone(), self.reject(&id, &raw, e.0))),
            }
        }
        for rows in rounds {
            self.load_round(rows, &mut outcome, &mut rejects).await?;
        }
        self.quarantine(&rejects).await?;
        outcome.failed = rejects
            .into_iter()
            .map(|(id, r)| (id, pg_text(&r.error).into_owned()))
            .collect();
        Ok(outcome)
    }

    /// Loads rows with distinct source ids. A part PostgreSQL refuses is split in two
    /// until each refused row stands alone, and is quarantined with its reason.
    async fn load_round(
        &self,
        rows: Vec<(Bson, RawDocumentBuf, LoadRow)>,
        outcome: &mut BatchOutcome,
        rejects: &mut Vec<(Bson, Reject)>,
    ) -> Result<(), JobError> {
        let table = &self.config.table;
        let by_source: HashMap<&str, usize> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.2.source_id.as_str(), i))
            .collect();
        let mut refused: Vec<(usize, String)> = Vec::new();
        let mut pending: Vec<std::ops::Range<usize>> = Vec::new();
        pending.push(0..rows.len());
        while let Some(range) = pending.pop() {
            if range.is_empty() {
                continue;
            }
            let part: Vec<LoadRow> = rows[range.clone()].iter().map(|r| r.2.clone()).collect();
            match self.store.load_rows(table, &part).await {
                Ok(loaded) => {
                    outcome.inserted += loaded.inserted.len() as u64;
                    let index = |sid: &String| by_source.get(sid.as_str()).copied();
                    for i in loaded
                        .inserted
                        .iter()
                        .chain(&loaded.unchanged)
                        .filter_map(index)
                    {
                        outcome.done.push(rows[i].0.clone());
                    }
                    for i in loaded.conflicting.iter().filter_map(index) {
                        refused.push((i, conflict(&rows[i].2.source_id)));
                    }
                }
                Err(e) if e.is_data_rejection() => {
                    if range.len() == 1 {
                        refused.push((range.start, format!("refused by PostgreSQL: {e}")));
                    } else {
                        let mid = range.start + range.len() / 2;
                        pending.push(mid..range.end);
                        pending.push(range.start..mid);
                    }
                }
                Err(e) => {
                    return Err(JobError::from_store(
                        &e,
                        format!("loading into {table}: {e}"),
                    ));
                }
            }
        }
        for (i, reason) in refused {
            let (id, raw, row) = &rows[i];
            let mut reject = self.reject(id, raw, reason);
            reject.source_id = Some(row.source_id.clone());
            rejects.push((id.clone(), reject));
        }
        Ok(())
    }

    /// The quarantine record of a whole document.
    fn reject(&self, id: &Bson, raw: &RawDocument, error: String) -> Reject {
        Reject {
            mongo_id: mongo_id_text(id),
            source_id: lookup(raw, &self.config.source_id_field).and_then(|v| source_id(v).ok()),
            error,
            document: Some(transform::lossy_document_json(raw, usize::MAX).to_string()),
            raw: raw.as_bytes().to_vec(),
            raw_size: raw.as_bytes().len(),
        }
    }

    /// Records `rejects` in `sync_rejects`. Their text is made storable and the
    /// document kept as bytes; should PostgreSQL still refuse one (a JSON view it
    /// cannot hold), each is recorded alone, without the view if need be.
    async fn quarantine(&self, rejects: &[(Bson, Reject)]) -> Result<(), JobError> {
        let failed = |e: StoreError| JobError::Failed(format!("recording rejected documents: {e}"));
        let list: Vec<Reject> = rejects.iter().map(|r| r.1.clone()).collect();
        match self.store.insert_rejects(&self.name, &list).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_data_rejection() => {
                for mut reject in list {
                    if let Err(e) = self
                        .store
                        .insert_rejects(&self.name, std::slice::from_ref(&reject))
                        .await
                    {
                        if !e.is_data_rejection() {
                            return Err(failed(e));
                        }
                        reject.document = None;
                        self.store
                            .insert_rejects(&self.name, &[reject])
                            .await
                            .map_err(failed)?;
                    }
                }
                Ok(())
            }
            Err(e) => Err(failed(e)),
        }
    }

    /// One document to one row, or why not.
    pub fn transform(&self, raw: &RawDocument) -> Result<LoadRow, TransformError> {
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

/// A pending document as read from the cursor.
#[derive(Debug)]
pub enum Fetched {
    Whole {
        id: Bson,
        raw: RawDocumentBuf,
    },
    /// Over `max_document_bytes`: only its quarantine record was made, from the
    /// cursor's buffer, keeping a bounded prefix.
    Oversize {
        id: Bson,
        reject: Reject,
    },
    /// No `_id` (not something MongoDB lets happen): nothing can mark it.
    NoId {
        raw: RawDocumentBuf,
    },
}

/// How much of an oversize document its quarantine record keeps, as BSON and as JSON.
pub const OVERSIZE_KEEP_BYTES: usize = 4096;

impl Fetched {
    /// Takes the cursor's current document; `max` is `max_document_bytes`.
    pub fn read(doc: &RawDocument, max: usize, source_id_field: &str) -> Self {
        let size = doc.as_bytes().len();
        let Some(id) = id_of(doc) else {
            return Fetched::NoId {
                raw: doc.to_raw_document_buf(),
            };
        };
        if size <= max {
            return Fetched::Whole {
                id,
                raw: doc.to_raw_document_buf(),
            };
        }
        let reject = Reject {
            mongo_id: mongo_id_text(&id),
            source_id: lookup(doc, source_id_field).and_then(|v| source_id(v).ok()),
            error: format!("document is {size} bytes, over max_document_bytes = {max}"),
            document: Some(transform::lossy_document_json(doc, OVERSIZE_KEEP_BYTES).to_string()),
            raw: doc.as_bytes()[..OVERSIZE_KEEP_BYTES.min(size)].to_vec(),
            raw_size: size,
        };
        Fetched::Oversize { id, reject }
    }

    fn id(&self) -> Option<Bson> {
        match self {
            Fetched::Whole { id, .. } | Fetched::Oversize { id, .. } => Some(id.clone()),
            Fetched::NoId { .. } => None,
        }
    }
}

/// What to do in MongoDB after a batch was loaded.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Loaded now or before with the same content: mark done.
    pub done: Vec<Bson>,
    /// Quarantined, with the reason: mark failed.
    pub failed: Vec<(Bson, String)>,
    /// Rows actually inserted.
    pub inserted: u64,
}

fn conflict(source_id: &str) -> String {
    format!(
        "conflict: source id {:?} is already loaded with different content",
        pg_text(source_id)
    )
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
        Bson::String(s) => pg_text(s).into_owned(),
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
