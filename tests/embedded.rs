//! With no database configured, `vigil run` brings its own PostgreSQL.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Stdio;
use std::str::FromStr as _;
use std::time::Duration;

use common::{Running, eventually, vigil, write};
use nix::sys::signal::Signal;
use sqlx::Connection as _;
use sqlx::postgres::PgConnectOptions;

fn embedded_options(data: &Path) -> Option<PgConnectOptions> {
    let port: u16 = std::fs::read_to_string(data.join("postgres.port"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let password = std::fs::read_to_string(data.join("postgres.password")).ok()?;
    Some(
        PgConnectOptions::from_str("postgres://vigil@127.0.0.1/vigil")
            .unwrap()
            .port(port)
            .password(password.trim()),
    )
}

async fn succeeded_runs(data: &Path) -> Option<i64> {
    let opts = embedded_options(data)?;
    let mut conn = sqlx::PgConnection::connect_with(&opts).await.ok()?;
    sqlx::query_scalar("SELECT count(*) FROM job_runs WHERE status = 'succeeded'")
        .fetch_one(&mut conn)
        .await
        .ok()
}

fn start(dir: &Path) -> Running {
    Running(
        vigil(
            dir,
            &["run"],
            &[("VIGIL_HOST", "embedded-test"), ("PORT", "0")],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    )
}

fn stop(mut child: Running) -> String {
    child.signal(Signal::SIGTERM);
    let status = child
        .wait_exit(Duration::from_secs(60))
        .expect("vigil exits");
    let mut out = String::new();
    use std::io::Read as _;
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "exit {status:?}\n{out}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn run_without_a_database_starts_an_embedded_one_and_reuses_it_next_time() {
    let dir = tempfile::tempdir().unwrap();
    // The server may run as an unprivileged account that must reach the directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    write(
        dir.path(),
        "jobs.toml",
        r#"
[[jobs]]
name = "tick"
kind = "command"
every = "1s"
[jobs.settings]
command = ["true"]
"#,
    );
    let data = dir.path().join("data");

    let first = start(dir.path());
    let before = eventually(
        Duration::from_secs(60),
        "runs in the embedded database",
        || async { succeeded_runs(&data).await.filter(|n| *n >= 2) },
    )
    .await;
    let log = stop(first);
    assert!(
        log.contains("initialised the embedded PostgreSQL cluster"),
        "{log}"
    );
    assert!(
        log.contains("no database configured: using the embedded PostgreSQL"),
        "{log}"
    );
    assert!(
        log.contains("postgres://vigil@127.0.0.1:"),
        "logs how to connect: {log}"
    );
    assert!(
        !log.contains(
            std::fs::read_to_string(data.join("postgres.password"))
                .unwrap()
                .trim()
        )
    );
    // Stopped with vigil.
    assert!(
        succeeded_runs(&data).await.is_none(),
        "the server still answers"
    );
    let port = std::fs::read_to_string(data.join("postgres.port")).unwrap();

    let second = start(dir.path());
    eventually(
        Duration::from_secs(60),
        "more runs after the restart",
        || async { succeeded_runs(&data).await.filter(|n| *n > before) },
    )
    .await;
    let log = stop(second);
    assert!(
        !log.contains("initialised the embedded PostgreSQL cluster"),
        "data reused: {log}"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("postgres.port")).unwrap(),
        port,
        "port reused"
    );
}
