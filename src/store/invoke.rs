//! Invoking jobs like functions: idempotency keys, pauses and run callbacks.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row as _;
use uuid::Uuid;

use super::{Store, StoreError};

/// How long an idempotency key holds its run.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What claiming an idempotency key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClaim {
    /// The key is ours: start the run with the id we offered.
    New,
    /// The key started this run before, with the same input.
    Replay(Uuid),
    /// The key was used with a different input.
    Conflict(Uuid),
}

/// A callback leased for delivery.
#[derive(Debug, Clone)]
pub struct PendingCallback {
    pub run_id: Uuid,
    pub url: String,
    pub payload: Value,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Claims `key` for `job` with a run `run_id` not started yet. A key older than
    /// [`IDEMPOTENCY_WINDOW`] is free again.
    pub async fn claim_idempotency_key(
        &self,
        job: &str,
        key: &str,
        input_hash: &str,
        run_id: Uuid,
    ) -> Result<KeyClaim, StoreError> {
        let call = async {
            let window = IDEMPOTENCY_WINDOW;
            let row = sqlx::query(
                "INSERT INTO idempotency_keys AS k (job, key, input_hash, run_id, created_at)
                 VALUES ($1, $2, $3, $4, now())
                 ON CONFLICT (job, key) DO UPDATE
                     SET input_hash = EXCLUDED.input_hash, run_id = EXCLUDED.run_id,
                         created_at = EXCLUDED.created_at
                     WHERE k.created_at < now() - $5::interval
                 RETURNING run_id",
            )
            .bind(job)
            .bind(key)
            .bind(input_hash)
            .bind(run_id)
            .bind(window)
            .fetch_optional(&self.pool)
            .await?;
            if row.is_some() {
                return Ok(KeyClaim::New);
            }
            let (hash, existing): (String, Uuid) = sqlx::query_as(
                "SELECT input_hash, run_id FROM idempotency_keys WHERE job = $1 AND key = $2",
            )
            .bind(job)
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
            Ok::<_, StoreError>(if hash == input_hash {
                KeyClaim::Replay(existing)
            } else {
                KeyClaim::Conflict(existing)
            })
        };
        self.bounded(call).await
    }

    /// Lets a key go when the run it was claimed for never started.
    pub async fn release_idempotency_key(
        &self,
        job: &str,
        key: &str,
        run_id: Uuid,
    ) -> Result<(), StoreError> {
        let call = async {
            sqlx::query("DELETE FROM idempotency_keys WHERE job = $1 AND key = $2 AND run_id = $3")
                .bind(job)
                .bind(key)
                .bind(run_id)
                .execute(&self.pool)
                .await?;
            Ok::<_, StoreError>(())
        };
        self.bounded(call).await
    }

    /// Pauses `job` (until `until`, or until resumed).
    pub async fn pause_job(
        &self,
        job: &str,
        until: Option<DateTime<Utc>>,
        by: &str,
    ) -> Result<(), StoreError> {
        let call = async {
            sqlx::query(
                "INSERT INTO job_pauses (job, paused_at, until, paused_by) VALUES ($1, now(), $2, $3)
                 ON CONFLICT (job) DO UPDATE SET paused_at = now(), until = $2, paused_by = $3",
            )
            .bind(job)
            .bind(until)
            .bind(by)
            .execute(&self.pool)
            .await?;
            Ok::<_, StoreError>(())
        };
        self.bounded(call).await
    }

    /// Resumes `job`; `true` if it was paused.
    pub async fn resume_job(&self, job: &str) -> Result<bool, StoreError> {
        let call = async {
            let done = sqlx::query("DELETE FROM job_pauses WHERE job = $1")
                .bind(job)
                .execute(&self.pool)
                .await?;
            Ok::<_, StoreError>(done.rows_affected() > 0)
        };
        self.bounded(call).await
    }

    /// Every pause still in force, by job (`None`: until resumed).
    ///
    /// Every replica asks every few seconds for ever: on the hot connection, as the
    /// per-run writes are, so it costs one round trip and not the pool's two (sqlx
    /// pings a connection it hands out).
    pub async fn pauses(&self) -> Result<BTreeMap<String, Option<DateTime<Utc>>>, StoreError> {
        let rows: Vec<(String, Option<DateTime<Utc>>)> = self
            .hot_write(async |c| {
                sqlx::query_as(
                    "SELECT job, until FROM job_pauses WHERE until IS NULL OR until > now()",
                )
                .fetch_all(c)
                .await
            })
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Registers a callback for a run about to start.
    pub async fn register_callback(
        &self,
        run_id: Uuid,
        job: &str,
        url: &str,
    ) -> Result<(), StoreError> {
        let call = async {
            sqlx::query(
                "INSERT INTO callback_deliveries (run_id, job, url, created_at)
                 VALUES ($1, $2, $3, now()) ON CONFLICT (run_id) DO NOTHING",
            )
            .bind(run_id)
            .bind(job)
            .bind(url)
            .execute(&self.pool)
            .await?;
            Ok::<_, StoreError>(())
        };
        self.bounded(call).await
    }

    /// Removes the callback of a run that was refused before it started.
    pub async fn cancel_callback(&self, run_id: Uuid) -> Result<(), StoreError> {
        let call = async {
            sqlx::query("DELETE FROM callback_deliveries WHERE run_id = $1 AND payload IS NULL")
                .bind(run_id)
                .execute(&self.pool)
                .await?;
            Ok::<_, StoreError>(())
        };
        self.bounded(call).await
    }

    /// The run ended: its callback (if any) is due with `payload`. `true` if there is
    /// one.
    pub async fn callback_due(&self, run_id: Uuid, payload: &Value) -> Result<bool, StoreError> {
        let call = async {
            let done = sqlx::query(
                "UPDATE callback_deliveries SET payload = $2, due_at = now()
                 WHERE run_id = $1 AND payload IS NULL",
            )
            .bind(run_id)
            .bind(payload)
            .execute(&self.pool)
            .await?;
            Ok::<_, StoreError>(done.rows_affected() > 0)
        };
        self.bounded(call).await
    }

    /// Runs of `host` that ended `abandoned` with a callback not yet due: each run's
    /// first attempt id and its last attempt.
    pub async fn abandoned_with_callbacks(
        &self,
        host: &str,
    ) -> Result<Vec<(Uuid, super::runs::RunRecord)>, StoreError> {
        let columns = super::runs::COLUMNS
            .split(',')
            .map(|c| format!("r.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let call = async {
            let rows = sqlx::query(&format!(
                "SELECT c.run_id AS first_id, {columns} FROM callback_deliveries c
                 CROSS JOIN LATERAL (SELECT * FROM job_runs
                                     WHERE id = c.run_id OR retry_of = c.run_id
                                     ORDER BY attempt DESC LIMIT 1) r
                 WHERE c.payload IS NULL AND r.status = 'abandoned' AND r.host = $1"
            ))
            .bind(host)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|row| Ok((row.try_get("first_id")?, super::runs::from_row(row)?)))
                .collect::<Result<Vec<_>, StoreError>>()
        };
        self.bounded(call).await
    }

    /// Leases up to `limit` due callbacks to `host` for `lease`.
    pub async fn lease_callbacks(
        &self,
        host: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<PendingCallback>, StoreError> {
        let call = async {
            let rows = sqlx::query(
                "UPDATE callback_deliveries c SET lease_until = now() + $2, leased_by = $1
                 FROM (SELECT run_id FROM callback_deliveries
                       WHERE delivered_at IS NULL AND gave_up_at IS NULL AND due_at <= now()
                         AND (lease_until IS NULL OR lease_until < now())
                       ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED) d
                 WHERE c.run_id = d.run_id
                 RETURNING c.run_id, c.url, c.payload, c.attempts, c.created_at",
            )
            .bind(host)
            .bind(lease)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(PendingCallback {
                        run_id: r.try_get("run_id")?,
                        url: r.try_get("url")?,
                        payload: r.try_get("payload")?,
                        attempts: r.try_get("attempts")?,
                        created_at: r.try_get("created_at")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        };
        self.bounded(call).await
    }

    /// Records a callback attempt and what follows (delivered, retried at `retry_at`,
    /// or given up when `retry_at` is `None`).
    #[allow(clippy::too_many_arguments)]
    pub async fn record_callback_attempt(
        &self,
        p: &PendingCallback,
        at: DateTime<Utc>,
        duration: Duration,
        delivered: bool,
        http_status: Option<u16>,
        error: Option<&str>,
        host: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        let call = async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO callback_attempts (run_id, attempt, at, duration_ms, outcome,
                     http_status, error, host)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(p.run_id)
            .bind(p.attempts + 1)
            .bind(at)
            .bind(duration.as_secs_f64() * 1000.0)
            .bind(if delivered { "delivered" } else { "failed" })
            .bind(http_status.map(i32::from))
            .bind(error)
            .bind(host)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE callback_deliveries SET attempts = attempts + 1, lease_until = NULL,
                     leased_by = NULL, last_error = $2,
                     delivered_at = CASE WHEN $3 THEN $4 END,
                     due_at = coalesce($5, due_at),
                     gave_up_at = CASE WHEN NOT $3 AND $5 IS NULL THEN $4 END
                 WHERE run_id = $1",
            )
            .bind(p.run_id)
            .bind(error)
            .bind(delivered)
            .bind(at)
            .bind(retry_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(())
        };
        self.bounded(call).await
    }
}
