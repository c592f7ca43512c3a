//! Dashboard queries over a month of samples: 20 hosts every 10 s for 30 days (about
//! 5.2 million rows, interleaved in time as real hosts write them). Times "per minute
//! for one host over the last 7 days" for CPU %, memory % and network rate, through the
//! typed covering-index columns vigil's schema provides, against the baseline of
//! extracting the same values from the JSONB document, in the same run.
//!
//!     cargo bench --bench dashboard_queries
//!
//! Uses TEST_DATABASE_URL (else the server on 127.0.0.1:5432) to create a database.
//! Generating the rows takes a few minutes; VIGIL_BENCH_KEEP=1 keeps the database
//! (vigil_bench_dashboard) so the next run skips generation.

use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, Executor as _};
use vigil::store::Store;

#[path = "../tests/common/mod.rs"]
mod common;

const DB: &str = "vigil_bench_dashboard";
const HOSTS: i32 = 20;
const DAYS: i32 = 30;
const RUNS: usize = 15;
const TARGET: Duration = Duration::from_millis(50);

/// One day of samples for every host, in time order (hosts interleaved).
fn generate_day(day: i32) -> String {
    format!(
        "INSERT INTO system_metrics (ts, host, metrics)
         SELECT t, 'host-' || lpad(h::text, 2, '0'), jsonb_build_object(
           'v', 1, 'interval_s', 10,
           'cpu', jsonb_build_object('usage_pct', round((random() * 100)::numeric, 2),
                  'per_core_pct', jsonb_build_array(round((random() * 100)::numeric, 2), round((random() * 100)::numeric, 2)),
                  'cores', 2, 'frequency_mhz', 2400, 'cgroup_limit_cores', null),
           'memory', jsonb_build_object('total_bytes', 8589934592, 'used_bytes', 4294967296,
                  'available_bytes', 4294967296, 'used_pct', round((30 + random() * 40)::numeric, 2),
                  'swap_total_bytes', 0, 'swap_used_bytes', 0, 'cgroup_limit_bytes', null),
           'disks', jsonb_build_array(jsonb_build_object('mount', '/', 'device', '/dev/vda', 'fs', 'ext4',
                  'total_bytes', 107374182400, 'available_bytes', 53687091200, 'used_pct', 50.0,
                  'read_bytes', 40960, 'written_bytes', 81920, 'read_bytes_per_s', 4096.0, 'written_bytes_per_s', 8192.0)),
           'network', jsonb_build_object(
                  'interfaces', jsonb_build_array(jsonb_build_object('name', 'eth0',
                      'rx_bytes', 1000000, 'tx_bytes', 500000, 'rx_packets', 900, 'tx_packets', 700,
                      'rx_errors', 0, 'tx_errors', 0, 'rx_bytes_per_s', 100000.0, 'tx_bytes_per_s', 50000.0,
                      'rx_packets_per_s', 90.0, 'tx_packets_per_s', 70.0, 'rx_errors_per_s', 0.0, 'tx_errors_per_s', 0.0)),
                  'total', jsonb_build_object('rx_bytes', 1000000, 'tx_bytes', 500000,
                      'rx_bytes_per_s', round((random() * 1e6)::numeric, 1), 'tx_bytes_per_s', round((random() * 1e6)::numeric, 1))),
           'load', jsonb_build_object('1m', 0.5, '5m', 0.4, '15m', 0.3),
           'uptime_s', 123456, 'processes', 150,
           'self', jsonb_build_object('cpu_pct', 0.2, 'rss_bytes', 12000000))
         FROM generate_series(date_trunc('day', now()) - interval '{from} days',
                              date_trunc('day', now()) - interval '{to} days' - interval '10 seconds',
                              interval '10 seconds') t,
              generate_series(1, {HOSTS}) h
         ORDER BY t, h",
        from = DAYS - day,
        to = DAYS - day - 1,
    )
}

struct Query {
    name: &'static str,
    /// Columns of the per-minute rollup.
    rollup: &'static str,
    /// Typed generated columns of the raw table (covering index).
    typed: &'static str,
    /// The baseline: the same value out of the JSONB document.
    jsonb: &'static str,
}

const QUERIES: [Query; 3] = [
    Query {
        name: "CPU %",
        rollup: "cpu_sum / nullif(cpu_n, 0)",
        typed: "avg(cpu_pct)",
        jsonb: "avg((metrics #>> '{cpu,usage_pct}')::real)",
    },
    Query {
        name: "memory %",
        rollup: "mem_sum / nullif(mem_n, 0)",
        typed: "avg(mem_pct)",
        jsonb: "avg((metrics #>> '{memory,used_pct}')::real)",
    },
    Query {
        name: "network rx+tx B/s",
        rollup: "net_rx_sum / nullif(net_n, 0), net_tx_sum / nullif(net_n, 0)",
        typed: "avg(net_rx_bytes_per_s), avg(net_tx_bytes_per_s)",
        jsonb: "avg((metrics #>> '{network,total,rx_bytes_per_s}')::float8), \
                avg((metrics #>> '{network,total,tx_bytes_per_s}')::float8)",
    },
];

/// What the shipped panels run for ranges binned by a minute or more.
fn rollup_sql(select: &str) -> String {
    format!(
        "SELECT minute AS time, {select} FROM system_metrics_1m
         WHERE host = 'host-07'
           AND minute >= date_bin('1 minute', now() - interval '7 days', timestamptz 'epoch')
           AND minute <= now()
         ORDER BY 1"
    )
}

/// The shape the shipped Grafana panels use, over the same minute-aligned range as the
/// rollup (else the first bucket exists in one and not the other, depending on the
/// second the bench runs at). `date_bin` is plain arithmetic on the
/// timestamp; `date_trunc` on a timestamptz converts through the session time zone and
/// Grafana's `$__timeGroupAlias` goes through numeric epoch seconds, both several times
/// dearer per row.
fn sql(select: &str) -> String {
    format!(
        "SELECT date_bin('1 minute', ts, timestamptz 'epoch') AS time, {select} FROM system_metrics
         WHERE host = 'host-07'
           AND ts >= date_bin('1 minute', now() - interval '7 days', timestamptz 'epoch')
           AND ts <= now()
         GROUP BY 1 ORDER BY 1"
    )
}

/// Server-side execution time (EXPLAIN ANALYZE without per-node timing), median.
async fn server_ms(pool: &sqlx::PgPool, query: &str) -> f64 {
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON) {query}"
        ))
        .fetch_all(pool)
        .await
        .expect("explain");
        let ms = plan
            .iter()
            .find_map(|l| l.trim().strip_prefix("Execution Time: "))
            .and_then(|l| l.trim_end_matches(" ms").parse::<f64>().ok())
            .expect("execution time in plan");
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    times[RUNS / 2]
}

/// Round trip through the client, rows decoded, median.
async fn median_ms(pool: &sqlx::PgPool, query: &str) -> (f64, usize) {
    let mut rows = 0;
    let mut times = Vec::with_capacity(RUNS);
    // One warm-up run: dashboards are drawn from a warm cache.
    sqlx::query(query).fetch_all(pool).await.expect("query");
    for _ in 0..RUNS {
        let t = Instant::now();
        rows = sqlx::query(query)
            .fetch_all(pool)
            .await
            .expect("query")
            .len();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    (times[RUNS / 2], rows)
}

async fn plan(pool: &sqlx::PgPool, query: &str) -> String {
    let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS) {query}"))
        .fetch_all(pool)
        .await
        .expect("explain");
    lines
        .iter()
        .filter(|l| l.contains("Scan") || l.contains("Heap Fetches"))
        .map(|l| l.trim().to_owned())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[tokio::main]
async fn main() {
    let admin = PgConnectOptions::from_str(&common::admin_url()).expect("TEST_DATABASE_URL");
    let mut conn = sqlx::PgConnection::connect_with(&admin)
        .await
        .expect("connect");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DB)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let keep = std::env::var("VIGIL_BENCH_KEEP").is_ok_and(|v| v == "1");
    if exists && !keep {
        conn.execute(format!("DROP DATABASE {DB} WITH (FORCE)").as_str())
            .await
            .unwrap();
    }
    let fresh = !exists || !keep;
    if fresh {
        conn.execute(format!("CREATE DATABASE {DB}").as_str())
            .await
            .unwrap();
    }
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(
            admin
                .clone()
                .database(DB)
                .log_statements(log::LevelFilter::Trace),
        )
        .await
        .expect("connect bench database");
    let store = Store::from_pool(pool.clone());
    store.migrate().await.expect("migrate");

    if fresh {
        // The month's partitions, as vigil would have created them day by day.
        let now = chrono::Utc::now();
        for plan in vigil::store::partitions::PLANS {
            store
                .create_partitions(plan, now - chrono::Duration::days(i64::from(DAYS) + 1), now)
                .await
                .expect("partitions");
        }
        let t = Instant::now();
        for day in 0..DAYS {
            sqlx::query(&generate_day(day))
                .execute(&pool)
                .await
                .expect("generate");
            eprint!("\rgenerating samples: day {}/{DAYS}", day + 1);
        }
        eprintln!(" ({:.0} s)", t.elapsed().as_secs_f64());
        // vigil's writer fills the rollup as it inserts; rows generated here need it
        // built once, as the migration does for rows stored before it.
        sqlx::query(
            "INSERT INTO system_metrics_1m
             SELECT host, date_bin('1 minute', ts, timestamptz 'epoch'), count(*),
                    coalesce(sum(cpu_pct::float8), 0), count(cpu_pct), max(cpu_pct),
                    coalesce(sum(mem_pct::float8), 0), count(mem_pct), max(mem_pct),
                    coalesce(sum(net_rx_bytes_per_s), 0), coalesce(sum(net_tx_bytes_per_s), 0),
                    count(net_rx_bytes_per_s)
             FROM system_metrics GROUP BY 1, 2",
        )
        .execute(&pool)
        .await
        .expect("rollup");
        eprintln!("VACUUM ANALYZE (what autovacuum does on a live table)...");
        sqlx::query("VACUUM (ANALYZE) system_metrics")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("VACUUM (ANALYZE) system_metrics_1m")
            .execute(&pool)
            .await
            .unwrap();
    }
    let (rows, size, rollup_rows): (i64, String, i64) = sqlx::query_as(
        "SELECT count(*), pg_size_pretty(pg_total_relation_size('system_metrics')),
                (SELECT count(*) FROM system_metrics_1m) FROM system_metrics",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!(
        "system_metrics: {rows} rows, {size}; system_metrics_1m: {rollup_rows} rows\n\
         query: one host, per minute, last 7 days; median of {RUNS} runs; \
         client = round trip with rows decoded, server = EXPLAIN ANALYZE execution time\n"
    );
    println!(
        "{:<19}{:>22}{:>22}{:>22}{:>9}   target ≤ 50 ms",
        "series", "rollup client/server", "typed client/server", "JSONB client/server", "JSONB/x"
    );
    let ms = TARGET.as_secs_f64() * 1000.0;
    let mut all_met = true;
    for q in &QUERIES {
        let (rollup, n) = median_ms(&pool, &rollup_sql(q.rollup)).await;
        let rollup_server = server_ms(&pool, &rollup_sql(q.rollup)).await;
        let (typed, n_typed) = median_ms(&pool, &sql(q.typed)).await;
        let typed_server = server_ms(&pool, &sql(q.typed)).await;
        let (jsonb, _) = median_ms(&pool, &sql(q.jsonb)).await;
        let jsonb_server = server_ms(&pool, &sql(q.jsonb)).await;
        assert_eq!(n, n_typed, "rollup and raw give the same buckets");
        let met = rollup <= ms;
        all_met &= met;
        println!(
            "{:<19}{:>13.1} /{:>6.1}{:>15.1} /{:>6.1}{:>15.1} /{:>6.1}{:>8.0}x   {} ({n} points; typed raw {})",
            q.name,
            rollup,
            rollup_server,
            typed,
            typed_server,
            jsonb,
            jsonb_server,
            jsonb / rollup,
            if met { "met" } else { "MISSED" },
            if typed <= ms { "met" } else { "missed" },
        );
    }
    println!(
        "\nplan (typed CPU %): {}",
        plan(&pool, &sql(QUERIES[0].typed)).await
    );
    println!(
        "plan (JSONB CPU %): {}",
        plan(&pool, &sql(QUERIES[0].jsonb)).await
    );
    pool.close().await;
    if !keep {
        conn.execute(format!("DROP DATABASE {DB} WITH (FORCE)").as_str())
            .await
            .ok();
    }
    if !all_met {
        std::process::exit(1);
    }
}
