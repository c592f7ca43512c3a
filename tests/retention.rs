//! The `retention` job against real PostgreSQL.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestDb;
use vigil::config;
use vigil::jobs::{self, RunContext, RunOutcome};

fn retention_spec(batch: u32, older_than: &str) -> vigil::config::JobSpec {
    let text = format!(
        "[[jobs]]\nname = \"prune\"\nkind = \"retention\"\nevery = \"1h\"\n\
         [jobs.settings]\nbatch_size = {batch}\n\
         tables = [{{ table = \"system_metrics\", column = \"ts\", older_than = \"{older_than}\" }}]\n"
    );
    config::parse_jobs(
        Path::new("t.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap()
    .jobs
    .remove(0)
}

fn ctx() -> RunContext {
    RunContext {
        job: "prune".into(),
        trigger: vigil::store::Trigger::Manual,
        run_id: uuid::Uuid::now_v7(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(60),
        input: None,
        output: Default::default(),
        resources: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_only_old_rows_in_batches_and_counts_them() {
    let db = TestDb::new().await;
    // 2,345 samples older than 30 days, 100 recent ones, over three hosts.
    sqlx::query(
        "INSERT INTO system_metrics (ts, host, metrics)
         SELECT now() - interval '31 days' - g * interval '1 second', 'h' || (g % 3), '{}'::jsonb
         FROM generate_series(1, 2345) g",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO system_metrics (ts, host, metrics)
         SELECT now() - g * interval '1 minute', 'h1', '{}'::jsonb FROM generate_series(1, 100) g",
    )
    .execute(db.pool())
    .await
    .unwrap();

    let job = jobs::build(&retention_spec(500, "30d"), &db.deps()).unwrap();
    let outcome = job.run(ctx()).await.unwrap();
    assert_eq!(outcome, RunOutcome::Completed { items: Some(2345) });

    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(left, 100);
    let oldest_left: bool =
        sqlx::query_scalar("SELECT min(ts) > now() - interval '30 days' FROM system_metrics")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(oldest_left);

    // A second run finds nothing to do.
    assert_eq!(
        job.run(ctx()).await.unwrap(),
        RunOutcome::Completed { items: Some(0) }
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_retention_batch_deletes_at_most_batch_size_rows() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO system_metrics (ts, host, metrics)
         SELECT now() - interval '40 days' - g * interval '1 second', 'h', '{}'::jsonb
         FROM generate_series(1, 1000) g",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let table = config::Ident::parse("system_metrics").unwrap();
    let column = config::Ident::parse("ts").unwrap();
    let cutoff = chrono::Utc::now() - chrono::Duration::days(30);
    let n = db
        .store
        .delete_batch_older_than(&table, &column, cutoff, 300)
        .await
        .unwrap();
    assert_eq!(n, 300);
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_on_a_missing_column_fails_with_a_message_naming_it() {
    let db = TestDb::new().await;
    let text = "[[jobs]]\nname = \"prune\"\nkind = \"retention\"\nevery = \"1h\"\n\
                [jobs.settings]\ntables = [{ table = \"system_metrics\", column = \"created\", older_than = \"1d\" }]\n";
    let spec = config::parse_jobs(Path::new("t.toml"), text, &vigil::jobs::Registry::builtin())
        .unwrap()
        .jobs
        .remove(0);
    let job = jobs::build(&spec, &db.deps()).unwrap();
    let err = job.run(ctx()).await.unwrap_err().to_string();
    assert!(
        err.contains("system_metrics") && err.contains("created"),
        "{err}"
    );
}
