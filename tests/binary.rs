//! The real `vigil` binary against real PostgreSQL: run, signals, trigger, restart.

mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::Duration;

use common::{Running, TestDb, eventually, vigil, write};
use nix::sys::signal::Signal;
use vigil::store::RunStatus;
use vigil::store::runs::RunQuery;

async fn statuses(db: &TestDb, job: &str) -> Vec<RunStatus> {
    db.store
        .runs(&RunQuery {
            job: Some(job),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.status)
        .collect()
}

fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // The embedded server may run as another user, who must reach the directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Collects a child's stdout lines as they come.
fn collect_lines(out: std::process::ChildStdout) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn run_fires_jobs_serves_http_logs_json_and_exits_zero_on_sigterm() {
    let db = TestDb::empty().await;
    let dir = tempdir();
    write(
        dir.path(),
        "jobs.toml",
        r#"
[[jobs]]
name = "hello"
kind = "command"
every = "1s"
[jobs.settings]
command = ["sh", "-c", "echo hello from the job"]
"#,
    );
    let mut child = Running(
        vigil(
            dir.path(),
            &["run"],
            &[
                ("DATABASE_URL", &db.url),
                ("VIGIL_HOST", "t1"),
                ("PORT", "0"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let lines = collect_lines(child.0.stdout.take().unwrap());
    // PORT=0: the log says where the gateway listens.
    let address = eventually(Duration::from_secs(20), "the gateway address", || async {
        lines.lock().unwrap().iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "gateway listening")
                .then(|| v["address"].as_str().map(String::from))?
        })
    })
    .await;
    let body: serde_json::Value = common::http()
        .get(format!("http://{address}/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["message"], "Welcome to the Observability Platform");

    // `run` migrated the empty database itself, then fires every second.
    eventually(Duration::from_secs(20), "three successful runs", || async {
        let ok = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM job_runs WHERE job = 'hello' AND status = 'succeeded' AND host = 't1'",
        )
        .fetch_one(db.pool())
        .await
        .ok()?;
        (ok >= 3).then_some(())
    })
    .await;
    child.signal(Signal::SIGTERM);
    let status = child
        .wait_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(200));

    let lines = lines.lock().unwrap().clone();
    assert!(!lines.is_empty());
    let mut saw_job_output = false;
    let mut saw_request = false;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["ts", "level", "target", "message"] {
            assert!(v.get(field).is_some(), "{field} missing: {line}");
        }
        assert!(
            chrono::DateTime::parse_from_rfc3339(v["ts"].as_str().unwrap()).is_ok(),
            "{line}"
        );
        if v["message"] == "hello from the job" {
            saw_job_output = true;
            // The run's span fields, flattened into the line.
            assert_eq!(v["job"], "hello", "{line}");
            assert!(v["run_id"].is_string(), "{line}");
            assert_eq!(v["attempt"], 1, "{line}");
            assert_eq!(v["trigger"], "schedule", "{line}");
            assert_eq!(v["stream"], "stdout", "{line}");
        }
        if v["message"] == "request" && v["path"] == "/" {
            saw_request = true;
            assert_eq!(v["method"], "GET", "{line}");
            assert_eq!(v["status"], 200, "{line}");
            assert!(v["latency_ms"].is_f64(), "{line}");
        }
    }
    assert!(
        saw_job_output,
        "the command's output is logged inside its run"
    );
    assert!(
        saw_request,
        "requests are logged with method, path, status and latency"
    );
    assert!(statuses(&db, "hello").await.iter().all(|s| s.is_final()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_abandons_runs_past_the_grace_period_and_kills_their_processes() {
    let db = TestDb::new().await;
    let dir = tempdir();
    let pid_file = dir.path().join("child.pid");
    write(
        dir.path(),
        "jobs.toml",
        &format!(
            r#"
[runner]
shutdown_grace = "1s"

[[jobs]]
name = "long"
kind = "command"
every = "1s"
[jobs.settings]
command = ["sh", "-c", "echo $$ > {}; exec sleep 60"]
"#,
            pid_file.display()
        ),
    );
    let mut child = Running(
        vigil(
            dir.path(),
            &["run"],
            &[("DATABASE_URL", &db.url), ("PORT", "0")],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    eventually(Duration::from_secs(20), "a running run", || async {
        statuses(&db, "long")
            .await
            .contains(&RunStatus::Running)
            .then_some(())
    })
    .await;
    let sleeper: i32 = eventually(Duration::from_secs(5), "the pid file", || async {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    })
    .await;
    let t = std::time::Instant::now();
    child.signal(Signal::SIGTERM);
    let status = child.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(status.success());
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "bounded by the grace: {:?}",
        t.elapsed()
    );
    let st = statuses(&db, "long").await;
    assert!(st.contains(&RunStatus::Abandoned), "{st:?}");
    assert!(!st.contains(&RunStatus::Running), "{st:?}");
    // The job's process went with its run.
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(sleeper), None).is_ok();
    assert!(!alive, "sleep {sleeper} still running");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_marks_runs_left_running_by_a_killed_vigil_as_abandoned() {
    let db = TestDb::new().await;
    let dir = tempdir();
    write(
        dir.path(),
        "jobs.toml",
        r#"
[[jobs]]
name = "long"
kind = "command"
every = "1s"
[jobs.settings]
command = ["sleep", "60"]
"#,
    );
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("VIGIL_HOST", "box-1"),
        ("PORT", "0"),
    ];
    let mut first = Running(
        vigil(dir.path(), &["run"], &env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually(Duration::from_secs(20), "a running run", || async {
        statuses(&db, "long")
            .await
            .contains(&RunStatus::Running)
            .then_some(())
    })
    .await;
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(5)).expect("killed");
    assert!(statuses(&db, "long").await.contains(&RunStatus::Running));

    let mut second = Running(
        vigil(dir.path(), &["run"], &env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let abandoned = eventually(Duration::from_secs(20), "the orphan abandoned", || async {
        let rows = db
            .store
            .runs(&RunQuery {
                job: Some("long"),
                status: Some(RunStatus::Abandoned),
                limit: 10,
                ..Default::default()
            })
            .await
            .ok()?;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(
        abandoned[0].error.as_deref(),
        Some("vigil stopped before the run finished")
    );
    second.signal(Signal::SIGTERM);
    second.wait_exit(Duration::from_secs(40));
}

#[tokio::test(flavor = "multi_thread")]
async fn trigger_runs_one_job_records_it_and_reports_failure_by_exit_code() {
    let db = TestDb::empty().await;
    let dir = tempdir();
    write(
        dir.path(),
        "jobs.toml",
        r#"
[[jobs]]
name = "good"
kind = "command"
cron = "0 0 0 1 1 *"
[jobs.settings]
command = ["true"]

[[jobs]]
name = "bad"
kind = "command"
cron = "0 0 0 1 1 *"
[jobs.settings]
command = ["sh", "-c", "echo broken pipe >&2; exit 3"]

[[jobs]]
name = "off"
kind = "command"
every = "1h"
enabled = false
[jobs.settings]
command = ["true"]
"#,
    );
    let env = [("DATABASE_URL", db.url.as_str())];
    let out = vigil(dir.path(), &["trigger", "good"], &env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["status"], "succeeded");

    let out = vigil(dir.path(), &["trigger", "bad"], &env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["status"], "failed");
    assert!(
        result["error"].as_str().unwrap().contains("broken pipe"),
        "{result}"
    );

    let out = vigil(dir.path(), &["trigger", "missing"], &env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job named \"missing\""));

    let out = vigil(dir.path(), &["trigger", "off"], &env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("disabled"));
    let out = vigil(dir.path(), &["trigger", "off", "--force"], &env)
        .output()
        .unwrap();
    assert!(out.status.success());

    let rows = sqlx::query_as::<_, (String, String, String)>(
        "SELECT job, trigger, status FROM job_runs ORDER BY started_at",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("good".into(), "manual".into(), "succeeded".into()),
            ("bad".into(), "manual".into(), "failed".into()),
            ("off".into(), "manual".into(), "succeeded".into()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trigger_with_input_passes_it_to_the_job_and_prints_its_output() {
    let db = TestDb::empty().await;
    let dir = tempdir();
    write(
        dir.path(),
        "jobs.toml",
        r#"
[[jobs]]
name = "echo"
kind = "command"
every = "1h"
[jobs.settings]
command = ["cat"]

[[jobs]]
name = "prune"
kind = "retention"
every = "1h"
[jobs.settings]
tables = [{ table = "job_runs", column = "started_at", older_than = "30d" }]
"#,
    );
    let input = write(
        dir.path(),
        "input.json",
        r#"{"greeting": "hello", "n": [1, 2]}"#,
    );
    let env = [("DATABASE_URL", db.url.as_str())];
    let out = vigil(
        dir.path(),
        &["trigger", "echo", "--input", input.to_str().unwrap()],
        &env,
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result["output"],
        serde_json::json!({"greeting": "hello", "n": [1, 2]})
    );

    // `-` reads standard input.
    let mut child = vigil(dir.path(), &["trigger", "echo", "--input", "-"], &env)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"[\"from stdin\"]").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["output"], serde_json::json!(["from stdin"]));

    // Checked like the API checks it, naming the file and the field; nothing runs.
    let bad = write(dir.path(), "bad.json", r#"{"dry_run": "please"}"#);
    let out = vigil(
        dir.path(),
        &["trigger", "prune", "--input", bad.to_str().unwrap()],
        &env,
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.json: input for job \"prune\" (kind retention): `dry_run`:"),
        "{stderr}"
    );
    let broken = write(dir.path(), "broken.json", "{\n  \"a\": }");
    let out = vigil(
        dir.path(),
        &["trigger", "echo", "--input", broken.to_str().unwrap()],
        &env,
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.json:2:8: the input is not JSON"),
        "{stderr}"
    );
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM job_runs")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(runs, 2, "only the two good triggers ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_creates_the_schema_and_is_idempotent() {
    let db = TestDb::empty().await;
    let dir = tempdir();
    write(dir.path(), "jobs.toml", "");
    for _ in 0..2 {
        let out = vigil(dir.path(), &["migrate"], &[("DATABASE_URL", &db.url)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    for t in ["job_runs", "reading_analytics", "system_metrics"] {
        assert!(tables.contains(&t.to_owned()), "{tables:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_database_fails_start_up_with_a_clear_error() {
    let dir = tempdir();
    write(dir.path(), "jobs.toml", "");
    let out = vigil(
        dir.path(),
        &["migrate"],
        &[
            ("DATABASE_URL", "postgres://nobody:secret@127.0.0.1:1/none"),
            ("VIGIL_DB_CONNECT_TIMEOUT", "1s"),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach PostgreSQL at postgres://nobody:***@127.0.0.1:1/none"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "password leaked: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_jobs_file_and_logs_every_problem_of_a_bad_one() {
    let db = TestDb::new().await;
    let dir = tempdir();
    let first = r#"
[[jobs]]
name = "steady"
kind = "command"
every = "1h"
[jobs.settings]
command = ["true"]
"#;
    let path = write(dir.path(), "jobs.toml", first);
    let mut child = Running(
        vigil(
            dir.path(),
            &["run"],
            &[
                ("DATABASE_URL", &db.url),
                ("VIGIL_HOST", "hup"),
                ("PORT", "0"),
                // Only the signal may reload here.
                ("VIGIL_WATCH_CONFIG", "false"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let lines = collect_lines(child.0.stdout.take().unwrap());
    let logged = |message: &'static str| {
        let lines = lines.clone();
        move || {
            let lines = lines.clone();
            async move {
                let found: Vec<serde_json::Value> = lines
                    .lock()
                    .unwrap()
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["message"] == message)
                    .collect();
                (!found.is_empty()).then_some(found)
            }
        }
    };
    eventually(Duration::from_secs(20), "start-up", logged("vigil started")).await;

    std::fs::write(
        &path,
        format!("{first}\n[[jobs]]\nname = \"Bad Name\"\nkind = \"command\"\nevery = \"1s\"\n[jobs.settings]\ncommand = []\n"),
    )
    .unwrap();
    child.signal(Signal::SIGHUP);
    let problems = eventually(
        Duration::from_secs(10),
        "the rejection to be logged",
        logged("jobs file rejected"),
    )
    .await;
    let texts: Vec<&str> = problems
        .iter()
        .filter_map(|v| v["problem"].as_str())
        .collect();
    assert_eq!(texts.len(), 2, "{problems:?}");
    assert!(
        texts[0].starts_with("jobs.toml:10:8: job \"Bad Name\""),
        "{texts:?}"
    );
    assert!(
        texts[1].starts_with("jobs.toml:14:11: job \"Bad Name\" settings"),
        "{texts:?}"
    );
    assert!(problems.iter().all(|v| v["level"] == "error"));

    let second = format!(
        "{first}\n[[jobs]]\nname = \"added\"\nkind = \"command\"\nevery = \"1s\"\n[jobs.settings]\ncommand = [\"true\"]\n"
    );
    std::fs::write(&path, second).unwrap();
    child.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the added job to run", || async {
        let ok = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM job_runs WHERE job = 'added' AND status = 'succeeded'",
        )
        .fetch_one(db.pool())
        .await
        .ok()?;
        (ok >= 1).then_some(())
    })
    .await;
    // SIGHUP reloads; it does not stop vigil.
    assert!(child.0.try_wait().unwrap().is_none(), "still running");
    child.signal(Signal::SIGTERM);
    assert!(child.wait_exit(Duration::from_secs(15)).is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_needs_no_jobs_file() {
    let db = TestDb::empty().await;
    let dir = tempdir();
    let out = vigil(dir.path(), &["migrate"], &[("DATABASE_URL", &db.url)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "migrations applied"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(n >= 5, "{n} migrations");
}

#[tokio::test(flavor = "multi_thread")]
async fn trigger_ends_quietly_and_writes_what_its_job_queued() {
    let db = TestDb::empty().await;
    let dir = tempdir();
    write(
        dir.path(),
        "jobs.toml",
        "[[jobs]]\nname = \"host\"\nkind = \"system_metrics\"\nevery = \"1h\"\n\
         [jobs.settings]\ncollect = [\"cpu\", \"memory\"]\n",
    );
    let out = vigil(
        dir.path(),
        &["trigger", "host"],
        &[("DATABASE_URL", &db.url)],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let loud: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("\"level\":\"error\"") || l.contains("\"level\":\"warn\""))
        .collect();
    assert!(loud.is_empty(), "warnings or errors: {loud:#?}");
    // The sample the run queued is written before the process ends.
    let samples: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(samples, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_public_bind_without_a_token_is_refused_unless_explicitly_allowed() {
    let db = TestDb::new().await;
    let dir = tempdir();
    write(dir.path(), "jobs.toml", "");
    let base = [
        ("DATABASE_URL", db.url.as_str()),
        ("PORT", "0"),
        ("VIGIL_BIND", "0.0.0.0"),
    ];

    // Refused at once, saying how to set a token; `check` says the same.
    for command in ["run", "check"] {
        let out = vigil(dir.path(), &[command], &base).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "environment variable VIGIL_BIND: bind: 0.0.0.0 lets other machines reach the API"
            ) && stderr.contains("VIGIL_API_TOKEN=$(openssl rand -hex 32)")
                && stderr.contains("VIGIL_ALLOW_NO_TOKEN=true"),
            "{command}: {stderr}"
        );
    }

    // With a token it starts.
    let mut env = base.to_vec();
    env.push(("VIGIL_API_TOKEN", "0123456789abcdef"));
    let mut child = Running(
        vigil(dir.path(), &["run"], &env)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = collect_lines(child.0.stdout.take().unwrap());
    eventually(Duration::from_secs(20), "vigil started", || async {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("vigil started"))
            .then_some(())
    })
    .await;
    child.signal(Signal::SIGTERM);
    child.wait_exit(Duration::from_secs(20)).expect("exits");

    // Allowed without one on purpose: it starts, and says so at every start.
    let mut env = base.to_vec();
    env.push(("VIGIL_ALLOW_NO_TOKEN", "true"));
    for _ in 0..2 {
        let mut child = Running(
            vigil(dir.path(), &["run"], &env)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let lines = collect_lines(child.0.stdout.take().unwrap());
        eventually(Duration::from_secs(20), "vigil started", || async {
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("vigil started"))
                .then_some(())
        })
        .await;
        let warned =
            lines.lock().unwrap().iter().any(|l| {
                l.contains("\"level\":\"warn\"") && l.contains("VIGIL_ALLOW_NO_TOKEN=true")
            });
        assert!(warned, "{:#?}", lines.lock().unwrap());
        child.signal(Signal::SIGTERM);
        child.wait_exit(Duration::from_secs(20)).expect("exits");
    }
}

/// build.rs links vigil at a fixed address, so the loader relocates nothing and the
/// binary's read-only data stays clean, pageable file memory (see build.rs for why).
#[test]
fn the_binary_is_linked_position_dependent_so_its_read_only_data_needs_no_relocation() {
    let elf = std::fs::read(common::vigil_bin()).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    // e_type, little-endian: ET_EXEC (2) for a fixed address, ET_DYN (3) for a PIE.
    let e_type = u16::from_le_bytes([elf[16], elf[17]]);
    assert_eq!(
        e_type, 2,
        "vigil is linked as a position-independent executable"
    );
}

/// `vigil run` reads its code from its file a page at a time from the start, and hands
/// back the code of opening the database before it starts the services (see
/// src/app/memory.rs): the kernel shows the advice on the binary's mappings, and the
/// debug log shows the hand-back before "vigil started".
#[tokio::test(flavor = "multi_thread")]
async fn run_reads_its_code_on_demand_and_hands_back_the_database_opening_code_before_the_services_start()
 {
    let db = TestDb::empty().await;
    let dir = tempdir();
    write(
        dir.path(),
        "jobs.toml",
        r#"
[[jobs]]
name = "hello"
kind = "command"
every = "1s"
[jobs.settings]
command = ["true"]
"#,
    );
    let mut child = Running(
        vigil(
            dir.path(),
            &["run"],
            &[
                ("DATABASE_URL", &db.url),
                ("PORT", "0"),
                ("VIGIL_LOG", "vigil=debug"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let lines = collect_lines(child.0.stdout.take().unwrap());
    let messages = || -> Vec<serde_json::Value> {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    eventually(Duration::from_secs(20), "vigil started", || async {
        messages()
            .iter()
            .any(|v| v["message"] == "vigil started")
            .then_some(())
    })
    .await;
    let messages = messages();
    let at = |pred: &dyn Fn(&serde_json::Value) -> bool| messages.iter().position(pred);
    let on_demand = at(&|v| v["message"] == "code read from the binary on demand");
    let released =
        at(&|v| v["message"] == "start-up code released" && v["after"] == "the database opened");
    let started = at(&|v| v["message"] == "vigil started");
    assert!(
        on_demand.is_some() && on_demand < released && released < started,
        "{messages:#?}"
    );

    // MADV_RANDOM shows as `rr` in the VmFlags of each read-only mapping of the binary.
    let exe = std::fs::canonicalize(common::vigil_bin()).unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.0.id())).unwrap();
    let mut ours = false;
    let mut advised = 0;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if ours {
                assert!(flags.split_whitespace().any(|f| f == "rr"), "{line}");
                advised += 1;
            }
        } else if line.split_whitespace().count() >= 6 {
            let f: Vec<_> = line.split_whitespace().collect();
            ours = std::path::Path::new(f[5]) == exe && !f[1].contains('w');
        }
    }
    assert!(
        advised > 0,
        "no read-only mapping of {} found",
        exe.display()
    );
    child.signal(Signal::SIGTERM);
    assert!(child.wait_exit(Duration::from_secs(15)).is_some());
}
