//! The `reading_analytics` table, as the gateway reads it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row as _;

use super::{Store, StoreError};

#[derive(Debug, Clone, Serialize)]
pub struct Reading {
    pub id: i64,
    pub source_id: String,
    /// The stored JSON as PostgreSQL prints it, passed through without re-parsing.
    pub payload: Box<serde_json::value::RawValue>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub synced_at: DateTime<Utc>,
}

/// A page of readings, newest (most recently synced) first.
#[derive(Debug, Clone, Default)]
pub struct ReadingQuery {
    /// Keyset cursor: only readings with a smaller id (synced earlier).
    pub before_id: Option<i64>,
    /// `synced_at >= from`
    pub from: Option<DateTime<Utc>>,
    /// `synced_at < to`
    pub to: Option<DateTime<Utc>>,
    pub limit: i64,
}

impl Store {
    pub async fn readings(&self, q: &ReadingQuery) -> Result<Vec<Reading>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, source_id, payload::text AS payload, occurred_at, synced_at
             FROM reading_analytics
             WHERE ($1::bigint IS NULL OR id < $1)
               AND ($2::timestamptz IS NULL OR synced_at >= $2)
               AND ($3::timestamptz IS NULL OR synced_at < $3)
             ORDER BY id DESC
             LIMIT $4",
        )
        .bind(q.before_id)
        .bind(q.from)
        .bind(q.to)
        .bind(q.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Reading {
                    id: r.try_get("id")?,
                    source_id: r.try_get("source_id")?,
                    payload: serde_json::value::RawValue::from_string(r.try_get("payload")?)
                        .map_err(|e| StoreError::Query(sqlx::Error::Decode(e.into())))?,
                    occurred_at: r.try_get("occurred_at")?,
                    synced_at: r.try_get("synced_at")?,
                })
            })
            .collect()
    }
}
