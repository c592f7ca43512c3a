//! Log lines to stdout (or stderr) without ever waiting for the reader.
//!
//! A container's log agent, a pipe into `less`, or a full disk behind a redirect can
//! stop reading; a blocking `write` would then stall whatever logged: a run, the
//! timer, the gateway. Here recording a line appends it to a queue capped in bytes,
//! and a thread of its own does the blocking writes. When the reader falls behind,
//! the oldest queued lines are dropped and counted (`vigil_log_dropped_total`), as the
//! Loki queue does, with a warning at most once a minute once lines flow again.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::LogTarget;

/// Bytes of log lines held while the reader is slow: a few thousand lines.
pub const DEFAULT_CAP_BYTES: usize = 1 << 20;
const WARN_EVERY: Duration = Duration::from_secs(60);

struct State {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Dropped since the last warning was written.
    dropped_unreported: u64,
    last_warning: Option<Instant>,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    /// Signalled when the writer has written everything it took.
    idle: Condvar,
    writing: AtomicBool,
    closed: AtomicBool,
    cap: usize,
    dropped: AtomicU64,
    dropped_counter: Counter,
    lines_counter: Counter,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The queue's producer side. Cheap to clone.
#[derive(Clone)]
pub struct LineWriter {
    shared: Arc<Shared>,
}

/// Owns the writing thread; [`WriterHandle::shutdown`] flushes within a bound.
pub struct WriterHandle {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the writing thread for `target`, with the queue capped at `cap` bytes.
pub fn start(
    target: LogTarget,
    cap: usize,
    lines_counter: Counter,
    dropped_counter: Counter,
) -> std::io::Result<(LineWriter, WriterHandle)> {
    start_with(
        move || -> Box<dyn Write + Send> {
            match target {
                LogTarget::Stdout => Box::new(std::io::stdout()),
                LogTarget::Stderr => Box::new(std::io::stderr()),
            }
        },
        cap,
        lines_counter,
        dropped_counter,
    )
}

/// Like [`start`], writing to what `open` gives (tests: a pipe they control).
pub fn start_with<F>(
    open: F,
    cap: usize,
    lines_counter: Counter,
    dropped_counter: Counter,
) -> std::io::Result<(LineWriter, WriterHandle)>
where
    F: FnOnce() -> Box<dyn Write + Send> + Send + 'static,
{
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            lines: VecDeque::new(),
            bytes: 0,
            dropped_unreported: 0,
            last_warning: None,
        }),
        ready: Condvar::new(),
        idle: Condvar::new(),
        writing: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        cap: cap.max(1024),
        dropped: AtomicU64::new(0),
        dropped_counter,
        lines_counter,
    });
    let for_thread = shared.clone();
    let thread = std::thread::Builder::new()
        .name("vigil-log-writer".into())
        .spawn(move || write_loop(&for_thread, open()))?;
    Ok((
        LineWriter {
            shared: shared.clone(),
        },
        WriterHandle {
            shared,
            thread: Some(thread),
        },
    ))
}

impl LineWriter {
    /// Queues one line (with its newline); never waits for the reader.
    pub fn push(&self, line: Vec<u8>) {
        let s = &self.shared;
        s.lines_counter.inc();
        let dropped = {
            let mut state = s.lock();
            state.bytes += line.len();
            state.lines.push_back(line);
            let mut dropped = 0;
            while state.bytes > s.cap && state.lines.len() > 1 {
                if let Some(old) = state.lines.pop_front() {
                    state.bytes -= old.len();
                    dropped += 1;
                }
            }
            state.dropped_unreported += dropped;
            dropped
        };
        if dropped > 0 {
            s.dropped.fetch_add(dropped, Ordering::Relaxed);
            s.dropped_counter.inc_by(dropped);
        }
        s.ready.notify_one();
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

fn write_loop(shared: &Shared, mut out: Box<dyn Write + Send>) {
    loop {
        let (batch, note) = {
            let mut state = shared.lock();
            while state.lines.is_empty() && !shared.closed.load(Ordering::Acquire) {
                shared.idle.notify_all();
                state = shared.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.lines.is_empty() {
                shared.idle.notify_all();
                return;
            }
            shared.writing.store(true, Ordering::Release);
            let batch: Vec<Vec<u8>> = state.lines.drain(..).collect();
            state.bytes = 0;
            // Say what was lost, where it was lost, at most once a minute.
            let note = (state.dropped_unreported > 0
                && state.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY))
            .then(|| {
                let n = std::mem::take(&mut state.dropped_unreported);
                state.last_warning = Some(Instant::now());
                n
            });
            (batch, note)
        };
        if let Some(n) = note {
            let warning = format!(
                "{{\"ts\":\"{}\",\"level\":\"warn\",\"target\":\"vigil::telemetry\",\"message\":\"the log reader fell behind; dropped the oldest log lines\",\"dropped\":{n}}}\n",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            );
            let _ = out.write_all(warning.as_bytes());
        }
        for line in &batch {
            // A reader that is gone for good (EPIPE) has nowhere better to be told.
            if out.write_all(line).is_err() {
                break;
            }
        }
        let _ = out.flush();
        shared.writing.store(false, Ordering::Release);
    }
}

impl WriterHandle {
    /// Waits up to `wait` for the queued lines to be written, then stops the thread
    /// (a reader that never comes back cannot hold vigil's exit).
    pub fn shutdown(mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        {
            let mut state = self.shared.lock();
            while (!state.lines.is_empty() || self.shared.writing.load(Ordering::Acquire))
                && Instant::now() < deadline
            {
                let left = deadline.saturating_duration_since(Instant::now());
                state = self
                    .shared
                    .idle
                    .wait_timeout(state, left.min(Duration::from_millis(50)))
                    .map(|(s, _)| s)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        self.shared.closed.store(true, Ordering::Release);
        self.shared.ready.notify_all();
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// A `MakeWriter` for tracing-subscriber's text format: each event is formatted into
/// a buffer and queued as one line when the writer is dropped.
#[derive(Clone)]
pub struct Queued(pub LineWriter);

pub struct QueuedLine {
    writer: LineWriter,
    buf: Vec<u8>,
}

impl Write for QueuedLine {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let text = String::from_utf8_lossy(&self.buf);
            let line = crate::config::redact(&text).into_owned().into_bytes();
            self.writer.push(line);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Queued {
    type Writer = QueuedLine;

    fn make_writer(&'a self) -> QueuedLine {
        QueuedLine {
            writer: self.0.clone(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A writer that blocks until released, then passes bytes to a channel.
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        out: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Gate {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            let _ = self.out.send(data.to_vec());
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_never_blocks_logging_and_drops_are_counted() {
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let gate = Gate {
            open: open.clone(),
            out: tx,
        };
        let dropped = Counter::default();
        let (w, handle) = start_with(
            move || Box::new(gate),
            10 * 1024,
            Counter::default(),
            dropped.clone(),
        )
        .unwrap();
        let started = Instant::now();
        for i in 0..10_000 {
            w.push(format!("{i:099}\n").into_bytes());
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "pushing never waits"
        );
        // At most the cap (about 100 lines) waits, beside the batch the writer took
        // before it blocked; the oldest of the rest went.
        assert!(w.dropped() >= 9_700, "{}", w.dropped());
        assert_eq!(dropped.get(), w.dropped());
        // The reader comes back: what is left is written, newest last, with a note.
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        handle.shutdown(Duration::from_secs(5));
        let written: Vec<String> = rx
            .try_iter()
            .map(|b| String::from_utf8(b).unwrap())
            .collect();
        let all = written.concat();
        assert!(all.contains("dropped the oldest log lines"), "{all}");
        assert!(all.ends_with(&format!("{:099}\n", 9_999)));
        // Every line is either written or counted as dropped.
        let lines = all
            .lines()
            .filter(|l| !l.contains("dropped the oldest"))
            .count() as u64;
        assert_eq!(lines + w.dropped(), 10_000);
    }
}
