//! What `mongo_sync` writes: the target table, `sync_rejects`, and the job's lock.

use chrono::{DateTime, Utc};
use sqlx::Postgres;
use sqlx::pool::PoolConnection;

use super::{Store, StoreError};
use crate::config::Ident;

/// A transformed document ready to load.
#[derive(Debug, Clone)]
pub struct LoadRow {
    pub source_id: String,
    /// The payload as JSON text.
    pub payload: String,
    pub occurred_at: Option<DateTime<Utc>>,
}

/// A document that could not be loaded. Every text field is stored through
/// [`pg_text`](super::pg_text) and the original as `bytea`, so recording a reject cannot
/// fail for what the document holds.
#[derive(Debug, Clone)]
pub struct Reject {
    pub mongo_id: String,
    pub source_id: Option<String>,
    pub error: String,
    /// A best-effort JSON view of the document (JSON text), when there is one.
    pub document: Option<String>,
    /// The document's BSON, or its first bytes when it is oversize.
    pub raw: Vec<u8>,
    /// The whole document's size in bytes (more than `raw.len()` when cut).
    pub raw_size: usize,
}

/// What one load statement did with each row, by source id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Inserted now.
    pub inserted: Vec<String>,
    /// Already there with the same payload and time: a re-delivery, nothing to do.
    pub unchanged: Vec<String>,
    /// Already there with something else: a conflict.
    pub conflicting: Vec<String>,
}

/// A session-level advisory lock, held on a connection of the lock pool while this
/// value lives. Released by [`JobLock::release`], which returns the connection to the
/// pool; dropped without it (a cancelled run), the connection is closed instead, and
/// PostgreSQL releases the lock with the session (as it does if vigil dies).
pub struct JobLock {
    conn: Option<PoolConnection<Postgres>>,
}

impl JobLock {
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock_all()")
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // Unsure whether the lock is gone: never hand it on with the session.
                conn.close_on_drop();
            } else {
                // Back in the pool before the run is reported finished, so the next
                // run takes this connection rather than opening one.
                conn.return_to_pool().await;
            }
        }
    }
}

impl Drop for JobLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

impl Store {
    /// Claims firing `scheduled_at` of `job` for `host`: true for exactly one claimant.
    /// Also clears this job's claims older than a week.
    pub async fn claim_firing(
        &self,
        job: &str,
        scheduled_at: DateTime<Utc>,
        host: &str,
    ) -> Result<bool, StoreError> {
        let claim = sqlx::query_scalar(
            "WITH old AS (
                 DELETE FROM job_claims WHERE job = $1 AND scheduled_at < $2 - interval '7 days'
             )
             INSERT INTO job_claims (job, scheduled_at, host) VALUES ($1, $2, $3)
             ON CONFLICT (job, scheduled_at) DO NOTHING
             RETURNING host",
        )
        .bind(job)
        .bind(scheduled_at)
        .bind(host)
        .fetch_optional(&self.pool);
        let claimed: Option<String> = self.bounded(async { Ok(claim.await?) }).await?;
        Ok(claimed.is_some())
    }

    /// Takes job `name`'s lock unless another session holds it (then `None`), within
    /// the store's call bound.
    pub async fn try_job_lock(&self, name: &str) -> Result<Option<JobLock>, StoreError> {
        self.try_lock(&format!("vigil.job:{name}")).await
    }

    /// The lock a `cluster`-scoped job's run holds across replicas (a key apart from
    /// [`Store::try_job_lock`]'s, which a job may take itself inside its run).
    pub async fn try_cluster_lock(&self, name: &str) -> Result<Option<JobLock>, StoreError> {
        self.try_lock(&format!("vigil.cluster:{name}")).await
    }

    async fn try_lock(&self, key: &str) -> Result<Option<JobLock>, StoreError> {
        self.bounded(async {
            let mut conn = self.locks.acquire().await?;
            let got: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(key)
                    .fetch_one(&mut *conn)
                    .await?;
            Ok(got.then_some(JobLock { conn: Some(conn) }))
        })
        .await
    }

    /// Loads `rows` into `table` in one transaction and says, for each, whether it was
    /// inserted, already there unchanged, or already there with other content (left
    /// as it is). Source ids must be distinct within `rows`.
    pub async fn load_rows(&self, table: &Ident, rows: &[LoadRow]) -> Result<Loaded, StoreError> {
        let mut out = Loaded::default();
        if rows.is_empty() {
            return Ok(out);
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.source_id.as_str()).collect();
        let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
        let times: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.occurred_at).collect();
        let mut tx = self.pool.begin().await?;
        // `table` passed `Ident::parse`, which admits no quote: safe to splice.
        let inserted: Vec<String> = sqlx::query_scalar(&format!(
            "INSERT INTO {} (source_id, payload, occurred_at)
             SELECT s, p::jsonb, o FROM UNNEST($1::text[], $2::text[], $3::timestamptz[]) AS u(s, p, o)
             ON CONFLICT (source_id) DO NOTHING
             RETURNING source_id",
            table.quoted()
        ))
        .bind(&ids)
        .bind(&payloads)
        .bind(&times)
        .fetch_all(&mut *tx)
        .await?;
        if inserted.len() < rows.len() {
            // The rest were there already: the same document again (a rerun after a
            // crash before marking), or another one claiming the same source id.
            let fresh: std::collections::HashSet<&str> =
                inserted.iter().map(String::as_str).collect();
            let rest: Vec<usize> = (0..rows.len())
                .filter(|&i| !fresh.contains(ids[i]))
                .collect();
            let same: Vec<(String, bool)> = sqlx::query_as(&format!(
                "SELECT t.source_id, t.payload = u.p::jsonb AND t.occurred_at IS NOT DISTINCT FROM u.o
                 FROM UNNEST($1::text[], $2::text[], $3::timestamptz[]) AS u(s, p, o)
                 JOIN {} t ON t.source_id = u.s",
                table.quoted()
            ))
            .bind(rest.iter().map(|&i| ids[i]).collect::<Vec<_>>())
            .bind(rest.iter().map(|&i| payloads[i]).collect::<Vec<_>>())
            .bind(rest.iter().map(|&i| times[i]).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            for (id, equal) in same {
                if equal {
                    out.unchanged.push(id);
                } else {
                    out.conflicting.push(id);
                }
            }
        }
        tx.commit().await?;
        out.inserted = inserted;
        Ok(out)
    }

    /// Records documents that could not be loaded: one row each, a reject seen again
    /// replaces its row.
    pub async fn insert_rejects(&self, job: &str, rejects: &[Reject]) -> Result<(), StoreError> {
        if rejects.is_empty() {
            return Ok(());
        }
        let text = |s: &str| super::pg_text(s).into_owned();
        let mongo_ids: Vec<String> = rejects.iter().map(|r| text(&r.mongo_id)).collect();
        let source_ids: Vec<Option<String>> = rejects
            .iter()
            .map(|r| r.source_id.as_deref().map(text))
            .collect();
        let errors: Vec<String> = rejects.iter().map(|r| text(&r.error)).collect();
        let documents: Vec<Option<String>> = rejects
            .iter()
            .map(|r| r.document.as_deref().map(text))
            .collect();
        let raws: Vec<&[u8]> = rejects.iter().map(|r| r.raw.as_slice()).collect();
        let sizes: Vec<i64> = rejects
            .iter()
            .map(|r| i64::try_from(r.raw_size).unwrap_or(i64::MAX))
            .collect();
        sqlx::query(
            "INSERT INTO sync_rejects (job, mongo_id, source_id, error, document, raw, raw_size)
             SELECT $1, m, s, e, d::jsonb, r, z
             FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::bigint[])
                 AS u(m, s, e, d, r, z)
             ON CONFLICT (job, mongo_id) DO UPDATE
             SET source_id = EXCLUDED.source_id, error = EXCLUDED.error,
                 document = EXCLUDED.document, raw = EXCLUDED.raw,
                 raw_size = EXCLUDED.raw_size, at = now()",
        )
        .bind(job)
        .bind(&mongo_ids)
        .bind(&source_ids)
        .bind(&errors)
        .bind(&documents)
        .bind(&raws)
        .bind(&sizes)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
