//! A fleet on one PostgreSQL: HOSTS simulated hosts, one sample each every 10 s, for
//! HOURS of simulated time compressed into as long as writing takes, each sample
//! written as a host's vigil writes it (one `Store::insert_samples` call per sample:
//! the row and its rollup in one statement), CONCURRENCY hosts writing at once.
//!
//!     cargo bench --bench fleet [-- HOSTS [HOURS [CONCURRENCY]]]    (1000, 2, 32)
//!
//! Prints: insert latency p50/p99 and rows per second sustained, against the same
//! statements into the schema before partitioning (one table, one time index) in the
//! same run; table and index bytes per host per day; the 7-day per-minute panel for
//! one host and the fleet average (over 7 days of rollup rows for every host); and
//! retention of one day: dropping its partition against deleting the same rows in
//! batches, as retention did before. Needs PostgreSQL (TEST_DATABASE_URL, else
//! 127.0.0.1:5432); the database is dropped afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use vigil::store::Store;

#[path = "../tests/common/mod.rs"]
mod common;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// A real sample of this machine, as JSON, with its CPU and memory figures varied.
struct Template(serde_json::Value);

impl Template {
    fn new() -> Self {
        let config = vigil::jobs::system_metrics::SystemMetricsConfig::default();
        let mut sampler = vigil::jobs::system_metrics::Sampler::new(&config).unwrap();
        Self(serde_json::to_value(sampler.sample()).unwrap())
    }

    fn at(&self, host: usize, step: usize) -> String {
        let mut v = self.0.clone();
        let wobble = ((host * 7919 + step * 104_729) % 1000) as f64 / 10.0;
        v["cpu"]["usage_pct"] = serde_json::json!(wobble);
        v["memory"]["used_pct"] = serde_json::json!(20.0 + wobble / 2.0);
        v.to_string()
    }
}

/// Writes `hosts` × `steps` samples ending at `end`, `concurrency` hosts at a time;
/// `write` is one host's one sample. Returns each call's latency and the wall time.
async fn write_fleet<F, Fut>(
    hosts: usize,
    steps: usize,
    concurrency: usize,
    end: DateTime<Utc>,
    template: Arc<Template>,
    write: F,
) -> (Vec<Duration>, Duration)
where
    F: Fn(String, DateTime<Utc>, String) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(hosts * steps)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (latencies, template, write) = (latencies.clone(), template.clone(), write.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            // Time goes forward for everyone; each writer serves every concurrency-th host.
            for step in 0..steps {
                let ts = end - chrono::Duration::seconds(10 * (steps - step) as i64);
                for host in (w..hosts).step_by(concurrency) {
                    let json = template.at(host, step);
                    let t = Instant::now();
                    write(format!("host-{host:04}"), ts, json).await;
                    mine.push(t.elapsed());
                }
            }
            latencies.lock().await.extend(mine);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wall = started.elapsed();
    let mut l = Arc::try_unwrap(latencies).unwrap().into_inner();
    l.sort();
    (l, wall)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .filter_map(|a| a.parse().ok())
        .collect();
    let hosts = args.first().copied().unwrap_or(1000);
    let hours = args.get(1).copied().unwrap_or(2);
    let concurrency = args.get(2).copied().unwrap_or(32);
    let steps = hours * 360;

    let db = common::TestDb::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(concurrency as u32 + 2)
        .connect(&db.url)
        .await
        .unwrap();
    let store = Store::from_pool(pool.clone());
    let end = Utc::now();
    for plan in vigil::store::partitions::PLANS {
        store
            .create_partitions(
                plan,
                end - chrono::Duration::days(8),
                end + chrono::Duration::days(1),
            )
            .await
            .unwrap();
    }
    let template = Arc::new(Template::new());
    println!(
        "fleet: {hosts} hosts, one sample each 10 s, {hours} h simulated ({} samples of ~{} B JSON), {concurrency} writing at once",
        hosts * steps,
        template.at(0, 0).len()
    );

    // Baseline: the schema before partitioning, the same statement shape, a tenth of
    // the simulated time.
    sqlx::raw_sql(
        "CREATE TABLE flat (LIKE system_metrics INCLUDING GENERATED INCLUDING DEFAULTS);
         ALTER TABLE flat ADD PRIMARY KEY (host, ts) INCLUDE (cpu_pct, mem_pct, net_rx_bytes_per_s, net_tx_bytes_per_s);
         CREATE INDEX ON flat (ts);
         CREATE TABLE flat_1m (LIKE system_metrics_1m INCLUDING DEFAULTS) WITH (fillfactor = 70);
         ALTER TABLE flat_1m ADD PRIMARY KEY (host, minute);
         CREATE INDEX ON flat_1m (minute);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let flat_steps = (steps / 10).max(36);
    let flat_pool = pool.clone();
    let (flat_lat, flat_wall) = write_fleet(
        hosts,
        flat_steps,
        concurrency,
        end - chrono::Duration::days(2),
        template.clone(),
        move |host, ts, json| {
            let pool = flat_pool.clone();
            async move {
                sqlx::query(
                    "WITH inserted AS (
                         INSERT INTO flat (ts, host, metrics) VALUES ($1, $2, $3::jsonb)
                         ON CONFLICT (host, ts) DO NOTHING
                         RETURNING host, ts, cpu_pct, mem_pct, net_rx_bytes_per_s, net_tx_bytes_per_s)
                     INSERT INTO flat_1m AS r (host, minute, samples, cpu_sum, cpu_n, cpu_max,
                         mem_sum, mem_n, mem_max, net_rx_sum, net_tx_sum, net_n)
                     SELECT host, date_bin('1 minute', ts, timestamptz 'epoch'), count(*),
                            coalesce(sum(cpu_pct::float8), 0), count(cpu_pct), max(cpu_pct),
                            coalesce(sum(mem_pct::float8), 0), count(mem_pct), max(mem_pct),
                            coalesce(sum(net_rx_bytes_per_s), 0), coalesce(sum(net_tx_bytes_per_s), 0),
                            count(net_rx_bytes_per_s)
                     FROM inserted GROUP BY 1, 2
                     ON CONFLICT (host, minute) DO UPDATE SET samples = r.samples + EXCLUDED.samples,
                         cpu_sum = r.cpu_sum + EXCLUDED.cpu_sum, cpu_n = r.cpu_n + EXCLUDED.cpu_n,
                         cpu_max = greatest(r.cpu_max, EXCLUDED.cpu_max),
                         mem_sum = r.mem_sum + EXCLUDED.mem_sum, mem_n = r.mem_n + EXCLUDED.mem_n,
                         mem_max = greatest(r.mem_max, EXCLUDED.mem_max),
                         net_rx_sum = r.net_rx_sum + EXCLUDED.net_rx_sum,
                         net_tx_sum = r.net_tx_sum + EXCLUDED.net_tx_sum, net_n = r.net_n + EXCLUDED.net_n",
                )
                .bind(ts)
                .bind(host)
                .bind(json)
                .execute(&pool)
                .await
                .unwrap();
            }
        },
    )
    .await;

    // vigil's write path into the partitioned tables.
    let vigil_store = store.clone();
    let (lat, wall) = write_fleet(
        hosts,
        steps,
        concurrency,
        end,
        template.clone(),
        move |host, ts, json| {
            let store = vigil_store.clone();
            async move {
                store
                    .insert_samples(&host, &[(ts, json.as_str())])
                    .await
                    .unwrap();
            }
        },
    )
    .await;
    let rate = lat.len() as f64 / wall.as_secs_f64();
    let flat_rate = flat_lat.len() as f64 / flat_wall.as_secs_f64();
    println!(
        "  insert, partitioned (vigil):   p50 {}  p99 {}   {rate:.0} rows/s sustained over {:.0} s",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        wall.as_secs_f64()
    );
    println!(
        "  insert, one table (baseline):  p50 {}  p99 {}   {flat_rate:.0} rows/s   (partitioned / baseline: {:.2}x the rate)",
        ms(percentile(&flat_lat, 0.5)),
        ms(percentile(&flat_lat, 0.99)),
        rate / flat_rate
    );
    let needed = hosts as f64 / 10.0;
    println!(
        "  the fleet writes {needed:.0} rows/s: headroom {:.1}x; 10,000 hosts would write {:.0} rows/s ({:.2} of this run's rate)",
        rate / needed,
        needed * 10.0,
        needed * 10.0 / rate
    );

    sqlx::query("VACUUM ANALYZE system_metrics")
        .execute(&pool)
        .await
        .unwrap();
    let (heap, total): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(pg_table_size(c.oid)), 0)::int8, coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'system_metrics'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let per_host_day = |b: i64| b as f64 / hosts as f64 * 24.0 / hours as f64;
    println!(
        "  size: samples {} (table with TOAST {}, indexes {}); per host per day {:.2} MiB ({:.2} MiB of it indexes); 1,000 hosts x 30 days: {:.0} GiB",
        mib(total),
        mib(heap),
        mib(total - heap),
        per_host_day(total) / f64::from(1 << 20),
        per_host_day(total - heap) / f64::from(1 << 20),
        per_host_day(total) * 1000.0 * 30.0 / f64::from(1 << 30)
    );

    // Seven days of rollup for every host, as the write path would have left it.
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO system_metrics_1m (host, minute, samples, cpu_sum, cpu_n, cpu_max, mem_sum, mem_n, mem_max, net_rx_sum, net_tx_sum, net_n)
         SELECT 'host-' || lpad(h::text, 4, '0'), m, 6, 6 * (h % 100), 6, h % 100, 240, 6, 40, 6e5, 3e5, 6
         FROM generate_series(date_bin('1 minute', now(), timestamptz 'epoch') - interval '7 days',
                              date_bin('1 minute', now(), timestamptz 'epoch') - interval '1 minute' - $1::interval,
                              interval '1 minute') m,
              generate_series(0, $2::int - 1) h
         ON CONFLICT DO NOTHING",
    )
    .bind(chrono::Duration::hours(hours as i64))
    .bind(hosts as i32)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE system_metrics_1m")
        .execute(&pool)
        .await
        .unwrap();
    let rollup_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics_1m")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!(
        "  rollup: {rollup_rows} rows for 7 days of {hosts} hosts ({:.0} s to generate)",
        t.elapsed().as_secs_f64()
    );
    let panel = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let mut times = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                let rows: Vec<(DateTime<Utc>, Option<f64>)> =
                    sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
                times.push(t.elapsed());
                assert!(!rows.is_empty());
            }
            times.sort();
            times[times.len() / 2]
        }
    };
    let one = panel(
        "SELECT minute, cpu_sum / nullif(cpu_n, 0) FROM system_metrics_1m
         WHERE host = 'host-0007' AND minute >= now() - interval '7 days' ORDER BY 1",
    )
    .await;
    let fleet_minute = panel(
        "SELECT minute, sum(cpu_sum) / nullif(sum(cpu_n), 0) FROM system_metrics_1m
         WHERE minute >= now() - interval '7 days' GROUP BY 1 ORDER BY 1",
    )
    .await;
    let fleet_hour = panel(
        "SELECT date_bin('1 hour', minute, timestamptz 'epoch'), sum(cpu_sum) / nullif(sum(cpu_n), 0)
         FROM system_metrics_1m WHERE minute >= now() - interval '7 days' GROUP BY 1 ORDER BY 1",
    )
    .await;
    println!(
        "  7-day panel, per minute: one host {} ; fleet average {} (per hour: {}) (median of 5)",
        ms(one),
        ms(fleet_minute),
        ms(fleet_hour)
    );

    // Retention of one day: the simulated samples, six days earlier, in that day's
    // partition; dropping it, against deleting the same rows from a copy in batches of
    // 5,000 as row-by-row retention does.
    let past = end - chrono::Duration::days(6);
    let partition = format!("system_metrics_p{}", past.format("%Y%m%d"));
    sqlx::query(
        "INSERT INTO system_metrics (ts, host, metrics)
         SELECT ts - interval '6 days', host, metrics FROM system_metrics
         WHERE ts > now() - interval '1 day' ON CONFLICT DO NOTHING",
    )
    .execute(&pool)
    .await
    .unwrap();
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {partition}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    if rows > 0 {
        sqlx::raw_sql(&format!(
            "CREATE TABLE copy (LIKE {partition} INCLUDING ALL);
             INSERT INTO copy (ts, host, metrics) SELECT ts, host, metrics FROM {partition};
             CREATE INDEX ON copy (ts);"
        ))
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("VACUUM ANALYZE copy")
            .execute(&pool)
            .await
            .unwrap();
        let t = Instant::now();
        let cutoff = end;
        loop {
            let done = sqlx::query(
                "DELETE FROM copy WHERE ctid = ANY(ARRAY(SELECT ctid FROM copy WHERE ts < $1 LIMIT 5000))",
            )
            .bind(cutoff)
            .execute(&pool)
            .await
            .unwrap();
            if done.rows_affected() < 5000 {
                break;
            }
        }
        let deleting = t.elapsed();
        let t = Instant::now();
        let dropped = store
            .drop_partition(
                &vigil::config::Ident::parse("system_metrics").unwrap(),
                &partition,
            )
            .await
            .unwrap();
        let dropping = t.elapsed();
        println!(
            "  retention of one day ({dropped} rows here): drop partition {} against batched deletes {} ({:.0}x); a full day of {hosts} hosts is {} rows",
            ms(dropping),
            ms(deleting),
            deleting.as_secs_f64() / dropping.as_secs_f64(),
            hosts * 8640
        );
    }
    drop(pool);
    drop(db);
}
