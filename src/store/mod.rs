//! The PostgreSQL store: the only module that writes SQL.

pub mod alerts;
pub mod embedded;
pub mod invoke;
mod metrics;
pub mod partitions;
pub mod readings;
mod retention;
pub mod runs;
pub mod spool;
pub mod sync;

use std::str::FromStr;
use std::time::Duration;

use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, PgConnection, PgPool, Postgres};

use crate::config::DatabaseTarget;

pub use runs::{MeasuredBy, RunRecord, RunResources, RunStatus, Trigger};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL: {0}")]
    BadUrl(String),
    #[error("cannot reach PostgreSQL at {target} within {waited:?}: {source}")]
    Unreachable {
        target: String,
        waited: Duration,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("PostgreSQL: {0}")]
    Query(#[from] sqlx::Error),
    #[error("PostgreSQL did not answer within {0:?}")]
    TimedOut(Duration),
}

impl StoreError {
    /// Trying the same statement again cannot help: a table, column or schema that is
    /// not there, a missing privilege, a refused login, a database that does not exist.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Query(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
                ["42", "28", "3D", "3F"]
                    .iter()
                    .any(|class| c.starts_with(class))
            }),
            StoreError::BadUrl(_) => true,
            _ => false,
        }
    }

    /// PostgreSQL refused the data itself (a value it cannot hold, a constraint, a
    /// size or nesting limit): the same rows will fail again, other rows may not.
    pub fn is_data_rejection(&self) -> bool {
        match self {
            StoreError::Query(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
                // 22: data exception, 23: integrity constraint, 54: program limit.
                c.starts_with("22") || c.starts_with("23") || c.starts_with("54")
            }),
            _ => false,
        }
    }
}

/// A handle on vigil's database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Connections that hold advisory locks for the length of a run, reused from run
    /// to run (see [`sync::JobLock`]).
    locks: PgPool,
    /// Client-side bound on the calls the scheduler and the writers make: sqlx 0.8
    /// cannot set TCP keepalives on its sockets, so a server that vanished without a
    /// word would otherwise leave them waiting for an answer forever.
    call_timeout: Duration,
    /// One connection of the pool kept out of it for the small writes every run makes
    /// (the ledger, samples, job health): sqlx 0.8 tests a connection with a round trip
    /// each time it goes back to the pool, which doubled the statements a one-second
    /// job costs; also for the paused jobs every replica reads every few seconds.
    /// `None` inside until first used or after a failure dropped it.
    hot: Option<Arc<tokio::sync::Mutex<Option<PoolConnection<Postgres>>>>>,
}

/// Drops the hot connection unless the statement on it finished: a statement cut off
/// (a timeout, a cancelled caller) or failing below SQL leaves the session in a state
/// nobody knows.
struct HotGuard<'a> {
    slot: &'a mut Option<PoolConnection<Postgres>>,
    done: bool,
}

impl Drop for HotGuard<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Some(mut conn) = self.slot.take()
        {
            conn.close_on_drop();
        }
    }
}

/// How vigil's connections behave. Defaults match the settings' defaults.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub max_connections: u32,
    pub lock_connections: u32,
    /// One connection attempt, or the wait for a pooled connection.
    pub acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` on every connection.
    pub statement_timeout: Option<Duration>,
    /// Server-side TCP keepalives (`tcp_keepalives_idle`; probes every third of it,
    /// three of them): the server notices a vanished vigil and frees its locks.
    pub keepalive: Option<Duration>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            lock_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Some(Duration::from_secs(60)),
            keepalive: Some(Duration::from_secs(30)),
        }
    }
}

impl PoolOptions {
    /// How long a client-side bounded call may take: the statement timeout (the
    /// server's own bound) and a connection's acquisition, plus a margin.
    fn call_timeout(&self) -> Duration {
        self.statement_timeout.unwrap_or(Duration::from_secs(300))
            + self.acquire_timeout
            + Duration::from_secs(5)
    }

    /// `options` with the statement timeout and keepalives set for every session.
    fn apply(&self, options: PgConnectOptions) -> PgConnectOptions {
        // Every statement is planned for its own parameters: a generic plan of "a job's
        // runs" guesses every job equally common, and for a rare one walks the whole
        // time index instead of probing the job's (tests/query_plans.rs).
        let mut params: Vec<(&str, String)> =
            vec![("plan_cache_mode", "force_custom_plan".to_owned())];
        if let Some(t) = self.statement_timeout {
            params.push(("statement_timeout", format!("{}ms", t.as_millis())));
        }
        if let Some(k) = self.keepalive {
            let idle = k.as_secs().max(1);
            params.push(("tcp_keepalives_idle", idle.to_string()));
            params.push(("tcp_keepalives_interval", (idle / 3).max(1).to_string()));
            params.push(("tcp_keepalives_count", "3".into()));
        }
        options.options(params)
    }
}

/// Connection parameters with a printable, password-free name.
#[derive(Clone)]
pub struct Target {
    pub options: PgConnectOptions,
    pub display: String,
}

impl Target {
    pub fn from_settings(target: &DatabaseTarget) -> Result<Self, StoreError> {
        let options = match target {
            // sqlx's parse error can quote the URL; say what is wrong without it.
            DatabaseTarget::Url(url) => PgConnectOptions::from_str(url.expose()).map_err(|_| {
                StoreError::BadUrl(format!(
                    "{target} is not a valid postgres:// URL (check DATABASE_URL)"
                ))
            })?,
            DatabaseTarget::Parts {
                host,
                port,
                user,
                password,
                name,
                sslmode,
                sslrootcert,
            } => {
                let mut o = PgConnectOptions::new()
                    .host(host)
                    .port(*port)
                    .username(user)
                    .database(name);
                if let Some(p) = password {
                    o = o.password(p.expose());
                }
                if let Some(mode) = sslmode {
                    // Checked against the list in `config`: always one sqlx knows.
                    if let Ok(mode) = mode.parse::<sqlx::postgres::PgSslMode>() {
                        o = o.ssl_mode(mode);
                    }
                }
                if let Some(ca) = sslrootcert {
                    o = o.ssl_root_cert(ca);
                }
                o
            }
        };
        Ok(Self {
            options,
            display: target.to_string(),
        })
    }
}

impl Store {
    /// Connects with default [`PoolOptions`] and `max_connections`, retrying until
    /// `wait` has passed.
    pub async fn connect(
        target: &Target,
        max_connections: u32,
        wait: Duration,
    ) -> Result<Self, StoreError> {
        let options = PoolOptions {
            max_connections,
            ..PoolOptions::default()
        };
        Self::connect_with(target, &options, wait).await
    }

    /// Connects, retrying until `wait` has passed: a database container is often
    /// still starting when vigil's container is.
    pub async fn connect_with(
        target: &Target,
        pool: &PoolOptions,
        wait: Duration,
    ) -> Result<Self, StoreError> {
        let options = pool.apply(
            target
                .options
                .clone()
                .application_name("vigil")
                .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(5)),
        );
        let deadline = tokio::time::Instant::now() + wait;
        let mut delay = Duration::from_millis(100);
        loop {
            // No ping before each use: it was a round trip per statement (a tenth of a
            // 1 s host job's CPU). A connection that died is found by the statement
            // that uses it, which fails, closes it, and is retried by its caller.
            let attempt = PgPoolOptions::new()
                .test_before_acquire(false)
                .max_connections(pool.max_connections)
                .acquire_timeout(pool.acquire_timeout.min(wait.max(Duration::from_secs(1))))
                .connect_with(options.clone())
                .await;
            match attempt {
                Ok(main) => {
                    let locks = PgPoolOptions::new()
                        .max_connections(pool.lock_connections)
                        .min_connections(0)
                        .idle_timeout(Duration::from_secs(600))
                        .acquire_timeout(pool.acquire_timeout)
                        .connect_lazy_with(options.clone().application_name("vigil-locks"));
                    return Ok(Self {
                        hot: hot_slot(&main),
                        pool: main,
                        locks,
                        call_timeout: pool.call_timeout(),
                    });
                }
                Err(e) if tokio::time::Instant::now() + delay < deadline && is_transient(&e) => {
                    tracing::info!(target = %target.display, error = %e, "waiting for PostgreSQL");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(source) => {
                    return Err(StoreError::Unreachable {
                        target: target.display.clone(),
                        waited: wait,
                        source,
                    });
                }
            }
        }
    }

    /// Wraps an existing pool (tests, tools); locks get a small pool of their own
    /// with the same connection options.
    pub fn from_pool(pool: PgPool) -> Self {
        let defaults = PoolOptions::default();
        let locks = PgPoolOptions::new()
            .max_connections(defaults.lock_connections)
            .acquire_timeout(defaults.acquire_timeout)
            .connect_lazy_with(
                pool.connect_options()
                    .as_ref()
                    .clone()
                    .application_name("vigil-locks"),
            );
        Self {
            hot: hot_slot(&pool),
            pool,
            locks,
            call_timeout: defaults.call_timeout(),
        }
    }

    /// Runs `write` on the hot connection (the `hot` field), within the call bound;
    /// on the pool when it is too small to spare one.
    pub(crate) async fn hot_write<T>(
        &self,
        write: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        let Some(hot) = &self.hot else {
            return self
                .bounded(async {
                    let mut conn = self.pool.acquire().await?;
                    Ok(write(&mut conn).await?)
                })
                .await;
        };
        self.bounded(async {
            let mut slot = hot.lock().await;
            if slot.is_none() {
                *slot = Some(self.pool.acquire().await?);
            }
            let mut guard = HotGuard {
                slot: &mut slot,
                done: false,
            };
            let Some(conn) = guard.slot.as_mut() else {
                return Err(StoreError::Query(sqlx::Error::PoolClosed));
            };
            let result = write(conn).await;
            guard.done = match &result {
                Ok(_) => true,
                Err(e) => session_survives(e),
            };
            Ok(result?)
        })
        .await
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs one call with the client-side bound (see [`Store::call_timeout`]).
    pub(crate) async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::TimedOut(self.call_timeout)),
        }
    }

    /// Applies the embedded migrations. Concurrent runners serialise on sqlx's lock.
    /// The statement timeout does not apply: converting a large table may take long.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        let result = sqlx::migrate!("./migrations").run(&mut *conn).await;
        // Back to the session's own default before the connection returns to the pool.
        sqlx::query("RESET statement_timeout")
            .execute(&mut *conn)
            .await?;
        result?;
        // A migrated database takes samples into today's partitions at once. A role
        // that may not create them still works: the default partition takes the rows.
        if let Err(e) = self.ensure_partitions(chrono::Utc::now()).await {
            tracing::warn!(error = %e, "cannot create the time partitions ahead; samples go to the default partition until they exist");
        }
        Ok(())
    }

    /// True if a trivial query succeeds now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        // The pool's close waits for every connection to come back.
        if let Some(hot) = &self.hot
            && let Ok(mut slot) = tokio::time::timeout(self.call_timeout, hot.lock()).await
            && let Some(conn) = slot.take()
        {
            let _ = conn.close().await;
        }
        self.locks.close().await;
        self.pool.close().await;
    }
}

/// A hot connection only where the pool has another one for everything else.
/// Whether the session is still usable after `e`: an error the server answered leaves
/// it ready for the next statement, unless the server said the session is over (a
/// FATAL error: terminated by an administrator, the server shutting down).
fn session_survives(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .is_some_and(|pg| {
            !matches!(
                pg.severity(),
                sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
            )
        })
}

fn hot_slot(pool: &PgPool) -> Option<Arc<tokio::sync::Mutex<Option<PoolConnection<Postgres>>>>> {
    (pool.options().get_max_connections() >= 2).then(|| Arc::new(tokio::sync::Mutex::new(None)))
}

/// `s` with U+0000 written as the six characters `\\u0000`: PostgreSQL's `text` and
/// `jsonb` refuse that one character, so anything quoted from outside (a document, an
/// error message) goes through here before it is stored.
pub fn pg_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\\u0000"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Errors worth waiting out at start-up (server booting, network not up yet).
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        // 57P03: the database system is starting up.
        sqlx::Error::Database(db) => db.code().as_deref() == Some("57P03"),
        _ => false,
    }
}

/// Creates database `name` through `admin` if it does not exist yet.
pub async fn ensure_database(admin: &PgConnectOptions, name: &str) -> Result<(), StoreError> {
    use sqlx::Connection as _;
    let mut conn = tokio::time::timeout(
        PoolOptions::default().acquire_timeout,
        sqlx::PgConnection::connect_with(admin),
    )
    .await
    .map_err(|_| StoreError::TimedOut(PoolOptions::default().acquire_timeout))??;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        // CREATE DATABASE takes no parameters; quote the name as an identifier.
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut conn)
            .await?;
    }
    conn.close().await?;
    Ok(())
}
