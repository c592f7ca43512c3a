//! What invoking a job over HTTP costs: N invocations of a trivial `command` job
//! (`true`) through `POST /api/jobs/{name}/runs` with an input, against spawning the
//! same program N times directly, at the same concurrency, in the same run.
//!
//!     cargo bench --bench invoke [-- N [CONCURRENCY]]
//!
//! invoke-to-start: from the request leaving the client to the run's recorded start
//! (the attempt begins, the program is spawned next); for the baseline, from the
//! spawn call to its return. Runs per second: N over the time until the last one has
//! ended. Needs PostgreSQL: TEST_DATABASE_URL, else the server on 127.0.0.1:5432.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use vigil::app::App;
use vigil::config::{self, Environment};

#[path = "../tests/common/mod.rs"]
mod common;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The baseline: `true` spawned and waited for `n` times, `concurrency` at once.
async fn direct(n: usize, concurrency: usize) -> (Vec<Duration>, Duration) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let permit = slots.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let mut child = tokio::process::Command::new("true")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .process_group(0)
                .spawn()
                .unwrap();
            let to_start = t.elapsed();
            child.wait().await.unwrap();
            drop(permit);
            to_start
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await.unwrap());
    }
    (lat, started.elapsed())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(1000);
    let concurrency = args.get(1).copied().unwrap_or(16);

    let (mut base_lat, base_wall) = direct(n, concurrency).await;

    let db = common::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = common::write(
        dir.path(),
        "jobs.toml",
        "[[jobs]]\nname = \"noop\"\nkind = \"command\"\ncron = \"0 0 0 1 1 *\"\noverlap = \"allow\"\n\
         [jobs.settings]\ncommand = [\"true\"]\n",
    );
    let env = Environment::from_pairs([
        ("PORT", "0"),
        ("VIGIL_HOST", "bench"),
        ("VIGIL_WATCH_CONFIG", "false"),
        ("VIGIL_LOG", "error"),
    ]);
    let config = config::load(&path, &env, &vigil::jobs::Registry::builtin())
        .unwrap_or_else(|e| panic!("{e}"));
    let app = App::start(&config, &db.store).await.unwrap();
    let url = format!("http://{}/api/jobs/noop/runs", app.address());
    let http = common::http();

    let slots = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let sent: DateTime<Utc> = Utc::now();
            let r = http
                .post(&url)
                .json(&serde_json::json!({ "i": i }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
            let body: serde_json::Value = r.json().await.unwrap();
            drop(permit);
            (body["run_id"].as_str().unwrap().to_owned(), sent)
        }));
    }
    let mut sent_at = HashMap::new();
    for t in tasks {
        let (id, sent) = t.await.unwrap();
        sent_at.insert(id, sent);
    }
    // Until every run has ended (the ledger is written behind the runs: flush it).
    let mut last_end = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        app.scheduler
            .flush_ledger(Duration::from_secs(5))
            .await
            .unwrap();
        let (done, end): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT count(*), max(finished_at) FROM job_runs WHERE job = 'noop' AND status = 'succeeded'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if done as usize == n {
            last_end = end;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = started.elapsed();
    let last_end = last_end.expect("every run ended within 300 s");
    let rows: Vec<(uuid::Uuid, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, started_at FROM job_runs WHERE job = 'noop'")
            .fetch_all(db.pool())
            .await
            .unwrap();
    let first_sent = sent_at.values().min().copied().unwrap();
    let mut lat: Vec<Duration> = rows
        .iter()
        .filter_map(|(id, start)| {
            let sent = sent_at.get(&id.to_string())?;
            (*start - *sent).to_std().ok().or(Some(Duration::ZERO))
        })
        .collect();
    assert_eq!(lat.len(), n, "every run found by its id");
    app.stop().await;
    lat.sort();
    base_lat.sort();
    let vigil_rate = n as f64
        / (last_end - first_sent)
            .to_std()
            .unwrap_or(wall)
            .as_secs_f64();
    let base_rate = n as f64 / base_wall.as_secs_f64();
    println!("{n} invocations of `true`, {concurrency} at a time:");
    println!(
        "  spawned directly (baseline)   to start p50 {}  p99 {}   {:.0} runs/s",
        ms(percentile(&base_lat, 0.5)),
        ms(percentile(&base_lat, 0.99)),
        base_rate
    );
    println!(
        "  through vigil's HTTP trigger  to start p50 {}  p99 {}   {:.0} runs/s",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        vigil_rate
    );
    println!(
        "  vigil / baseline: {:.2}x the runs per second; {:.2} ms more wall time per run in flight",
        vigil_rate / base_rate,
        (1.0 / vigil_rate - 1.0 / base_rate) * 1000.0 * concurrency as f64
    );
}
