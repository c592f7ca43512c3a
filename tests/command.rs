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
    start_with(db, dir, jobs, &[]).await
}

/// Starts vigil on `jobs`, with `env` besides the database and port.
async fn start_with(
    db: &TestDb,
    dir: &std::path::Path,
    jobs: &str,
    env: &[(&str, &str)],
) -> (Running, u16) {
    write(dir, "jobs.toml", jobs);
    let port = free_port();
    let port_text = port.to_string();
    let mut all = vec![
        ("DATABASE_URL", db.url.as_str()),
        ("PORT", port_text.as_str()),
        ("VIGIL_WATCH_CONFIG", "false"),
    ];
    all.extend_from_slice(env);
    let child = Running(
        vigil(dir, &["run"], &all)
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

/// Allocates and touches MIB MiB, then burns CPU until the process has used CPU
/// seconds in all; prints its own peak resident memory (bytes) and CPU seconds.
const BURN: &str = r#"
import sys, time
mib, cpu = int(sys.argv[1]), float(sys.argv[2])
b = bytearray(mib << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
while time.process_time() < cpu:
    pass
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(hwm, time.process_time(), flush=True)
"#;

/// What each program reported of itself: (peak bytes, CPU seconds) per line.
fn reported(run: &Value) -> Vec<(f64, f64)> {
    run["output"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

/// The CPU seconds of the whole tree as the kernel accounted them, from the `times`
/// the job's shell prints last: its own user and system time, then its reaped
/// children's (each program's whole life, its exit included, which a program cannot
/// report of itself).
fn shell_times(run: &Value) -> f64 {
    let seconds = |t: &str| -> Option<f64> {
        let (m, s) = t.strip_suffix('s')?.split_once('m')?;
        Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
    };
    let lines: Vec<f64> = run["output"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (u, s) = l.split_once(' ')?;
            Some(seconds(u)? + seconds(s)?)
        })
        .collect();
    assert_eq!(lines.len(), 2, "the shell's times: {run}");
    lines.iter().sum()
}

fn within(measured: f64, expected: f64, share: f64) -> bool {
    (measured - expected).abs() <= expected * share
}

/// A run that burns about a CPU-second holding about 200 MiB, and one whose two
/// children burn half a second each holding 100 MiB at the same time: vigil's
/// figures agree within 20 % with the programs' own peaks and with the CPU time the
/// kernel accounted to the tree (the shell's `times`), under a cgroup of the run's own
/// (where this machine lets vigil make one) and by the process tree.
async fn resources_of_runs_agree_with_the_programs_own_account(cgroups: bool) {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let burn = write(dir.path(), "burn.py", BURN);
    let jobs = format!(
        "[[jobs]]\nname = \"burn\"\nkind = \"command\"\nevery = \"1h\"\n\
         [jobs.settings]\ncommand = [\"sh\", \"-c\", \"python3 {b} 200 1.0; times\"]\n\n\
         [[jobs]]\nname = \"forks\"\nkind = \"command\"\nevery = \"1h\"\n\
         [jobs.settings]\ncommand = [\"sh\", \"-c\", \"python3 {b} 100 0.5 & python3 {b} 100 0.5 & wait; times\"]\n",
        b = burn.display()
    );
    let setting = if cgroups { "true" } else { "false" };
    let (vigil, port) = start_with(&db, dir.path(), &jobs, &[("VIGIL_RUN_CGROUPS", setting)]).await;
    let expected_method = if cgroups && vigil::jobs::command::cgroup_place().is_some() {
        "cgroup"
    } else {
        "process_tree"
    };
    for job in ["burn", "forks"] {
        let run = trigger(port, job).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let own = reported(&run);
        assert_eq!(own.len(), if job == "burn" { 1 } else { 2 }, "{run}");
        let (peak, own_cpu): (f64, f64) = own
            .iter()
            .fold((0.0, 0.0), |(p, c), (pp, cc)| (p + pp, c + cc));
        let cpu = shell_times(&run);
        assert!(
            cpu >= own_cpu * 0.98,
            "{job}: the kernel's {cpu} s, the programs' own {own_cpu} s"
        );
        let id = run["run_id"].as_str().unwrap();
        let (_, view) = get(port, &format!("/api/runs/{id}")).await;
        let r = &view["resources"];
        let used = r["cpu_user_s"].as_f64().unwrap() + r["cpu_system_s"].as_f64().unwrap();
        let measured_peak = r["peak_rss_bytes"].as_f64().unwrap();
        println!(
            "{job} ({expected_method}): CPU {used:.3} s (kernel: {cpu:.3} s, programs: {own_cpu:.3} s), peak {:.1} MiB \
             (programs: {:.1} MiB), read {} B, written {} B",
            measured_peak / 1048576.0,
            peak / 1048576.0,
            r["read_bytes"],
            r["written_bytes"]
        );
        assert_eq!(r["measured_by"], expected_method, "{view}");
        assert!(within(used, cpu, 0.2), "{job}: CPU {used} vs {cpu}");
        assert!(
            within(measured_peak, peak, 0.2),
            "{job}: peak {measured_peak} vs {peak}"
        );
    }
    // In the ledger, and in /metrics as histograms per job.
    let stored: Option<f64> =
        sqlx::query_scalar("SELECT max(peak_rss_bytes)::float8 FROM job_runs WHERE job = 'burn'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(stored.unwrap_or(0.0) > 150.0 * 1048576.0, "{stored:?}");
    let metrics = common::http()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "vigil_run_cpu_seconds_count{job=\"burn\"} 1",
        "vigil_run_peak_memory_bytes_count{job=\"forks\"} 1",
        "vigil_run_io_bytes_count{job=\"burn\",direction=\"write\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} not in /metrics");
    }
    drop(vigil);
}

async fn get(port: u16, path: &str) -> (reqwest::StatusCode, Value) {
    let r = common::http()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runs_cpu_and_peak_memory_are_measured_in_a_cgroup_of_its_own() {
    resources_of_runs_agree_with_the_programs_own_account(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runs_cpu_and_peak_memory_are_measured_by_its_process_tree_without_cgroups() {
    resources_of_runs_agree_with_the_programs_own_account(false).await;
}
