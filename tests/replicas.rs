//! Three real `vigil` processes against one PostgreSQL database, one killed midway:
//! `cluster` jobs run once per firing and never two at once, `host` jobs run on every
//! live replica. Everything is read back from `job_runs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, DurationRound as _, TimeDelta, Utc};
use common::{Running, TestDb, eventually, vigil, write};
use nix::sys::signal::Signal;
use vigil::store::{RunRecord, RunStatus, Trigger};

const JOBS: &str = r#"
# Once per second across the cluster, quick: every firing must run exactly once.
[[jobs]]
name = "cluster-tick"
kind = "command"
every = "1s"
[jobs.settings]
command = ["true"]

# The same on a cron schedule: every replica must compute the very same instant.
[[jobs]]
name = "cluster-cron"
kind = "command"
cron = "* * * * * *"
[jobs.settings]
command = ["true"]

# Runs outlast the interval: without the cluster lock, replicas would overlap.
[[jobs]]
name = "cluster-slow"
kind = "command"
every = "1s"
timeout = "10s"
[jobs.settings]
command = ["sleep", "1.5"]

# Every replica, every second.
[[jobs]]
name = "host-tick"
kind = "command"
every = "1s"
scope = "host"
[jobs.settings]
command = ["true"]
"#;

const HOSTS: [&str; 3] = ["replica-a", "replica-b", "replica-c"];

fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut t = from.duration_trunc(TimeDelta::seconds(1)).unwrap() + TimeDelta::seconds(1);
    let mut all = Vec::new();
    while t <= to {
        all.push(t);
        t += TimeDelta::seconds(1);
    }
    all
}

/// Checks that every firing of `job` in `expected` ran exactly once and succeeded;
/// returns how many each replica ran.
async fn once_per_firing(
    db: &TestDb,
    job: &str,
    expected: &[DateTime<Utc>],
    killed_at: DateTime<Utc>,
) -> BTreeMap<String, usize> {
    let all = db.runs(job).await;
    let mut per_second: BTreeMap<DateTime<Utc>, Vec<&RunRecord>> = BTreeMap::new();
    for r in all.iter().filter(|r| r.trigger == Trigger::Schedule) {
        per_second.entry(r.scheduled_at).or_default().push(r);
    }
    let claims: BTreeMap<DateTime<Utc>, String> =
        sqlx::query_as("SELECT scheduled_at, host FROM job_claims WHERE job = $1")
            .bind(job)
            .fetch_all(db.pool())
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut by_host: BTreeMap<String, usize> = BTreeMap::new();
    for s in expected {
        let rows = per_second.get(s).map(Vec::as_slice).unwrap_or_default();
        if rows.is_empty() && (*s - killed_at).abs() < TimeDelta::seconds(2) {
            // The one firing the killed replica had claimed and not yet recorded: lost
            // with it, as documented; the next firing goes to a live replica.
            assert_eq!(
                claims.get(s).map(String::as_str),
                Some("replica-c"),
                "{job} {s}"
            );
            println!("{job} firing {s} was claimed by the replica being killed");
            continue;
        }
        assert_eq!(
            rows.len(),
            1,
            "{job} firing {s} ran {} times: {rows:?}",
            rows.len()
        );
        let run = rows[0];
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        *by_host.entry(run.host.clone()).or_default() += 1;
        if *s > killed_at + TimeDelta::seconds(1) {
            assert_ne!(run.host, "replica-c", "a dead replica ran {job} at {s}");
        }
    }
    by_host
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_share_cluster_jobs_and_each_runs_host_jobs_even_when_one_dies() {
    // An empty database: the three replicas migrate it concurrently at start-up.
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "jobs.toml", JOBS);
    let mut replicas: Vec<Option<Running>> = HOSTS
        .iter()
        .map(|host| {
            Some(Running(
                vigil(
                    dir.path(),
                    &["run"],
                    &[
                        ("DATABASE_URL", &db.url),
                        ("VIGIL_HOST", host),
                        ("PORT", "0"),
                        ("VIGIL_LOG", "warn"),
                    ],
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
            ))
        })
        .collect();

    // The window starts once every replica has run its host job.
    eventually(
        Duration::from_secs(30),
        "every replica to be firing",
        || async {
            // The schema appears once the first replica has migrated.
            let hosts: Vec<String> =
                sqlx::query_scalar("SELECT DISTINCT host FROM job_runs WHERE job = 'host-tick'")
                    .fetch_all(db.pool())
                    .await
                    .ok()?;
            (hosts.len() == 3).then_some(())
        },
    )
    .await;
    let window_start = Utc::now() + TimeDelta::seconds(1);

    // Kill replica-c mid-second (firings are claimed on the second), about 15 s in.
    tokio::time::sleep(Duration::from_secs(14)).await;
    let next_second =
        Utc::now().duration_trunc(TimeDelta::seconds(1)).unwrap() + TimeDelta::milliseconds(1500);
    tokio::time::sleep((next_second - Utc::now()).to_std().unwrap()).await;
    let killed_at = Utc::now();
    if let Some(c) = replicas[2].take() {
        c.signal(Signal::SIGKILL);
        drop(c);
    }

    tokio::time::sleep(Duration::from_secs(15)).await;
    let window_end = Utc::now() - TimeDelta::seconds(2);
    for r in replicas.iter_mut().flatten() {
        r.signal(Signal::SIGTERM);
        assert!(
            r.wait_exit(Duration::from_secs(20)).is_some(),
            "replica exits on SIGTERM"
        );
    }
    replicas.clear();

    // cluster-tick (interval) and cluster-cron: exactly one run for every firing in
    // the window, on whichever replica claimed it, before and after the kill.
    let expected = seconds(window_start, window_end);
    assert!(expected.len() >= 25, "window of {} s", expected.len());
    for job in ["cluster-tick", "cluster-cron"] {
        let by_host = once_per_firing(&db, job, &expected, killed_at).await;
        println!(
            "{job} firings by replica over {} s: {by_host:?}",
            expected.len()
        );
    }

    // cluster-slow: runs that did start never overlap, across all replicas.
    let slow_all = db.runs("cluster-slow").await;
    let slow: Vec<&RunRecord> = slow_all
        .iter()
        .filter(|r| r.status != RunStatus::Skipped)
        .collect();
    let end = |r: &RunRecord| match r.finished_at {
        Some(f) => f,
        // Left running by the killed replica: its lock went with its connection.
        None if r.host == "replica-c" => killed_at,
        None => panic!("run still running after shutdown: {r:?}"),
    };
    let mut sorted = slow.clone();
    sorted.sort_by_key(|r| r.started_at);
    for pair in sorted.windows(2) {
        assert!(
            end(pair[0]) <= pair[1].started_at,
            "cluster-slow runs overlap:\n{:?}\n{:?}",
            pair[0],
            pair[1]
        );
    }
    let skipped = slow_all.len() - slow.len();
    assert!(sorted.len() >= 8, "cluster-slow ran {} times", sorted.len());
    assert!(skipped > 0, "firings during a run are recorded skipped");
    let slow_hosts: BTreeSet<&str> = sorted.iter().map(|r| r.host.as_str()).collect();
    println!(
        "cluster-slow: {} runs on {slow_hosts:?}, {skipped} firings skipped, no overlap",
        sorted.len()
    );

    // host-tick: every live replica ran every firing; the dead one stopped.
    let host_runs = db.runs("host-tick").await;
    for host in HOSTS {
        let mine: BTreeSet<DateTime<Utc>> = host_runs
            .iter()
            .filter(|r| r.host == host && r.trigger == Trigger::Schedule)
            .map(|r| r.scheduled_at)
            .collect();
        let alive_until = if host == "replica-c" {
            // Its last rows may not have been written when it was killed.
            killed_at - TimeDelta::seconds(2)
        } else {
            window_end
        };
        for s in seconds(window_start, alive_until) {
            assert!(mine.contains(&s), "{host} missed host-tick firing {s}");
        }
        if host == "replica-c" {
            assert!(
                mine.iter().all(|s| *s <= killed_at),
                "the killed replica kept running"
            );
        }
        println!("host-tick on {host}: {} firings", mine.len());
    }
}
