//! Generated documents through the mongo_sync transform and a real PostgreSQL load:
//! whatever a document holds, it ends loaded (reading back exactly as the transform
//! wrote it) or quarantined with a reason, and the batch never fails.
//!
//! The seed is printed; `VIGIL_PROPTEST_SEED=<n>` replays a run, `VIGIL_PROPTEST_CASES`
//! changes how many batches are tried (default 64).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use common::TestDb;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{
    Binary, Bson, DateTime as BsonDateTime, Decimal128, Document, JavaScriptCodeWithScope,
    RawDocumentBuf, Regex, Timestamp,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;
use vigil::config::{self, JobSpec};
use vigil::jobs::mongo_sync;
use vigil::jobs::mongo_sync::MongoSyncConfig;
use vigil::jobs::mongo_sync::transform::PG_MIN_TIMESTAMP_MS;
use vigil::jobs::mongo_sync::{Fetched, MongoSync};

fn spec() -> JobSpec {
    let text = "[[jobs]]\nname = \"prop-sync\"\nkind = \"mongo_sync\"\nevery = \"1m\"\n\
                [jobs.settings]\nuri = \"mongodb://127.0.0.1:1\"\ndatabase = \"obs\"\n\
                collection = \"readings\"\nsource_id_field = \"reading_id\"\n\
                occurred_at_field = \"timestamp\"\nmax_document_bytes = 65536\n";
    config::parse_jobs(Path::new("t.toml"), text, &vigil::jobs::Registry::builtin())
        .unwrap_or_else(|e| panic!("{e}"))
        .jobs
        .remove(0)
}

/// Strings as users store them, plus the awkward ones: U+0000, astral characters,
/// right-to-left marks, lone combining marks, the empty string.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        2 => "[a-z0-9 ]{0,12}",
        1 => "[a\u{0}\u{1F321}\u{202E}\u{0301}é]{0,6}",
        1 => Just(String::new()),
    ]
}

/// Keys: no U+0000 (a BSON key is a C string), otherwise anything, `$` and dots too.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => "[a-z_]{1,8}",
        4 => any::<String>().prop_map(|s| s.replace('\0', "")),
        2 => Just(String::new()),
        2 => "\\$[a-z]{1,5}",
        2 => "[a-z]{1,3}\\.[a-z]{1,3}",
        // A constraint on the test's target table refuses documents holding this key,
        // so PostgreSQL itself rejects some rows the transform accepted.
        1 => Just("forbidden".to_owned()),
    ]
}

fn double() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => any::<f64>(),
        1 => prop::sample::select(vec![
            f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::MAX, f64::MIN,
            f64::MIN_POSITIVE, 5e-324, -0.0, 1e15, 9_007_199_254_740_993.0,
        ]),
    ]
}

fn millis() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => -62_135_596_800_000i64..253_402_300_799_999,
        1 => any::<i64>(),
        1 => prop::sample::select(vec![
            i64::MIN, i64::MAX, PG_MIN_TIMESTAMP_MS, PG_MIN_TIMESTAMP_MS - 1,
            -62_167_219_200_001, 253_402_300_800_000, 0, -1,
        ]),
    ]
}

fn leaf() -> impl Strategy<Value = Bson> {
    prop_oneof![
        double().prop_map(Bson::Double),
        text().prop_map(Bson::String),
        any::<bool>().prop_map(Bson::Boolean),
        Just(Bson::Null),
        Just(Bson::Undefined),
        any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(ObjectId::from_bytes(b))),
        millis().prop_map(|ms| Bson::DateTime(BsonDateTime::from_millis(ms))),
        any::<i32>().prop_map(Bson::Int32),
        prop_oneof![
            any::<i64>(),
            Just(i64::MAX),
            Just(i64::MIN),
            Just((1 << 53) + 1)
        ]
        .prop_map(Bson::Int64),
        any::<[u8; 16]>().prop_map(|b| Bson::Decimal128(Decimal128::from_bytes(b))),
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(t, bytes)| {
            Bson::Binary(Binary {
                subtype: BinarySubtype::from(t),
                bytes,
            })
        }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(time, increment)| Bson::Timestamp(Timestamp { time, increment })),
        ("[a-z.*^$]{0,6}", "[imsx]{0,3}")
            .prop_map(|(pattern, options)| { Bson::RegularExpression(Regex { pattern, options }) }),
        text().prop_map(Bson::JavaScriptCode),
        text().prop_map(Bson::Symbol),
        Just(Bson::MinKey),
        Just(Bson::MaxKey),
        (text(), any::<[u8; 12]>()).prop_map(|(code, b)| {
            let mut scope = Document::new();
            scope.insert("x", Bson::ObjectId(ObjectId::from_bytes(b)));
            Bson::JavaScriptCodeWithScope(JavaScriptCodeWithScope { code, scope })
        }),
        (
            prop_oneof![9 => "[a-z.]{1,8}", 1 => "[a-z\u{0}]{1,4}"],
            any::<[u8; 12]>()
        )
            .prop_map(|(ns, b)| db_pointer(&ns, b)),
    ]
}

/// bson keeps DbPointer's fields private: make one from Extended JSON.
fn db_pointer(ns: &str, oid: [u8; 12]) -> Bson {
    let json = serde_json::json!({
        "$dbPointer": { "$ref": ns, "$id": { "$oid": ObjectId::from_bytes(oid).to_hex() } }
    });
    Bson::try_from(json).expect("a DBPointer in Extended JSON")
}

fn value() -> impl Strategy<Value = Bson> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Bson::Array),
            prop::collection::vec((key(), inner), 0..6).prop_map(|fields| {
                let mut d = Document::new();
                for (k, v) in fields {
                    d.insert(k, v);
                }
                Bson::Document(d)
            }),
        ]
    })
}

/// How a generated document is put together beyond its fields.
#[derive(Debug, Clone)]
enum Shape {
    Plain,
    /// Wrapped in this many levels of documents (MongoDB allows 100).
    Nested(usize),
    /// One of its keys written twice.
    RepeatedKey,
    /// A string whose bytes are not UTF-8.
    BadUtf8,
    /// Bigger than `max_document_bytes`.
    Oversize,
    /// Its source id is one already loaded, with other content.
    ConflictWithLoaded,
    /// Exactly a document already loaded, delivered again.
    Redelivered,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        12 => Just(Shape::Plain),
        1 => (95usize..105).prop_map(Shape::Nested),
        1 => Just(Shape::RepeatedKey),
        1 => Just(Shape::BadUtf8),
        1 => Just(Shape::Oversize),
        1 => Just(Shape::ConflictWithLoaded),
        1 => Just(Shape::Redelivered),
    ]
}

#[derive(Debug, Clone)]
struct Generated {
    fields: Vec<(String, Bson)>,
    timestamp: Option<Bson>,
    shape: Shape,
}

fn generated() -> impl Strategy<Value = Generated> {
    (
        prop::collection::vec((key(), value()), 0..8),
        prop::option::of(prop_oneof![
            4 => millis().prop_map(|ms| Bson::DateTime(BsonDateTime::from_millis(ms))),
            1 => millis().prop_map(Bson::Int64),
            1 => text().prop_map(Bson::String),
            1 => Just(Bson::String("2026-01-02T03:04:05.678+01:00".into())),
            1 => leaf(),
        ]),
        shape(),
    )
        .prop_map(|(fields, timestamp, shape)| Generated {
            fields,
            timestamp,
            shape,
        })
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Wraps `body` (a document's elements) in a document's length and terminator.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = ((4 + body.len() + 1) as i32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out.push(0);
    out
}

/// The BSON bytes of the generated document, with its `_id` and source id.
fn build(g: &Generated, loaded: &[(String, RawDocumentBuf)]) -> RawDocumentBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    match &g.shape {
        Shape::Redelivered if !loaded.is_empty() => {
            return loaded[n as usize % loaded.len()].1.clone();
        }
        _ => {}
    }
    let source = match &g.shape {
        Shape::ConflictWithLoaded if !loaded.is_empty() => {
            loaded[n as usize % loaded.len()].0.clone()
        }
        _ => format!("r-{n}"),
    };
    let mut d = Document::new();
    d.insert("_id", ObjectId::new());
    d.insert("reading_id", source);
    d.insert("status", "ingested");
    d.insert("seq", n as i64);
    if let Some(t) = &g.timestamp {
        d.insert("timestamp", t.clone());
    }
    for (k, v) in &g.fields {
        if !["_id", "reading_id", "status", "seq", "timestamp"].contains(&k.as_str()) {
            d.insert(k.clone(), v.clone());
        }
    }
    match &g.shape {
        Shape::Nested(levels) => {
            let mut inner = Document::new();
            inner.insert("leaf", 1);
            for _ in 1..(*levels).saturating_sub(1) {
                let mut outer = Document::new();
                outer.insert("n", inner);
                inner = outer;
            }
            d.insert("nested", inner);
        }
        Shape::Oversize => {
            d.insert("blob", "x".repeat(70_000));
        }
        _ => {}
    }
    let raw = RawDocumentBuf::from_document(&d).expect("a generated document encodes");
    match &g.shape {
        Shape::RepeatedKey => {
            let mut raw = raw;
            raw.append("seq", "again");
            raw
        }
        Shape::BadUtf8 => {
            // The document's elements, then a string element with invalid UTF-8.
            let bytes = raw.as_bytes();
            let mut body = bytes[4..bytes.len() - 1].to_vec();
            body.push(0x02);
            body.extend_from_slice(b"bad\0");
            body.extend_from_slice(&4i32.to_le_bytes());
            body.extend_from_slice(&[0xff, 0xfe, 0x41, 0]);
            RawDocumentBuf::from_bytes(framed(&body)).expect("outer framing is valid")
        }
        _ => raw,
    }
}

/// JSON equality with numbers compared by value: PostgreSQL prints `1e15` as
/// `1000000000000000`, the same number.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        // serde_json parses floats exactly here (`float_roundtrip`, a dev feature).
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn seed() -> u64 {
    std::env::var("VIGIL_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed)
}

fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ u64::from(std::process::id())
}

#[test]
fn every_generated_document_is_loaded_exactly_or_quarantined_with_a_reason() {
    let seed = seed();
    let cases = std::env::var("VIGIL_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    println!("proptest seed {seed} (replay with VIGIL_PROPTEST_SEED={seed})");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::new());
    rt.block_on(async {
        sqlx::query(
            "ALTER TABLE reading_analytics ADD CONSTRAINT no_forbidden_key \
             CHECK (NOT payload @? '$.**.forbidden')",
        )
        .execute(db.pool())
        .await
        .unwrap();
    });
    let spec = spec();
    let c: &MongoSyncConfig = spec.settings.get().unwrap();
    let job = MongoSync::new(&spec.name, c.clone(), None, db.store.clone());
    let loaded: std::sync::Mutex<Vec<(String, RawDocumentBuf)>> = Default::default();
    let totals: std::sync::Mutex<HashMap<&'static str, usize>> = Default::default();

    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (seed >> ((i % 8) * 8)) as u8 ^ (i as u8);
    }
    let config = Config {
        cases,
        failure_persistence: None,
        // Shrinking re-runs batches against the database; a few steps are enough to
        // point at the culprit.
        max_shrink_iters: 64,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let result = runner.run(&prop::collection::vec(generated(), 1..24), |batch| {
        rt.block_on(check_batch(&db, &job, &batch, &loaded, &totals))
    });
    if let Err(e) = result {
        panic!("{e}\nproptest seed {seed}: replay with VIGIL_PROPTEST_SEED={seed}");
    }
    let totals = totals.lock().unwrap();
    println!("outcomes over {cases} batches: {totals:?}");
    // The generator reaches every outcome, or the test proves less than it claims.
    for outcome in [
        "inserted",
        "redelivered",
        "invalid",
        "refused_by_postgres",
        "conflict",
        "oversize",
    ] {
        assert!(
            totals.get(outcome).copied().unwrap_or(0) > 0,
            "no {outcome} document was generated: {totals:?}"
        );
    }
}

async fn check_batch(
    db: &TestDb,
    job: &MongoSync,
    batch: &[Generated],
    loaded: &std::sync::Mutex<Vec<(String, RawDocumentBuf)>>,
    totals: &std::sync::Mutex<HashMap<&'static str, usize>>,
) -> Result<(), TestCaseError> {
    let before = loaded.lock().unwrap().clone();
    let docs: Vec<RawDocumentBuf> = batch.iter().map(|g| build(g, &before)).collect();
    let max = 65_536;
    let fetched: Vec<Fetched> = docs
        .iter()
        .map(|d| Fetched::read(d, max, "reading_id"))
        .collect();
    let outcome = job
        .load_documents(fetched)
        .await
        .map_err(|e| TestCaseError::fail(format!("the batch failed: {e}")))?;

    let id_of = |d: &RawDocumentBuf| Bson::try_from(d.get("_id").unwrap().unwrap()).unwrap();
    let done: HashSet<String> = outcome.done.iter().map(|b| b.to_string()).collect();
    let failed: HashMap<String, String> = outcome
        .failed
        .iter()
        .map(|(b, e)| (b.to_string(), e.clone()))
        .collect();
    let mut inserted_now = 0;
    let mut seen_sources: HashSet<String> = HashSet::new();
    for (doc, g) in docs.iter().zip(batch) {
        let id = id_of(doc).to_string();
        let (is_done, reason) = (done.contains(&id), failed.get(&id));
        prop_assert!(
            is_done != reason.is_some(),
            "document {id} must end exactly one way (done: {is_done}, failed: {reason:?}), shape {:?}",
            g.shape
        );
        let size = doc.as_bytes().len();
        let transformed = if size > max {
            None
        } else {
            Some(job.transform(doc))
        };
        let tally = |k: &'static str| *totals.lock().unwrap().entry(k).or_default() += 1;
        match reason {
            Some(reason) => {
                prop_assert!(!reason.is_empty());
                let (error, raw, raw_size): (String, Vec<u8>, i64) = sqlx::query_as(
                    "SELECT error, raw, raw_size FROM sync_rejects WHERE job = 'prop-sync' AND mongo_id = $1",
                )
                .bind(mongo_id(&id_of(doc)))
                .fetch_one(db.pool())
                .await
                .map_err(|e| TestCaseError::fail(format!("no sync_rejects row for {id}: {e}")))?;
                prop_assert_eq!(&error, reason);
                prop_assert_eq!(raw_size as usize, size);
                if size > max {
                    prop_assert_eq!(&raw[..], &doc.as_bytes()[..mongo_sync::OVERSIZE_KEEP_BYTES]);
                    tally("oversize");
                } else {
                    prop_assert_eq!(&raw[..], doc.as_bytes());
                    match transformed {
                        Some(Err(e)) => {
                            prop_assert_eq!(&e.0, &error);
                            if std::env::var_os("VIGIL_PROPTEST_SHOW").is_some() {
                                eprintln!("invalid: {error}");
                            }
                            tally("invalid");
                        }
                        _ if error.starts_with("conflict:") => tally("conflict"),
                        _ => {
                            prop_assert!(
                                error.starts_with("refused by PostgreSQL")
                                    && error.contains("no_forbidden_key"),
                                "{error}"
                            );
                            tally("refused_by_postgres");
                        }
                    }
                }
            }
            None => {
                let row = match transformed {
                    Some(Ok(row)) => row,
                    other => {
                        return Err(TestCaseError::fail(format!(
                            "document {id} marked done but its transform gave {other:?}"
                        )));
                    }
                };
                // Compared by PostgreSQL itself: jsonb equality compares numbers as
                // numerics, exactly (a client's float parsing could round).
                let (equal, payload, occurred): (
                    bool,
                    String,
                    Option<chrono::DateTime<chrono::Utc>>,
                ) = sqlx::query_as(
                    "SELECT payload = $2::jsonb, payload::text, occurred_at \
                         FROM reading_analytics WHERE source_id = $1",
                )
                .bind(&row.source_id)
                .bind(&row.payload)
                .fetch_one(db.pool())
                .await
                .map_err(|e| TestCaseError::fail(format!("{id} done but not loaded: {e}")))?;
                prop_assert!(
                    equal,
                    "{id} reads back as {payload} instead of {}",
                    row.payload
                );
                // And structurally, as a client sees it.
                let stored: Value = serde_json::from_str(&payload).unwrap();
                let wanted: Value = serde_json::from_str(&row.payload).unwrap();
                prop_assert!(same_json(&stored, &wanted), "{id}: {stored} vs {wanted}");
                prop_assert_eq!(occurred, row.occurred_at);
                let fresh = !before.iter().any(|(s, _)| *s == row.source_id)
                    && seen_sources.insert(row.source_id.clone());
                if fresh {
                    inserted_now += 1;
                    loaded
                        .lock()
                        .unwrap()
                        .push((row.source_id.clone(), doc.clone()));
                    tally("inserted");
                } else {
                    tally("redelivered");
                }
            }
        }
    }
    prop_assert_eq!(
        outcome.inserted,
        inserted_now,
        "items counts rows actually inserted"
    );
    Ok(())
}

fn mongo_id(id: &Bson) -> String {
    match id {
        Bson::ObjectId(o) => o.to_hex(),
        other => other.to_string(),
    }
}
