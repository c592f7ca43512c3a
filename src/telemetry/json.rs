//! Log events as flat JSON objects: `ts`, `level`, `target`, `message`, the event's
//! fields, then the fields of every span it happened in (outermost first), so a line
//! inside a run carries `job`, `run_id`, `attempt` and `trigger` at the top level.
//! The same object is written to stdout and shipped to Loki.

use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use super::loki::LokiSink;
use super::writer::LineWriter;

/// A span's fields, kept in its extensions by [`SpanFields`].
pub struct Fields(pub Map<String, Value>);

/// Records every span's fields as JSON when the span is created or recorded into.
pub struct SpanFields;

impl<S> Layer<S> for SpanFields
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut map = Map::new();
            attrs.record(&mut JsonVisitor(&mut map));
            span.extensions_mut().insert(Fields(map));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(&mut JsonVisitor(&mut fields.0));
        }
    }
}

/// One event as a JSON object, and the `job` it belongs to (for Loki's label).
pub fn event_object<S>(
    event: &Event<'_>,
    ctx: &Context<'_, S>,
    at: DateTime<Utc>,
) -> (Map<String, Value>, Option<String>)
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let meta = event.metadata();
    let mut out = Map::new();
    out.insert(
        "ts".into(),
        Value::String(at.to_rfc3339_opts(SecondsFormat::Micros, true)),
    );
    out.insert(
        "level".into(),
        Value::String(meta.level().as_str().to_ascii_lowercase()),
    );
    out.insert("target".into(), Value::String(meta.target().to_owned()));
    let mut fields = Map::new();
    event.record(&mut JsonVisitor(&mut fields));
    out.insert(
        "message".into(),
        fields
            .remove("message")
            .unwrap_or(Value::String(String::new())),
    );
    let mut job = None;
    if let Some(scope) = ctx.event_scope(event) {
        for span in scope.from_root() {
            if let Some(f) = span.extensions().get::<Fields>() {
                for (k, v) in &f.0 {
                    if k == "job"
                        && let Value::String(name) = v
                    {
                        job = Some(name.clone());
                    }
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    // The event's own fields win over its spans'.
    out.extend(fields);
    (out, job)
}

/// Formats each event once, as a JSON line, and hands it to its outputs: the queue of
/// stdout or stderr (JSON log format), and Loki. Neither ever waits for its reader.
pub struct EventSink {
    pub stdout: Option<LineWriter>,
    pub loki: Option<LokiSink>,
}

impl<S> Layer<S> for EventSink
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let at = SystemTime::now();
        let (object, job) = event_object(event, &ctx, at.into());
        // Every line leaves vigil through here: no secret in it.
        let line = crate::config::redact(&Value::Object(object).to_string()).into_owned();
        if let Some(loki) = &self.loki {
            loki.send(event.metadata().level(), job.as_deref(), at, &line);
        }
        if let Some(out) = &self.stdout {
            let mut bytes = line.into_bytes();
            bytes.push(b'\n');
            out.push(bytes);
        }
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(
            field.name().into(),
            serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number),
        );
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.to_owned()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}
