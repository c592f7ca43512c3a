//! `system_metrics`: samples the host (CPU, memory, disks, network, load, uptime,
//! processes, vigil itself) into `system_metrics`, one row per sample.
//!
//! Sampling never waits on PostgreSQL: a run takes a sample and queues it; a writer
//! task drains the queue in batches, in order. While PostgreSQL is away samples wait in
//! a bounded queue (default: one hour of samples); past the bound the oldest are
//! dropped, counted and logged. `(host, ts)` is the key, so a batch re-sent after an
//! ambiguous failure cannot duplicate a row.

mod containers;
mod disks;
mod host;
mod kept;
mod pressure;
mod processes;
mod sample;
mod sampler;

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::Notify;
use toml::Spanned;

use super::{Deps, Job, JobError, Kind, RunContext, RunOutcome};
use crate::config::{JobSettings, JobSpec, Scope, Validate};
use crate::store::Store;
use crate::store::spool::Spool;
use crate::telemetry::metrics::{JobLabels, Metrics};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
pub use sample::{SHAPE_VERSION, Sample};
pub use sampler::{Sampler, counter_delta, host_name};
use tokio_util::sync::CancellationToken;

/// Host metrics describe each host: on every replica by default.
pub const KIND: Kind = Kind {
    name: "system_metrics",
    default_scope: Scope::Host,
    read: |r| r.read::<SystemMetricsConfig>().map(JobSettings::new),
    build,
    input: super::InputSpec::NONE,
};

fn build(spec: &JobSpec, deps: &Deps) -> Result<Arc<dyn Job>, JobError> {
    let c: &SystemMetricsConfig = super::settings(spec)?;
    // Sampling the host through its root: its samples carry the host's name, not
    // the container's (the job's `host` still wins).
    let sampled = deps
        .host_root
        .as_deref()
        .and_then(sampler::host_name)
        .unwrap_or_else(|| deps.host.clone());
    let job = SystemMetrics::sampling(
        &spec.name,
        c,
        deps.store.clone(),
        &sampled,
        spec.schedule.typical_interval(),
        &deps.metrics,
        deps.host_root.as_deref(),
    )?;
    let host = c.host.as_deref().unwrap_or(&sampled);
    if let Some(spool) = deps
        .spool
        .as_ref()
        .and_then(|p| p.open(&format!("samples-{host}")))
    {
        job.queue().set_spool(spool);
    }
    Ok(Arc::new(job))
}

/// What a sample includes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collect {
    Cpu,
    Memory,
    Disk,
    Network,
    Load,
    Uptime,
    Processes,
    #[serde(rename = "self")]
    Own,
    TopProcesses,
    Containers,
    Pressure,
}

impl Collect {
    /// The section's name in `collect`.
    pub fn name(self) -> &'static str {
        match self {
            Collect::Cpu => "cpu",
            Collect::Memory => "memory",
            Collect::Disk => "disk",
            Collect::Network => "network",
            Collect::Load => "load",
            Collect::Uptime => "uptime",
            Collect::Processes => "processes",
            Collect::Own => "self",
            Collect::TopProcesses => "top_processes",
            Collect::Containers => "containers",
            Collect::Pressure => "pressure",
        }
    }

    pub const ALL: [Collect; 11] = [
        Collect::Cpu,
        Collect::Memory,
        Collect::Disk,
        Collect::Network,
        Collect::Load,
        Collect::Uptime,
        Collect::Processes,
        Collect::Own,
        Collect::TopProcesses,
        Collect::Containers,
        Collect::Pressure,
    ];
}

/// ```toml
/// [jobs.settings]
/// collect = ["cpu", "memory", "disk", "network"]
/// exclude_mounts = ["/boot/efi"]
/// host = "web-1"
/// buffer = 360
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemMetricsConfig {
    #[serde(default = "all_sections")]
    pub collect: Vec<Collect>,
    /// Mount points to leave out; `*` matches any run of characters.
    #[serde(default = "default_exclude_mounts")]
    pub exclude_mounts: Vec<String>,
    #[serde(default = "default_exclude_fs_types")]
    pub exclude_fs_types: Vec<String>,
    #[serde(default = "default_exclude_interfaces")]
    pub exclude_interfaces: Vec<String>,
    /// The `host` column; default: the runner's host name.
    pub host: Option<String>,
    /// Samples kept while PostgreSQL is unreachable; default: one hour at the job's interval.
    pub buffer: Option<Spanned<u32>>,
    /// How many processes `top_processes` lists by CPU and by memory.
    #[serde(default = "default_top_n")]
    pub top_n: Spanned<u32>,
    /// Whether `top_processes` includes command lines (they may carry secrets).
    #[serde(default)]
    pub process_cmdline: bool,
}

impl Default for SystemMetricsConfig {
    fn default() -> Self {
        Self {
            collect: all_sections(),
            exclude_mounts: default_exclude_mounts(),
            exclude_fs_types: default_exclude_fs_types(),
            exclude_interfaces: default_exclude_interfaces(),
            host: None,
            buffer: None,
            top_n: default_top_n(),
            process_cmdline: false,
        }
    }
}

/// Five by CPU and five by memory: who is behind a spike, in a glance.
pub const DEFAULT_TOP_N: u32 = 5;
const MAX_TOP_N: u32 = 100;

fn default_top_n() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_TOP_N)
}

fn all_sections() -> Vec<Collect> {
    Collect::ALL.to_vec()
}

/// Container and runtime mounts: they describe containers, not the host's disks.
/// The directories themselves too: `/var/lib/docker` is often a mount of its own.
fn default_exclude_mounts() -> Vec<String> {
    [
        "/var/lib/docker",
        "/var/lib/docker/*",
        "/var/lib/containers",
        "/var/lib/containers/*",
        "/run/*",
        "/snap/*",
    ]
    .map(String::from)
    .to_vec()
}

/// Memory-backed and overlay file systems (no disk behind them), and network and FUSE
/// file systems, whose statistics can hang with their server or daemon.
fn default_exclude_fs_types() -> Vec<String> {
    [
        "tmpfs",
        "overlay",
        "squashfs",
        "devtmpfs",
        "ramfs",
        "nsfs",
        "autofs",
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "glusterfs",
        "9p",
        "afs",
        "lustre",
        "fuse",
        "fuse.*",
        "fuseblk",
    ]
    .map(String::from)
    .to_vec()
}

/// Loopback and the per-container virtual ends (Docker veth, Calico, Cilium).
fn default_exclude_interfaces() -> Vec<String> {
    ["lo", "veth*", "cali*", "lxc*"].map(String::from).to_vec()
}

/// Bounds on the sample queue.
const MIN_BUFFER: u32 = 10;
const MAX_BUFFER: u32 = 1_000_000;
/// Rows per INSERT.
const WRITE_BATCH: usize = 500;
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

impl Validate for SystemMetricsConfig {
    fn validate(&self) -> Vec<(Option<Range<usize>>, String)> {
        let mut problems = Vec::new();
        if let Some(b) = &self.buffer
            && !(MIN_BUFFER..=MAX_BUFFER).contains(b.get_ref())
        {
            problems.push((
                Some(b.span()),
                format!(
                    "`buffer` must be between {MIN_BUFFER} and {MAX_BUFFER} samples, found {}",
                    b.get_ref()
                ),
            ));
        }
        let n = *self.top_n.get_ref();
        if !(1..=MAX_TOP_N).contains(&n) {
            problems.push((
                Some(self.top_n.span()),
                format!("`top_n` must be between 1 and {MAX_TOP_N}, found {n}"),
            ));
        }
        if self.collect.is_empty() {
            problems.push((None, "`collect` must name at least one section".into()));
        }
        if let Some(h) = &self.host
            && h.trim().is_empty()
        {
            problems.push((None, "`host` must not be empty".into()));
        }
        problems
    }
}

/// A sample waiting to be written; `seq` tells written entries from ones pushed (or
/// dropped) while a write was in flight.
#[derive(Clone)]
struct Pending {
    seq: u64,
    ts: DateTime<Utc>,
    metrics: String,
}

/// A sample as it is spooled to disk.
#[derive(serde::Serialize, serde::Deserialize)]
struct Spooled {
    ts: DateTime<Utc>,
    metrics: Box<serde_json::value::RawValue>,
}

/// Samples waiting for PostgreSQL, oldest first: in memory up to `capacity`, then (with
/// a spool) on disk, oldest first.
pub struct SampleQueue {
    queue: Mutex<VecDeque<Pending>>,
    next_seq: AtomicU64,
    capacity: usize,
    notify: Notify,
    /// Shutdown: the writer makes its last attempts, then spools what is left.
    closing: CancellationToken,
    /// Where samples go when memory is full and at shutdown.
    spool: OnceLock<Spool>,
    dropped: AtomicU64,
    written: AtomicU64,
    last_drop_log: Mutex<Option<std::time::Instant>>,
    buffered_gauge: Gauge,
    dropped_counter: Counter,
}

impl SampleQueue {
    fn new(capacity: usize, buffered_gauge: Gauge, dropped_counter: Counter) -> Self {
        Self {
            buffered_gauge,
            dropped_counter,
            queue: Mutex::new(VecDeque::new()),
            next_seq: AtomicU64::new(0),
            capacity,
            notify: Notify::new(),
            closing: CancellationToken::new(),
            spool: OnceLock::new(),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            last_drop_log: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps samples that do not fit in memory (and those left at shutdown) in
    /// `spool`, and writes what it holds first.
    pub fn set_spool(&self, spool: Spool) {
        if !spool.is_empty() {
            tracing::info!(spool = %spool.dir().display(), bytes = spool.bytes(), "samples spooled by an earlier run will be written first");
        }
        let _ = self.spool.set(spool);
        self.notify.notify_one();
    }

    fn push(&self, ts: DateTime<Utc>, metrics: String) {
        let (overflow, dropped) = {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let mut q = self.lock();
            q.push_back(Pending { seq, ts, metrics });
            let mut overflow = Vec::new();
            let mut dropped = 0;
            if q.len() > self.capacity {
                if self.spool.get().is_some() {
                    // To disk, the older half at once: few, large segments.
                    let n = (self.capacity / 2).max(1).min(q.len());
                    overflow.extend(q.drain(..n));
                } else {
                    while q.len() > self.capacity {
                        q.pop_front();
                        dropped += 1;
                    }
                }
            }
            self.buffered_gauge.set(q.len() as i64);
            (overflow, dropped)
        };
        let dropped = dropped + self.spill(&overflow);
        self.count_dropped(dropped);
        self.notify.notify_one();
    }

    /// Appends `samples` to the spool; returns how many samples were lost doing so
    /// (the spool's bound, or a disk that refuses).
    fn spill(&self, samples: &[Pending]) -> u64 {
        let Some(spool) = self.spool.get() else {
            return samples.len() as u64;
        };
        if samples.is_empty() {
            return 0;
        }
        let items: Vec<Spooled> = samples
            .iter()
            .filter_map(|p| {
                serde_json::value::RawValue::from_string(p.metrics.clone())
                    .ok()
                    .map(|metrics| Spooled { ts: p.ts, metrics })
            })
            .collect();
        match spool.append(&items) {
            Ok(dropped) => dropped,
            Err(e) => {
                tracing::error!(error = %e, samples = samples.len(), "cannot spool samples; they are lost");
                samples.len() as u64
            }
        }
    }

    fn count_dropped(&self, dropped: u64) {
        if dropped == 0 {
            return;
        }
        self.dropped_counter.inc_by(dropped);
        let total = self.dropped.fetch_add(dropped, Ordering::Relaxed) + dropped;
        let mut last = self.last_drop_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            tracing::warn!(
                dropped_total = total,
                capacity = self.capacity,
                "sample buffer full while PostgreSQL is unreachable; dropping the oldest samples"
            );
            *last = Some(std::time::Instant::now());
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Samples waiting on disk.
    pub fn spooled_bytes(&self) -> u64 {
        self.spool.get().map_or(0, Spool::bytes)
    }
}

pub struct SystemMetrics {
    sampler: Arc<Mutex<Sampler>>,
    /// Set while a sample is being taken (its start, in ms since the Unix epoch; 0:
    /// none), by the blocking thread itself, so a sample that outlives its run (a
    /// timeout cannot stop a blocked read) still keeps the next firings away.
    sampling_since: Arc<AtomicU64>,
    /// A delay the next sample takes (tests: a read that hangs).
    stall: Arc<Mutex<Option<Duration>>>,
    queue: Arc<SampleQueue>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How long shutdown waits for queued samples to reach PostgreSQL.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

impl SystemMetrics {
    /// Starts the writer task; `interval` sizes the default buffer (one hour of samples).
    pub fn new(
        job: &str,
        config: &SystemMetricsConfig,
        store: Store,
        runner_host: &str,
        interval: Option<Duration>,
        metrics: &Metrics,
    ) -> Result<Self, JobError> {
        Self::sampling(job, config, store, runner_host, interval, metrics, None)
    }

    /// Like [`SystemMetrics::new`], sampling the host whose root is at `host_root`.
    pub fn sampling(
        job: &str,
        config: &SystemMetricsConfig,
        store: Store,
        runner_host: &str,
        interval: Option<Duration>,
        metrics: &Metrics,
        host_root: Option<&std::path::Path>,
    ) -> Result<Self, JobError> {
        let sampler =
            Sampler::with_root(config, host_root).map_err(|e| JobError::Failed(e.to_string()))?;
        let capacity = match &config.buffer {
            Some(b) => *b.get_ref(),
            None => {
                let per_hour = interval
                    .filter(|i| !i.is_zero())
                    .map_or(360, |i| (3600.0 / i.as_secs_f64()).ceil() as u32);
                per_hour.clamp(MIN_BUFFER, MAX_BUFFER)
            }
        } as usize;
        let labels = JobLabels {
            job: job.to_owned(),
        };
        let queue = Arc::new(SampleQueue::new(
            capacity,
            metrics.samples_buffered.get_or_create_owned(&labels),
            metrics.samples_dropped.get_or_create_owned(&labels),
        ));
        let host = config
            .host
            .clone()
            .unwrap_or_else(|| runner_host.to_owned());
        let writer = tokio::spawn(write_loop(store, host, queue.clone()));
        Ok(Self {
            sampler: Arc::new(Mutex::new(sampler)),
            sampling_since: Arc::new(AtomicU64::new(0)),
            stall: Arc::new(Mutex::new(None)),
            queue,
            writer: Mutex::new(Some(writer)),
        })
    }

    pub fn queue(&self) -> &Arc<SampleQueue> {
        &self.queue
    }

    /// Makes the next sample take `delay` longer, as a hanging read would (tests).
    pub fn inject_stall(&self, delay: Duration) {
        *self.stall.lock().unwrap_or_else(|p| p.into_inner()) = Some(delay);
    }
}

#[async_trait::async_trait]
impl Job for SystemMetrics {
    async fn run(&self, _ctx: RunContext) -> Result<RunOutcome, JobError> {
        let now_ms = u64::try_from(Utc::now().timestamp_millis())
            .unwrap_or(1)
            .max(1);
        if let Err(since) =
            self.sampling_since
                .compare_exchange(0, now_ms, Ordering::AcqRel, Ordering::Acquire)
        {
            // Never a second thread blocked behind the first.
            return Ok(RunOutcome::Skipped {
                reason: format!(
                    "the previous sample is still being taken ({:.1} s so far); \
                     a read of /proc, /sys or a mount is slow",
                    now_ms.saturating_sub(since) as f64 / 1000.0
                ),
            });
        }
        let sampler = self.sampler.clone();
        let busy = self.sampling_since.clone();
        let stall = self.stall.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Reading /proc and /sys blocks; keep it off the async worker threads.
        let (ts, sample) = tokio::task::spawn_blocking(move || {
            let _done = ClearOnDrop(busy);
            if let Some(delay) = stall {
                std::thread::sleep(delay);
            }
            let mut s = sampler.lock().unwrap_or_else(|p| p.into_inner());
            let sample = s.sample();
            (Utc::now(), sample)
        })
        .await
        .map_err(|e| JobError::Failed(format!("sampling: {e}")))?;
        let metrics = serde_json::to_string(&sample)
            .map_err(|e| JobError::Failed(format!("encoding the sample: {e}")))?;
        self.queue.push(ts, metrics);
        Ok(RunOutcome::Completed { items: Some(1) })
    }

    /// Writes what is queued, trying for at most [`SHUTDOWN_FLUSH`]; spools the rest.
    async fn shutdown(&self) {
        self.queue.closing.cancel();
        self.queue.notify.notify_one();
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = writer {
            let abort = writer.abort_handle();
            if tokio::time::timeout(SHUTDOWN_FLUSH + Duration::from_secs(5), writer)
                .await
                .is_err()
            {
                abort.abort();
                tracing::error!(
                    lost = self.queue.len(),
                    "samples neither written nor spooled before shutdown"
                );
            }
        }
    }
}

/// Marks the sample finished however the sampling thread ends.
struct ClearOnDrop(Arc<AtomicU64>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

impl Drop for SystemMetrics {
    fn drop(&mut self) {
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.abort();
        }
    }
}

/// Writes spooled samples (oldest), then queued ones, in batches, retrying while
/// PostgreSQL is away; at shutdown, tries for [`SHUTDOWN_FLUSH`] and spools the rest.
async fn write_loop(store: Store, host: String, queue: Arc<SampleQueue>) {
    let mut delay = Duration::from_millis(100);
    loop {
        if queue.closing.is_cancelled() {
            return finish(&store, &host, &queue).await;
        }
        // What an earlier run or a full buffer left on disk is older: it goes first.
        if let Some(spool) = queue.spool.get() {
            match spool.oldest::<Spooled>() {
                Ok(Some((segment, items, bad))) => {
                    if bad > 0 {
                        tracing::warn!(bad, spool = %spool.dir().display(), "unreadable spooled samples skipped");
                    }
                    let mut written = true;
                    for chunk in items.chunks(WRITE_BATCH) {
                        let rows: Vec<(DateTime<Utc>, &str)> =
                            chunk.iter().map(|s| (s.ts, s.metrics.get())).collect();
                        match write(&store, &host, &rows, &queue.closing).await {
                            Ok(true) => {
                                queue
                                    .written
                                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                            }
                            // Shutdown began: the segment stays for the next start.
                            Ok(false) => {
                                written = false;
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, retry_in = ?delay, "cannot write spooled samples; they stay on disk");
                                written = false;
                                break;
                            }
                        }
                    }
                    if written {
                        if let Err(e) = spool.remove(segment) {
                            tracing::error!(error = %e, "cannot remove a written spool segment");
                        }
                        delay = Duration::from_millis(100);
                    } else {
                        pause(&queue, &mut delay).await;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "cannot read the sample spool"),
            }
        }
        let batch: Vec<Pending> = queue.lock().iter().take(WRITE_BATCH).cloned().collect();
        if batch.is_empty() {
            tokio::select! {
                () = queue.notify.notified() => {}
                () = queue.closing.cancelled() => {}
            }
            continue;
        }
        let rows: Vec<(DateTime<Utc>, &str)> =
            batch.iter().map(|p| (p.ts, p.metrics.as_str())).collect();
        match write(&store, &host, &rows, &queue.closing).await {
            Ok(true) => {
                remove_written(&queue, &batch);
                delay = Duration::from_millis(100);
            }
            // Shutdown began mid-write: `finish` makes the last attempts.
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, queued = queue.len(), retry_in = ?delay, "cannot write samples; they stay queued");
                pause(&queue, &mut delay).await;
            }
        }
    }
}

/// One write, given up when shutdown begins (`Ok(false)`: then [`finish`] takes over).
async fn write(
    store: &Store,
    host: &str,
    rows: &[(DateTime<Utc>, &str)],
    closing: &CancellationToken,
) -> Result<bool, crate::store::StoreError> {
    tokio::select! {
        r = store.insert_samples(host, rows) => r.map(|()| true),
        () = closing.cancelled() => Ok(false),
    }
}

/// Removes exactly the written entries: ones dropped or spooled for room while the
/// write was in flight are gone already.
fn remove_written(queue: &SampleQueue, batch: &[Pending]) {
    let last = batch.last().map_or(0, |p| p.seq);
    let mut q = queue.lock();
    while q.front().is_some_and(|p| p.seq <= last) {
        q.pop_front();
    }
    queue.buffered_gauge.set(q.len() as i64);
    drop(q);
    queue
        .written
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
}

async fn pause(queue: &SampleQueue, delay: &mut Duration) {
    tokio::select! {
        () = tokio::time::sleep(*delay) => {}
        () = queue.closing.cancelled() => {}
    }
    *delay = (*delay * 2).min(MAX_RETRY_DELAY);
}

/// At shutdown: write what is in memory for at most [`SHUTDOWN_FLUSH`], spool the rest.
async fn finish(store: &Store, host: &str, queue: &SampleQueue) {
    let deadline = tokio::time::Instant::now() + SHUTDOWN_FLUSH;
    loop {
        let batch: Vec<Pending> = queue.lock().iter().take(WRITE_BATCH).cloned().collect();
        if batch.is_empty() {
            return;
        }
        let rows: Vec<(DateTime<Utc>, &str)> =
            batch.iter().map(|p| (p.ts, p.metrics.as_str())).collect();
        match tokio::time::timeout_at(deadline, store.insert_samples(host, &rows)).await {
            Ok(Ok(())) => remove_written(queue, &batch),
            _ => break,
        }
    }
    let left: Vec<Pending> = queue.lock().drain(..).collect();
    queue.buffered_gauge.set(0);
    if queue.spool.get().is_some() {
        let lost = queue.spill(&left);
        queue.count_dropped(lost);
        tracing::info!(
            samples = left.len() as u64 - lost,
            "PostgreSQL unreachable at shutdown: samples spooled to disk for the next start"
        );
    } else if !left.is_empty() {
        queue.count_dropped(left.len() as u64);
        tracing::error!(lost = left.len(), "shutting down with samples not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sections_name_is_the_one_collect_takes() {
        for c in Collect::ALL {
            let parsed: Collect = serde_json::from_value(serde_json::json!(c.name())).unwrap();
            assert_eq!(parsed, c);
        }
    }
}
