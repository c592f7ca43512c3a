//! The run ledger writer: records reach `job_runs` without ever making a run wait on
//! PostgreSQL. Records queue in a bounded buffer while the database is away and are
//! written, in order, when it returns.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::store::{RunRecord, Store};
use crate::telemetry::metrics::Metrics;

/// Records kept while PostgreSQL is unreachable; at a few hundred bytes each this
/// bounds the buffer to a few megabytes.
pub const DEFAULT_CAPACITY: usize = 10_000;
/// Records written per statement.
const BATCH: usize = 500;
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the run ledger could not reach PostgreSQL within {0:?}; {1} records are still queued")]
    Timeout(Duration, usize),
    #[error("the run ledger has stopped")]
    Stopped,
}

enum Op {
    Record(RunRecord),
    Flush(oneshot::Sender<()>),
}

/// Counters other parts expose.
#[derive(Debug, Default)]
pub struct LedgerStats {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub queued: AtomicU64,
}

#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Op>,
    store: Store,
    stats: Arc<LedgerStats>,
}

impl Ledger {
    /// Starts the writer task.
    pub fn start(store: Store, capacity: usize, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(LedgerStats::default());
        tokio::spawn(writer(
            store.clone(),
            rx,
            capacity.max(1),
            stats.clone(),
            metrics,
        ));
        Self { tx, store, stats }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }

    /// Queues a record (a new row, or the new state of an existing one).
    pub fn record(&self, record: RunRecord) {
        if self.tx.send(Op::Record(record)).is_err() {
            tracing::error!("run ledger writer has stopped; a run record was lost");
        }
    }

    /// Waits until everything recorded so far is in PostgreSQL, or `wait` passes.
    pub async fn flush(&self, wait: Duration) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Flush(tx))
            .map_err(|_| LedgerError::Stopped)?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(LedgerError::Stopped),
            Err(_) => Err(LedgerError::Timeout(
                wait,
                self.stats.queued.load(Ordering::Relaxed) as usize,
            )),
        }
    }
}

async fn writer(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Op>,
    capacity: usize,
    stats: Arc<LedgerStats>,
    metrics: Metrics,
) {
    let mut pending: VecDeque<RunRecord> = VecDeque::new();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut delay = Duration::from_millis(100);
    let mut last_drop_warning: Option<tokio::time::Instant> = None;
    loop {
        // Block for work only when there is nothing to write.
        if pending.is_empty() {
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
            match rx.recv().await {
                Some(op) => take(op, &mut pending, &mut waiters),
                None => return,
            }
        }
        while let Ok(op) = rx.try_recv() {
            take(op, &mut pending, &mut waiters);
        }
        let mut dropped_now = 0u64;
        while pending.len() > capacity {
            pending.pop_front();
            dropped_now += 1;
        }
        if dropped_now > 0 {
            metrics.ledger_dropped.inc_by(dropped_now);
            let total = stats.dropped.fetch_add(dropped_now, Ordering::Relaxed) + dropped_now;
            if last_drop_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(
                    dropped_total = total,
                    capacity,
                    "run ledger buffer full; dropped the oldest records"
                );
                last_drop_warning = Some(tokio::time::Instant::now());
            }
        }
        stats.queued.store(pending.len() as u64, Ordering::Relaxed);
        metrics.ledger_queued.set(pending.len() as i64);

        let batch = coalesce(pending.iter().take(BATCH));
        let taken = pending.len().min(BATCH);
        match store.upsert_runs(&batch).await {
            Ok(()) => {
                pending.drain(..taken);
                stats
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats.queued.store(pending.len() as u64, Ordering::Relaxed);
                metrics.ledger_queued.set(pending.len() as i64);
                delay = Duration::from_millis(100);
            }
            Err(e) if e.is_data_rejection() => {
                // The database refused the rows themselves: write them one by one so a
                // single bad record cannot block the ledger forever.
                for r in &batch {
                    if let Err(e) = store.upsert_runs(std::slice::from_ref(r)).await {
                        tracing::error!(run_id = %r.id, job = %r.job, error = %e, "run record rejected by PostgreSQL; dropped");
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        metrics.ledger_dropped.inc();
                    }
                }
                pending.drain(..taken);
            }
            Err(e) => {
                tracing::warn!(error = %e, queued = pending.len(), retry_in = ?delay, "cannot write the run ledger; will retry");
                // Keep draining the channel while waiting, so senders never pile up.
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        op = rx.recv() => match op {
                            Some(op) => take(op, &mut pending, &mut waiters),
                            None => break,
                        },
                    }
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

fn take(op: Op, pending: &mut VecDeque<RunRecord>, waiters: &mut Vec<oneshot::Sender<()>>) {
    match op {
        Op::Record(r) => pending.push_back(r),
        Op::Flush(w) => waiters.push(w),
    }
}

/// Keeps the latest state of each run, in first-seen order: one row per id per statement.
fn coalesce<'a>(records: impl Iterator<Item = &'a RunRecord>) -> Vec<RunRecord> {
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    let mut out: Vec<RunRecord> = Vec::new();
    for r in records {
        match index.get(&r.id) {
            Some(&i) => out[i] = r.clone(),
            None => {
                index.insert(r.id, out.len());
                out.push(r.clone());
            }
        }
    }
    out
}
