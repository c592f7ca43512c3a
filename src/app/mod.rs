//! Start-up and shutdown: turns a validated [`Config`] into a running vigil.

mod table;

use std::future::Future;
use std::time::Duration;

use crate::config::{Config, Settings};
use crate::jobs::{self, Deps};
use crate::scheduler::{Ledger, RunResult, Scheduler, SchedulerError, TriggerError, ledger};
use crate::store::embedded::{self, EmbeddedError, EmbeddedPostgres};
use crate::store::{Store, StoreError, Target};

pub use table::{UPCOMING, jobs_table};

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
    Other(String),
}

/// The database vigil talks to, and the embedded server behind it if there is one.
pub struct Database {
    pub store: Store,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to the configured database, or starts the embedded one.
    pub async fn open(settings: &Settings) -> Result<Self, AppError> {
        let (target, embedded) = match &settings.database {
            Some(target) => (Target::from_settings(target)?, None),
            None => {
                let data_dir = settings.data_dir.clone();
                let bin = settings.pg_bin_dir.clone();
                let pg = tokio::task::spawn_blocking(move || {
                    EmbeddedPostgres::start(&data_dir, bin.as_deref())
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
        let store = match Store::connect(
            &target,
            settings.db_max_connections,
            settings.db_connect_timeout,
        )
        .await
        {
            Ok(store) => store,
            Err(e) => {
                if let Some(pg) = &embedded {
                    let _ = pg.stop();
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

/// Builds a scheduler holding every job of `config` (not started).
pub async fn scheduler(config: &Config, store: &Store) -> Result<Scheduler, AppError> {
    let ledger = Ledger::start(store.clone(), ledger::DEFAULT_CAPACITY);
    let scheduler = Scheduler::new(ledger, config.settings.host.clone()).await?;
    let deps = Deps {
        store: store.clone(),
    };
    for spec in &config.file.jobs {
        scheduler
            .add(spec.clone(), jobs::build(&spec.settings, &deps))
            .await?;
    }
    Ok(scheduler)
}

/// `vigil run`: serves until `shutdown` resolves, then stops gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    let db = Database::open(&config.settings).await?;
    let result = run_with(&config, &db.store, shutdown).await;
    db.close().await;
    result
}

async fn run_with(
    config: &Config,
    store: &Store,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    store.migrate().await?;
    let host = &config.settings.host;
    let abandoned = store
        .abandon_running(host, "vigil stopped before the run finished")
        .await?;
    if abandoned > 0 {
        tracing::warn!(runs = abandoned, %host, "marked runs left running by an earlier start as abandoned");
    }
    let scheduler = scheduler(config, store).await?;
    scheduler.start().await?;
    tracing::info!(
        jobs = config.file.jobs.len(),
        enabled = config.file.jobs.iter().filter(|j| j.enabled).count(),
        config = %config.file.path.display(),
        %host,
        "vigil started"
    );
    shutdown.await;
    tracing::info!(grace = ?config.settings.shutdown_grace, "shutting down");
    let report = scheduler.shutdown(config.settings.shutdown_grace).await;
    tracing::info!(abandoned = report.abandoned, "scheduler stopped");
    Ok(())
}

/// `vigil trigger JOB`: one run, in this process, recorded in the ledger.
pub async fn trigger(config: &Config, job: &str, force: bool) -> Result<RunResult, AppError> {
    let db = Database::open(&config.settings).await?;
    let result = async {
        db.store.migrate().await?;
        let scheduler = scheduler(config, &db.store).await?;
        let mut handle = scheduler.trigger(job, force)?;
        let result = handle.finished().await;
        if let Err(e) = scheduler.ledger().flush(Duration::from_secs(30)).await {
            tracing::error!(error = %e, "the run's ledger rows were not all written");
        }
        Ok::<_, AppError>(result)
    }
    .await;
    db.close().await;
    result
}

/// `vigil migrate`.
pub async fn migrate(settings: &Settings) -> Result<(), AppError> {
    let db = Database::open(settings).await?;
    let result = db.store.migrate().await;
    db.close().await;
    Ok(result?)
}
