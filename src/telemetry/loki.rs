//! Direct shipping to Loki: every event, labelled `service`, `host`, `level` (and `job`
//! inside a run), pushed as snappy-compressed protobuf to `/loki/api/v1/push`.
//!
//! Why not tracing-loki's layer: in 0.2.7 its labels are fixed when the layer is built
//! (no per-job label), its queue grows without bound while Loki is away (its issue
//! #32), and a full channel drops events without counting them. Here:
//! - the queue is capped in bytes; past the cap the oldest events go, each counted in
//!   `vigil_loki_dropped_total`, with a warning at most once a minute;
//! - recording an event never waits: it formats and appends under a short lock;
//! - a dedicated thread (its own small runtime) pushes batches, retries 429, 5xx,
//!   timeouts and refused connections with backoff, and resumes when Loki is back;
//! - the wire format is Loki's own protobuf types (`loki-api`, the crate tracing-loki
//!   uses) and snappy's block format (`snap`).

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use loki_api::logproto::{EntryAdapter, PushRequest, StreamAdapter};
use loki_api::prost::Message as _;
use loki_api::prost_types::Timestamp;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use super::metrics::Metrics;

/// Shipping settings.
#[derive(Debug, Clone)]
pub struct LokiOptions {
    /// The push endpoint (`…/loki/api/v1/push`).
    pub push_url: String,
    /// Static labels: `service`, `host` and any extra ones.
    pub labels: Vec<(String, String)>,
    /// Most bytes of log lines held while Loki is slow or away.
    pub max_buffer_bytes: usize,
    /// How long one push may take before it counts as failed.
    pub request_timeout: Duration,
    /// Longest wait between pushes while events trickle in.
    pub batch_wait: Duration,
}

impl LokiOptions {
    /// Events are small; 8 MiB holds tens of thousands of them.
    pub const DEFAULT_MAX_BUFFER_BYTES: usize = 8 << 20;
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_secs(1);

    /// `LOKI_URL` may be the server (`http://loki:3100`) or the push endpoint itself.
    pub fn push_url(base: &str) -> String {
        let base = base.trim_end_matches('/');
        if base.ends_with("/loki/api/v1/push") {
            base.to_owned()
        } else {
            format!("{base}/loki/api/v1/push")
        }
    }
}

/// Accounting per queued event beyond its text: its slot in the metadata queue and
/// that queue's spare capacity (it grows by doubling).
const META_COST: usize = 2 * std::mem::size_of::<Meta>();
/// Most events per push, and most bytes of lines per push.
const MAX_BATCH_ENTRIES: usize = 5_000;
const MAX_BATCH_BYTES: usize = 1 << 20;
/// While pushes fail, probe with small batches: a refused push then costs little.
const PROBE_BATCH_ENTRIES: usize = 100;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const WARN_EVERY: Duration = Duration::from_secs(60);

/// An event in flight: taken out of the queue for one push.
struct Entry {
    labels: Arc<str>,
    at: SystemTime,
    line: String,
}

/// A queued event; its line lives in [`Inner::data`].
struct Meta {
    labels: Arc<str>,
    at: SystemTime,
    len: usize,
}

/// Queued events: all lines in one byte ring (one allocation, reserved once, so memory
/// is the cap and not the cap times the allocator's overhead per line), and a small
/// record per event. The batch in flight is held apart and fits in the room the
/// configured cap leaves beside the queue's own.
#[derive(Default)]
struct Inner {
    data: VecDeque<u8>,
    meta: VecDeque<Meta>,
}

impl Inner {
    fn bytes(&self) -> usize {
        self.data.len() + self.meta.len() * META_COST
    }

    fn push_back(&mut self, labels: Arc<str>, at: SystemTime, line: &str) {
        self.data.extend(line.as_bytes());
        self.meta.push_back(Meta {
            labels,
            at,
            len: line.len(),
        });
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let m = self.meta.pop_front()?;
        let bytes: Vec<u8> = self.data.drain(..m.len).collect();
        Some(Entry {
            labels: m.labels,
            at: m.at,
            // Only whole `String`s go in, so what comes out is valid UTF-8.
            line: String::from_utf8(bytes).unwrap_or_default(),
        })
    }

    fn drop_front(&mut self) -> bool {
        match self.meta.pop_front() {
            Some(m) => {
                self.data.drain(..m.len);
                true
            }
            None => false,
        }
    }

    /// Puts a failed batch back in front, in its order.
    fn requeue(&mut self, batch: Vec<Entry>) {
        for e in batch.into_iter().rev() {
            for &b in e.line.as_bytes().iter().rev() {
                self.data.push_front(b);
            }
            self.meta.push_front(Meta {
                labels: e.labels,
                at: e.at,
                len: e.line.len(),
            });
        }
    }
}

struct Queue {
    inner: Mutex<Inner>,
    /// Bytes the queue may hold: the configured cap less room for one batch in flight
    /// (its lines, and its encoded and compressed copies).
    cap: usize,
    /// Most bytes of lines in one push.
    batch_bytes: usize,
    notify: Notify,
    closed: AtomicBool,
    dropped: AtomicU64,
    delivered: AtomicU64,
    dropped_counter: Counter,
    events_counter: Counter,
    last_warning: Mutex<Option<Instant>>,
    /// Label strings already rendered, by level, then job ("" outside runs).
    label_cache: Mutex<HashMap<&'static str, HashMap<String, Arc<str>>>>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, labels: Arc<str>, at: SystemTime, line: &str) {
        self.events_counter.inc();
        let dropped = {
            let mut inner = self.lock();
            inner.push_back(labels, at, line);
            self.trim(&mut inner)
        };
        self.count_dropped(dropped);
        self.notify.notify_one();
    }

    /// Drops the oldest queued entries until the cap holds; returns how many.
    fn trim(&self, inner: &mut Inner) -> u64 {
        let mut dropped = 0;
        while inner.bytes() > self.cap && inner.drop_front() {
            dropped += 1;
        }
        dropped
    }

    fn count_dropped(&self, n: u64) {
        if n == 0 {
            return;
        }
        let total = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
        self.dropped_counter.inc_by(n);
        let warn = {
            let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= WARN_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        // Logged with no lock held: this event comes back through the layer.
        if warn {
            tracing::warn!(
                dropped_total = total,
                cap_bytes = self.cap,
                "Loki is slow or unreachable; dropping the oldest queued log events"
            );
        }
    }

    fn labels(&self, base: &str, level: &'static str, job: Option<&str>) -> Arc<str> {
        let mut cache = self.label_cache.lock().unwrap_or_else(|p| p.into_inner());
        let by_job = cache.entry(level).or_default();
        if let Some(l) = by_job.get(job.unwrap_or("")) {
            return l.clone();
        }
        let mut s = String::from("{");
        s.push_str(base);
        let _ = write!(s, ",level=\"{level}\"");
        if let Some(job) = job {
            let _ = write!(s, ",job=\"{}\"", escape(job));
        }
        s.push('}');
        let rendered: Arc<str> = s.into();
        // Jobs come and go with reloads, but their number stays small.
        by_job.insert(job.unwrap_or("").to_owned(), rendered.clone());
        rendered
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Where formatted events go to be shipped (see `json::EventSink`).
pub struct LokiSink {
    queue: Arc<Queue>,
    base_labels: String,
}

impl LokiSink {
    /// Queues one line; never waits.
    pub fn send(&self, level: &tracing::Level, job: Option<&str>, at: SystemTime, line: &str) {
        let level = match *level {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warn",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        let labels = self.queue.labels(&self.base_labels, level, job);
        self.queue.push(labels, at, line);
    }
}

/// Owns the shipping thread; [`LokiHandle::shutdown`] flushes within a bound.
pub struct LokiHandle {
    queue: Arc<Queue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LokiHandle {
    /// Events dropped so far (also `vigil_loki_dropped_total`).
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Events Loki accepted so far.
    pub fn delivered(&self) -> u64 {
        self.queue.delivered.load(Ordering::Relaxed)
    }

    /// Events waiting (queued or in flight).
    pub fn queued(&self) -> usize {
        self.queue.lock().meta.len()
    }

    /// Stops shipping after one last attempt to deliver what is queued, waiting at most
    /// `wait`; what is still undelivered then is counted as dropped.
    pub fn shutdown(mut self, wait: Duration) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.notify.notify_one();
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + wait;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        let left = {
            let mut inner = self.queue.lock();
            let n = inner.meta.len() as u64;
            *inner = Inner::default();
            n
        };
        if left > 0 {
            self.queue.dropped.fetch_add(left, Ordering::Relaxed);
            self.queue.dropped_counter.inc_by(left);
            eprintln!("vigil: {left} log events not delivered to Loki before shutdown");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LokiError {
    #[error("cannot start the Loki shipper: {0}")]
    Start(String),
}

/// Builds the layer and starts the shipping thread; counts go to `metrics`
/// (`vigil_loki_events_total`, `vigil_loki_dropped_total`).
pub fn start(options: LokiOptions, metrics: &Metrics) -> Result<(LokiSink, LokiHandle), LokiError> {
    let total = options.max_buffer_bytes.max(64 << 10);
    let batch_bytes = (total / 8).min(MAX_BATCH_BYTES);
    let cap = total - 3 * batch_bytes;
    let queue = Arc::new(Queue {
        inner: Mutex::new(Inner {
            // Reserved once: the ring never reallocates (pages count only once used).
            data: VecDeque::with_capacity(cap),
            meta: VecDeque::new(),
        }),
        cap,
        batch_bytes,
        notify: Notify::new(),
        closed: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        dropped_counter: metrics.loki_dropped.clone(),
        events_counter: metrics.loki_events.clone(),
        last_warning: Mutex::new(None),
        label_cache: Mutex::new(HashMap::new()),
    });
    let base_labels = options
        .labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",");
    // reqwest uses the process's rustls provider; install ring's (already linked for
    // MongoDB and PostgreSQL TLS). An error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(options.request_timeout)
        .connect_timeout(options.request_timeout)
        .build()
        .map_err(|e| LokiError::Start(e.to_string()))?;
    let shipper_queue = queue.clone();
    let thread = std::thread::Builder::new()
        .name("vigil-loki".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(ship(shipper_queue, client, options)),
                Err(e) => eprintln!("vigil: Loki shipping disabled: {e}"),
            }
        })
        .map_err(|e| LokiError::Start(e.to_string()))?;
    Ok((
        LokiSink {
            queue: queue.clone(),
            base_labels,
        },
        LokiHandle {
            queue,
            thread: Some(thread),
        },
    ))
}

enum Outcome {
    Delivered,
    /// Worth trying again: refused, timed out, 429, 5xx.
    Retry(String),
    /// Loki refused the batch itself (4xx): retrying cannot help.
    Rejected(String),
}

async fn ship(queue: Arc<Queue>, client: reqwest::Client, options: LokiOptions) {
    let mut backoff = Duration::from_millis(250);
    let mut last_failure_log: Option<Instant> = None;
    loop {
        let closed = queue.closed.load(Ordering::Acquire);
        let failing = backoff > Duration::from_millis(250);
        let batch = take_batch(
            &queue,
            if failing {
                PROBE_BATCH_ENTRIES
            } else {
                MAX_BATCH_ENTRIES
            },
        );
        if batch.is_empty() {
            if closed {
                return;
            }
            let _ = tokio::time::timeout(options.batch_wait, queue.notify.notified()).await;
            continue;
        }
        let (outcome, batch) = push(&client, &options.push_url, batch).await;
        match outcome {
            Outcome::Delivered => {
                queue
                    .delivered
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                backoff = Duration::from_millis(250);
            }
            Outcome::Rejected(why) => {
                eprintln!(
                    "vigil: Loki rejected {} log events: {}",
                    batch.len(),
                    crate::config::redact(&why)
                );
                queue.count_dropped(batch.len() as u64);
            }
            Outcome::Retry(why) => {
                // Back at the front, oldest first; the cap then drops the oldest.
                let dropped = {
                    let mut inner = queue.lock();
                    inner.requeue(batch);
                    queue.trim(&mut inner)
                };
                queue.count_dropped(dropped);
                if last_failure_log.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    // To stderr, not through tracing: this is about the log pipe itself.
                    eprintln!(
                        "vigil: cannot push logs to Loki ({}); retrying",
                        crate::config::redact(&why)
                    );
                    last_failure_log = Some(Instant::now());
                }
                if closed {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    // Shutting down: make the last attempt now.
                    () = wait_closed(&queue) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn wait_closed(queue: &Queue) {
    while !queue.closed.load(Ordering::Acquire) {
        queue.notify.notified().await;
    }
}

/// Moves up to a batch of the oldest entries out of the queue.
fn take_batch(queue: &Queue, max_entries: usize) -> Vec<Entry> {
    let mut inner = queue.lock();
    let mut batch = Vec::new();
    let mut bytes = 0;
    while batch.len() < max_entries && bytes < queue.batch_bytes {
        match inner.pop_front() {
            Some(e) => {
                bytes += e.line.len();
                batch.push(e);
            }
            None => break,
        }
    }
    batch
}

/// Encodes `batch` as a PushRequest (one stream per label set, entries in order),
/// snappy-compressed, and posts it; hands the batch back for a retry.
async fn push(client: &reqwest::Client, url: &str, mut batch: Vec<Entry>) -> (Outcome, Vec<Entry>) {
    let body = match encode(&mut batch) {
        Ok(b) => b,
        Err(e) => {
            return (
                Outcome::Rejected(format!("cannot compress the batch: {e}")),
                batch,
            );
        }
    };
    (send(client, url, body).await, batch)
}

async fn send(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Outcome {
    let response = client
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .body(body)
        .send()
        .await;
    match response {
        Ok(r) if r.status().is_success() => Outcome::Delivered,
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            let why = format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            );
            if status.as_u16() == 429 || status.is_server_error() {
                Outcome::Retry(why)
            } else {
                Outcome::Rejected(why)
            }
        }
        Err(e) => Outcome::Retry(e.to_string()),
    }
}

/// The lines move into the request and back out after encoding, so a batch is never
/// held twice.
fn encode(batch: &mut [Entry]) -> Result<Vec<u8>, snap::Error> {
    let mut streams: Vec<StreamAdapter> = Vec::new();
    let mut index: HashMap<Arc<str>, usize> = HashMap::new();
    let mut placed: Vec<usize> = Vec::with_capacity(batch.len());
    for e in batch.iter_mut() {
        let i = *index.entry(e.labels.clone()).or_insert_with(|| {
            streams.push(StreamAdapter {
                labels: e.labels.to_string(),
                entries: Vec::new(),
                hash: 0,
            });
            streams.len() - 1
        });
        let since =
            e.at.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
        streams[i].entries.push(EntryAdapter {
            timestamp: Some(Timestamp {
                seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
            }),
            line: std::mem::take(&mut e.line),
        });
        placed.push(i);
    }
    let mut request = PushRequest { streams };
    let encoded = request.encode_to_vec();
    // Lines back where they came from, in order within each stream.
    let mut cursors = vec![0usize; request.streams.len()];
    for (e, &i) in batch.iter_mut().zip(&placed) {
        e.line = std::mem::take(&mut request.streams[i].entries[cursors[i]].line);
        cursors[i] += 1;
    }
    snap::raw::Encoder::new().compress_vec(&encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(cap: usize) -> Queue {
        Queue {
            inner: Mutex::new(Inner::default()),
            cap,
            batch_bytes: MAX_BATCH_BYTES,
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped_counter: Counter::default(),
            events_counter: Counter::default(),
            last_warning: Mutex::new(Some(Instant::now())),
            label_cache: Mutex::new(HashMap::new()),
        }
    }

    fn push(q: &Queue, n: usize) {
        q.push(
            "{service=\"vigil\"}".into(),
            SystemTime::now(),
            &format!("{n:0100}"),
        );
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let q = queue(10 * (100 + META_COST));
        for n in 0..25 {
            push(&q, n);
        }
        let mut inner = q.lock();
        assert_eq!(inner.meta.len(), 10);
        assert_eq!(inner.data.len(), 1000);
        assert_eq!(inner.pop_front().unwrap().line, format!("{:0100}", 15));
        assert_eq!(q.dropped.load(Ordering::Relaxed), 15);
        assert_eq!(q.dropped_counter.get(), 15);
    }

    #[test]
    fn a_failed_batch_goes_back_in_front_and_the_cap_drops_the_oldest() {
        let q = queue(10 * (100 + META_COST));
        for n in 0..10 {
            push(&q, n);
        }
        let batch = take_batch(&q, MAX_BATCH_ENTRIES);
        assert_eq!(batch.len(), 10);
        // While those ten are in flight, five more arrive.
        for n in 10..15 {
            push(&q, n);
        }
        assert_eq!(q.dropped.load(Ordering::Relaxed), 0);
        // The push fails: the batch returns in front, and the five oldest make room.
        let dropped = {
            let mut inner = q.lock();
            inner.requeue(batch);
            q.trim(&mut inner)
        };
        assert_eq!(dropped, 5);
        let mut inner = q.lock();
        let lines: Vec<String> = std::iter::from_fn(|| inner.pop_front())
            .map(|e| e.line)
            .collect();
        let first: Vec<&str> = lines.iter().map(|l| &l[95..]).collect();
        assert_eq!(
            first,
            [
                "00005", "00006", "00007", "00008", "00009", "00010", "00011", "00012", "00013",
                "00014"
            ]
        );
    }

    #[test]
    fn labels_are_rendered_once_per_level_and_job_and_escaped() {
        let q = queue(1 << 20);
        let a = q.labels("service=\"vigil\",host=\"h\"", "info", Some("my\"job"));
        assert_eq!(
            &*a,
            "{service=\"vigil\",host=\"h\",level=\"info\",job=\"my\\\"job\"}"
        );
        let b = q.labels("service=\"vigil\",host=\"h\"", "info", Some("my\"job"));
        assert!(Arc::ptr_eq(&a, &b));
        let c = q.labels("service=\"vigil\",host=\"h\"", "warn", None);
        assert_eq!(&*c, "{service=\"vigil\",host=\"h\",level=\"warn\"}");
    }

    #[test]
    fn encoding_groups_streams_keeps_order_and_gives_the_lines_back() {
        let mut batch: Vec<Entry> = (0..6)
            .map(|n| Entry {
                labels: if n % 2 == 0 {
                    "{a=\"1\"}".into()
                } else {
                    "{a=\"2\"}".into()
                },
                at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + n),
                line: format!("line {n}"),
            })
            .collect();
        let body = encode(&mut batch).unwrap();
        assert_eq!(
            batch.iter().map(|e| e.line.as_str()).collect::<Vec<_>>(),
            ["line 0", "line 1", "line 2", "line 3", "line 4", "line 5"]
        );
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        let request = PushRequest::decode(raw.as_slice()).unwrap();
        assert_eq!(request.streams.len(), 2);
        assert_eq!(request.streams[0].labels, "{a=\"1\"}");
        let lines: Vec<&str> = request.streams[0]
            .entries
            .iter()
            .map(|e| e.line.as_str())
            .collect();
        assert_eq!(lines, ["line 0", "line 2", "line 4"]);
        let ts = request.streams[1].entries[0].timestamp.unwrap();
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 1_000_000));
    }

    #[test]
    fn push_url_accepts_the_server_or_the_endpoint() {
        assert_eq!(
            LokiOptions::push_url("http://loki:3100"),
            "http://loki:3100/loki/api/v1/push"
        );
        assert_eq!(
            LokiOptions::push_url("http://loki:3100/"),
            "http://loki:3100/loki/api/v1/push"
        );
        assert_eq!(
            LokiOptions::push_url("https://logs.example/loki/api/v1/push"),
            "https://logs.example/loki/api/v1/push"
        );
    }
}
