//! The `job_runs` ledger table.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use uuid::Uuid;

use super::{Store, StoreError};

/// Why a run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Manual,
    Retry,
    CatchUp,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
            Trigger::Retry => "retry",
            Trigger::CatchUp => "catch_up",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Trigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "schedule" => Trigger::Schedule,
            "manual" => Trigger::Manual,
            "retry" => Trigger::Retry,
            "catch_up" => Trigger::CatchUp,
            other => return Err(format!("unknown trigger {other:?}")),
        })
    }
}

/// Where a run stands. Every status but `running` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Skipped,
    Abandoned,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::TimedOut,
        RunStatus::Skipped,
        RunStatus::Abandoned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Skipped => "skipped",
            RunStatus::Abandoned => "abandoned",
        }
    }

    pub fn is_final(self) -> bool {
        self != RunStatus::Running
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown run status {s:?}, expected one of {}",
                    RunStatus::ALL.map(|s| s.as_str()).join(", ")
                )
            })
    }
}

/// One row of `job_runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: Uuid,
    pub job: String,
    pub kind: String,
    pub trigger: Trigger,
    pub attempt: u32,
    pub retry_of: Option<Uuid>,
    pub scheduled_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: RunStatus,
    pub items: Option<i64>,
    pub error: Option<String>,
    pub host: String,
    /// The job said trying again cannot help: not retried.
    #[serde(default)]
    pub permanent: bool,
    /// The pause the job asked for before its next attempt.
    #[serde(default)]
    pub retry_after_ms: Option<i64>,
    /// The input the run was invoked with.
    #[serde(default)]
    pub input: Option<serde_json::Value>,
    /// What the attempt produced (a command's stdout), written to `run_outputs`.
    #[serde(default)]
    pub output: Option<RunOutput>,
    /// What the attempt used (a command's process tree), where measured.
    #[serde(default)]
    pub resources: Option<RunResources>,
}

/// What a run used, measured by the kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResources {
    pub cpu_user_s: f64,
    pub cpu_system_s: f64,
    pub peak_rss_bytes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub measured_by: MeasuredBy,
}

/// How a run's resources were measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeasuredBy {
    /// A cgroup of the run's own: everything it started, counted by the kernel.
    Cgroup,
    /// The process tree: the program and the children it waited for, and the tree's
    /// resident memory polled.
    ProcessTree,
}

impl MeasuredBy {
    pub fn as_str(self) -> &'static str {
        match self {
            MeasuredBy::Cgroup => "cgroup",
            MeasuredBy::ProcessTree => "process_tree",
        }
    }
}

pub(super) const COLUMNS: &str = "id, job, kind, trigger, attempt, retry_of, scheduled_at, started_at, \
                       finished_at, status, items, error, host, permanent, retry_after_ms, \
                       input, cpu_user_s, cpu_system_s, peak_rss_bytes, read_bytes, \
                       written_bytes, resources_measured_by";

pub(super) fn from_row(row: &sqlx::postgres::PgRow) -> Result<RunRecord, StoreError> {
    let bad = |e: String| StoreError::Query(sqlx::Error::Decode(e.into()));
    Ok(RunRecord {
        id: row.try_get("id")?,
        job: row.try_get("job")?,
        kind: row.try_get("kind")?,
        trigger: row.try_get::<String, _>("trigger")?.parse().map_err(bad)?,
        attempt: u32::try_from(row.try_get::<i32, _>("attempt")?).unwrap_or(1),
        retry_of: row.try_get("retry_of")?,
        scheduled_at: row.try_get("scheduled_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        status: row.try_get::<String, _>("status")?.parse().map_err(bad)?,
        items: row.try_get("items")?,
        error: row.try_get("error")?,
        host: row.try_get("host")?,
        permanent: row.try_get("permanent")?,
        retry_after_ms: row.try_get("retry_after_ms")?,
        input: row
            .try_get::<Option<serde_json::Value>, _>("input")?
            .map(input_from_column),
        output: None,
        resources: resources_from_row(row)?,
    })
}

fn resources_from_row(row: &sqlx::postgres::PgRow) -> Result<Option<RunResources>, StoreError> {
    let Some(by) = row.try_get::<Option<String>, _>("resources_measured_by")? else {
        return Ok(None);
    };
    let count = |c: &str| -> Result<u64, StoreError> {
        Ok(u64::try_from(row.try_get::<Option<i64>, _>(c)?.unwrap_or(0)).unwrap_or(0))
    };
    Ok(Some(RunResources {
        cpu_user_s: row.try_get::<Option<f64>, _>("cpu_user_s")?.unwrap_or(0.0),
        cpu_system_s: row
            .try_get::<Option<f64>, _>("cpu_system_s")?
            .unwrap_or(0.0),
        peak_rss_bytes: count("peak_rss_bytes")?,
        read_bytes: count("read_bytes")?,
        written_bytes: count("written_bytes")?,
        measured_by: if by == "cgroup" {
            MeasuredBy::Cgroup
        } else {
            MeasuredBy::ProcessTree
        },
    }))
}

/// How an input that `jsonb` cannot hold as is (U+0000 in a string or key) is stored:
/// its JSON text in base64 under this one key. Any input shaped like that marker is
/// stored so too, so reading back is never ambiguous.
const ENCODED_INPUT: &str = "$vigil_json_base64";

fn input_to_column(input: &serde_json::Value) -> serde_json::Value {
    use base64::Engine as _;
    fn has_nul(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().any(has_nul),
            serde_json::Value::Object(map) => {
                map.iter().any(|(k, v)| k.contains('\0') || has_nul(v))
            }
            _ => false,
        }
    }
    let looks_encoded = input
        .as_object()
        .is_some_and(|m| m.len() == 1 && m.contains_key(ENCODED_INPUT));
    if has_nul(input) || looks_encoded {
        let text = input.to_string();
        serde_json::json!({
            ENCODED_INPUT: base64::engine::general_purpose::STANDARD.encode(text.as_bytes())
        })
    } else {
        input.clone()
    }
}

fn input_from_column(stored: serde_json::Value) -> serde_json::Value {
    use base64::Engine as _;
    let encoded = stored
        .as_object()
        .filter(|m| m.len() == 1)
        .and_then(|m| m.get(ENCODED_INPUT))
        .and_then(serde_json::Value::as_str)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    encoded.unwrap_or(stored)
}

/// A page of runs: only the filters asked for appear in the text, so every plan, the
/// generic one included, can use the job's index (`($1 IS NULL OR job = $1)` cannot).
/// Parameters: $1 job, $2 status, $3 cursor run id, $4 limit (unused ones bound too).
pub fn runs_sql(q: &RunQuery<'_>) -> String {
    let mut conditions: Vec<String> = Vec::new();
    if q.job.is_some() {
        conditions.push("job = $1".into());
    }
    if q.status.is_some() {
        conditions.push("status = $2".into());
    }
    if q.before.is_some() {
        conditions
            .push("(started_at, id) < (SELECT started_at, id FROM job_runs WHERE id = $3)".into());
    }
    // Parameters not used above still need a type: a one-time test of their NULL.
    let unused: Vec<&str> = [
        (q.job.is_none(), "$1::text IS NULL"),
        (q.status.is_none(), "$2::text IS NULL"),
        (q.before.is_none(), "$3::uuid IS NULL"),
    ]
    .into_iter()
    .filter_map(|(unused, c)| unused.then_some(c))
    .collect();
    conditions.extend(unused.into_iter().map(str::to_owned));
    format!(
        "SELECT {COLUMNS} FROM job_runs WHERE {} ORDER BY started_at DESC, id DESC LIMIT $4",
        conditions.join(" AND ")
    )
}

/// Each job's latest run: $1 the job names.
pub fn last_runs_sql() -> String {
    let columns = COLUMNS
        .split(',')
        .map(|c| format!("r.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT {columns} FROM unnest($1::text[]) AS j(name)
         CROSS JOIN LATERAL (SELECT * FROM job_runs WHERE job = j.name
                             ORDER BY started_at DESC, id DESC LIMIT 1) r"
    )
}

/// What a run produced for its caller: bytes (JSON when they parse as JSON), capped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunOutput {
    #[serde(with = "base64_bytes")]
    pub bytes: Vec<u8>,
    /// More was produced than kept.
    pub truncated: bool,
    /// Everything produced, kept or not.
    pub total_bytes: u64,
}

impl RunOutput {
    /// The output as JSON when it parses as JSON, else as text (invalid UTF-8
    /// replaced).
    pub fn to_json(&self) -> serde_json::Value {
        if !self.truncated
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.bytes)
        {
            return v;
        }
        serde_json::Value::String(String::from_utf8_lossy(&self.bytes).into_owned())
    }
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// A page of run history.
#[derive(Debug, Clone, Default)]
pub struct RunQuery<'a> {
    pub job: Option<&'a str>,
    pub status: Option<RunStatus>,
    /// Keyset cursor: only runs older than this one (ids are time-ordered UUIDv7).
    pub before: Option<Uuid>,
    pub limit: i64,
}

impl Store {
    /// Inserts or advances ledger rows in one statement. A row that already reached a
    /// final status is never changed again, so a late or repeated write is harmless.
    pub async fn upsert_runs(&self, runs: &[RunRecord]) -> Result<(), StoreError> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(runs.len());
        let mut jobs = Vec::with_capacity(runs.len());
        let mut kinds = Vec::with_capacity(runs.len());
        let mut triggers = Vec::with_capacity(runs.len());
        let mut attempts = Vec::with_capacity(runs.len());
        let mut retry_ofs = Vec::with_capacity(runs.len());
        let mut scheduled = Vec::with_capacity(runs.len());
        let mut started = Vec::with_capacity(runs.len());
        let mut finished = Vec::with_capacity(runs.len());
        let mut statuses = Vec::with_capacity(runs.len());
        let mut items = Vec::with_capacity(runs.len());
        let mut errors = Vec::with_capacity(runs.len());
        let mut hosts = Vec::with_capacity(runs.len());
        let mut permanents = Vec::with_capacity(runs.len());
        let mut retry_afters = Vec::with_capacity(runs.len());
        let mut inputs = Vec::with_capacity(runs.len());
        let mut cpu_user = Vec::with_capacity(runs.len());
        let mut cpu_system = Vec::with_capacity(runs.len());
        let mut peak_rss = Vec::with_capacity(runs.len());
        let mut read = Vec::with_capacity(runs.len());
        let mut written = Vec::with_capacity(runs.len());
        let mut measured_by = Vec::with_capacity(runs.len());
        for r in runs {
            ids.push(r.id);
            jobs.push(r.job.as_str());
            kinds.push(r.kind.as_str());
            triggers.push(r.trigger.as_str());
            attempts.push(i32::try_from(r.attempt).unwrap_or(i32::MAX));
            retry_ofs.push(r.retry_of);
            scheduled.push(r.scheduled_at);
            started.push(r.started_at);
            finished.push(r.finished_at);
            statuses.push(r.status.as_str());
            items.push(r.items);
            errors.push(r.error.as_deref());
            hosts.push(r.host.as_str());
            permanents.push(r.permanent);
            retry_afters.push(r.retry_after_ms);
            inputs.push(r.input.as_ref().map(input_to_column));
            let res = r.resources.as_ref();
            let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            cpu_user.push(res.map(|x| x.cpu_user_s));
            cpu_system.push(res.map(|x| x.cpu_system_s));
            peak_rss.push(res.map(|x| big(x.peak_rss_bytes)));
            read.push(res.map(|x| big(x.read_bytes)));
            written.push(res.map(|x| big(x.written_bytes)));
            measured_by.push(res.map(|x| x.measured_by.as_str()));
        }
        let write = sqlx::query(
            "INSERT INTO job_runs (id, job, kind, trigger, attempt, retry_of, scheduled_at, \
                                   started_at, finished_at, status, items, error, host, \
                                   permanent, retry_after_ms, input, cpu_user_s, cpu_system_s, \
                                   peak_rss_bytes, read_bytes, written_bytes, \
                                   resources_measured_by)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], \
                                  $6::uuid[], $7::timestamptz[], $8::timestamptz[], \
                                  $9::timestamptz[], $10::text[], $11::bigint[], $12::text[], \
                                  $13::text[], $14::bool[], $15::bigint[], $16::jsonb[], \
                                  $17::float8[], $18::float8[], $19::bigint[], $20::bigint[], \
                                  $21::bigint[], $22::text[])
             ON CONFLICT (id) DO UPDATE SET
                 finished_at = EXCLUDED.finished_at,
                 status = EXCLUDED.status,
                 items = EXCLUDED.items,
                 error = EXCLUDED.error,
                 permanent = EXCLUDED.permanent,
                 retry_after_ms = EXCLUDED.retry_after_ms,
                 cpu_user_s = EXCLUDED.cpu_user_s,
                 cpu_system_s = EXCLUDED.cpu_system_s,
                 peak_rss_bytes = EXCLUDED.peak_rss_bytes,
                 read_bytes = EXCLUDED.read_bytes,
                 written_bytes = EXCLUDED.written_bytes,
                 resources_measured_by = EXCLUDED.resources_measured_by
             WHERE job_runs.status = 'running'",
        )
        .bind(&ids)
        .bind(&jobs)
        .bind(&kinds)
        .bind(&triggers)
        .bind(&attempts)
        .bind(&retry_ofs)
        .bind(&scheduled)
        .bind(&started)
        .bind(&finished)
        .bind(&statuses)
        .bind(&items)
        .bind(&errors)
        .bind(&hosts)
        .bind(&permanents)
        .bind(&retry_afters)
        .bind(&inputs)
        .bind(&cpu_user)
        .bind(&cpu_system)
        .bind(&peak_rss)
        .bind(&read)
        .bind(&written)
        .bind(&measured_by);
        self.hot_write(async |c| write.execute(c).await).await?;
        // Outputs, by run (the first attempt's id): the latest attempt's wins.
        let outputs: Vec<&RunRecord> = runs.iter().filter(|r| r.output.is_some()).collect();
        if !outputs.is_empty() {
            let mut run_ids = Vec::new();
            let mut jobs = Vec::new();
            let mut bytes = Vec::new();
            let mut truncated = Vec::new();
            let mut totals = Vec::new();
            let mut at = Vec::new();
            for r in outputs {
                let Some(o) = &r.output else { continue };
                run_ids.push(r.retry_of.unwrap_or(r.id));
                jobs.push(r.job.as_str());
                bytes.push(o.bytes.as_slice());
                truncated.push(o.truncated);
                totals.push(i64::try_from(o.total_bytes).unwrap_or(i64::MAX));
                at.push(r.finished_at.unwrap_or(r.started_at));
            }
            let write = sqlx::query(
                "INSERT INTO run_outputs (run_id, job, output, truncated, total_bytes, created_at)
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bytea[], $4::bool[],
                                      $5::bigint[], $6::timestamptz[])
                 ON CONFLICT (run_id) DO UPDATE SET output = EXCLUDED.output,
                     truncated = EXCLUDED.truncated, total_bytes = EXCLUDED.total_bytes,
                     created_at = EXCLUDED.created_at
                 WHERE run_outputs.created_at <= EXCLUDED.created_at",
            )
            .bind(&run_ids)
            .bind(&jobs)
            .bind(&bytes)
            .bind(&truncated)
            .bind(&totals)
            .bind(&at)
            .execute(&self.pool);
            self.bounded(async { Ok(write.await?) }).await?;
        }
        Ok(())
    }

    /// A run's output (by the run's id: its first attempt's).
    pub async fn run_output(&self, run_id: Uuid) -> Result<Option<RunOutput>, StoreError> {
        let row =
            sqlx::query("SELECT output, truncated, total_bytes FROM run_outputs WHERE run_id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok(RunOutput {
                bytes: r.try_get("output")?,
                truncated: r.try_get("truncated")?,
                total_bytes: u64::try_from(r.try_get::<i64, _>("total_bytes")?).unwrap_or(0),
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| StoreError::from(e))
    }

    /// Marks the runs `host` left `running` as `abandoned`; returns how many.
    pub async fn abandon_running(&self, host: &str, reason: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE job_runs SET status = 'abandoned', finished_at = now(), error = $2
             WHERE host = $1 AND status = 'running'",
        )
        .bind(host)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The latest scheduled firing recorded for `job` (run, skipped or caught up).
    pub async fn last_firing(&self, job: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let at: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT max(scheduled_at) FROM job_runs
             WHERE job = $1 AND trigger IN ('schedule', 'catch_up')",
        )
        .bind(job)
        .fetch_one(&self.pool)
        .await?;
        Ok(at)
    }

    pub async fn run(&self, id: Uuid) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM job_runs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// The latest attempt of the run whose first attempt is `run_id`.
    pub async fn latest_attempt(&self, run_id: Uuid) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM job_runs WHERE id = $1 OR retry_of = $1
             ORDER BY attempt DESC LIMIT 1"
        ))
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Runs newest first, filtered and paged by keyset.
    pub async fn runs(&self, q: &RunQuery<'_>) -> Result<Vec<RunRecord>, StoreError> {
        let rows = sqlx::query(&runs_sql(q))
            .bind(q.job)
            .bind(q.status.map(RunStatus::as_str))
            .bind(q.before)
            .bind(q.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// The most recent run of each of `jobs`, for "last run" views: one index lookup
    /// per job (`job_runs_job_started_idx`), never a scan of the ledger.
    pub async fn last_runs_of(&self, jobs: &[String]) -> Result<Vec<RunRecord>, StoreError> {
        let rows = sqlx::query(&last_runs_sql())
            .bind(jobs)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_jsonb_cannot_hold_round_trip_through_their_column_form() {
        let plain = serde_json::json!({ "a": [1, "two", null] });
        assert_eq!(input_to_column(&plain), plain, "stored as is");
        for hostile in [
            serde_json::json!("nul \u{0} inside"),
            serde_json::json!({ "k\u{0}": [{ "deep": "\u{0}" }] }),
            serde_json::json!({ ENCODED_INPUT: "not base64 at all" }),
        ] {
            let stored = input_to_column(&hostile);
            assert!(!stored.to_string().contains("\\u0000"), "{stored}");
            assert_eq!(input_from_column(stored), hostile);
        }
    }

    #[test]
    fn statuses_and_triggers_round_trip_through_their_column_text() {
        for s in RunStatus::ALL {
            assert_eq!(s.as_str().parse::<RunStatus>().unwrap(), s);
        }
        for t in [
            Trigger::Schedule,
            Trigger::Manual,
            Trigger::Retry,
            Trigger::CatchUp,
        ] {
            assert_eq!(t.as_str().parse::<Trigger>().unwrap(), t);
        }
        assert!("done".parse::<RunStatus>().is_err());
    }
}
