//! The real binary with its stdout read by a process that stops reading: firings stay
//! on time, lost lines are counted, and logging resumes when the reader does.

mod common;

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Running, TestDb, vigil, write};
use nix::sys::signal::Signal;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_log_reader_delays_no_firing_and_its_lost_lines_are_counted() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    // A 1 s job that writes about 200 KB of log lines a run.
    write(
        dir.path(),
        "jobs.toml",
        "[[jobs]]\nname = \"chatty\"\nkind = \"command\"\nevery = \"1s\"\nscope = \"host\"\n\
         [jobs.settings]\ncommand = [\"sh\", \"-c\", \"i=0; while [ $i -lt 1000 ]; do echo \\\"line $i of a job that says a lot about what it does\\\"; i=$((i+1)); done\"]\n",
    );
    let log = dir.path().join("stdout.log");
    let mut reader = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pipe = reader.stdin.take().unwrap();
    let reader = Running(reader);
    let port = free_port();
    let port_text = port.to_string();
    let mut cmd = vigil(
        dir.path(),
        &["run"],
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("PORT", port_text.as_str()),
            ("VIGIL_HOST", "slow-reader"),
            ("VIGIL_LOG_BUFFER", "256KiB"),
            ("VIGIL_WATCH_CONFIG", "false"),
        ],
    );
    let vigil = Running(
        cmd.stdout(Stdio::from(pipe))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::eventually(Duration::from_secs(20), "vigil to start", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("vigil started")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The reader stops for 30 s: the pipe fills within the first run.
    let stopped_at = Utc::now();
    reader.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let resumed_at = Utc::now();
    reader.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let metrics = common::http()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped: f64 = metrics
        .lines()
        .find(|l| l.starts_with("vigil_log_dropped_total "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        dropped > 1000.0,
        "lines dropped while the reader was stopped: {dropped}"
    );

    vigil.signal(Signal::SIGTERM);
    let mut vigil = vigil;
    assert!(
        vigil.wait_exit(Duration::from_secs(20)).is_some(),
        "vigil exits"
    );

    // Every firing while the reader was stopped started on time.
    let runs = db.runs("chatty").await;
    let stalled: Vec<_> = runs
        .iter()
        .filter(|r| r.scheduled_at > stopped_at && r.scheduled_at < resumed_at)
        .collect();
    assert!(stalled.len() >= 28, "{} firings in the 30 s", stalled.len());
    let worst = stalled
        .iter()
        .map(|r| (r.started_at - r.scheduled_at).num_milliseconds())
        .max()
        .unwrap_or(0);
    println!(
        "reader stopped 30 s: {} firings, worst start {worst} ms late, {dropped} lines dropped",
        stalled.len()
    );
    for r in &stalled {
        let late = (r.started_at - r.scheduled_at).num_milliseconds();
        assert!(
            late < 50,
            "firing at {} started {late} ms late",
            r.scheduled_at
        );
        assert_eq!(r.status, vigil::store::RunStatus::Succeeded, "{r:?}");
    }

    // Logging resumed: lines written after the reader came back, with a note of the loss.
    let file = std::fs::File::open(&log).unwrap();
    let mut after = 0;
    let mut noted = false;
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        noted |= v["message"]
            .as_str()
            .is_some_and(|m| m.contains("dropped the oldest log lines"));
        if let Some(ts) = v["ts"]
            .as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            && ts > resumed_at
        {
            after += 1;
        }
    }
    assert!(after > 100, "{after} lines logged after the reader resumed");
    assert!(noted, "the loss is said in the log itself");
}
