//! `command` jobs that misbehave, run by the real binary: a flood of output without
//! newlines, invalid UTF-8, a child left running in the background.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Running, TestDb, vigil, write};
use serde_json::Value;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Resident memory of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Starts vigil on `jobs` and waits for its gateway.
async fn start(db: &TestDb, dir: &std::path::Path, jobs: &str) -> (Running, u16) {
    write(dir, "jobs.toml", jobs);
    let port = free_port();
    let port_text = port.to_string();
    let child = Running(
        vigil(
            dir,
            &["run"],
            &[
                ("DATABASE_URL", db.url.as_str()),
                ("PORT", port_text.as_str()),
                ("VIGIL_WATCH_CONFIG", "false"),
            ],
        )
        .stdout(std::fs::File::create(dir.join("vigil.log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    common::eventually(Duration::from_secs(20), "the gateway", || async move {
        common::http()
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    (child, port)
}

async fn trigger(port: u16, job: &str) -> Value {
    common::http()
        .post(format!(
            "http://127.0.0.1:{port}/api/jobs/{job}/runs?wait=true&timeout=120"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_megabytes_without_a_newline_cost_little_memory_and_end_with_the_program() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (vigil, port) = start(
        &db,
        dir.path(),
        "[[jobs]]\nname = \"flood\"\nkind = \"command\"\nevery = \"1h\"\ntimeout = \"5m\"\n\
         [jobs.settings]\ncommand = [\"sh\", \"-c\", \"head -c 200000000 /dev/zero | tr '\\\\000' x; \
         printf '\\\\nbad \\\\377\\\\376 bytes\\\\n'; echo done >&2\"]\n",
    )
    .await;
    let pid = vigil.0.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss(pid);
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let started = std::time::Instant::now();
    let run = trigger(port, "flood").await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(
        took < Duration::from_secs(120),
        "ended with the program: {took:?}"
    );
    let grew = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    println!("RSS {baseline} B at rest, peak growth {grew} B while 200 MB went through");
    assert!(grew < 32 << 20, "vigil's RSS grew by {} MiB", grew >> 20);

    // The giant line was logged cut, the bad bytes replaced, and reading went on.
    drop(vigil);
    let log = std::fs::read_to_string(dir.path().join("vigil.log")).unwrap();
    assert!(
        log.contains("[line cut at 16384 of 200000000 bytes]"),
        "the cut line is logged with its length"
    );
    assert!(
        log.contains("bad \u{FFFD}\u{FFFD} bytes"),
        "invalid UTF-8 replaced"
    );
    assert!(
        log.contains("\"message\":\"done\""),
        "stderr read to the end"
    );
}

/// Processes in process group `pgid`, with their state letter.
fn group_members(pgid: i32) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp …; comm may hold spaces, so split after ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields.first().and_then(|s| s.chars().next()).unwrap_or('?');
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) {
            out.push((pid, state));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_left_in_the_background_is_killed_and_reaped_when_the_program_exits() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let pgid_file = dir.path().join("pgid");
    let (vigil, port) = start(
        &db,
        dir.path(),
        &format!(
            "[[jobs]]\nname = \"leaves-a-child\"\nkind = \"command\"\nevery = \"1h\"\ntimeout = \"5m\"\n\
             [jobs.settings]\ncommand = [\"sh\", \"-c\", \"echo $$ > {}; sleep 60 & echo left it running\"]\n",
            pgid_file.display()
        ),
    )
    .await;
    let started = std::time::Instant::now();
    let run = trigger(port, "leaves-a-child").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // The run ends with the program, not with the child holding its output open.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let pgid: i32 = std::fs::read_to_string(&pgid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let members = common::eventually(Duration::from_secs(5), "the group to be gone", || async {
        let members = group_members(pgid);
        members.is_empty().then_some(members)
    })
    .await;
    assert!(
        members.is_empty(),
        "left in group {pgid}: {members:?} (Z = zombie)"
    );
    drop(vigil);
}
