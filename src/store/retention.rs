//! Bounded deletes for the `retention` job, and whole-partition drops for tables
//! partitioned on the retention column.
//!
//! A partitioned table (`system_metrics` by day, its rollup by month) loses its old
//! rows a partition at a time: a partition whose range lies wholly before the cutoff is
//! dropped; the partitions without a lower bound (the default one, and the legacy one a
//! conversion attached) are pruned row by row. A partition straddling the cutoff waits
//! until it lies wholly before it: at most one partition's span more is kept.

use chrono::{DateTime, Utc};

use super::partitions::Partition;
use super::{Store, StoreError};
use crate::config::Ident;

impl Store {
    /// Deletes at most `batch` rows of `table` whose `column` is older than `cutoff`,
    /// in its own short transaction; returns how many were deleted. On a table
    /// partitioned by `column`, only its unbounded partitions are pruned this way (see
    /// [`Store::drop_partitions_older_than`] for the rest).
    ///
    /// `ctid = ANY(ARRAY(subquery))` turns into a TID scan, so each batch touches only
    /// the rows it deletes and holds row locks for milliseconds, not the table. A ctid
    /// names a row within one table only, so a partitioned table is pruned partition
    /// by partition.
    pub async fn delete_batch_older_than(
        &self,
        table: &Ident,
        column: &Ident,
        cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<u64, StoreError> {
        let targets: Vec<String> = match self.partitioning(table).await? {
            None => vec![table.quoted()],
            Some(p) => p
                .partitions
                .iter()
                .filter(|part| p.key != column.name() || part.is_unbounded())
                .map(|part| quoted_partition(table, part))
                .collect(),
        };
        // Both names passed `Ident::parse` (or come from the catalog, quoted).
        let c = column.quoted();
        let mut left = batch;
        let mut deleted = 0;
        for t in targets {
            let sql = format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {c} < $1 LIMIT $2))"
            );
            let done = sqlx::query(&sql)
                .bind(cutoff)
                .bind(left)
                .execute(&self.pool)
                .await?;
            deleted += done.rows_affected();
            left = batch - i64::try_from(deleted).unwrap_or(batch);
            if left <= 0 {
                break;
            }
        }
        Ok(deleted)
    }

    /// On a table partitioned by `column`, drops each partition whose range lies wholly
    /// before `cutoff`; returns the partitions dropped and their rows. `None`: the table
    /// is not partitioned by `column` (prune it with deletes).
    pub async fn drop_partitions_older_than(
        &self,
        table: &Ident,
        column: &Ident,
        cutoff: DateTime<Utc>,
    ) -> Result<Option<Vec<(String, u64)>>, StoreError> {
        let Some(p) = self.partitioning(table).await? else {
            return Ok(None);
        };
        if p.key != column.name() {
            return Ok(None);
        }
        let mut dropped = Vec::new();
        for part in p
            .partitions
            .iter()
            .filter(|part| wholly_before(part, cutoff))
        {
            let rows = self.drop_partition(table, &part.name).await?;
            tracing::info!(%table, partition = %part.name, rows, "dropped a partition past retention");
            dropped.push((part.name.clone(), rows));
        }
        Ok(Some(dropped))
    }

    /// How many rows a retention pass would remove now (a dry run): the same rule as
    /// the pass itself.
    pub async fn count_older_than(
        &self,
        table: &Ident,
        column: &Ident,
        cutoff: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let c = column.quoted();
        let counts: Vec<String> = match self.partitioning(table).await? {
            Some(p) if p.key == column.name() => p
                .partitions
                .iter()
                // Every row of a partition wholly before the cutoff is older than it:
                // one query shape counts both kinds.
                .filter(|part| wholly_before(part, cutoff) || part.is_unbounded())
                .map(|part| {
                    let t = quoted_partition(table, part);
                    format!("SELECT count(*) FROM {t} WHERE {c} < $1")
                })
                .collect(),
            _ => vec![format!(
                "SELECT count(*) FROM {} WHERE {c} < $1",
                table.quoted()
            )],
        };
        let mut total = 0u64;
        for sql in counts {
            let n: i64 = sqlx::query_scalar(&sql)
                .bind(cutoff)
                .fetch_one(&self.pool)
                .await?;
            total += u64::try_from(n).unwrap_or(0);
        }
        Ok(total)
    }
}

fn wholly_before(part: &Partition, cutoff: DateTime<Utc>) -> bool {
    !part.is_default && part.upper.is_some_and(|u| u <= cutoff)
}

/// A partition's name (from the catalog) quoted, in its table's schema.
fn quoted_partition(table: &Ident, part: &Partition) -> String {
    let name = part.name.replace('"', "\"\"");
    match table.schema() {
        Some(schema) => format!("\"{schema}\".\"{name}\""),
        None => format!("\"{name}\""),
    }
}
