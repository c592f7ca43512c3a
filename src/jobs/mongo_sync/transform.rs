//! BSON to JSON, with one documented rule per BSON type, so a reading's payload in
//! PostgreSQL is plain JSON any client can use.
//!
//! | BSON | JSON |
//! |---|---|
//! | Double | number; NaN and ±Infinity (no JSON form) as the strings "NaN", "Infinity", "-Infinity" |
//! | String, Symbol, JavaScript code | string |
//! | Document, Array | object, array (recursively; keys kept as written, dots included) |
//! | Boolean, Null | boolean, null; Undefined → null |
//! | ObjectId | 24-character hex string |
//! | DateTime | RFC 3339 UTC with milliseconds, `"2026-01-02T03:04:05.678Z"`; outside years 0–9999, `{"$date": {"$numberLong": "<ms>"}}` |
//! | Int32 | number |
//! | Int64 | number within ±2^53 (exact in every JSON reader), else a decimal string |
//! | Decimal128 | string with the exact decimal value, e.g. `"1234.5678"` |
//! | Binary | base64 (standard alphabet, padded), any subtype |
//! | Timestamp | `{"t": <seconds>, "i": <increment>}` |
//! | Regular expression | `{"pattern": "...", "options": "..."}` |
//! | JavaScript code with scope | `{"code": "...", "scope": {...}}` |
//! | MinKey, MaxKey | `{"$minKey": 1}`, `{"$maxKey": 1}` |
//! | DBPointer | relaxed Extended JSON, `{"$dbPointer": {"$ref": "...", "$id": {"$oid": "..."}}}` |

use base64::Engine as _;
use chrono::{DateTime, Utc};
use mongodb::bson::{Bson, RawBsonRef, RawDocument};
use serde_json::{Map, Number, Value};

/// Integers beyond this lose precision in JavaScript and many JSON readers.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Why a document cannot be loaded; the message goes to `sync_error` and `sync_rejects`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TransformError(pub String);

/// Converts one BSON value.
pub fn to_json(value: RawBsonRef<'_>) -> Result<Value, TransformError> {
    Ok(match value {
        RawBsonRef::Double(f) => match Number::from_f64(f) {
            Some(n) => Value::Number(n),
            None if f.is_nan() => Value::String("NaN".into()),
            None if f > 0.0 => Value::String("Infinity".into()),
            None => Value::String("-Infinity".into()),
        },
        RawBsonRef::String(s) | RawBsonRef::Symbol(s) | RawBsonRef::JavaScriptCode(s) => {
            Value::String(s.to_owned())
        }
        RawBsonRef::Document(d) => document_to_json(d)?,
        RawBsonRef::Array(a) => {
            let mut out = Vec::new();
            for item in a {
                let item =
                    item.map_err(|e| TransformError(format!("malformed BSON array: {e}")))?;
                out.push(to_json(item)?);
            }
            Value::Array(out)
        }
        RawBsonRef::Boolean(b) => Value::Bool(b),
        RawBsonRef::Null | RawBsonRef::Undefined => Value::Null,
        RawBsonRef::ObjectId(oid) => Value::String(oid.to_hex()),
        RawBsonRef::DateTime(dt) => match dt.try_to_rfc3339_string() {
            Ok(s) if dt.timestamp_millis() >= -62_167_219_200_000 => {
                // bson prints whole seconds without a fraction; keep one format.
                Value::String(rfc3339_millis(dt.timestamp_millis()).unwrap_or(s))
            }
            _ => {
                serde_json::json!({ "$date": { "$numberLong": dt.timestamp_millis().to_string() } })
            }
        },
        RawBsonRef::Int32(i) => Value::from(i),
        RawBsonRef::Int64(i) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) => {
            Value::from(i)
        }
        RawBsonRef::Int64(i) => Value::String(i.to_string()),
        RawBsonRef::Decimal128(d) => Value::String(d.to_string()),
        RawBsonRef::Binary(b) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b.bytes))
        }
        RawBsonRef::Timestamp(ts) => serde_json::json!({ "t": ts.time, "i": ts.increment }),
        RawBsonRef::RegularExpression(re) => {
            serde_json::json!({ "pattern": re.pattern, "options": re.options })
        }
        RawBsonRef::JavaScriptCodeWithScope(c) => {
            serde_json::json!({ "code": c.code, "scope": document_to_json(c.scope)? })
        }
        RawBsonRef::MinKey => serde_json::json!({ "$minKey": 1 }),
        RawBsonRef::MaxKey => serde_json::json!({ "$maxKey": 1 }),
        RawBsonRef::DbPointer(_) => Bson::try_from(value)
            .map(Bson::into_relaxed_extjson)
            .map_err(|e| TransformError(format!("malformed DBPointer: {e}")))?,
    })
}

/// Converts a whole document to a JSON object.
pub fn document_to_json(doc: &RawDocument) -> Result<Value, TransformError> {
    let mut map = Map::new();
    for element in doc {
        let (key, value) =
            element.map_err(|e| TransformError(format!("malformed BSON document: {e}")))?;
        map.insert(key.to_owned(), to_json(value)?);
    }
    Ok(Value::Object(map))
}

fn rfc3339_millis(ms: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
}

/// The text a source id is stored as: ObjectId as hex, strings as they are, integers in
/// decimal. Anything else (documents, arrays, floats, null) is not an id.
pub fn source_id(value: RawBsonRef<'_>) -> Result<String, TransformError> {
    match value {
        RawBsonRef::ObjectId(oid) => Ok(oid.to_hex()),
        RawBsonRef::String(s) if !s.is_empty() => Ok(s.to_owned()),
        RawBsonRef::Int32(i) => Ok(i.to_string()),
        RawBsonRef::Int64(i) => Ok(i.to_string()),
        RawBsonRef::Binary(b) => Ok(base64::engine::general_purpose::STANDARD.encode(b.bytes)),
        other => Err(TransformError(format!(
            "source id must be an ObjectId, a non-empty string, an integer or binary, found {:?}",
            other.element_type()
        ))),
    }
}

/// A reading's time: a BSON DateTime, an RFC 3339 string, or epoch milliseconds.
pub fn occurred_at(value: RawBsonRef<'_>) -> Result<Option<DateTime<Utc>>, TransformError> {
    match value {
        RawBsonRef::Null | RawBsonRef::Undefined => Ok(None),
        RawBsonRef::DateTime(dt) => DateTime::<Utc>::from_timestamp_millis(dt.timestamp_millis())
            .map(Some)
            .ok_or_else(|| TransformError(format!("date {dt} is out of range"))),
        RawBsonRef::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| TransformError(format!("{s:?} is not an RFC 3339 time"))),
        RawBsonRef::Int64(ms) => DateTime::<Utc>::from_timestamp_millis(ms)
            .map(Some)
            .ok_or_else(|| TransformError(format!("{ms} ms since the epoch is out of range"))),
        RawBsonRef::Int32(ms) => Ok(DateTime::<Utc>::from_timestamp_millis(i64::from(ms))),
        other => Err(TransformError(format!(
            "a time must be a date, an RFC 3339 string or epoch milliseconds, found {:?}",
            other.element_type()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;
    use mongodb::bson::spec::BinarySubtype;
    use mongodb::bson::{
        Binary, DateTime as BsonDateTime, Decimal128, JavaScriptCodeWithScope, RawDocumentBuf,
        Regex, Timestamp, doc,
    };
    use serde_json::json;

    /// Converts `value` as it would be read from a stored document.
    fn convert(value: Bson) -> Result<Value, TransformError> {
        let raw = RawDocumentBuf::from_document(&doc! { "v": value }).unwrap();
        to_json(raw.get("v").unwrap().unwrap())
    }

    #[test]
    fn doubles_are_numbers_and_non_finite_ones_strings() {
        assert_eq!(convert(Bson::Double(21.5)).unwrap(), json!(21.5));
        assert_eq!(convert(Bson::Double(f64::NAN)).unwrap(), json!("NaN"));
        assert_eq!(
            convert(Bson::Double(f64::INFINITY)).unwrap(),
            json!("Infinity")
        );
        assert_eq!(
            convert(Bson::Double(f64::NEG_INFINITY)).unwrap(),
            json!("-Infinity")
        );
    }

    #[test]
    fn strings_symbols_and_code_are_strings() {
        assert_eq!(
            convert(Bson::String("héllo ✓".into())).unwrap(),
            json!("héllo ✓")
        );
        assert_eq!(convert(Bson::Symbol("sym".into())).unwrap(), json!("sym"));
        assert_eq!(
            convert(Bson::JavaScriptCode("function() {}".into())).unwrap(),
            json!("function() {}")
        );
    }

    #[test]
    fn documents_and_arrays_nest_and_keep_their_keys() {
        let v = Bson::Document(doc! {
            "a.b": 1,
            "list": [1, "two", { "three": [3.5] }],
            "deep": { "x": { "y": { "z": true } } },
        });
        assert_eq!(
            convert(v).unwrap(),
            json!({"a.b": 1, "list": [1, "two", {"three": [3.5]}], "deep": {"x": {"y": {"z": true}}}})
        );
    }

    #[test]
    fn booleans_null_and_undefined() {
        assert_eq!(convert(Bson::Boolean(false)).unwrap(), json!(false));
        assert_eq!(convert(Bson::Null).unwrap(), Value::Null);
        assert_eq!(convert(Bson::Undefined).unwrap(), Value::Null);
    }

    #[test]
    fn object_ids_are_hex() {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        assert_eq!(
            convert(Bson::ObjectId(oid)).unwrap(),
            json!("65a1b2c3d4e5f60718293a4b")
        );
    }

    #[test]
    fn dates_are_rfc3339_utc_with_milliseconds() {
        let dt = BsonDateTime::from_millis(1_767_323_045_678); // 2026-01-02T03:04:05.678Z
        assert_eq!(
            convert(Bson::DateTime(dt)).unwrap(),
            json!("2026-01-02T03:04:05.678Z")
        );
        let whole = BsonDateTime::from_millis(1_767_323_045_000);
        assert_eq!(
            convert(Bson::DateTime(whole)).unwrap(),
            json!("2026-01-02T03:04:05.000Z")
        );
        let before_epoch = BsonDateTime::from_millis(-1);
        assert_eq!(
            convert(Bson::DateTime(before_epoch)).unwrap(),
            json!("1969-12-31T23:59:59.999Z")
        );
        let far = BsonDateTime::from_millis(i64::MAX);
        assert_eq!(
            convert(Bson::DateTime(far)).unwrap(),
            json!({"$date": {"$numberLong": i64::MAX.to_string()}})
        );
    }

    #[test]
    fn int32_and_safe_int64_are_numbers_larger_int64_strings() {
        assert_eq!(convert(Bson::Int32(-7)).unwrap(), json!(-7));
        assert_eq!(convert(Bson::Int64(1 << 40)).unwrap(), json!(1_i64 << 40));
        assert_eq!(
            convert(Bson::Int64(9_007_199_254_740_991)).unwrap(),
            json!(9_007_199_254_740_991_i64)
        );
        assert_eq!(
            convert(Bson::Int64(9_007_199_254_740_993)).unwrap(),
            json!("9007199254740993")
        );
        assert_eq!(
            convert(Bson::Int64(i64::MIN)).unwrap(),
            json!(i64::MIN.to_string())
        );
    }

    #[test]
    fn decimal128_keeps_its_exact_digits() {
        let d: Decimal128 = "1234.5678".parse().unwrap();
        assert_eq!(convert(Bson::Decimal128(d)).unwrap(), json!("1234.5678"));
        let tiny: Decimal128 = "0.000000000000000000000000000001".parse().unwrap();
        assert_eq!(convert(Bson::Decimal128(tiny)).unwrap(), json!("1E-30"));
    }

    #[test]
    fn binary_is_base64_for_every_subtype() {
        for subtype in [
            BinarySubtype::Generic,
            BinarySubtype::Uuid,
            BinarySubtype::UserDefined(0x80),
        ] {
            let b = Binary {
                subtype,
                bytes: vec![0, 1, 2, 250, 251, 252],
            };
            assert_eq!(convert(Bson::Binary(b)).unwrap(), json!("AAEC+vv8"));
        }
    }

    #[test]
    fn timestamps_regexes_and_code_with_scope_are_small_objects() {
        assert_eq!(
            convert(Bson::Timestamp(Timestamp {
                time: 1_700_000_000,
                increment: 7
            }))
            .unwrap(),
            json!({"t": 1_700_000_000u32, "i": 7})
        );
        assert_eq!(
            convert(Bson::RegularExpression(Regex {
                pattern: "^a.*z$".into(),
                options: "im".into(),
            }))
            .unwrap(),
            json!({"pattern": "^a.*z$", "options": "im"})
        );
        assert_eq!(
            convert(Bson::JavaScriptCodeWithScope(JavaScriptCodeWithScope {
                code: "x + 1".into(),
                scope: doc! { "x": 41 },
            }))
            .unwrap(),
            json!({"code": "x + 1", "scope": {"x": 41}})
        );
    }

    #[test]
    fn min_max_keys_and_db_pointers_use_extended_json() {
        assert_eq!(convert(Bson::MinKey).unwrap(), json!({"$minKey": 1}));
        assert_eq!(convert(Bson::MaxKey).unwrap(), json!({"$maxKey": 1}));
        // bson keeps DbPointer's fields private; build one from its wire form.
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let mut bytes = Vec::new();
        let ns = b"db.coll\0";
        let mut element = vec![0x0Cu8];
        element.extend_from_slice(b"v\0");
        element.extend_from_slice(&(ns.len() as i32).to_le_bytes());
        element.extend_from_slice(ns);
        element.extend_from_slice(&oid.bytes());
        bytes.extend_from_slice(&((4 + element.len() + 1) as i32).to_le_bytes());
        bytes.extend_from_slice(&element);
        bytes.push(0);
        let raw = RawDocumentBuf::from_bytes(bytes).unwrap();
        assert_eq!(
            to_json(raw.get("v").unwrap().unwrap()).unwrap(),
            json!({"$dbPointer": {"$ref": "db.coll", "$id": {"$oid": "65a1b2c3d4e5f60718293a4b"}}})
        );
    }

    #[test]
    fn a_malformed_nested_document_is_an_error_not_a_panic() {
        // A well-framed document whose embedded document claims 200 bytes but has 5.
        let bytes: Vec<u8> = vec![
            13, 0, 0, 0, // total length
            0x03, b'd', 0, // embedded document "d"
            200, 0, 0, 0, 0, // its (false) length and terminator
            0, // outer terminator
        ];
        let doc = RawDocumentBuf::from_bytes(bytes).expect("the outer framing is valid");
        let err = document_to_json(&doc).unwrap_err();
        assert!(err.0.starts_with("malformed BSON"), "{err}");
    }

    #[test]
    fn source_ids_accept_ids_and_refuse_structures() {
        let raw = RawDocumentBuf::from_document(&doc! {
            "oid": ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap(),
            "s": "reading-1", "i": 42, "l": 42_i64 << 40, "empty": "",
            "d": { "a": 1 }, "f": 1.5, "n": Bson::Null,
        })
        .unwrap();
        let get = |k: &str| source_id(raw.get(k).unwrap().unwrap());
        assert_eq!(get("oid").unwrap(), "65a1b2c3d4e5f60718293a4b");
        assert_eq!(get("s").unwrap(), "reading-1");
        assert_eq!(get("i").unwrap(), "42");
        assert_eq!(get("l").unwrap(), (42_i64 << 40).to_string());
        for bad in ["empty", "d", "f", "n"] {
            assert!(get(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn occurred_at_reads_dates_strings_and_epoch_millis() {
        let raw = RawDocumentBuf::from_document(&doc! {
            "date": BsonDateTime::from_millis(1_767_323_045_678),
            "text": "2026-01-02T04:04:05.678+01:00",
            "ms": 1_767_323_045_678_i64,
            "null": Bson::Null,
            "bad": "yesterday",
            "float": 1.5,
        })
        .unwrap();
        let want = DateTime::<Utc>::from_timestamp_millis(1_767_323_045_678);
        let get = |k: &str| occurred_at(raw.get(k).unwrap().unwrap());
        assert_eq!(get("date").unwrap(), want);
        assert_eq!(get("text").unwrap(), want);
        assert_eq!(get("ms").unwrap(), want);
        assert_eq!(get("null").unwrap(), None);
        assert!(get("bad").unwrap_err().0.contains("RFC 3339"));
        assert!(get("float").is_err());
    }
}
