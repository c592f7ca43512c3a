//! A private PostgreSQL cluster for when no database is configured.
//!
//! Data lives under `<data_dir>/postgres`, the server listens on loopback only, on a
//! free port, and is reused by the next start. PostgreSQL refuses to run as root, so
//! when vigil is root the cluster is owned and run by an unprivileged account.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::postgres::PgConnectOptions;

use crate::config::Secret;

/// The superuser of the private cluster (it owns nothing else).
const SUPERUSER: &str = "vigil";
/// The database vigil uses inside it.
pub const DATABASE: &str = "vigil";

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no database is configured and no PostgreSQL server binaries were found \
         (looked in {looked}). Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`), \
         set VIGIL_PG_BIN_DIR to the directory holding initdb and pg_ctl, or point vigil at a \
         server with DATABASE_URL (or DB_HOST, DB_PORT, DB_USER, DB_PASSWORD, DB_NAME)"
    )]
    NoBinaries { looked: String },
    #[error(
        "vigil runs as root and PostgreSQL refuses to; no unprivileged account \
         (`postgres` or `nobody`) exists to run the embedded server. Create one, run vigil as \
         a normal user, or set DATABASE_URL"
    )]
    NoUnprivilegedUser,
    #[error("{what} ({path}): {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {detail}")]
    Command {
        program: String,
        status: String,
        detail: String,
    },
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> EmbeddedError {
    let what = what.to_owned();
    let path = path.to_path_buf();
    move |source| EmbeddedError::Io { what, path, source }
}

/// The account the server processes run as when vigil is root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
}

/// A running (or reused) embedded cluster.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    pgdata: PathBuf,
    log_file: PathBuf,
    port: u16,
    password: Secret,
    run_as: Option<RunAs>,
    /// Stop it at shutdown only if this process started it.
    started_here: bool,
}

impl EmbeddedPostgres {
    /// Finds `initdb` and `pg_ctl`: `override_dir` if given (and nothing else), else
    /// Debian's versioned directories (newest first), `pg_config --bindir`, the
    /// directories of `search_path` (`$PATH`, as configuration read it).
    pub fn locate_binaries(
        override_dir: Option<&Path>,
        search_path: Option<&OsStr>,
    ) -> Result<PathBuf, EmbeddedError> {
        locate_in(
            override_dir,
            Path::new("/usr/lib/postgresql"),
            OsStr::new("pg_config"),
            search_path,
        )
    }

    /// Initialises the cluster on first use, then starts it (or adopts it if running).
    /// Binaries are looked for where [`EmbeddedPostgres::locate_binaries`] says, without
    /// `$PATH`; see [`EmbeddedPostgres::start_searching`].
    pub fn start(data_dir: &Path, bin_override: Option<&Path>) -> Result<Self, EmbeddedError> {
        Self::start_searching(data_dir, bin_override, None)
    }

    /// The embedded server if it is already running (a `vigil run` started it), for
    /// commands that read but should not start a database (`vigil jobs`).
    pub fn adopt_running(
        data_dir: &Path,
        bin_override: Option<&Path>,
        search_path: Option<&OsStr>,
    ) -> Result<Option<Self>, EmbeddedError> {
        let pgdata = data_dir.join("postgres");
        if !pgdata.join("PG_VERSION").is_file() || !pgdata.join("postmaster.pid").is_file() {
            return Ok(None);
        }
        let me = Self::start_searching(data_dir, bin_override, search_path)?;
        if me.started_here {
            // Raced with a stop: leave things as they were.
            me.stop()?;
            return Ok(None);
        }
        Ok(Some(me))
    }

    /// Like [`EmbeddedPostgres::start`], also searching `search_path` for the binaries.
    pub fn start_searching(
        data_dir: &Path,
        bin_override: Option<&Path>,
        search_path: Option<&OsStr>,
    ) -> Result<Self, EmbeddedError> {
        let bin_dir = Self::locate_binaries(bin_override, search_path)?;
        let run_as = unprivileged_account()?;
        std::fs::create_dir_all(data_dir)
            .map_err(io("cannot create the data directory", data_dir))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(io("cannot resolve the data directory", data_dir))?;
        let pgdata = data_dir.join("postgres");
        let password_file = data_dir.join("postgres.password");
        let port_file = data_dir.join("postgres.port");
        let log_file = data_dir.join("postgres.log");

        let password = if pgdata.join("PG_VERSION").is_file() {
            let p = std::fs::read_to_string(&password_file).map_err(io(
                "cannot read the embedded PostgreSQL password",
                &password_file,
            ))?;
            Secret::new(p.trim().to_owned())
        } else {
            let password = Secret::new(random_password());
            init_cluster(
                &bin_dir,
                &pgdata,
                &password_file,
                &password,
                run_as.as_ref(),
            )?;
            password
        };

        let mut me = Self {
            bin_dir,
            pgdata,
            log_file,
            port: 0,
            password,
            run_as,
            started_here: false,
        };

        if let Some(port) = me.running_port() {
            tracing::info!(
                port,
                "reusing the embedded PostgreSQL that is already running"
            );
            me.port = port;
            return Ok(me);
        }

        let remembered = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok());
        let port = match remembered {
            Some(p) if port_is_free(p) => p,
            _ => free_port().map_err(io("cannot find a free loopback port", &me.pgdata))?,
        };
        std::fs::write(&port_file, port.to_string())
            .map_err(io("cannot record the embedded PostgreSQL port", &port_file))?;
        me.port = port;
        me.pg_ctl_start()?;
        me.started_here = true;
        Ok(me)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Options for connecting to `database` in this cluster.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username(SUPERUSER)
            .password(self.password.expose())
            .database(database)
    }

    /// How a person connects, without printing the password.
    pub fn describe(&self) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{DATABASE} (password in {})",
            self.port,
            self.pgdata.with_file_name("postgres.password").display()
        )
    }

    /// Stops the server if this process started it.
    pub fn stop(&self) -> Result<(), EmbeddedError> {
        if !self.started_here {
            return Ok(());
        }
        let out = self.pg_ctl(["stop", "-m", "fast", "-w", "-t", "60"])?;
        check(&self.bin_dir.join("pg_ctl"), &out)
    }

    fn pg_ctl<I, S>(&self, args: I) -> Result<Output, EmbeddedError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = self.bin_dir.join("pg_ctl");
        let mut cmd = Command::new(&program);
        cmd.arg("-D").arg(&self.pgdata).args(args);
        run_as(&mut cmd, self.run_as.as_ref());
        cmd.output().map_err(io("cannot run pg_ctl", &program))
    }

    /// The port of a server already running on this data directory, if any.
    fn running_port(&self) -> Option<u16> {
        let out = self.pg_ctl(["status"]).ok()?;
        if !out.status.success() {
            return None;
        }
        // postmaster.pid: line 4 is the port.
        let pid = std::fs::read_to_string(self.pgdata.join("postmaster.pid")).ok()?;
        pid.lines().nth(3)?.trim().parse().ok()
    }

    fn pg_ctl_start(&self) -> Result<(), EmbeddedError> {
        // The log must be writable by the server's account.
        if !self.log_file.exists() {
            std::fs::write(&self.log_file, b"")
                .map_err(io("cannot create the PostgreSQL log", &self.log_file))?;
        }
        chown(&self.log_file, self.run_as.as_ref())?;
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''",
            self.port
        );
        let out = self.pg_ctl([
            OsStr::new("start"),
            OsStr::new("-w"),
            OsStr::new("-t"),
            OsStr::new("60"),
            OsStr::new("-l"),
            self.log_file.as_os_str(),
            OsStr::new("-o"),
            OsStr::new(&options),
        ])?;
        check(&self.bin_dir.join("pg_ctl"), &out).map_err(|e| match e {
            EmbeddedError::Command {
                program,
                status,
                detail,
            } => EmbeddedError::Command {
                program,
                status,
                detail: format!("{detail} (see {})", self.log_file.display()),
            },
            other => other,
        })
    }
}

fn has_tools(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()
}

fn locate_in(
    override_dir: Option<&Path>,
    versioned_root: &Path,
    pg_config: &OsStr,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, EmbeddedError> {
    if let Some(dir) = override_dir {
        // An explicit setting that is wrong must not be papered over by a search.
        return if has_tools(dir) {
            Ok(dir.to_path_buf())
        } else {
            Err(EmbeddedError::NoBinaries {
                looked: format!("VIGIL_PG_BIN_DIR={}", dir.display()),
            })
        };
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir(versioned_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
    if let Some((_, dir)) = versioned.into_iter().find(|(_, d)| has_tools(d)) {
        return Ok(dir);
    }
    if let Ok(out) = Command::new(pg_config).arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_tools(&dir) {
            return Ok(dir);
        }
    }
    if let Some(paths) = path_var {
        for dir in std::env::split_paths(paths) {
            if has_tools(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(EmbeddedError::NoBinaries {
        looked: format!(
            "{}/*/bin, `pg_config --bindir`, $PATH",
            versioned_root.display()
        ),
    })
}

/// Writes `bytes` to a new file readable by its owner only from its first byte (no
/// moment where another user could open it), replacing any file there.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn init_cluster(
    bin_dir: &Path,
    pgdata: &Path,
    password_file: &Path,
    password: &Secret,
    account: Option<&RunAs>,
) -> Result<(), EmbeddedError> {
    std::fs::create_dir_all(pgdata).map_err(io("cannot create the cluster directory", pgdata))?;
    std::fs::set_permissions(pgdata, std::fs::Permissions::from_mode(0o700))
        .map_err(io("cannot restrict the cluster directory", pgdata))?;
    chown(pgdata, account)?;
    write_private(password_file, password.expose().as_bytes()).map_err(io(
        "cannot write the embedded PostgreSQL password",
        password_file,
    ))?;
    chown(password_file, account)?;

    let program = bin_dir.join("initdb");
    let mut cmd = Command::new(&program);
    cmd.arg("-D")
        .arg(pgdata)
        .args([
            "-U",
            SUPERUSER,
            "--auth-host=scram-sha-256",
            "--auth-local=peer",
        ])
        .args(["--encoding=UTF8", "--no-locale", "--no-instructions"])
        .arg(format!("--pwfile={}", password_file.display()));
    run_as(&mut cmd, account);
    let out = cmd.output().map_err(io("cannot run initdb", &program))?;
    check(&program, &out)?;
    tracing::info!(pgdata = %pgdata.display(), "initialised the embedded PostgreSQL cluster");
    Ok(())
}

fn check(program: &Path, out: &Output) -> Result<(), EmbeddedError> {
    if out.status.success() {
        return Ok(());
    }
    let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if detail.is_empty() {
        detail = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    Err(EmbeddedError::Command {
        program: program.display().to_string(),
        status: out.status.to_string(),
        detail,
    })
}

fn run_as(cmd: &mut Command, account: Option<&RunAs>) {
    if let Some(a) = account {
        cmd.uid(a.uid.as_raw()).gid(a.gid.as_raw());
        cmd.env("USER", &a.name).env("LOGNAME", &a.name);
    }
    // Messages in English whatever the host's locale, so errors read the same everywhere.
    cmd.env("LC_ALL", "C");
}

fn chown(path: &Path, account: Option<&RunAs>) -> Result<(), EmbeddedError> {
    if let Some(a) = account {
        std::os::unix::fs::chown(path, Some(a.uid.as_raw()), Some(a.gid.as_raw()))
            .map_err(io("cannot hand the file to the PostgreSQL account", path))?;
    }
    Ok(())
}

/// `None` when vigil is not root (the server then runs as vigil's own user).
fn unprivileged_account() -> Result<Option<RunAs>, EmbeddedError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Ok(Some(user)) = nix::unistd::User::from_name(name) {
            return Ok(Some(RunAs {
                name: name.to_owned(),
                uid: user.uid,
                gid: user.gid,
            }));
        }
    }
    Err(EmbeddedError::NoUnprivilegedUser)
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// 32 random alphanumerics from the OS's generator (via UUIDv4's randomness).
fn random_password() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{}{}", &a[..16], &b[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_file_is_owner_only_from_its_creation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        std::fs::write(&p, "old, world-readable").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Created anew with the owner-only mode: an old file's mode is not inherited.
        write_private(&p, b"pw").unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"pw");
    }

    #[test]
    fn missing_server_binaries_name_what_to_install_and_what_to_set() {
        let empty = tempfile::tempdir().unwrap();
        let no_pg_config = empty.path().join("pg_config");
        let err = locate_in(
            None,
            empty.path(),
            no_pg_config.as_os_str(),
            Some(OsStr::new("")),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("DATABASE_URL"), "{msg}");
        assert!(msg.contains("VIGIL_PG_BIN_DIR"), "{msg}");
    }

    #[test]
    fn a_wrong_explicit_binary_directory_is_an_error_not_a_fallback() {
        let empty = tempfile::tempdir().unwrap();
        let err = locate_in(
            Some(empty.path()),
            Path::new("/usr/lib/postgresql"),
            OsStr::new("pg_config"),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("VIGIL_PG_BIN_DIR="), "{err}");
    }

    #[test]
    fn the_newest_versioned_directory_wins() {
        let root = tempfile::tempdir().unwrap();
        for v in ["13", "16", "9"] {
            let bin = root.path().join(v).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("initdb"), "").unwrap();
            std::fs::write(bin.join("pg_ctl"), "").unwrap();
        }
        let found = locate_in(None, root.path(), OsStr::new("pg_config"), None).unwrap();
        assert_eq!(found, root.path().join("16").join("bin"));
    }
}
