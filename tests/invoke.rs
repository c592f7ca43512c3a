//! Jobs invoked like functions, over real TCP against real PostgreSQL: input reaching
//! each kind, 413/415/422, idempotency keys across a restart and two replicas,
//! `max_concurrency`, callbacks (signed, retried, refused hosts), output, pause and
//! resume across replicas and restarts, jitter.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, eventually, write};
use hmac::{Hmac, Mac as _};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use vigil::app::App;
use vigil::config::{self, Environment};
use warp::Filter as _;

/// vigils (scheduler and gateway) sharing one database, as replicas or restarts.
struct Cluster {
    db: TestDb,
    dir: tempfile::TempDir,
    jobs: PathBuf,
}

struct Replica {
    app: Option<App>,
    base: String,
    http: reqwest::Client,
}

impl Cluster {
    async fn new(jobs: &str) -> Self {
        let db = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let jobs = write(dir.path(), "jobs.toml", jobs);
        Self { db, dir, jobs }
    }

    async fn replica(&self, host: &str, env: &[(&str, &str)]) -> Replica {
        let data = self.dir.path().join(host);
        std::fs::create_dir_all(&data).unwrap();
        let mut vars: Vec<(&str, &str)> = vec![
            ("PORT", "0"),
            ("VIGIL_HOST", host),
            ("VIGIL_WATCH_CONFIG", "false"),
            ("VIGIL_SHUTDOWN_GRACE", "2s"),
            ("VIGIL_DATA_DIR", data.to_str().unwrap()),
        ];
        vars.extend_from_slice(env);
        let env = Environment::from_pairs(vars);
        let config = config::load(&self.jobs, &env, &vigil::jobs::Registry::builtin())
            .unwrap_or_else(|e| panic!("{e}"));
        let app = App::start(&config, &self.db.store).await.unwrap();
        Replica {
            base: format!("http://{}", app.address()),
            app: Some(app),
            http: common::http(),
        }
    }
}

impl Replica {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs `input` as JSON (none when `Null`) with extra headers.
    async fn invoke(
        &self,
        path: &str,
        input: &Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.post(self.url(path));
        if !input.is_null() {
            req = req.json(input);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        let s = r.status();
        let h = r.headers().clone();
        (s, h, r.json().await.unwrap_or(Value::Null))
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

async fn run_rows(db: &TestDb, job: &str) -> Vec<vigil::store::RunRecord> {
    db.runs(job).await
}

const COMMANDS: &str = r#"
[[jobs]]
name = "echo"
kind = "command"
every = "1h"
[jobs.settings]
command = ["cat"]

[[jobs]]
name = "whoami"
kind = "command"
every = "1h"
[jobs.settings]
command = ["sh", "-c", "printf '{\"run\":\"%s\",\"job\":\"%s\",\"trigger\":\"%s\"}' \"$VIGIL_RUN_ID\" \"$VIGIL_JOB\" \"$VIGIL_TRIGGER\""]

[[jobs]]
name = "chatty"
kind = "command"
every = "1h"
[jobs.settings]
command = ["sh", "-c", "echo 'not json, but text'; seq 1 100000"]
max_output_bytes = 64

[[jobs]]
name = "host-metrics"
kind = "system_metrics"
every = "1h"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_command_job_reads_its_input_on_stdin_and_returns_its_output() {
    let c = Cluster::new(COMMANDS).await;
    let r = c.replica("invoke-a", &[]).await;
    let input = json!({ "order": 42, "items": ["a", "b"], "note": "ünïcode \u{1F600}" });

    // wait=true: the output is the JSON the program printed (its input, by `cat`).
    let (s, _, body) = r.invoke("/api/jobs/echo/runs?wait=true", &input, &[]).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_eq!(body["output"], input, "{body}");
    assert_eq!(body["output_truncated"], false);
    let id = body["run_id"].as_str().unwrap().to_owned();

    // The run keeps its input; the output is served on its own.
    let (s, run) = r.get(&format!("/api/runs/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(run["input"], input, "{run}");
    let out = r
        .http
        .get(r.url(&format!("/api/runs/{id}/output")))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::OK);
    assert_eq!(out.headers()["content-type"], "application/json");
    assert_eq!(out.headers()["x-vigil-output-truncated"], "false");
    assert_eq!(out.json::<Value>().await.unwrap(), input);

    // What PostgreSQL's jsonb cannot hold (U+0000, in a key or a string) is kept
    // losslessly, not refused and not lost.
    let hostile = json!({ "k\u{0}ey": ["nul \u{0} inside", { "$vigil_json_base64": 1 }] });
    let (s, _, body) = r
        .invoke("/api/jobs/echo/runs?wait=true", &hostile, &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["output"], hostile, "{body}");
    let (_, run) = r
        .get(&format!("/api/runs/{}", body["run_id"].as_str().unwrap()))
        .await;
    assert_eq!(run["input"], hostile, "{run}");

    // The environment names the run, the job and the trigger.
    let (s, _, body) = r
        .invoke("/api/jobs/whoami/runs?wait=true", &Value::Null, &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["output"]["run"], body["run_id"], "{body}");
    assert_eq!(body["output"]["job"], "whoami");
    assert_eq!(body["output"]["trigger"], "manual");
    // No input: the run's input is null, stdin was empty.
    let (_, run) = r
        .get(&format!("/api/runs/{}", body["run_id"].as_str().unwrap()))
        .await;
    assert_eq!(run["input"], Value::Null);

    // Output that is not JSON is text, cut at max_output_bytes and said so.
    let (s, _, body) = r
        .invoke("/api/jobs/chatty/runs?wait=true", &Value::Null, &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let text = body["output"].as_str().unwrap();
    assert!(text.starts_with("not json, but text\n1\n2\n"), "{text:?}");
    assert_eq!(text.len(), 64);
    assert_eq!(body["output_truncated"], true);
    let out = r
        .http
        .get(r.url(&format!(
            "/api/runs/{}/output",
            body["run_id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(out.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(out.headers()["x-vigil-output-truncated"], "true");
    let total: u64 = out.headers()["x-vigil-output-bytes"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(total > 500_000, "all of stdout is counted: {total}");
    assert_eq!(out.text().await.unwrap().len(), 64);

    // A run without output, and a run that does not exist.
    let (s, body) = r
        .get(&format!("/api/runs/{}/output", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_too_large_not_json_or_off_the_kinds_schema_are_refused_and_start_nothing() {
    let jobs = format!(
        "{COMMANDS}\n[[jobs]]\nname = \"prune\"\nkind = \"retention\"\nevery = \"1h\"\n\
         [jobs.settings]\ntables = [{{ table = \"system_metrics\", column = \"ts\", older_than = \"30d\" }}]\n\n\
         [[jobs]]\nname = \"sync\"\nkind = \"mongo_sync\"\nevery = \"1h\"\n\
         [jobs.settings]\ndatabase = \"d\"\ncollection = \"c\"\n"
    );
    let c = Cluster::new(&jobs).await;
    let r = c
        .replica(
            "invoke-b",
            &[
                ("VIGIL_MAX_INPUT_BYTES", "1KiB"),
                ("MONGO_URI", "mongodb://127.0.0.1:1"),
            ],
        )
        .await;

    // 413: past VIGIL_MAX_INPUT_BYTES (declared, and streamed without a length).
    let big = json!({ "blob": "x".repeat(2000) });
    let (s, _, body) = r.invoke("/api/jobs/echo/runs", &big, &[]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "payload_too_large");
    // Chunked, so no Content-Length tells: the limit holds while reading.
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = tokio::net::TcpStream::connect(r.base.trim_start_matches("http://"))
            .await
            .unwrap();
        let mut req = b"POST /api/jobs/echo/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                        Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
                        Connection: close\r\n\r\n"
            .to_vec();
        for _ in 0..40 {
            req.extend_from_slice(b"64\r\n");
            req.extend_from_slice(&[b' '; 100]);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        // The server may answer and close before it has read everything.
        let _ = conn.write_all(&req).await;
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    // 415: a body that is not sent as JSON.
    let r415 = r
        .http
        .post(r.url("/api/jobs/echo/runs"))
        .header("content-type", "text/plain")
        .body("{\"a\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r415.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(
        r415.text()
            .await
            .unwrap()
            .contains("Content-Type: application/json")
    );

    // 400: JSON that is not JSON, with where it broke.
    let bad = r
        .http
        .post(r.url("/api/jobs/echo/runs"))
        .header("content-type", "application/json")
        .body("{\"a\": \n  tru}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["line"], 2, "{body}");

    // 422 naming the field, for each kind's schema.
    for (job, input, field) in [
        ("host-metrics", json!({ "anything": 1 }), ""),
        ("prune", json!({ "dry_run": "yes" }), "dry_run"),
        ("prune", json!({ "dry_runs": true }), "dry_runs"),
        ("sync", json!({ "limit": 0 }), "limit"),
        (
            "sync",
            json!({ "filter": { "$where": "sleep(1000)" } }),
            "filter.$where",
        ),
        (
            "sync",
            json!({ "filter": { "$or": [{ "a": 1 }, { "$expr": { "$function": {} } }] } }),
            "filter.$or[1].$expr.$function",
        ),
        ("sync", json!({ "filter": 3 }), "filter"),
    ] {
        let (s, _, body) = r
            .invoke(&format!("/api/jobs/{job}/runs"), &input, &[])
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{job} {input}: {body}");
        assert_eq!(body["error"], "invalid_input", "{body}");
        assert_eq!(body["field"], field, "{job} {input}: {body}");
        assert!(body["message"].as_str().unwrap().contains(job), "{body}");
    }
    // Nothing of the above started a run.
    for job in ["echo", "host-metrics", "prune", "sync"] {
        assert!(run_rows(&c.db, job).await.is_empty(), "{job} ran");
    }
    // An empty body or JSON null is no input at all.
    let (s, _, body) = r
        .invoke("/api/jobs/host-metrics/runs?wait=true", &Value::Null, &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retention_dry_run_counts_what_it_would_delete_and_deletes_nothing() {
    let jobs = "[[jobs]]\nname = \"prune\"\nkind = \"retention\"\nevery = \"1h\"\n\
                [jobs.settings]\ntables = [{ table = \"reading_analytics\", older_than = \"1d\", column = \"synced_at\" }]\n";
    let c = Cluster::new(jobs).await;
    sqlx::query(
        "INSERT INTO reading_analytics (source_id, payload, synced_at)
         SELECT 'doc-' || g, '{}'::jsonb, now() - (CASE WHEN g <= 30 THEN interval '3 days' ELSE interval '1 hour' END)
         FROM generate_series(1, 50) g",
    )
    .execute(c.db.pool())
    .await
    .unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM reading_analytics")
            .fetch_one(c.db.pool())
            .await
            .unwrap()
    };
    let r = c.replica("invoke-c", &[]).await;
    let (s, _, body) = r
        .invoke(
            "/api/jobs/prune/runs?wait=true",
            &json!({ "dry_run": true }),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_eq!(body["items"], 30, "{body}");
    assert_eq!(count().await, 50, "a dry run deleted rows");
    let (_, _, body) = r
        .invoke(
            "/api/jobs/prune/runs?wait=true",
            &json!({ "dry_run": false }),
            &[],
        )
        .await;
    assert_eq!(body["items"], 30, "{body}");
    assert_eq!(count().await, 20);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mongo_sync_input_narrows_the_pending_documents_and_never_widens_them() {
    let mongo = common::MongoServer::start().await;
    let coll = mongo
        .client()
        .await
        .database("observability")
        .collection::<mongodb::bson::Document>("readings");
    let docs: Vec<mongodb::bson::Document> = (0..40)
        .map(|i| {
            mongodb::bson::doc! {
                "status": if i % 10 == 9 { "processed" } else { "ingested" },
                "site": if i % 2 == 0 { "north" } else { "south" },
                "value": i,
            }
        })
        .collect();
    coll.insert_many(docs).await.unwrap();
    let jobs = "[[jobs]]\nname = \"reading-sync\"\nkind = \"mongo_sync\"\nevery = \"1h\"\n\
                [jobs.settings]\ndatabase = \"observability\"\ncollection = \"readings\"\nbatch_size = 3\n";
    let c = Cluster::new(jobs).await;
    let r = c.replica("invoke-d", &[("MONGO_URI", &mongo.uri)]).await;
    // Five of the pending north documents.
    let (s, _, body) = r
        .invoke(
            "/api/jobs/reading-sync/runs?wait=true",
            &json!({ "filter": { "site": "north" }, "limit": 5 }),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_eq!(body["items"], 5, "{body}");
    let sites: Vec<(String, i64)> = sqlx::query_as(
        "SELECT payload->>'site', (payload->>'value')::bigint FROM reading_analytics ORDER BY 2",
    )
    .fetch_all(c.db.pool())
    .await
    .unwrap();
    assert_eq!(sites.len(), 5);
    assert!(sites.iter().all(|(s, _)| s == "north"), "{sites:?}");
    // A filter asking for processed documents cannot reach past the pending filter.
    let (_, _, body) = r
        .invoke(
            "/api/jobs/reading-sync/runs?wait=true",
            &json!({ "filter": { "status": "processed" } }),
            &[],
        )
        .await;
    assert_eq!(body["items"], 0, "{body}");
    // All the rest: every pending document once, none of the processed ones.
    let (_, _, body) = r
        .invoke("/api/jobs/reading-sync/runs?wait=true", &Value::Null, &[])
        .await;
    assert_eq!(body["items"], 31, "{body}");
    let n: i64 = sqlx::query_scalar("SELECT count(DISTINCT source_id) FROM reading_analytics")
        .fetch_one(c.db.pool())
        .await
        .unwrap();
    assert_eq!(n, 36);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_returns_its_first_run_across_a_restart_and_another_replica() {
    let jobs = "[[jobs]]\nname = \"work\"\nkind = \"command\"\nevery = \"1h\"\noverlap = \"allow\"\n\
                [jobs.settings]\ncommand = [\"sh\", \"-c\", \"cat; sleep 0.3\"]\n";
    let c = Cluster::new(jobs).await;
    let a = c.replica("replica-a", &[]).await;
    let key = [("Idempotency-Key", "order-42")];
    let (s, _, first) = a
        .invoke("/api/jobs/work/runs", &json!({ "n": 1 }), &key)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{first}");
    let run = first["run_id"].as_str().unwrap().to_owned();
    // The same request again: the same run, not a new one.
    let (s, h, again) = a
        .invoke("/api/jobs/work/runs", &json!({ "n": 1 }), &key)
        .await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["run_id"], run.as_str());
    assert_eq!(again["replayed"], true);
    assert_eq!(h["location"], format!("/api/runs/{run}"));
    // The same key with another input is a mistake, said so.
    let (s, _, body) = a
        .invoke("/api/jobs/work/runs", &json!({ "n": 2 }), &key)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "idempotency_key_reused");
    assert_eq!(body["run_id"], run.as_str());
    // Bad keys are refused before anything starts.
    for bad in ["", "has space", &"k".repeat(256)] {
        let (s, _, body) = a
            .invoke(
                "/api/jobs/work/runs",
                &json!({ "n": 1 }),
                &[("Idempotency-Key", bad)],
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
    }

    // After a restart, and from another replica: still the first run.
    eventually(
        Duration::from_secs(10),
        "the first run finished",
        || async {
            let (_, r) = a.get(&format!("/api/runs/{run}")).await;
            (r["status"] == "succeeded").then_some(())
        },
    )
    .await;
    a.stop().await;
    let a = c.replica("replica-a", &[]).await;
    let b = c.replica("replica-b", &[]).await;
    for r in [&a, &b] {
        let (s, _, body) = r
            .invoke("/api/jobs/work/runs", &json!({ "n": 1 }), &key)
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["run_id"], run.as_str());
        assert_eq!(body["status"], "succeeded", "{body}");
        assert_eq!(body["run"]["input"], json!({ "n": 1 }));
    }

    // Two replicas given one new key at the same moment start one run between them.
    let key2 = [("Idempotency-Key", "order-43")];
    let input = json!({ "n": 3 });
    let (ra, rb) = tokio::join!(
        a.invoke("/api/jobs/work/runs", &input, &key2),
        b.invoke("/api/jobs/work/runs", &input, &key2)
    );
    let ids = [&ra.2["run_id"], &rb.2["run_id"]];
    assert_eq!(ids[0], ids[1], "{} / {}", ra.2, rb.2);
    let mut statuses = [ra.0, rb.0];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::ACCEPTED]);
    // Asking each replica for the run flushes its ledger queue, so every row either
    // started is in PostgreSQL before they are counted.
    let second = ids[0].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(10), "runs finished", || async {
        for r in [&a, &b] {
            r.get(&format!("/api/runs/{second}")).await;
        }
        let rows = run_rows(&c.db, "work").await;
        rows.iter().all(|r| r.finished_at.is_some()).then_some(())
    })
    .await;
    let rows = run_rows(&c.db, "work").await;
    assert_eq!(rows.len(), 2, "one run per key: {rows:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_concurrency_refuses_triggers_with_429_and_records_firings_beyond_it_skipped() {
    let jobs = r#"
[[jobs]]
name = "pool"
kind = "command"
every = "1h"
overlap = "allow"
max_concurrency = 2
[jobs.settings]
command = ["sleep", "3"]

[[jobs]]
name = "busy"
kind = "command"
every = "1s"
overlap = "allow"
max_concurrency = 2
scope = "host"
[jobs.settings]
command = ["sleep", "3.5"]

[[jobs]]
name = "shared"
kind = "command"
every = "1h"
overlap = "allow"
max_concurrency = 2
[jobs.settings]
command = ["sleep", "3"]
"#;
    let c = Cluster::new(jobs).await;
    let a = c.replica("conc-a", &[]).await;
    // Manual: two start, the third is told to come back.
    for _ in 0..2 {
        let (s, _, body) = a.invoke("/api/jobs/pool/runs", &Value::Null, &[]).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    }
    let (s, h, body) = a.invoke("/api/jobs/pool/runs", &Value::Null, &[]).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"], "concurrency_limit");
    assert_eq!(body["max_concurrency"], 2);
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);

    // Cluster scope: the limit holds across replicas.
    let b = c.replica("conc-b", &[]).await;
    let (s, _, body) = a.invoke("/api/jobs/shared/runs", &Value::Null, &[]).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    let (s, _, body) = b.invoke("/api/jobs/shared/runs", &Value::Null, &[]).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    for r in [&a, &b] {
        let (s, _, body) = r.invoke("/api/jobs/shared/runs", &Value::Null, &[]).await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
    }
    b.stop().await;

    // Scheduled: a 1 s job whose runs take 3.5 s never runs more than two at once,
    // and the firings beyond are recorded skipped with the reason.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let rows: Vec<_> = run_rows(&c.db, "busy")
        .await
        .into_iter()
        .filter(|r| r.host == "conc-a")
        .collect();
    let skipped: Vec<_> = rows
        .iter()
        .filter(|r| r.status == vigil::store::RunStatus::Skipped)
        .collect();
    assert!(skipped.len() >= 3, "{rows:?}");
    assert!(
        skipped
            .iter()
            .all(|r| r.error.as_deref().unwrap_or("").contains("max_concurrency")),
        "{skipped:?}"
    );
    let ran: Vec<_> = rows
        .iter()
        .filter(|r| r.status != vigil::store::RunStatus::Skipped)
        .collect();
    assert!(ran.len() >= 2, "{rows:?}");
    for r in &ran {
        let overlapping = ran
            .iter()
            .filter(|o| {
                o.started_at <= r.started_at && o.finished_at.is_none_or(|f| f > r.started_at)
            })
            .count();
        assert!(
            overlapping <= 2,
            "{overlapping} runs at once at {}",
            r.started_at
        );
    }
    a.stop().await;
}

/// One POST a receiver got: what it answered, the signature header, the body.
type Got = (u16, Option<String>, Vec<u8>);

/// Records every POST and answers `status`.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    status: Arc<Mutex<u16>>,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Receiver {
    async fn start() -> Self {
        let status = Arc::new(Mutex::new(200u16));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (s, g) = (status.clone(), got.clone());
        let route = warp::post()
            .and(warp::header::optional::<String>("x-vigil-signature"))
            .and(warp::body::bytes())
            .map(move |sig: Option<String>, body: bytes::Bytes| {
                let answered = *s.lock().unwrap();
                g.lock().unwrap().push((answered, sig, body.to_vec()));
                warp::http::StatusCode::from_u16(answered).unwrap()
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Self { addr, status, got }
    }

    fn delivered(&self) -> Vec<(Option<String>, Value)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _, _)| *s < 300)
            .map(|(_, sig, body)| (sig.clone(), serde_json::from_slice(body).unwrap()))
            .collect()
    }
}

fn signed(secret: &str, body: &Value, header: Option<&str>) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&serde_json::to_vec(body).unwrap());
    header
        == Some(&format!(
            "sha256={}",
            hex::encode(mac.finalize().into_bytes())
        ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callback_gets_one_signed_result_also_after_its_receiver_was_down() {
    let receiver = Receiver::start().await;
    *receiver.status.lock().unwrap() = 503;
    let c = Cluster::new(COMMANDS).await;
    let allow = receiver.addr.to_string();
    let secret = "callback-secret-1";
    let r = c
        .replica(
            "callbacks",
            &[
                ("VIGIL_CALLBACK_ALLOW", &allow),
                ("VIGIL_CALLBACK_SECRET", secret),
            ],
        )
        .await;
    let url = format!("http://{}/done", receiver.addr);
    let (s, _, body) = r
        .invoke(
            "/api/jobs/echo/runs",
            &json!({ "x": 1 }),
            &[("Callback-Url", &url)],
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    let run = body["run_id"].as_str().unwrap().to_owned();
    // Down (503) for a while: attempts are made and recorded, none delivered.
    eventually(Duration::from_secs(20), "two failed attempts", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM callback_attempts WHERE outcome = 'failed' AND http_status = 503",
        )
        .fetch_one(c.db.pool())
        .await
        .unwrap();
        (n >= 2).then_some(())
    })
    .await;
    assert!(receiver.delivered().is_empty());
    *receiver.status.lock().unwrap() = 200;
    let got = eventually(
        Duration::from_secs(30),
        "the callback delivered",
        || async {
            let d = receiver.delivered();
            (!d.is_empty()).then_some(d)
        },
    )
    .await;
    // Exactly one, and no more afterwards.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(receiver.delivered().len(), 1, "{:?}", receiver.delivered());
    let (sig, body) = &got[0];
    assert!(
        signed(secret, body, sig.as_deref()),
        "signature {sig:?} of {body}"
    );
    assert_eq!(body["run_id"], run.as_str());
    assert_eq!(body["event"], "run.finished");
    assert_eq!(body["job"], "echo");
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["output"], json!({ "x": 1 }));
    let (attempts, delivered_at): (i32, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT attempts, delivered_at FROM callback_deliveries WHERE run_id = $1::uuid",
    )
    .bind(&run)
    .fetch_one(c.db.pool())
    .await
    .unwrap();
    assert!(attempts >= 3, "attempts {attempts}");
    assert!(delivered_at.is_some());
    let pauses: Vec<f64> = sqlx::query_scalar::<_, Option<f64>>(
        "SELECT extract(epoch FROM at - lag(at) OVER (ORDER BY attempt))::float8 FROM callback_attempts
         WHERE run_id = $1::uuid ORDER BY attempt",
    )
    .bind(&run)
    .fetch_all(c.db.pool())
    .await
    .unwrap()
    .into_iter()
    .flatten()
    .collect();
    assert!(
        pauses.windows(2).all(|w| w[1] >= w[0] * 1.5),
        "pauses grow: {pauses:?}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn callbacks_to_hosts_not_allowed_are_refused_and_start_nothing() {
    let receiver = Receiver::start().await;
    let c = Cluster::new(COMMANDS).await;
    // Callbacks off: the message says how to turn them on.
    let off = c.replica("cb-off", &[]).await;
    let url = format!("http://{}/done", receiver.addr);
    let (s, _, body) = off
        .invoke(
            "/api/jobs/echo/runs",
            &Value::Null,
            &[("Callback-Url", &url)],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "callback_refused");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("VIGIL_CALLBACK_ALLOW")
    );
    off.stop().await;
    let on = c
        .replica(
            "cb-on",
            &[("VIGIL_CALLBACK_ALLOW", "hooks.example.com,*.internal")],
        )
        .await;
    for url in [
        url.as_str(),
        "http://169.254.169.254/latest/meta-data",
        "http://hooks.example.com.evil.net/",
    ] {
        let (s, _, body) = on
            .invoke(
                "/api/jobs/echo/runs",
                &Value::Null,
                &[("Callback-Url", url)],
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{url}: {body}");
        assert_eq!(body["error"], "callback_refused", "{body}");
    }
    for url in ["file:///etc/passwd", "not a url"] {
        let (s, _, body) = on
            .invoke(
                "/api/jobs/echo/runs",
                &Value::Null,
                &[("Callback-Url", url)],
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {body}");
    }
    assert!(run_rows(&c.db, "echo").await.is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(receiver.got.lock().unwrap().is_empty());
    on.stop().await;
}

const TICKS: &str = r#"
[[jobs]]
name = "tick"
kind = "command"
every = "1s"
scope = "host"
[jobs.settings]
command = ["true"]
"#;

/// Firings of `tick` on `host` scheduled after `after`: (ran, skipped as paused).
async fn ticks(db: &TestDb, host: &str, after: chrono::DateTime<chrono::Utc>) -> (usize, usize) {
    let rows: Vec<_> = run_rows(db, "tick")
        .await
        .into_iter()
        .filter(|r| r.host == host && r.scheduled_at > after)
        .collect();
    let paused = rows
        .iter()
        .filter(|r| {
            r.status == vigil::store::RunStatus::Skipped
                && r.error.as_deref().is_some_and(|e| e.starts_with("paused"))
        })
        .count();
    (rows.len() - paused, paused)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pause_holds_on_every_replica_and_across_a_restart_until_resumed() {
    let c = Cluster::new(TICKS).await;
    let a = c.replica("pause-a", &[]).await;
    let b = c.replica("pause-b", &[]).await;
    let (s, _, body) = a.invoke("/api/jobs/tick/pause", &Value::Null, &[]).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["paused"], true);
    // Replica b obeys within its next look.
    tokio::time::sleep(vigil::app::PAUSES_EVERY + Duration::from_millis(1500)).await;
    let from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for host in ["pause-a", "pause-b"] {
        let (ran, paused) = ticks(&c.db, host, from).await;
        assert_eq!(ran, 0, "{host} ran while paused");
        assert!(paused >= 3, "{host}: {paused} paused firings");
    }
    let (_, job) = b.get("/api/jobs/tick").await;
    assert_eq!(job["paused"], true, "{job}");
    assert_eq!(job["paused_until"], Value::Null);
    // A manual run is refused too, unless forced.
    let (s, _, body) = b.invoke("/api/jobs/tick/runs", &Value::Null, &[]).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "job_paused");
    let (s, _, _) = b
        .invoke("/api/jobs/tick/runs?force=true", &Value::Null, &[])
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);

    // Restarted, b is still paused from its first firing on.
    b.stop().await;
    let b = c.replica("pause-b", &[]).await;
    let from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ran, paused) = ticks(&c.db, "pause-b", from).await;
    assert_eq!(ran, 0, "ran after a restart while paused");
    assert!(paused >= 2);

    // Resumed through b: both run again.
    let (s, _, body) = b.invoke("/api/jobs/tick/resume", &Value::Null, &[]).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["was_paused"], true);
    tokio::time::sleep(vigil::app::PAUSES_EVERY + Duration::from_millis(1500)).await;
    let from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for host in ["pause-a", "pause-b"] {
        let (ran, paused) = ticks(&c.db, host, from).await;
        assert!(ran >= 2, "{host} did not resume");
        assert_eq!(paused, 0);
    }

    // A pause with `until` ends by itself.
    let (s, _, body) = a
        .invoke("/api/jobs/tick/pause?until=3s", &Value::Null, &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body["paused_until"].is_string());
    let (s, _, body) = a
        .invoke("/api/jobs/tick/pause?until=yesterday", &Value::Null, &[])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    // A time already past is a pause that has ended: nothing is paused by it.
    let (s, _, body) = a
        .invoke(
            "/api/jobs/tick/pause?until=2020-01-01T00:00:00Z",
            &Value::Null,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["paused"], false, "{body}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ran, paused) = ticks(&c.db, "pause-a", from).await;
    assert!(ran >= 1 && paused == 0, "ran {ran}, paused {paused}");
    let (s, _, _) = a.invoke("/api/jobs/nope/pause", &Value::Null, &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jitter_delays_each_firing_by_a_stable_amount_below_its_bound() {
    let jobs = "[[jobs]]\nname = \"spread\"\nkind = \"command\"\nevery = \"2s\"\njitter = \"1500ms\"\n\
                scope = \"host\"\n[jobs.settings]\ncommand = [\"true\"]\n";
    let c = Cluster::new(jobs).await;
    let spec = config::load(
        &c.jobs,
        &Environment::from_pairs([("VIGIL_HOST", "x")]),
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap()
    .file
    .jobs
    .remove(0);
    let mut offsets = Vec::new();
    for host in ["jitter-a", "jitter-b", "jitter-a"] {
        let began = chrono::Utc::now();
        let r = c.replica(host, &[]).await;
        let expected = spec.jitter_on(host);
        assert!(expected < Duration::from_millis(1500));
        // The next fire time shown is the jittered one.
        let (_, job) = r.get("/api/jobs/spread").await;
        let next: chrono::DateTime<chrono::Utc> =
            job["next_fire"].as_str().unwrap().parse().unwrap();
        let into_period = next.timestamp_millis().rem_euclid(2000);
        assert!(
            (into_period - expected.as_millis() as i64).abs() <= 1,
            "{host}: next_fire {next} vs jitter {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(7500)).await;
        r.stop().await;
        // A firing due within the timer's lead of start-up may start late whatever the
        // jitter: judge the ones after it.
        let rows: Vec<_> = run_rows(&c.db, "spread")
            .await
            .into_iter()
            .filter(|r| r.host == host && r.scheduled_at > began + chrono::Duration::seconds(2))
            .collect();
        assert!(rows.len() >= 2, "{host}: {rows:?}");
        for row in &rows {
            // Firings keep their instant (a multiple of 2 s); the start comes later.
            assert_eq!(row.scheduled_at.timestamp_millis() % 2000, 0, "{row:?}");
            let delay = (row.started_at - row.scheduled_at).num_milliseconds();
            assert!(
                (delay - expected.as_millis() as i64).abs() < 150,
                "{host}: started {delay} ms after its firing, jitter {expected:?}"
            );
        }
        offsets.push((host, expected));
    }
    // Stable across a restart, different between hosts.
    assert_eq!(offsets[0].1, offsets[2].1);
    assert_ne!(offsets[0].1, offsets[1].1);
}
