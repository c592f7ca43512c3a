//! Run callbacks (`Callback-Url` on an invocation): when the run ends, its final state
//! is POSTed there, signed when `VIGIL_CALLBACK_SECRET` is set, through the same kind
//! of PostgreSQL outbox as alerts: leased by one replica, retried with backoff,
//! every attempt recorded. Only hosts `VIGIL_CALLBACK_ALLOW` names are called.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{GIVE_UP_AFTER, backoff, notify};
use crate::config::{JobSpec, Secret};
use crate::scheduler::{RunObserver, RunResult, RunningRun};
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// Idle poll: callbacks this replica marks due, and its retries, wake the deliverer at
/// their time; the poll finds what a stopped replica left (after its lease).
const POLL_EVERY: Duration = super::POLL_EVERY;
const CONCURRENCY: usize = 8;
const LEASE: Duration = Duration::from_secs(60);
/// How long one callback may take to answer.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a callback URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackRefused {
    #[error("callbacks are off: set VIGIL_CALLBACK_ALLOW to the hosts they may call")]
    Disabled,
    #[error("Callback-Url is not an http:// or https:// URL with a host")]
    NotAUrl,
    #[error("host {0} is not in VIGIL_CALLBACK_ALLOW")]
    NotAllowed(String),
}

/// Checks a `Callback-Url` against the allowed host patterns (`host`, `host:port`,
/// `*` wildcards); the URL's host (and port, when the pattern has one) must match.
pub fn check_url(url: &str, allow: &[String]) -> Result<(), CallbackRefused> {
    if allow.is_empty() {
        return Err(CallbackRefused::Disabled);
    }
    let parsed = url::Url::parse(url).map_err(|_| CallbackRefused::NotAUrl)?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(CallbackRefused::NotAUrl);
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or(CallbackRefused::NotAUrl)?
        .to_ascii_lowercase();
    let port = parsed.port_or_known_default().unwrap_or(0);
    let with_port = format!("{host}:{port}");
    let ok = allow.iter().any(|pattern| {
        let target = if pattern.contains(':') && !pattern.starts_with('[') || pattern.contains("]:")
        {
            &with_port
        } else {
            &host
        };
        wildmatch::WildMatch::new(pattern).matches(target)
    });
    if ok {
        Ok(())
    } else {
        Err(CallbackRefused::NotAllowed(with_port))
    }
}

struct Inner {
    store: Store,
    host: String,
    metrics: Metrics,
    secret: Option<Secret>,
    http: reqwest::Client,
    /// Runs started here whose end is awaited by a callback.
    expected: Mutex<HashSet<Uuid>>,
    events: mpsc::UnboundedSender<(Uuid, Value)>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<(Uuid, Value)>>>,
    wake: Notify,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Run callbacks. Cheap to clone.
#[derive(Clone)]
pub struct Callbacks {
    inner: Arc<Inner>,
}

impl Callbacks {
    pub fn new(store: Store, host: &str, metrics: Metrics, secret: Option<Secret>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("vigil/", env!("CARGO_PKG_VERSION")))
            // A redirect could lead anywhere: the allowed host is the one called.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(CALLBACK_TIMEOUT)
            .build()
            .unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(Inner {
                store,
                host: host.to_owned(),
                metrics,
                secret,
                http,
                expected: Mutex::new(HashSet::new()),
                events: tx,
                receiver: Mutex::new(Some(rx)),
                wake: Notify::new(),
                stop: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Starts marking ended runs' callbacks due and delivering them.
    pub fn start(&self, scheduler: &crate::scheduler::Scheduler) {
        let Some(rx) = self
            .inner
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        scheduler.observe(Arc::new(self.clone()));
        self.inner.tasks.spawn(mark_due(self.inner.clone(), rx));
        self.inner.tasks.spawn(deliver_loop(self.inner.clone()));
    }

    /// Records that run `run_id` (about to start here) calls `url` back when it ends.
    pub async fn register(
        &self,
        run_id: Uuid,
        job: &str,
        url: &str,
    ) -> Result<(), crate::store::StoreError> {
        self.inner.store.register_callback(run_id, job, url).await?;
        self.inner
            .expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(run_id);
        Ok(())
    }

    /// The run will not start after all: nothing is called back.
    pub async fn forget(&self, run_id: Uuid) {
        self.inner
            .expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&run_id);
        if let Err(e) = self.inner.store.cancel_callback(run_id).await {
            tracing::warn!(%run_id, error = %e, "cannot remove the callback of a run that never started");
        }
    }

    /// Runs of this host that vigil's last stop abandoned end here: their callbacks
    /// become due with that final state, so a caller hears of every run it started.
    pub async fn recover_abandoned(&self) {
        let runs = match self
            .inner
            .store
            .abandoned_with_callbacks(&self.inner.host)
            .await
        {
            Ok(runs) => runs,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for callbacks of abandoned runs");
                return;
            }
        };
        for (run_id, last) in runs {
            let result = RunResult {
                run_id,
                last_attempt_id: last.id,
                job: last.job.clone(),
                status: last.status,
                attempts: last.attempt,
                items: last.items,
                error: last.error.clone(),
                started_at: last.started_at,
                finished_at: last.finished_at.unwrap_or(last.started_at),
                scheduled_at: last.scheduled_at,
                trigger: last.trigger,
                output: None,
            };
            let _ = self
                .inner
                .events
                .send((run_id, payload(&result, &self.inner.host)));
        }
    }

    pub async fn stop(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(6), self.inner.tasks.wait()).await;
    }
}

/// What a callback receives: the run's final state and output.
pub fn payload(result: &RunResult, host: &str) -> Value {
    json!({
        "event": "run.finished",
        "run_id": result.run_id,
        "job": result.job,
        "status": result.status,
        "attempts": result.attempts,
        "items": result.items,
        "error": result.error,
        "trigger": result.trigger,
        "scheduled_at": result.scheduled_at,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "output": result.output.as_ref().map(crate::store::runs::RunOutput::to_json),
        "output_truncated": result.output.as_ref().map(|o| o.truncated),
        "host": host,
        "location": format!("/api/runs/{}", result.run_id),
    })
}

impl RunObserver for Callbacks {
    fn started(&self, _spec: &JobSpec, _run: &RunningRun) {}

    fn finished(&self, _spec: &JobSpec, result: &RunResult) {
        let expected = self
            .inner
            .expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&result.run_id);
        if expected {
            let _ = self
                .inner
                .events
                .send((result.run_id, payload(result, &self.inner.host)));
        }
    }
}

/// Marks ended runs' callbacks due, waiting out PostgreSQL outages.
async fn mark_due(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<(Uuid, Value)>) {
    loop {
        let (run_id, body) = tokio::select! {
            e = rx.recv() => match e { Some(e) => e, None => return },
            () = inner.stop.cancelled() => return,
        };
        let mut pause = Duration::from_millis(500);
        loop {
            match inner.store.callback_due(run_id, &body).await {
                Ok(_) => {
                    inner.wake.notify_one();
                    break;
                }
                Err(e) => {
                    tracing::warn!(%run_id, error = %e, "cannot mark a run's callback due; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = inner.stop.cancelled() => return,
                    }
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

async fn deliver_loop(inner: Arc<Inner>) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(POLL_EVERY) => {}
        }
        loop {
            let free = slots.available_permits() as i64;
            if free == 0 {
                break;
            }
            let batch = match inner.store.lease_callbacks(&inner.host, LEASE, free).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the callback outbox this time");
                    break;
                }
            };
            if batch.is_empty() {
                break;
            }
            for p in batch {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let inner2 = inner.clone();
                inner.tasks.spawn(async move {
                    deliver(&inner2, p).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn deliver(inner: &Arc<Inner>, p: crate::store::invoke::PendingCallback) {
    let started = Instant::now();
    let body = serde_json::to_vec(&p.payload).unwrap_or_default();
    let mut req = inner
        .http
        .post(&p.url)
        .header("content-type", "application/json")
        .header(notify::EVENT_HEADER, "run.finished")
        .header(notify::DELIVERY_HEADER, p.run_id.to_string());
    if let Some(secret) = &inner.secret {
        req = req.header(
            notify::SIGNATURE_HEADER,
            notify::signature(secret.expose(), &body),
        );
    }
    let result = notify::post_request(req.body(body)).await;
    let at = chrono::Utc::now();
    let attempts = p.attempts + 1;
    let (delivered, status, error) = match &result {
        Ok(d) => (true, d.http_status, None),
        Err(f) => (false, f.http_status, Some(f.error.clone())),
    };
    let retry_at = if delivered {
        None
    } else {
        let next = at + chrono::Duration::from_std(backoff(attempts)).unwrap_or_default();
        let deadline = p.created_at + chrono::Duration::from_std(GIVE_UP_AFTER).unwrap_or_default();
        (next < deadline).then_some(next)
    };
    let outcome = match (delivered, retry_at) {
        (true, _) => "delivered",
        (false, Some(_)) => "failed",
        (false, None) => "gave_up",
    };
    inner.metrics.callback(outcome);
    if !delivered {
        tracing::warn!(run_id = %p.run_id, attempt = attempts, error = error.as_deref().unwrap_or(""), next = ?retry_at, "run callback not delivered");
    }
    if let Err(e) = inner
        .store
        .record_callback_attempt(
            &p,
            at,
            started.elapsed(),
            delivered,
            status,
            error.as_deref(),
            &inner.host,
            retry_at,
        )
        .await
    {
        tracing::warn!(run_id = %p.run_id, error = %e, "cannot record a callback attempt");
    }
    if let Some(next) = retry_at {
        let waker = inner.clone();
        super::wake_at(
            &inner.tasks,
            &inner.stop,
            next - chrono::Utc::now(),
            move || waker.wake.notify_one(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_hosts_must_be_allowed_by_name_or_pattern_and_port() {
        let allow: Vec<String> = ["hooks.example.com", "*.internal", "127.0.0.1:9000"]
            .map(String::from)
            .into();
        assert_eq!(check_url("https://hooks.example.com/x", &allow), Ok(()));
        assert_eq!(check_url("http://ci.internal:8080/done", &allow), Ok(()));
        assert_eq!(check_url("http://127.0.0.1:9000/cb", &allow), Ok(()));
        assert_eq!(
            check_url("http://127.0.0.1:9001/cb", &allow),
            Err(CallbackRefused::NotAllowed("127.0.0.1:9001".into()))
        );
        assert_eq!(
            check_url("http://169.254.169.254/latest/meta-data", &allow),
            Err(CallbackRefused::NotAllowed("169.254.169.254:80".into()))
        );
        assert_eq!(
            check_url("http://evil.example.com.attacker.net/", &allow),
            Err(CallbackRefused::NotAllowed(
                "evil.example.com.attacker.net:80".into()
            ))
        );
        assert_eq!(
            check_url("file:///etc/passwd", &allow),
            Err(CallbackRefused::NotAUrl)
        );
        assert_eq!(
            check_url("hooks.example.com", &allow),
            Err(CallbackRefused::NotAUrl)
        );
        assert_eq!(
            check_url("https://hooks.example.com/", &[]),
            Err(CallbackRefused::Disabled)
        );
    }
}
