//! MongoDB → PostgreSQL sync through nx-27017 (a MongoDB wire-protocol server) and real
//! PostgreSQL.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{MongoServer, TestDb};
use futures::TryStreamExt as _;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, DateTime as BsonDateTime, Document, doc};
use vigil::config::{self, JobSpec};
use vigil::jobs::mongo_sync::MongoSyncConfig;
use vigil::jobs::mongo_sync::{Fault, MongoSync};
use vigil::jobs::{self, Job, RunContext, RunOutcome};
use vigil::scheduler::{Ledger, Scheduler, ledger};
use vigil::store::{RunStatus, Store};

fn spec(uri: &str, settings: &str) -> JobSpec {
    let text = format!(
        "[[jobs]]\nname = \"reading-sync\"\nkind = \"mongo_sync\"\nevery = \"1m\"\ntimeout = \"5m\"\n\
         [jobs.settings]\nuri = \"{uri}\"\ndatabase = \"obs\"\ncollection = \"readings\"\n{settings}\n"
    );
    config::parse_jobs(
        Path::new("t.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .jobs
    .remove(0)
}

fn sync_job(spec: &JobSpec, store: &Store) -> MongoSync {
    let c: &MongoSyncConfig = spec.settings.get().unwrap();
    MongoSync::new(&spec.name, c.clone(), None, store.clone())
}

fn ctx() -> RunContext {
    RunContext {
        job: "reading-sync".into(),
        trigger: vigil::store::Trigger::Manual,
        run_id: uuid::Uuid::now_v7(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(300),
        input: None,
        output: Default::default(),
        resources: Default::default(),
    }
}

async fn insert(client: &mongodb::Client, docs: Vec<Document>) {
    let coll = client.database("obs").collection::<Document>("readings");
    for chunk in docs.chunks(1000) {
        coll.insert_many(chunk.to_vec()).await.unwrap();
    }
}

async fn statuses(client: &mongodb::Client) -> Vec<Document> {
    client
        .database("obs")
        .collection::<Document>("readings")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

async fn rows(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM reading_analytics")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

fn reading(i: i64) -> Document {
    doc! {
        "reading_id": format!("r-{i:06}"),
        "status": "ingested",
        "sensor": format!("probe-{}", i % 17),
        "value": (i as f64) * 0.25,
        "timestamp": BsonDateTime::from_millis(1_767_225_600_000 + i * 1000),
    }
}

/// 10,000 documents: every type nx-27017 stores, unicode, deep nesting, sizes near the
/// limit, and some that cannot be loaded.
fn mixed_documents() -> (Vec<Document>, HashSet<String>, usize) {
    let mut docs = Vec::new();
    let mut good = HashSet::new();
    let mut bad = 0;
    for i in 0..10_000i64 {
        let mut d = reading(i);
        match i % 20 {
            0 => {
                // Every type nx-27017 stores.
                d.insert("oid", ObjectId::new());
                d.insert("int32", i as i32);
                d.insert("int64_big", (1i64 << 62) + i);
                d.insert("int64_small", i << 20);
                d.insert("double", -1.5e300);
                d.insert(
                    "bin",
                    Binary {
                        subtype: BinarySubtype::Generic,
                        bytes: vec![1, 2, 3, (i % 256) as u8],
                    },
                );
                d.insert("null", Bson::Null);
                d.insert("flag", i % 40 == 0);
                d.insert("dotted.key", "kept as written");
                d.insert(
                    "list",
                    vec![
                        Bson::Int32(1),
                        Bson::String("two".into()),
                        Bson::Document(doc! {"three": 3}),
                    ],
                );
            }
            1 => {
                d.insert("note", "température élevée ✓ — 温度 🌡️");
            }
            2 => {
                let mut nested = doc! { "leaf": i };
                for level in 0..40 {
                    nested = doc! { format!("l{level}"): nested };
                }
                d.insert("deep", nested);
            }
            3 => {
                // Just under the limit of 16 KiB.
                d.insert("blob", "x".repeat(16_000));
            }
            4 if i % 100 == 4 => {
                // Just over it.
                d.insert("blob", "x".repeat(16_500));
                bad += 1;
                docs.push(d);
                continue;
            }
            5 if i % 100 == 5 => {
                d.remove("reading_id");
                bad += 1;
                docs.push(d);
                continue;
            }
            6 if i % 100 == 6 => {
                d.insert("reading_id", doc! { "not": "an id" });
                bad += 1;
                docs.push(d);
                continue;
            }
            7 if i % 100 == 7 => {
                d.insert("timestamp", "the day before yesterday");
                bad += 1;
                docs.push(d);
                continue;
            }
            _ => {}
        }
        good.insert(format!("r-{i:06}"));
        docs.push(d);
    }
    (docs, good, bad)
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_mixed_documents_load_exactly_once_and_bad_ones_are_quarantined() {
    let mongo = MongoServer::start().await;
    let client = mongo.client().await;
    let db = TestDb::new().await;
    let (docs, good, bad) = mixed_documents();
    insert(&client, docs).await;

    let spec = spec(
        &mongo.uri,
        "source_id_field = \"reading_id\"\noccurred_at_field = \"timestamp\"\nmax_document_bytes = 16384\n\
         rename = { value = \"reading\" }",
    );
    let job = sync_job(&spec, &db.store);
    let outcome = job.run(ctx()).await.unwrap();
    assert_eq!(
        outcome,
        RunOutcome::Completed {
            items: Some(good.len() as u64)
        }
    );

    // Every good document exactly once.
    let ids: Vec<String> = sqlx::query_scalar("SELECT source_id FROM reading_analytics")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(ids.len(), good.len());
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), good);

    // Every bad one marked failed with a reason, and in sync_rejects.
    let all = statuses(&client).await;
    let failed: Vec<&Document> = all
        .iter()
        .filter(|d| d.get_str("status") == Ok("failed"))
        .collect();
    let processed = all
        .iter()
        .filter(|d| d.get_str("status") == Ok("processed"))
        .count();
    assert_eq!(failed.len(), bad);
    assert_eq!(processed, good.len());
    assert_eq!(processed + failed.len(), 10_000, "nothing left pending");
    assert!(
        failed
            .iter()
            .all(|d| d.get_str("sync_error").is_ok_and(|e| !e.is_empty()))
    );
    for d in all
        .iter()
        .filter(|d| d.get_str("status") == Ok("processed"))
    {
        // mongod keeps the Date vigil sets; nx-27017 turns a `$set` date into text.
        assert!(
            matches!(
                d.get("processed_at"),
                Some(Bson::DateTime(_) | Bson::String(_))
            ),
            "processed_at: {:?}",
            d.get("processed_at")
        );
    }
    let rejects: Vec<(String, String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT mongo_id, error, document FROM sync_rejects WHERE job = 'reading-sync'",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rejects.len(), bad);
    let errors: Vec<&str> = rejects.iter().map(|r| r.1.as_str()).collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("over max_document_bytes = 16384")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("no `reading_id` field")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("source id must be")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("`timestamp`") && e.contains("RFC 3339")),
        "{errors:?}"
    );
    assert!(
        rejects.iter().all(|r| r.2.is_some()),
        "rejected documents are kept as JSON"
    );

    // The transform, read back.
    let (payload, occurred): (serde_json::Value, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as(
            "SELECT payload, occurred_at FROM reading_analytics WHERE source_id = 'r-000020'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        payload["int64_big"],
        serde_json::json!(((1i64 << 62) + 20).to_string())
    );
    assert_eq!(payload["int64_small"], serde_json::json!(20i64 << 20));
    assert_eq!(payload["bin"], serde_json::json!("AQIDFA=="));
    assert_eq!(payload["dotted.key"], "kept as written");
    assert_eq!(payload["list"], serde_json::json!([1, "two", {"three": 3}]));
    assert_eq!(
        payload["reading"],
        serde_json::json!(5.0),
        "renamed from value"
    );
    assert!(payload.get("value").is_none());
    assert!(
        payload.get("status").is_none(),
        "the status field is dropped by default"
    );
    assert_eq!(payload["timestamp"], "2026-01-01T00:00:20.000Z");
    assert_eq!(occurred.unwrap().to_rfc3339(), "2026-01-01T00:00:20+00:00");
    let (note,): (serde_json::Value,) = sqlx::query_as(
        "SELECT payload -> 'note' FROM reading_analytics WHERE source_id = 'r-000021'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(note, "température élevée ✓ — 温度 🌡️");

    // A second run finds nothing pending.
    assert_eq!(
        job.run(ctx()).await.unwrap(),
        RunOutcome::Completed { items: Some(0) }
    );
    assert_eq!(rows(&db).await, good.len() as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_commit_and_mark_leaves_no_duplicate_after_the_rerun() {
    let mongo = MongoServer::start().await;
    let client = mongo.client().await;
    let db = TestDb::new().await;
    insert(&client, (0..1000).map(reading).collect()).await;
    let spec = spec(
        &mongo.uri,
        "source_id_field = \"reading_id\"\nbatch_size = 300",
    );
    let job = sync_job(&spec, &db.store);

    job.inject_fault(Fault::CrashAfterCommit);
    let err = job.run(ctx()).await.unwrap_err().to_string();
    assert!(err.contains("injected crash"), "{err}");
    // The first batch is committed, but nothing is marked.
    assert_eq!(rows(&db).await, 300);
    let pending = statuses(&client)
        .await
        .iter()
        .filter(|d| d.get_str("status") == Ok("ingested"))
        .count();
    assert_eq!(pending, 1000);

    // items counts rows inserted by this run: the 300 of the crashed run were there.
    assert_eq!(
        job.run(ctx()).await.unwrap(),
        RunOutcome::Completed { items: Some(700) }
    );
    assert_eq!(rows(&db).await, 1000, "no duplicates");
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT source_id) FROM reading_analytics")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(distinct, 1000);
    assert!(
        statuses(&client)
            .await
            .iter()
            .all(|d| d.get_str("status") == Ok("processed"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_runs_at_once_one_is_skipped_and_nothing_is_processed_twice() {
    let mongo = MongoServer::start().await;
    let client = mongo.client().await;
    let db = TestDb::new().await;
    insert(&client, (0..3000).map(reading).collect()).await;
    let spec = spec(
        &mongo.uri,
        "source_id_field = \"reading_id\"\nbatch_size = 100",
    );
    // Two instances, as two replicas (or a trigger racing a schedule) would have.
    let a = sync_job(&spec, &db.store);
    let b = sync_job(&spec, &db.store);
    let (ra, rb) = tokio::join!(a.run(ctx()), b.run(ctx()));
    let outcomes = [ra.unwrap(), rb.unwrap()];
    let skipped = outcomes
        .iter()
        .filter(|o| matches!(o, RunOutcome::Skipped { .. }))
        .count();
    assert_eq!(skipped, 1, "{outcomes:?}");
    assert!(
        outcomes.contains(&RunOutcome::Completed { items: Some(3000) }),
        "{outcomes:?}"
    );
    if let Some(RunOutcome::Skipped { reason }) = outcomes
        .iter()
        .find(|o| matches!(o, RunOutcome::Skipped { .. }))
    {
        assert!(reason.contains("holds its lock"), "{reason}");
    }
    assert_eq!(rows(&db).await, 3000);
}

#[tokio::test(flavor = "multi_thread")]
async fn documents_inserted_during_a_run_are_processed_by_the_end_of_the_next() {
    let mongo = MongoServer::start().await;
    let client = mongo.client().await;
    let db = TestDb::new().await;
    insert(&client, (0..3000).map(reading).collect()).await;
    let spec = spec(
        &mongo.uri,
        "source_id_field = \"reading_id\"\nbatch_size = 100",
    );
    let job = Arc::new(sync_job(&spec, &db.store));
    let running = {
        let job = job.clone();
        tokio::spawn(async move { job.run(ctx()).await })
    };
    // Meanwhile, more arrive.
    for chunk in 0..10 {
        insert(
            &client,
            (3000 + chunk * 100..3100 + chunk * 100)
                .map(reading)
                .collect(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    running.await.unwrap().unwrap();
    job.run(ctx()).await.unwrap();
    assert_eq!(rows(&db).await, 4000);
    assert!(
        statuses(&client)
            .await
            .iter()
            .all(|d| d.get_str("status") == Ok("processed"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mongodb_down_fails_the_run_clearly_marks_nothing_and_is_retried() {
    let db = TestDb::new().await;
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("mongodb://127.0.0.1:{port}");
    let spec = {
        let text = format!(
            "[[jobs]]\nname = \"reading-sync\"\nkind = \"mongo_sync\"\nevery = \"1h\"\n\
             retries = {{ max_attempts = 2, initial_backoff = \"100ms\" }}\n\
             [jobs.settings]\nuri = \"{uri}\"\ndatabase = \"obs\"\ncollection = \"readings\"\n"
        );
        config::parse_jobs(
            Path::new("t.toml"),
            &text,
            &vigil::jobs::Registry::builtin(),
        )
        .unwrap()
        .jobs
        .remove(0)
    };
    let job = jobs::build(&spec, &db.deps()).unwrap();
    let scheduler = Scheduler::new(
        Ledger::start(
            db.store.clone(),
            ledger::DEFAULT_CAPACITY,
            Default::default(),
        ),
        "h",
    )
    .await
    .unwrap();
    scheduler.add(spec, job).await.unwrap();
    let result = scheduler
        .trigger("reading-sync", false)
        .unwrap()
        .finished()
        .await;
    assert_eq!(result.status, RunStatus::Failed);
    assert_eq!(result.attempts, 2, "retried per the job's policy");
    let error = result.error.unwrap();
    assert!(
        error.contains("MongoDB") && error.contains(&format!("127.0.0.1:{port}")),
        "{error}"
    );
    assert_eq!(rows(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_fails_the_run_and_marks_nothing() {
    let mongo = MongoServer::start().await;
    let client = mongo.client().await;
    insert(&client, (0..10).map(reading).collect()).await;
    let nowhere = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let spec = spec(&mongo.uri, "source_id_field = \"reading_id\"");
    let job = sync_job(&spec, &Store::from_pool(nowhere));
    let err = job.run(ctx()).await.unwrap_err().to_string();
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(
        statuses(&client)
            .await
            .iter()
            .all(|d| d.get_str("status") == Ok("ingested"))
    );
}

/// A seeded generator (printed, `VIGIL_TEST_SEED` replays) of readings holding every
/// type nx-27017 stores, with bad documents of every kind scattered through them.
struct Mix {
    docs: Vec<Document>,
    /// Source ids that must end loaded.
    good: HashSet<String>,
    /// Source ids of the documents that must end failed, with a word of the reason.
    bad: Vec<(String, &'static str)>,
}

fn generated_mix(seed: u64, n: i64) -> Mix {
    use proptest::strategy::{Strategy as _, ValueTree as _};
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (seed >> ((i % 8) * 8)) as u8 ^ (i as u8);
    }
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let mut draw = |s: proptest::strategy::BoxedStrategy<Bson>| {
        s.new_tree(&mut runner).expect("a value").current()
    };
    use proptest::prelude::*;
    let scalar = || {
        prop_oneof![
            any::<f64>()
                .prop_filter("finite: nx-27017 stores no NaN", |f| f.is_finite())
                .prop_map(Bson::Double),
            any::<String>().prop_map(|s| Bson::String(s.replace('\0', ""))),
            any::<i32>().prop_map(Bson::Int32),
            any::<i64>().prop_map(Bson::Int64),
            any::<bool>().prop_map(Bson::Boolean),
            Just(Bson::Null),
            any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(ObjectId::from_bytes(b))),
            (-62_135_596_800_000i64..253_402_300_799_999)
                .prop_map(|ms| Bson::DateTime(BsonDateTime::from_millis(ms))),
            prop::collection::vec(any::<u8>(), 0..24).prop_map(|bytes| Bson::Binary(Binary {
                subtype: BinarySubtype::Generic,
                bytes
            })),
        ]
    };
    let value = scalar()
        .prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Bson::Array),
                prop::collection::vec(("[a-z]{1,6}(\\.[a-z]{1,3})?", inner), 0..4)
                    .prop_map(|f| { Bson::Document(f.into_iter().collect()) }),
            ]
        })
        .boxed();
    let kind = (0u32..100).boxed();
    let mut mix = Mix {
        docs: Vec::new(),
        good: HashSet::new(),
        bad: Vec::new(),
    };
    for i in 0..n {
        let mut d = reading(i);
        let id = format!("r-{i:06}");
        for k in 0..3 {
            d.insert(format!("f{k}"), draw(value.clone()));
        }
        let kind = match draw(kind.clone().prop_map(|k| Bson::Int32(k as i32)).boxed()) {
            Bson::Int32(k) => k,
            _ => unreachable!(),
        };
        // About one document in twelve is bad, each kind equally.
        let bad = match kind {
            0 => Some(("nul", {
                d.insert("note", "before\0after");
            })),
            1 => Some(("refused", {
                d.insert("value", -1.0);
            })),
            2 => Some(("oversize", {
                d.insert("blob", "x".repeat(20_000));
            })),
            3 => Some(("source id", {
                d.remove("reading_id");
            })),
            4 => Some(("timestamp", {
                d.insert("timestamp", "someday");
            })),
            5 => Some(("conflict", ())),
            6 => Some(("range", {
                // Epoch milliseconds of the year -7537: nx-27017 stores no date that early.
                d.insert("timestamp", -300_000_000_000_000_i64);
            })),
            _ => None,
        };
        match bad {
            Some((word, ())) => {
                if word == "source id" {
                    mix.bad.push((format!("(no id {i})"), word));
                } else {
                    mix.bad.push((id, word));
                }
            }
            None => {
                mix.good.insert(id);
            }
        }
        mix.docs.push(d);
    }
    mix
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_mix_with_scattered_bad_documents_loads_every_good_one_exactly_once() {
    let seed: u64 = std::env::var("VIGIL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (replay with VIGIL_TEST_SEED={seed})");
    let mongo = MongoServer::start().await;
    let client = mongo.client().await;
    let db = TestDb::new().await;
    let mix = generated_mix(seed, 3000);
    // The target table's owner forbids negative values: PostgreSQL refuses those rows
    // though the transform accepts them.
    sqlx::query(
        "ALTER TABLE reading_analytics ADD CONSTRAINT value_not_negative \
         CHECK ((payload ->> 'value')::float8 >= 0)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    // Conflicts: rows already loaded under those source ids with other content.
    for (sid, _) in mix.bad.iter().filter(|b| b.1 == "conflict") {
        sqlx::query(
            "INSERT INTO reading_analytics (source_id, payload) VALUES ($1, '{\"older\": true}')",
        )
        .bind(sid)
        .execute(db.pool())
        .await
        .unwrap();
    }
    let conflicts = mix.bad.iter().filter(|b| b.1 == "conflict").count();
    insert(&client, mix.docs.clone()).await;

    let spec = {
        let text = format!(
            "[[jobs]]\nname = \"reading-sync\"\nkind = \"mongo_sync\"\nevery = \"1h\"\ntimeout = \"5m\"\n\
             [jobs.settings]\nuri = \"{}\"\ndatabase = \"obs\"\ncollection = \"readings\"\n\
             source_id_field = \"reading_id\"\noccurred_at_field = \"timestamp\"\n\
             batch_size = 250\nmax_document_bytes = 16384\n",
            mongo.uri
        );
        config::parse_jobs(
            Path::new("t.toml"),
            &text,
            &vigil::jobs::Registry::builtin(),
        )
        .unwrap()
        .jobs
        .remove(0)
    };
    let job = jobs::build(&spec, &db.deps()).unwrap();
    let scheduler = Scheduler::new(
        Ledger::start(
            db.store.clone(),
            ledger::DEFAULT_CAPACITY,
            Default::default(),
        ),
        "h",
    )
    .await
    .unwrap();
    scheduler.add(spec, job).await.unwrap();
    let result = scheduler
        .trigger("reading-sync", false)
        .unwrap()
        .finished()
        .await;
    assert_eq!(result.status, RunStatus::Succeeded, "{:?}", result.error);
    assert_eq!(
        result.items,
        Some(mix.good.len() as i64),
        "items = rows inserted"
    );

    // Every good document loaded exactly once, and processed.
    let loaded: Vec<String> =
        sqlx::query_scalar("SELECT source_id FROM reading_analytics WHERE NOT payload ? 'older'")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(loaded.len(), mix.good.len(), "no duplicates");
    assert_eq!(loaded.into_iter().collect::<HashSet<_>>(), mix.good);
    let all = statuses(&client).await;
    let status_of = |d: &Document| d.get_str("status").unwrap_or("?").to_owned();
    let processed = all.iter().filter(|d| status_of(d) == "processed").count();
    let failed: Vec<&Document> = all.iter().filter(|d| status_of(d) == "failed").collect();
    assert_eq!(processed, mix.good.len());
    assert_eq!(failed.len(), mix.bad.len());
    assert_eq!(processed + failed.len(), all.len(), "nothing left pending");

    // Every bad one failed, with its reason in MongoDB and in sync_rejects.
    let rejects: Vec<(String, Option<String>, String, Option<i64>)> = sqlx::query_as(
        "SELECT mongo_id, source_id, error, raw_size FROM sync_rejects WHERE job = 'reading-sync'",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rejects.len(), mix.bad.len());
    assert!(
        rejects.iter().all(|r| r.3.is_some_and(|n| n > 0)),
        "the original is kept"
    );
    let by_source: std::collections::HashMap<&str, &str> = rejects
        .iter()
        .filter_map(|r| r.1.as_deref().map(|s| (s, r.2.as_str())))
        .collect();
    let expect = |word: &str| match word {
        "nul" => "U+0000",
        "refused" => "value_not_negative",
        "oversize" => "over max_document_bytes",
        "timestamp" => "RFC 3339",
        "conflict" => "conflict: source id",
        "range" => "out of range",
        _ => "no `reading_id` field",
    };
    for (sid, word) in &mix.bad {
        if *word == "source id" {
            continue;
        }
        let error = by_source
            .get(sid.as_str())
            .unwrap_or_else(|| panic!("no reject for {sid} ({word})"));
        assert!(error.contains(expect(word)), "{sid} ({word}): {error}");
    }
    let missing_ids = mix.bad.iter().filter(|b| b.1 == "source id").count();
    assert_eq!(
        rejects
            .iter()
            .filter(|r| r.2.contains("no `reading_id` field"))
            .count(),
        missing_ids
    );
    for d in &failed {
        assert!(d.get_str("sync_error").is_ok_and(|e| !e.is_empty()));
    }
    // The conflicting rows are untouched.
    let older: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reading_analytics WHERE payload ? 'older'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(older as usize, conflicts);
    for word in [
        "nul",
        "refused",
        "oversize",
        "source id",
        "timestamp",
        "conflict",
        "range",
    ] {
        assert!(
            mix.bad.iter().any(|b| b.1 == word),
            "the mix has no {word} document"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_mongodb_configured_or_local_the_sync_waits_and_says_what_to_set() {
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", 27017)).is_err(),
        "this test needs nothing listening on localhost:27017 (MongoDB's default address)"
    );
    let db = TestDb::new().await;
    let spec = {
        let text = "[[jobs]]\nname = \"reading-sync\"\nkind = \"mongo_sync\"\nevery = \"1m\"\n\
                    [jobs.settings]\ndatabase = \"obs\"\ncollection = \"readings\"\n";
        config::parse_jobs(Path::new("t.toml"), text, &vigil::jobs::Registry::builtin())
            .unwrap()
            .jobs
            .remove(0)
    };
    // Neither the job nor MONGO_URI names a server.
    let job = jobs::build(&spec, &db.deps()).unwrap();
    for _ in 0..2 {
        match job.run(ctx()).await {
            Ok(RunOutcome::Skipped { reason }) => {
                assert!(
                    reason.contains("waiting for MongoDB") && reason.contains("MONGO_URI"),
                    "{reason}"
                );
            }
            other => panic!("expected a skip, not a failure to retry: {other:?}"),
        }
    }
    // Where a server was named, an unreachable one is a failure (an outage).
    let mut named = spec.clone();
    let c: &MongoSyncConfig = spec.settings.get().unwrap();
    let mut c = c.clone();
    c.uri = Some(toml::Spanned::new(
        0..0,
        config::Secret::new("mongodb://127.0.0.1:27017"),
    ));
    named.settings = config::JobSettings::new(c);
    let job = jobs::build(&named, &db.deps()).unwrap();
    assert!(job.run(ctx()).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_readings_seed_an_empty_collection_once_and_the_sync_loads_them() {
    let mongo = MongoServer::start().await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let demo = |extra: &[&str]| {
        let mut args = vec![
            "demo-readings",
            "--database",
            "obs",
            "--collection",
            "readings",
        ];
        args.extend_from_slice(extra);
        let out = common::vigil(dir.path(), &args, &[("MONGO_URI", mongo.uri.as_str())])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The stack's one-shot service: seeds an empty collection, and only that.
    assert!(demo(&["--count", "120", "--if-empty"]).contains("inserted 120"));
    assert!(demo(&["--count", "120", "--if-empty"]).contains("none inserted"));
    // `make demo-readings`: more, whatever is there.
    assert!(demo(&["--count", "30"]).contains("inserted 30"));

    let job = sync_job(&spec(&mongo.uri, ""), &db.store);
    let outcome = job.run(ctx()).await.unwrap();
    assert!(
        matches!(outcome, RunOutcome::Completed { items: Some(150) }),
        "{outcome:?}"
    );
    assert_eq!(rows(&db).await, 150);
    let pending = mongo
        .client()
        .await
        .database("obs")
        .collection::<Document>("readings")
        .count_documents(doc! { "status": "ingested" })
        .await
        .unwrap();
    assert_eq!(pending, 0, "every demo reading is marked processed");
}
