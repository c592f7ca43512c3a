//! vigil's own metrics, served by the gateway at `/metrics` in the Prometheus
//! (OpenMetrics) text format. Names follow `vigil_<noun>_<unit>`; counters end `_total`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobStatusLabels {
    pub job: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobStateLabels {
    pub job: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotifierOutcomeLabels {
    pub notifier: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobOutcomeLabels {
    pub job: String,
    pub outcome: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route template (`/api/jobs/{name}`), never the raw path: bounded cardinality.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunIoLabels {
    pub job: String,
    /// `read` or `write`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Run durations: 1 ms to about 1.2 hours.
fn run_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// CPU seconds of a run: 10 ms to about 45 minutes.
fn run_cpu_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

/// Bytes of a run (peak memory, I/O): 1 MiB to 16 GiB.
fn run_bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1048576.0, 4.0, 8))
}

/// Scheduler lag: 1 ms to about 16 s.
fn lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// HTTP latency: 100 µs to about 1.6 s.
fn http_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

pub struct Inner {
    registry: Registry,
    pub runs: Family<JobStatusLabels, Counter>,
    pub run_duration: HistogramFamily<JobLabels>,
    pub run_items: Family<JobLabels, Counter>,
    pub run_cpu: HistogramFamily<JobLabels>,
    pub run_peak_memory: HistogramFamily<JobLabels>,
    pub run_io: HistogramFamily<RunIoLabels>,
    pub scheduler_lag: HistogramFamily<JobLabels>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<RouteLabels>,
    pub samples_buffered: Family<JobLabels, Gauge>,
    pub samples_dropped: Family<JobLabels, Counter>,
    pub ledger_queued: Gauge,
    pub ledger_dropped: Counter,
    pub ledger_outputs_dropped: Counter,
    pub loki_dropped: Counter,
    pub loki_events: Counter,
    pub log_lines: Counter,
    pub log_dropped: Counter,
    pub job_last_success: Family<JobLabels, FloatGauge>,
    pub job_next_fire: Family<JobLabels, FloatGauge>,
    pub job_running: Family<JobLabels, Gauge>,
    pub job_health: Family<JobStateLabels, Gauge>,
    pub alert_deliveries: Family<NotifierOutcomeLabels, Counter>,
    pub heartbeats: Family<JobOutcomeLabels, Counter>,
    pub callbacks: Family<OutcomeLabels, Counter>,
}

/// The registry and every metric in it. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vigil");
        let runs = Family::<JobStatusLabels, Counter>::default();
        registry.register(
            "runs",
            "Job run attempts finished, and firings skipped, by job and status",
            runs.clone(),
        );
        let run_duration: HistogramFamily<JobLabels> =
            Family::new_with_constructor(run_duration_histogram);
        registry.register(
            "run_duration_seconds",
            "Duration of job run attempts",
            run_duration.clone(),
        );
        let run_cpu: HistogramFamily<JobLabels> = Family::new_with_constructor(run_cpu_histogram);
        registry.register(
            "run_cpu_seconds",
            "CPU time (user and system) of each measured run's process tree",
            run_cpu.clone(),
        );
        let run_peak_memory: HistogramFamily<JobLabels> =
            Family::new_with_constructor(run_bytes_histogram);
        registry.register(
            "run_peak_memory_bytes",
            "Peak resident memory of each measured run's process tree",
            run_peak_memory.clone(),
        );
        let run_io: HistogramFamily<RunIoLabels> =
            Family::new_with_constructor(run_bytes_histogram);
        registry.register(
            "run_io_bytes",
            "Bytes each measured run's process tree read and wrote",
            run_io.clone(),
        );
        let run_items = Family::<JobLabels, Counter>::default();
        registry.register(
            "run_items",
            "Items reported by successful runs (rows, documents, samples)",
            run_items.clone(),
        );
        let scheduler_lag: HistogramFamily<JobLabels> = Family::new_with_constructor(lag_histogram);
        registry.register(
            "scheduler_lag_seconds",
            "Delay between a firing's scheduled time and its run's start",
            scheduler_lag.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered by the gateway",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(http_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer gateway requests",
            http_duration.clone(),
        );
        let samples_buffered = Family::<JobLabels, Gauge>::default();
        registry.register(
            "metrics_samples_buffered",
            "Host samples waiting to be written to PostgreSQL",
            samples_buffered.clone(),
        );
        let samples_dropped = Family::<JobLabels, Counter>::default();
        registry.register(
            "metrics_samples_dropped",
            "Host samples dropped because the buffer was full",
            samples_dropped.clone(),
        );
        let ledger_queued = Gauge::default();
        registry.register(
            "ledger_queued_records",
            "Run records waiting to be written",
            ledger_queued.clone(),
        );
        let ledger_outputs_dropped = Counter::default();
        registry.register(
            "ledger_dropped_outputs",
            "Run outputs let go while PostgreSQL was away, past the queue's output cap (the rows were kept)",
            ledger_outputs_dropped.clone(),
        );
        let ledger_dropped = Counter::default();
        registry.register(
            "ledger_dropped_records",
            "Run records dropped because the ledger buffer was full or PostgreSQL refused them",
            ledger_dropped.clone(),
        );
        let loki_dropped = Counter::default();
        registry.register(
            "loki_dropped",
            "Log events that could not be delivered to Loki (queue full, rejected, or left at shutdown)",
            loki_dropped.clone(),
        );
        let loki_events = Counter::default();
        registry.register(
            "loki_events",
            "Log events handed to the Loki shipper",
            loki_events.clone(),
        );
        let log_lines = Counter::default();
        registry.register(
            "log_lines",
            "Log lines queued for stdout (or stderr)",
            log_lines.clone(),
        );
        let log_dropped = Counter::default();
        registry.register(
            "log_dropped",
            "Log lines dropped because the reader of stdout (or stderr) fell behind",
            log_dropped.clone(),
        );
        let job_last_success = Family::<JobLabels, FloatGauge>::default();
        registry.register(
            "job_last_success_timestamp_seconds",
            "When each job last succeeded (Unix time; host-scoped jobs: on this replica)",
            job_last_success.clone(),
        );
        let job_next_fire = Family::<JobLabels, FloatGauge>::default();
        registry.register(
            "job_next_fire_timestamp_seconds",
            "When each job fires next (Unix time)",
            job_next_fire.clone(),
        );
        let job_running = Family::<JobLabels, Gauge>::default();
        registry.register(
            "job_running",
            "Runs of each job going on this replica now",
            job_running.clone(),
        );
        let job_health = Family::<JobStateLabels, Gauge>::default();
        registry.register(
            "job_health",
            "Each job's health: 1 for its state (ok, failing, stale, late, unknown), 0 for the others",
            job_health.clone(),
        );
        let alert_deliveries = Family::<NotifierOutcomeLabels, Counter>::default();
        registry.register(
            "alert_deliveries",
            "Alert delivery attempts by notifier and outcome (delivered, failed, gave_up)",
            alert_deliveries.clone(),
        );
        let heartbeats = Family::<JobOutcomeLabels, Counter>::default();
        registry.register(
            "heartbeats",
            "Heartbeat calls by job and outcome (sent, failed)",
            heartbeats.clone(),
        );
        let callbacks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "callbacks",
            "Run callback delivery attempts by outcome (delivered, failed, gave_up)",
            callbacks.clone(),
        );
        Self(Arc::new(Inner {
            registry,
            callbacks,
            job_last_success,
            job_next_fire,
            job_running,
            job_health,
            alert_deliveries,
            heartbeats,
            runs,
            run_duration,
            run_items,
            run_cpu,
            run_peak_memory,
            run_io,
            scheduler_lag,
            http_requests,
            http_duration,
            samples_buffered,
            samples_dropped,
            ledger_queued,
            ledger_dropped,
            ledger_outputs_dropped,
            loki_dropped,
            loki_events,
            log_lines,
            log_dropped,
        }))
    }

    /// The OpenMetrics text exposition of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn run_finished(&self, job: &str, status: &str, duration: Duration, items: Option<i64>) {
        self.runs
            .get_or_create(&JobStatusLabels {
                job: job.to_owned(),
                status: status.to_owned(),
            })
            .inc();
        let labels = JobLabels {
            job: job.to_owned(),
        };
        self.run_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        if let Some(n) = items.and_then(|n| u64::try_from(n).ok()) {
            self.run_items.get_or_create(&labels).inc_by(n);
        }
    }

    /// What a measured run used: CPU seconds, peak memory, bytes read and written.
    pub fn run_resources(&self, job: &str, cpu_s: f64, peak_bytes: u64, read: u64, written: u64) {
        let labels = JobLabels {
            job: job.to_owned(),
        };
        self.run_cpu.get_or_create(&labels).observe(cpu_s);
        self.run_peak_memory
            .get_or_create(&labels)
            .observe(peak_bytes as f64);
        for (direction, bytes) in [("read", read), ("write", written)] {
            self.run_io
                .get_or_create(&RunIoLabels {
                    job: job.to_owned(),
                    direction,
                })
                .observe(bytes as f64);
        }
    }

    /// A firing that never started a job attempt (skipped, or failed before it ran):
    /// counted by status, kept out of the duration histogram.
    pub fn run_not_started(&self, job: &str, status: &str) {
        self.runs
            .get_or_create(&JobStatusLabels {
                job: job.to_owned(),
                status: status.to_owned(),
            })
            .inc();
    }

    /// A job's health gauges; `None` times drop the series (never succeeded, no
    /// next firing).
    pub fn job_gauges<'a>(
        &self,
        job: &str,
        last_success: Option<f64>,
        next_fire: Option<f64>,
        running: i64,
        state: &str,
        states: impl Iterator<Item = &'a str>,
    ) {
        let labels = JobLabels {
            job: job.to_owned(),
        };
        match last_success {
            Some(t) => {
                self.job_last_success.get_or_create(&labels).set(t);
            }
            None => {
                self.job_last_success.remove(&labels);
            }
        }
        match next_fire {
            Some(t) => {
                self.job_next_fire.get_or_create(&labels).set(t);
            }
            None => {
                self.job_next_fire.remove(&labels);
            }
        }
        self.job_running.get_or_create(&labels).set(running);
        for s in states {
            self.job_health
                .get_or_create(&JobStateLabels {
                    job: job.to_owned(),
                    state: s.to_owned(),
                })
                .set(i64::from(s == state));
        }
    }

    /// Drops the health series of a job that is no longer configured.
    pub fn forget_job<'a>(&self, job: &str, states: impl Iterator<Item = &'a str>) {
        let labels = JobLabels {
            job: job.to_owned(),
        };
        self.job_last_success.remove(&labels);
        self.job_next_fire.remove(&labels);
        self.job_running.remove(&labels);
        for s in states {
            self.job_health.remove(&JobStateLabels {
                job: job.to_owned(),
                state: s.to_owned(),
            });
        }
    }

    pub fn alert_delivery(&self, notifier: &str, outcome: &str) {
        self.alert_deliveries
            .get_or_create(&NotifierOutcomeLabels {
                notifier: notifier.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn callback(&self, outcome: &str) {
        self.callbacks
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn heartbeat(&self, job: &str, outcome: &str) {
        self.heartbeats
            .get_or_create(&JobOutcomeLabels {
                job: job.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn lag(&self, job: &str, lag: Duration) {
        self.scheduler_lag
            .get_or_create(&JobLabels {
                job: job.to_owned(),
            })
            .observe(lag.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_lag_are_exposed_with_prometheus_names() {
        let m = Metrics::new();
        m.run_finished("prune", "succeeded", Duration::from_millis(20), Some(5));
        m.run_not_started("prune", "skipped");
        m.lag("prune", Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains("vigil_runs_total{job=\"prune\",status=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vigil_runs_total{job=\"prune\",status=\"skipped\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vigil_run_items_total{job=\"prune\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("vigil_run_duration_seconds_count{job=\"prune\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vigil_scheduler_lag_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("# TYPE vigil_loki_dropped counter"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
