//! Applying `jobs.toml` to the scheduler: at start-up, and again whenever the file
//! changes on disk (debounced), on SIGHUP, or on `POST /api/reload`. All of them come
//! through [`Reloader::apply`], so a reload behaves exactly like a fresh start of the
//! new file, minus the jobs that did not change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, Diagnostic, Diagnostics, Environment, Origin, RunnerEntry};
use crate::gateway::Reload;
use crate::jobs::{Deps, Registry};
use crate::scheduler::{ApplyReport, Scheduler};

/// Editors write a file in several steps (truncate, write, rename); wait for quiet.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Why a reload happened, for the log.
#[derive(Debug, Clone, Copy)]
pub enum Cause {
    Start,
    FileChanged,
    Signal,
    Api,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::Start => "start",
            Cause::FileChanged => "file changed",
            Cause::Signal => "SIGHUP",
            Cause::Api => "POST /api/reload",
        }
    }
}

pub struct Reloader {
    path: PathBuf,
    env: Environment,
    /// The `[runner]` table vigil started with: settings are not reloaded.
    runner: Vec<(String, ::config::ValueKind)>,
    scheduler: Scheduler,
    deps: Deps,
    /// The kinds jobs files may name, and how their jobs are built.
    registry: Registry,
    /// One reload at a time, so two quick edits apply in order.
    serial: tokio::sync::Mutex<()>,
    /// Digest of the text last read, so file events that change nothing do nothing.
    last_digest: AtomicU64,
    /// Told the notifiers of each file applied.
    alerts: std::sync::OnceLock<crate::alerts::Alerts>,
}

impl Reloader {
    pub fn new(config: &Config, scheduler: Scheduler, deps: Deps, registry: Registry) -> Self {
        Self {
            path: config.file.path.clone(),
            env: config.env.clone(),
            runner: runner_values(&config.file.runner),
            scheduler,
            deps,
            registry,
            serial: tokio::sync::Mutex::new(()),
            last_digest: AtomicU64::new(config.file.digest),
            alerts: std::sync::OnceLock::new(),
        }
    }

    /// From now on, each applied file's notifiers go to `alerts`.
    pub fn set_alerts(&self, alerts: crate::alerts::Alerts) {
        let _ = self.alerts.set(alerts);
    }

    /// Makes the scheduled jobs those of `config`. Fails, changing nothing, if any job
    /// cannot be built.
    pub async fn apply(&self, config: &Config, cause: Cause) -> Result<ApplyReport, Diagnostics> {
        if runner_values(&config.file.runner) != self.runner {
            tracing::warn!(
                config = %self.path.display(),
                "the [runner] table changed; settings take effect at the next restart, jobs now"
            );
        }
        let (deps, registry) = (&self.deps, &self.registry);
        let report = self
            .scheduler
            .apply(config.file.jobs.clone(), |spec| {
                registry.build(spec, deps).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| {
                Diagnostics(
                    e.0.into_iter()
                        .map(|(job, message)| Diagnostic {
                            origin: config
                                .file
                                .origins
                                .get(&job)
                                .cloned()
                                .unwrap_or(Origin::Unknown),
                            job: Some(format!("job \"{job}\"")),
                            message,
                        })
                        .collect(),
                )
            });
        for w in &config.file.warnings {
            tracing::warn!(warning = %w, "jobs file");
        }
        if report.is_ok()
            && let Some(alerts) = self.alerts.get()
        {
            alerts.set_notifiers(config.file.notifiers.clone());
        }
        match &report {
            Ok(r) => tracing::info!(
                cause = cause.as_str(),
                config = %self.path.display(),
                added = ?r.added,
                removed = ?r.removed,
                changed = ?r.changed,
                unchanged = r.unchanged.len(),
                "jobs applied"
            ),
            Err(diags) => log_rejected(cause, &self.path, diags),
        }
        report
    }

    /// Reads the jobs file again and applies it. Invalid: every problem is logged and
    /// returned, and the running jobs stay as they are.
    pub async fn reload(&self, cause: Cause) -> Result<ApplyReport, Diagnostics> {
        let _one_at_a_time = self.serial.lock().await;
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(t) => t,
            Err(e) => {
                let diags = config::unreadable(&self.path, &e);
                log_rejected(cause, &self.path, &diags);
                return Err(diags);
            }
        };
        let digest = config::digest(&text);
        let previous = self.last_digest.swap(digest, Ordering::AcqRel);
        if matches!(cause, Cause::FileChanged) && previous == digest {
            // Touched, or a neighbour in the directory changed: nothing to do.
            return Ok(ApplyReport {
                unchanged: self.scheduler.job_names(),
                ..ApplyReport::default()
            });
        }
        match config::load_text(&self.path, &text, &self.env, &self.registry) {
            Ok(config) => self.apply(&config, cause).await,
            Err(diags) => {
                log_rejected(cause, &self.path, &diags);
                Err(diags)
            }
        }
    }

    /// Reloads on SIGHUP and on changes to the file, until `stop`.
    pub fn spawn_triggers(self: &Arc<Self>, watch: bool, stop: CancellationToken) {
        let (tx, rx) = mpsc::channel::<Cause>(8);
        if watch {
            spawn_watcher(&self.path, tx.clone(), stop.clone());
        }
        spawn_sighup(tx, stop.clone());
        let this = self.clone();
        tokio::spawn(async move { this.serve(rx, stop).await });
    }

    async fn serve(&self, mut rx: mpsc::Receiver<Cause>, stop: CancellationToken) {
        loop {
            let mut cause = tokio::select! {
                () = stop.cancelled() => return,
                c = rx.recv() => match c { Some(c) => c, None => return },
            };
            if matches!(cause, Cause::FileChanged) {
                // Debounce: wait until the file has been quiet for a moment.
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(DEBOUNCE) => break,
                        c = rx.recv() => match c {
                            Some(Cause::FileChanged) => {}
                            Some(other) => { cause = other; break; }
                            None => return,
                        },
                    }
                }
            }
            // The outcome is logged by `reload`.
            let _ = self.reload(cause).await;
        }
    }
}

#[async_trait::async_trait]
impl Reload for Reloader {
    async fn reload(&self) -> Result<ApplyReport, Diagnostics> {
        Reloader::reload(self, Cause::Api).await
    }
}

fn log_rejected(cause: Cause, path: &Path, diags: &Diagnostics) {
    for d in &diags.0 {
        tracing::error!(cause = cause.as_str(), problem = %d, "jobs file rejected");
    }
    tracing::error!(
        cause = cause.as_str(),
        config = %path.display(),
        problems = diags.0.len(),
        "jobs file rejected; the running jobs are unchanged"
    );
}

fn runner_values(runner: &[RunnerEntry]) -> Vec<(String, ::config::ValueKind)> {
    let mut v: Vec<_> = runner
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Watches the file's directory, not the file: editors and ConfigMaps replace the file
/// (a new inode), which a watch on the file itself would lose.
fn spawn_watcher(path: &Path, tx: mpsc::Sender<Cause>, stop: CancellationToken) {
    use notify::{EventKind, RecursiveMode, Watcher as _};
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let handler = move |event: notify::Result<notify::Event>| match event {
        // Opening or reading (our own reload included) changes nothing.
        Ok(e) if matches!(e.kind, EventKind::Access(_)) => {}
        Ok(_) => {
            let _ = tx.try_send(Cause::FileChanged);
        }
        Err(e) => tracing::warn!(error = %e, "watching the jobs file"),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the jobs file; reload with SIGHUP or POST /api/reload");
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the jobs file's directory; reload with SIGHUP or POST /api/reload");
        return;
    }
    tracing::info!(dir = %dir.display(), "watching the jobs file for changes");
    // The watcher lives until `stop`.
    tokio::spawn(async move {
        stop.cancelled().await;
        drop(watcher);
    });
}

fn spawn_sighup(tx: mpsc::Sender<Cause>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by editing the file or POST /api/reload");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                s = hup.recv() => {
                    if s.is_none() { return; }
                    let _ = tx.send(Cause::Signal).await;
                }
            }
        }
    });
}
