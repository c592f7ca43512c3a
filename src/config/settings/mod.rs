//! Runner settings, layered with the `config` crate: built-in defaults < the
//! `[runner]` table of jobs.toml < the environment (and `.env`).
//!
//! Split by concern: [`keys`] is the table of every key and its default, [`env`] reads
//! the environment, [`secret`] keeps passwords out of sight, [`read`] turns one key's
//! text into a value or a located problem. Every key is read on its own, so all bad
//! values are reported together, each naming the variable or file position it came
//! from.

mod env;
mod keys;
mod read;
mod secret;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use config::Config as Layers;

pub use env::Environment;
pub use keys::*;
pub use read::parse_bytes;
use read::{EnvSource, Reader, RunnerSource, parse_labels};
pub use secret::{DatabaseTarget, Secret, redact, redact_url, register_secret};

use super::diagnostic::{Diagnostic, Diagnostics, Origin};
use super::file::RunnerEntry;

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
    /// Pool size as set; `None`: [`Settings::pool_size`] decides.
    pub db_max_connections: Option<u32>,
    /// Async worker threads as set; `None`: [`Settings::worker_threads`] decides.
    pub worker_threads_set: Option<usize>,
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
    /// Where the host's root file system is mounted, for host metrics sampled from
    /// inside a container (as node_exporter's `--path.rootfs`).
    pub host_root: Option<PathBuf>,
    /// Whether each `command` run gets a cgroup of its own (where vigil may make one)
    /// to measure what it used; else its process tree is accounted.
    pub run_cgroups: bool,
    /// `$PATH`, where the embedded PostgreSQL's binaries are looked for last.
    pub search_path: Option<String>,
    /// With a token, every request that starts work needs `Authorization: Bearer <token>`.
    pub api_token: Option<Secret>,
    /// Whether reads (job lists, run history, readings, the API description) need no
    /// token.
    pub api_reads_open: bool,
    /// Whether `/metrics` needs no token.
    pub metrics_public: bool,
    /// Bind beyond loopback without a token anyway (logged as a warning at each start).
    pub allow_no_token: bool,
    /// Origins (`https://grafana.example`) whose pages may send state-changing requests,
    /// beside the gateway's own.
    pub allowed_origins: Vec<String>,
    /// Requests that may wait for a run's end at once.
    pub max_waiting: u32,
    /// Open connections to the gateway.
    pub max_connections: u32,
    /// The job `/api/sync/reading` runs.
    pub reading_sync_job: String,
    /// Extra static Loki labels, beside `service`, `host`, `level` and `job`.
    pub loki_labels: Vec<(String, String)>,
    /// Most bytes of log events held for Loki.
    pub loki_max_buffer: usize,
    /// Whether `vigil run` reloads the jobs file when it changes on disk.
    pub watch_config: bool,
    /// Largest accepted run input, in bytes.
    pub max_input_bytes: usize,
    /// Hosts (`host` or `host:port`, `*` wildcards) a `Callback-Url` may name; none:
    /// no callbacks.
    pub callback_allow: Vec<String>,
    /// Signs callback bodies (`X-Vigil-Signature`) when set.
    pub callback_secret: Option<Secret>,
}

impl Settings {
    /// The main pool's size: as set, else [`DEFAULT_DB_MAX_CONNECTIONS`], or
    /// [`DEFAULT_HOST_ONLY_CONNECTIONS`] when every job is host-scoped (a fleet of hosts
    /// sampling into one PostgreSQL: each holds one or two connections, not ten).
    pub fn pool_size(&self, host_only: bool) -> u32 {
        self.db_max_connections.unwrap_or(if host_only {
            DEFAULT_HOST_ONLY_CONNECTIONS
        } else {
            DEFAULT_DB_MAX_CONNECTIONS
        })
    }

    /// The async runtime's worker threads: as set, else one when every job is
    /// host-scoped (a sample and a few writes a second: a second worker only adds
    /// wake-ups between threads, about a fifth of a one-second host job's CPU), else
    /// `None`: one per core.
    pub fn worker_threads(&self, host_only: bool) -> Option<usize> {
        self.worker_threads_set.or(host_only.then_some(1))
    }

    /// Layers defaults, `[runner]` and `env`, and validates every key.
    pub fn load(runner: &[RunnerEntry], env: &Environment) -> Result<Self, Diagnostics> {
        let mut diags = Vec::new();

        // Where each key's winning value came from, for messages.
        let mut origins: HashMap<&'static str, Origin> = HashMap::new();
        let mut runner_entries = Vec::new();
        for entry in runner {
            match KEYS
                .iter()
                .find(|k| k.name == entry.key && k.place == In::RunnerAndEnv)
            {
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
                            .filter(|k| k.place == In::RunnerAndEnv)
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
        for (name, origin) in env.iter() {
            if name.starts_with("VIGIL_")
                && !KEYS.iter().any(|k| k.var == name)
                && !OTHER_VIGIL_VARS.contains(&name)
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
            .add_source(RunnerSource(runner_entries))
            .add_source(EnvSource(env_entries))
            .build();
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
        let settings = Settings {
            database: r.database(),
            // 0 asks the OS for a free port (the log line "gateway listening" names it).
            port: r.parsed("port", DEFAULT_PORT, "a port number from 0 to 65535", |s| {
                s.parse().ok()
            }),
            bind: r.parsed(
                "bind",
                DEFAULT_BIND,
                "an IP address such as 127.0.0.1 or 0.0.0.0",
                |s| s.parse::<IpAddr>().ok(),
            ),
            mongo_uri: read::mongo_uri(&mut r),
            loki_url: loki_url(&mut r),
            host: r.string("host").unwrap_or_else(local_hostname),
            shutdown_grace: r.duration("shutdown_grace", DEFAULT_SHUTDOWN_GRACE),
            data_dir: r
                .string("data_dir")
                .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from),
            db_max_connections: r.maybe(
                "db_max_connections",
                "a whole number from 1 to 1000",
                |s| s.parse::<u32>().ok().filter(|n| (1..=1000).contains(n)),
            ),
            worker_threads_set: r.maybe(
                "worker_threads",
                "a whole number from 1 to 256",
                |s| s.parse::<usize>().ok().filter(|n| (1..=256).contains(n)),
            ),
            db_connect_timeout: r.duration("db_connect_timeout", DEFAULT_DB_CONNECT_TIMEOUT),
            db_acquire_timeout: r.duration("db_acquire_timeout", DEFAULT_DB_ACQUIRE_TIMEOUT),
            db_statement_timeout: r
                .duration_or_off("db_statement_timeout", DEFAULT_DB_STATEMENT_TIMEOUT),
            db_keepalive: r.duration_or_off("db_keepalive", DEFAULT_DB_KEEPALIVE),
            db_lock_connections: r.count("db_lock_connections", DEFAULT_DB_LOCK_CONNECTIONS, 1..=1000),
            spool_max_bytes: r.bytes(
                "spool_max_bytes",
                DEFAULT_SPOOL_MAX_BYTES as usize,
                "a size such as 256MiB or 1GiB, at least 1MiB",
                1 << 20,
            ) as u64,
            pg_bin_dir: r.string("pg_bin_dir").map(PathBuf::from),
            search_path: env.get("PATH").map(str::to_owned),
            host_root: read::host_root(&mut r),
            run_cgroups: r.flag("run_cgroups", DEFAULT_RUN_CGROUPS),
            api_token: r.string("api_token").map(Secret::new),
            api_reads_open: r.flag("api_reads_open", DEFAULT_API_READS_OPEN),
            metrics_public: r.flag("metrics_public", DEFAULT_METRICS_PUBLIC),
            allow_no_token: r.flag("allow_no_token", false),
            allowed_origins: r.parsed(
                "allowed_origins",
                Vec::new(),
                "comma-separated origins such as https://grafana.example (scheme, host, optional port; no path)",
                read::parse_origins,
            ),
            max_waiting: r.count("max_waiting", DEFAULT_MAX_WAITING, 1..=10_000),
            max_connections: r.count("max_connections", DEFAULT_MAX_CONNECTIONS, 1..=100_000),
            reading_sync_job: r
                .string("reading_sync_job")
                .unwrap_or_else(|| DEFAULT_READING_SYNC_JOB.to_owned()),
            loki_labels: r.parsed(
                "loki_labels",
                Vec::new(),
                "comma-separated name=value pairs (names: letters, digits, '_'; not service, host, level or job)",
                parse_labels,
            ),
            loki_max_buffer: r.bytes(
                "loki_max_buffer",
                DEFAULT_LOKI_MAX_BUFFER,
                "a size such as 8MiB, 512KiB or 1048576 (bytes), at least 64KiB",
                64 << 10,
            ),
            watch_config: r.flag("watch_config", DEFAULT_WATCH_CONFIG),
            max_input_bytes: r.bytes(
                "max_input_bytes",
                DEFAULT_MAX_INPUT_BYTES,
                "a size such as 256KiB or 1MiB, at least 1KiB",
                1 << 10,
            ),
            callback_allow: r.parsed(
                "callback_allow",
                Vec::new(),
                "comma-separated host patterns such as hooks.example.com, *.internal or 10.0.0.5:8080",
                read::parse_host_patterns,
            ),
            callback_secret: r.string("callback_secret").map(Secret::new),
        };
        // A gateway reachable from other machines is closed unless someone chose
        // otherwise, twice: by a token, or by saying so.
        if !settings.bind.is_loopback() && settings.api_token.is_none() && !settings.allow_no_token
        {
            let origin = origins.get("bind").cloned().unwrap_or(Origin::Unknown);
            diags.push(Diagnostic {
                origin,
                job: None,
                message: format!(
                    "bind: {} lets other machines reach the API, and no VIGIL_API_TOKEN is set: \
                     set one (for example `VIGIL_API_TOKEN=$(openssl rand -hex 32)`), or bind \
                     127.0.0.1, or set VIGIL_ALLOW_NO_TOKEN=true to accept an open API",
                    settings.bind
                ),
            });
        }
        if diags.is_empty() {
            Ok(settings)
        } else {
            Err(Diagnostics(diags))
        }
    }
}

fn loki_url(r: &mut Reader<'_>) -> Option<String> {
    let url = r.string("loki_url")?;
    // Basic-auth credentials in it are a secret like any other.
    register_secret(&url);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        r.problem(
            "loki_url",
            "loki_url: expected an http:// or https:// URL".into(),
        );
        return None;
    }
    if url::Url::parse(&url).is_err() || !read::userinfo_intact(&url) {
        r.problem("loki_url", format!("loki_url: {}", read::NOT_A_URL));
        return None;
    }
    Some(url)
}

fn local_hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .unwrap_or_else(|_| "unknown-host".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::ValueKind;

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
    fn a_host_root_without_the_hosts_proc_is_refused_naming_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap().to_owned();
        let env = Environment::from_pairs([("VIGIL_HOST_ROOT", root.as_str())]);
        let err = Settings::load(&[], &env).unwrap_err().to_string();
        assert!(err.contains("VIGIL_HOST_ROOT"), "{err}");
        assert!(err.contains("holds no proc/1"), "{err}");

        std::fs::create_dir_all(dir.path().join("proc/1")).unwrap();
        let s = Settings::load(&[], &env).unwrap();
        assert_eq!(s.host_root.as_deref(), Some(dir.path()));
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
    fn a_host_only_replica_runs_one_worker_unless_told_otherwise() {
        let defaults =
            Settings::load(&[], &Environment::from_pairs(Vec::<(&str, &str)>::new())).unwrap();
        assert_eq!(defaults.worker_threads(true), Some(1));
        assert_eq!(defaults.worker_threads(false), None, "one per core");
        let set = Settings::load(
            &[],
            &Environment::from_pairs([("VIGIL_WORKER_THREADS", "3")]),
        )
        .unwrap();
        assert_eq!(set.worker_threads(true), Some(3));
        assert_eq!(set.worker_threads(false), Some(3));
        let err = Settings::load(
            &[],
            &Environment::from_pairs([("VIGIL_WORKER_THREADS", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "environment variable VIGIL_WORKER_THREADS: worker_threads: invalid value \"0\""
            ),
            "{err}"
        );
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
