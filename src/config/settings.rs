//! Runner settings, layered with the `config` crate:
//! built-in defaults < the `[runner]` table of jobs.toml < the environment (and `.env`).
//!
//! Every key is read and checked on its own, so all bad values are reported together,
//! each naming the variable or the file position it came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config as Layers, Map, Source, Value, ValueKind};

use super::diagnostic::{Diagnostic, Diagnostics, Origin};
use super::file::RunnerEntry;
use super::types::HumanDuration;

/// A value that must never reach a log line or a `Debug` dump.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where vigil's PostgreSQL is. `None` in [`Settings`] means: start the embedded one.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    /// `DATABASE_URL` (or `database_url` in `[runner]`).
    Url(Secret),
    /// `DB_HOST`, `DB_PORT`, `DB_USER`, `DB_PASSWORD`, `DB_NAME`.
    Parts {
        host: String,
        port: u16,
        user: String,
        password: Option<Secret>,
        name: String,
        /// libpq's sslmode: disable, allow, prefer, require, verify-ca, verify-full.
        sslmode: Option<String>,
    },
}

impl fmt::Debug for DatabaseTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseTarget({self})")
    }
}

/// Shows where the database is without any password.
impl fmt::Display for DatabaseTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseTarget::Url(url) => f.write_str(&redact_url(url.expose())),
            DatabaseTarget::Parts {
                host,
                port,
                user,
                name,
                ..
            } => write!(f, "postgres://{user}@{host}:{port}/{name}"),
        }
    }
}

/// `scheme://user:password@host/...` → `scheme://user:***@host/...`; anything it cannot
/// parse is hidden entirely rather than risk printing a password.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    // Strip any query string: it may carry `password=`.
    let tail = tail.split('?').next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

/// The process environment, captured once, with `.env` underneath it.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, (String, Origin)>,
}

impl Environment {
    /// Reads the process environment and `./.env` (real variables win over `.env`).
    pub fn capture() -> Result<Self, Diagnostics> {
        let mut env = Self::default();
        let dotenv = Path::new(".env");
        if dotenv.exists() {
            let iter = dotenvy::from_path_iter(dotenv).map_err(|e| {
                Diagnostics(vec![Diagnostic {
                    origin: Origin::File {
                        path: dotenv.into(),
                        line: 1,
                        col: 1,
                    },
                    job: None,
                    message: format!("cannot read .env: {e}"),
                }])
            })?;
            for item in iter {
                let (k, v) = item.map_err(|e| {
                    Diagnostics(vec![Diagnostic {
                        origin: Origin::File {
                            path: dotenv.into(),
                            line: 1,
                            col: 1,
                        },
                        job: None,
                        message: format!("invalid .env: {e}"),
                    }])
                })?;
                let origin = Origin::Env(format!("{k} (from .env)"));
                env.vars.insert(k, (v, origin));
            }
        }
        for (k, v) in std::env::vars_os() {
            if let (Ok(k), Ok(v)) = (k.into_string(), v.into_string()) {
                let origin = Origin::Env(k.clone());
                env.vars.insert(k, (v, origin));
            }
        }
        Ok(env)
    }

    /// An environment made of exactly these variables (tests, embedding).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let vars = pairs
            .into_iter()
            .map(|(k, v)| {
                let k = k.into();
                let origin = Origin::Env(k.clone());
                (k, (v.into(), origin))
            })
            .collect();
        Self { vars }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(|(v, _)| v.as_str())
    }

    fn origin(&self, name: &str) -> Option<&Origin> {
        self.vars.get(name).map(|(_, o)| o)
    }
}

/// Validated runner settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `None`: no database configured, so `vigil run` starts an embedded one.
    pub database: Option<DatabaseTarget>,
    pub port: u16,
    pub bind: IpAddr,
    pub mongo_uri: Option<Secret>,
    pub loki_url: Option<String>,
    /// Names this runner in the ledger's `host` column.
    pub host: String,
    pub shutdown_grace: Duration,
    pub data_dir: PathBuf,
    pub db_max_connections: u32,
    pub db_connect_timeout: Duration,
    /// Bound on one connection attempt or the wait for a pooled connection.
    pub db_acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` for vigil's connections; `None`: off.
    pub db_statement_timeout: Option<Duration>,
    /// Server-side TCP keepalive idle time for vigil's connections; `None`: off.
    pub db_keepalive: Option<Duration>,
    /// Size of the pool that holds `cluster` jobs' advisory locks.
    pub db_lock_connections: u32,
    /// Most bytes each spool (under `<data_dir>/spool`) keeps on disk.
    pub spool_max_bytes: u64,
    pub pg_bin_dir: Option<PathBuf>,
    /// With a token, every request that starts work needs `Authorization: Bearer <token>`.
    pub api_token: Option<Secret>,
    /// Whether reads (job lists, run history, readings, metrics) need no token.
    pub api_reads_open: bool,
    /// The job `/api/sync/reading` runs.
    pub reading_sync_job: String,
    /// Extra static Loki labels, beside `service`, `host`, `level` and `job`.
    pub loki_labels: Vec<(String, String)>,
    /// Most bytes of log events held for Loki.
    pub loki_max_buffer: usize,
    /// Whether `vigil run` reloads the jobs file when it changes on disk.
    pub watch_config: bool,
}

/// One setting: its key in `[runner]` (if settable there) and its variable.
struct Key {
    name: &'static str,
    in_runner: bool,
    var: &'static str,
}

const KEYS: &[Key] = &[
    Key {
        name: "database_url",
        in_runner: true,
        var: "DATABASE_URL",
    },
    Key {
        name: "db_host",
        in_runner: false,
        var: "DB_HOST",
    },
    Key {
        name: "db_port",
        in_runner: false,
        var: "DB_PORT",
    },
    Key {
        name: "db_user",
        in_runner: false,
        var: "DB_USER",
    },
    Key {
        name: "db_password",
        in_runner: false,
        var: "DB_PASSWORD",
    },
    Key {
        name: "db_name",
        in_runner: false,
        var: "DB_NAME",
    },
    Key {
        name: "db_sslmode",
        in_runner: false,
        var: "DB_SSLMODE",
    },
    Key {
        name: "port",
        in_runner: true,
        var: "PORT",
    },
    Key {
        name: "bind",
        in_runner: true,
        var: "VIGIL_BIND",
    },
    Key {
        name: "mongo_uri",
        in_runner: true,
        var: "MONGO_URI",
    },
    Key {
        name: "loki_url",
        in_runner: true,
        var: "LOKI_URL",
    },
    Key {
        name: "host",
        in_runner: true,
        var: "VIGIL_HOST",
    },
    Key {
        name: "shutdown_grace",
        in_runner: true,
        var: "VIGIL_SHUTDOWN_GRACE",
    },
    Key {
        name: "data_dir",
        in_runner: true,
        var: "VIGIL_DATA_DIR",
    },
    Key {
        name: "db_max_connections",
        in_runner: true,
        var: "VIGIL_DB_MAX_CONNECTIONS",
    },
    Key {
        name: "db_connect_timeout",
        in_runner: true,
        var: "VIGIL_DB_CONNECT_TIMEOUT",
    },
    Key {
        name: "db_acquire_timeout",
        in_runner: true,
        var: "VIGIL_DB_ACQUIRE_TIMEOUT",
    },
    Key {
        name: "db_statement_timeout",
        in_runner: true,
        var: "VIGIL_DB_STATEMENT_TIMEOUT",
    },
    Key {
        name: "db_keepalive",
        in_runner: true,
        var: "VIGIL_DB_KEEPALIVE",
    },
    Key {
        name: "db_lock_connections",
        in_runner: true,
        var: "VIGIL_DB_LOCK_CONNECTIONS",
    },
    Key {
        name: "spool_max_bytes",
        in_runner: true,
        var: "VIGIL_SPOOL_MAX_BYTES",
    },
    Key {
        name: "pg_bin_dir",
        in_runner: true,
        var: "VIGIL_PG_BIN_DIR",
    },
    Key {
        name: "loki_labels",
        in_runner: true,
        var: "VIGIL_LOKI_LABELS",
    },
    Key {
        name: "loki_max_buffer",
        in_runner: true,
        var: "VIGIL_LOKI_MAX_BUFFER",
    },
    Key {
        name: "api_token",
        in_runner: false,
        var: "VIGIL_API_TOKEN",
    },
    Key {
        name: "api_reads_open",
        in_runner: true,
        var: "VIGIL_API_READS_OPEN",
    },
    Key {
        name: "reading_sync_job",
        in_runner: true,
        var: "VIGIL_READING_SYNC_JOB",
    },
    Key {
        name: "watch_config",
        in_runner: true,
        var: "VIGIL_WATCH_CONFIG",
    },
];

/// `VIGIL_*` variables read elsewhere than this table (the CLI's own).
const OTHER_VIGIL_VARS: &[&str] = &[
    "VIGIL_CONFIG",
    "VIGIL_LOG",
    "VIGIL_LOG_FORMAT",
    "VIGIL_LOG_BUFFER",
];

/// Defaults, each with the reason for its value.
mod defaults {
    /// The seed's gateway port.
    pub const PORT: i64 = 8085;
    /// Loopback: exposing the gateway is a deliberate act (the container sets 0.0.0.0).
    pub const BIND: &str = "127.0.0.1";
    /// Long enough for a typical batch to finish, short enough for an orchestrator's
    /// kill timeout (Docker waits 10 s by default; compose sets stop_grace_period).
    pub const SHUTDOWN_GRACE: &str = "30s";
    pub const DATA_DIR: &str = "data";
    /// Jobs, ledger and gateway share the pool; ten covers them on a small host.
    pub const DB_MAX_CONNECTIONS: i64 = 10;
    /// A database container can take this long to accept connections after boot.
    pub const DB_CONNECT_TIMEOUT: &str = "30s";
    /// One connection attempt (or the wait for a pooled connection): long enough for a
    /// TLS handshake across a region, short enough that a firing whose claim cannot
    /// reach PostgreSQL is recorded failed promptly.
    pub const DB_ACQUIRE_TIMEOUT: &str = "10s";
    /// No statement of vigil's runs longer (batches are bounded); a stuck one is cut.
    pub const DB_STATEMENT_TIMEOUT: &str = "60s";
    /// Idle time before the server probes a silent connection: a vanished replica's
    /// advisory locks are released within about twice this.
    pub const DB_KEEPALIVE: &str = "30s";
    /// Connections that hold `cluster` jobs' advisory locks for the length of a run:
    /// the number of such runs that can go on at once on this replica.
    pub const DB_LOCK_CONNECTIONS: i64 = 8;
    /// Per spool (one per host-metrics job, one for the ledger): a day of 10 s samples
    /// is about 13 MiB, so this keeps well over a week of an outage.
    pub const SPOOL_MAX_BYTES: &str = "256MiB";
    pub const DB_HOST: &str = "localhost";
    pub const DB_PORT: i64 = 5432;
    pub const DB_USER: &str = "vigil";
    pub const DB_NAME: &str = "vigil";
    /// Dashboards and health probes read without credentials unless closed explicitly.
    pub const API_READS_OPEN: bool = true;
    /// The seed's reading sync job.
    pub const READING_SYNC_JOB: &str = "reading-sync";
    /// Tens of thousands of events: a few minutes of a busy runner's logs.
    pub const LOKI_MAX_BUFFER: &str = "8MiB";
    /// Editing jobs.toml is how operators change jobs; SIGHUP and the API stay
    /// available where file events do not arrive (some network file systems).
    pub const WATCH_CONFIG: bool = true;
}

/// The `[runner]` table as a `config` source, each value carrying its file position.
#[derive(Debug, Clone)]
struct RunnerSource(Vec<RunnerEntry>);

impl Source for RunnerSource {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self
            .0
            .iter()
            .map(|e| {
                let origin = e.origin.to_string();
                (e.key.clone(), Value::new(Some(&origin), e.value.clone()))
            })
            .collect())
    }
}

/// The environment variables vigil knows, mapped to their setting keys.
#[derive(Debug, Clone)]
struct EnvSource(Vec<(String, String, Origin)>);

impl Source for EnvSource {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self
            .0
            .iter()
            .map(|(key, v, origin)| {
                let origin = origin.to_string();
                (
                    key.clone(),
                    Value::new(Some(&origin), ValueKind::String(v.clone())),
                )
            })
            .collect())
    }
}

impl Settings {
    /// Layers defaults, `[runner]` and `env`, and validates every key.
    pub fn load(runner: &[RunnerEntry], env: &Environment) -> Result<Self, Diagnostics> {
        let mut diags = Vec::new();

        // Where each key's winning value came from, for messages.
        let mut origins: HashMap<&'static str, Origin> = HashMap::new();
        let mut runner_entries = Vec::new();
        for entry in runner {
            match KEYS.iter().find(|k| k.name == entry.key && k.in_runner) {
                Some(k) => {
                    origins.insert(k.name, entry.origin.clone());
                    runner_entries.push(entry.clone());
                }
                None => diags.push(Diagnostic {
                    origin: entry.origin.clone(),
                    job: None,
                    message: format!(
                        "unknown [runner] setting `{}`, expected one of {}",
                        entry.key,
                        KEYS.iter()
                            .filter(|k| k.in_runner)
                            .map(|k| format!("`{}`", k.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }),
            }
        }
        let mut env_entries = Vec::new();
        for k in KEYS {
            if let Some(v) = env.get(k.var) {
                let origin = env
                    .origin(k.var)
                    .cloned()
                    .unwrap_or(Origin::Env(k.var.into()));
                origins.insert(k.name, origin.clone());
                env_entries.push((k.name.to_owned(), v.to_owned(), origin));
            }
        }
        for (name, (_, origin)) in &env.vars {
            if name.starts_with("VIGIL_")
                && !KEYS.iter().any(|k| k.var == name)
                && !OTHER_VIGIL_VARS.contains(&name.as_str())
            {
                diags.push(Diagnostic {
                    origin: origin.clone(),
                    job: None,
                    message: format!(
                        "unknown variable {name}; vigil reads {}",
                        KEYS.iter()
                            .map(|k| k.var)
                            .filter(|v| v.starts_with("VIGIL_"))
                            .chain(OTHER_VIGIL_VARS.iter().copied())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }

        let layers = Layers::builder()
            .set_default("port", defaults::PORT)
            .and_then(|b| b.set_default("bind", defaults::BIND))
            .and_then(|b| b.set_default("shutdown_grace", defaults::SHUTDOWN_GRACE))
            .and_then(|b| b.set_default("data_dir", defaults::DATA_DIR))
            .and_then(|b| b.set_default("db_max_connections", defaults::DB_MAX_CONNECTIONS))
            .and_then(|b| b.set_default("db_connect_timeout", defaults::DB_CONNECT_TIMEOUT))
            .and_then(|b| b.set_default("db_acquire_timeout", defaults::DB_ACQUIRE_TIMEOUT))
            .and_then(|b| b.set_default("db_statement_timeout", defaults::DB_STATEMENT_TIMEOUT))
            .and_then(|b| b.set_default("db_keepalive", defaults::DB_KEEPALIVE))
            .and_then(|b| b.set_default("db_lock_connections", defaults::DB_LOCK_CONNECTIONS))
            .and_then(|b| b.set_default("spool_max_bytes", defaults::SPOOL_MAX_BYTES))
            .and_then(|b| b.set_default("api_reads_open", defaults::API_READS_OPEN))
            .and_then(|b| b.set_default("reading_sync_job", defaults::READING_SYNC_JOB))
            .and_then(|b| b.set_default("loki_max_buffer", defaults::LOKI_MAX_BUFFER))
            .map(|b| {
                b.add_source(RunnerSource(runner_entries))
                    .add_source(EnvSource(env_entries))
            })
            .and_then(|b| b.build());
        let layers = match layers {
            Ok(l) => l,
            Err(e) => {
                diags.push(Diagnostic {
                    origin: Origin::Unknown,
                    job: None,
                    message: format!("cannot layer settings: {e}"),
                });
                return Err(Diagnostics(diags));
            }
        };

        let mut r = Reader {
            layers: &layers,
            origins: &origins,
            diags: &mut diags,
        };
        let database = r.database();
        // 0 asks the OS for a free port (the log line "gateway listening" names it).
        let port = r.parsed("port", "a port number from 0 to 65535", |s| {
            s.parse::<u16>().ok()
        });
        let bind = r.parsed("bind", "an IP address such as 127.0.0.1 or 0.0.0.0", |s| {
            s.parse::<IpAddr>().ok()
        });
        let mongo_uri = r.string("mongo_uri").map(Secret::new);
        let loki_url = r.string("loki_url");
        let host = r.string("host").unwrap_or_else(local_hostname);
        let shutdown_grace = r.duration("shutdown_grace");
        let data_dir = r.string("data_dir").map(PathBuf::from);
        let db_max_connections =
            r.parsed("db_max_connections", "a whole number from 1 to 1000", |s| {
                s.parse::<u32>().ok().filter(|n| (1..=1000).contains(n))
            });
        let db_connect_timeout = r.duration("db_connect_timeout");
        let db_acquire_timeout = r.duration("db_acquire_timeout");
        let db_statement_timeout = r.duration_or_off("db_statement_timeout");
        let db_keepalive = r.duration_or_off("db_keepalive");
        let spool_max_bytes = r.parsed(
            "spool_max_bytes",
            "a size such as 256MiB or 1GiB, at least 1MiB",
            |s| parse_bytes(s).filter(|b| *b >= 1 << 20).map(|b| b as u64),
        );
        let db_lock_connections = r.parsed(
            "db_lock_connections",
            "a whole number from 1 to 1000",
            |s| s.parse::<u32>().ok().filter(|n| (1..=1000).contains(n)),
        );
        let pg_bin_dir = r.string("pg_bin_dir").map(PathBuf::from);
        let api_token = r.string("api_token").map(Secret::new);
        let api_reads_open = r.parsed("api_reads_open", "true or false", parse_bool);
        let reading_sync_job = r.string("reading_sync_job");
        let watch_config = r.parsed("watch_config", "true or false", parse_bool);
        let loki_labels = r.parsed(
            "loki_labels",
            "comma-separated name=value pairs (names: letters, digits, '_'; not service, host, level or job)",
            parse_labels,
        );
        let loki_max_buffer = r.parsed(
            "loki_max_buffer",
            "a size such as 8MiB, 512KiB or 1048576 (bytes), at least 64KiB",
            |s| parse_bytes(s).filter(|b| *b >= 64 << 10),
        );
        if let Some(url) = r.string("loki_url")
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            r.problem(
                "loki_url",
                "loki_url: expected an http:// or https:// URL".into(),
            );
        }

        if !diags.is_empty() {
            return Err(Diagnostics(diags));
        }
        match (
            port,
            bind,
            shutdown_grace,
            data_dir,
            db_max_connections,
            db_connect_timeout,
            api_reads_open,
            reading_sync_job,
            loki_max_buffer,
            (
                db_acquire_timeout,
                db_statement_timeout,
                db_keepalive,
                db_lock_connections,
                spool_max_bytes,
            ),
        ) {
            (
                Some(port),
                Some(bind),
                Some(shutdown_grace),
                Some(data_dir),
                Some(db_max_connections),
                Some(db_connect_timeout),
                Some(api_reads_open),
                Some(reading_sync_job),
                Some(loki_max_buffer),
                (
                    Some(db_acquire_timeout),
                    Some(db_statement_timeout),
                    Some(db_keepalive),
                    Some(db_lock_connections),
                    Some(spool_max_bytes),
                ),
            ) => Ok(Settings {
                database,
                port,
                bind,
                mongo_uri,
                loki_url,
                host,
                shutdown_grace,
                data_dir,
                db_max_connections,
                db_connect_timeout,
                db_acquire_timeout,
                db_statement_timeout,
                db_keepalive,
                db_lock_connections,
                spool_max_bytes,
                pg_bin_dir,
                api_token,
                api_reads_open,
                reading_sync_job,
                loki_labels: loki_labels.unwrap_or_default(),
                loki_max_buffer,
                watch_config: watch_config.unwrap_or(defaults::WATCH_CONFIG),
            }),
            // Unreachable in practice: every `None` above pushed a diagnostic.
            _ => Err(Diagnostics(vec![Diagnostic {
                origin: Origin::Unknown,
                job: None,
                message: "incomplete settings".into(),
            }])),
        }
    }
}

/// Reads keys out of the layered settings, recording a located problem for each bad one.
struct Reader<'a> {
    layers: &'a Layers,
    origins: &'a HashMap<&'static str, Origin>,
    diags: &'a mut Vec<Diagnostic>,
}

impl Reader<'_> {
    fn problem(&mut self, key: &'static str, message: String) {
        let origin = self.origins.get(key).cloned().unwrap_or(Origin::Unknown);
        self.diags.push(Diagnostic {
            origin,
            job: None,
            message,
        });
    }

    /// A present, non-empty string value (empty counts as unset, as in shells).
    fn string(&mut self, key: &'static str) -> Option<String> {
        match self.layers.get_string(key) {
            Ok(s) if s.trim().is_empty() => None,
            Ok(s) => Some(s),
            Err(config::ConfigError::NotFound(_)) => None,
            Err(e) => {
                self.problem(key, format!("{key}: {e}"));
                None
            }
        }
    }

    fn parsed<T>(
        &mut self,
        key: &'static str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let raw = self.string(key)?;
        let value = parse(raw.trim());
        if value.is_none() {
            self.problem(
                key,
                format!("{key}: invalid value {raw:?}, expected {expected}"),
            );
        }
        value
    }

    fn duration(&mut self, key: &'static str) -> Option<Duration> {
        let raw = self.string(key)?;
        match HumanDuration::parse(raw.trim()) {
            Ok(d) => Some(d.get()),
            Err(e) => {
                self.problem(key, format!("{key}: {e}"));
                None
            }
        }
    }

    /// A duration, or `0`/`off` for none.
    fn duration_or_off(&mut self, key: &'static str) -> Option<Option<Duration>> {
        let raw = self.string(key)?;
        if matches!(raw.trim(), "0" | "off") {
            return Some(None);
        }
        self.duration(key).map(Some)
    }

    fn database(&mut self) -> Option<DatabaseTarget> {
        if let Some(url) = self.string("database_url") {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                self.problem(
                    "database_url",
                    "database_url: expected a URL starting with postgres:// or postgresql://"
                        .into(),
                );
                return None;
            }
            return Some(DatabaseTarget::Url(Secret::new(url)));
        }
        let parts = [
            "db_host",
            "db_port",
            "db_user",
            "db_password",
            "db_name",
            "db_sslmode",
        ];
        if !parts.iter().any(|k| self.origins.contains_key(k)) {
            return None;
        }
        let port = match self.origins.contains_key("db_port") {
            true => self.parsed("db_port", "a port number from 1 to 65535", |s| {
                s.parse::<u16>().ok().filter(|p| *p > 0)
            })?,
            false => defaults::DB_PORT as u16,
        };
        Some(DatabaseTarget::Parts {
            host: self
                .string("db_host")
                .unwrap_or_else(|| defaults::DB_HOST.into()),
            port,
            user: self
                .string("db_user")
                .unwrap_or_else(|| defaults::DB_USER.into()),
            password: self.string("db_password").map(Secret::new),
            name: self
                .string("db_name")
                .unwrap_or_else(|| defaults::DB_NAME.into()),
            sslmode: self.parsed(
                "db_sslmode",
                "disable, allow, prefer, require, verify-ca or verify-full",
                |s| {
                    [
                        "disable",
                        "allow",
                        "prefer",
                        "require",
                        "verify-ca",
                        "verify-full",
                    ]
                    .contains(&s)
                    .then(|| s.to_owned())
                },
            ),
        })
    }
}

/// `env=prod,region=eu-1` → pairs; empty gives none.
fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        let (k, v) = (k.trim(), v.trim());
        let name_ok = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !["service", "host", "level", "job"].contains(&k);
        if !name_ok || v.is_empty() {
            return None;
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Some(out)
}

/// `8MiB`, `512KiB`, `1GiB`, `1048576` → bytes.
pub fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: usize = digits.parse().ok()?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn local_hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|_| "unknown-host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(key: &str, value: ValueKind, line: usize) -> RunnerEntry {
        RunnerEntry {
            key: key.into(),
            value,
            origin: Origin::File {
                path: "jobs.toml".into(),
                line,
                col: 10,
            },
        }
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let s = Settings::load(&[], &Environment::default()).unwrap();
        assert_eq!(s.port, 8085);
        assert_eq!(s.bind.to_string(), "127.0.0.1");
        assert_eq!(s.shutdown_grace, Duration::from_secs(30));
        assert!(s.database.is_none());
        assert_eq!(s.data_dir, PathBuf::from("data"));
    }

    #[test]
    fn environment_beats_runner_table_which_beats_defaults() {
        let table = [
            runner("port", ValueKind::I64(9000), 2),
            runner("shutdown_grace", ValueKind::String("5s".into()), 3),
        ];
        let s = Settings::load(&table, &Environment::default()).unwrap();
        assert_eq!(s.port, 9000);
        assert_eq!(s.shutdown_grace, Duration::from_secs(5));

        let env = Environment::from_pairs([("PORT", "9100")]);
        let s = Settings::load(&table, &env).unwrap();
        assert_eq!(s.port, 9100);
        assert_eq!(s.shutdown_grace, Duration::from_secs(5));
    }

    #[test]
    fn seed_database_variables_compose_a_target() {
        let env = Environment::from_pairs([
            ("DB_HOST", "db"),
            ("DB_USER", "server"),
            ("DB_PASSWORD", "hunter2"),
            ("DB_NAME", "obs"),
        ]);
        let s = Settings::load(&[], &env).unwrap();
        let target = s.database.unwrap();
        assert_eq!(target.to_string(), "postgres://server@db:5432/obs");
        assert!(!format!("{target:?}").contains("hunter2"));
    }

    #[test]
    fn database_url_wins_over_parts_and_is_never_printed_with_its_password() {
        let env = Environment::from_pairs([
            (
                "DATABASE_URL",
                "postgres://app:s3cret@db:5432/app?sslmode=require",
            ),
            ("DB_HOST", "other"),
        ]);
        let s = Settings::load(&[], &env).unwrap();
        let dump = format!("{s:?}");
        assert!(!dump.contains("s3cret"), "{dump}");
        assert_eq!(
            s.database.unwrap().to_string(),
            "postgres://app:***@db:5432/app"
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let env = Environment::from_pairs([
            ("MONGO_URI", "mongodb://u:pw@m/"),
            ("VIGIL_API_TOKEN", "t0k3n"),
        ]);
        let s = Settings::load(&[], &env).unwrap();
        let dump = format!("{s:?}");
        assert!(!dump.contains("pw@") && !dump.contains("t0k3n"), "{dump}");
        assert_eq!(s.api_token.unwrap().expose(), "t0k3n");
    }

    #[test]
    fn loki_labels_and_buffer_sizes_are_parsed_and_checked() {
        let env = Environment::from_pairs([
            ("VIGIL_LOKI_LABELS", "env=prod, region = eu-1"),
            ("VIGIL_LOKI_MAX_BUFFER", "2MiB"),
        ]);
        let s = Settings::load(&[], &env).unwrap();
        assert_eq!(
            s.loki_labels,
            vec![
                ("env".into(), "prod".into()),
                ("region".into(), "eu-1".into())
            ]
        );
        assert_eq!(s.loki_max_buffer, 2 << 20);
        assert_eq!(
            Settings::load(&[], &Environment::default())
                .unwrap()
                .loki_max_buffer,
            8 << 20
        );
        for (var, bad) in [
            ("VIGIL_LOKI_LABELS", "job=x"),
            ("VIGIL_LOKI_LABELS", "1x=y"),
            ("VIGIL_LOKI_LABELS", "novalue"),
            ("VIGIL_LOKI_MAX_BUFFER", "lots"),
            ("VIGIL_LOKI_MAX_BUFFER", "1KiB"),
            ("LOKI_URL", "loki:3100"),
        ] {
            let err = Settings::load(&[], &Environment::from_pairs([(var, bad)]));
            assert!(err.is_err(), "{var}={bad} accepted");
        }
    }

    #[test]
    fn reads_can_be_closed_and_booleans_are_checked() {
        let s = Settings::load(
            &[],
            &Environment::from_pairs([("VIGIL_API_READS_OPEN", "false")]),
        )
        .unwrap();
        assert!(!s.api_reads_open);
        let err = Settings::load(
            &[],
            &Environment::from_pairs([("VIGIL_API_READS_OPEN", "maybe")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expected true or false"), "{err}");
    }

    #[test]
    fn every_bad_value_is_reported_with_its_source() {
        let table = [
            runner("port", ValueKind::String("http".into()), 4),
            runner("colour", ValueKind::String("blue".into()), 5),
        ];
        let env = Environment::from_pairs([
            ("VIGIL_SHUTDOWN_GRACE", "soon"),
            ("VIGIL_DB_MAX_CONNECTIONS", "0"),
            ("VIGIL_SHUTDOWN_GRAEC", "1s"),
        ]);
        let err = Settings::load(&table, &env).unwrap_err().to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 5, "{err}");
        assert!(
            err.contains("jobs.toml:5:10: unknown [runner] setting `colour`"),
            "{err}"
        );
        assert!(
            err.contains("environment variable VIGIL_SHUTDOWN_GRAEC: unknown variable"),
            "{err}"
        );
        assert!(
            err.contains("jobs.toml:4:10: port: invalid value \"http\""),
            "{err}"
        );
        assert!(err.contains("environment variable VIGIL_SHUTDOWN_GRACE: shutdown_grace: invalid duration \"soon\""), "{err}");
        assert!(err.contains("environment variable VIGIL_DB_MAX_CONNECTIONS: db_max_connections: invalid value \"0\""), "{err}");
    }

    #[test]
    fn url_redaction_hides_passwords_in_every_shape() {
        assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db?password=x"), "postgres://h/db");
        assert_eq!(redact_url("garbage"), "***");
        assert_eq!(redact_url("postgres://u:p:q@h"), "postgres://u:***@h");
    }
}
