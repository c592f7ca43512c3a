//! Invoking jobs like functions: a run's input (the request body, checked by the job
//! kind's input schema), `Idempotency-Key`, `Callback-Url`, the run's output; pausing
//! and resuming jobs. Every run still starts through the scheduler.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::Digest as _;
use uuid::Uuid;
use warp::http::{HeaderMap, StatusCode, header};

use super::error::ApiError;
use super::params::Params;
use super::routes::{
    DEFAULT_TRIGGER_WAIT_S, MAX_WAIT_S, accepted, finish_or_accept, flush_ledger, known_job,
    run_view, seconds, trigger_error, waiting_permit,
};
use super::{Reply, Request, State};
use crate::scheduler::Invocation;
use crate::store::invoke::KeyClaim;

/// The header naming a client's retry-safe key (Stripe's name).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header naming where the finished run is POSTed (OpenFaaS's `X-Callback-Url`,
/// without the `X-`).
pub const CALLBACK_URL: &str = "callback-url";
/// Longest idempotency key: room for a UUID or a client's own composite key.
const MAX_KEY_LEN: usize = 255;

/// `POST /api/jobs/{name}/runs`: starts a run with the body as its input.
pub async fn start_run(state: &State, req: Request, params: &Params) -> Result<Reply, ApiError> {
    let name = req.captures[0].clone();
    let wait = params.bool("wait")?;
    let timeout = seconds(
        params
            .int("timeout", 0, MAX_WAIT_S)?
            .unwrap_or(DEFAULT_TRIGGER_WAIT_S),
    );
    let force = params.bool("force")?;
    let job = known_job(state, &name)?;
    let key = idempotency_key(&req.headers)?;
    let callback = callback_url(state, &req.headers)?;
    let input = read_input(state, &req.headers, req.body).await?;
    if let Some(v) = &input {
        state.invoke.kinds.check_input(&job.kind, v).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                format!("input for job {name:?} (kind {}): {e}", job.kind),
            )
            .with(json!({ "field": e.field }))
        })?;
    }
    // Taken before the run starts: a refused request starts nothing.
    let _waiting = wait.then(|| waiting_permit(state)).transpose()?;

    let run_id = Uuid::now_v7();
    if let Some(key) = &key {
        match state
            .store
            .claim_idempotency_key(&name, key, &input_hash(input.as_ref()), run_id)
            .await?
        {
            KeyClaim::New => {}
            KeyClaim::Replay(first) => return replay(state, first).await,
            KeyClaim::Conflict(first) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    format!(
                        "Idempotency-Key {key:?} started run {first} of job {name:?} with a \
                         different input; use a new key for a new input"
                    ),
                )
                .with(json!({ "run_id": first })));
            }
        }
    }
    let release = |state: State, name: String, key: Option<String>| async move {
        if let Some(key) = key
            && let Err(e) = state
                .store
                .release_idempotency_key(&name, &key, run_id)
                .await
        {
            tracing::warn!(job = %name, %run_id, error = %e, "cannot release an idempotency key");
        }
    };
    if let (Some(url), Some(callbacks)) = (&callback, &state.invoke.callbacks)
        && let Err(e) = callbacks.register(run_id, &name, url).await
    {
        release(state.clone(), name.clone(), key.clone()).await;
        return Err(e.into());
    }
    let invocation = Invocation {
        input: input.map(Arc::new),
        run_id: Some(run_id),
        force,
    };
    let handle = match state.scheduler.invoke(&name, invocation).await {
        Ok(handle) => handle,
        Err(e) => {
            if let (Some(_), Some(callbacks)) = (&callback, &state.invoke.callbacks) {
                callbacks.forget(run_id).await;
            }
            release(state.clone(), name.clone(), key.clone()).await;
            return Err(trigger_error(e));
        }
    };
    if wait {
        finish_or_accept(state, handle, timeout).await
    } else {
        Ok(accepted(handle.run_id))
    }
}

/// The run a key started before: 200 with its current state (the last attempt's).
async fn replay(state: &State, run_id: Uuid) -> Result<Reply, ApiError> {
    flush_ledger(state).await;
    let last = state.store.latest_attempt(run_id).await?;
    let location = format!("/api/runs/{run_id}");
    Ok(Reply::json(
        StatusCode::OK,
        json!({
            "run_id": run_id,
            "replayed": true,
            // Not in the ledger yet: the run is starting on the replica that took the key.
            "status": last.as_ref().map_or(json!("running"), |r| json!(r.status)),
            "run": last.as_ref().map(run_view),
            "location": location,
        }),
    )
    .header(header::LOCATION, location))
}

/// The body as the run's input: `None` when there is none (or it is JSON `null`).
async fn read_input(
    state: &State,
    headers: &HeaderMap,
    body: super::Body,
) -> Result<Option<Value>, ApiError> {
    let limit = state.invoke.max_input_bytes;
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > limit as u64
    {
        return Err(too_large(limit));
    }
    let bytes = body.read(limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !is_json(content_type) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "a run's input is JSON: send it with Content-Type: application/json (got {})",
                if content_type.is_empty() {
                    "no Content-Type".to_owned()
                } else {
                    format!("{content_type:?}")
                }
            ),
        ));
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!("the body is not JSON: {e}"))
            .with(json!({ "line": e.line(), "column": e.column() }))
    })?;
    Ok((!value.is_null()).then_some(value))
}

pub(super) fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body is larger than {limit} bytes (VIGIL_MAX_INPUT_BYTES)"),
    )
}

/// `application/json`, `application/<x>+json`, with or without parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// Same key, same input: the hash is over the input's canonical text (object keys
/// sorted at every level), so `{"a":1,"b":2}` and `{"b":2,"a":1}` are one input.
fn input_hash(input: Option<&Value>) -> String {
    let mut text = String::new();
    match input {
        Some(v) => canonical(v, &mut text),
        None => text.push_str("null"),
    }
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = v.to_str().unwrap_or("");
    let printable = key.bytes().all(|b| b.is_ascii_graphic());
    if key.is_empty() || key.len() > MAX_KEY_LEN || !printable {
        return Err(ApiError::bad_request(format!(
            "`Idempotency-Key` must be 1 to {MAX_KEY_LEN} printable ASCII characters without \
             spaces (a UUID, say)"
        )));
    }
    Ok(Some(key.to_owned()))
}

fn callback_url(state: &State, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(CALLBACK_URL) else {
        return Ok(None);
    };
    use crate::alerts::callbacks::{CallbackRefused, check_url};
    let url = v.to_str().unwrap_or("").trim();
    // Not a URL is the client's mistake (400); a host vigil may not call is policy (403).
    let refused = |e: CallbackRefused| match e {
        CallbackRefused::NotAUrl => ApiError::bad_request(format!("`Callback-Url`: {e}")),
        _ => ApiError::new(
            StatusCode::FORBIDDEN,
            "callback_refused",
            format!("Callback-Url: {e}"),
        ),
    };
    let allow: &[String] = match &state.invoke.callbacks {
        Some(_) => &state.invoke.callback_allow,
        None => &[],
    };
    check_url(url, allow).map_err(refused)?;
    Ok(Some(url.to_owned()))
}

/// `GET /api/runs/{id}/output`: what the run produced, as JSON when it is JSON.
pub async fn output(state: &State, raw_id: &str) -> Result<Reply, ApiError> {
    let id: Uuid = raw_id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("run id must be a UUID, got {raw_id:?}")))?;
    flush_ledger(state).await;
    let Some(output) = state.store.run_output(id).await? else {
        return Err(match state.store.run(id).await? {
            None => ApiError::not_found(format!("no run {id}")),
            Some(_) => ApiError::not_found(format!(
                "run {id} has no output: it has not finished, or its job keeps none (only \
                 `command` jobs do)"
            )),
        });
    };
    let json_text = (!output.truncated)
        .then(|| std::str::from_utf8(&output.bytes).ok())
        .flatten()
        .filter(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
    let (text, content_type) = match json_text {
        Some(text) => (text.to_owned(), "application/json"),
        None => (
            String::from_utf8_lossy(&output.bytes).into_owned(),
            "text/plain; charset=utf-8",
        ),
    };
    Ok(Reply {
        status: StatusCode::OK,
        json: Value::Null,
        text: Some((text, content_type)),
        headers: Vec::new(),
    }
    .header(
        header::HeaderName::from_static("x-vigil-output-truncated"),
        output.truncated.to_string(),
    )
    .header(
        header::HeaderName::from_static("x-vigil-output-bytes"),
        output.total_bytes.to_string(),
    ))
}

/// `POST /api/jobs/{name}/pause[?until=…]`: every replica skips the job's firings
/// until then (or until resumed).
pub async fn pause(state: &State, name: &str, params: &Params) -> Result<Reply, ApiError> {
    known_job(state, name)?;
    let now = Utc::now();
    let until = match params.string("until") {
        None => None,
        Some(text) => Some(parse_until(text, now)?),
    };
    state
        .store
        .pause_job(name, until, state.scheduler.host())
        .await?;
    refresh_pauses(state).await;
    let paused = until.is_none_or(|u| u > now);
    tracing::info!(job = name, until = ?until, paused, "job paused");
    Ok(Reply::json(
        StatusCode::OK,
        json!({ "job": name, "paused": paused, "paused_until": until }),
    ))
}

/// `POST /api/jobs/{name}/resume`.
pub async fn resume(state: &State, name: &str) -> Result<Reply, ApiError> {
    known_job(state, name)?;
    let was_paused = state.store.resume_job(name).await?;
    refresh_pauses(state).await;
    tracing::info!(job = name, was_paused, "job resumed");
    Ok(Reply::json(
        StatusCode::OK,
        json!({ "job": name, "paused": false, "was_paused": was_paused }),
    ))
}

/// This replica obeys at once; the others within their next look (a second).
async fn refresh_pauses(state: &State) {
    match state.store.pauses().await {
        Ok(pauses) => state.scheduler.set_pauses(pauses),
        Err(e) => tracing::warn!(error = %e, "cannot re-read the paused jobs"),
    }
}

/// `until`: an RFC 3339 time, or a duration from now: 1 to 9999 of one unit, `s`, `m`,
/// `h` or `d` (`30m`, `2h`), as the API description's pattern says. A time already
/// past is a pause that has ended (the job is not paused).
fn parse_until(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
    let duration = || {
        let unit = text.chars().last()?;
        let seconds = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        let digits = &text[..text.len() - 1];
        let ok = (1..=4).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        let n: i64 = digits.parse().ok().filter(|_| ok)?;
        now.checked_add_signed(chrono::Duration::seconds(n * seconds))
    };
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(duration)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "`until` must be an RFC 3339 time like 2026-01-31T12:00:00Z or a duration from \
                 now like 30m, 2h or 7d (1 to 9999 seconds, minutes, hours or days), got {text:?}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types_are_recognised_with_parameters_and_suffixes() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.api+json",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for no in [
            "",
            "text/plain",
            "application/x-www-form-urlencoded",
            "json",
        ] {
            assert!(!is_json(no), "{no}");
        }
    }

    #[test]
    fn the_input_hash_ignores_key_order_and_tells_inputs_apart() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": [1, 2]}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a": [1, 2], "b": 1}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"a": [2, 1], "b": 1}"#).unwrap();
        let nested_a: Value = serde_json::from_str(r#"{"x": {"q": 1, "p": 2}}"#).unwrap();
        let nested_b: Value = serde_json::from_str(r#"{"x": {"p": 2, "q": 1}}"#).unwrap();
        assert_eq!(input_hash(Some(&a)), input_hash(Some(&b)));
        assert_eq!(input_hash(Some(&nested_a)), input_hash(Some(&nested_b)));
        assert_ne!(input_hash(Some(&a)), input_hash(Some(&c)));
        assert_ne!(input_hash(None), input_hash(Some(&a)));
    }

    #[test]
    fn until_takes_a_time_or_a_duration_in_the_future() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_until("30m", now).unwrap().to_rfc3339(),
            "2026-12-01T10:30:00+00:00"
        );
        assert_eq!(
            parse_until("2026-12-02T00:00:00+01:00", now)
                .unwrap()
                .to_rfc3339(),
            "2026-12-01T23:00:00+00:00"
        );
        // Already past: valid, and a pause that has ended.
        assert!(parse_until("2026-12-01T09:00:00Z", now).unwrap() < now);
        assert_eq!(
            parse_until("7d", now).unwrap().to_rfc3339(),
            "2026-12-08T10:00:00+00:00"
        );
        for bad in [
            "tomorrow", "", "0", "0s", "030m", "10000h", "1h30m", "5 m", "2w",
        ] {
            assert!(parse_until(bad, now).is_err(), "{bad:?}");
        }
    }
}
