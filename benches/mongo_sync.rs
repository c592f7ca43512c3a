//! The reading sync over 100,000 documents of about 600 bytes: end to end through
//! nx-27017 (a MongoDB wire-protocol server), and the PostgreSQL load path alone
//! against raw `COPY` of the same rows, in the same run.
//!
//!     cargo bench --bench mongo_sync
//!
//! Needs nx-27017 in .tools/venv (./scripts/test installs it; or set NX_27017_BIN) and
//! PostgreSQL: TEST_DATABASE_URL, else the server on 127.0.0.1:5432.

use std::str::FromStr;
use std::time::{Duration, Instant};

use mongodb::bson::{DateTime as BsonDateTime, Document, RawDocumentBuf, doc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, Executor as _};
use vigil::config::{self, Ident};
use vigil::jobs::mongo_sync::MongoSync;
use vigil::jobs::mongo_sync::MongoSyncConfig;
use vigil::jobs::{Job, RunContext};
use vigil::store::Store;
use vigil::store::sync::LoadRow;

#[path = "../tests/common/mod.rs"]
mod common;

const DOCS: i64 = 100_000;
const BATCH: usize = 1000;

fn document(i: i64) -> Document {
    doc! {
        "reading_id": format!("sensor-{:03}-{i:08}", i % 500),
        "status": "ingested",
        "sensor": { "id": format!("probe-{}", i % 500), "site": "plant-3", "line": i % 12, "model": "TX-9000 rev C" },
        "timestamp": BsonDateTime::from_millis(1_767_225_600_000 + i * 250),
        "values": { "temperature": 20.0 + (i % 100) as f64 / 10.0, "humidity": 40.0 + (i % 37) as f64,
                    "pressure": 1013.25, "vibration": [0.01, 0.02, 0.015, 0.03] },
        "unit_system": "metric",
        "quality": { "ok": true, "score": 0.97, "checked_by": "edge-gateway-17" },
        "tags": ["production", "zone-a", "shift-2", "calibrated-2025-11"],
        "note": "routine reading from the line sensor; no anomaly flagged by the edge gateway rules",
        "firmware": "4.2.17-stable",
    }
}

/// Rows as the load path receives them, for the load-alone and COPY measurements.
fn rows() -> Vec<LoadRow> {
    (0..DOCS)
        .map(|i| {
            let raw = RawDocumentBuf::from_document(&document(i)).expect("bson");
            let payload = vigil::jobs::mongo_sync::transform::document_to_json(&raw).expect("json");
            LoadRow {
                source_id: format!("sensor-{:03}-{i:08}", i % 500),
                payload: payload.to_string(),
                occurred_at: chrono::DateTime::from_timestamp_millis(1_767_225_600_000 + i * 250),
            }
        })
        .collect()
}

/// COPY text format: backslash, tab, newline and carriage return escaped.
fn copy_text(rows: &[LoadRow]) -> Vec<u8> {
    let mut out = String::new();
    for r in rows {
        let escape = |s: &str| {
            s.replace('\\', "\\\\")
                .replace('\t', "\\t")
                .replace('\n', "\\n")
                .replace('\r', "\\r")
        };
        out.push_str(&escape(&r.source_id));
        out.push('\t');
        out.push_str(&escape(&r.payload));
        out.push('\t');
        match r.occurred_at {
            Some(t) => out.push_str(&t.to_rfc3339()),
            None => out.push_str("\\N"),
        }
        out.push('\n');
    }
    out.into_bytes()
}

#[tokio::main]
async fn main() {
    // PostgreSQL.
    let admin = PgConnectOptions::from_str(&common::admin_url()).expect("TEST_DATABASE_URL");
    let db = format!("vigil_bench_sync_{}", std::process::id());
    let mut conn = sqlx::PgConnection::connect_with(&admin)
        .await
        .expect("connect");
    conn.execute(format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(
            admin
                .clone()
                .database(&db)
                .log_statements(log::LevelFilter::Trace),
        )
        .await
        .unwrap();
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();

    // nx-27017, started as the tests start it.
    let nx = common::MongoServer::start().await;
    let uri = nx.uri.clone();
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let coll = client.database("obs").collection::<Document>("readings");
    let t = Instant::now();
    let docs: Vec<Document> = (0..DOCS).map(document).collect();
    let avg = docs
        .iter()
        .map(|d| RawDocumentBuf::from_document(d).unwrap().as_bytes().len())
        .sum::<usize>()
        / docs.len();
    for chunk in docs.chunks(5000) {
        coll.insert_many(chunk.to_vec()).await.unwrap();
    }
    eprintln!(
        "inserted {DOCS} documents (about {avg} bytes of BSON each) in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // End to end.
    let text = format!(
        "[[jobs]]\nname = \"reading-sync\"\nkind = \"mongo_sync\"\nevery = \"1m\"\ntimeout = \"30m\"\n\
         [jobs.settings]\nuri = \"{uri}\"\ndatabase = \"obs\"\ncollection = \"readings\"\n\
         source_id_field = \"reading_id\"\noccurred_at_field = \"timestamp\"\nbatch_size = {BATCH}\n"
    );
    let spec = config::parse_jobs(
        std::path::Path::new("bench.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap()
    .jobs
    .remove(0);
    let c: &MongoSyncConfig = spec.settings.get().expect("mongo_sync settings");
    let job = MongoSync::new("reading-sync", c.clone(), None, store.clone());
    let t = Instant::now();
    let outcome = job
        .run(RunContext {
            job: "reading-sync".into(),
            trigger: vigil::store::Trigger::Manual,
            run_id: uuid::Uuid::now_v7(),
            deadline: tokio::time::Instant::now() + Duration::from_secs(1800),
            input: None,
            output: Default::default(),
            resources: Default::default(),
        })
        .await
        .expect("sync");
    let e2e = t.elapsed().as_secs_f64();
    println!(
        "end to end (nx-27017 → vigil → PostgreSQL): {DOCS} documents in {e2e:.1} s = {:.0} docs/s ({outcome:?})",
        DOCS as f64 / e2e
    );

    // The load path alone versus COPY, same rows, same table, emptied in between.
    let rows = rows();
    let table = Ident::parse("reading_analytics").unwrap();
    let mut load_best = f64::MAX;
    let mut copy_best = f64::MAX;
    for _ in 0..3 {
        pool.execute("TRUNCATE reading_analytics").await.unwrap();
        let t = Instant::now();
        for chunk in rows.chunks(BATCH) {
            store.load_rows(&table, chunk).await.unwrap();
        }
        load_best = load_best.min(t.elapsed().as_secs_f64());

        pool.execute("TRUNCATE reading_analytics").await.unwrap();
        let data = copy_text(&rows);
        let mut c = pool.acquire().await.unwrap();
        let t = Instant::now();
        let mut copy = c
            .copy_in_raw("COPY reading_analytics (source_id, payload, occurred_at) FROM STDIN")
            .await
            .unwrap();
        copy.send(data).await.unwrap();
        let n = copy.finish().await.unwrap();
        assert_eq!(n, DOCS as u64);
        copy_best = copy_best.min(t.elapsed().as_secs_f64());
    }
    let load_rate = DOCS as f64 / load_best;
    let copy_rate = DOCS as f64 / copy_best;
    println!(
        "load path (INSERT … FROM UNNEST … ON CONFLICT DO NOTHING, batches of {BATCH}): {load_rate:.0} docs/s"
    );
    println!(
        "raw COPY of the same rows:                                     {copy_rate:.0} docs/s"
    );
    println!(
        "load path / COPY = {:.0} % (target ≥ 50 %: {})",
        load_rate / copy_rate * 100.0,
        if load_rate >= copy_rate * 0.5 {
            "met"
        } else {
            "MISSED"
        }
    );

    drop(nx);
    pool.close().await;
    conn.execute(format!("DROP DATABASE {db} WITH (FORCE)").as_str())
        .await
        .ok();
}
