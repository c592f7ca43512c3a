//! The HTTP gateway over real TCP (port 0) against real PostgreSQL: every endpoint,
//! status code and error case.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use reqwest::StatusCode;
use serde_json::{Value, json};
use vigil::app::App;
use vigil::config::{self, Config, Environment, Settings};
use vigil::gateway::{self, Gateway, ROUTES};

const JOBS: &str = r#"
[[jobs]]
name = "quick"
kind = "command"
every = "1h"
[jobs.settings]
command = ["true"]

[[jobs]]
name = "slow"
kind = "command"
every = "1h"
[jobs.settings]
command = ["sleep", "3"]

[[jobs]]
name = "broken"
kind = "command"
cron = "0 0 4 * * *"
timezone = "Europe/Berlin"
[jobs.settings]
command = ["sh", "-c", "echo nope >&2; exit 2"]

[[jobs]]
name = "off"
kind = "command"
every = "1h"
enabled = false
[jobs.settings]
command = ["true"]

[[jobs]]
name = "reading-sync"
kind = "command"
every = "1h"
[jobs.settings]
command = ["sh", "-c", "sleep 0.2"]
"#;

struct TestApp {
    db: TestDb,
    app: Option<App>,
    base: String,
    http: reqwest::Client,
}

impl TestApp {
    async fn spawn(env: &[(&str, &str)]) -> Self {
        Self::spawn_with(JOBS, env).await
    }

    async fn spawn_with(jobs: &str, env: &[(&str, &str)]) -> Self {
        let db = TestDb::new().await;
        let file = config::parse_jobs(
            Path::new("jobs.toml"),
            jobs,
            &vigil::jobs::Registry::builtin(),
        )
        .unwrap();
        // The file is not on disk: nothing to watch.
        let mut vars: Vec<(&str, &str)> = vec![
            ("PORT", "0"),
            ("VIGIL_HOST", "gw-test"),
            ("VIGIL_WATCH_CONFIG", "false"),
        ];
        vars.extend_from_slice(env);
        let env = Environment::from_pairs(vars);
        let settings = Settings::load(&file.runner, &env).unwrap();
        let config = Config {
            file,
            settings,
            env,
        };
        let app = App::start(&config, &db.store).await.unwrap();
        let base = format!("http://{}", app.address());
        Self {
            db,
            app: Some(app),
            base,
            http: common::http(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str) -> reqwest::Response {
        self.http.post(self.url(path)).send().await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

fn assert_error(body: &Value, code: &str, mentions: &str) {
    assert_eq!(body["error"], code, "{body}");
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {body}"));
    assert!(
        message.contains(mentions),
        "{message:?} should mention {mentions:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn root_health_and_readiness() {
    let t = TestApp::spawn(&[]).await;
    let (s, body) = t.get("/").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["message"], "Welcome to the Observability Platform");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));

    let (s, body) = t.get("/healthz").await;
    assert_eq!((s, body), (StatusCode::OK, json!({"status": "ok"})));

    let (s, body) = t.get("/readyz").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["checks"], json!({"postgres": "ok", "scheduler": "ok"}));

    // HEAD works like GET.
    let r = t.http.head(t.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_names_what_is_wrong() {
    let db = TestDb::new().await;
    let ledger = vigil::scheduler::Ledger::start(db.store.clone(), 10, Default::default());
    let scheduler = vigil::scheduler::Scheduler::new(ledger, "h").await.unwrap();
    // A store pointing at nothing, and a scheduler never started.
    let nowhere = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let state = gateway::State {
        scheduler,
        store: vigil::store::Store::from_pool(nowhere),
        metrics: Default::default(),
        guard: gateway::Guard::open(),
        reading_sync_job: "reading-sync".into(),
        reload: None,
        alerts: None,
        invoke: Default::default(),
        views: Default::default(),
    };
    let gw = Gateway::start(state, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let r = common::http()
        .get(format!("http://{}/readyz", gw.local_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "not_ready");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("PostgreSQL") && message.contains("scheduler not running"),
        "{message}"
    );
    assert_eq!(body["checks"]["scheduler"], "scheduler not running");
    // Reads that need the database say so with 503, not 500.
    let r = common::http()
        .get(format!("http://{}/api/reading", gw.local_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_are_404_and_wrong_methods_405_with_allow() {
    let t = TestApp::spawn(&[]).await;
    let (s, body) = t.get("/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", "/nope");
    let (s, _) = t.get("/api/jobs/quick/runs/extra").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let r = t.http.delete(t.url("/api/jobs")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET");
    assert_error(&r.json().await.unwrap(), "method_not_allowed", "DELETE");
    let r = t
        .http
        .put(t.url("/api/jobs/quick/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET, POST");
    let r = t.post("/").await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_list_and_detail_show_schedule_next_fire_and_last_run() {
    let t = TestApp::spawn(&[]).await;
    let (s, body) = t.get("/api/jobs").await;
    assert_eq!(s, StatusCode::OK);
    let jobs = body["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 5);
    let broken = jobs.iter().find(|j| j["name"] == "broken").unwrap();
    assert_eq!(broken["kind"], "command");
    assert_eq!(broken["schedule"], "cron \"0 0 4 * * *\" Europe/Berlin");
    assert_eq!(broken["enabled"], true);
    assert!(broken["next_fire"].is_string());
    assert_eq!(broken["last_run"], Value::Null);
    let off = jobs.iter().find(|j| j["name"] == "off").unwrap();
    assert_eq!(off["enabled"], false);

    let r = t.post("/api/jobs/quick/runs?wait=true").await;
    assert_eq!(r.status(), StatusCode::OK);
    let (s, quick) = t.get("/api/jobs/quick").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(quick["last_run"]["status"], "succeeded");
    assert_eq!(quick["last_run"]["trigger"], "manual");

    let (s, body) = t.get("/api/jobs/ghost").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", "ghost");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn triggering_a_run_answers_202_with_location_or_200_when_waiting() {
    let t = TestApp::spawn(&[]).await;
    let r = t.post("/api/jobs/quick/runs").await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "running");
    assert_eq!(
        location,
        format!("/api/runs/{}", body["run_id"].as_str().unwrap())
    );
    let run = common::eventually(Duration::from_secs(10), "the run to finish", || async {
        let (s, run) = t.get(&location).await;
        (s == StatusCode::OK && run["status"] == "succeeded").then_some(run)
    })
    .await;
    assert_eq!(run["job"], "quick");
    assert_eq!(run["host"], "gw-test");

    let r = t.post("/api/jobs/broken/runs?wait=true").await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "failed");
    assert!(body["error"].as_str().unwrap().contains("nope"), "{body}");
    assert_eq!(body["attempts"], 1);

    // Waiting less than the run takes: 202 with where to poll.
    let r = t.post("/api/jobs/slow/runs?wait=true&timeout=0").await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let running: Value = r.json().await.unwrap();
    // While it runs, the overlap policy refuses another: 409 naming the running run.
    let r = t.post("/api/jobs/slow/runs").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.unwrap();
    assert_error(&body, "run_in_progress", "still going");
    assert_eq!(body["running_run_id"], running["run_id"]);

    let r = t.post("/api/jobs/ghost/runs").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = t.post("/api/jobs/off/runs").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_error(&r.json().await.unwrap(), "job_disabled", "force=true");
    let r = t.post("/api/jobs/off/runs?force=true&wait=true").await;
    assert_eq!(r.status(), StatusCode::OK);

    for bad in [
        "wait=maybe",
        "timeout=soon&wait=true",
        "timeout=601&wait=true",
        "colour=red",
    ] {
        let r = t.post(&format!("/api/jobs/quick/runs?{bad}")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: Value = r.json().await.unwrap();
        let param = bad.split('=').next().unwrap();
        let param = if bad.starts_with("timeout") {
            "timeout"
        } else {
            param
        };
        assert_error(&body, "bad_request", &format!("`{param}`"));
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_history_pages_and_filters_and_single_runs_are_found() {
    let t = TestApp::spawn(&[]).await;
    for _ in 0..3 {
        assert_eq!(
            t.post("/api/jobs/quick/runs?wait=true").await.status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        t.post("/api/jobs/broken/runs?wait=true").await.status(),
        StatusCode::OK
    );

    let (s, page1) = t.get("/api/jobs/quick/runs?limit=2").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page1["runs"].as_array().unwrap().len(), 2);
    let cursor = page1["next_cursor"].as_str().unwrap().to_owned();
    let (_, page2) = t
        .get(&format!("/api/jobs/quick/runs?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(page2["runs"].as_array().unwrap().len(), 1);
    assert_eq!(page2["next_cursor"], Value::Null);
    let ids: Vec<&Value> = page1["runs"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["runs"].as_array().unwrap())
        .map(|r| &r["id"])
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] != w[1]));

    let (_, failed) = t.get("/api/jobs/broken/runs?status=failed").await;
    assert_eq!(failed["runs"].as_array().unwrap().len(), 1);
    let (_, none) = t.get("/api/jobs/broken/runs?status=succeeded").await;
    assert_eq!(none["runs"].as_array().unwrap().len(), 0);

    let id = failed["runs"][0]["id"].as_str().unwrap();
    let (s, run) = t.get(&format!("/api/runs/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(run["status"], "failed");
    assert!(run["duration_ms"].is_i64());

    let (s, body) = t.get("/api/jobs/broken/runs?status=done").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&body, "bad_request", "`status`");
    let (s, body) = t.get("/api/jobs/broken/runs?limit=501").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&body, "bad_request", "`limit`");
    let (s, body) = t.get("/api/jobs/broken/runs?cursor=42").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&body, "bad_request", "`cursor`");
    let (s, _) = t.get("/api/jobs/ghost/runs").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, body) = t.get("/api/runs/not-a-uuid").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&body, "bad_request", "UUID");
    let (s, body) = t.get(&format!("/api/runs/{}", uuid::Uuid::now_v7())).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", "no run");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readings_come_newest_first_in_keyset_pages_filtered_by_time() {
    let t = TestApp::spawn(&[]).await;
    sqlx::query(
        "INSERT INTO reading_analytics (source_id, payload, occurred_at, synced_at)
         SELECT 'doc-' || g, jsonb_build_object('n', g), now() - g * interval '1 hour',
                timestamptz '2026-01-01T00:00:00Z' + g * interval '1 minute'
         FROM generate_series(1, 5) g",
    )
    .execute(t.db.pool())
    .await
    .unwrap();
    let (s, body) = t.get("/api/reading").await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = body["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["doc-5", "doc-4", "doc-3", "doc-2", "doc-1"]);
    assert_eq!(body["readings"][0]["payload"], json!({"n": 5}));
    assert_eq!(body["next_cursor"], Value::Null);

    let (_, p1) = t.get("/api/reading?limit=2").await;
    let c = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = t.get(&format!("/api/reading?limit=2&cursor={c}")).await;
    assert_eq!(p2["readings"][0]["source_id"], "doc-3");

    let (_, window) = t
        .get("/api/reading?from=2026-01-01T00:02:00Z&to=2026-01-01T00:04:00Z")
        .await;
    let names: Vec<&str> = window["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["doc-3", "doc-2"]);

    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("cursor=-1", "cursor"),
        ("from=yesterday", "from"),
        ("to=2026-13-01T00:00:00Z", "to"),
        ("sort=asc", "sort"),
    ] {
        let (s, body) = t.get(&format!("/api/reading?{query}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}");
        assert_error(&body, "bad_request", &format!("`{param}`"));
    }
    let (s, body) = t
        .get("/api/reading?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z")
        .await;
    assert_eq!(
        s,
        StatusCode::OK,
        "an inverted window is empty, not an error"
    );
    assert_eq!(body["readings"], json!([]));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_reading_runs_the_reading_sync_job_and_waits_for_it() {
    let t = TestApp::spawn(&[]).await;
    let (s, body) = t.get("/api/sync/reading").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["job"], "reading-sync");
    assert_eq!(body["status"], "succeeded");
    assert!(body["duration_ms"].as_i64().unwrap() >= 200);
    assert!(body["run_id"].is_string());

    let r = t.post("/api/sync/reading?wait=0").await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/api/runs/")
    );
    t.stop().await;

    let t = TestApp::spawn_with(
        "[[jobs]]\nname = \"other\"\nkind = \"command\"\nevery = \"1h\"\n[jobs.settings]\ncommand = [\"true\"]\n",
        &[],
    )
    .await;
    let (s, body) = t.get("/api/sync/reading").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", "reading-sync");
    t.stop().await;
}

/// The status of `GET path` with `authorization` (or none).
async fn status_with(t: &TestApp, path: &str, authorization: Option<&str>) -> StatusCode {
    let mut r = t.http.get(t.url(path));
    if let Some(a) = authorization {
        r = r.header("authorization", a);
    }
    r.send().await.unwrap().status()
}

// Issue 14 changed what a token closes: everything but `/`, `/healthz` and
// `/readyz` (reads and the API description were open before).
#[tokio::test(flavor = "multi_thread")]
async fn a_token_closes_every_route_but_the_welcome_and_the_probes() {
    let t = TestApp::spawn(&[("VIGIL_API_TOKEN", "s3cret-token")]).await;
    let r = t.post("/api/jobs/quick/runs").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_error(&r.json().await.unwrap(), "unauthorized", "Bearer");
    for path in [
        "/api/jobs",
        "/api/jobs/quick/runs",
        "/api/reading",
        "/metrics",
        "/api/openapi.json",
        "/api/sync/reading",
    ] {
        assert_eq!(
            status_with(&t, path, None).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            status_with(&t, path, Some("Bearer wrong")).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            status_with(&t, path, Some("Basic s3cret-token")).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    for path in ["/", "/healthz", "/readyz"] {
        assert_eq!(status_with(&t, path, None).await, StatusCode::OK, "{path}");
    }
    // The scheme's name in any case, as RFC 9110 says.
    for auth in [
        "Bearer s3cret-token",
        "bearer s3cret-token",
        "BEARER  s3cret-token",
    ] {
        assert_eq!(
            status_with(&t, "/api/jobs", Some(auth)).await,
            StatusCode::OK,
            "{auth}"
        );
    }
    let r = t
        .http
        .post(t.url("/api/jobs/quick/runs"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    t.stop().await;

    // Opened on purpose: reads, or only the metrics.
    let t = TestApp::spawn(&[
        ("VIGIL_API_TOKEN", "s3cret-token"),
        ("VIGIL_API_READS_OPEN", "true"),
    ])
    .await;
    assert_eq!(t.get("/api/jobs").await.0, StatusCode::OK);
    assert_eq!(t.get("/api/openapi.json").await.0, StatusCode::OK);
    assert_eq!(t.get("/metrics").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        t.post("/api/jobs/quick/runs").await.status(),
        StatusCode::UNAUTHORIZED
    );
    t.stop().await;
    let t = TestApp::spawn(&[
        ("VIGIL_API_TOKEN", "s3cret-token"),
        ("VIGIL_METRICS_PUBLIC", "true"),
    ])
    .await;
    assert_eq!(t.get("/metrics").await.0, StatusCode::OK);
    assert_eq!(t.get("/api/jobs").await.0, StatusCode::UNAUTHORIZED);
    t.stop().await;
}

/// Sends `request` (raw HTTP/1.1) and returns the status line.
async fn raw_status(addr: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_origins_cannot_start_work_and_foreign_hosts_are_refused_on_loopback() {
    let t = TestApp::spawn(&[("VIGIL_ALLOWED_ORIGINS", "https://grafana.example")]).await;
    let own = t.base.clone();
    // Waiting for each run's end, so the next is not refused for overlap.
    let post = |origin: &'static str| {
        let req = t.http.post(t.url("/api/jobs/quick/runs?wait=true"));
        async move { req.header("origin", origin).send().await.unwrap() }
    };
    // Any page a user opens could send this: refused, and nothing runs.
    let r = post("http://evil.example").await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_error(
        &r.json().await.unwrap(),
        "forbidden",
        "VIGIL_ALLOWED_ORIGINS",
    );
    assert_eq!(post("null").await.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        post("https://grafana.example").await.status(),
        StatusCode::OK
    );
    let r = t
        .http
        .post(t.url("/api/jobs/quick/runs?wait=true"))
        .header("origin", own.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the gateway's own pages may");
    let r = t
        .http
        .get(t.url("/api/sync/reading?wait=0"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "a GET that starts a run counts as work"
    );
    // Reads from elsewhere change nothing: allowed (the browser keeps them from the page).
    let r = t
        .http
        .get(t.url("/api/jobs"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The refused requests started nothing: two runs of quick, none of reading-sync.
    t.app
        .as_ref()
        .unwrap()
        .scheduler
        .flush_ledger(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(t.db.runs("quick").await.len(), 2);
    assert!(t.db.runs("reading-sync").await.is_empty());

    // DNS rebinding: a page's own name pointed at 127.0.0.1.
    let addr = own.trim_start_matches("http://").to_owned();
    let status = raw_status(
        &addr,
        "GET /api/jobs HTTP/1.1\r\nHost: evil.example:8085\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status.contains(" 403 "), "{status}");
    for host in ["localhost:8085", "127.0.0.1", "[::1]:8085"] {
        let status = raw_status(
            &addr,
            &format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(status.contains(" 200 "), "{host}: {status}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_waiting_for_runs_are_capped_with_retry_after() {
    let jobs = "[[jobs]]\nname = \"nap\"\nkind = \"command\"\nevery = \"1h\"\noverlap = \"allow\"\n\
                [jobs.settings]\ncommand = [\"sleep\", \"2\"]\n";
    let t = TestApp::spawn_with(jobs, &[("VIGIL_MAX_WAITING", "2")]).await;
    let wait = || {
        let req = t.http.post(t.url("/api/jobs/nap/runs?wait=true"));
        async move { req.send().await.unwrap() }
    };
    let (a, b) = (tokio::spawn(wait()), tokio::spawn(wait()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = wait().await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "2");
    // Without waiting, triggers still go through.
    assert_eq!(
        t.post("/api/jobs/nap/runs").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(a.await.unwrap().status(), StatusCode::OK);
    assert_eq!(b.await.unwrap().status(), StatusCode::OK);
    // Places free again once those have their answer.
    assert_eq!(wait().await.status(), StatusCode::OK);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn open_connections_are_capped_and_the_next_waits_for_one_to_close() {
    let t = TestApp::spawn(&[("VIGIL_MAX_CONNECTIONS", "2")]).await;
    let addr = t.base.trim_start_matches("http://").to_owned();
    let idle_a = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let idle_b = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = tokio::spawn({
        let addr = addr.clone();
        async move {
            raw_status(
                &addr,
                "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third connection is not served while two are open"
    );
    drop(idle_a);
    let status = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a place is free")
        .unwrap();
    assert!(status.contains(" 200 "), "{status}");
    drop(idle_b);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_requests_with_made_up_methods_and_paths_add_few_metric_series() {
    use proptest::strategy::{Strategy as _, ValueTree as _};
    let t = TestApp::spawn(&[]).await;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let methods = proptest::sample::select(vec![
        "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW", "X-CUSTOM", "PROPFIND",
    ]);
    let paths = "/[a-z/{}%0-9]{0,24}";
    for _ in 0..1000 {
        let m = methods.new_tree(&mut runner).unwrap().current();
        let p = paths.new_tree(&mut runner).unwrap().current();
        let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
        let _ = t.http.request(method, t.url(&p)).send().await;
    }
    let text = t
        .http
        .get(t.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("vigil_http_requests_total{"))
        .collect();
    // Fixed label sets: ten methods at most, the route templates and "unmatched",
    // the handful of statuses vigil answers with.
    assert!(
        series.len() <= 60,
        "{} series:\n{}",
        series.len(),
        series.join("\n")
    );
    assert!(
        series.iter().any(|s| s.contains("method=\"other\"")),
        "made-up methods become other"
    );
    assert!(!text.contains("BREW") && !text.contains("PROPFIND"));
    let durations = text
        .lines()
        .filter(|l| l.starts_with("vigil_http_request_duration_seconds_count{"))
        .count();
    assert!(durations <= 20, "{durations} duration series");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_expose_runs_and_http_requests() {
    let t = TestApp::spawn(&[]).await;
    assert_eq!(
        t.post("/api/jobs/quick/runs?wait=true").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        t.post("/api/jobs/broken/runs?wait=true").await.status(),
        StatusCode::OK
    );
    t.get("/nope").await;
    let r = t.http.get(t.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = r.text().await.unwrap();
    for needle in [
        "vigil_runs_total{job=\"quick\",status=\"succeeded\"} 1",
        "vigil_runs_total{job=\"broken\",status=\"failed\"} 1",
        "vigil_run_duration_seconds_count{job=\"quick\"} 1",
        "vigil_http_requests_total{method=\"POST\",route=\"/api/jobs/{name}/runs\",status=\"200\"} 2",
        "vigil_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1",
        "vigil_http_request_duration_seconds_bucket",
        "vigil_ledger_queued_records",
        "vigil_loki_dropped_total",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_describes_exactly_the_routes_served() {
    let t = TestApp::spawn(&[]).await;
    let (s, doc) = t.get("/api/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let mut described: Vec<(String, String)> = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            described.push((method.to_uppercase(), path.clone()));
        }
    }
    let mut served: Vec<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.template.to_owned()))
        .collect();
    described.sort();
    served.sort();
    assert_eq!(described, served);
    // Every query parameter a route takes is described, and no other.
    for route in &ROUTES {
        let op = &doc["paths"][route.template][route.method.as_str().to_lowercase()];
        let mut documented: Vec<&str> = op["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["in"] == "query")
                    .map(|p| p["name"].as_str().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        let mut taken = route.params.to_vec();
        documented.sort();
        taken.sort();
        assert_eq!(documented, taken, "{} {}", route.method, route.template);
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_is_a_500_and_the_server_keeps_serving() {
    let db = TestDb::new().await;
    let ledger = vigil::scheduler::Ledger::start(db.store.clone(), 10, Default::default());
    let scheduler = vigil::scheduler::Scheduler::new(ledger, "h").await.unwrap();
    let state = gateway::State {
        scheduler,
        store: db.store.clone(),
        metrics: Default::default(),
        guard: gateway::Guard::open(),
        reading_sync_job: "reading-sync".into(),
        reload: None,
        alerts: None,
        invoke: Default::default(),
        views: Default::default(),
    };
    let real = gateway::api_handler();
    let handler: gateway::Handler = Arc::new(move |state, route, req| {
        if route.template == "/api/jobs" {
            Box::pin(async { panic!("handler bug") })
        } else {
            real(state, route, req)
        }
    });
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let gw = Gateway::start_with(state, addr, handler).await.unwrap();
    let base = format!("http://{}", gw.local_addr);
    for _ in 0..3 {
        let r = common::http()
            .get(format!("{base}/api/jobs"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "internal");
        assert!(
            !body["message"].as_str().unwrap().contains("handler bug"),
            "no internals leak"
        );
        let r = common::http()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn triggers_during_shutdown_are_503() {
    let t = TestApp::spawn(&[]).await;
    let scheduler = t.app.as_ref().unwrap().scheduler.clone();
    let stopping = tokio::spawn(async move { scheduler.shutdown(Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = t.post("/api/jobs/quick/runs").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_error(&r.json().await.unwrap(), "unavailable", "shutting down");
    let (s, body) = t.get("/readyz").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["scheduler"], "scheduler not running");
    stopping.await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_reading_loads_mongodb_documents_then_api_reading_serves_them() {
    let mongo = common::MongoServer::start().await;
    let client = mongo.client().await;
    let docs: Vec<mongodb::bson::Document> = (0..50)
        .map(|i| mongodb::bson::doc! { "status": "ingested", "sensor": "probe-1", "value": i })
        .collect();
    client
        .database("observability")
        .collection::<mongodb::bson::Document>("readings")
        .insert_many(docs)
        .await
        .unwrap();
    let jobs = "[[jobs]]\nname = \"reading-sync\"\nkind = \"mongo_sync\"\nevery = \"1h\"\n\
                [jobs.settings]\ndatabase = \"observability\"\ncollection = \"readings\"\n";
    let t = TestApp::spawn_with(jobs, &[("MONGO_URI", &mongo.uri)]).await;
    let r = t.post("/api/sync/reading").await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_eq!(body["items"], 50);
    let (s, page) = t.get("/api/reading?limit=1000").await;
    assert_eq!(s, StatusCode::OK);
    let readings = page["readings"].as_array().unwrap();
    assert_eq!(readings.len(), 50);
    assert_eq!(readings[0]["payload"]["sensor"], "probe-1");
    assert!(readings[0]["payload"].get("status").is_none());
    t.stop().await;
}
