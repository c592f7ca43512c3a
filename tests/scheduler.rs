//! The governed scheduler with stand-in jobs: governance (overlap, timeout, retries,
//! catch-up, replace, shutdown) on storage in memory and paused tokio time, so it takes
//! no wall-clock time; the SQL the ledger relies on against real PostgreSQL.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{TestDb, eventually};
use vigil::config::{self, JobSpec};
use vigil::jobs::{Job, JobError, RunContext, RunOutcome};
use vigil::scheduler::MemoryBackend;
use vigil::scheduler::{Scheduler, TriggerError};
use vigil::store::{RunRecord, RunStatus, Trigger};

/// A job spec from TOML; the `command` kind is a placeholder, the test supplies the job.
fn spec(name: &str, fields: &str) -> JobSpec {
    let text = format!(
        "[[jobs]]\nname = \"{name}\"\nkind = \"command\"\n{fields}\n[jobs.settings]\ncommand = [\"true\"]\n"
    );
    config::parse_jobs(
        Path::new("test.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .jobs
    .remove(0)
}

struct Sleep(Duration);

#[async_trait::async_trait]
impl Job for Sleep {
    async fn run(&self, _ctx: RunContext) -> Result<RunOutcome, JobError> {
        tokio::time::sleep(self.0).await;
        Ok(RunOutcome::Completed { items: Some(1) })
    }
}

struct Panics;

#[async_trait::async_trait]
impl Job for Panics {
    async fn run(&self, _ctx: RunContext) -> Result<RunOutcome, JobError> {
        panic!("boom in the job");
    }
}

/// Fails its first `failures` attempts, then succeeds.
struct Flaky {
    failures: u32,
    calls: AtomicU32,
}

#[async_trait::async_trait]
impl Job for Flaky {
    async fn run(&self, _ctx: RunContext) -> Result<RunOutcome, JobError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.failures {
            Err(JobError::Failed(format!("failure number {}", n + 1)))
        } else {
            Ok(RunOutcome::Completed { items: Some(7) })
        }
    }
}

/// A scheduler on storage in memory and tokio's (paused) clock, and that storage.
fn scheduler(host: &str) -> (Scheduler, Arc<MemoryBackend>) {
    Scheduler::in_memory(host)
}

fn intervals_overlap(a: &RunRecord, b: &RunRecord) -> bool {
    let end = |r: &RunRecord| r.finished_at.unwrap_or(DateTime::<Utc>::MAX_UTC);
    a.started_at < end(b) && b.started_at < end(a)
}

/// Runs a 1 s job that sleeps 2.5 s for about 10 s under `overlap`, returns its rows.
async fn overlap_scenario(overlap: &str) -> (Arc<MemoryBackend>, Vec<RunRecord>) {
    let (s, db) = scheduler("h");
    s.add(
        spec(
            "sleepy",
            &format!("every = \"1s\"\noverlap = \"{overlap}\"\ntimeout = \"30s\""),
        ),
        Arc::new(Sleep(Duration::from_millis(2500))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    s.shutdown(Duration::from_secs(5)).await;
    let runs = db.runs("sleepy");
    (db, runs)
}

#[tokio::test(start_paused = true)]
async fn forbid_records_skips_and_never_runs_two_at_once() {
    let (_db, runs) = overlap_scenario("forbid").await;
    let ran: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| r.status != RunStatus::Skipped)
        .collect();
    let skipped: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| r.status == RunStatus::Skipped)
        .collect();
    assert!(ran.len() >= 3, "expected several runs: {runs:#?}");
    assert!(skipped.len() >= 5, "expected skipped firings: {runs:#?}");
    for (i, a) in ran.iter().enumerate() {
        for b in &ran[i + 1..] {
            assert!(!intervals_overlap(a, b), "two runs at once: {a:#?} {b:#?}");
        }
    }
    for s in &skipped {
        assert!(
            s.error.as_deref().unwrap_or("").contains("still running"),
            "skip names the running run: {s:?}"
        );
    }
    // Every firing is accounted for: one row per second, none lost.
    let firings: std::collections::BTreeSet<_> = runs.iter().map(|r| r.scheduled_at).collect();
    assert_eq!(firings.len(), runs.len(), "one row per firing");
    let first = *firings.first().unwrap();
    let last = *firings.last().unwrap();
    assert_eq!(
        (last - first).num_seconds() as usize + 1,
        runs.len(),
        "no firing lost between {first} and {last}"
    );
}

#[tokio::test(start_paused = true)]
async fn allow_lets_runs_overlap() {
    let (_db, runs) = overlap_scenario("allow").await;
    assert!(runs.iter().all(|r| r.status != RunStatus::Skipped));
    let overlapping = runs
        .iter()
        .enumerate()
        .any(|(i, a)| runs[i + 1..].iter().any(|b| intervals_overlap(a, b)));
    assert!(overlapping, "runs should overlap: {runs:#?}");
    assert!(
        runs.iter()
            .filter(|r| r.status == RunStatus::Succeeded)
            .count()
            >= 5
    );
}

#[tokio::test(start_paused = true)]
async fn replace_cancels_the_running_run() {
    let (_db, runs) = overlap_scenario("replace").await;
    let replaced: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| {
            r.error
                .as_deref()
                .is_some_and(|e| e.contains("replaced by run"))
        })
        .collect();
    assert!(replaced.len() >= 5, "{runs:#?}");
    for r in &replaced {
        assert_eq!(r.status, RunStatus::Failed);
        // Cancelled about a second in, long before its 2.5 s of work.
        let lived = r.finished_at.unwrap() - r.started_at;
        assert!(lived < chrono::Duration::milliseconds(2000), "{r:?}");
        // The run that replaced it exists.
        let by: uuid::Uuid = r
            .error
            .as_deref()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(runs.iter().any(|x| x.id == by));
    }
    let ran: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| r.status != RunStatus::Skipped)
        .collect();
    for (i, a) in ran.iter().enumerate() {
        for b in &ran[i + 1..] {
            // Replacement hands over: at most a few milliseconds of overlap.
            if intervals_overlap(a, b) {
                let overlap = a.finished_at.unwrap().min(b.finished_at.unwrap())
                    - a.started_at.max(b.started_at);
                assert!(overlap < chrono::Duration::milliseconds(100), "{a:?} {b:?}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_past_its_timeout_is_cancelled_and_recorded_timed_out() {
    let (s, db) = scheduler("h");
    s.add(
        spec("slow", "every = \"1h\"\ntimeout = \"1s\""),
        Arc::new(Sleep(Duration::from_secs(30))),
    )
    .await
    .unwrap();
    let mut run = s.trigger("slow", false).unwrap();
    let result = run.finished().await;
    assert_eq!(result.status, RunStatus::TimedOut);
    assert_eq!(result.error.as_deref(), Some("timed out after 1s"));
    s.flush_ledger(Duration::from_secs(5)).await.unwrap();
    let rows = db.runs("slow");
    assert_eq!(rows.len(), 1);
    let took = rows[0].finished_at.unwrap() - rows[0].started_at;
    assert!(
        took >= chrono::Duration::milliseconds(1000) && took < chrono::Duration::milliseconds(2500),
        "{took}"
    );
    assert_eq!(rows[0].trigger, Trigger::Manual);
}

#[tokio::test(start_paused = true)]
async fn failed_attempts_are_retried_with_growing_backoff_and_each_recorded() {
    let (s, db) = scheduler("h");
    s.add(
        spec(
            "flaky",
            "every = \"1h\"\nretries = { max_attempts = 5, initial_backoff = \"300ms\", max_backoff = \"2s\" }",
        ),
        Arc::new(Flaky {
            failures: 3,
            calls: AtomicU32::new(0),
        }),
    )
    .await
    .unwrap();
    let mut run = s.trigger("flaky", false).unwrap();
    let result = run.finished().await;
    assert_eq!(result.status, RunStatus::Succeeded);
    assert_eq!(result.attempts, 4);
    assert_eq!(result.items, Some(7));
    s.flush_ledger(Duration::from_secs(5)).await.unwrap();

    let rows = db.runs("flaky");
    assert_eq!(rows.len(), 4, "{rows:#?}");
    assert_eq!(
        rows.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(rows[0].trigger, Trigger::Manual);
    assert!(
        rows[1..]
            .iter()
            .all(|r| r.trigger == Trigger::Retry && r.retry_of == Some(rows[0].id))
    );
    assert_eq!(
        rows.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![
            RunStatus::Failed,
            RunStatus::Failed,
            RunStatus::Failed,
            RunStatus::Succeeded
        ]
    );
    assert_eq!(rows[2].error.as_deref(), Some("failure number 3"));
    // Gaps between an attempt's end and the next start: 300 ms, 600 ms, 1200 ms.
    let gaps: Vec<i64> = rows
        .windows(2)
        .map(|w| (w[1].started_at - w[0].finished_at.unwrap()).num_milliseconds())
        .collect();
    for (gap, want) in gaps.iter().zip([300, 600, 1200]) {
        assert!(*gap >= want && *gap < want + 400, "gaps {gaps:?}");
    }
    assert!(
        gaps.windows(2).all(|w| w[1] > w[0]),
        "backoff grows: {gaps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_max_attempts() {
    let (s, db) = scheduler("h");
    s.add(
        spec(
            "doomed",
            "every = \"1h\"\nretries = { max_attempts = 2, initial_backoff = \"100ms\" }",
        ),
        Arc::new(Flaky {
            failures: 100,
            calls: AtomicU32::new(0),
        }),
    )
    .await
    .unwrap();
    let result = s.trigger("doomed", false).unwrap().finished().await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(result.attempts, 2);
    s.flush_ledger(Duration::from_secs(5)).await.unwrap();
    assert_eq!(db.runs("doomed").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_job_is_recorded_failed_and_nothing_else_stops() {
    let (s, db) = scheduler("h");
    s.add(spec("bomb", "every = \"1s\""), Arc::new(Panics))
        .await
        .unwrap();
    s.add(
        spec("steady", "every = \"1s\""),
        Arc::new(Sleep(Duration::from_millis(10))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert!(s.is_running());
    s.shutdown(Duration::from_secs(2)).await;

    let bombs = db.runs("bomb");
    assert!(
        bombs.len() >= 3,
        "the panicking job keeps being scheduled: {bombs:#?}"
    );
    for b in &bombs {
        assert_eq!(b.status, RunStatus::Failed);
        assert_eq!(b.error.as_deref(), Some("panicked: boom in the job"));
    }
    let steady = db.runs("steady");
    assert!(steady.len() >= 3);
    assert!(steady.iter().all(|r| r.status == RunStatus::Succeeded));
}

/// One row of `job` by id.
fn run_row(db: &MemoryBackend, job: &str, id: uuid::Uuid) -> RunRecord {
    db.runs(job)
        .into_iter()
        .find(|r| r.id == id)
        .expect("the run's row")
}

/// A ledger row as an earlier process would have left it.
fn past_firing(job: &str, at: DateTime<Utc>) -> RunRecord {
    RunRecord {
        id: uuid::Uuid::now_v7(),
        job: job.into(),
        kind: "command".into(),
        trigger: Trigger::Schedule,
        attempt: 1,
        retry_of: None,
        scheduled_at: at,
        started_at: at,
        finished_at: Some(at),
        status: RunStatus::Succeeded,
        items: None,
        error: None,
        host: "h".into(),
        permanent: false,
        retry_after_ms: None,
        input: None,
        output: None,
        resources: None,
    }
}

#[tokio::test(start_paused = true)]
async fn catch_up_once_runs_the_latest_missed_firing_at_start() {
    let (s, db) = scheduler("h");
    let last = s.now() - chrono::Duration::hours(5);
    db.seed([past_firing("hourly", last)]);

    s.add(
        spec("hourly", "every = \"1h\"\ncatch_up = \"once\""),
        Arc::new(Sleep(Duration::from_millis(10))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    let rows = eventually(Duration::from_secs(10), "the catch-up run", || async {
        let rows = db.runs("hourly");
        rows.iter()
            .any(|r| r.trigger == Trigger::CatchUp && r.status.is_final())
            .then_some(rows)
    })
    .await;
    s.shutdown(Duration::from_secs(2)).await;
    let catch_ups: Vec<&RunRecord> = rows
        .iter()
        .filter(|r| r.trigger == Trigger::CatchUp)
        .collect();
    assert_eq!(
        catch_ups.len(),
        1,
        "exactly one catch-up for five missed firings: {rows:#?}"
    );
    let expected = DateTime::from_timestamp(s.now().timestamp() / 3600 * 3600, 0).unwrap();
    assert_eq!(
        catch_ups[0].scheduled_at, expected,
        "the latest missed firing"
    );
    assert_eq!(catch_ups[0].status, RunStatus::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn catch_up_skip_ignores_missed_firings() {
    let (s, db) = scheduler("h");
    db.seed([past_firing("hourly", s.now() - chrono::Duration::hours(5))]);
    s.add(
        spec("hourly", "every = \"1h\""),
        Arc::new(Sleep(Duration::from_millis(10))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.shutdown(Duration::from_secs(2)).await;
    let rows = db.runs("hourly");
    assert_eq!(rows.len(), 1, "only the old row: {rows:#?}");
}

#[tokio::test(start_paused = true)]
async fn catch_up_once_does_nothing_for_a_job_that_never_ran() {
    let (s, db) = scheduler("h");
    s.add(
        spec("fresh", "every = \"1h\"\ncatch_up = \"once\""),
        Arc::new(Sleep(Duration::from_millis(10))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.shutdown(Duration::from_secs(2)).await;
    assert!(db.runs("fresh").is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_runs_within_the_grace_period() {
    let (s, db) = scheduler("h");
    s.add(
        spec("short", "every = \"1h\""),
        Arc::new(Sleep(Duration::from_millis(800))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    let run = s.trigger("short", false).unwrap();
    let report = s.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.abandoned, 0);
    assert!(report.ledger_flushed);
    let row = run_row(&db, "short", run.run_id);
    assert_eq!(row.status, RunStatus::Succeeded);
    // No new firing is accepted once stopping.
    assert_eq!(
        s.trigger("short", false).unwrap_err(),
        TriggerError::Stopping
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_abandons_runs_still_going_after_the_grace_period() {
    let (s, db) = scheduler("h");
    s.add(
        spec("long", "every = \"1h\""),
        Arc::new(Sleep(Duration::from_secs(60))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    let run = s.trigger("long", false).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let report = s.shutdown(Duration::from_millis(500)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the grace period"
    );
    assert_eq!(report.abandoned, 1);
    let row = run_row(&db, "long", run.run_id);
    assert_eq!(row.status, RunStatus::Abandoned);
    assert!(row.finished_at.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_left_running_by_this_host_become_abandoned_and_others_are_untouched() {
    let db = TestDb::new().await;
    let mut mine = past_firing("j", Utc::now());
    mine.status = RunStatus::Running;
    mine.finished_at = None;
    let mut theirs = mine.clone();
    theirs.id = uuid::Uuid::now_v7();
    theirs.host = "other".into();
    db.store
        .upsert_runs(&[mine.clone(), theirs.clone()])
        .await
        .unwrap();

    let n = db.store.abandon_running("h", "restarted").await.unwrap();
    assert_eq!(n, 1);
    let mine = db.store.run(mine.id).await.unwrap().unwrap();
    assert_eq!(mine.status, RunStatus::Abandoned);
    assert_eq!(mine.error.as_deref(), Some("restarted"));
    assert_eq!(
        db.store.run(theirs.id).await.unwrap().unwrap().status,
        RunStatus::Running
    );
}

#[tokio::test(start_paused = true)]
async fn manual_triggers_obey_the_overlap_policy_and_disabled_jobs_need_force() {
    let (s, db) = scheduler("h");
    s.add(
        spec("one", "every = \"1h\""),
        Arc::new(Sleep(Duration::from_secs(2))),
    )
    .await
    .unwrap();
    s.add(
        spec("off", "every = \"1h\"\nenabled = false"),
        Arc::new(Sleep(Duration::ZERO)),
    )
    .await
    .unwrap();
    let first = s.trigger("one", false).unwrap();
    match s.trigger("one", false) {
        Err(TriggerError::Refused { running, .. }) => assert_eq!(running, first.run_id),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        s.trigger("nope", false).unwrap_err(),
        TriggerError::UnknownJob("nope".into())
    );
    assert_eq!(
        s.trigger("off", false).unwrap_err(),
        TriggerError::Disabled("off".into())
    );
    let forced = s.trigger("off", true).unwrap().finished().await;
    assert_eq!(forced.status, RunStatus::Succeeded);
    s.shutdown(Duration::from_secs(5)).await;
    let rows = db.runs("one");
    let mut statuses: Vec<RunStatus> = rows.iter().map(|r| r.status).collect();
    statuses.sort_by_key(|s| s.as_str());
    assert_eq!(
        statuses,
        vec![RunStatus::Skipped, RunStatus::Succeeded],
        "{rows:#?}"
    );
    assert!(rows.iter().all(|r| r.trigger == Trigger::Manual));
}

/// Fails with the error `make` gives, counting its calls.
struct FailsWith {
    make: fn() -> JobError,
    calls: AtomicU32,
}

#[async_trait::async_trait]
impl Job for FailsWith {
    async fn run(&self, _ctx: RunContext) -> Result<RunOutcome, JobError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err((self.make)())
    }
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_is_not_retried_and_the_ledger_says_so() {
    let (s, db) = scheduler("h");
    let job = Arc::new(FailsWith {
        make: || JobError::Permanent("the input is not a number".into()),
        calls: AtomicU32::new(0),
    });
    s.add(
        spec("strict", "every = \"1h\"\nretries = { max_attempts = 5 }"),
        job.clone(),
    )
    .await
    .unwrap();
    let result = s.trigger("strict", false).unwrap().finished().await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(result.attempts, 1, "not retried");
    assert_eq!(job.calls.load(Ordering::SeqCst), 1);
    let rows = db.runs("strict");
    assert_eq!(rows.len(), 1);
    assert!(rows[0].permanent, "{rows:?}");
    assert_eq!(rows[0].error.as_deref(), Some("the input is not a number"));
}

#[tokio::test(start_paused = true)]
async fn a_job_that_asks_for_a_later_retry_gets_that_pause_instead_of_the_backoff() {
    let (s, db) = scheduler("h");
    s.add(
        spec(
            "patient",
            "every = \"1h\"\nretries = { max_attempts = 3, initial_backoff = \"100ms\" }",
        ),
        Arc::new(FailsWith {
            make: || JobError::RetryAfter {
                after: Duration::from_secs(7),
                message: "rate limited".into(),
            },
            calls: AtomicU32::new(0),
        }),
    )
    .await
    .unwrap();
    let result = s.trigger("patient", false).unwrap().finished().await;
    assert_eq!(result.attempts, 3, "still within max_attempts");
    let rows = db.runs("patient");
    assert!(
        rows.iter()
            .all(|r| r.retry_after_ms == Some(7000) && !r.permanent)
    );
    let gaps: Vec<i64> = rows
        .windows(2)
        .map(|w| (w[1].started_at - w[0].finished_at.unwrap()).num_milliseconds())
        .collect();
    assert_eq!(
        gaps,
        [7000, 7000],
        "the job's pause, not 100 ms then 200 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn a_program_that_does_not_exist_is_a_permanent_failure() {
    let (s, db) = scheduler("h");
    let spec = spec(
        "missing",
        "every = \"1h\"\nretries = { max_attempts = 4, initial_backoff = \"1s\" }",
    );
    // The real command kind, with a program nowhere on disk.
    let mut text = String::new();
    text.push_str("[[jobs]]\nname = \"missing\"\nkind = \"command\"\nevery = \"1h\"\n");
    text.push_str("retries = { max_attempts = 4, initial_backoff = \"1s\" }\n");
    text.push_str("[jobs.settings]\ncommand = [\"/nonexistent/vigil-test-program\"]\n");
    let real = config::parse_jobs(
        Path::new("t.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap()
    .jobs
    .remove(0);
    let store = vigil::store::Store::from_pool(
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap(),
    );
    let deps = vigil::jobs::Deps {
        store,
        host: "h".into(),
        metrics: Default::default(),
        mongo_uri: None,
        env: vigil::config::Environment::capture().unwrap(),
        host_root: None,
        spool: None,
        run_cgroups: true,
    };
    let job = vigil::jobs::build(&real, &deps).unwrap();
    s.add(spec, job).await.unwrap();
    let result = s.trigger("missing", false).unwrap().finished().await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(result.attempts, 1, "a missing program is not retried");
    let row = &db.runs("missing")[0];
    assert!(row.permanent);
    assert!(
        row.error.as_deref().unwrap_or("").contains("No such file"),
        "{row:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cluster_job_that_cannot_reach_its_lock_is_recorded_failed_once() {
    let (s, db) = scheduler("h");
    s.add(
        spec("shared", "every = \"1h\""),
        Arc::new(Sleep(Duration::ZERO)),
    )
    .await
    .unwrap();
    db.set_unreachable(true);
    let result = s.trigger("shared", false).unwrap().finished().await;
    assert_eq!(result.status, RunStatus::Failed);
    let rows = db.runs("shared");
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0]
            .error
            .as_deref()
            .unwrap_or("")
            .starts_with("cannot take the job's cluster lock"),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_sql_keeps_final_rows_and_finds_the_last_scheduled_firing() {
    let db = TestDb::new().await;
    // PostgreSQL keeps microseconds.
    let at = DateTime::from_timestamp_micros(
        (Utc::now() - chrono::Duration::hours(2)).timestamp_micros(),
    )
    .unwrap();
    let mut row = past_firing("j", at);
    row.status = RunStatus::Running;
    row.finished_at = None;
    db.store
        .upsert_runs(std::slice::from_ref(&row))
        .await
        .unwrap();
    // Finished: the row advances, with what the job said about retrying.
    let mut done = row.clone();
    done.status = RunStatus::Failed;
    done.finished_at = Some(at + chrono::Duration::seconds(1));
    done.permanent = true;
    done.retry_after_ms = Some(1500);
    db.store
        .upsert_runs(std::slice::from_ref(&done))
        .await
        .unwrap();
    // A late copy of the running state changes nothing.
    db.store
        .upsert_runs(std::slice::from_ref(&row))
        .await
        .unwrap();
    let stored = db.store.run(row.id).await.unwrap().unwrap();
    assert_eq!(stored, done);
    // The last firing counts scheduled and caught-up runs, not manual ones.
    let mut manual = past_firing("j", at + chrono::Duration::hours(1));
    manual.trigger = Trigger::Manual;
    let mut caught = past_firing("j", at + chrono::Duration::minutes(30));
    caught.trigger = Trigger::CatchUp;
    db.store
        .upsert_runs(&[manual, caught.clone()])
        .await
        .unwrap();
    assert_eq!(
        db.store.last_firing("j").await.unwrap(),
        Some(caught.scheduled_at)
    );
    assert_eq!(db.store.last_firing("other").await.unwrap(), None);
}
