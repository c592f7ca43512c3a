//! The scheduler's storage in memory: a ledger, claims and locks that live as long as
//! the value. For tests that govern runs on paused time without a database (and for a
//! dry run of a jobs file). Keeps PostgreSQL's semantics: a record in a final state is
//! never changed again; the first claim wins; a held lock refuses a second taker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::backend::{Backend, HeldLock};
use super::ledger::LedgerError;
use crate::store::{RunRecord, StoreError, Trigger};

#[derive(Default)]
pub struct MemoryBackend {
    runs: Mutex<Vec<RunRecord>>,
    claims: Mutex<HashSet<(String, DateTime<Utc>)>>,
    locks: Arc<Mutex<HashSet<String>>>,
    /// Makes claims and locks fail, as an unreachable database would.
    unreachable: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every record of `job`, oldest first (by start, then id: UUIDv7s sort by time).
    pub fn runs(&self, job: &str) -> Vec<RunRecord> {
        let mut runs: Vec<RunRecord> = lock(&self.runs)
            .iter()
            .filter(|r| r.job == job)
            .cloned()
            .collect();
        runs.sort_by_key(|r| (r.started_at, r.id));
        runs
    }

    /// Stores `records` as an earlier process would have left them.
    pub fn seed(&self, records: impl IntoIterator<Item = RunRecord>) {
        for r in records {
            self.record(r);
        }
    }

    /// Claims and locks fail from now on (or work again).
    pub fn set_unreachable(&self, down: bool) {
        self.unreachable.store(down, Ordering::Release);
    }

    fn check_reachable(&self) -> Result<(), StoreError> {
        if self.unreachable.load(Ordering::Acquire) {
            Err(StoreError::TimedOut(Duration::ZERO))
        } else {
            Ok(())
        }
    }
}

struct MemoryLock {
    key: String,
    locks: Arc<Mutex<HashSet<String>>>,
}

impl Drop for MemoryLock {
    fn drop(&mut self) {
        lock(&self.locks).remove(&self.key);
    }
}

#[async_trait::async_trait]
impl HeldLock for MemoryLock {
    async fn release(self: Box<Self>) {}
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    fn record(&self, record: RunRecord) {
        let mut runs = lock(&self.runs);
        match runs.iter_mut().find(|r| r.id == record.id) {
            Some(existing) if !existing.status.is_final() => *existing = record,
            Some(_) => {}
            None => runs.push(record),
        }
    }

    async fn flush(&self, _wait: Duration) -> Result<(), LedgerError> {
        Ok(())
    }

    async fn close(&self, _wait: Duration) -> Result<bool, LedgerError> {
        Ok(true)
    }

    async fn last_firing(&self, job: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(lock(&self.runs)
            .iter()
            .filter(|r| r.job == job && matches!(r.trigger, Trigger::Schedule | Trigger::CatchUp))
            .map(|r| r.scheduled_at)
            .max())
    }

    async fn claim_firing(
        &self,
        job: &str,
        at: DateTime<Utc>,
        _host: &str,
    ) -> Result<bool, StoreError> {
        self.check_reachable()?;
        Ok(lock(&self.claims).insert((job.to_owned(), at)))
    }

    async fn try_cluster_lock(&self, job: &str) -> Result<Option<Box<dyn HeldLock>>, StoreError> {
        self.check_reachable()?;
        if !lock(&self.locks).insert(job.to_owned()) {
            return Ok(None);
        }
        Ok(Some(Box::new(MemoryLock {
            key: job.to_owned(),
            locks: self.locks.clone(),
        })))
    }
}
