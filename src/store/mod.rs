//! The PostgreSQL store: the only module that writes SQL.

pub mod embedded;
mod metrics;
pub mod readings;
mod retention;
pub mod runs;
pub mod sync;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, PgPool};

use crate::config::DatabaseTarget;

pub use runs::{RunRecord, RunStatus, Trigger};

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
}

impl StoreError {
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
    /// Connects, retrying until `wait` has passed: a database container is often
    /// still starting when vigil's container is.
    pub async fn connect(
        target: &Target,
        max_connections: u32,
        wait: Duration,
    ) -> Result<Self, StoreError> {
        let options = target
            .options
            .clone()
            .application_name("vigil")
            .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(5));
        let deadline = tokio::time::Instant::now() + wait;
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.clone())
                .await;
            match attempt {
                Ok(pool) => return Ok(Self { pool }),
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

    /// Wraps an existing pool (tests, tools).
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the embedded migrations. Concurrent runners serialise on sqlx's lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// True if a trivial query succeeds now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
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
    let mut conn = sqlx::PgConnection::connect_with(admin).await?;
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
