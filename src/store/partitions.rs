//! Time partitions of `system_metrics` (by day) and `system_metrics_1m` (by month):
//! created ahead by vigil, listed with their bounds for retention, dropped whole.

use chrono::{DateTime, Datelike as _, Duration, TimeZone as _, Utc};
use sqlx::Row as _;

use super::{Store, StoreError};
use crate::config::Ident;

/// How a partitioned table is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Day,
    Month,
}

/// A table vigil keeps partitions of, and how far around now.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub table: &'static str,
    pub step: Step,
    /// Partitions before the current one kept ready (a replica's clock a little
    /// behind, samples written late).
    pub back: u32,
    /// Partitions after the current one: a week of days, or the next month, so a
    /// stopped maintenance never leaves tomorrow without a home.
    pub ahead: u32,
    /// Storage parameters of each new partition.
    pub with: &'static str,
}

/// What vigil partitions.
pub const PLANS: [Plan; 2] = [
    Plan {
        table: "system_metrics",
        step: Step::Day,
        back: 1,
        ahead: 7,
        with: "",
    },
    Plan {
        table: "system_metrics_1m",
        step: Step::Month,
        back: 0,
        ahead: 1,
        // Each minute's row is updated once per batch: room on the page keeps that HOT.
        with: " WITH (fillfactor = 70)",
    },
];

/// Serialises partition creation across replicas (an arbitrary, fixed key).
const CREATE_LOCK: i64 = 0x7669_6769_6c50_6172;

/// One partition of a range-partitioned table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    /// `None`: unbounded below (the legacy partition a conversion attached).
    pub lower: Option<DateTime<Utc>>,
    /// `None`: the default partition, or unbounded above.
    pub upper: Option<DateTime<Utc>>,
    pub is_default: bool,
}

impl Partition {
    /// Holds rows of any age, so retention prunes it row by row: the default and the
    /// legacy partitions.
    pub fn is_unbounded(&self) -> bool {
        self.is_default || self.lower.is_none()
    }
}

/// A partitioned table's key column and partitions.
#[derive(Debug, Clone)]
pub struct Partitioning {
    pub key: String,
    pub partitions: Vec<Partition>,
}

impl Step {
    fn start(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let midnight = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).single().unwrap_or(t);
        match self {
            Step::Day => midnight(t.year(), t.month(), t.day()),
            Step::Month => midnight(t.year(), t.month(), 1),
        }
    }

    fn next(self, t: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Step::Day => t + Duration::days(1),
            Step::Month => {
                let (y, m) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().unwrap_or(t)
            }
        }
    }

    fn prev(self, t: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Step::Day => t - Duration::days(1),
            Step::Month => self.start(t - Duration::days(1)),
        }
    }

    fn suffix(self, t: DateTime<Utc>) -> String {
        match self {
            Step::Day => t.format("%Y%m%d").to_string(),
            Step::Month => t.format("%Y%m").to_string(),
        }
    }
}

fn literal(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S+00").to_string()
}

impl Store {
    /// Creates the partitions each of [`PLANS`] wants around `now` that are missing;
    /// returns their names. A range the default partition already holds rows of is
    /// left to it (creating the partition would have to move them). Safe to run on
    /// every replica at once.
    pub async fn ensure_partitions(&self, now: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
        let mut created = Vec::new();
        for plan in PLANS {
            let mut from = plan.step.start(now);
            for _ in 0..plan.back {
                from = plan.step.prev(from);
            }
            let mut to = plan.step.start(now);
            for _ in 0..=plan.ahead {
                to = plan.step.next(to);
            }
            created.extend(self.create_partitions(plan, from, to).await?);
        }
        Ok(created)
    }

    /// Creates `plan`'s partitions covering `[from, to)` that are missing (also for a
    /// past range: a bench or an import).
    pub async fn create_partitions(
        &self,
        plan: Plan,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        let call = async {
            let mut created = Vec::new();
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(CREATE_LOCK)
                .execute(&mut *tx)
                .await?;
            let existing = partitions_in(&mut tx, plan.table).await?;
            let key = if plan.step == Step::Day {
                "ts"
            } else {
                "minute"
            };
            let default = existing
                .iter()
                .find(|p| p.is_default)
                .map(|p| p.name.clone());
            let mut at = plan.step.start(from);
            while at < to {
                let end = plan.step.next(at);
                let overlaps = existing.iter().any(|p| {
                    !p.is_default
                        && p.lower.is_none_or(|l| l < end)
                        && p.upper.is_none_or(|u| u > at)
                });
                if !overlaps {
                    let held =
                        match &default {
                            Some(d) => sqlx::query_scalar::<_, bool>(&format!(
                                "SELECT EXISTS (SELECT 1 FROM {d} WHERE {key} >= $1 AND {key} < $2)"
                            ))
                            .bind(at)
                            .bind(end)
                            .fetch_one(&mut *tx)
                            .await?,
                            None => false,
                        };
                    if held {
                        tracing::info!(table = plan.table, from = %at, "the default partition holds rows of this range; it keeps them");
                    } else {
                        let name = format!("{}_p{}", plan.table, plan.step.suffix(at));
                        sqlx::query(&format!(
                            "CREATE TABLE {name} PARTITION OF {} FOR VALUES FROM ('{}') TO ('{}'){}",
                            plan.table,
                            literal(at),
                            literal(end),
                            plan.with
                        ))
                        .execute(&mut *tx)
                        .await?;
                        created.push(name);
                    }
                }
                at = end;
            }
            tx.commit().await?;
            Ok::<_, StoreError>(created)
        };
        let created = self.bounded(call).await?;
        if !created.is_empty() {
            tracing::info!(partitions = ?created, "created partitions ahead");
        }
        Ok(created)
    }

    /// `table`'s key column and partitions, if it is range-partitioned on one column.
    pub async fn partitioning(&self, table: &Ident) -> Result<Option<Partitioning>, StoreError> {
        let call = async {
            let mut conn = self.pool.acquire().await?;
            let key: Option<String> = sqlx::query_scalar(
                "SELECT a.attname::text FROM pg_partitioned_table p
                 JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
                 WHERE p.partrelid = to_regclass($1) AND p.partstrat = 'r' AND p.partnatts = 1",
            )
            .bind(table.to_string())
            .fetch_optional(&mut *conn)
            .await?;
            let Some(key) = key else {
                return Ok(None);
            };
            let partitions = partitions_in(&mut conn, &table.to_string()).await?;
            Ok::<_, StoreError>(Some(Partitioning { key, partitions }))
        };
        self.bounded(call).await
    }

    /// Drops one partition of `table` whole (after counting its rows, which it
    /// returns). The partition's schema is its table's.
    pub async fn drop_partition(&self, table: &Ident, name: &str) -> Result<u64, StoreError> {
        // A name from the catalog, quoted.
        let name = name.replace('"', "\"\"");
        let q = match table.schema() {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        };
        let mut tx = self.pool.begin().await?;
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {q}"))
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(&format!("DROP TABLE {q}"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// The partitions of `table` with their bounds, read back as timestamps (PostgreSQL
/// prints each bound with its offset, so the cast is exact).
async fn partitions_in(
    conn: &mut sqlx::PgConnection,
    table: &str,
) -> Result<Vec<Partition>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.relname::text AS name,
                (regexp_match(b.bound, 'FROM \\(''([^'']*)''\\)'))[1]::timestamptz AS lower,
                (regexp_match(b.bound, 'TO \\(''([^'']*)''\\)'))[1]::timestamptz AS upper,
                b.bound = 'DEFAULT' AS is_default
         FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b
         WHERE i.inhparent = to_regclass($1)
         ORDER BY 3 NULLS FIRST, 1",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Partition {
                name: r.try_get("name")?,
                lower: r.try_get("lower")?,
                upper: r.try_get("upper")?,
                is_default: r.try_get("is_default")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn days_and_months_step_on_utc_boundaries() {
        let now = t("2026-12-31T23:59:59Z");
        assert_eq!(Step::Day.start(now), t("2026-12-31T00:00:00Z"));
        assert_eq!(
            Step::Day.next(Step::Day.start(now)),
            t("2027-01-01T00:00:00Z")
        );
        assert_eq!(Step::Month.start(now), t("2026-12-01T00:00:00Z"));
        assert_eq!(
            Step::Month.next(t("2026-12-01T00:00:00Z")),
            t("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            Step::Month.prev(t("2026-01-01T00:00:00Z")),
            t("2025-12-01T00:00:00Z")
        );
        assert_eq!(Step::Day.suffix(now), "20261231");
        assert_eq!(Step::Month.suffix(now), "202612");
        assert_eq!(literal(now), "2026-12-31 23:59:59+00");
    }
}
