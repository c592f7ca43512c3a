//! One governed run: attempts, timeout, retries with backoff, panic isolation and the
//! ledger rows that record each attempt.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tracing::Instrument as _;
use uuid::Uuid;

use super::{Active, CancelReason, Inner, RunResult, Slot};
use crate::config::{Overlap, Scope};
use crate::jobs::{JobError, RunContext, RunOutcome};
use crate::store::{RunRecord, RunStatus, Trigger};

/// How long to wait for a cancelled attempt to actually stop.
pub(super) const ABORT_WAIT: Duration = Duration::from_secs(5);

pub(super) struct Firing {
    pub id: Uuid,
    pub trigger: Trigger,
    pub scheduled_at: DateTime<Utc>,
    /// A `max_concurrency` slot already taken for this run.
    pub slot_lock: Option<Box<dyn super::HeldLock>>,
}

/// How one attempt ended.
struct Ended {
    status: RunStatus,
    items: Option<i64>,
    error: Option<String>,
    /// Cancelled from outside: never retried.
    cancelled: bool,
    /// The job said trying again cannot help: never retried.
    permanent: bool,
    /// The pause the job asked for before the next attempt.
    retry_after: Option<Duration>,
    /// What the attempt produced for its caller.
    output: Option<crate::jobs::RunOutput>,
    /// What the attempt used, where the job measured it.
    resources: Option<crate::jobs::RunResources>,
}

impl Ended {
    fn new(status: RunStatus, error: Option<String>) -> Self {
        Self {
            status,
            items: None,
            error,
            cancelled: false,
            permanent: false,
            retry_after: None,
            output: None,
            resources: None,
        }
    }
}

pub(super) async fn govern(
    inner: Arc<Inner>,
    slot: Arc<Slot>,
    mut firing: Firing,
    active: Active,
    done: watch::Sender<Option<RunResult>>,
) {
    let spec = &slot.spec;
    let first_started = inner.clock.now();
    // A cluster-scoped job runs on one replica at a time: hold its lock for the whole
    // run (all attempts). `allow` opts out; `replace` cannot cancel another replica's
    // run, so it waits its turn like `forbid`. With `max_concurrency`, one of that many
    // slots is held instead.
    let mut cluster_lock = firing.slot_lock.take();
    let concurrency = spec
        .max_concurrency
        .filter(|_| spec.scope == Scope::Cluster);
    if cluster_lock.is_none()
        && spec.scope == Scope::Cluster
        && (spec.overlap != Overlap::Allow || concurrency.is_some())
    {
        // Bounded by the store's call bound, and given up when the run is cancelled
        // (a shutdown past its grace period, a replacement).
        let outcome = tokio::select! {
            r = async {
                match concurrency {
                    Some(limit) => inner.concurrency_slot(spec, limit).await,
                    None => acquire_cluster_lock(&inner, spec).await,
                }
            } => Some(r),
            () = active.cancel.cancelled() => None,
        };
        match outcome {
            Some(Ok(Some(lock))) => cluster_lock = Some(lock),
            outcome => {
                let (status, reason) = match outcome {
                    Some(Err(e)) => (
                        RunStatus::Failed,
                        format!("cannot take the job's cluster lock: {e}"),
                    ),
                    None => (
                        RunStatus::Skipped,
                        "cancelled while waiting for the job's cluster lock".to_owned(),
                    ),
                    _ => (
                        RunStatus::Skipped,
                        match concurrency {
                            Some(limit) => format!(
                                "max_concurrency: {limit} run(s) already going across replicas"
                            ),
                            None => "another replica is running this job".to_owned(),
                        },
                    ),
                };
                let row = inner.record_refusal(
                    &slot,
                    firing.id,
                    firing.trigger,
                    firing.scheduled_at,
                    status,
                    reason,
                );
                // `record_refusal` told the observers.
                slot.state().running.retain(|a| a.id != firing.id);
                done.send_replace(Some(RunResult {
                    run_id: firing.id,
                    last_attempt_id: firing.id,
                    job: spec.name.clone(),
                    status,
                    attempts: 1,
                    items: None,
                    error: row.error,
                    started_at: row.started_at,
                    finished_at: row.started_at,
                    scheduled_at: firing.scheduled_at,
                    trigger: firing.trigger,
                    output: None,
                }));
                return;
            }
        }
    }
    let mut attempt = 1u32;
    let mut id = firing.id;
    let result = loop {
        let mut record = RunRecord {
            id,
            job: spec.name.clone(),
            kind: spec.kind.to_string(),
            trigger: if attempt == 1 {
                firing.trigger
            } else {
                Trigger::Retry
            },
            attempt,
            retry_of: (attempt > 1).then_some(firing.id),
            scheduled_at: firing.scheduled_at,
            started_at: inner.clock.now(),
            finished_at: None,
            status: RunStatus::Running,
            items: None,
            error: None,
            host: inner.host.clone(),
            permanent: false,
            retry_after_ms: None,
            input: active.run.input.as_deref().cloned(),
            output: None,
            resources: None,
        };
        inner.record(record.clone());
        if attempt == 1 {
            inner.notify_started(spec, &active.run);
        }

        let span = tracing::info_span!(
            "run",
            job = %spec.name,
            run_id = %id,
            attempt,
            trigger = %record.trigger,
        );
        let ended = attempt_once(&slot, id, record.trigger, &active, span.clone()).await;
        record.finished_at = Some(inner.clock.now());
        record.output = ended.output.clone();
        record.resources = ended.resources.clone();
        record.status = ended.status;
        record.items = ended.items;
        record.error = ended.error.clone();
        record.permanent = ended.permanent;
        record.retry_after_ms = ended
            .retry_after
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        inner.record(record.clone());
        let duration = (record.finished_at.unwrap_or(record.started_at) - record.started_at)
            .to_std()
            .unwrap_or_default();
        let duration_ms = duration.as_millis() as u64;
        inner
            .metrics
            .run_finished(&spec.name, ended.status.as_str(), duration, ended.items);
        if let Some(r) = &ended.resources {
            inner.metrics.run_resources(
                &spec.name,
                r.cpu_user_s + r.cpu_system_s,
                r.peak_rss_bytes,
                r.read_bytes,
                r.written_bytes,
            );
        }
        span.in_scope(|| match ended.status {
            RunStatus::Succeeded | RunStatus::Skipped => tracing::info!(
                status = %ended.status, items = ended.items, duration_ms, "run finished"
            ),
            _ => tracing::warn!(
                status = %ended.status, error = ended.error.as_deref().unwrap_or(""), duration_ms, "run did not succeed"
            ),
        });

        let retryable = matches!(ended.status, RunStatus::Failed | RunStatus::TimedOut)
            && !ended.cancelled
            && !ended.permanent
            && attempt < spec.retries.max_attempts;
        if ended.permanent && attempt < spec.retries.max_attempts {
            span.in_scope(|| tracing::info!("permanent failure: not retried"));
        }
        if retryable {
            let pause = ended
                .retry_after
                .unwrap_or_else(|| spec.retries.backoff_before(attempt + 1));
            span.in_scope(|| tracing::info!(next_attempt = attempt + 1, ?pause, "will retry"));
            let keep_going = tokio::select! {
                () = tokio::time::sleep(pause) => true,
                () = active.cancel.cancelled() => false,
                () = inner.stopping.cancelled() => false,
            };
            if keep_going {
                attempt += 1;
                id = Uuid::now_v7();
                continue;
            }
        }
        break RunResult {
            run_id: firing.id,
            last_attempt_id: id,
            job: spec.name.clone(),
            status: ended.status,
            attempts: attempt,
            items: ended.items,
            error: ended.error,
            started_at: first_started,
            finished_at: record.finished_at.unwrap_or_else(|| inner.clock.now()),
            scheduled_at: firing.scheduled_at,
            trigger: firing.trigger,
            output: ended.output,
        };
    };
    if let Some(lock) = cluster_lock {
        lock.release().await;
    }
    slot.state().running.retain(|a| a.id != firing.id);
    inner.notify_finished(spec, &result);
    done.send_replace(Some(result));
}

/// The cluster lock; under `replace` the run it replaced needs a moment to stop and
/// let go, so keep trying that long.
async fn acquire_cluster_lock(
    inner: &Inner,
    spec: &crate::config::JobSpec,
) -> Result<Option<Box<dyn super::HeldLock>>, crate::store::StoreError> {
    let patience = if spec.overlap == Overlap::Replace {
        ABORT_WAIT + Duration::from_secs(1)
    } else {
        Duration::ZERO
    };
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(lock) = inner.backend.try_cluster_lock(&spec.name).await? {
            return Ok(Some(lock));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the job once in its own task, so a panic is caught and a hang is cut off.
async fn attempt_once(
    slot: &Slot,
    id: Uuid,
    trigger: Trigger,
    active: &Active,
    span: tracing::Span,
) -> Ended {
    let timeout = slot.spec.timeout;
    let mut ctx = RunContext::new(
        &slot.spec.name,
        id,
        trigger,
        tokio::time::Instant::now() + timeout,
    );
    ctx.input = active.run.input.clone();
    // The run's first trigger says who asked: a manual run (API, CLI) keeps its output.
    ctx.output = crate::jobs::OutputSink::new(active.run.trigger == Trigger::Manual);
    let output = ctx.output.clone();
    let resources = ctx.resources.clone();
    let job = slot.job.clone();
    let mut handle = tokio::spawn(async move { job.run(ctx).await }.instrument(span));

    enum Stop {
        Joined(Result<Result<RunOutcome, JobError>, tokio::task::JoinError>),
        TimedOut,
        Cancelled,
    }
    let stop = tokio::select! {
        joined = &mut handle => Stop::Joined(joined),
        () = tokio::time::sleep(timeout) => Stop::TimedOut,
        () = active.cancel.cancelled() => Stop::Cancelled,
    };
    if !matches!(stop, Stop::Joined(_)) {
        handle.abort();
        // Dropping the future is what stops the work (and kills child processes).
        if tokio::time::timeout(ABORT_WAIT, &mut handle).await.is_err() {
            tracing::error!(job = %slot.spec.name, run_id = %id, "cancelled run is blocked and did not stop");
        }
    }

    let mut ended = match stop {
        Stop::Joined(Ok(Ok(RunOutcome::Completed { items }))) => Ended {
            items: items.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
            ..Ended::new(RunStatus::Succeeded, None)
        },
        Stop::Joined(Ok(Ok(RunOutcome::Skipped { reason }))) => {
            Ended::new(RunStatus::Skipped, Some(reason))
        }
        Stop::Joined(Ok(Err(e))) => Ended {
            permanent: e.is_permanent(),
            retry_after: e.retry_after(),
            // What a job says reaches the ledger and the API: no secret in it.
            ..Ended::new(
                RunStatus::Failed,
                Some(crate::config::redact(&e.to_string()).into_owned()),
            )
        },
        Stop::Joined(Err(join)) => Ended::new(
            RunStatus::Failed,
            Some(match join.try_into_panic() {
                Ok(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
                Err(_) => "the run's task was cancelled".to_owned(),
            }),
        ),
        Stop::TimedOut => Ended::new(
            RunStatus::TimedOut,
            Some(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
        ),
        Stop::Cancelled => match active.reason.get().copied() {
            Some(CancelReason::Replaced { by }) => Ended {
                cancelled: true,
                ..Ended::new(
                    RunStatus::Failed,
                    Some(format!("cancelled: replaced by run {by}")),
                )
            },
            Some(CancelReason::Shutdown) | None => Ended {
                cancelled: true,
                ..Ended::new(
                    RunStatus::Abandoned,
                    Some("vigil shut down before the run finished".to_owned()),
                )
            },
        },
    };
    ended.output = output.take();
    ended.resources = resources.take();
    ended
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a non-string panic payload)".to_owned()
    }
}
