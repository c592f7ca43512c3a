//! What `mongo_sync` writes: the target table, `sync_rejects`, and the job's lock.

use chrono::{DateTime, Utc};
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

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

/// A document that could not be loaded.
#[derive(Debug, Clone)]
pub struct Reject {
    pub mongo_id: String,
    pub source_id: Option<String>,
    pub error: String,
    /// The document as JSON text, when it could be rendered.
    pub document: Option<String>,
}

/// A session-level advisory lock on its own connection: held while this value lives,
/// released by PostgreSQL when the connection closes (also if vigil dies).
pub struct JobLock {
    conn: PgConnection,
}

impl JobLock {
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut self.conn)
            .await;
        let _ = self.conn.close().await;
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
        let claimed: Option<String> = sqlx::query_scalar(
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
        .fetch_optional(&self.pool)
        .await?;
        Ok(claimed.is_some())
    }

    /// Takes job `name`'s lock unless another session holds it (then `None`). The lock
    /// lives on a connection outside the pool, so a cancelled run cannot leave it held
    /// on a pooled connection: dropping the value closes the session.
    pub async fn try_job_lock(&self, name: &str) -> Result<Option<JobLock>, StoreError> {
        self.try_lock(&format!("vigil.job:{name}")).await
    }

    /// The lock a `cluster`-scoped job's run holds across replicas (a key apart from
    /// [`Store::try_job_lock`]'s, which a job may take itself inside its run).
    pub async fn try_cluster_lock(&self, name: &str) -> Result<Option<JobLock>, StoreError> {
        self.try_lock(&format!("vigil.cluster:{name}")).await
    }

    async fn try_lock(&self, key: &str) -> Result<Option<JobLock>, StoreError> {
        let options = self.pool.connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(JobLock { conn }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Loads `rows` into `table` and records `rejects`, in one transaction. Rows whose
    /// `source_id` is already there are skipped (a re-delivered document). Returns how
    /// many rows were inserted.
    pub async fn load_batch(
        &self,
        table: &Ident,
        job: &str,
        rows: &[LoadRow],
        rejects: &[Reject],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0;
        if !rows.is_empty() {
            let ids: Vec<&str> = rows.iter().map(|r| r.source_id.as_str()).collect();
            let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
            let times: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.occurred_at).collect();
            // `table` passed `Ident::parse`, which admits no quote: safe to splice.
            let sql = format!(
                "INSERT INTO {} (source_id, payload, occurred_at)
                 SELECT s, p::jsonb, o FROM UNNEST($1::text[], $2::text[], $3::timestamptz[]) AS u(s, p, o)
                 ON CONFLICT (source_id) DO NOTHING",
                table.quoted()
            );
            inserted = sqlx::query(&sql)
                .bind(&ids)
                .bind(&payloads)
                .bind(&times)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if !rejects.is_empty() {
            let mongo_ids: Vec<&str> = rejects.iter().map(|r| r.mongo_id.as_str()).collect();
            let source_ids: Vec<Option<&str>> =
                rejects.iter().map(|r| r.source_id.as_deref()).collect();
            let errors: Vec<&str> = rejects.iter().map(|r| r.error.as_str()).collect();
            let documents: Vec<Option<&str>> =
                rejects.iter().map(|r| r.document.as_deref()).collect();
            sqlx::query(
                "INSERT INTO sync_rejects (job, mongo_id, source_id, error, document)
                 SELECT $1, m, s, e, d::jsonb
                 FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[]) AS u(m, s, e, d)
                 ON CONFLICT (job, mongo_id) DO UPDATE
                 SET source_id = EXCLUDED.source_id, error = EXCLUDED.error,
                     document = EXCLUDED.document, at = now()",
            )
            .bind(job)
            .bind(&mongo_ids)
            .bind(&source_ids)
            .bind(&errors)
            .bind(&documents)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }
}
