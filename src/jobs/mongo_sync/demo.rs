//! Demo readings for the stack's `demo` profile and `make demo-readings`: documents
//! shaped like a sensor's, marked pending, so the reading sync has work. Written with
//! the driver vigil already has, so it works against any MongoDB (or stand-in).

use mongodb::bson::{DateTime, Document, doc};

use crate::config::{Secret, redact_url};

/// Inserts `count` pending readings into `database.collection`, the newest now and one
/// a minute before each; returns how many went in. With `if_empty`, a collection that
/// holds any document is left alone (the stack seeds on every start, like an init
/// script that runs once).
pub async fn insert_readings(
    uri: &Secret,
    database: &str,
    collection: &str,
    count: u32,
    if_empty: bool,
) -> Result<u64, String> {
    let shown = redact_url(uri.expose());
    let client = mongodb::Client::with_uri_str(uri.expose())
        .await
        .map_err(|e| format!("MongoDB {shown}: {e}"))?;
    let readings = client.database(database).collection::<Document>(collection);
    if if_empty
        && readings
            .find_one(doc! {})
            .await
            .map_err(|e| format!("MongoDB {shown}: reading {database}.{collection}: {e}"))?
            .is_some()
    {
        return Ok(0);
    }
    let now = DateTime::now().timestamp_millis();
    let docs: Vec<Document> = (0..count)
        .map(|i| {
            doc! {
                "status": "ingested",
                "sensor": { "id": format!("probe-{}", i % 12), "site": "plant-3" },
                "timestamp": DateTime::from_millis(now - i64::from(count - i) * 60_000),
                "values": {
                    "temperature": 18.0 + f64::from(i % 70) / 10.0,
                    "humidity": 40 + i % 30,
                },
                "unit_system": "metric",
            }
        })
        .collect();
    let mut inserted = 0;
    for chunk in docs.chunks(500) {
        inserted += readings
            .insert_many(chunk.to_vec())
            .await
            .map_err(|e| format!("MongoDB {shown}: inserting readings: {e}"))?
            .inserted_ids
            .len() as u64;
    }
    // The sync's query (`status`, in `_id` order) is served by this index. It only
    // speeds the demo up, so a server that cannot build it (the nx-27017 stand-in)
    // gets a note, not a failure.
    if let Err(e) = readings
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "status": 1, "_id": 1 })
                .build(),
        )
        .await
    {
        eprintln!("note: MongoDB {shown}: no index on (status, _id): {e}");
    }
    Ok(inserted)
}
