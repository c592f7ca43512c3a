//! The governed scheduler against a real PostgreSQL ledger, with stand-in jobs.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{TestDb, eventually};
use vigil::config::{self, JobSpec};
use vigil::jobs::{Job, JobError, RunContext, RunOutcome};
use vigil::scheduler::{Ledger, Scheduler, TriggerError, ledger};
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

async fn scheduler(db: &TestDb, host: &str) -> Scheduler {
    let ledger = Ledger::start(
        db.store.clone(),
        ledger::DEFAULT_CAPACITY,
        Default::default(),
    );
    Scheduler::new(ledger, host).await.unwrap()
}

fn intervals_overlap(a: &RunRecord, b: &RunRecord) -> bool {
    let end = |r: &RunRecord| r.finished_at.unwrap_or(DateTime::<Utc>::MAX_UTC);
    a.started_at < end(b) && b.started_at < end(a)
}

/// Runs a 1 s job that sleeps 2.5 s for about 10 s under `overlap`, returns its rows.
async fn overlap_scenario(overlap: &str) -> (TestDb, Vec<RunRecord>) {
    let db = TestDb::new().await;
    let s = scheduler(&db, "h").await;
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
    let runs = db.runs("sleepy").await;
    (db, runs)
}

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
async fn a_run_past_its_timeout_is_cancelled_and_recorded_timed_out() {
    let db = TestDb::new().await;
    let s = scheduler(&db, "h").await;
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
    s.ledger().flush(Duration::from_secs(5)).await.unwrap();
    let rows = db.runs("slow").await;
    assert_eq!(rows.len(), 1);
    let took = rows[0].finished_at.unwrap() - rows[0].started_at;
    assert!(
        took >= chrono::Duration::milliseconds(1000) && took < chrono::Duration::milliseconds(2500),
        "{took}"
    );
    assert_eq!(rows[0].trigger, Trigger::Manual);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_attempts_are_retried_with_growing_backoff_and_each_recorded() {
    let db = TestDb::new().await;
    let s = scheduler(&db, "h").await;
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
    s.ledger().flush(Duration::from_secs(5)).await.unwrap();

    let rows = db.runs("flaky").await;
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

#[tokio::test(flavor = "multi_thread")]
async fn retries_stop_at_max_attempts() {
    let db = TestDb::new().await;
    let s = scheduler(&db, "h").await;
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
    s.ledger().flush(Duration::from_secs(5)).await.unwrap();
    assert_eq!(db.runs("doomed").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_job_is_recorded_failed_and_nothing_else_stops() {
    let db = TestDb::new().await;
    let s = scheduler(&db, "h").await;
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

    let bombs = db.runs("bomb").await;
    assert!(
        bombs.len() >= 3,
        "the panicking job keeps being scheduled: {bombs:#?}"
    );
    for b in &bombs {
        assert_eq!(b.status, RunStatus::Failed);
        assert_eq!(b.error.as_deref(), Some("panicked: boom in the job"));
    }
    let steady = db.runs("steady").await;
    assert!(steady.len() >= 3);
    assert!(steady.iter().all(|r| r.status == RunStatus::Succeeded));
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
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn catch_up_once_runs_the_latest_missed_firing_at_start() {
    let db = TestDb::new().await;
    let last = Utc::now() - chrono::Duration::hours(5);
    db.store
        .upsert_runs(&[past_firing("hourly", last)])
        .await
        .unwrap();

    let s = scheduler(&db, "h").await;
    s.add(
        spec("hourly", "every = \"1h\"\ncatch_up = \"once\""),
        Arc::new(Sleep(Duration::from_millis(10))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    let rows = eventually(Duration::from_secs(10), "the catch-up run", || async {
        let rows = db.runs("hourly").await;
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
    let expected = DateTime::from_timestamp(Utc::now().timestamp() / 3600 * 3600, 0).unwrap();
    assert_eq!(
        catch_ups[0].scheduled_at, expected,
        "the latest missed firing"
    );
    assert_eq!(catch_ups[0].status, RunStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread")]
async fn catch_up_skip_ignores_missed_firings() {
    let db = TestDb::new().await;
    db.store
        .upsert_runs(&[past_firing(
            "hourly",
            Utc::now() - chrono::Duration::hours(5),
        )])
        .await
        .unwrap();
    let s = scheduler(&db, "h").await;
    s.add(
        spec("hourly", "every = \"1h\""),
        Arc::new(Sleep(Duration::from_millis(10))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.shutdown(Duration::from_secs(2)).await;
    let rows = db.runs("hourly").await;
    assert_eq!(rows.len(), 1, "only the old row: {rows:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn catch_up_once_does_nothing_for_a_job_that_never_ran() {
    let db = TestDb::new().await;
    let s = scheduler(&db, "h").await;
    s.add(
        spec("fresh", "every = \"1h\"\ncatch_up = \"once\""),
        Arc::new(Sleep(Duration::from_millis(10))),
    )
    .await
    .unwrap();
    s.start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.shutdown(Duration::from_secs(2)).await;
    assert!(db.runs("fresh").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_waits_for_runs_within_the_grace_period() {
    let db = TestDb::new().await;
    let s = scheduler(&db, "h").await;
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
    let row = db.store.run(run.run_id).await.unwrap().unwrap();
    assert_eq!(row.status, RunStatus::Succeeded);
    // No new firing is accepted once stopping.
    assert_eq!(
        s.trigger("short", false).unwrap_err(),
        TriggerError::Stopping
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_abandons_runs_still_going_after_the_grace_period() {
    let db = TestDb::new().await;
    let s = scheduler(&db, "h").await;
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
    let row = db.store.run(run.run_id).await.unwrap().unwrap();
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

#[tokio::test(flavor = "multi_thread")]
async fn manual_triggers_obey_the_overlap_policy_and_disabled_jobs_need_force() {
    let db = TestDb::new().await;
    let s = scheduler(&db, "h").await;
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
    let rows = db.runs("one").await;
    let mut statuses: Vec<RunStatus> = rows.iter().map(|r| r.status).collect();
    statuses.sort_by_key(|s| s.as_str());
    assert_eq!(
        statuses,
        vec![RunStatus::Skipped, RunStatus::Succeeded],
        "{rows:#?}"
    );
    assert!(rows.iter().all(|r| r.trigger == Trigger::Manual));
}
