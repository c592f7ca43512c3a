//! The `system_metrics` table and its per-minute rollup `system_metrics_1m`.

use chrono::{DateTime, Utc};

use super::{Store, StoreError};

impl Store {
    /// Inserts samples of one host and folds them into the per-minute rollup, in one
    /// statement (so one transaction). A sample already stored (same host and time,
    /// re-sent after an ambiguous failure) is skipped by the insert and therefore never
    /// counted twice in the rollup.
    pub async fn insert_samples(
        &self,
        host: &str,
        rows: &[(DateTime<Utc>, &str)],
    ) -> Result<(), StoreError> {
        let ts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.0).collect();
        let metrics: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let write = sqlx::query(
            "WITH inserted AS (
                 INSERT INTO system_metrics (ts, host, metrics)
                 SELECT t, $2, m::jsonb FROM UNNEST($1::timestamptz[], $3::text[]) AS u(t, m)
                 ON CONFLICT (host, ts) DO NOTHING
                 RETURNING host, ts, cpu_pct, mem_pct, net_rx_bytes_per_s, net_tx_bytes_per_s
             )
             INSERT INTO system_metrics_1m AS r
                 (host, minute, samples, cpu_sum, cpu_n, cpu_max, mem_sum, mem_n, mem_max,
                  net_rx_sum, net_tx_sum, net_n)
             SELECT host, date_bin('1 minute', ts, timestamptz 'epoch'), count(*),
                    coalesce(sum(cpu_pct::float8), 0), count(cpu_pct), max(cpu_pct),
                    coalesce(sum(mem_pct::float8), 0), count(mem_pct), max(mem_pct),
                    coalesce(sum(net_rx_bytes_per_s), 0), coalesce(sum(net_tx_bytes_per_s), 0),
                    count(net_rx_bytes_per_s)
             FROM inserted GROUP BY 1, 2
             ON CONFLICT (host, minute) DO UPDATE SET
                 samples = r.samples + EXCLUDED.samples,
                 cpu_sum = r.cpu_sum + EXCLUDED.cpu_sum,
                 cpu_n = r.cpu_n + EXCLUDED.cpu_n,
                 cpu_max = greatest(r.cpu_max, EXCLUDED.cpu_max),
                 mem_sum = r.mem_sum + EXCLUDED.mem_sum,
                 mem_n = r.mem_n + EXCLUDED.mem_n,
                 mem_max = greatest(r.mem_max, EXCLUDED.mem_max),
                 net_rx_sum = r.net_rx_sum + EXCLUDED.net_rx_sum,
                 net_tx_sum = r.net_tx_sum + EXCLUDED.net_tx_sum,
                 net_n = r.net_n + EXCLUDED.net_n",
        )
        .bind(&ts)
        .bind(host)
        .bind(&metrics);
        self.hot_write(async |c| write.execute(c).await).await?;
        Ok(())
    }
}
