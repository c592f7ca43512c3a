//! A fleet on one PostgreSQL: the partitioning migration converts a populated table
//! keeping every row; retention drops whole partitions and keeps the rest; samples no
//! partition covers land in the default one; a host-only vigil holds at most two
//! connections. Real PostgreSQL, the real migrations, the real binary.

mod common;

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Running, TestDb, vigil, write};
use vigil::config;
use vigil::jobs::{self, RunContext, RunOutcome};
use vigil::store::partitions::PLANS;

const PARTITIONING: &str = "20261201000001_partitions.sql";

/// The migrations before partitioning, applied to an empty database.
async fn migrate_up_to_partitioning(db: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    for entry in
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations")).unwrap()
    {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < PARTITIONING {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(dir.path())
        .await
        .unwrap()
        .run(db.pool())
        .await
        .unwrap();
}

async fn checksum(db: &TestDb, sql: &str) -> (i64, String) {
    sqlx::query_as(sql).fetch_one(db.pool()).await.unwrap()
}

const SAMPLES_SUM: &str = "SELECT count(*), md5(coalesce(string_agg(host || ts::text || metrics::text || \
     coalesce(cpu_pct::text, ''), ',' ORDER BY host, ts), '')) FROM system_metrics";
const ROLLUP_SUM: &str = "SELECT count(*), md5(coalesce(string_agg(host || minute::text || samples || cpu_sum, \
     ',' ORDER BY host, minute), '')) FROM system_metrics_1m";

async fn partition_of(db: &TestDb, host: &str, ts: DateTime<Utc>) -> String {
    sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM system_metrics WHERE host = $1 AND ts = $2",
    )
    .bind(host)
    .bind(ts)
    .fetch_one(db.pool())
    .await
    .unwrap()
}

fn sample(cpu: f64) -> String {
    format!(r#"{{"v": 1, "cpu": {{"usage_pct": {cpu}}}, "memory": {{"used_pct": 40.5}}}}"#)
}

fn retention(older_than: &str) -> vigil::config::JobSpec {
    let text = format!(
        "[[jobs]]\nname = \"prune\"\nkind = \"retention\"\nevery = \"1h\"\n[jobs.settings]\n\
         tables = [{{ table = \"system_metrics\", column = \"ts\", older_than = \"{older_than}\" }},\n\
                   {{ table = \"system_metrics_1m\", column = \"minute\", older_than = \"{older_than}\" }}]\n"
    );
    config::parse_jobs(
        Path::new("t.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap()
    .jobs
    .remove(0)
}

fn ctx(input: Option<serde_json::Value>) -> RunContext {
    let mut c = RunContext::new(
        "prune",
        uuid::Uuid::now_v7(),
        vigil::store::Trigger::Manual,
        tokio::time::Instant::now() + Duration::from_secs(120),
    );
    c.input = input.map(std::sync::Arc::new);
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn a_populated_unpartitioned_table_converts_keeping_every_row() {
    let db = TestDb::empty().await;
    migrate_up_to_partitioning(&db).await;
    // Ten days of samples of three hosts, and their rollup, as the old schema held them.
    sqlx::query(
        "INSERT INTO system_metrics (ts, host, metrics)
         SELECT date_trunc('second', now()) - g * interval '3 minutes', 'h' || (g % 3),
                jsonb_build_object('cpu', jsonb_build_object('usage_pct', g % 100))
         FROM generate_series(0, 4799) g",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO system_metrics_1m (host, minute, samples, cpu_sum, cpu_n)
         SELECT host, date_bin('1 minute', ts, timestamptz 'epoch'), count(*), sum(cpu_pct), count(cpu_pct)
         FROM system_metrics GROUP BY 1, 2",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let samples = checksum(&db, SAMPLES_SUM).await;
    let rollup = checksum(&db, ROLLUP_SUM).await;
    assert_eq!(samples.0, 4800);

    db.store.migrate().await.unwrap();

    assert_eq!(
        checksum(&db, SAMPLES_SUM).await,
        samples,
        "every sample kept, unchanged"
    );
    assert_eq!(
        checksum(&db, ROLLUP_SUM).await,
        rollup,
        "every rollup row kept"
    );
    let parts = db
        .store
        .partitioning(&config::Ident::parse("system_metrics").unwrap())
        .await
        .unwrap()
        .expect("partitioned");
    assert_eq!(parts.key, "ts");
    let legacy = parts
        .partitions
        .iter()
        .find(|p| p.name == "system_metrics_legacy")
        .expect("the old table is the legacy partition");
    assert!(legacy.lower.is_none());
    let tomorrow = legacy.upper.unwrap();
    assert!(tomorrow > Utc::now() && tomorrow - Utc::now() <= chrono::Duration::days(1));
    let (host, oldest): (String, DateTime<Utc>) =
        sqlx::query_as("SELECT host, ts FROM system_metrics ORDER BY ts LIMIT 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(
        partition_of(&db, &host, oldest).await,
        "system_metrics_legacy"
    );

    // New samples past the legacy range go to daily partitions, through the write path.
    let later = tomorrow + chrono::Duration::hours(3);
    let text = sample(12.5);
    db.store
        .insert_samples("h9", &[(later, text.as_str())])
        .await
        .unwrap();
    assert_eq!(
        partition_of(&db, "h9", later).await,
        format!("system_metrics_p{}", tomorrow.format("%Y%m%d"))
    );

    // Retention prunes the legacy partition row by row until it can go whole.
    let job = jobs::build(&retention("3d"), &db.deps()).unwrap();
    let RunOutcome::Completed {
        items: Some(deleted),
    } = job.run(ctx(None)).await.unwrap()
    else {
        panic!("retention did not complete");
    };
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics_legacy")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let expected_left: i64 = 3 * 24 * 20; // three days of one sample per 3 minutes
    assert!(
        (left - expected_left).abs() <= 1,
        "{left} legacy samples left after 3 days' retention"
    );
    assert!(deleted >= (4800 - left - 1) as u64, "{deleted}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_drops_whole_partitions_and_keeps_the_rest() {
    let db = TestDb::new().await;
    let now = Utc::now();
    let days = |n: i64| chrono::Duration::days(n);
    for plan in PLANS {
        db.store
            .create_partitions(plan, now - days(45), now + days(1))
            .await
            .unwrap();
    }
    // One sample an hour for 40 days, of two hosts, through the write path.
    let texts: Vec<String> = (0..960).map(|i| sample(f64::from(i % 100))).collect();
    for host in ["a", "b"] {
        let rows: Vec<(DateTime<Utc>, &str)> = (0..960)
            .map(|i| {
                let at = now - chrono::Duration::hours(i64::from(i)) - chrono::Duration::minutes(7);
                (at, texts[i as usize].as_str())
            })
            .collect();
        for chunk in rows.chunks(200) {
            db.store.insert_samples(host, chunk).await.unwrap();
        }
    }
    // And some a year old, which no partition covers: the default one takes them.
    let old = now - days(400);
    for i in 0..5 {
        let at = old + chrono::Duration::minutes(i);
        db.store
            .insert_samples("a", &[(at, texts[0].as_str())])
            .await
            .unwrap();
    }
    assert_eq!(partition_of(&db, "a", old).await, "system_metrics_default");

    let cutoff = now - days(30);
    let count = |table: &'static str| {
        let pool = db.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = count("system_metrics").await;
    let rollup_before = count("system_metrics_1m").await;
    let job = jobs::build(&retention("30d"), &db.deps()).unwrap();
    let dry = job
        .run(ctx(Some(serde_json::json!({ "dry_run": true }))))
        .await
        .unwrap();
    let RunOutcome::Completed {
        items: Some(removed),
    } = job.run(ctx(None)).await.unwrap()
    else {
        panic!("retention did not complete");
    };
    assert_eq!(
        dry,
        RunOutcome::Completed {
            items: Some(removed)
        },
        "the dry run said as much"
    );
    let after = count("system_metrics").await;
    let rollup_after = count("system_metrics_1m").await;
    let parts = db
        .store
        .partitioning(&config::Ident::parse("system_metrics").unwrap())
        .await
        .unwrap()
        .unwrap();
    // No partition lies wholly before the cutoff any more; the straddling one stays.
    for p in &parts.partitions {
        assert!(
            p.is_default || p.upper.unwrap() > cutoff,
            "{p:?} should be gone"
        );
    }
    let straddling = parts
        .partitions
        .iter()
        .find(|p| p.lower.is_some_and(|l| l <= cutoff) && p.upper.is_some_and(|u| u > cutoff))
        .expect("the partition holding the cutoff is kept");
    let kept_old: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics WHERE ts < $1")
        .bind(cutoff)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(
        kept_old <= 2 * 24,
        "at most a day older than the cutoff kept: {kept_old}"
    );
    let newer: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics WHERE ts >= $1")
        .bind(cutoff)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(after, newer + kept_old);
    assert_eq!(
        (before - after) + (rollup_before - rollup_after),
        removed as i64,
        "items count what went, samples and rollup rows"
    );
    assert!(
        before - after >= 2 * 24 * 9 + 5,
        "nine days and the year-old five"
    );
    println!(
        "{before} samples; retention removed {removed} (whole partitions and the default's old \
         rows), kept {kept_old} older than the cutoff in {}",
        straddling.name
    );
    // The rollup lost whole months the same way, never the current one.
    let months: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'system_metrics_1m'::regclass",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(months >= 2, "{months}");
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_are_created_ahead_once_even_by_replicas_at_once() {
    let db = TestDb::new().await;
    let now = Utc::now() + chrono::Duration::days(20);
    let (a, b, c) = tokio::join!(
        db.store.ensure_partitions(now),
        db.store.ensure_partitions(now),
        db.store.ensure_partitions(now)
    );
    let mut created: Vec<String> = [a, b, c].into_iter().flat_map(Result::unwrap).collect();
    let total = created.len();
    created.sort();
    created.dedup();
    assert_eq!(
        created.len(),
        total,
        "each partition created once: {created:?}"
    );
    // A day back to a week ahead of that day, and its month and the next.
    assert!(
        created
            .iter()
            .filter(|n| n.starts_with("system_metrics_p"))
            .count()
            >= 8
    );
    assert!(
        db.store.ensure_partitions(now).await.unwrap().is_empty(),
        "idempotent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_only_vigil_holds_at_most_two_connections() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.toml",
        "[[jobs]]\nname = \"host-metrics\"\nkind = \"system_metrics\"\nevery = \"1s\"\n",
    );
    let app_name_count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
             AND application_name LIKE 'vigil%'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap()
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _vigil = Running(
        vigil(
            dir.path(),
            &["run"],
            &[
                ("DATABASE_URL", &db.url),
                ("PORT", &port.to_string()),
                ("VIGIL_LOG", "warn"),
            ],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );
    let http = common::http();
    let mut most = 0;
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if i % 4 == 0 {
            // The gateway too, as an operator would look.
            let _ = http
                .get(format!("http://127.0.0.1:{port}/api/jobs"))
                .send()
                .await;
        }
        most = most.max(app_name_count().await);
    }
    let samples: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(samples >= 5, "it sampled: {samples}");
    println!("host-only vigil: at most {most} PostgreSQL connections over 10 s, {samples} samples");
    assert!((1..=2).contains(&most), "{most} connections");
}
