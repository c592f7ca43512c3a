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
//!
//! Every special form reads back exactly with PostgreSQL's cast for its type
//! (`'NaN'::float8`, `'9007199254740993'::bigint`, `'1234.5678'::numeric`,
//! `'2026-01-02T03:04:05.678Z'::timestamptz`), so nothing is lost on the way.
//!
//! What PostgreSQL cannot hold is refused here, with the field's path in the reason,
//! rather than left to fail a whole batch in the database:
//! - a string (value, symbol, code, DBPointer namespace) containing U+0000: `jsonb` and
//!   `text` cannot store it;
//! - nesting deeper than [`MAX_DEPTH`] (MongoDB's own limit);
//! - a key that appears twice in one document (JSON objects keep one value per key);
//! - malformed BSON (a length or a UTF-8 sequence that does not add up).
//!
//! Keys that are empty or start with `$` are kept as written: `jsonb` stores them. (A
//! key cannot contain U+0000 in BSON: keys are C strings.)

use base64::Engine as _;
use chrono::{DateTime, Utc};
use mongodb::bson::{Bson, RawBsonRef, RawDocument};
use serde_json::{Map, Number, Value};

use crate::store::pg_text;

/// Integers beyond this lose precision in JavaScript and many JSON readers.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Deepest nesting accepted, counting the top-level document as level 1 and each
/// document or array inside as one more: MongoDB's own limit, far inside what
/// PostgreSQL's `jsonb` and vigil's stack handle.
pub const MAX_DEPTH: usize = 100;

/// The earliest instant PostgreSQL's `timestamptz` holds: 4714-11-24 00:00 UTC BC, in
/// milliseconds since the Unix epoch. The latest (294276 AD) is beyond chrono's range,
/// so chrono's own bound applies there.
pub const PG_MIN_TIMESTAMP_MS: i64 = -210_866_803_200_000;

/// Why a document cannot be loaded; the message goes to `sync_error` and `sync_rejects`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TransformError(pub String);

/// Where in a document a problem is, built up while the error unwinds.
#[derive(Debug)]
struct Fault {
    /// Innermost first.
    path: Vec<Seg>,
    reason: String,
}

#[derive(Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Fault {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            path: Vec::new(),
            reason: reason.into(),
        }
    }

    fn at(mut self, seg: Seg) -> Self {
        self.path.push(seg);
        self
    }
}

impl From<Fault> for TransformError {
    fn from(f: Fault) -> Self {
        if f.path.is_empty() {
            return TransformError(f.reason);
        }
        let mut path = String::new();
        for seg in f.path.iter().rev() {
            match seg {
                Seg::Key(k) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&pg_text(k));
                }
                Seg::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        TransformError(format!("{} at `{path}`", f.reason))
    }
}

fn storable(s: &str, what: &str) -> Result<(), Fault> {
    if s.contains('\0') {
        Err(Fault::new(format!(
            "{what} contains the character U+0000, which PostgreSQL cannot store"
        )))
    } else {
        Ok(())
    }
}

/// Converts one BSON value.
pub fn to_json(value: RawBsonRef<'_>) -> Result<Value, TransformError> {
    convert(value, 0).map_err(TransformError::from)
}

/// Converts a whole document to a JSON object.
pub fn document_to_json(doc: &RawDocument) -> Result<Value, TransformError> {
    convert_document(doc, 0).map_err(TransformError::from)
}

fn convert(value: RawBsonRef<'_>, depth: usize) -> Result<Value, Fault> {
    Ok(match value {
        RawBsonRef::Double(f) => match Number::from_f64(f) {
            Some(n) => Value::Number(n),
            None if f.is_nan() => Value::String("NaN".into()),
            None if f > 0.0 => Value::String("Infinity".into()),
            None => Value::String("-Infinity".into()),
        },
        RawBsonRef::String(s) | RawBsonRef::Symbol(s) | RawBsonRef::JavaScriptCode(s) => {
            storable(s, "string")?;
            Value::String(s.to_owned())
        }
        RawBsonRef::Document(d) => convert_document(d, depth + 1)?,
        RawBsonRef::Array(a) => {
            // Its level is `depth + 2` (the top-level document is level 1).
            if depth + 1 >= MAX_DEPTH {
                return Err(too_deep());
            }
            let mut out = Vec::new();
            for (i, item) in a.into_iter().enumerate() {
                let item = item.map_err(|e| {
                    Fault::new(format!("malformed BSON array: {e}")).at(Seg::Index(i))
                })?;
                out.push(convert(item, depth + 1).map_err(|f| f.at(Seg::Index(i)))?);
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
            storable(c.code, "code").map_err(|f| f.at(Seg::Key("code".into())))?;
            let scope =
                convert_document(c.scope, depth + 1).map_err(|f| f.at(Seg::Key("scope".into())))?;
            serde_json::json!({ "code": c.code, "scope": scope })
        }
        RawBsonRef::MinKey => serde_json::json!({ "$minKey": 1 }),
        RawBsonRef::MaxKey => serde_json::json!({ "$maxKey": 1 }),
        RawBsonRef::DbPointer(_) => {
            let v = Bson::try_from(value)
                .map(Bson::into_relaxed_extjson)
                .map_err(|e| Fault::new(format!("malformed DBPointer: {e}")))?;
            let namespace = v
                .pointer("/$dbPointer/$ref")
                .and_then(Value::as_str)
                .unwrap_or("");
            if namespace.contains('\0') {
                return Err(Fault::new(
                    "DBPointer namespace contains the character U+0000, which PostgreSQL cannot store",
                ));
            }
            v
        }
    })
}

fn too_deep() -> Fault {
    Fault::new(format!(
        "nested deeper than {MAX_DEPTH} levels (MongoDB's own limit)"
    ))
}

fn convert_document(doc: &RawDocument, depth: usize) -> Result<Value, Fault> {
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    let mut map = Map::new();
    for element in doc {
        let (key, value) =
            element.map_err(|e| Fault::new(format!("malformed BSON document: {e}")))?;
        storable(key, "key").map_err(|f| f.at(Seg::Key(key.to_owned())))?;
        let v = convert(value, depth).map_err(|f| f.at(Seg::Key(key.to_owned())))?;
        if map.insert(key.to_owned(), v).is_some() {
            return Err(Fault::new(
                "key appears twice in one document; JSON keeps one value per key",
            )
            .at(Seg::Key(key.to_owned())));
        }
    }
    Ok(Value::Object(map))
}

/// A best-effort JSON view of any document for `sync_rejects.document`, never failing:
/// U+0000 becomes U+FFFD, a repeated key gets a `#2` suffix, nesting past
/// [`MAX_DEPTH`] and malformed parts become a note in a string. At most about `budget`
/// bytes of JSON are produced: longer strings are cut and the rest of the document is
/// left out with a note, so an oversize document is never copied whole. The exact
/// original is kept beside it as BSON.
pub fn lossy_document_json(doc: &RawDocument, budget: usize) -> Value {
    let mut left = budget;
    lossy_document(doc, 0, &mut left)
}

/// Marks where a lossy view stops early.
const CUT: &str = "…";

fn lossy_text(s: &str, left: &mut usize) -> String {
    let mut end = s.len().min(*left);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    *left -= end;
    let mut out = s[..end].replace('\0', "\u{FFFD}");
    if end < s.len() {
        out.push_str(CUT);
    }
    out
}

fn lossy_document(doc: &RawDocument, depth: usize, left: &mut usize) -> Value {
    if depth >= MAX_DEPTH {
        return Value::String(format!("(nested deeper than {MAX_DEPTH} levels)"));
    }
    let mut map = Map::new();
    for element in doc {
        if *left == 0 {
            map.insert(CUT.into(), Value::String("(the rest is left out)".into()));
            break;
        }
        match element {
            Ok((key, value)) => {
                let mut key = key.replace('\0', "\u{FFFD}");
                *left = left.saturating_sub(key.len() + 4);
                let v = lossy(value, depth, left);
                let base = key.clone();
                let mut n = 2;
                while map.contains_key(&key) {
                    key = format!("{base}#{n}");
                    n += 1;
                }
                map.insert(key, v);
            }
            Err(e) => {
                map.insert(
                    "(malformed)".into(),
                    Value::String(e.to_string().replace('\0', "\u{FFFD}")),
                );
                break;
            }
        }
    }
    Value::Object(map)
}

fn lossy(value: RawBsonRef<'_>, depth: usize, left: &mut usize) -> Value {
    match value {
        RawBsonRef::String(s) | RawBsonRef::Symbol(s) | RawBsonRef::JavaScriptCode(s) => {
            Value::String(lossy_text(s, left))
        }
        RawBsonRef::Document(d) => lossy_document(d, depth + 1, left),
        RawBsonRef::Array(a) => {
            if depth + 1 >= MAX_DEPTH {
                return Value::String(format!("(nested deeper than {MAX_DEPTH} levels)"));
            }
            let mut out = Vec::new();
            for item in a {
                if *left == 0 {
                    out.push(Value::String(CUT.into()));
                    break;
                }
                match item {
                    Ok(v) => out.push(lossy(v, depth + 1, left)),
                    Err(e) => {
                        out.push(Value::String(format!(
                            "(malformed: {})",
                            e.to_string().replace('\0', "\u{FFFD}")
                        )));
                        break;
                    }
                }
            }
            Value::Array(out)
        }
        RawBsonRef::JavaScriptCodeWithScope(c) => serde_json::json!({
            "code": lossy_text(c.code, left),
            "scope": lossy_document(c.scope, depth + 1, left),
        }),
        RawBsonRef::Binary(b) => {
            let keep = b.bytes.len().min(*left / 4 * 3);
            *left -= keep.div_ceil(3) * 4;
            let mut text = base64::engine::general_purpose::STANDARD.encode(&b.bytes[..keep]);
            if keep < b.bytes.len() {
                text.push_str(CUT);
            }
            Value::String(text)
        }
        other => {
            let v = convert(other, depth).unwrap_or_else(|f| Value::String(f.reason));
            *left = left.saturating_sub(32);
            v
        }
    }
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
        RawBsonRef::String(s) if s.contains('\0') => Err(TransformError(
            "source id contains the character U+0000, which PostgreSQL cannot store".into(),
        )),
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

/// An instant PostgreSQL's `timestamptz` can hold.
fn pg_instant(ms: i64) -> Result<DateTime<Utc>, TransformError> {
    match DateTime::<Utc>::from_timestamp_millis(ms) {
        Some(t) if ms >= PG_MIN_TIMESTAMP_MS => Ok(t),
        _ => Err(TransformError(format!(
            "{ms} ms since the epoch is outside PostgreSQL's timestamp range (4713 BC to 294276 AD)"
        ))),
    }
}

/// A reading's time: a BSON DateTime, an RFC 3339 string, or epoch milliseconds.
pub fn occurred_at(value: RawBsonRef<'_>) -> Result<Option<DateTime<Utc>>, TransformError> {
    match value {
        RawBsonRef::Null | RawBsonRef::Undefined => Ok(None),
        RawBsonRef::DateTime(dt) => pg_instant(dt.timestamp_millis())
            .map(Some)
            .map_err(|_| TransformError(format!("date {dt} is out of range"))),
        RawBsonRef::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| TransformError(format!("{:?} is not an RFC 3339 time", pg_text(s)))),
        RawBsonRef::Int64(ms) => pg_instant(ms)
            .map(Some)
            .map_err(|_| TransformError(format!("{ms} ms since the epoch is out of range"))),
        RawBsonRef::Int32(ms) => pg_instant(i64::from(ms)).map(Some),
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

    #[test]
    fn a_string_holding_nul_is_refused_naming_its_path() {
        let raw = RawDocumentBuf::from_document(&doc! {
            "ok": "fine",
            "sensor": { "labels": ["a", "b\0c"] },
        })
        .unwrap();
        let err = document_to_json(&raw).unwrap_err();
        assert_eq!(
            err.0,
            "string contains the character U+0000, which PostgreSQL cannot store at `sensor.labels[1]`"
        );
        for v in [
            Bson::Symbol("x\0".into()),
            Bson::JavaScriptCode("\0".into()),
            Bson::JavaScriptCodeWithScope(JavaScriptCodeWithScope {
                code: "a\0".into(),
                scope: doc! {},
            }),
        ] {
            assert!(convert(v).unwrap_err().0.contains("U+0000"));
        }
        let id = RawDocumentBuf::from_document(&doc! { "id": "r\0" }).unwrap();
        assert!(
            source_id(id.get("id").unwrap().unwrap())
                .unwrap_err()
                .0
                .contains("U+0000")
        );
    }

    fn nested(levels: usize) -> RawDocumentBuf {
        let mut d = doc! { "leaf": 1 };
        for _ in 1..levels {
            d = doc! { "n": d };
        }
        RawDocumentBuf::from_document(&d).unwrap()
    }

    #[test]
    fn nesting_is_accepted_to_mongodbs_limit_and_refused_beyond() {
        assert!(document_to_json(&nested(MAX_DEPTH)).is_ok());
        let err = document_to_json(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert!(err.0.starts_with("nested deeper than 100 levels"), "{err}");
        // Arrays count as levels too, and a very deep document never overflows the stack.
        // Built as bytes: bson's own builders recurse and would overflow first.
        let wrap = |element_type: u8, key: &[u8], inner: &[u8]| {
            let mut body = vec![element_type];
            body.extend_from_slice(key);
            body.push(0);
            body.extend_from_slice(inner);
            let mut out = ((4 + body.len() + 1) as i32).to_le_bytes().to_vec();
            out.extend_from_slice(&body);
            out.push(0);
            out
        };
        let mut inner = wrap(0x10, b"0", &1i32.to_le_bytes());
        for _ in 0..10_000 {
            inner = wrap(0x04, b"0", &inner);
        }
        let raw = RawDocumentBuf::from_bytes(wrap(0x04, b"a", &inner)).unwrap();
        assert!(
            document_to_json(&raw)
                .unwrap_err()
                .0
                .contains("nested deeper")
        );
        let lossy = lossy_document_json(&raw, usize::MAX).to_string();
        assert!(lossy.contains("nested deeper than 100 levels"), "{lossy}");
    }

    #[test]
    fn a_key_written_twice_is_refused_and_kept_twice_in_the_lossy_view() {
        let mut raw = RawDocumentBuf::new();
        raw.append("a", 1);
        raw.append("a", 2);
        let err = document_to_json(&raw).unwrap_err();
        assert!(
            err.0.starts_with("key appears twice") && err.0.ends_with("at `a`"),
            "{err}"
        );
        assert_eq!(
            lossy_document_json(&raw, usize::MAX),
            json!({"a": 1, "a#2": 2})
        );
    }

    #[test]
    fn empty_and_dollar_keys_are_kept_as_written() {
        let raw = RawDocumentBuf::from_document(&doc! { "": 1, "$set": { "$x": "y" } }).unwrap();
        assert_eq!(
            document_to_json(&raw).unwrap(),
            json!({"": 1, "$set": {"$x": "y"}})
        );
    }

    #[test]
    fn occurred_at_outside_postgres_range_is_refused() {
        let raw = RawDocumentBuf::from_document(&doc! {
            "earliest": BsonDateTime::from_millis(PG_MIN_TIMESTAMP_MS),
            "too_early": BsonDateTime::from_millis(PG_MIN_TIMESTAMP_MS - 1),
            "far": BsonDateTime::from_millis(i64::MAX),
            "ms_too_early": PG_MIN_TIMESTAMP_MS - 1,
        })
        .unwrap();
        let get = |k: &str| occurred_at(raw.get(k).unwrap().unwrap());
        assert!(get("earliest").unwrap().is_some());
        for k in ["too_early", "far", "ms_too_early"] {
            assert!(get(k).unwrap_err().0.contains("out of range"), "{k}");
        }
    }

    #[test]
    fn the_lossy_view_never_fails_and_stays_within_its_budget() {
        let raw = RawDocumentBuf::from_document(&doc! {
            "nul": "a\0b",
            "big": "x".repeat(100_000),
            "bin": Binary { subtype: BinarySubtype::Generic, bytes: vec![7; 100_000] },
            "after": [1, 2, 3],
        })
        .unwrap();
        let full = lossy_document_json(&raw, usize::MAX);
        assert_eq!(full["nul"], json!("a\u{FFFD}b"));
        let cut = lossy_document_json(&raw, 4096).to_string();
        assert!(cut.len() < 4096 + 200, "{} bytes", cut.len());
        assert!(cut.contains('…'));
    }
}
