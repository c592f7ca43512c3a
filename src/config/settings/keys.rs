//! Every setting: its key in `[runner]` (when it may be set there), its environment
//! variable, and its default, with the reason for the value. One line per key.

use std::time::Duration;

/// Whether a key may be set in the `[runner]` table of jobs.toml (secrets and the
/// database's parts may not: they belong to the environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    RunnerAndEnv,
    EnvOnly,
}

/// One setting.
#[derive(Debug)]
pub struct Key {
    pub name: &'static str,
    pub var: &'static str,
    pub place: In,
}

const fn key(name: &'static str, var: &'static str, place: In) -> Key {
    Key { name, var, place }
}

use In::{EnvOnly, RunnerAndEnv};

pub const KEYS: &[Key] = &[
    key("database_url", "DATABASE_URL", RunnerAndEnv),
    key("db_host", "DB_HOST", EnvOnly),
    key("db_port", "DB_PORT", EnvOnly),
    key("db_user", "DB_USER", EnvOnly),
    key("db_password", "DB_PASSWORD", EnvOnly),
    key("db_name", "DB_NAME", EnvOnly),
    key("db_sslmode", "DB_SSLMODE", EnvOnly),
    key("db_sslrootcert", "DB_SSLROOTCERT", EnvOnly),
    key("port", "PORT", RunnerAndEnv),
    key("bind", "VIGIL_BIND", RunnerAndEnv),
    key("mongo_uri", "MONGO_URI", RunnerAndEnv),
    key("loki_url", "LOKI_URL", RunnerAndEnv),
    key("host", "VIGIL_HOST", RunnerAndEnv),
    key("shutdown_grace", "VIGIL_SHUTDOWN_GRACE", RunnerAndEnv),
    key("data_dir", "VIGIL_DATA_DIR", RunnerAndEnv),
    key(
        "db_max_connections",
        "VIGIL_DB_MAX_CONNECTIONS",
        RunnerAndEnv,
    ),
    key("worker_threads", "VIGIL_WORKER_THREADS", RunnerAndEnv),
    key(
        "db_connect_timeout",
        "VIGIL_DB_CONNECT_TIMEOUT",
        RunnerAndEnv,
    ),
    key(
        "db_acquire_timeout",
        "VIGIL_DB_ACQUIRE_TIMEOUT",
        RunnerAndEnv,
    ),
    key(
        "db_statement_timeout",
        "VIGIL_DB_STATEMENT_TIMEOUT",
        RunnerAndEnv,
    ),
    key("db_keepalive", "VIGIL_DB_KEEPALIVE", RunnerAndEnv),
    key(
        "db_lock_connections",
        "VIGIL_DB_LOCK_CONNECTIONS",
        RunnerAndEnv,
    ),
    key("spool_max_bytes", "VIGIL_SPOOL_MAX_BYTES", RunnerAndEnv),
    key("pg_bin_dir", "VIGIL_PG_BIN_DIR", RunnerAndEnv),
    key("host_root", "VIGIL_HOST_ROOT", RunnerAndEnv),
    key("run_cgroups", "VIGIL_RUN_CGROUPS", RunnerAndEnv),
    key("loki_labels", "VIGIL_LOKI_LABELS", RunnerAndEnv),
    key("loki_max_buffer", "VIGIL_LOKI_MAX_BUFFER", RunnerAndEnv),
    key("api_token", "VIGIL_API_TOKEN", EnvOnly),
    key("api_reads_open", "VIGIL_API_READS_OPEN", RunnerAndEnv),
    key("metrics_public", "VIGIL_METRICS_PUBLIC", RunnerAndEnv),
    key("allow_no_token", "VIGIL_ALLOW_NO_TOKEN", EnvOnly),
    key("allowed_origins", "VIGIL_ALLOWED_ORIGINS", RunnerAndEnv),
    key("max_waiting", "VIGIL_MAX_WAITING", RunnerAndEnv),
    key("max_connections", "VIGIL_MAX_CONNECTIONS", RunnerAndEnv),
    key("reading_sync_job", "VIGIL_READING_SYNC_JOB", RunnerAndEnv),
    key("watch_config", "VIGIL_WATCH_CONFIG", RunnerAndEnv),
    key("max_input_bytes", "VIGIL_MAX_INPUT_BYTES", RunnerAndEnv),
    key("callback_allow", "VIGIL_CALLBACK_ALLOW", RunnerAndEnv),
    key("callback_secret", "VIGIL_CALLBACK_SECRET", EnvOnly),
];

/// `VIGIL_*` variables read elsewhere than this table (the CLI's and logging's own).
pub const OTHER_VIGIL_VARS: &[&str] = &[
    "VIGIL_CONFIG",
    "VIGIL_LOG",
    "VIGIL_LOG_FORMAT",
    "VIGIL_LOG_BUFFER",
];

/// The seed's gateway port.
pub const DEFAULT_PORT: u16 = 8085;
/// Loopback: exposing the gateway is a deliberate act (the container sets 0.0.0.0).
pub const DEFAULT_BIND: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// Long enough for a typical batch to finish, short enough for an orchestrator's kill
/// timeout (Docker waits 10 s by default; compose sets stop_grace_period).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Relative to the working directory: the embedded PostgreSQL and the spools.
pub const DEFAULT_DATA_DIR: &str = "data";
/// Jobs, ledger and gateway share the pool; ten covers them on a small host.
pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 10;
/// A replica that only samples its host (every job host-scoped) writes one batch at
/// a time; the ledger and the rest wait their turn on the second connection.
pub const DEFAULT_HOST_ONLY_CONNECTIONS: u32 = 2;
/// A database container can take this long to accept connections after boot.
pub const DEFAULT_DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// One connection attempt (or the wait for a pooled connection): long enough for a
/// TLS handshake across a region, short enough that a firing whose claim cannot reach
/// PostgreSQL is recorded failed promptly.
pub const DEFAULT_DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// No statement of vigil's runs longer (batches are bounded); a stuck one is cut.
pub const DEFAULT_DB_STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle time before the server probes a silent connection: a vanished replica's
/// advisory locks are released within about twice this.
pub const DEFAULT_DB_KEEPALIVE: Duration = Duration::from_secs(30);
/// Connections that hold `cluster` jobs' advisory locks for the length of a run: the
/// number of such runs that can go on at once on one replica.
pub const DEFAULT_DB_LOCK_CONNECTIONS: u32 = 8;
/// Per spool (one per host-metrics job, one for the ledger): a day of 10 s samples is
/// about 13 MiB, so this keeps well over a week of an outage.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 << 20;
/// Used when neither `DATABASE_URL` nor the part is set (with at least one part set).
pub const DEFAULT_DB_HOST: &str = "localhost";
pub const DEFAULT_DB_PORT: u16 = 5432;
pub const DEFAULT_DB_USER: &str = "vigil";
pub const DEFAULT_DB_NAME: &str = "vigil";
/// With a token, reads need it too: the API is closed unless opened.
pub const DEFAULT_API_READS_OPEN: bool = false;
/// With a token, `/metrics` needs it too (Prometheus sends one with `authorization`).
pub const DEFAULT_METRICS_PUBLIC: bool = false;
/// Requests that wait for a run's end (`?wait=`, `/api/sync/reading`) hold a connection
/// each: a few dozen is plenty for people and scripts, and bounds what a flood holds.
pub const DEFAULT_MAX_WAITING: u32 = 32;
/// Open connections to the gateway; past it, new ones wait in the kernel's backlog.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;
/// A cgroup per `command` run where vigil may make one: the kernel then counts
/// everything the run started.
pub const DEFAULT_RUN_CGROUPS: bool = true;
/// The seed's reading sync job.
pub const DEFAULT_READING_SYNC_JOB: &str = "reading-sync";
/// Tens of thousands of events: a few minutes of a busy runner's logs.
pub const DEFAULT_LOKI_MAX_BUFFER: usize = 8 << 20;
/// Editing jobs.toml is how operators change jobs; SIGHUP and the API stay available
/// where file events do not arrive (some network file systems).
pub const DEFAULT_WATCH_CONFIG: bool = true;
/// A run's input (`POST /api/jobs/{name}/runs`): room for real parameters, not a bulk
/// upload.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 256 << 10;
