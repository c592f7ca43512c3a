//! The compose stack's pieces that can run without Docker: the postgres init script,
//! the logical backup round trip, and the Makefile.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr as _;
use std::time::Duration;

use common::{MongoServer, TestDb};
use sqlx::Connection as _;
use sqlx::postgres::PgConnectOptions;
use vigil::config;
use vigil::jobs::{self, Deps, RunContext, RunOutcome};
use vigil::store::embedded::EmbeddedPostgres;
use vigil::store::{Store, Target};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ctx(job: &str) -> RunContext {
    RunContext {
        job: job.into(),
        trigger: vigil::store::Trigger::Manual,
        run_id: uuid::Uuid::now_v7(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(120),
        input: None,
        output: Default::default(),
        resources: Default::default(),
    }
}

fn psql_env(cmd: &mut Command, opts: &PgConnectOptions, password: Option<&str>) {
    cmd.env("PGHOST", opts.get_host())
        .env("PGPORT", opts.get_port().to_string())
        .env("PGUSER", opts.get_username());
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_init_script_creates_a_least_privilege_role_that_runs_every_job_kind() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("pg");
    let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&data, None).unwrap())
        .await
        .unwrap();
    let admin = pg.connect_options("postgres");
    let password = std::fs::read_to_string(dir.path().join("pg/postgres.password")).unwrap();

    // As the image's entrypoint would: the superuser runs the script. Twice: idempotent.
    // With sh (the entrypoint executes an executable script) and bash (it sources one
    // that lost its executable bit).
    for shell in ["sh", "bash"] {
        let mut cmd = Command::new(shell);
        cmd.arg(repo().join("docker/postgres/01-vigil-role.sh"))
            .env("DB_USER", "server")
            .env("DB_PASSWORD", "app-secret")
            .env("DB_NAME", "vigil")
            .env("POSTGRES_DB", "postgres");
        psql_env(&mut cmd, &admin, Some(password.trim()));
        let out = cmd.output().expect("run the init script");
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let mut conn = sqlx::PgConnection::connect_with(&admin).await.unwrap();
    let (superuser, createdb, createrole, owner): (bool, bool, bool, String) = sqlx::query_as(
        "SELECT r.rolsuper, r.rolcreatedb, r.rolcreaterole, pg_get_userbyid(d.datdba)
         FROM pg_roles r, pg_database d WHERE r.rolname = 'server' AND d.datname = 'vigil'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((superuser, createdb, createrole), (false, false, false));
    assert_eq!(owner, "server");

    // vigil as `server`: migrations, then every job kind, without superuser.
    let app = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(pg.port())
        .username("server")
        .password("app-secret")
        .database("vigil");
    let store = Store::connect(
        &Target {
            options: app.clone(),
            display: "server@vigil".into(),
        },
        5,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let refused = sqlx::query("CREATE ROLE intruder")
        .execute(store.pool())
        .await;
    assert!(
        refused.is_err(),
        "the application role must not create roles"
    );

    let mongo = MongoServer::start().await;
    mongo
        .client()
        .await
        .database("obs")
        .collection::<mongodb::bson::Document>("readings")
        .insert_many((0..20).map(|i| mongodb::bson::doc! { "status": "ingested", "n": i }))
        .await
        .unwrap();
    let text = format!(
        r#"
[[jobs]]
name = "host-metrics"
kind = "system_metrics"
every = "10s"

[[jobs]]
name = "reading-sync"
kind = "mongo_sync"
every = "1m"
[jobs.settings]
uri = "{uri}"
database = "obs"
collection = "readings"

[[jobs]]
name = "prune"
kind = "retention"
every = "1h"
[jobs.settings]
tables = [
  {{ table = "system_metrics", column = "ts", older_than = "30d" }},
  {{ table = "job_runs", column = "started_at", older_than = "90d" }},
  {{ table = "sync_rejects", column = "at", older_than = "90d" }},
]

[[jobs]]
name = "echo"
kind = "command"
every = "1h"
[jobs.settings]
command = ["true"]
"#,
        uri = mongo.uri
    );
    let specs = config::parse_jobs(
        Path::new("stack.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap()
    .jobs;
    let deps = Deps {
        store: store.clone(),
        host: "stack".into(),
        metrics: Default::default(),
        mongo_uri: None,
        env: vigil::config::Environment::capture().unwrap(),
        host_root: None,
        spool: None,
        run_cgroups: true,
    };
    let kinds: std::collections::BTreeSet<String> =
        specs.iter().map(|s| s.kind.to_string()).collect();
    assert_eq!(
        kinds.len(),
        vigil::config::Kinds::names(&vigil::jobs::Registry::builtin()).len(),
        "every kind is exercised"
    );
    for spec in &specs {
        let job = jobs::build(spec, &deps).unwrap();
        let outcome = job.run(ctx(&spec.name)).await;
        assert!(
            matches!(outcome, Ok(RunOutcome::Completed { .. })),
            "{} as `server`: {outcome:?}",
            spec.name
        );
        job.shutdown().await;
    }
    let (samples, readings): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM system_metrics), (SELECT count(*) FROM reading_analytics)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((samples, readings), (1, 20));
    store.close().await;
    conn.close().await.unwrap();
    tokio::task::spawn_blocking(move || pg.stop().unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_logical_backup_restores_what_was_there() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO reading_analytics (source_id, payload) SELECT 'r-' || g, jsonb_build_object('g', g)
         FROM generate_series(1, 500) g",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let checksum = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT md5(string_agg(source_id || payload::text, ',' ORDER BY source_id)) FROM reading_analytics",
        )
        .fetch_one(db.pool())
        .await
        .unwrap()
    };
    let before = checksum().await;
    let opts = PgConnectOptions::from_str(&db.url).unwrap();
    let dump = tempfile::NamedTempFile::new().unwrap();

    let mut cmd = Command::new(repo().join("scripts/pg-backup.sh"));
    cmd.arg("dump")
        .env("PGDATABASE", &db.name)
        .stdout(dump.reopen().unwrap());
    psql_env(&mut cmd, &opts, None);
    let status = cmd.status().unwrap();
    assert!(status.success());
    assert!(dump.as_file().metadata().unwrap().len() > 1000);

    // Damage: rows gone, a table dropped.
    sqlx::query("DELETE FROM reading_analytics WHERE source_id LIKE 'r-1%'")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("DROP TABLE sync_rejects")
        .execute(db.pool())
        .await
        .unwrap();
    assert_ne!(checksum().await, before);

    let mut cmd = Command::new(repo().join("scripts/pg-backup.sh"));
    cmd.arg("restore")
        .env("PGDATABASE", &db.name)
        .stdin(dump.reopen().unwrap());
    psql_env(&mut cmd, &opts, None);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(checksum().await, before);
    let rejects: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_rejects")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rejects, 0, "the dropped table is back");
    // vigil still recognises its schema (migrations recorded).
    db.store.migrate().await.unwrap();
}

#[test]
fn every_make_target_prints_its_commands() {
    let targets = [
        ("help", None),
        (
            "up",
            Some("--env-file .env -p vigil -f docker/docker-compose.yml"),
        ),
        ("demo", Some("MONGO_URI=mongodb://mongo:27017")),
        (
            "demo-readings COUNT=7",
            Some("--profile demo run --rm demo-readings demo-readings --count 7"),
        ),
        ("up SEED_VOLUMES=1", Some("-f docker/seed-volumes.yml")),
        ("backup-mongo_data", Some("vigil_mongo_data:/volume:ro")),
        (
            "backup-postgres_data SEED_VOLUMES=1",
            Some("-v postgres_data:/volume:ro"),
        ),
        ("down", Some(" down")),
        ("restart", Some(" restart")),
        ("rebuild", Some("build --pull vigil")),
        ("logs", Some("logs -f")),
        ("ps", Some(" ps")),
        ("volumes", Some("docker volume create")),
        ("backup", Some("postgres_data-")),
        (
            "backup-postgres_data",
            Some("tar -czf /backups/postgres_data-"),
        ),
        (
            "backup-grafana_data",
            Some("tar -czf /backups/grafana_data-"),
        ),
        ("backup-loki_data", Some("tar -czf /backups/loki_data-")),
        (
            "restore-postgres_data FILE=backups/postgres_data-x.tar.gz",
            Some("tar -xzf /backups/postgres_data-x.tar.gz"),
        ),
        (
            "restore-grafana_data FILE=backups/grafana_data-x.tar.gz",
            Some("grafana_data:/volume"),
        ),
        (
            "restore-loki_data FILE=backups/loki_data-x.tar.gz",
            Some("loki_data:/volume"),
        ),
        (
            "pg-dump",
            Some("scripts/pg-backup.sh dump > backups/vigil-"),
        ),
        (
            "pg-restore FILE=backups/vigil-x.dump",
            Some("scripts/pg-backup.sh restore < backups/vigil-x.dump"),
        ),
        ("test", Some("./scripts/test")),
        ("stack-test", Some("./scripts/stack-test")),
        ("check", Some("-- check")),
        ("fmt", Some("cargo fmt")),
        ("lint", Some("cargo clippy --all-targets -- -D warnings")),
    ];
    for (target, expect) in targets {
        let out = Command::new("make")
            .arg("-n")
            .args(target.split(' '))
            .current_dir(repo())
            .output()
            .expect("make");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "make -n {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !stdout.trim().is_empty(),
            "make -n {target} printed nothing"
        );
        if let Some(e) = expect {
            assert!(stdout.contains(e), "make -n {target}:\n{stdout}");
        }
    }
}
