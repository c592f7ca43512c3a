//! Shared test helpers: a fresh PostgreSQL database per test, and the real binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _};
use vigil::store::Store;

/// The server tests create their databases in. `scripts/test` sets it; the default is
/// the local server on 5432 as the current user.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        let user = std::env::var("USER").unwrap_or_else(|_| "postgres".into());
        format!("postgres://{user}@127.0.0.1:5432/postgres")
    })
}

/// A uniquely named database, migrated, dropped when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub store: Store,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::create(true).await
    }

    /// An empty database (no migrations), for tests of start-up itself.
    pub async fn empty() -> Self {
        Self::create(false).await
    }

    async fn create(migrate: bool) -> Self {
        let admin = admin_url();
        let name = format!("vigil_test_{}", uuid::Uuid::new_v4().simple());
        let opts = PgConnectOptions::from_str(&admin).expect("TEST_DATABASE_URL is a URL");
        let mut conn = sqlx::PgConnection::connect_with(&opts).await.unwrap_or_else(|e| {
            panic!("cannot reach the test PostgreSQL at {admin}: {e}; run ./scripts/test, or set TEST_DATABASE_URL")
        });
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let url = with_database(&admin, &name);
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect_with(
                PgConnectOptions::from_str(&url)
                    .unwrap()
                    .log_statements(log::LevelFilter::Trace),
            )
            .await
            .expect("connect to test database");
        let store = Store::from_pool(pool);
        if migrate {
            store.migrate().await.expect("migrate test database");
        }
        Self { name, url, store }
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        self.store.pool()
    }

    /// Every ledger row of `job`, oldest first.
    pub async fn runs(&self, job: &str) -> Vec<vigil::store::RunRecord> {
        let mut runs = self
            .store
            .runs(&vigil::store::runs::RunQuery {
                job: Some(job),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .expect("read job_runs");
        runs.reverse();
        runs
    }

    /// What jobs built in a test may use: this database, runner `h`.
    pub fn deps(&self) -> vigil::jobs::Deps {
        vigil::jobs::Deps {
            store: self.store.clone(),
            host: "h".into(),
            metrics: Default::default(),
            mongo_uri: None,
            env: vigil::config::Environment::capture().unwrap(),
            host_root: None,
            spool: None,
            run_cgroups: true,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = admin_url();
        // Drop runs outside any runtime guarantee: use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(opts) = PgConnectOptions::from_str(&admin)
                    && let Ok(mut conn) = sqlx::PgConnection::connect_with(&opts).await
                {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                }
            });
        })
        .join();
    }
}

/// `postgres://u@h:p/old?x` → `postgres://u@h:p/<db>?x`
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

pub fn vigil_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vigil"))
}

/// The real binary with a clean environment: only what the test passes gets in.
pub fn vigil(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(vigil_bin());
    cmd.current_dir(dir)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("VIGIL_LOG_FORMAT", "json")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A child process killed when the test ends, however it ends.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal the child");
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// Polls `check` every 100 ms until it returns `Some` or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A throwaway nx-27017 (a MongoDB wire-protocol server) on a free port, in memory.
/// `scripts/test` installs it into `.tools/venv`; `NX_27017_BIN` overrides the path.
pub struct MongoServer {
    child: Child,
    pub uri: String,
    _dir: tempfile::TempDir,
}

impl MongoServer {
    pub async fn start() -> Self {
        let bin = std::env::var("NX_27017_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/nx-27017")
            });
        assert!(
            bin.exists(),
            "nx-27017 not found at {}: run ./scripts/test, which installs it",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("nx.log");
        let child = Command::new(&bin)
            .args([
                "--db",
                "memory",
                "--host",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .arg("--log-file")
            .arg(&log)
            .arg("--pid-file")
            .arg(dir.path().join("nx.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if std::time::Instant::now() > deadline {
                panic!(
                    "nx-27017 did not accept connections on {port}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            uri: format!("mongodb://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    pub async fn client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(&self.uri).await.unwrap()
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client for tests. reqwest is built without a bundled TLS provider (vigil
/// installs ring's); install it here too, or building a client panics.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A PostgreSQL cluster of the test's own (the embedded one, in a temporary
/// directory), which a fault test may stop and start: never the shared server.
pub struct OwnPostgres {
    pub pg: Option<vigil::store::embedded::EmbeddedPostgres>,
    dir: tempfile::TempDir,
}

impl OwnPostgres {
    pub async fn start() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut me = Self { pg: None, dir };
        me.up().await;
        vigil::store::ensure_database(
            &me.pg.as_ref().unwrap().connect_options("postgres"),
            vigil::store::embedded::DATABASE,
        )
        .await
        .unwrap();
        me
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("pg")
    }

    /// The embedded server's data directory (the cluster is in `postgres/` below it).
    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    pub fn port(&self) -> u16 {
        self.pg.as_ref().expect("running").port()
    }

    /// The superuser's password.
    pub fn password(&self) -> String {
        std::fs::read_to_string(self.data().join("postgres.password"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Starts (again) the cluster, on the port it had.
    pub async fn up(&mut self) {
        let data = self.data();
        let pg = tokio::task::spawn_blocking(move || {
            vigil::store::embedded::EmbeddedPostgres::start(&data, None)
                .expect("start a throwaway PostgreSQL")
        })
        .await
        .unwrap();
        self.pg = Some(pg);
    }

    /// Stops the cluster (fast shutdown: sessions are cut).
    pub async fn down(&mut self) {
        if let Some(pg) = self.pg.take() {
            tokio::task::spawn_blocking(move || pg.stop().unwrap())
                .await
                .unwrap();
        }
    }

    pub fn target(&self) -> vigil::store::Target {
        let pg = self.pg.as_ref().expect("running");
        vigil::store::Target {
            options: pg.connect_options(vigil::store::embedded::DATABASE),
            display: pg.describe(),
        }
    }

    /// A URL for the real binary (the password is in the data directory).
    pub fn url(&self) -> String {
        let pg = self.pg.as_ref().expect("running");
        let password = std::fs::read_to_string(self.data().join("postgres.password"))
            .unwrap()
            .trim()
            .to_owned();
        format!(
            "postgres://vigil:{password}@127.0.0.1:{}/{}",
            pg.port(),
            vigil::store::embedded::DATABASE
        )
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        if let Some(pg) = self.pg.take() {
            let _ = pg.stop();
        }
    }
}
