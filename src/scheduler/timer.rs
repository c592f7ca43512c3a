//! The clock: tokio-cron-scheduler, used as a one-shot timer service.
//!
//! vigil computes each job's next firing itself (see `config::Schedule`) and arms a
//! one-shot job in tokio-cron-scheduler for it. The crate's own cron jobs are not used
//! because they pin a named time zone to one fixed offset at creation (wrong after the
//! next DST change). Traps avoided here:
//! - the crate stores ticks in whole seconds and polls every 500 ms, so a one-shot can
//!   fire up to a second early or half a second late: we arm it [`LEAD`] early and the
//!   dispatcher waits out the remainder, so a run starts on its exact instant;
//! - a job callback must never add or remove jobs (the crate's locks deadlock): ours
//!   only sends an event on a channel; re-arming happens in the dispatcher task;
//! - it needs a multi-threaded tokio runtime, which `main` and the tests use.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use uuid::Uuid;

/// How far ahead of a firing the crate's one-shot is armed.
pub const LEAD: Duration = Duration::from_millis(1500);

/// A firing announced by the clock.
#[derive(Debug, Clone)]
pub struct Tick {
    pub job: String,
    /// Guards against ticks armed for a job definition that has since changed.
    pub generation: u64,
    pub due: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Timer {
    sched: JobScheduler,
    ticks: UnboundedSender<Tick>,
}

impl Timer {
    pub async fn new(ticks: UnboundedSender<Tick>) -> Result<Self, JobSchedulerError> {
        let sched = JobScheduler::new().await?;
        Ok(Self { sched, ticks })
    }

    pub async fn start(&self) -> Result<(), JobSchedulerError> {
        self.sched.start().await
    }

    /// Arms a one-shot that sends `tick` shortly before `tick.due`.
    pub async fn arm(&self, tick: Tick) -> Result<Uuid, JobSchedulerError> {
        let until_due = (tick.due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
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
        self.sched.add(job).await
    }

    /// Cancels an armed one-shot (a job removed or rescheduled).
    pub async fn disarm(&self, id: Uuid) {
        if let Err(e) = self.sched.remove(&id).await {
            tracing::debug!(error = %e, "timer already fired or gone");
        }
    }

    pub async fn shutdown(&self) {
        let mut sched = self.sched.clone();
        if let Err(e) = sched.shutdown().await {
            tracing::warn!(error = %e, "stopping the timer");
        }
    }
}
