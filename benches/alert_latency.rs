//! How long from a run's failure to its alert reaching a webhook receiver on loopback:
//! vigil's whole path (the run's outcome handed to the alerts task, the incident opened
//! and its delivery queued in PostgreSQL, the deliverer woken, the signed POST) against
//! a bare POST of the same body to the same receiver, in the same run.
//!
//!     cargo bench --bench alert_latency [-- ITERATIONS]
//!
//! Needs PostgreSQL: TEST_DATABASE_URL, else the server on 127.0.0.1:5432.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use vigil::app::App;
use vigil::config::{self, Environment};
use warp::Filter as _;

#[path = "../tests/common/mod.rs"]
mod common;

/// Arrival times of requests, by their `X-Vigil-Event` header (or "bare").
#[derive(Clone, Default)]
struct Arrivals {
    got: Arc<Mutex<Vec<(String, Instant)>>>,
    notify: Arc<Notify>,
}

impl Arrivals {
    async fn wait_for(&self, event: &str, after: usize) -> Instant {
        loop {
            let notified = self.notify.notified();
            {
                let got = self.got.lock().unwrap();
                let matching: Vec<Instant> = got
                    .iter()
                    .filter(|(e, _)| e == event)
                    .map(|(_, t)| *t)
                    .collect();
                if matching.len() > after {
                    return matching[after];
                }
            }
            if tokio::time::timeout(Duration::from_secs(30), notified)
                .await
                .is_err()
            {
                panic!("no {event} request within 30 s");
            }
        }
    }
}

async fn receiver() -> (std::net::SocketAddr, Arrivals) {
    let arrivals = Arrivals::default();
    let a = arrivals.clone();
    let route = warp::post()
        .and(warp::header::optional::<String>("x-vigil-event"))
        .and(warp::body::bytes())
        .map(move |event: Option<String>, _body: bytes::Bytes| {
            a.got
                .lock()
                .unwrap()
                .push((event.unwrap_or_else(|| "bare".into()), Instant::now()));
            a.notify.notify_waiters();
            warp::http::StatusCode::NO_CONTENT
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (addr, arrivals)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    let (addr, arrivals) = receiver().await;
    let url = format!("http://{addr}/hook");

    // Baseline: the same kind of request, sent directly (reqwest, as vigil sends).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let body = serde_json::json!({ "event": "opened", "job": "bench", "pad": "x".repeat(600) });
    let mut bare = Vec::new();
    for i in 0..iterations {
        let t = Instant::now();
        http.post(&url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .send()
            .await
            .unwrap();
        bare.push(arrivals.wait_for("bare", i).await - t);
    }

    let db = common::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ok");
    let jobs = format!(
        r#"[notifiers.ops]
kind = "webhook"
url = "{url}"
secret = "bench-secret"

[[jobs]]
name = "flip"
kind = "command"
cron = "0 0 0 1 1 *"
alert = {{ on = ["failed"], notify = ["ops"] }}
[jobs.settings]
command = ["test", "-e", "{}"]
"#,
        flag.display()
    );
    let path = common::write(dir.path(), "jobs.toml", &jobs);
    let env = Environment::from_pairs([
        ("PORT", "0"),
        ("VIGIL_HOST", "bench"),
        ("VIGIL_WATCH_CONFIG", "false"),
        ("VIGIL_LOG", "error"),
    ]);
    let config = config::load(&path, &env, &vigil::jobs::Registry::builtin())
        .unwrap_or_else(|e| panic!("{e}"));
    let app = App::start(&config, &db.store).await.unwrap();

    let mut opened = Vec::new();
    let mut resolved = Vec::new();
    for i in 0..iterations {
        let _ = std::fs::remove_file(&flag);
        let mut run = app.scheduler.trigger("flip", true).unwrap();
        let result = run.finished().await;
        let failed_at = Instant::now();
        assert_eq!(result.status.as_str(), "failed");
        opened.push(arrivals.wait_for("opened", i).await - failed_at);

        std::fs::write(&flag, "").unwrap();
        let mut run = app.scheduler.trigger("flip", true).unwrap();
        run.finished().await;
        let succeeded_at = Instant::now();
        resolved.push(arrivals.wait_for("resolved", i).await - succeeded_at);
    }
    app.stop().await;

    for v in [&mut bare, &mut opened, &mut resolved] {
        v.sort();
    }
    println!("alert latency over {iterations} incidents (receiver on loopback):");
    println!(
        "  bare POST (baseline)        p50 {}  p99 {}",
        ms(percentile(&bare, 0.5)),
        ms(percentile(&bare, 0.99))
    );
    for (name, v) in [
        ("failure -> opened alert", &opened),
        ("success -> resolved alert", &resolved),
    ] {
        println!(
            "  {name:<27} p50 {}  p99 {}  ({:.1}x / {:.1}x the baseline)",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            percentile(v, 0.5).as_secs_f64() / percentile(&bare, 0.5).as_secs_f64(),
            percentile(v, 0.99).as_secs_f64() / percentile(&bare, 0.99).as_secs_f64(),
        );
    }
}
