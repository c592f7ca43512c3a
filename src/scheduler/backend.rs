//! What the scheduler asks of its storage: a ledger to record runs in, claims so that
//! one replica runs each `cluster` firing, locks so that two never run at once, and
//! the last firing for catch-up. PostgreSQL provides them in production ([`Ledger`]);
//! [`MemoryBackend`](super::memory::MemoryBackend) provides them for tests that
//! govern runs on paused time, with no database.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::ledger::{Ledger, LedgerError};
use crate::store::sync::JobLock;
use crate::store::{RunRecord, StoreError};

#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Queues a ledger record (a new row, or the new state of one); never waits.
    fn record(&self, record: RunRecord);
    /// Waits until what was recorded is stored, or `wait` passes.
    async fn flush(&self, wait: Duration) -> Result<(), LedgerError>;
    /// Stores what it can within `wait` and stops recording: `true` if everything was.
    async fn close(&self, wait: Duration) -> Result<bool, LedgerError>;
    /// The latest scheduled (or caught-up) firing recorded for `job`.
    async fn last_firing(&self, job: &str) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// Claims firing `at` of `job` for `host`: `true` for exactly one claimant.
    async fn claim_firing(
        &self,
        job: &str,
        at: DateTime<Utc>,
        host: &str,
    ) -> Result<bool, StoreError>;
    /// Takes `job`'s cluster lock unless someone holds it (then `None`).
    async fn try_cluster_lock(&self, job: &str) -> Result<Option<Box<dyn HeldLock>>, StoreError>;
}

/// A lock held until released (or dropped, which also lets it go).
#[async_trait::async_trait]
pub trait HeldLock: Send {
    async fn release(self: Box<Self>);
}

#[async_trait::async_trait]
impl HeldLock for JobLock {
    async fn release(self: Box<Self>) {
        JobLock::release(*self).await;
    }
}

#[async_trait::async_trait]
impl Backend for Ledger {
    fn record(&self, record: RunRecord) {
        Ledger::record(self, record);
    }

    async fn flush(&self, wait: Duration) -> Result<(), LedgerError> {
        Ledger::flush(self, wait).await
    }

    async fn close(&self, wait: Duration) -> Result<bool, LedgerError> {
        Ledger::close(self, wait).await
    }

    async fn last_firing(&self, job: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.store().last_firing(job).await
    }

    async fn claim_firing(
        &self,
        job: &str,
        at: DateTime<Utc>,
        host: &str,
    ) -> Result<bool, StoreError> {
        self.store().claim_firing(job, at, host).await
    }

    async fn try_cluster_lock(&self, job: &str) -> Result<Option<Box<dyn HeldLock>>, StoreError> {
        Ok(self
            .store()
            .try_cluster_lock(job)
            .await?
            .map(|l| Box::new(l) as Box<dyn HeldLock>))
    }
}
