//! Start-up and shutdown: turns a validated [`Config`] into a running vigil.

mod memory;
pub mod reload;
mod table;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::alerts::Alerts;
use crate::alerts::callbacks::Callbacks;
use crate::config::{Config, Diagnostics, Settings};
use crate::gateway::{self, Gateway};
use crate::jobs::{Deps, Registry, SpoolPlace};
use crate::scheduler::{Ledger, RunResult, Scheduler, SchedulerError, TriggerError, ledger};
use crate::store::embedded::{self, EmbeddedError, EmbeddedPostgres};
use crate::store::{PoolOptions, Store, StoreError, Target};
use crate::telemetry::metrics::Metrics;

pub use memory::read_code_on_demand;
pub use reload::{Cause, Reloader};
pub use table::{UPCOMING, alerts_table, jobs_table, pauses_table};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("embedded PostgreSQL: {0}")]
    Embedded(#[from] EmbeddedError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Trigger(#[from] TriggerError),
    #[error("{0}")]
    Jobs(Diagnostics),
    #[error("{0}")]
    Other(String),
}

/// The database vigil talks to, and the embedded server behind it if there is one.
pub struct Database {
    pub store: Store,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to the configured database, or starts the embedded one, with the
    /// pool a vigil running any job needs.
    pub async fn open(settings: &Settings) -> Result<Self, AppError> {
        Self::open_for(settings, false).await
    }

    /// Like [`Database::open`]; `host_only`: every job is host-scoped, so the pool is
    /// the small one of [`Settings::pool_size`].
    pub async fn open_for(settings: &Settings, host_only: bool) -> Result<Self, AppError> {
        let (target, embedded) = match &settings.database {
            Some(target) => (Target::from_settings(target)?, None),
            None => {
                let data_dir = settings.data_dir.clone();
                let bin = settings.pg_bin_dir.clone();
                let path = settings.search_path.clone();
                let pg = tokio::task::spawn_blocking(move || {
                    EmbeddedPostgres::start_searching(
                        &data_dir,
                        bin.as_deref(),
                        path.as_deref().map(std::ffi::OsStr::new),
                    )
                })
                .await
                .map_err(|e| AppError::Other(format!("embedded PostgreSQL start-up: {e}")))??;
                crate::store::ensure_database(&pg.connect_options("postgres"), embedded::DATABASE)
                    .await?;
                tracing::info!(
                    connect = %pg.describe(),
                    "no database configured: using the embedded PostgreSQL"
                );
                let target = Target {
                    options: pg.connect_options(embedded::DATABASE),
                    display: pg.describe(),
                };
                (target, Some(pg))
            }
        };
        let pool = PoolOptions {
            max_connections: settings.pool_size(host_only),
            lock_connections: settings.db_lock_connections,
            acquire_timeout: settings.db_acquire_timeout,
            statement_timeout: settings.db_statement_timeout,
            keepalive: settings.db_keepalive,
        };
        let store = match Store::connect_with(&target, &pool, settings.db_connect_timeout).await {
            Ok(store) => store,
            Err(e) => {
                if let Some(pg) = &embedded
                    && let Err(stop) = pg.stop()
                {
                    tracing::error!(error = %stop, "stopping the embedded PostgreSQL");
                }
                return Err(e.into());
            }
        };
        Ok(Self { store, embedded })
    }

    pub async fn close(self) {
        self.store.close().await;
        if let Some(pg) = self.embedded {
            match tokio::task::spawn_blocking(move || pg.stop()).await {
                Ok(Ok(())) => tracing::info!("embedded PostgreSQL stopped"),
                Ok(Err(e)) => tracing::error!(error = %e, "stopping the embedded PostgreSQL"),
                Err(e) => tracing::error!(error = %e, "stopping the embedded PostgreSQL"),
            }
        }
    }
}

/// Builds a scheduler holding every job of `config` (not started), and the reloader
/// that put them there.
pub async fn scheduler(
    config: &Config,
    store: &Store,
    metrics: &Metrics,
) -> Result<(Scheduler, Arc<Reloader>), AppError> {
    let spool = SpoolPlace {
        dir: config.settings.data_dir.join("spool"),
        max_bytes: config.settings.spool_max_bytes,
    };
    let ledger = Ledger::start_with(
        store.clone(),
        ledger::DEFAULT_CAPACITY,
        metrics.clone(),
        spool.open(&format!("ledger-{}", config.settings.host)),
    );
    let scheduler =
        Scheduler::with_metrics(ledger, config.settings.host.clone(), metrics.clone()).await?;
    let deps = Deps {
        store: store.clone(),
        host: config.settings.host.clone(),
        metrics: metrics.clone(),
        mongo_uri: config.settings.mongo_uri.clone(),
        env: config.env.clone(),
        host_root: config.settings.host_root.clone(),
        run_cgroups: config.settings.run_cgroups,
        spool: Some(spool),
    };
    let reloader = Arc::new(Reloader::new(
        config,
        scheduler.clone(),
        deps,
        Registry::builtin(),
    ));
    reloader
        .apply(config, Cause::Start)
        .await
        .map_err(AppError::Jobs)?;
    Ok((scheduler, reloader))
}

/// A running vigil: scheduler and gateway over one database.
pub struct App {
    pub scheduler: Scheduler,
    pub alerts: Alerts,
    /// Run callbacks; `None` while `VIGIL_CALLBACK_ALLOW` names no host.
    callbacks: Option<Callbacks>,
    pub metrics: Metrics,
    gateway: Gateway,
    shutdown_grace: Duration,
    /// Stops the reload triggers (file watch, SIGHUP).
    reload_stop: CancellationToken,
}

impl App {
    /// Migrates, marks this host's orphaned runs `abandoned`, starts the scheduler and
    /// the gateway.
    pub async fn start(config: &Config, store: &Store) -> Result<Self, AppError> {
        Self::start_with(config, store, Metrics::new()).await
    }

    /// Like [`App::start`], recording into `metrics` (shared with telemetry).
    pub async fn start_with(
        config: &Config,
        store: &Store,
        metrics: Metrics,
    ) -> Result<Self, AppError> {
        store.migrate().await?;
        Self::start_migrated(config, store, metrics).await
    }

    /// Like [`App::start_with`], over a database already migrated.
    async fn start_migrated(
        config: &Config,
        store: &Store,
        metrics: Metrics,
    ) -> Result<Self, AppError> {
        let host = &config.settings.host;
        let abandoned = store
            .abandon_running(host, "vigil stopped before the run finished")
            .await?;
        if abandoned > 0 {
            tracing::warn!(runs = abandoned, %host, "marked runs left running by an earlier start as abandoned");
        }
        let (scheduler, reloader) = scheduler(config, store, &metrics).await?;
        // Before the first firing, so every run is seen.
        let alerts = Alerts::new(
            store.clone(),
            scheduler.clone(),
            metrics.clone(),
            config.file.notifiers.clone(),
            &config.env,
        );
        alerts.start();
        reloader.set_alerts(alerts.clone());
        let callbacks = (!config.settings.callback_allow.is_empty()).then(|| {
            Callbacks::new(
                store.clone(),
                host,
                metrics.clone(),
                config.settings.callback_secret.clone(),
            )
        });
        if let Some(callbacks) = &callbacks {
            callbacks.start(&scheduler);
            callbacks.recover_abandoned().await;
        }
        // Pauses live in PostgreSQL: known before the first firing, then followed.
        match store.pauses().await {
            Ok(pauses) => scheduler.set_pauses(pauses),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the paused jobs; none paused until PostgreSQL answers")
            }
        }
        let reload_stop = CancellationToken::new();
        tokio::spawn(follow_pauses(
            store.clone(),
            scheduler.clone(),
            reload_stop.clone(),
        ));
        tokio::spawn(keep_partitions(store.clone(), reload_stop.clone()));
        scheduler.start().await?;
        reloader.spawn_triggers(config.settings.watch_config, reload_stop.clone());
        let state = gateway::State {
            scheduler: scheduler.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            guard: gateway::Guard {
                token: config.settings.api_token.clone(),
                reads_open: config.settings.api_reads_open,
                metrics_public: config.settings.metrics_public,
                allowed_origins: config.settings.allowed_origins.clone(),
                loopback_only: config.settings.bind.is_loopback(),
                waiting: Arc::new(tokio::sync::Semaphore::new(
                    config.settings.max_waiting as usize,
                )),
                max_connections: config.settings.max_connections as usize,
            },
            reading_sync_job: config.settings.reading_sync_job.clone(),
            reload: Some(reloader),
            alerts: Some(alerts.clone()),
            invoke: gateway::Invoke {
                kinds: Registry::builtin(),
                max_input_bytes: config.settings.max_input_bytes,
                callback_allow: config.settings.callback_allow.clone(),
                callbacks: callbacks.clone(),
            },
            views: gateway::Views::default(),
        };
        if config.settings.allow_no_token
            && config.settings.api_token.is_none()
            && !config.settings.bind.is_loopback()
        {
            tracing::warn!(
                bind = %config.settings.bind,
                "VIGIL_ALLOW_NO_TOKEN=true: the API, triggers and reload included, is open to \
                 anyone who can reach this address"
            );
        }
        let addr = SocketAddr::new(config.settings.bind, config.settings.port);
        let gateway = match Gateway::start(state, addr).await {
            Ok(g) => g,
            Err(e) => {
                reload_stop.cancel();
                scheduler.shutdown(config.settings.shutdown_grace).await;
                alerts.stop().await;
                if let Some(callbacks) = &callbacks {
                    callbacks.stop().await;
                }
                return Err(AppError::Other(e.to_string()));
            }
        };
        tracing::info!(
            jobs = config.file.jobs.len(),
            enabled = config.file.jobs.iter().filter(|j| j.enabled).count(),
            config = %config.file.path.display(),
            %host,
            gateway = %gateway.local_addr,
            "vigil started"
        );
        Ok(Self {
            scheduler,
            alerts,
            callbacks,
            metrics,
            gateway,
            shutdown_grace: config.settings.shutdown_grace,
            reload_stop,
        })
    }

    /// Where the gateway listens (the real port when configured with 0).
    pub fn address(&self) -> SocketAddr {
        self.gateway.local_addr
    }

    /// Stops firing (triggers now answer 503), waits for runs up to the grace period,
    /// then closes the gateway.
    pub async fn stop(self) {
        tracing::info!(grace = ?self.shutdown_grace, "shutting down");
        self.reload_stop.cancel();
        let report = self.scheduler.shutdown(self.shutdown_grace).await;
        tracing::info!(abandoned = report.abandoned, "scheduler stopped");
        // After the scheduler: the last runs' outcomes are queued by now.
        self.alerts.stop().await;
        if let Some(callbacks) = &self.callbacks {
            callbacks.stop().await;
        }
        self.gateway.stop().await;
    }
}

/// How often the time partitions ahead are looked after (a week of days is kept
/// ready, so an hour is far inside it).
const PARTITIONS_EVERY: Duration = Duration::from_secs(3600);

/// Lets the kernel take back the code only the part of start-up just done needed
/// (see `memory.rs`); `after` names that part in the debug log.
async fn release_start_up_code(after: &'static str) {
    match tokio::task::spawn_blocking(memory::release_start_up_code).await {
        Ok(Ok(bytes)) => tracing::debug!(bytes, after, "start-up code released"),
        Ok(Err(e)) => tracing::debug!(error = %e, after, "start-up code not released"),
        Err(e) => tracing::debug!(error = %e, after, "start-up code not released"),
    }
}

async fn keep_partitions(store: Store, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(PARTITIONS_EVERY) => {}
            () = stop.cancelled() => return,
        }
        if let Err(e) = store.ensure_partitions(chrono::Utc::now()).await {
            tracing::warn!(error = %e, "cannot create the time partitions ahead; samples go to the default partition until they exist");
        }
    }
}

/// How often a replica re-reads the paused jobs: a pause made through another
/// replica's API is obeyed here within this (through this one's, at once). A query
/// a second per replica would be a thousand a second for a fleet.
pub const PAUSES_EVERY: Duration = Duration::from_secs(5);

/// Keeps the scheduler's paused jobs equal to PostgreSQL's; through an outage the
/// last known pauses stay in force.
async fn follow_pauses(store: Store, scheduler: Scheduler, stop: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(PAUSES_EVERY) => {}
            () = stop.cancelled() => return,
        }
        match store.pauses().await {
            Ok(pauses) => {
                failing = false;
                scheduler.set_pauses(pauses);
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot read the paused jobs; keeping the last known");
            }
            Err(_) => {}
        }
    }
}

/// Whether every job is host-scoped: a replica that only looks after its own host (a
/// fleet's agent), sized small (two connections, one async worker).
pub fn host_only(config: &Config) -> bool {
    config
        .file
        .jobs
        .iter()
        .all(|j| j.scope == crate::config::Scope::Host)
}

/// `vigil run`: serves until `shutdown` resolves, then stops gracefully.
pub async fn run(
    config: Config,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let db = Database::open_for(&config.settings, host_only(&config)).await?;
    let result = async {
        db.store.migrate().await?;
        // Start-up runs in two parts: opening the database (configuration, TLS,
        // migrations), whose code is not needed again, then the services. Handing the
        // first part's code back before the second keeps the two from adding up in
        // vigil's peak memory (11.2 -> 9.8 MiB measured, for ~20 ms of start-up).
        release_start_up_code("the database opened").await;
        let app = App::start_migrated(&config, &db.store, metrics).await?;
        let settle = tokio::spawn(async {
            tokio::time::sleep(memory::SETTLE).await;
            release_start_up_code("start-up settled").await;
        });
        shutdown.await;
        settle.abort();
        app.stop().await;
        Ok(())
    }
    .await;
    db.close().await;
    result
}

/// `vigil trigger JOB`: one run, in this process, recorded in the ledger.
pub async fn trigger(
    config: &Config,
    job: &str,
    force: bool,
    input: Option<serde_json::Value>,
) -> Result<RunResult, AppError> {
    let db = Database::open(&config.settings).await?;
    let result = async {
        db.store.migrate().await?;
        let (scheduler, _) = scheduler(config, &db.store, &Metrics::new()).await?;
        // A paused job is paused for the command line too, unless forced.
        scheduler.set_pauses(db.store.pauses().await?);
        let invocation = crate::scheduler::Invocation {
            input: input.map(Arc::new),
            run_id: None,
            force,
        };
        let mut handle = scheduler.invoke(job, invocation).await?;
        let result = handle.finished().await;
        // The same shutdown as `vigil run`'s: jobs flush what they queued (a host
        // sample), the ledger is written (or spooled), the timer stops quietly.
        let report = scheduler.shutdown(config.settings.shutdown_grace).await;
        if !report.ledger_flushed {
            tracing::error!(
                "PostgreSQL did not take the run's ledger rows; they are spooled for the next start"
            );
        }
        Ok::<_, AppError>(result)
    }
    .await;
    db.close().await;
    result
}

/// What `vigil jobs` knows of paused jobs.
pub enum Pauses {
    Known(std::collections::BTreeMap<String, Option<chrono::DateTime<chrono::Utc>>>),
    /// Why not (no database answered, or the embedded one is not running).
    Unknown(String),
}

/// How long `vigil jobs` waits for the database before printing the table without
/// pauses.
const JOBS_DB_WAIT: Duration = Duration::from_secs(3);

/// The paused jobs, from the configured database or the embedded one when it runs
/// already; never starts a server.
pub async fn paused_jobs(settings: &Settings) -> Pauses {
    let result = async {
        let (target, _embedded) = match &settings.database {
            Some(target) => (Target::from_settings(target)?, None),
            None => {
                let (data_dir, bin, path) = (
                    settings.data_dir.clone(),
                    settings.pg_bin_dir.clone(),
                    settings.search_path.clone(),
                );
                let adopted = tokio::task::spawn_blocking(move || {
                    EmbeddedPostgres::adopt_running(
                        &data_dir,
                        bin.as_deref(),
                        path.as_deref().map(std::ffi::OsStr::new),
                    )
                })
                .await
                .map_err(|e| AppError::Other(e.to_string()))??;
                let Some(pg) = adopted else {
                    return Ok(None);
                };
                let target = Target {
                    options: pg.connect_options(embedded::DATABASE),
                    display: pg.describe(),
                };
                (target, Some(pg))
            }
        };
        let pool = PoolOptions {
            max_connections: 1,
            acquire_timeout: JOBS_DB_WAIT,
            ..PoolOptions::default()
        };
        let store = Store::connect_with(&target, &pool, JOBS_DB_WAIT).await?;
        let pauses = store.pauses().await;
        store.close().await;
        Ok::<_, AppError>(Some(pauses?))
    };
    match tokio::time::timeout(JOBS_DB_WAIT * 2, result).await {
        Ok(Ok(Some(p))) => Pauses::Known(p),
        Ok(Ok(None)) => Pauses::Unknown(
            "the embedded PostgreSQL is not running (it runs with `vigil run`)".into(),
        ),
        Ok(Err(e)) => Pauses::Unknown(crate::config::redact(&e.to_string()).into_owned()),
        Err(_) => Pauses::Unknown(format!(
            "PostgreSQL did not answer within {}s",
            (JOBS_DB_WAIT * 2).as_secs()
        )),
    }
}

/// `vigil migrate`.
pub async fn migrate(settings: &Settings) -> Result<(), AppError> {
    let db = Database::open(settings).await?;
    let result = db.store.migrate().await;
    db.close().await;
    Ok(result?)
}
