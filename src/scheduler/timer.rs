//! The timer: tokio-cron-scheduler, used as a one-shot timer service (and, for tests on
//! paused time, a stand-in on tokio's own clock).
//!
//! vigil computes each job's next firing itself (see `config::Schedule`) and arms a
//! one-shot job in tokio-cron-scheduler for it. The crate's own cron jobs are not used
//! because they pin a named time zone to one fixed offset at creation (wrong after the
//! next DST change). Traps avoided here:
//! - the crate stores ticks in whole seconds and polls every 500 ms, so a one-shot can
//!   fire up to a second early or half a second late: we arm it [`LEAD`] early and the
//!   dispatcher waits out the remainder on tokio's timer, so a run starts on its exact
//!   instant;
//! - that poll wakes the process four times a second (two ticks, each also woken early
//!   by tokio's timer wheel) whether or not anything is armed: a firing within
//!   [`LEAD`] is announced at once, without the crate, and the crate is started only
//!   when a firing further away is first armed. A deployment whose jobs all fire at
//!   least once a minute never starts it;
//! - a job callback must never add or remove jobs (the crate's locks deadlock): ours
//!   only sends an event on a channel; re-arming happens in the dispatcher task;
//! - it needs a multi-threaded tokio runtime, which `main` and the tests use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use uuid::Uuid;

use super::clock::Clock;

/// How far ahead of a firing the crate's one-shot is armed; a firing this close is
/// announced at once and waited for on tokio's timer (one sleeping task per job).
pub const LEAD: Duration = Duration::from_secs(60);

/// A firing announced by the clock.
#[derive(Debug, Clone)]
pub struct Tick {
    pub job: String,
    /// Guards against ticks armed for a job definition that has since changed.
    pub generation: u64,
    /// The firing's instant (its identity: claims, `scheduled_at`).
    pub due: chrono::DateTime<chrono::Utc>,
    /// When it runs: `due` plus the job's jitter on this host.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Announces each armed firing (shortly before it is due) on the dispatcher's channel.
#[async_trait::async_trait]
pub trait Timer: Send + Sync + 'static {
    async fn start(&self) -> Result<(), JobSchedulerError>;
    /// Arms a one-shot that sends `tick` up to [`LEAD`] before `tick.at`.
    async fn arm(&self, tick: Tick) -> Result<Uuid, JobSchedulerError>;
    /// Cancels an armed one-shot (a job removed or rescheduled).
    async fn disarm(&self, id: Uuid);
    async fn shutdown(&self);
}

/// tokio-cron-scheduler's one-shots: the production timer.
#[derive(Clone)]
pub struct CronTimer {
    sched: JobScheduler,
    /// Set once the crate's ticker runs (see the module's notes).
    started: Arc<tokio::sync::OnceCell<()>>,
    ticks: UnboundedSender<Tick>,
    clock: Arc<dyn Clock>,
}

impl CronTimer {
    pub async fn new(
        ticks: UnboundedSender<Tick>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, JobSchedulerError> {
        let sched = JobScheduler::new().await?;
        Ok(Self {
            sched,
            started: Arc::new(tokio::sync::OnceCell::new()),
            ticks,
            clock,
        })
    }

    /// Whether the crate's ticker has been started.
    pub fn crate_started(&self) -> bool {
        self.started.initialized()
    }
}

#[async_trait::async_trait]
impl Timer for CronTimer {
    async fn start(&self) -> Result<(), JobSchedulerError> {
        // The crate starts with the first firing armed beyond the lead.
        Ok(())
    }

    async fn arm(&self, tick: Tick) -> Result<Uuid, JobSchedulerError> {
        let until_due = (tick.at - self.clock.now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        // Within the lead: announce it now and let the dispatcher wait for the instant.
        if until_due <= LEAD {
            let _ = self.ticks.send(tick);
            return Ok(Uuid::new_v4());
        }
        let at = std::time::Instant::now() + until_due.saturating_sub(LEAD);
        let tx = self.ticks.clone();
        let job = Job::new_one_shot_at_instant_async(at, move |_id, _sched| {
            let tx = tx.clone();
            let tick = tick.clone();
            Box::pin(async move {
                // The receiver is gone only during shutdown, when ticks no longer matter.
                let _ = tx.send(tick);
            })
        })?;
        self.started
            .get_or_try_init(|| async { self.sched.start().await })
            .await?;
        self.sched.add(job).await
    }

    async fn disarm(&self, id: Uuid) {
        // Before the crate starts, every firing was announced at once: nothing to take back.
        if !self.crate_started() {
            return;
        }
        if let Err(e) = self.sched.remove(&id).await {
            tracing::debug!(error = %e, "timer already fired or gone");
        }
    }

    async fn shutdown(&self) {
        let mut sched = self.sched.clone();
        if self.crate_started()
            && let Err(e) = sched.shutdown().await
        {
            tracing::warn!(error = %e, "stopping the timer");
        }
        // The crate's tasks log an error when its channels close, which they do when
        // the last handle goes; they have no other way to stop. Keep one handle for
        // the life of the process (a few KB), so they end with the runtime, quietly.
        std::mem::forget(sched);
    }
}

/// Sleeping tasks on tokio's clock: a timer that follows paused time, for tests.
pub struct TokioTimer {
    ticks: UnboundedSender<Tick>,
    clock: Arc<dyn Clock>,
    armed: Mutex<HashMap<Uuid, tokio::task::AbortHandle>>,
}

impl TokioTimer {
    pub fn new(ticks: UnboundedSender<Tick>, clock: Arc<dyn Clock>) -> Self {
        Self {
            ticks,
            clock,
            armed: Mutex::new(HashMap::new()),
        }
    }

    fn armed(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, tokio::task::AbortHandle>> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl Timer for TokioTimer {
    async fn start(&self) -> Result<(), JobSchedulerError> {
        Ok(())
    }

    async fn arm(&self, tick: Tick) -> Result<Uuid, JobSchedulerError> {
        let until_due = (tick.at - self.clock.now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        let tx = self.ticks.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(until_due.saturating_sub(LEAD)).await;
            let _ = tx.send(tick);
        });
        let id = Uuid::new_v4();
        self.armed().insert(id, task.abort_handle());
        Ok(id)
    }

    async fn disarm(&self, id: Uuid) {
        if let Some(task) = self.armed().remove(&id) {
            task.abort();
        }
    }

    async fn shutdown(&self) {
        for (_, task) in self.armed().drain() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::clock::SystemClock;

    fn tick(in_secs: i64) -> Tick {
        let at = chrono::Utc::now() + chrono::Duration::seconds(in_secs);
        Tick {
            job: "j".to_owned(),
            generation: 1,
            due: at,
            at,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_crate_ticks_only_once_a_firing_beyond_the_lead_is_armed() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let timer = CronTimer::new(tx, Arc::new(SystemClock)).await.unwrap();
        timer.start().await.unwrap();

        timer.arm(tick(2)).await.unwrap();
        assert!(
            rx.try_recv().is_ok(),
            "a firing 2 s away is announced at once"
        );
        timer.arm(tick(LEAD.as_secs() as i64 - 1)).await.unwrap();
        assert!(rx.try_recv().is_ok(), "and one just within the lead");
        assert!(!timer.crate_started());

        let far = timer.arm(tick(600)).await.unwrap();
        assert!(timer.crate_started());
        assert!(
            rx.try_recv().is_err(),
            "a firing 10 min away waits in the crate"
        );
        timer.disarm(far).await;
        timer.shutdown().await;
    }
}
