//! When jobs fire and how each run is governed.
//!
//! tokio-cron-scheduler is the clock (see [`timer`]); this module adds what it lacks:
//! overlap policy, per-attempt timeouts, retries with backoff, catch-up at start-up,
//! panic isolation and the `job_runs` ledger. It never knows what a job does.

pub mod backend;
pub mod clock;
pub mod ledger;
pub mod memory;
mod run;
mod timer;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{CatchUp, JobSpec, Overlap, Scope};
use crate::jobs::Job;
use crate::store::{RunRecord, RunStatus, Trigger};
use crate::telemetry::metrics::Metrics;
pub use backend::{Backend, HeldLock};
pub use clock::{Clock, SystemClock, TokioClock};
pub use ledger::{Ledger, LedgerError};
pub use memory::MemoryBackend;
use timer::{CronTimer, Tick, Timer, TokioTimer};

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("the timer failed: {0}")]
    Timer(#[from] tokio_cron_scheduler::JobSchedulerError),
    #[error("job \"{0}\" is already scheduled")]
    Duplicate(String),
    #[error("the scheduler was already started")]
    AlreadyStarted,
}

/// Why a manual trigger did not start a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    #[error("no job named \"{0}\"")]
    UnknownJob(String),
    #[error("job \"{0}\" is disabled; force it to run anyway")]
    Disabled(String),
    #[error("job \"{job}\" forbids overlapping runs and run {running} is still going")]
    Refused { job: String, running: Uuid },
    #[error("vigil is shutting down")]
    Stopping,
    #[error("job \"{job}\" already runs {limit} time(s) at once, its max_concurrency")]
    Busy { job: String, limit: u32 },
    #[error("job \"{job}\" is paused{}; resume it, or force this run", until.map(|u| format!(" until {}", u.to_rfc3339())).unwrap_or_default())]
    Paused {
        job: String,
        until: Option<DateTime<Utc>>,
    },
}

/// How a run is invoked beyond its job's schedule.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// The input, already checked against the job kind's input schema.
    pub input: Option<Arc<serde_json::Value>>,
    /// The run's id, when the caller must know it first (an idempotency key).
    pub run_id: Option<Uuid>,
    /// Run even if the job is disabled or paused.
    pub force: bool,
}

/// What a firing carries into its run.
#[derive(Default)]
struct FireOptions {
    input: Option<Arc<serde_json::Value>>,
    run_id: Option<Uuid>,
    /// A concurrency slot taken before the run started (cluster `max_concurrency`).
    slot_lock: Option<Box<dyn HeldLock>>,
}

/// Told when runs start and end, for what watches jobs' health (alerts). Called on the
/// scheduler's own tasks: implementations hand the event on and return at once.
pub trait RunObserver: Send + Sync {
    /// A run's first attempt started.
    fn started(&self, spec: &JobSpec, run: &RunningRun);
    /// A run ended for good: after its last attempt, or refused without any.
    fn finished(&self, spec: &JobSpec, result: &RunResult);
}

/// A run in progress, as [`JobStatus`] and [`RunObserver::started`] show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunningRun {
    pub id: Uuid,
    pub trigger: Trigger,
    pub scheduled_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    #[serde(skip)]
    pub input: Option<Arc<serde_json::Value>>,
}

/// How a whole run (all its attempts) ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunResult {
    /// The first attempt's id: the id the trigger returned.
    pub run_id: Uuid,
    /// The id of the attempt that decided the outcome.
    pub last_attempt_id: Uuid,
    pub job: String,
    pub status: RunStatus,
    pub attempts: u32,
    pub items: Option<i64>,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The firing it ran for (the trigger's time for manual runs).
    pub scheduled_at: DateTime<Utc>,
    pub trigger: Trigger,
    /// What the last attempt produced for its caller (a command's stdout): JSON when
    /// it parses as JSON, else text.
    #[serde(serialize_with = "output_as_json")]
    pub output: Option<crate::jobs::RunOutput>,
}

fn output_as_json<S: serde::Serializer>(
    output: &Option<crate::jobs::RunOutput>,
    s: S,
) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&output.as_ref().map(crate::jobs::RunOutput::to_json), s)
}

/// A started run; await [`RunHandle::finished`] for its outcome.
#[derive(Debug, Clone)]
pub struct RunHandle {
    pub run_id: Uuid,
    done: watch::Receiver<Option<RunResult>>,
}

impl RunHandle {
    pub async fn finished(&mut self) -> RunResult {
        loop {
            if let Some(result) = self.done.borrow().clone() {
                return result;
            }
            if self.done.changed().await.is_err() {
                // The sender always publishes before it is dropped.
                if let Some(result) = self.done.borrow().clone() {
                    return result;
                }
            }
        }
    }

    /// The outcome if the run has finished.
    pub fn peek(&self) -> Option<RunResult> {
        self.done.borrow().clone()
    }
}

/// A job as the scheduler sees it now.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub name: String,
    pub kind: String,
    pub schedule: String,
    pub enabled: bool,
    pub overlap: String,
    pub next_fire: Option<DateTime<Utc>>,
    pub running: Vec<Uuid>,
    /// The same runs, with when they were due and started.
    #[serde(skip)]
    pub running_runs: Vec<RunningRun>,
    pub scope: Scope,
    /// When the job's current definition took effect (start-up or a reload that added
    /// or changed it); a reload leaves it alone for unchanged jobs.
    pub applied_at: DateTime<Utc>,
    /// Paused (see [`Scheduler::set_pauses`]): `Some(None)` until resumed,
    /// `Some(Some(t))` until `t`.
    pub paused: Option<Option<DateTime<Utc>>>,
    pub max_concurrency: Option<u32>,
}

/// How long shutdown tries to write the last ledger rows before spooling them.
const LEDGER_CLOSE: Duration = Duration::from_secs(10);

/// What shutdown did.
#[derive(Debug, Clone, Default)]
pub struct ShutdownReport {
    pub abandoned: usize,
    /// Every ledger row reached PostgreSQL (else the rest is spooled, or lost without
    /// a spool; both logged).
    pub ledger_flushed: bool,
}

/// What [`Scheduler::apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
}

/// Jobs that could not be built, as (job, problem); nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|(job, e)| format!("job \"{job}\": {e}")).collect::<Vec<_>>().join("; "))]
pub struct ApplyError(pub Vec<(String, String)>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelReason {
    Replaced { by: Uuid },
    Shutdown,
}

/// A run in progress, as its slot tracks it.
#[derive(Clone)]
struct Active {
    id: Uuid,
    /// The slot version that started it.
    generation: u64,
    cancel: CancellationToken,
    reason: Arc<OnceLock<CancelReason>>,
    run: RunningRun,
}

impl Active {
    fn new(id: Uuid, generation: u64, run: RunningRun) -> Self {
        Self {
            id,
            generation,
            cancel: CancellationToken::new(),
            reason: Arc::new(OnceLock::new()),
            run,
        }
    }

    fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.set(reason);
        self.cancel.cancel();
    }
}

#[derive(Default)]
struct SlotState {
    running: Vec<Active>,
    next_due: Option<DateTime<Utc>>,
    timer_id: Option<Uuid>,
}

/// One scheduled job. A changed job gets a new slot that shares the old one's state,
/// so runs of the old definition still count for the overlap policy.
struct Slot {
    spec: JobSpec,
    job: Arc<dyn Job>,
    generation: u64,
    applied_at: DateTime<Utc>,
    state: Arc<Mutex<SlotState>>,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding this lock cannot leave the state half-written (every
        // critical section is a few pushes and pops), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Inner {
    host: String,
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    timer: Box<dyn Timer>,
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    tracker: TaskTracker,
    stopping: CancellationToken,
    generation: AtomicU64,
    ticks: Mutex<Option<mpsc::UnboundedReceiver<Tick>>>,
    started: AtomicBool,
    observers: RwLock<Vec<Arc<dyn RunObserver>>>,
    /// Paused jobs and until when (`None`: until resumed); kept from PostgreSQL by
    /// whoever calls [`Scheduler::set_pauses`].
    pauses: RwLock<BTreeMap<String, Option<DateTime<Utc>>>>,
    /// Ledger records made so far: what reads of the ledger cached elsewhere compare
    /// to know they are still current for this replica's runs.
    records: AtomicU64,
    /// Changes to what [`Scheduler::jobs`] shows other than through runs: jobs added,
    /// changed or removed, pauses, next firings armed.
    changes: AtomicU64,
}

/// The scheduler. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    pub async fn new(ledger: Ledger, host: impl Into<String>) -> Result<Self, SchedulerError> {
        Self::with_metrics(ledger, host, Metrics::default()).await
    }

    /// A scheduler that records run counts, durations and lag in `metrics`: the
    /// PostgreSQL ledger, the system clock, tokio-cron-scheduler's timer.
    pub async fn with_metrics(
        ledger: Ledger,
        host: impl Into<String>,
        metrics: Metrics,
    ) -> Result<Self, SchedulerError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let timer = CronTimer::new(tx, clock.clone()).await?;
        Ok(Self::assemble(
            host.into(),
            Arc::new(ledger),
            clock,
            Box::new(timer),
            rx,
            metrics,
        ))
    }

    /// A scheduler on storage in memory and tokio's clock: governance without a
    /// database or the wall clock (under `tokio::time::pause`, runs take no real time).
    pub fn in_memory(host: impl Into<String>) -> (Self, Arc<MemoryBackend>) {
        let backend = Arc::new(MemoryBackend::new());
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
        let (tx, rx) = mpsc::unbounded_channel();
        let timer = TokioTimer::new(tx, clock.clone());
        let scheduler = Self::assemble(
            host.into(),
            backend.clone(),
            clock,
            Box::new(timer),
            rx,
            Metrics::default(),
        );
        (scheduler, backend)
    }

    fn assemble(
        host: String,
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        timer: Box<dyn Timer>,
        rx: mpsc::UnboundedReceiver<Tick>,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                host,
                backend,
                clock,
                metrics,
                timer,
                slots: RwLock::new(BTreeMap::new()),
                tracker: TaskTracker::new(),
                stopping: CancellationToken::new(),
                generation: AtomicU64::new(0),
                ticks: Mutex::new(Some(rx)),
                started: AtomicBool::new(false),
                observers: RwLock::new(Vec::new()),
                pauses: RwLock::new(BTreeMap::new()),
                records: AtomicU64::new(0),
                changes: AtomicU64::new(0),
            }),
        }
    }

    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// The paused jobs (from PostgreSQL, so every replica obeys); a firing of a
    /// paused job is recorded `skipped`, a manual run refused unless forced.
    pub fn set_pauses(&self, pauses: BTreeMap<String, Option<DateTime<Utc>>>) {
        let mut current = self.inner.pauses.write().unwrap_or_else(|p| p.into_inner());
        if *current != pauses {
            *current = pauses;
            self.inner.changes.fetch_add(1, Ordering::Release);
        }
    }

    /// How many ledger records this scheduler has made: a view of the ledger read when
    /// this was `n` is current for this replica's runs while it is still `n`.
    pub fn records_made(&self) -> u64 {
        self.inner.records.load(Ordering::Acquire)
    }

    /// How many times what [`Scheduler::jobs`] shows changed other than through runs
    /// (with [`Scheduler::records_made`]: equal counts, equal views, but for time).
    pub fn changes_made(&self) -> u64 {
        self.inner.changes.load(Ordering::Acquire)
    }

    /// Tells `observer` of every run's start and end from now on.
    pub fn observe(&self, observer: Arc<dyn RunObserver>) {
        self.inner
            .observers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(observer);
    }

    /// Waits until the ledger rows recorded so far are stored, at most `wait`.
    pub async fn flush_ledger(&self, wait: Duration) -> Result<(), LedgerError> {
        self.inner.backend.flush(wait).await
    }

    /// Stores the last ledger rows (spooling what PostgreSQL will not take within
    /// `wait`); for one-shot runs that end without [`Scheduler::shutdown`].
    pub async fn close_ledger(&self, wait: Duration) -> Result<bool, LedgerError> {
        self.inner.backend.close(wait).await
    }

    /// The time as this scheduler sees it.
    pub fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// Registers a job. Once the scheduler is started, an enabled job is armed at once.
    pub async fn add(&self, spec: JobSpec, job: Arc<dyn Job>) -> Result<(), SchedulerError> {
        if self.inner.read_slots().contains_key(&spec.name) {
            return Err(SchedulerError::Duplicate(spec.name));
        }
        self.insert(spec, job, None).await;
        Ok(())
    }

    /// Makes the scheduled set exactly `specs`: adds new jobs, unschedules removed ones
    /// (a run in progress finishes), reschedules changed ones, and leaves unchanged
    /// ones (and their timers) alone. Start-up and reload both come through here.
    /// `build` makes a job from its spec; if any build fails nothing changes.
    pub async fn apply<F>(&self, specs: Vec<JobSpec>, build: F) -> Result<ApplyReport, ApplyError>
    where
        F: Fn(&JobSpec) -> Result<Arc<dyn Job>, String>,
    {
        let current: BTreeMap<String, Arc<Slot>> = self.inner.read_slots().clone();
        let wanted: BTreeSet<String> = specs.iter().map(|s| s.name.clone()).collect();
        let mut report = ApplyReport::default();
        let mut built = Vec::new();
        let mut problems = Vec::new();
        for spec in specs {
            match current.get(&spec.name) {
                Some(slot) if slot.spec == spec => report.unchanged.push(spec.name.clone()),
                existing => match build(&spec) {
                    Ok(job) => {
                        if existing.is_some() {
                            report.changed.push(spec.name.clone());
                        } else {
                            report.added.push(spec.name.clone());
                        }
                        built.push((spec, job));
                    }
                    Err(e) => problems.push((spec.name.clone(), e)),
                },
            }
        }
        if !problems.is_empty() {
            return Err(ApplyError(problems));
        }
        for name in current.keys().filter(|n| !wanted.contains(*n)) {
            self.remove(name).await;
            report.removed.push(name.clone());
        }
        for (spec, job) in built {
            let shared = match current.get(&spec.name) {
                Some(old) => {
                    self.inner.retire(old).await;
                    Some(old.state.clone())
                }
                None => None,
            };
            self.insert(spec, job, shared).await;
        }
        Ok(report)
    }

    /// Unschedules `name`; a run in progress finishes and is recorded as usual.
    pub async fn remove(&self, name: &str) {
        let slot = self.inner.write_slots().remove(name);
        self.inner.changes.fetch_add(1, Ordering::Release);
        if let Some(slot) = slot {
            self.inner.retire(&slot).await;
        }
    }

    async fn insert(
        &self,
        spec: JobSpec,
        job: Arc<dyn Job>,
        shared: Option<Arc<Mutex<SlotState>>>,
    ) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            generation: self.inner.generation.fetch_add(1, Ordering::Relaxed),
            applied_at: self.inner.clock.now(),
            spec,
            job,
            state: shared.unwrap_or_default(),
        });
        self.inner
            .write_slots()
            .insert(slot.spec.name.clone(), slot.clone());
        self.inner.changes.fetch_add(1, Ordering::Release);
        if self.inner.started.load(Ordering::Acquire) && slot.spec.enabled {
            self.inner.arm_next(&slot, self.inner.clock.now()).await;
        }
        slot
    }

    /// Starts the clock, arms every enabled job and runs catch-ups.
    pub async fn start(&self) -> Result<(), SchedulerError> {
        let ticks = self
            .inner
            .ticks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(SchedulerError::AlreadyStarted)?;
        self.inner.timer.start().await?;
        self.inner.started.store(true, Ordering::Release);
        let inner = self.inner.clone();
        tokio::spawn(dispatch(inner, ticks));

        let now = self.inner.clock.now();
        for slot in self.inner.slot_list() {
            if !slot.spec.enabled {
                continue;
            }
            self.inner.arm_next(&slot, now).await;
            if slot.spec.catch_up == CatchUp::Once {
                self.inner.catch_up(&slot, now).await;
            }
        }
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.inner.started.load(Ordering::Acquire) && !self.inner.stopping.is_cancelled()
    }

    /// Runs a job now, under the same rules as a scheduled firing. A `cluster` job at
    /// its `max_concurrency` across replicas is found out when the run starts (and
    /// recorded `skipped`); [`Scheduler::invoke`] finds out first.
    pub fn trigger(&self, name: &str, force: bool) -> Result<RunHandle, TriggerError> {
        let slot = self.invocable(name, force)?;
        self.inner.fire(
            &slot,
            Trigger::Manual,
            self.inner.clock.now(),
            FireOptions::default(),
        )
    }

    /// Runs a job now with `invocation`'s input and id. For a `cluster` job with
    /// `max_concurrency`, a concurrency slot is taken before anything starts: past the
    /// limit, [`TriggerError::Busy`] and no run.
    pub async fn invoke(&self, name: &str, inv: Invocation) -> Result<RunHandle, TriggerError> {
        let slot = self.invocable(name, inv.force)?;
        let mut slot_lock = None;
        if let Some(limit) = slot.spec.max_concurrency
            && slot.spec.scope == Scope::Cluster
        {
            if slot.state().running.len() >= limit as usize {
                return Err(TriggerError::Busy {
                    job: name.to_owned(),
                    limit,
                });
            }
            match self.inner.concurrency_slot(&slot.spec, limit).await {
                Ok(Some(lock)) => slot_lock = Some(lock),
                Ok(None) => {
                    return Err(TriggerError::Busy {
                        job: name.to_owned(),
                        limit,
                    });
                }
                Err(e) => {
                    tracing::warn!(job = name, error = %e, "cannot take a concurrency slot");
                    return Err(TriggerError::Busy {
                        job: name.to_owned(),
                        limit,
                    });
                }
            }
        }
        self.inner.fire(
            &slot,
            Trigger::Manual,
            self.inner.clock.now(),
            FireOptions {
                input: inv.input,
                run_id: inv.run_id,
                slot_lock,
            },
        )
    }

    fn invocable(&self, name: &str, force: bool) -> Result<Arc<Slot>, TriggerError> {
        let slot = self
            .inner
            .slot(name)
            .ok_or_else(|| TriggerError::UnknownJob(name.to_owned()))?;
        if !slot.spec.enabled && !force {
            return Err(TriggerError::Disabled(name.to_owned()));
        }
        if !force && let Some(until) = self.inner.paused(name) {
            return Err(TriggerError::Paused {
                job: name.to_owned(),
                until,
            });
        }
        Ok(slot)
    }

    /// The names of the scheduled jobs, in order.
    pub fn job_names(&self) -> Vec<String> {
        self.inner.read_slots().keys().cloned().collect()
    }

    pub fn jobs(&self) -> Vec<JobStatus> {
        self.inner
            .slot_list()
            .iter()
            .map(|slot| {
                let state = slot.state();
                JobStatus {
                    name: slot.spec.name.clone(),
                    kind: slot.spec.kind.to_string(),
                    schedule: slot.spec.schedule.to_string(),
                    enabled: slot.spec.enabled,
                    overlap: format!("{:?}", slot.spec.overlap).to_lowercase(),
                    next_fire: state.next_due,
                    running: state.running.iter().map(|a| a.id).collect(),
                    running_runs: state.running.iter().map(|a| a.run.clone()).collect(),
                    scope: slot.spec.scope,
                    applied_at: slot.applied_at,
                    paused: self.inner.paused(&slot.spec.name),
                    max_concurrency: slot.spec.max_concurrency,
                }
            })
            .collect()
    }

    pub fn spec(&self, name: &str) -> Option<JobSpec> {
        self.inner.slot(name).map(|s| s.spec.clone())
    }

    /// Stops firing, waits up to `grace` for running runs, cancels the rest (recorded
    /// `abandoned`) and flushes the ledger.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let inner = &self.inner;
        inner.stopping.cancel();
        inner.timer.shutdown().await;
        inner.tracker.close();
        let mut report = ShutdownReport::default();
        if tokio::time::timeout(grace, inner.tracker.wait())
            .await
            .is_err()
        {
            for slot in inner.slot_list() {
                for active in slot.state().running.iter() {
                    active.cancel(CancelReason::Shutdown);
                    report.abandoned += 1;
                }
            }
            tracing::warn!(
                runs = report.abandoned,
                ?grace,
                "shutdown grace expired; cancelling the runs still going"
            );
            if tokio::time::timeout(run::ABORT_WAIT * 2, inner.tracker.wait())
                .await
                .is_err()
            {
                tracing::error!("some runs did not stop after cancellation");
            }
        }
        // Jobs flush what they hold (queued samples) now that no run is left.
        for slot in inner.slot_list() {
            slot.job.shutdown().await;
        }
        match inner.backend.close(LEDGER_CLOSE).await {
            Ok(all) => report.ledger_flushed = all,
            Err(e) => tracing::error!(error = %e, "run ledger not fully written at shutdown"),
        }
        report
    }
}

impl Inner {
    /// Queues a ledger row (a new one, or a run's new state).
    fn record(&self, record: RunRecord) {
        self.records.fetch_add(1, Ordering::Release);
        self.backend.record(record);
    }

    /// `Some(until)` while `job` is paused.
    fn paused(&self, job: &str) -> Option<Option<DateTime<Utc>>> {
        let now = self.clock.now();
        self.pauses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(job)
            .copied()
            .filter(|until| until.is_none_or(|u| u > now))
    }

    /// One of a cluster job's `limit` concurrency slots (advisory locks), if free.
    async fn concurrency_slot(
        &self,
        spec: &JobSpec,
        limit: u32,
    ) -> Result<Option<Box<dyn HeldLock>>, crate::store::StoreError> {
        for k in 0..limit {
            if let Some(lock) = self
                .backend
                .try_cluster_lock(&format!("{}#slot{k}", spec.name))
                .await?
            {
                return Ok(Some(lock));
            }
        }
        Ok(None)
    }

    fn observers(&self) -> Vec<Arc<dyn RunObserver>> {
        self.observers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Tells the observers a run started.
    fn notify_started(&self, spec: &JobSpec, run: &RunningRun) {
        for o in self.observers() {
            o.started(spec, run);
        }
    }

    /// Tells the observers a run ended for good.
    fn notify_finished(&self, spec: &JobSpec, result: &RunResult) {
        for o in self.observers() {
            o.finished(spec, result);
        }
    }

    fn read_slots(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops `slot`'s timer; once its runs are over, lets its job flush.
    async fn retire(self: &Arc<Self>, slot: &Arc<Slot>) {
        let timer = slot.state().timer_id.take();
        if let Some(id) = timer {
            self.timer.disarm(id).await;
        }
        let slot = slot.clone();
        self.tracker.spawn(async move {
            while slot
                .state()
                .running
                .iter()
                .any(|a| a.generation == slot.generation)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            slot.job.shutdown().await;
        });
    }

    fn write_slots(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.slots.write().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn slot_list(&self) -> Vec<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Arms the slot's next firing after `after`.
    async fn arm_next(&self, slot: &Arc<Slot>, after: DateTime<Utc>) {
        let Some(due) = slot.spec.schedule.next_after(after) else {
            tracing::warn!(job = %slot.spec.name, "schedule has no further firings");
            slot.state().next_due = None;
            return;
        };
        let at =
            due + chrono::Duration::from_std(slot.spec.jitter_on(&self.host)).unwrap_or_default();
        let tick = Tick {
            job: slot.spec.name.clone(),
            generation: slot.generation,
            due,
            at,
        };
        match self.timer.arm(tick).await {
            Ok(id) => {
                let mut state = slot.state();
                state.next_due = Some(at);
                state.timer_id = Some(id);
                self.changes.fetch_add(1, Ordering::Release);
            }
            Err(e) => tracing::error!(job = %slot.spec.name, error = %e, "cannot arm the timer"),
        }
    }

    async fn catch_up(self: &Arc<Self>, slot: &Arc<Slot>, now: DateTime<Utc>) {
        let last = match self.backend.last_firing(&slot.spec.name).await {
            Ok(Some(last)) => last,
            // Never fired: nothing can have been missed.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(job = %slot.spec.name, error = %e, "cannot read the last firing; no catch-up");
                return;
            }
        };
        if let Some(missed) = slot.spec.schedule.latest_in(last, now) {
            match self.claim(slot, missed).await {
                Claim::Won => {}
                Claim::Lost => return,
                Claim::Failed(reason) => {
                    self.record_refusal(
                        slot,
                        firing_id(&slot.spec.name, missed),
                        Trigger::CatchUp,
                        missed,
                        RunStatus::Failed,
                        reason,
                    );
                    return;
                }
            }
            tracing::info!(job = %slot.spec.name, %missed, last_firing = %last, "catching up a missed firing");
            if let Err(e) = self.fire(slot, Trigger::CatchUp, missed, FireOptions::default()) {
                tracing::info!(job = %slot.spec.name, error = %e, "catch-up not started");
            }
        }
    }

    /// Starts a run of `slot` unless its overlap policy or concurrency limit refuses;
    /// never waits.
    fn fire(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        trigger: Trigger,
        scheduled_at: DateTime<Utc>,
        options: FireOptions,
    ) -> Result<RunHandle, TriggerError> {
        if self.stopping.is_cancelled() {
            return Err(TriggerError::Stopping);
        }
        let id = options.run_id.unwrap_or_else(Uuid::now_v7);
        let active = Active::new(
            id,
            slot.generation,
            RunningRun {
                id,
                trigger,
                scheduled_at,
                started_at: self.clock.now(),
                input: options.input,
            },
        );
        {
            let mut state = slot.state();
            if let Some(limit) = slot.spec.max_concurrency
                && state.running.len() >= limit as usize
            {
                drop(state);
                self.record_refusal(
                    slot,
                    id,
                    trigger,
                    scheduled_at,
                    RunStatus::Skipped,
                    format!("max_concurrency: {limit} run(s) already going"),
                );
                return Err(TriggerError::Busy {
                    job: slot.spec.name.clone(),
                    limit,
                });
            }
            match slot.spec.overlap {
                Overlap::Forbid => {
                    if let Some(running) = state.running.first().map(|a| a.id) {
                        drop(state);
                        self.record_refusal(
                            slot,
                            id,
                            trigger,
                            scheduled_at,
                            RunStatus::Skipped,
                            format!("overlap policy forbid: run {running} was still running"),
                        );
                        return Err(TriggerError::Refused {
                            job: slot.spec.name.clone(),
                            running,
                        });
                    }
                }
                Overlap::Replace => {
                    for old in state.running.drain(..) {
                        tracing::info!(job = %slot.spec.name, run_id = %old.id, replaced_by = %id, "replacing the running run");
                        old.cancel(CancelReason::Replaced { by: id });
                    }
                }
                Overlap::Allow => {}
            }
            state.running.push(active.clone());
        }
        let (tx, rx) = watch::channel(None);
        self.tracker.spawn(run::govern(
            self.clone(),
            slot.clone(),
            run::Firing {
                id,
                trigger,
                scheduled_at,
                slot_lock: options.slot_lock,
            },
            active,
            tx,
        ));
        Ok(RunHandle {
            run_id: id,
            done: rx,
        })
    }

    /// Records a firing that never started an attempt: its one ledger row.
    fn record_refusal(
        &self,
        slot: &Slot,
        id: Uuid,
        trigger: Trigger,
        scheduled_at: DateTime<Utc>,
        status: RunStatus,
        reason: String,
    ) -> RunRecord {
        let reason = crate::config::redact(&reason).into_owned();
        let now = self.clock.now();
        if status == RunStatus::Skipped {
            tracing::info!(job = %slot.spec.name, run_id = %id, %reason, "firing skipped");
        } else {
            tracing::warn!(job = %slot.spec.name, run_id = %id, %status, %reason, "firing not run");
        }
        self.metrics
            .run_not_started(&slot.spec.name, status.as_str());
        let record = RunRecord {
            id,
            job: slot.spec.name.clone(),
            kind: slot.spec.kind.to_string(),
            trigger,
            attempt: 1,
            retry_of: None,
            scheduled_at,
            started_at: now,
            finished_at: Some(now),
            status,
            items: None,
            error: Some(reason),
            host: self.host.clone(),
            permanent: false,
            retry_after_ms: None,
            resources: None,
            input: None,
            output: None,
        };
        self.record(record.clone());
        self.notify_finished(
            &slot.spec,
            &RunResult {
                run_id: id,
                last_attempt_id: id,
                job: slot.spec.name.clone(),
                status,
                attempts: 1,
                items: None,
                error: record.error.clone(),
                started_at: now,
                finished_at: now,
                scheduled_at,
                trigger,
                output: None,
            },
        );
        record
    }

    /// For a `cluster`-scoped job: whether this replica runs the firing at
    /// `scheduled_at` (the first replica to claim it does).
    async fn claim(&self, slot: &Slot, scheduled_at: DateTime<Utc>) -> Claim {
        if slot.spec.scope != Scope::Cluster {
            return Claim::Won;
        }
        match self
            .backend
            .claim_firing(&slot.spec.name, scheduled_at, &self.host)
            .await
        {
            Ok(true) => Claim::Won,
            Ok(false) => Claim::Lost,
            Err(e) => {
                tracing::warn!(job = %slot.spec.name, %scheduled_at, error = %e, "cannot claim the firing; recording it failed");
                Claim::Failed(format!("cannot claim the firing in PostgreSQL: {e}"))
            }
        }
    }
}

/// Whether this replica runs a firing.
enum Claim {
    Won,
    /// Another replica claimed it.
    Lost,
    /// PostgreSQL could not be asked; the reason.
    Failed(String),
}

/// The ledger id of a firing that could not be claimed: the same on every replica
/// (and every build: FNV-1a, not the standard library's hasher), so however many fail
/// to claim it, its row is written once. A UUIDv7 carrying the firing's time, so it
/// sorts with the runs around it.
fn firing_id(job: &str, scheduled_at: DateTime<Utc>) -> Uuid {
    let fnv = |seed: u64| {
        let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
        for b in job
            .bytes()
            .chain(scheduled_at.timestamp_micros().to_le_bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&fnv(1).to_le_bytes());
    random[8..].copy_from_slice(&fnv(2).to_le_bytes()[..2]);
    let millis = u64::try_from(scheduled_at.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// Receives ticks from the clock: re-arms the job, then starts the run on its instant.
async fn dispatch(inner: Arc<Inner>, mut ticks: mpsc::UnboundedReceiver<Tick>) {
    loop {
        let tick = tokio::select! {
            () = inner.stopping.cancelled() => return,
            tick = ticks.recv() => match tick {
                Some(t) => t,
                None => return,
            },
        };
        let Some(slot) = inner.slot(&tick.job) else {
            continue;
        };
        if slot.generation != tick.generation || !slot.spec.enabled {
            continue;
        }
        // Re-arm from the later of the due time and now: after a long stall (suspend,
        // clock jump) the missed firings collapse into this one instead of a burst.
        let next_after = tick.due.max(inner.clock.now());
        let inner2 = inner.clone();
        inner.tracker.spawn(async move {
            let wait = (tick.at - inner2.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                () = inner2.stopping.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            // Removed or redefined by a reload while this firing waited for its instant.
            if inner2
                .slot(&slot.spec.name)
                .is_none_or(|s| s.generation != slot.generation)
            {
                return;
            }
            // Armed only now, so a job waits for one firing at a time: a firing within
            // the timer's lead is announced at once and would otherwise arm the next,
            // and that the next, up to the lead ahead.
            inner2.arm_next(&slot, next_after).await;
            match inner2.claim(&slot, tick.due).await {
                Claim::Won => {}
                Claim::Lost => return,
                Claim::Failed(reason) => {
                    // Every replica that fails to claim writes this row under the
                    // same id, so the firing still has exactly one.
                    inner2.record_refusal(
                        &slot,
                        firing_id(&slot.spec.name, tick.due),
                        Trigger::Schedule,
                        tick.due,
                        RunStatus::Failed,
                        reason,
                    );
                    return;
                }
            }
            let lag = (inner2.clock.now() - tick.at)
                .to_std()
                .unwrap_or(Duration::ZERO);
            inner2.metrics.lag(&slot.spec.name, lag);
            // Past the claim, this replica alone records the firing (every replica, for
            // host-scoped jobs, each its own row).
            if let Some(until) = inner2.paused(&slot.spec.name) {
                inner2.record_refusal(
                    &slot,
                    Uuid::now_v7(),
                    Trigger::Schedule,
                    tick.due,
                    RunStatus::Skipped,
                    match until {
                        Some(u) => format!("paused until {}", u.to_rfc3339()),
                        None => "paused".to_owned(),
                    },
                );
                return;
            }
            let mut options = FireOptions::default();
            if let Some(limit) = slot.spec.max_concurrency
                && slot.spec.scope == Scope::Cluster
            {
                match inner2.concurrency_slot(&slot.spec, limit).await {
                    Ok(Some(lock)) => options.slot_lock = Some(lock),
                    Ok(None) => {
                        inner2.record_refusal(
                            &slot,
                            Uuid::now_v7(),
                            Trigger::Schedule,
                            tick.due,
                            RunStatus::Skipped,
                            format!(
                                "max_concurrency: {limit} run(s) already going across replicas"
                            ),
                        );
                        return;
                    }
                    Err(e) => {
                        inner2.record_refusal(
                            &slot,
                            Uuid::now_v7(),
                            Trigger::Schedule,
                            tick.due,
                            RunStatus::Failed,
                            format!("cannot take a concurrency slot in PostgreSQL: {e}"),
                        );
                        return;
                    }
                }
            }
            // Other refusals are recorded and logged by `fire`; a shutdown that began
            // after this firing was claimed leaves it unrun, which its row says.
            if let Err(TriggerError::Stopping) =
                inner2.fire(&slot, Trigger::Schedule, tick.due, options)
            {
                inner2.record_refusal(
                    &slot,
                    Uuid::now_v7(),
                    Trigger::Schedule,
                    tick.due,
                    RunStatus::Skipped,
                    "vigil was shutting down when the firing came".to_owned(),
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobError, RunContext, RunOutcome};

    struct Quick;

    #[async_trait::async_trait]
    impl Job for Quick {
        async fn run(&self, _ctx: RunContext) -> Result<RunOutcome, JobError> {
            Ok(RunOutcome::Completed { items: None })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_waits_for_one_firing_at_a_time_however_close_its_firings() {
        let text = "[[jobs]]\nname = \"fast\"\nkind = \"command\"\nevery = \"1s\"\n\
                    [jobs.settings]\ncommand = [\"true\"]\n";
        let spec = crate::config::parse_jobs(
            std::path::Path::new("t.toml"),
            text,
            &crate::jobs::Registry::builtin(),
        )
        .unwrap()
        .jobs
        .remove(0);
        let (sched, _db) = Scheduler::in_memory("h");
        sched.add(spec, Arc::new(Quick)).await.unwrap();
        sched.start().await.unwrap();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The next firing waiting for its instant, and at most one run.
            assert!(
                sched.inner.tracker.len() <= 2,
                "{} tasks for a job every second",
                sched.inner.tracker.len()
            );
        }
        assert!(sched.records_made() >= 9, "{} runs", sched.records_made());
        sched.shutdown(Duration::from_secs(1)).await;
    }

    #[test]
    fn an_unclaimed_firing_has_one_id_everywhere_carrying_its_time() {
        let at = DateTime::parse_from_rfc3339("2026-11-29T03:15:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let a = firing_id("nightly", at);
        assert_eq!(a, firing_id("nightly", at), "same job, same instant");
        assert_ne!(a, firing_id("nightly", at + chrono::Duration::seconds(1)));
        assert_ne!(a, firing_id("hourly", at));
        assert_eq!(a.get_version_num(), 7);
        let (secs, _) = a.get_timestamp().unwrap().to_unix();
        assert_eq!(secs as i64, at.timestamp());
        // Pinned: replicas on other builds must agree.
        assert_eq!(a.to_string(), "01a2254c-7f20-74c5-b2b3-3810193e8140");
    }
}
