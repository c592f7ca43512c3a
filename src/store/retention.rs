//! Bounded deletes for the `retention` job.

use chrono::{DateTime, Utc};

use super::{Store, StoreError};
use crate::config::Ident;

impl Store {
    /// Deletes at most `batch` rows of `table` whose `column` is older than `cutoff`,
    /// in its own short transaction; returns how many were deleted.
    ///
    /// `ctid = ANY(ARRAY(subquery))` turns into a TID scan, so each batch touches only
    /// the rows it deletes and holds row locks for milliseconds, not the table.
    pub async fn delete_batch_older_than(
        &self,
        table: &Ident,
        column: &Ident,
        cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<u64, StoreError> {
        // Both names passed `Ident::parse`, which admits no quote: safe to splice.
        let t = table.quoted();
        let c = column.quoted();
        let sql = format!(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {c} < $1 LIMIT $2))"
        );
        let done = sqlx::query(&sql)
            .bind(cutoff)
            .bind(batch)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// How many rows of `table` have `column` older than `cutoff` (a dry run).
    pub async fn count_older_than(
        &self,
        table: &Ident,
        column: &Ident,
        cutoff: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let (t, c) = (table.quoted(), column.quoted());
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t} WHERE {c} < $1"))
            .bind(cutoff)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
