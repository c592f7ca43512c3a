//! Faults injected under the scheduler and the store: PostgreSQL stopped across fire
//! times (every firing still leaves exactly one ledger row), a stalled server, a
//! killed session.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::OwnPostgres;
use vigil::config::{self, JobSpec};
use vigil::jobs::{Job, JobError, RunContext, RunOutcome};
use vigil::scheduler::{Ledger, Scheduler, ledger};
use vigil::store::{PoolOptions, RunRecord, RunStatus, Store, Trigger};

fn spec(name: &str, scope: &str) -> JobSpec {
    let text = format!(
        "[[jobs]]\nname = \"{name}\"\nkind = \"command\"\nevery = \"1s\"\nscope = \"{scope}\"\n\
         [jobs.settings]\ncommand = [\"true\"]\n"
    );
    config::parse_jobs(
        Path::new("t.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .jobs
    .remove(0)
}

/// Succeeds at once, touching nothing.
struct Quick;

#[async_trait::async_trait]
impl Job for Quick {
    async fn run(&self, _ctx: RunContext) -> Result<RunOutcome, JobError> {
        Ok(RunOutcome::Completed { items: Some(1) })
    }
}

async fn all_runs(store: &Store, job: &str) -> Vec<RunRecord> {
    let mut runs = store
        .runs(&vigil::store::runs::RunQuery {
            job: Some(job),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    runs.reverse();
    runs
}

/// Scheduled firings (not retries) per instant.
fn per_firing(runs: &[RunRecord]) -> BTreeMap<DateTime<Utc>, Vec<&RunRecord>> {
    let mut map: BTreeMap<DateTime<Utc>, Vec<&RunRecord>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.trigger == Trigger::Schedule) {
        map.entry(r.scheduled_at).or_default().push(r);
    }
    map
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_stopped_across_fire_times_leaves_exactly_one_row_per_firing() {
    let mut pg = OwnPostgres::start().await;
    let options = PoolOptions {
        max_connections: 5,
        // Short, so a claim against the stopped server gives up within the second.
        acquire_timeout: Duration::from_millis(700),
        ..PoolOptions::default()
    };
    let store = Store::connect_with(&pg.target(), &options, Duration::from_secs(10))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let scheduler = Scheduler::new(
        Ledger::start(store.clone(), ledger::DEFAULT_CAPACITY, Default::default()),
        "faulty",
    )
    .await
    .unwrap();
    scheduler
        .add(spec("cluster-tick", "cluster"), Arc::new(Quick))
        .await
        .unwrap();
    scheduler
        .add(spec("host-tick", "host"), Arc::new(Quick))
        .await
        .unwrap();
    scheduler.start().await.unwrap();

    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.down().await;
    let down_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    // A claim keeps retrying its connection for up to 0.7 s, so a firing in the last
    // second before the restart may still find the server back.
    let up_at = Utc::now() - chrono::Duration::seconds(1);
    pg.up().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = scheduler.shutdown(Duration::from_secs(5)).await;
    assert!(
        report.ledger_flushed,
        "the ledger caught up once PostgreSQL was back"
    );

    for job in ["cluster-tick", "host-tick"] {
        let runs = all_runs(&store, job).await;
        let firings = per_firing(&runs);
        let first = *firings.keys().next().unwrap();
        let last = *firings.keys().last().unwrap();
        // Every second from the first firing to the last has its row, and only one.
        let expected = (last - first).num_seconds() + 1;
        assert_eq!(
            firings.len() as i64,
            expected,
            "{job}: a firing without a row: {:?}",
            firings.keys().collect::<Vec<_>>()
        );
        for (at, rows) in &firings {
            assert_eq!(rows.len(), 1, "{job} at {at}: {rows:#?}");
        }
        let outage: Vec<&RunRecord> = firings
            .iter()
            .filter(|(at, _)| **at > down_at && **at < up_at)
            .map(|(_, rows)| rows[0])
            .collect();
        assert!(
            outage.len() >= 4,
            "{job}: {} firings during the outage",
            outage.len()
        );
        println!(
            "{job}: {} firings from first to last, one row each; {} during the outage",
            firings.len(),
            outage.len()
        );
        if job == "cluster-tick" {
            // Nobody could claim them: recorded failed, with the reason.
            for r in &outage {
                assert_eq!(r.status, RunStatus::Failed, "{r:?}");
                let error = r.error.as_deref().unwrap_or("");
                assert!(
                    error.contains("cannot claim the firing") || error.contains("cluster lock"),
                    "{error}"
                );
            }
        } else {
            // A host job needs no claim: it ran, and its rows waited in the ledger.
            assert!(
                outage.iter().all(|r| r.status == RunStatus::Succeeded),
                "{outage:#?}"
            );
        }
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_connection_carries_a_statement_timeout_and_keepalives() {
    let pg = OwnPostgres::start().await;
    let options = PoolOptions {
        statement_timeout: Some(Duration::from_millis(1500)),
        keepalive: Some(Duration::from_secs(12)),
        ..PoolOptions::default()
    };
    let store = Store::connect_with(&pg.target(), &options, Duration::from_secs(10))
        .await
        .unwrap();
    let show = |name: &'static str| {
        let pool = store.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>(&format!("SHOW {name}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(show("statement_timeout").await, "1500ms");
    assert_eq!(show("plan_cache_mode").await, "force_custom_plan");
    assert_eq!(show("tcp_keepalives_idle").await, "12");
    assert_eq!(show("tcp_keepalives_interval").await, "4");
    assert_eq!(show("tcp_keepalives_count").await, "3");
    // And the server enforces it.
    let err = sqlx::query("SELECT pg_sleep(5)")
        .execute(store.pool())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("statement timeout"), "{err}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_server_is_cut_off_by_the_client_side_bound() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use sqlx::Connection as _;
    let pg = OwnPostgres::start().await;
    let options = PoolOptions {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(1),
        statement_timeout: Some(Duration::from_secs(1)),
        ..PoolOptions::default()
    };
    let store = Store::connect_with(&pg.target(), &options, Duration::from_secs(10))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    // Another session holds the claim's row, so the claim's statement waits on it...
    let at = Utc::now();
    let mut other = sqlx::PgConnection::connect_with(&pg.target().options)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("INSERT INTO job_claims (job, scheduled_at, host) VALUES ('stalled', $1, 'x')")
        .bind(at)
        .execute(&mut other)
        .await
        .unwrap();
    let claim = tokio::spawn({
        let store = store.clone();
        async move {
            let started = std::time::Instant::now();
            (
                store.claim_firing("stalled", at, "h").await,
                started.elapsed(),
            )
        }
    });
    let waiting: i32 = common::eventually(Duration::from_secs(5), "the claim to wait", || {
        let probe = pg.target().options;
        async move {
            let mut c = sqlx::PgConnection::connect_with(&probe).await.ok()?;
            sqlx::query_scalar::<_, i32>(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%job_claims%'",
            )
            .fetch_optional(&mut c)
            .await
            .ok()
            .flatten()
        }
    })
    .await;
    // ...and then its backend freezes, as a server cut off by the network would: the
    // statement timeout cannot fire in a frozen process, only the client's bound can.
    kill(Pid::from_raw(waiting), Signal::SIGSTOP).unwrap();
    let (result, waited) = claim.await.unwrap();
    kill(Pid::from_raw(waiting), Signal::SIGCONT).unwrap();
    let err = result.unwrap_err().to_string();
    assert!(err.contains("did not answer within"), "{err}");
    // statement 1 s + acquire 1 s + 5 s margin.
    assert!(waited < Duration::from_secs(9), "waited {waited:?}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_locks_reuse_connections_of_their_own_pool() {
    let db = common::TestDb::new().await;
    let scheduler = Scheduler::new(
        Ledger::start(
            db.store.clone(),
            ledger::DEFAULT_CAPACITY,
            Default::default(),
        ),
        "h",
    )
    .await
    .unwrap();
    scheduler
        .add(spec("locked", "cluster"), Arc::new(Quick))
        .await
        .unwrap();
    for _ in 0..5 {
        let result = scheduler.trigger("locked", false).unwrap().finished().await;
        assert_eq!(result.status, RunStatus::Succeeded, "{result:?}");
    }
    // Five runs, each holding the lock for its length, one connection between them.
    let sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'vigil-locks'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(sessions, 1);
    scheduler.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn samples_and_ledger_rows_queued_at_shutdown_survive_a_restart() {
    use common::{Running, vigil, write};
    use nix::sys::signal::Signal;
    let mut pg = OwnPostgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.toml",
        "[[jobs]]\nname = \"host-metrics\"\nkind = \"system_metrics\"\nevery = \"1s\"\n\
         [jobs.settings]\ncollect = [\"cpu\", \"memory\"]\n",
    );
    let url = pg.url();
    let data = dir.path().join("data");
    let data_text = data.display().to_string();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("PORT", "0"),
        ("VIGIL_HOST", "spooler"),
        ("VIGIL_DATA_DIR", data_text.as_str()),
        ("VIGIL_DB_ACQUIRE_TIMEOUT", "1s"),
        ("VIGIL_WATCH_CONFIG", "false"),
    ];
    let start = || {
        Running(
            vigil(dir.path(), &["run"], &env)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut first = start();
    tokio::time::sleep(Duration::from_secs(4)).await;
    pg.down().await;
    let down_at = Utc::now();
    // 30 samples (and their runs' rows) queue up with nowhere to go.
    tokio::time::sleep(Duration::from_secs(31)).await;
    first.signal(Signal::SIGTERM);
    let status = first
        .wait_exit(Duration::from_secs(40))
        .expect("vigil exits");
    assert!(status.success(), "{status:?}");
    let stopped_at = Utc::now();
    assert!(
        std::fs::read_dir(data.join("spool")).unwrap().count() >= 2,
        "samples and ledger rows spooled"
    );

    pg.up().await;
    let second = start();
    let store = Store::connect(&pg.target(), 2, Duration::from_secs(10))
        .await
        .unwrap();
    // The spooled samples are written first, then sampling goes on.
    let outage: Vec<DateTime<Utc>> = common::eventually(
        Duration::from_secs(30),
        "the spooled samples",
        || {
            let store = store.clone();
            async move {
                let ts: Vec<DateTime<Utc>> = sqlx::query_scalar(
                    "SELECT ts FROM system_metrics WHERE host = 'spooler' AND ts > $1 AND ts < $2 ORDER BY ts",
                )
                .bind(down_at)
                .bind(stopped_at)
                .fetch_all(store.pool())
                .await
                .ok()?;
                (ts.len() >= 30).then_some(ts)
            }
        },
    )
    .await;
    // Once each, every second of the outage.
    let seconds: Vec<i64> = outage.iter().map(|t| t.timestamp()).collect();
    let mut distinct = seconds.clone();
    distinct.dedup();
    assert_eq!(seconds, distinct, "no sample twice");
    assert_eq!(
        seconds,
        (seconds[0]..=*seconds.last().unwrap()).collect::<Vec<_>>(),
        "no second missing"
    );
    // The runs of the outage reached the ledger too (its spool is written by a writer
    // of its own, maybe a moment later), once each.
    let runs: Vec<(DateTime<Utc>, i64)> =
        common::eventually(Duration::from_secs(30), "the spooled ledger rows", || {
            let store = store.clone();
            async move {
                let runs: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
                    "SELECT scheduled_at, count(*) FROM job_runs WHERE job = 'host-metrics' \
                     AND scheduled_at > $1 AND scheduled_at < $2 GROUP BY 1 ORDER BY 1",
                )
                .bind(down_at)
                .bind(stopped_at)
                .fetch_all(store.pool())
                .await
                .ok()?;
                (runs.len() >= 30).then_some(runs)
            }
        })
        .await;
    assert!(runs.iter().all(|(_, n)| *n == 1), "{runs:?}");
    println!(
        "after the restart: {} samples of the outage, once each, in order; {} ledger rows",
        outage.len(),
        runs.len()
    );
    drop(second);
    store.close().await;
}

/// Samples and run outcomes go through one kept ("hot") connection. When its session
/// is killed under it, the write that finds out fails, and the next one must land on
/// a new session: a dead connection kept in the slot would fail every write after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_hot_connection_is_let_go_and_the_next_write_lands_on_a_new_session() {
    let db = common::TestDb::new().await;
    let base = Utc::now().timestamp() - 60;
    let at = |s: i64| DateTime::<Utc>::from_timestamp(base + s, 0).expect("a time");
    let sample = r#"{"v":1,"cpu":{"usage_pct":1.5}}"#;
    let hot_session = async || -> i32 {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND query LIKE '%INSERT INTO system_metrics_1m%'",
        )
        .fetch_one(db.pool())
        .await
        .expect("the hot connection's session")
    };
    db.store
        .insert_samples("h", &[(at(0), sample)])
        .await
        .unwrap();
    let killed = hot_session().await;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(killed)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(terminated);

    // The server has ended the session: this write cannot land.
    let failed = db.store.insert_samples("h", &[(at(1), sample)]).await;
    assert!(
        failed.is_err(),
        "a write on a killed session reported success"
    );
    for s in 2..5 {
        db.store
            .insert_samples("h", &[(at(s), sample)])
            .await
            .unwrap_or_else(|e| panic!("write {s} after the kill: {e}"));
    }
    assert_ne!(hot_session().await, killed, "a new session");
    let times: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT ts FROM system_metrics WHERE host = 'h' ORDER BY ts")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(times, [at(0), at(2), at(3), at(4)]);
}
