//! The run ledger writer: records reach `job_runs` without ever making a run wait on
//! PostgreSQL. Records queue in a bounded buffer while the database is away and are
//! written, in order, when it returns. With a spool, what does not fit in memory, and
//! what is left at shutdown, goes to disk and is written first at the next chance.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::store::spool::Spool;
use crate::store::{RunRecord, Store};
use crate::telemetry::metrics::Metrics;

/// Records kept while PostgreSQL is unreachable; at a few hundred bytes each this
/// bounds the buffer to a few megabytes.
pub const DEFAULT_CAPACITY: usize = 10_000;
/// Records written per statement.
const BATCH: usize = 500;
/// Most bytes of run outputs (a command's stdout, up to 1 MiB each) held while
/// PostgreSQL is away; past it the oldest queued outputs are let go, never the rows.
pub const MAX_QUEUED_OUTPUT_BYTES: usize = 64 << 20;
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// How long the first record after a quiet spell waits for company before it is
/// written: a one-second job's two records a run become one statement.
const GATHER: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the run ledger could not reach PostgreSQL within {0:?}; {1} records are still queued")]
    Timeout(Duration, usize),
    #[error("the run ledger has stopped")]
    Stopped,
}

enum Op {
    Record(Box<RunRecord>),
    Flush(oneshot::Sender<()>),
    /// Last attempts within the duration, then spool the rest and stop; answers
    /// whether everything was written.
    Close(Duration, oneshot::Sender<bool>),
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
        Self::start_with(store, capacity, metrics, None)
    }

    /// Starts the writer task, spilling to `spool` what does not fit in memory and
    /// what is left at shutdown (and writing what it holds first).
    pub fn start_with(
        store: Store,
        capacity: usize,
        metrics: Metrics,
        spool: Option<Spool>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(LedgerStats::default());
        if let Some(s) = spool.as_ref().filter(|s| !s.is_empty()) {
            tracing::info!(spool = %s.dir().display(), bytes = s.bytes(), "run records spooled by an earlier run will be written first");
        }
        tokio::spawn(writer(
            Writer {
                store: store.clone(),
                capacity: capacity.max(1),
                stats: stats.clone(),
                metrics,
                spool,
            },
            rx,
        ));
        Self { tx, store, stats }
    }

    /// Writes what it can within `wait`, spools the rest (with a spool), and stops
    /// the writer: `Ok(true)` if everything reached PostgreSQL. Records after this are
    /// lost (logged).
    pub async fn close(&self, wait: Duration) -> Result<bool, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Close(wait, tx))
            .map_err(|_| LedgerError::Stopped)?;
        // The writer bounds itself by `wait`; spooling is quick.
        match tokio::time::timeout(wait + Duration::from_secs(5), rx).await {
            Ok(Ok(all)) => Ok(all),
            Ok(Err(_)) => Err(LedgerError::Stopped),
            Err(_) => Err(LedgerError::Timeout(
                wait,
                self.stats.queued.load(Ordering::Relaxed) as usize,
            )),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }

    /// Queues a record (a new row, or the new state of an existing one).
    pub fn record(&self, record: RunRecord) {
        if self.tx.send(Op::Record(Box::new(record))).is_err() {
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

struct Writer {
    store: Store,
    capacity: usize,
    stats: Arc<LedgerStats>,
    metrics: Metrics,
    spool: Option<Spool>,
}

impl Writer {
    fn count_dropped(&self, n: u64, last_warning: &mut Option<tokio::time::Instant>) {
        if n == 0 {
            return;
        }
        self.metrics.ledger_dropped.inc_by(n);
        let total = self.stats.dropped.fetch_add(n, Ordering::Relaxed) + n;
        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            tracing::warn!(
                dropped_total = total,
                capacity = self.capacity,
                "run ledger buffer full; dropped the oldest records"
            );
            *last_warning = Some(tokio::time::Instant::now());
        }
    }

    /// Spools `records`; returns how many were lost doing so.
    fn spill(&self, records: &[RunRecord]) -> u64 {
        match &self.spool {
            Some(spool) if !records.is_empty() => match spool.append(records) {
                Ok(dropped) => dropped,
                Err(e) => {
                    tracing::error!(error = %e, records = records.len(), "cannot spool run records; they are lost");
                    records.len() as u64
                }
            },
            Some(_) => 0,
            None => records.len() as u64,
        }
    }

    /// Writes the oldest spooled segment; `false` when PostgreSQL refused to take it.
    async fn drain_spool(&self) -> Option<bool> {
        let spool = self.spool.as_ref()?;
        let (segment, records, bad) = match spool.oldest::<RunRecord>() {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the ledger spool");
                return None;
            }
        };
        if bad > 0 {
            tracing::warn!(bad, "unreadable spooled run records skipped");
        }
        for chunk in records.chunks(BATCH) {
            let batch = coalesce(chunk.iter());
            if let Err(e) = self.store.upsert_runs(&batch).await {
                if !e.is_data_rejection() {
                    tracing::warn!(error = %e, "cannot write spooled run records; they stay on disk");
                    return Some(false);
                }
                for r in &batch {
                    let _ = self.store.upsert_runs(std::slice::from_ref(r)).await;
                }
            }
            self.stats
                .written
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        if let Err(e) = spool.remove(segment) {
            tracing::error!(error = %e, "cannot remove a written ledger spool segment");
        }
        Some(true)
    }
}

async fn writer(w: Writer, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut pending: VecDeque<RunRecord> = VecDeque::new();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut close: Option<(tokio::time::Instant, oneshot::Sender<bool>)> = None;
    // Whether a close had to leave records unwritten.
    let mut left_behind = false;
    let mut delay = Duration::from_millis(100);
    let mut last_drop_warning: Option<tokio::time::Instant> = None;
    loop {
        // What earlier runs spooled is older than anything queued: it goes first.
        if close.is_none() {
            match w.drain_spool().await {
                Some(true) => continue,
                Some(false) => {
                    wait_or_take(&mut rx, &mut pending, &mut waiters, &mut close, delay).await;
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                    continue;
                }
                None => {}
            }
        }
        // Block for work only when there is nothing to write.
        if pending.is_empty() {
            for waiter in waiters.drain(..) {
                let _ = waiter.send(());
            }
            if let Some((_, ack)) = close.take() {
                let _ = ack.send(!left_behind);
                return;
            }
            match rx.recv().await {
                Some(op) => take(op, &mut pending, &mut waiters, &mut close),
                None => return,
            }
            // A short run's start and end arrive milliseconds apart: gather a moment
            // so they go as one row, unless someone waits for the write. Once every
            // run started in the batch has ended, nothing more is worth waiting for:
            // written at once.
            let until = tokio::time::Instant::now() + GATHER;
            let mut open = Vec::new();
            if let Some(first) = pending.back() {
                note_open(&mut open, first.id, first.finished_at.is_some());
            }
            while !open.is_empty() && waiters.is_empty() && close.is_none() && pending.len() < BATCH
            {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(op)) => {
                        if let Op::Record(r) = &op {
                            note_open(&mut open, r.id, r.finished_at.is_some());
                        }
                        take(op, &mut pending, &mut waiters, &mut close);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        while let Ok(op) = rx.try_recv() {
            take(op, &mut pending, &mut waiters, &mut close);
        }
        shed_outputs(&mut pending, &w.metrics);
        if pending.len() > w.capacity {
            let excess = pending.len() - w.capacity;
            let dropped = if w.spool.is_some() {
                // To disk, the older half at once: few, large segments.
                let n = excess.max(w.capacity / 2).min(pending.len());
                let old: Vec<RunRecord> = pending.drain(..n).collect();
                w.spill(&old)
            } else {
                pending.drain(..excess);
                excess as u64
            };
            w.count_dropped(dropped, &mut last_drop_warning);
        }
        w.stats
            .queued
            .store(pending.len() as u64, Ordering::Relaxed);
        w.metrics.ledger_queued.set(pending.len() as i64);
        if pending.is_empty() {
            continue;
        }

        let batch = coalesce(pending.iter().take(BATCH));
        let taken = pending.len().min(BATCH);
        let attempt = match &close {
            Some((deadline, _)) => tokio::time::timeout_at(*deadline, w.store.upsert_runs(&batch))
                .await
                .unwrap_or_else(|_| Err(crate::store::StoreError::TimedOut(Duration::ZERO))),
            None => w.store.upsert_runs(&batch).await,
        };
        match attempt {
            Ok(()) => {
                pending.drain(..taken);
                w.stats
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                w.stats
                    .queued
                    .store(pending.len() as u64, Ordering::Relaxed);
                w.metrics.ledger_queued.set(pending.len() as i64);
                delay = Duration::from_millis(100);
            }
            Err(e) if e.is_data_rejection() => {
                // The database refused the rows themselves: write them one by one so a
                // single bad record cannot block the ledger forever.
                for r in &batch {
                    if let Err(e) = w.store.upsert_runs(std::slice::from_ref(r)).await {
                        tracing::error!(run_id = %r.id, job = %r.job, error = %e, "run record rejected by PostgreSQL; dropped");
                        w.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        w.metrics.ledger_dropped.inc();
                    }
                }
                pending.drain(..taken);
            }
            Err(e) => {
                if close.is_some() {
                    // The last chance has gone: keep the rest for the next start.
                    let rest: Vec<RunRecord> = pending.drain(..).collect();
                    left_behind = true;
                    let lost = w.spill(&rest);
                    if lost > 0 {
                        w.count_dropped(lost, &mut last_drop_warning);
                        tracing::error!(lost, error = %e, "run records neither written nor spooled at shutdown");
                    } else {
                        tracing::info!(
                            records = rest.len(),
                            "PostgreSQL unreachable at shutdown: run records spooled for the next start"
                        );
                    }
                    w.stats.queued.store(0, Ordering::Relaxed);
                    continue;
                }
                tracing::warn!(error = %e, queued = pending.len(), retry_in = ?delay, "cannot write the run ledger; will retry");
                wait_or_take(&mut rx, &mut pending, &mut waiters, &mut close, delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

/// Sleeps `delay`, taking ops meanwhile so senders never pile up; a close cuts it short.
async fn wait_or_take(
    rx: &mut mpsc::UnboundedReceiver<Op>,
    pending: &mut VecDeque<RunRecord>,
    waiters: &mut Vec<oneshot::Sender<()>>,
    close: &mut Option<(tokio::time::Instant, oneshot::Sender<bool>)>,
    delay: Duration,
) {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    while close.is_none() {
        tokio::select! {
            _ = &mut sleep => break,
            op = rx.recv() => match op {
                Some(op) => take(op, pending, waiters, close),
                None => break,
            },
        }
    }
}

/// Keeps `open` the runs whose start the batch holds but not yet their end.
fn note_open(open: &mut Vec<Uuid>, run: Uuid, finished: bool) {
    if finished {
        open.retain(|id| *id != run);
    } else {
        open.push(run);
    }
}

fn take(
    op: Op,
    pending: &mut VecDeque<RunRecord>,
    waiters: &mut Vec<oneshot::Sender<()>>,
    close: &mut Option<(tokio::time::Instant, oneshot::Sender<bool>)>,
) {
    match op {
        Op::Record(r) => pending.push_back(*r),
        Op::Flush(w) => waiters.push(w),
        Op::Close(wait, ack) => *close = Some((tokio::time::Instant::now() + wait, ack)),
    }
}

/// Keeps the queued outputs within [`MAX_QUEUED_OUTPUT_BYTES`] by dropping the oldest
/// (the rows stay; `GET /api/runs/{id}/output` then has none for them).
fn shed_outputs(pending: &mut VecDeque<RunRecord>, metrics: &Metrics) {
    let held: usize = pending
        .iter()
        .filter_map(|r| r.output.as_ref())
        .map(|o| o.bytes.len())
        .sum();
    let mut over = held.saturating_sub(MAX_QUEUED_OUTPUT_BYTES);
    if over == 0 {
        return;
    }
    let mut shed = 0u64;
    for r in pending.iter_mut() {
        if over == 0 {
            break;
        }
        if let Some(o) = r.output.take() {
            over = over.saturating_sub(o.bytes.len());
            shed += 1;
        }
    }
    metrics.ledger_outputs_dropped.inc_by(shed);
    tracing::warn!(
        outputs = shed,
        cap_bytes = MAX_QUEUED_OUTPUT_BYTES,
        "PostgreSQL is away and queued run outputs passed their cap; dropped the oldest outputs (their rows are kept)"
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_waits_only_while_a_run_it_holds_the_start_of_has_not_ended() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut open = Vec::new();
        note_open(&mut open, a, false);
        note_open(&mut open, b, false);
        note_open(&mut open, a, true);
        assert_eq!(open, [b], "b's end may still come");
        note_open(&mut open, b, true);
        assert!(open.is_empty(), "both ended: nothing left to gather");
        // A run recorded only at its end (skipped, abandoned) opens nothing.
        note_open(&mut open, Uuid::new_v4(), true);
        assert!(open.is_empty());
    }
}
