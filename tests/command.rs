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

#[tokio::test(flavor = "multi_thread")]
async fn a_program_sees_none_of_vigils_secrets_unless_its_job_inherits_the_environment() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.toml",
        "[[jobs]]\nname = \"plain\"\nkind = \"command\"\nevery = \"1h\"\n\
         [jobs.settings]\ncommand = [\"env\"]\nenv = { MINE = \"yes\" }\n\n\
         [[jobs]]\nname = \"inherits\"\nkind = \"command\"\nevery = \"1h\"\n\
         [jobs.settings]\ncommand = [\"env\"]\ninherit_env = true\n",
    );
    let port = free_port().to_string();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("PORT", port.as_str()),
        ("VIGIL_WATCH_CONFIG", "false"),
        ("VIGIL_API_TOKEN", "tok-0123456789"),
        ("MONGO_URI", "mongodb://app:mongo-pw-123@127.0.0.1:1/"),
        ("LANG", "C.UTF-8"),
    ];
    // `check` warns about the job that inherits, where it says so.
    let out = vigil(dir.path(), &["check"], &env).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: jobs.toml:15:15: job \"inherits\" settings: inherit_env = true gives the program vigil's whole environment"),
        "{stderr}"
    );
    let log = dir.path().join("vigil.log");
    let child = Running(
        vigil(dir.path(), &["run"], &env)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let port: u16 = port.parse().unwrap();
    common::eventually(Duration::from_secs(20), "the gateway", || async move {
        common::http()
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let auth = |job: &str| {
        common::http()
            .post(format!(
                "http://127.0.0.1:{port}/api/jobs/{job}/runs?wait=true"
            ))
            .bearer_auth("tok-0123456789")
            .send()
    };
    let plain: Value = auth("plain").await.unwrap().json().await.unwrap();
    let inherits: Value = auth("inherits").await.unwrap().json().await.unwrap();
    assert_eq!(plain["status"], "succeeded", "{plain}");
    assert_eq!(inherits["status"], "succeeded", "{inherits}");
    drop(child);

    // What each program printed, by run.
    let text = std::fs::read_to_string(&log).unwrap();
    let printed = |run: &Value| -> Vec<String> {
        let id = run["run_id"].as_str().unwrap().to_owned();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["run_id"] == id.as_str() && v["stream"] == "stdout")
            .filter_map(|v| v["message"].as_str().map(str::to_owned))
            .collect()
    };
    let names = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
            .collect()
    };
    let plain_vars = names(&printed(&plain));
    for secret in [
        "DATABASE_URL",
        "VIGIL_API_TOKEN",
        "MONGO_URI",
        "VIGIL_WATCH_CONFIG",
    ] {
        assert!(
            !plain_vars.contains(&secret.to_owned()),
            "{secret} in {plain_vars:?}"
        );
    }
    for expected in [
        "PATH",
        "LANG",
        "MINE",
        "VIGIL_RUN_ID",
        "VIGIL_JOB",
        "VIGIL_TRIGGER",
    ] {
        assert!(
            plain_vars.contains(&expected.to_owned()),
            "{expected} not in {plain_vars:?}"
        );
    }
    let lines = printed(&plain);
    assert!(lines.contains(&"VIGIL_JOB=plain".to_owned()));
    assert!(lines.contains(&"VIGIL_TRIGGER=manual".to_owned()));
    assert!(lines.contains(&format!(
        "VIGIL_RUN_ID={}",
        plain["run_id"].as_str().unwrap()
    )));
    // Asked for: it gets them (their values still hidden in vigil's own log).
    let inherited = names(&printed(&inherits));
    for secret in ["DATABASE_URL", "VIGIL_API_TOKEN", "MONGO_URI"] {
        assert!(
            inherited.contains(&secret.to_owned()),
            "{secret} not in {inherited:?}"
        );
    }
    assert!(!text.contains("mongo-pw-123") && !text.contains("tok-0123456789"));
}
