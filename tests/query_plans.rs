//! The API reads what it shows: at 100,000 ledger rows, every query behind
//! `/api/jobs`, `/api/jobs/{name}` and their run pages is an index lookup that reads a
//! handful of pages, planned as vigil's sessions plan them (each statement for its own
//! parameters: `plan_cache_mode = force_custom_plan`), for a busy job and for a rare
//! one whose runs are the oldest. Real PostgreSQL, the real SQL text of `store`.

mod common;

use common::TestDb;
use serde_json::Value;
use sqlx::Connection as _;
use vigil::store::RunStatus;
use vigil::store::runs::{RunQuery, last_runs_sql, runs_sql};

/// 100,000 runs over 20 jobs across 90 days (one job runs rarely: its 50 runs are the
/// oldest), plus a history of 5,000 resolved incidents and 3 open ones.
async fn seeded() -> TestDb {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO job_runs (id, job, kind, trigger, attempt, scheduled_at, started_at,
                               finished_at, status, host, permanent)
         SELECT gen_random_uuid(),
                CASE WHEN g > 99950 THEN 'rare' ELSE 'job-' || (g % 19) END,
                'command', 'schedule', 1, t, t, t + interval '1 second',
                CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 'h', false
         FROM generate_series(1, 100000) g,
              LATERAL (SELECT now() - (g * interval '77 seconds') AS t) x",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO alert_incidents (id, job, scope_key, kind, opened_at, opened_by, summary,
                                      details, notify, resolved_at)
         SELECT gen_random_uuid(), 'job-' || (g % 19), '', 'failed', now() - g * interval '1 minute',
                'h', 's', '{}', '{}', CASE WHEN g > 3 THEN now() END
         FROM generate_series(1, 5000) g",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(db.pool()).await.unwrap();
    db
}

/// Every node of a JSON plan, depth first.
fn nodes(plan: &Value, out: &mut Vec<Value>) {
    out.push(plan.clone());
    if let Some(children) = plan["Plans"].as_array() {
        for c in children {
            nodes(c, out);
        }
    }
}

/// The executed plan of `sql` with `args` (SQL literals), planned as vigil's sessions
/// plan statements.
async fn plan(db: &TestDb, sql: &str, types: &str, args: &str) -> Value {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let (types, args) = if types.is_empty() {
        (String::new(), String::new())
    } else {
        (format!("({types})"), format!("({args})"))
    };
    sqlx::raw_sql(&format!(
        "SET plan_cache_mode = force_custom_plan; PREPARE q{types} AS {sql}"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let v: Value = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE q{args}"
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    v[0]["Plan"].clone()
}

/// No sequential scan of `tables`, at least one index, and few pages read: a walk of
/// the whole time index (about 300 pages here) fails it as a scan would.
fn assert_reads_little(plan: &Value, tables: &[&str], what: &str) {
    let mut all = Vec::new();
    nodes(plan, &mut all);
    for n in &all {
        let scanned = n["Relation Name"].as_str().unwrap_or("");
        assert!(
            !(n["Node Type"] == "Seq Scan" && tables.contains(&scanned)),
            "{what} scans {scanned}:\n{}",
            serde_json::to_string_pretty(plan).unwrap()
        );
    }
    let used: Vec<&str> = all
        .iter()
        .filter_map(|n| n["Index Name"].as_str())
        .collect();
    assert!(!used.is_empty(), "{what} uses no index: {plan}");
    let pages = plan["Shared Hit Blocks"].as_i64().unwrap_or(0)
        + plan["Shared Read Blocks"].as_i64().unwrap_or(0);
    println!("{what}: indexes {used:?}, {pages} pages");
    assert!(
        pages <= 120,
        "{what} read {pages} pages:\n{}",
        serde_json::to_string_pretty(plan).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_reads_the_ledger_and_incidents_through_indexes_never_a_scan() {
    let db = seeded().await;
    let jobs: Vec<String> = (0..19)
        .map(|i| format!("'job-{i}'"))
        .chain(["'rare'".to_owned()])
        .collect();
    let names = format!("ARRAY[{}]", jobs.join(","));

    // /api/jobs and /api/jobs/{name}: each job's last run.
    let p = plan(&db, &last_runs_sql(), "text[]", &names).await;
    assert_reads_little(&p, &["job_runs"], "last runs");

    // /api/jobs/{name}/runs: first page, a status filter, the next page, a rare job.
    let cursor: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM job_runs WHERE job = 'job-3' ORDER BY started_at DESC OFFSET 50 LIMIT 1",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    for (what, q, args) in [
        (
            "a job's runs",
            RunQuery {
                job: Some("job-3"),
                limit: 50,
                ..Default::default()
            },
            "'job-3', NULL, NULL, 50".to_owned(),
        ),
        (
            "a job's failed runs",
            RunQuery {
                job: Some("job-3"),
                status: Some(RunStatus::Failed),
                limit: 50,
                ..Default::default()
            },
            "'job-3', 'failed', NULL, 50".to_owned(),
        ),
        (
            "a job's next page",
            RunQuery {
                job: Some("job-3"),
                before: Some(cursor),
                limit: 50,
                ..Default::default()
            },
            format!("'job-3', NULL, '{cursor}', 50"),
        ),
        (
            "a rare job's runs",
            RunQuery {
                job: Some("rare"),
                limit: 50,
                ..Default::default()
            },
            "'rare', NULL, NULL, 50".to_owned(),
        ),
    ] {
        let p = plan(&db, &runs_sql(&q), "text, text, uuid, bigint", &args).await;
        assert_reads_little(&p, &["job_runs"], what);
    }

    // Health: the open incidents only, through the partial index of open ones.
    let p = plan(&db, &vigil::store::alerts::open_incidents_sql(), "", "").await;
    assert_reads_little(&p, &["alert_incidents"], "open incidents");
}
