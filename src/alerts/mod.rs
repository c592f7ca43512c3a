//! Job health: incidents when a job fails (after its retries), has not succeeded for
//! too long (staleness: whatever the reason, vigil down included), or runs late; each
//! opened once, notified once and resolved once across replicas, and delivered through
//! a PostgreSQL outbox that retries with backoff and never holds up a run.
//!
//! The scheduler tells [`Alerts`] of every run's start and end ([`RunObserver`]); the
//! events are handled on a task of their own, in order. An evaluator looks at every
//! job each second for staleness and stuck runs, and keeps the health metrics. A
//! deliverer on every replica takes due deliveries from the outbox under a lease.
//! Who opens or resolves an incident is decided in PostgreSQL (a unique index on open
//! incidents, and a per-job advisory lock), never by which replica saw what first.

pub mod callbacks;
pub mod notify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{AlertOn, Environment, JobSpec, Notifier, Scope};
use crate::scheduler::{JobStatus, RunObserver, RunResult, RunningRun, Scheduler};
use crate::store::alerts::{
    Attempt, FinalOutcome, Incident, JobHealthRow, NewIncident, OpenIf, Pending,
};
use crate::store::{RunStatus, Store, StoreError};
use crate::telemetry::metrics::Metrics;

/// How often staleness, stuck runs and the health metrics are looked at.
pub const EVALUATE_EVERY: Duration = Duration::from_secs(1);
/// How often the outbox is polled when nothing woke the deliverer. Deliveries this
/// replica queues, and its retries, wake it at their time; the poll only finds those a
/// replica that stopped left behind (their lease, at least 30 s, runs out first), so a
/// one-second poll would be a statement a second for nothing.
pub const POLL_EVERY: Duration = Duration::from_secs(15);
/// Deliveries in flight at once on one replica.
const DELIVERY_CONCURRENCY: usize = 8;
/// Deliveries leased per poll.
const LEASE_BATCH: i64 = 16;
/// Pause before the second attempt; it doubles each time up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// After this long undelivered, a delivery is given up (recorded, counted, logged).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// A heartbeat call's bound, and how many times it is tried.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT_TRIES: u32 = 2;
/// Pause after PostgreSQL refused an event, doubling up to 30 s; the event waits.
const EVENT_RETRY: Duration = Duration::from_millis(500);
/// How long shutdown lets queued events reach PostgreSQL.
const DRAIN: Duration = Duration::from_secs(5);

/// A job's health as the API and `/metrics` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Ok,
    Failing,
    Stale,
    Late,
    Unknown,
}

impl Health {
    pub const ALL: [Health; 5] = [
        Health::Ok,
        Health::Failing,
        Health::Stale,
        Health::Late,
        Health::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Failing => "failing",
            Health::Stale => "stale",
            Health::Late => "late",
            Health::Unknown => "unknown",
        }
    }
}

/// One job's health, with what it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct JobHealth {
    pub health: Health,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_status: Option<String>,
    /// Open incidents' ids by kind.
    pub open_incidents: Vec<Uuid>,
}

/// The scope an incident or health row is kept under: one for a cluster job, one per
/// replica for a host job.
pub fn scope_key<'a>(spec: &JobSpec, host: &'a str) -> &'a str {
    match spec.scope {
        Scope::Cluster => "",
        Scope::Host => host,
    }
}

fn alert_on(status: RunStatus) -> Option<AlertOn> {
    match status {
        RunStatus::Failed => Some(AlertOn::Failed),
        RunStatus::TimedOut => Some(AlertOn::TimedOut),
        RunStatus::Abandoned => Some(AlertOn::Abandoned),
        RunStatus::Skipped => Some(AlertOn::Skipped),
        RunStatus::Running | RunStatus::Succeeded => None,
    }
}

enum Event {
    Started(Box<JobSpec>, RunningRun),
    Finished(Box<JobSpec>, RunResult),
}

struct Inner {
    store: Store,
    scheduler: Scheduler,
    host: String,
    metrics: Metrics,
    notifiers: RwLock<BTreeMap<String, Notifier>>,
    /// What `command` notifiers get of vigil's environment (the allowlist).
    program_env: Vec<(String, String)>,
    http: reqwest::Client,
    events: mpsc::UnboundedSender<Event>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    wake_deliverer: Arc<Notify>,
    /// Per job: when staleness counts from if it never succeeded (its first firing
    /// after this vigil started, or after the job's definition changed).
    first_due: Mutex<HashMap<String, (String, DateTime<Utc>)>>,
    /// Jobs whose `job_health` was looked for in the ledger already.
    seeded: Mutex<HashSet<String>>,
    /// Job labels the health metrics carry now, to drop those of removed jobs.
    labelled: Mutex<HashSet<String>>,
    /// What health was last judged on: the API answers from it while it is fresh,
    /// instead of two queries a request. Dropped whenever this replica changes it.
    snapshot: Mutex<Option<Snapshot>>,
    /// Bumped whenever the snapshot is taken or dropped: health may have changed.
    snapshots: std::sync::atomic::AtomicU64,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// `job_health` and the open incidents as read at `at`.
struct Snapshot {
    at: Instant,
    rows: Vec<JobHealthRow>,
    open: Vec<Incident>,
}

/// How long the API may answer from a snapshot: what another replica changed shows
/// within this; what this one changed, at once (its writes drop the snapshot).
const SNAPSHOT_FOR: Duration = Duration::from_millis(1500);

impl Inner {
    fn keep_snapshot(&self, rows: &[JobHealthRow], open: &[Incident]) {
        self.snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Snapshot {
            at: Instant::now(),
            rows: rows.to_vec(),
            open: open.to_vec(),
        });
    }

    /// This replica recorded `o` and resolved `resolved`: the snapshot follows, as
    /// `record_outcome` changed the tables, without reading them again.
    /// `false`: there was no snapshot to follow (an incident opened since it was read).
    fn snapshot_outcome(&self, o: &FinalOutcome<'_>, resolved: &[Incident]) -> bool {
        self.snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let mut guard = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = guard.as_mut() else {
            return false;
        };
        let success = o.status == RunStatus::Succeeded;
        match s
            .rows
            .iter_mut()
            .find(|r| r.job == o.job && r.scope_key == o.scope_key)
        {
            Some(r) if r.last_finished_at <= o.finished_at => {
                r.last_run_id = o.run_id;
                r.last_status = o.status.as_str().to_owned();
                r.last_finished_at = o.finished_at;
                if success {
                    r.last_success_at = Some(o.finished_at);
                    r.last_success_run = Some(o.run_id);
                }
            }
            Some(_) => {}
            None => s.rows.push(JobHealthRow {
                job: o.job.to_owned(),
                scope_key: o.scope_key.to_owned(),
                last_run_id: o.run_id,
                last_status: o.status.as_str().to_owned(),
                last_finished_at: o.finished_at,
                last_success_at: success.then_some(o.finished_at),
                last_success_run: success.then_some(o.run_id),
            }),
        }
        s.open.retain(|i| !resolved.iter().any(|r| r.id == i.id));
        true
    }

    /// The health gauges from the snapshot (nothing when there is none yet).
    fn publish_from_snapshot(&self) {
        let (rows, open) = {
            let guard = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
            let Some(s) = guard.as_ref() else {
                return;
            };
            (s.rows.clone(), s.open.clone())
        };
        let specs: Vec<(JobStatus, JobSpec)> = self
            .scheduler
            .jobs()
            .into_iter()
            .filter_map(|j| self.scheduler.spec(&j.name).map(|s| (j, s)))
            .collect();
        publish_metrics(self, &specs, &rows, &open, self.scheduler.now());
    }

    fn drop_snapshot(&self) {
        self.snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// `job_health` and the open incidents: from the snapshot while fresh, else read.
    async fn health_inputs(&self) -> Result<(Vec<JobHealthRow>, Vec<Incident>), StoreError> {
        if let Some(s) = self
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|s| s.at.elapsed() < SNAPSHOT_FOR)
        {
            return Ok((s.rows.clone(), s.open.clone()));
        }
        let rows = self.store.job_health().await?;
        let open = self.store.open_incidents().await?;
        self.keep_snapshot(&rows, &open);
        Ok((rows, open))
    }
}

/// Job health and alerting. Cheap to clone.
#[derive(Clone)]
pub struct Alerts {
    inner: Arc<Inner>,
}

impl Alerts {
    pub fn new(
        store: Store,
        scheduler: Scheduler,
        metrics: Metrics,
        notifiers: BTreeMap<String, Notifier>,
        env: &Environment,
    ) -> Self {
        // reqwest uses the process's rustls provider (see telemetry::loki).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("vigil/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(Inner {
                host: scheduler.host().to_owned(),
                store,
                scheduler,
                metrics,
                notifiers: RwLock::new(notifiers),
                program_env: env.for_programs(false),
                http,
                events: tx,
                receiver: Mutex::new(Some(rx)),
                wake_deliverer: Arc::new(Notify::new()),
                first_due: Mutex::new(HashMap::new()),
                seeded: Mutex::new(HashSet::new()),
                snapshot: Mutex::new(None),
                snapshots: std::sync::atomic::AtomicU64::new(0),
                labelled: Mutex::new(HashSet::new()),
                stop: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Starts handling events, evaluating and delivering; registers with the
    /// scheduler. Call once.
    pub fn start(&self) {
        let Some(rx) = self
            .inner
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        self.inner.scheduler.observe(Arc::new(self.clone()));
        let inner = self.inner.clone();
        self.inner.tasks.spawn(handle_events(inner, rx));
        let inner = self.inner.clone();
        self.inner.tasks.spawn(evaluate_loop(inner));
        let inner = self.inner.clone();
        self.inner.tasks.spawn(deliver_loop(inner));
    }

    /// The notifiers of a reloaded jobs file.
    pub fn set_notifiers(&self, notifiers: BTreeMap<String, Notifier>) {
        *self
            .inner
            .notifiers
            .write()
            .unwrap_or_else(|p| p.into_inner()) = notifiers;
    }

    /// Stops evaluating and delivering; events already queued get [`DRAIN`] to reach
    /// PostgreSQL.
    pub async fn stop(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(DRAIN + Duration::from_secs(1), self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("alerting did not stop in time");
        }
    }

    /// Changes whenever what health is judged on may have: equal counts, equal health
    /// (but for time).
    pub fn version(&self) -> u64 {
        self.inner
            .snapshots
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Every job's health now (host-scoped jobs: on this replica).
    pub async fn health(&self) -> Result<BTreeMap<String, JobHealth>, StoreError> {
        let jobs = self.inner.scheduler.jobs();
        let (rows, open) = self.inner.health_inputs().await?;
        let now = self.inner.scheduler.now();
        Ok(jobs
            .iter()
            .filter_map(|j| {
                let spec = self.inner.scheduler.spec(&j.name)?;
                Some((
                    j.name.clone(),
                    judge(&spec, j, &self.inner.host, &rows, &open, now),
                ))
            })
            .collect())
    }
}

impl RunObserver for Alerts {
    fn started(&self, spec: &JobSpec, run: &RunningRun) {
        if spec.alert.as_ref().is_some_and(|r| r.late_after.is_some()) {
            let _ = self
                .inner
                .events
                .send(Event::Started(Box::new(spec.clone()), run.clone()));
        }
    }

    fn finished(&self, spec: &JobSpec, result: &RunResult) {
        let _ = self
            .inner
            .events
            .send(Event::Finished(Box::new(spec.clone()), result.clone()));
    }
}

/// Health from the job's state, its `job_health` row and its open incidents.
fn judge(
    spec: &JobSpec,
    status: &JobStatus,
    host: &str,
    rows: &[JobHealthRow],
    open: &[Incident],
    now: DateTime<Utc>,
) -> JobHealth {
    let scope = scope_key(spec, host);
    let row = rows
        .iter()
        .find(|r| r.job == spec.name && r.scope_key == scope);
    let mine: Vec<&Incident> = open
        .iter()
        .filter(|i| i.job == spec.name && i.scope_key == scope)
        .collect();
    let has = |kind: &str| mine.iter().any(|i| i.kind == kind);
    let running_late = spec
        .alert
        .as_ref()
        .and_then(|r| r.late_after)
        .is_some_and(|late| {
            status
                .running_runs
                .iter()
                .any(|r| elapsed(r.scheduled_at, now) > late)
        });
    let health = if has("late") || running_late {
        Health::Late
    } else if has("failed") {
        Health::Failing
    } else if has("stale") {
        Health::Stale
    } else {
        match row.map(|r| r.last_status.as_str()) {
            Some("succeeded") => Health::Ok,
            Some("failed" | "timed_out" | "abandoned") => Health::Failing,
            Some(_) if row.is_some_and(|r| r.last_success_at.is_some()) => Health::Ok,
            _ => Health::Unknown,
        }
    };
    JobHealth {
        health,
        last_success_at: row.and_then(|r| r.last_success_at),
        last_status: row.map(|r| r.last_status.clone()),
        open_incidents: mine.iter().map(|i| i.id).collect(),
    }
}

fn elapsed(since: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - since).to_std().unwrap_or(Duration::ZERO)
}

/// The JSON every notifier gets (Slack's is made from it).
fn payload(
    event: &str,
    inc: &Incident,
    run: Option<Value>,
    last_success_at: Option<DateTime<Utc>>,
    host: &str,
) -> Value {
    json!({
        "version": 1,
        "event": event,
        "incident": {
            "id": inc.id,
            "kind": inc.kind,
            "job": inc.job,
            "scope": inc.scope_key,
            "opened_at": inc.opened_at,
            "resolved_at": inc.resolved_at,
            "summary": inc.summary,
        },
        "job": inc.job,
        "run": run,
        "last_success_at": last_success_at,
        "sent_by": host,
    })
}

fn run_json(result: &RunResult, host: &str) -> Value {
    json!({
        "id": result.run_id,
        "status": result.status,
        "error": result.error,
        "attempts": result.attempts,
        "trigger": result.trigger,
        "scheduled_at": result.scheduled_at,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "host": host,
    })
}

/// Handles run events in order; one PostgreSQL refusal makes the event wait and be
/// tried again, so none is lost to an outage.
async fn handle_events(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Event>) {
    let mut draining: Option<tokio::time::Instant> = None;
    loop {
        let event = if let Some(deadline) = draining {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => e,
                _ => return,
            }
        } else {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
                () = inner.stop.cancelled() => {
                    draining = Some(tokio::time::Instant::now() + DRAIN);
                    rx.close();
                    continue;
                }
            }
        };
        let mut pause = EVENT_RETRY;
        loop {
            let done = match &event {
                Event::Started(spec, run) => on_started(&inner, spec, run).await,
                Event::Finished(spec, result) => on_finished(&inner, spec, result).await,
            };
            match done {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, ?pause, "cannot record a run's outcome for job health; trying again");
                    let give_up = draining.is_some_and(|d| tokio::time::Instant::now() >= d);
                    if give_up {
                        tracing::error!(error = %e, "job health: an event is lost at shutdown");
                        break;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

async fn on_started(inner: &Inner, spec: &JobSpec, run: &RunningRun) -> Result<(), StoreError> {
    let Some(late) = spec.alert.as_ref().and_then(|r| r.late_after) else {
        return Ok(());
    };
    let delay = elapsed(run.scheduled_at, run.started_at);
    if delay <= late {
        return Ok(());
    }
    let summary = format!(
        "run {} started {} after its scheduled time {} (late after {})",
        run.id,
        humantime::format_duration(round_ms(delay)),
        run.scheduled_at.to_rfc3339(),
        humantime::format_duration(late)
    );
    open(
        inner,
        spec,
        "late",
        Some(run.id),
        summary,
        json!({ "run_id": run.id, "scheduled_at": run.scheduled_at, "started_at": run.started_at }),
        OpenIf::Always,
        None,
    )
    .await
}

async fn on_finished(inner: &Inner, spec: &JobSpec, result: &RunResult) -> Result<(), StoreError> {
    let scope = scope_key(spec, &inner.host);
    let outcome = FinalOutcome {
        job: &spec.name,
        scope_key: scope,
        run_id: result.run_id,
        status: result.status,
        finished_at: result.finished_at,
    };
    let run = run_json(result, &inner.host);
    let host = inner.host.clone();
    let resolved = inner
        .store
        .record_outcome(&outcome, &inner.host, |inc| {
            payload(
                "resolved",
                inc,
                Some(run.clone()),
                Some(result.finished_at),
                &host,
            )
        })
        .await?;
    if !inner.snapshot_outcome(&outcome, &resolved) {
        // Read it again (after an incident opened): the gauges must not lag a run.
        inner.health_inputs().await?;
    }
    inner.publish_from_snapshot();
    for inc in &resolved {
        tracing::info!(job = %spec.name, incident = %inc.id, kind = %inc.kind, run_id = %result.run_id, "incident resolved");
    }
    if resolved.iter().any(|i| !i.notify.is_empty()) {
        inner.wake_deliverer.notify_one();
    }
    if let Some(rule) = &spec.alert
        && alert_on(result.status).is_some_and(|s| rule.on.contains(&s))
    {
        let error = result.error.as_deref().unwrap_or("");
        let summary = format!(
            "{} after {} attempt{}{}{}",
            result.status,
            result.attempts,
            if result.attempts == 1 { "" } else { "s" },
            if error.is_empty() { "" } else { ": " },
            error
        );
        open(
            inner,
            spec,
            "failed",
            Some(result.run_id),
            summary,
            json!({ "status": result.status, "error": result.error, "attempts": result.attempts }),
            OpenIf::Always,
            Some(run),
        )
        .await?;
    }
    if let Some(hb) = &spec.heartbeat {
        let url = match result.status {
            RunStatus::Succeeded => hb.url.clone(),
            RunStatus::Failed | RunStatus::TimedOut | RunStatus::Abandoned => hb.fail_url.clone(),
            RunStatus::Skipped | RunStatus::Running => None,
        };
        if let Some(url) = url {
            let http = inner.http.clone();
            let metrics = inner.metrics.clone();
            let job = spec.name.clone();
            // Never in the way of the next event, nor of a run.
            inner.tasks.spawn(async move {
                let mut outcome = Err(String::new());
                for _ in 0..HEARTBEAT_TRIES {
                    outcome = notify::ping(&http, url.expose(), HEARTBEAT_TIMEOUT).await;
                    if outcome.is_ok() {
                        break;
                    }
                }
                match &outcome {
                    Ok(()) => metrics.heartbeat(&job, "sent"),
                    Err(e) => {
                        metrics.heartbeat(&job, "failed");
                        tracing::warn!(job = %job, error = %e, "heartbeat not delivered");
                    }
                }
            });
        }
    }
    Ok(())
}

/// Opens an incident of `kind` unless one is open; when this replica opened it,
/// wakes the deliverer.
#[allow(clippy::too_many_arguments)]
async fn open(
    inner: &Inner,
    spec: &JobSpec,
    kind: &str,
    run_id: Option<Uuid>,
    summary: String,
    details: Value,
    condition: OpenIf,
    run: Option<Value>,
) -> Result<(), StoreError> {
    let Some(rule) = &spec.alert else {
        return Ok(());
    };
    let now = inner.scheduler.now();
    let new = NewIncident {
        job: &spec.name,
        scope_key: scope_key(spec, &inner.host),
        kind,
        at: now,
        by: &inner.host,
        run_id,
        summary: &summary,
        details,
        notify: &rule.notify,
    };
    let id = Uuid::now_v7();
    // The payload needs the incident; it is made from what the row will hold.
    let draft = Incident {
        id,
        job: spec.name.clone(),
        scope_key: new.scope_key.to_owned(),
        kind: kind.to_owned(),
        opened_at: now,
        opened_by: inner.host.clone(),
        run_id,
        summary: summary.clone(),
        details: new.details.clone(),
        notify: rule.notify.clone(),
        resolved_at: None,
        resolved_by: None,
        resolved_run_id: None,
    };
    let last_success = None::<DateTime<Utc>>;
    let body = payload("opened", &draft, run, last_success, &inner.host);
    inner.drop_snapshot();
    let opened = inner.store.open_incident(&new, condition, id, &body).await;
    inner.drop_snapshot();
    if let Some(inc) = opened? {
        tracing::warn!(job = %spec.name, incident = %inc.id, kind, summary = %inc.summary, "incident opened");
        if !inc.notify.is_empty() {
            inner.wake_deliverer.notify_one();
        }
    }
    Ok(())
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Staleness, stuck runs, and the health metrics: each second where a rule asks for
/// them (they are the clock's doing); else health changes only with runs (handled as
/// events), and a look every [`IDLE_EVALUATE_EVERY`] keeps the gauges and other
/// replicas' news current, without waking the process each second to find nothing.
async fn evaluate_loop(inner: Arc<Inner>) {
    // tokio's clock, which paused-time tests drive.
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let started = tokio::time::Instant::now();
        if let Err(e) = evaluate(&inner).await {
            tracing::debug!(error = %e, "job health not evaluated this time");
        }
        // A rule added by a reload is watched from the next look on.
        next = started + evaluate_every(&inner);
    }
}

fn evaluate_every(inner: &Inner) -> Duration {
    if watches_the_clock(inner) {
        EVALUATE_EVERY
    } else {
        IDLE_EVALUATE_EVERY
    }
}

/// How often health is looked at when no job has a `stale_after` or `late_after` rule.
pub const IDLE_EVALUATE_EVERY: Duration = Duration::from_secs(15);

fn watches_the_clock(inner: &Inner) -> bool {
    inner.scheduler.job_names().iter().any(|name| {
        inner.scheduler.spec(name).is_some_and(|spec| {
            spec.alert
                .as_ref()
                .is_some_and(|r| r.stale_after.is_some() || r.late_after.is_some())
        })
    })
}

async fn evaluate(inner: &Inner) -> Result<(), StoreError> {
    let now = inner.scheduler.now();
    let jobs = inner.scheduler.jobs();
    let specs: Vec<(JobStatus, JobSpec)> = jobs
        .into_iter()
        .filter_map(|j| inner.scheduler.spec(&j.name).map(|s| (j, s)))
        .collect();
    let mut rows = inner.store.job_health().await?;
    // A job without a health row yet: from the ledger, once.
    let mut seeded_any = false;
    for (_, spec) in &specs {
        let scope = scope_key(spec, &inner.host);
        if rows
            .iter()
            .any(|r| r.job == spec.name && r.scope_key == scope)
        {
            continue;
        }
        let first = inner
            .seeded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.name.clone());
        if first {
            let host = (spec.scope == Scope::Host).then_some(inner.host.as_str());
            inner.store.seed_job_health(&spec.name, scope, host).await?;
            seeded_any = true;
        }
    }
    if seeded_any {
        rows = inner.store.job_health().await?;
    }
    let mut open_now = inner.store.open_incidents().await?;
    inner.keep_snapshot(&rows, &open_now);
    // Whether an incident may have opened since `open_now` was read.
    let mut tried = false;

    for (status, spec) in &specs {
        let reference = first_due(inner, spec, now);
        let Some(rule) = &spec.alert else {
            continue;
        };
        let scope = scope_key(spec, &inner.host);
        let is_open = |kind: &str| {
            open_now
                .iter()
                .any(|i| i.job == spec.name && i.scope_key == scope && i.kind == kind)
        };
        if let Some(stale) = rule.stale_after
            && !is_open("stale")
        {
            let row = rows
                .iter()
                .find(|r| r.job == spec.name && r.scope_key == scope);
            let last = row.and_then(|r| r.last_success_at);
            let since = last.unwrap_or(reference);
            if elapsed(since, now) > stale {
                let summary = match last {
                    Some(at) => format!(
                        "no success for {} (last success {}; stale after {})",
                        humantime::format_duration(round_s(elapsed(at, now))),
                        at.to_rfc3339(),
                        humantime::format_duration(stale)
                    ),
                    None => format!(
                        "no success since it was first due at {} (stale after {})",
                        reference.to_rfc3339(),
                        humantime::format_duration(stale)
                    ),
                };
                let threshold = now - chrono::Duration::from_std(stale).unwrap_or_default();
                tried = true;
                open(
                    inner,
                    spec,
                    "stale",
                    None,
                    summary,
                    json!({ "last_success_at": last, "stale_after_s": stale.as_secs_f64() }),
                    OpenIf::NoSuccessSince(threshold),
                    None,
                )
                .await?;
            }
        }
        if let Some(late) = rule.late_after
            && !is_open("late")
            && let Some(run) = status
                .running_runs
                .iter()
                .find(|r| elapsed(r.scheduled_at, now) > late)
        {
            let summary = format!(
                "run {} still going {} after its scheduled time {} (late after {})",
                run.id,
                humantime::format_duration(round_s(elapsed(run.scheduled_at, now))),
                run.scheduled_at.to_rfc3339(),
                humantime::format_duration(late)
            );
            tried = true;
            open(
                inner,
                spec,
                "late",
                Some(run.id),
                summary,
                json!({ "run_id": run.id, "scheduled_at": run.scheduled_at, "started_at": run.started_at }),
                OpenIf::Always,
                None,
            )
            .await?;
        }
    }
    if tried {
        open_now = inner.store.open_incidents().await?;
        inner.keep_snapshot(&rows, &open_now);
    }
    publish_metrics(inner, &specs, &rows, &open_now, now);
    Ok(())
}

fn round_s(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// When staleness counts from for a job that never succeeded: its first firing after
/// this vigil first saw its current definition (for a disabled job, that moment).
fn first_due(inner: &Inner, spec: &JobSpec, now: DateTime<Utc>) -> DateTime<Utc> {
    let key = format!("{}|{}|{}", spec.schedule, spec.enabled, spec.scope.as_str());
    let mut map = inner.first_due.lock().unwrap_or_else(|p| p.into_inner());
    match map.get(&spec.name) {
        Some((k, at)) if *k == key => *at,
        _ => {
            let at = if spec.enabled {
                spec.schedule.next_after(now).unwrap_or(now)
            } else {
                now
            };
            map.insert(spec.name.clone(), (key, at));
            at
        }
    }
}

fn publish_metrics(
    inner: &Inner,
    specs: &[(JobStatus, JobSpec)],
    rows: &[JobHealthRow],
    open: &[Incident],
    now: DateTime<Utc>,
) {
    let m = &inner.metrics;
    let mut now_labelled = HashSet::new();
    for (status, spec) in specs {
        let h = judge(spec, status, &inner.host, rows, open, now);
        m.job_gauges(
            &spec.name,
            h.last_success_at
                .map(|t| t.timestamp_millis() as f64 / 1000.0),
            status
                .next_fire
                .map(|t| t.timestamp_millis() as f64 / 1000.0),
            status.running.len() as i64,
            h.health.as_str(),
            Health::ALL.iter().map(|h| h.as_str()),
        );
        now_labelled.insert(spec.name.clone());
    }
    let mut labelled = inner.labelled.lock().unwrap_or_else(|p| p.into_inner());
    for gone in labelled.difference(&now_labelled) {
        m.forget_job(gone, Health::ALL.iter().map(|h| h.as_str()));
    }
    *labelled = now_labelled;
}

/// Takes due deliveries from the outbox and sends them, a few at a time.
async fn deliver_loop(inner: Arc<Inner>) {
    let slots = Arc::new(Semaphore::new(DELIVERY_CONCURRENCY));
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = inner.wake_deliverer.notified() => {}
            () = tokio::time::sleep(POLL_EVERY) => {}
        }
        loop {
            let free = slots.available_permits() as i64;
            if free == 0 {
                break;
            }
            let lease = lease_for(&inner);
            let batch = match inner
                .store
                .lease_deliveries(&inner.host, lease, free.min(LEASE_BATCH))
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the alert outbox this time");
                    break;
                }
            };
            if batch.is_empty() {
                break;
            }
            for pending in batch {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let inner2 = inner.clone();
                inner.tasks.spawn(async move {
                    deliver(&inner2, pending).await;
                    drop(permit);
                });
            }
        }
    }
}

/// Long enough for the slowest notifier to answer, and the attempt to be recorded.
fn lease_for(inner: &Inner) -> Duration {
    let slowest = inner
        .notifiers
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|n| n.timeout)
        .max()
        .unwrap_or(crate::config::DEFAULT_NOTIFIER_TIMEOUT);
    slowest + Duration::from_secs(30)
}

/// The pause before attempt `n + 1` after `n` failed.
pub fn backoff(attempts_made: i32) -> Duration {
    let doublings = attempts_made.saturating_sub(1).clamp(0, 20) as u32;
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

async fn deliver(inner: &Inner, p: Pending) {
    let notifier = inner
        .notifiers
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&p.notifier)
        .cloned();
    let started = Instant::now();
    let delivery = format!("{}/{}/{}", p.incident_id, p.event, p.notifier);
    let result = match &notifier {
        Some(n) => {
            notify::send(
                &inner.http,
                n,
                &p.event,
                &delivery,
                &p.payload,
                &inner.program_env,
            )
            .await
        }
        None => Err(notify::Failure {
            http_status: None,
            error: format!("notifier \"{}\" is no longer in the jobs file", p.notifier),
        }),
    };
    let at = inner.scheduler.now();
    let attempts = p.attempts + 1;
    let (delivered, http_status, error) = match &result {
        Ok(d) => (true, d.http_status, None),
        Err(f) => (false, f.http_status, Some(f.error.clone())),
    };
    let retry_at = if delivered || notifier.is_none() {
        None
    } else {
        let next = at + chrono::Duration::from_std(backoff(attempts)).unwrap_or_default();
        let deadline = p.created_at + chrono::Duration::from_std(GIVE_UP_AFTER).unwrap_or_default();
        (next < deadline).then_some(next)
    };
    let outcome = if delivered {
        "delivered"
    } else if retry_at.is_some() {
        "failed"
    } else {
        "gave_up"
    };
    inner.metrics.alert_delivery(&p.notifier, outcome);
    match outcome {
        "delivered" => {
            tracing::info!(notifier = %p.notifier, incident = %p.incident_id, event = %p.event, attempt = attempts, "alert delivered")
        }
        "failed" => {
            tracing::warn!(notifier = %p.notifier, incident = %p.incident_id, event = %p.event, attempt = attempts, error = error.as_deref().unwrap_or(""), next = ?retry_at, "alert not delivered; will retry")
        }
        _ => {
            tracing::error!(notifier = %p.notifier, incident = %p.incident_id, event = %p.event, attempt = attempts, error = error.as_deref().unwrap_or(""), "alert not delivered; giving up")
        }
    }
    let attempt = Attempt {
        at,
        duration: started.elapsed(),
        delivered,
        http_status,
        error: error.as_deref(),
        host: &inner.host,
        retry_at,
    };
    // The lease runs out if this fails, and the delivery is tried again: at least
    // once, never lost.
    if let Err(e) = inner.store.record_attempt(&p, &attempt).await {
        tracing::warn!(error = %e, incident = %p.incident_id, "cannot record an alert delivery");
    }
    if let Some(next) = retry_at {
        let wake = inner.wake_deliverer.clone();
        wake_at(
            &inner.tasks,
            &inner.stop,
            next - inner.scheduler.now(),
            move || wake.notify_one(),
        );
    }
}

/// Calls `wake` after `wait` (at once if it has passed) unless `stop` comes first: a
/// deliverer's retry is due at its time, not at the next idle poll after it.
fn wake_at(
    tasks: &TaskTracker,
    stop: &CancellationToken,
    wait: chrono::Duration,
    wake: impl FnOnce() + Send + 'static,
) {
    let wait = wait.to_std().unwrap_or(Duration::ZERO);
    let stop = stop.clone();
    tasks.spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(wait) => wake(),
            () = stop.cancelled() => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AlertRule;

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes() {
        let got: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(i32::MAX), MAX_BACKOFF);
    }

    fn spec(alert: &str) -> JobSpec {
        let text = format!(
            "[[jobs]]\nname = \"j\"\nkind = \"command\"\nevery = \"1m\"\n{alert}\n[jobs.settings]\ncommand = [\"true\"]\n"
        );
        crate::config::parse_jobs(
            std::path::Path::new("t.toml"),
            &text,
            &crate::jobs::Registry::builtin(),
        )
        .unwrap()
        .jobs
        .remove(0)
    }

    fn status(running: &[DateTime<Utc>]) -> JobStatus {
        JobStatus {
            name: "j".into(),
            kind: "command".into(),
            schedule: "every 1m".into(),
            enabled: true,
            overlap: "forbid".into(),
            next_fire: None,
            running: running.iter().map(|_| Uuid::now_v7()).collect(),
            running_runs: running
                .iter()
                .map(|at| RunningRun {
                    id: Uuid::now_v7(),
                    trigger: crate::store::Trigger::Schedule,
                    scheduled_at: *at,
                    started_at: *at,
                    input: None,
                })
                .collect(),
            scope: Scope::Cluster,
            applied_at: Utc::now(),
            paused: None,
            max_concurrency: None,
        }
    }

    fn row(last: &str, success: bool) -> JobHealthRow {
        JobHealthRow {
            job: "j".into(),
            scope_key: String::new(),
            last_run_id: Uuid::now_v7(),
            last_status: last.into(),
            last_finished_at: Utc::now(),
            last_success_at: success.then(Utc::now),
            last_success_run: None,
        }
    }

    fn incident(kind: &str) -> Incident {
        Incident {
            id: Uuid::now_v7(),
            job: "j".into(),
            scope_key: String::new(),
            kind: kind.into(),
            opened_at: Utc::now(),
            opened_by: "h".into(),
            run_id: None,
            summary: String::new(),
            details: Value::Null,
            notify: Vec::new(),
            resolved_at: None,
            resolved_by: None,
            resolved_run_id: None,
        }
    }

    #[test]
    fn health_prefers_open_incidents_then_the_last_outcome() {
        let now = Utc::now();
        let plain = spec("");
        let late = spec("alert = { late_after = \"10s\" }");
        let judge_h = |s: &JobSpec, st: &JobStatus, rows: &[JobHealthRow], open: &[Incident]| {
            judge(s, st, "h", rows, open, now).health
        };
        let idle = status(&[]);
        assert_eq!(judge_h(&plain, &idle, &[], &[]), Health::Unknown);
        assert_eq!(
            judge_h(&plain, &idle, &[row("succeeded", true)], &[]),
            Health::Ok
        );
        assert_eq!(
            judge_h(&plain, &idle, &[row("timed_out", true)], &[]),
            Health::Failing
        );
        assert_eq!(
            judge_h(&plain, &idle, &[row("skipped", true)], &[]),
            Health::Ok
        );
        assert_eq!(
            judge_h(&plain, &idle, &[row("skipped", false)], &[]),
            Health::Unknown
        );
        let ok = [row("succeeded", true)];
        assert_eq!(
            judge_h(&plain, &idle, &ok, &[incident("stale")]),
            Health::Stale
        );
        assert_eq!(
            judge_h(&plain, &idle, &ok, &[incident("stale"), incident("failed")]),
            Health::Failing
        );
        assert_eq!(
            judge_h(&plain, &idle, &ok, &[incident("failed"), incident("late")]),
            Health::Late
        );
        // A run past `late_after` is late before the evaluator opens its incident.
        let stuck = status(&[now - chrono::Duration::seconds(30)]);
        assert_eq!(judge_h(&late, &stuck, &ok, &[]), Health::Late);
        assert_eq!(judge_h(&plain, &stuck, &ok, &[]), Health::Ok);
        // Another job's incident is not this one's.
        let mut other = incident("failed");
        other.job = "k".into();
        assert_eq!(judge_h(&plain, &idle, &ok, &[other]), Health::Ok);
    }

    #[test]
    fn rules_name_what_they_open_on() {
        let rule = AlertRule {
            on: vec![AlertOn::Failed, AlertOn::TimedOut],
            stale_after: Some(Duration::from_secs(900)),
            late_after: None,
            notify: vec!["ops".into()],
        };
        assert_eq!(
            rule.to_string(),
            "on failed, timed_out; stale after 15m; notify ops"
        );
    }
}
