//! The route table and its handlers.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;
use warp::http::{Method, StatusCode, header};

use super::error::ApiError;
use super::invoke;
use super::params::Params;
use super::{HandlerFuture, Reply, Request, State};
use crate::scheduler::{JobStatus, RunHandle, RunResult, TriggerError};
use crate::store::RunStatus;
use crate::store::readings::ReadingQuery;
use crate::store::runs::{RunQuery, RunRecord};

/// Who may call a route when `VIGIL_API_TOKEN` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Never needs the token: the welcome and the health probes.
    Open,
    /// `/metrics`: needs the token unless `VIGIL_METRICS_PUBLIC=true`.
    Metrics,
    /// Needs the token unless `VIGIL_API_READS_OPEN=true`.
    Read,
    /// Starts work: always needs the token.
    Work,
}

#[derive(Debug)]
pub struct Route {
    pub method: Method,
    /// Path with `{name}` placeholders, as in the OpenAPI description.
    pub template: &'static str,
    pub access: Access,
    /// The query parameters it takes.
    pub params: &'static [&'static str],
}

macro_rules! route {
    ($method:ident, $template:literal, $access:ident, [$($p:literal),*]) => {
        Route { method: Method::$method, template: $template, access: Access::$access, params: &[$($p),*] }
    };
}

/// Every route the gateway answers. The OpenAPI description is tested against it.
pub static ROUTES: [Route; 18] = [
    route!(GET, "/", Open, []),
    route!(GET, "/healthz", Open, []),
    route!(GET, "/readyz", Open, []),
    route!(GET, "/metrics", Metrics, []),
    route!(GET, "/api/openapi.json", Read, []),
    route!(GET, "/api/reading", Read, ["limit", "cursor", "from", "to"]),
    route!(GET, "/api/sync/reading", Work, ["wait", "force"]),
    route!(POST, "/api/sync/reading", Work, ["wait", "force"]),
    route!(GET, "/api/jobs", Read, []),
    route!(GET, "/api/jobs/{name}", Read, []),
    route!(
        GET,
        "/api/jobs/{name}/runs",
        Read,
        ["status", "limit", "cursor"]
    ),
    route!(
        POST,
        "/api/jobs/{name}/runs",
        Work,
        ["wait", "timeout", "force"]
    ),
    route!(POST, "/api/jobs/{name}/pause", Work, ["until"]),
    route!(POST, "/api/jobs/{name}/resume", Work, []),
    route!(GET, "/api/runs/{id}", Read, []),
    route!(GET, "/api/runs/{id}/output", Read, []),
    route!(
        GET,
        "/api/alerts",
        Read,
        ["status", "job", "limit", "cursor"]
    ),
    route!(POST, "/api/reload", Work, []),
];

pub enum Found {
    Route(&'static Route, Vec<String>),
    WrongMethod(Vec<Method>),
    Nothing,
}

/// Matches `path` against the table.
pub fn find(method: &Method, path: &str) -> Found {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut allowed = Vec::new();
    for route in &ROUTES {
        let template: Vec<&str> = route.template.split('/').skip(1).collect();
        if template.len() != segments.len() {
            continue;
        }
        let mut captures = Vec::new();
        let matched = template.iter().zip(&segments).all(|(t, s)| {
            if t.starts_with('{') {
                captures.push(percent_decode(s));
                !s.is_empty()
            } else {
                t == s
            }
        });
        if !matched {
            continue;
        }
        if route.method == *method {
            return Found::Route(route, captures);
        }
        allowed.push(route.method.clone());
    }
    if allowed.is_empty() {
        Found::Nothing
    } else {
        Found::WrongMethod(allowed)
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The API description, served at `/api/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Longest a request may hold a connection waiting for a run, in seconds.
pub(super) const MAX_WAIT_S: i64 = 600;
/// How long `/api/sync/reading` waits by default before answering with the run id.
const DEFAULT_SYNC_WAIT_S: i64 = 30;
/// How long `?wait=true` waits by default.
pub(super) const DEFAULT_TRIGGER_WAIT_S: i64 = 60;

pub(super) fn seconds(n: i64) -> Duration {
    Duration::from_secs(n.unsigned_abs())
}

pub fn handle(state: State, route: &'static Route, req: Request) -> HandlerFuture {
    Box::pin(async move {
        let params = Params::parse(&req.query, route.params)?;
        match (route.method.as_str(), route.template) {
            ("GET", "/") => Ok(Reply::json(
                StatusCode::OK,
                json!({
                    "message": "Welcome to the Observability Platform",
                    "version": env!("CARGO_PKG_VERSION"),
                }),
            )),
            ("GET", "/healthz") => Ok(Reply::json(StatusCode::OK, json!({ "status": "ok" }))),
            ("GET", "/readyz") => readyz(&state).await,
            ("GET", "/metrics") => Ok(Reply {
                status: StatusCode::OK,
                json: Value::Null,
                text: Some((
                    state.metrics.encode(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )),
                headers: Vec::new(),
            }),
            ("GET", "/api/openapi.json") => {
                let mut doc: Value = serde_json::from_str(OPENAPI).map_err(|e| {
                    tracing::error!(error = %e, "the embedded OpenAPI description is not JSON");
                    ApiError::internal()
                })?;
                describe_inputs(&mut doc, &state.invoke.kinds);
                Ok(Reply::json(StatusCode::OK, doc))
            }
            ("GET", "/api/reading") => readings(&state, &params).await,
            ("POST", "/api/reload") => reload(&state).await,
            ("GET" | "POST", "/api/sync/reading") => {
                let wait = seconds(
                    params
                        .int("wait", 0, MAX_WAIT_S)?
                        .unwrap_or(DEFAULT_SYNC_WAIT_S),
                );
                let force = params.bool("force")?;
                // Taken before the run starts: a refused request starts nothing.
                let _waiting = (!wait.is_zero())
                    .then(|| waiting_permit(&state))
                    .transpose()?;
                let handle = trigger(&state, &state.reading_sync_job, force)?;
                finish_or_accept(&state, handle, wait).await
            }
            ("GET", "/api/jobs") => {
                // Read before anything else: a change meanwhile makes this answer old.
                let key = (
                    state.scheduler.records_made(),
                    state.scheduler.changes_made(),
                    state
                        .alerts
                        .as_ref()
                        .map_or(0, crate::alerts::Alerts::version),
                );
                if let Some(body) = state.views.answer(key) {
                    return Ok(json_text(body));
                }
                let jobs = state.scheduler.jobs();
                let last = last_runs(&state).await?;
                let health = health(&state).await?;
                let jobs: Vec<Value> = jobs.iter().map(|j| job_view(j, &last, &health)).collect();
                let body = json!({ "jobs": jobs }).to_string();
                state.views.keep_answer(key, &body);
                Ok(json_text(body))
            }
            ("GET", "/api/jobs/{name}") => {
                let name = &req.captures[0];
                let job = known_job(&state, name)?;
                let last = last_runs(&state).await?;
                let health = health(&state).await?;
                Ok(Reply::json(StatusCode::OK, job_view(&job, &last, &health)))
            }
            ("GET", "/api/alerts") => alerts(&state, &params).await,
            ("GET", "/api/jobs/{name}/runs") => {
                let name = &req.captures[0];
                known_job(&state, name)?;
                let status = params
                    .string("status")
                    .map(|s| {
                        s.parse::<RunStatus>()
                            .map_err(|e| ApiError::bad_request(format!("`status`: {e}")))
                    })
                    .transpose()?;
                let limit = params.int("limit", 1, 500)?.unwrap_or(50);
                let before = params
                    .string("cursor")
                    .map(|c| {
                        c.parse::<Uuid>().map_err(|_| {
                            ApiError::bad_request(format!(
                                "`cursor` must be a run id (a UUID), got {c:?}"
                            ))
                        })
                    })
                    .transpose()?;
                flush_ledger(&state).await;
                let runs = state
                    .store
                    .runs(&RunQuery {
                        job: Some(name),
                        status,
                        before,
                        limit,
                    })
                    .await?;
                let next = next_cursor(&runs, limit, |r| r.id.to_string());
                Ok(Reply::json(
                    StatusCode::OK,
                    json!({
                        "runs": runs.iter().map(run_view).collect::<Vec<_>>(),
                        "next_cursor": next,
                    }),
                ))
            }
            ("POST", "/api/jobs/{name}/runs") => invoke::start_run(&state, req, &params).await,
            ("POST", "/api/jobs/{name}/pause") => {
                invoke::pause(&state, &req.captures[0], &params).await
            }
            ("POST", "/api/jobs/{name}/resume") => invoke::resume(&state, &req.captures[0]).await,
            ("GET", "/api/runs/{id}/output") => invoke::output(&state, &req.captures[0]).await,
            ("GET", "/api/runs/{id}") => {
                let raw = &req.captures[0];
                let id: Uuid = raw.parse().map_err(|_| {
                    ApiError::bad_request(format!("run id must be a UUID, got {raw:?}"))
                })?;
                flush_ledger(&state).await;
                match state.store.run(id).await? {
                    Some(run) => Ok(Reply::json(StatusCode::OK, run_view(&run))),
                    None => Err(ApiError::not_found(format!("no run {id}"))),
                }
            }
            _ => Err(ApiError::not_found(format!(
                "no route for {} {}",
                req.method, req.path
            ))),
        }
    })
}

/// Each job kind's input schema, from the kind itself, as `Input_<kind>`; `RunInput`
/// is any of them (the job's kind decides which applies).
fn describe_inputs(doc: &mut Value, kinds: &crate::jobs::Registry) {
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut any_of = Vec::new();
    for (kind, mut schema) in kinds.input_schemas() {
        if let Some(map) = schema.as_object_mut() {
            map.insert("title".into(), json!(format!("input of a {kind} job")));
            map.insert("x-vigil-kind".into(), json!(kind));
        }
        let name = format!("Input_{kind}");
        any_of.push(json!({ "$ref": format!("#/components/schemas/{name}") }));
        schemas.insert(name, schema);
    }
    schemas.insert(
        "RunInput".into(),
        json!({
            "description": "A run's input; the schema of the job's kind applies (Input_<kind>).",
            "anyOf": any_of,
        }),
    );
}

/// An answer already rendered as JSON text.
fn json_text(body: String) -> Reply {
    Reply {
        status: StatusCode::OK,
        json: Value::Null,
        text: Some((body, "application/json")),
        headers: Vec::new(),
    }
}

/// Re-reads the jobs file: 200 with what changed, or 422 with every problem (and the
/// running set untouched).
async fn reload(state: &State) -> Result<Reply, ApiError> {
    let Some(reloader) = &state.reload else {
        return Err(ApiError::unavailable(
            "this vigil has no jobs file to reload",
        ));
    };
    match reloader.reload().await {
        Ok(report) => Ok(Reply::json(StatusCode::OK, json!(report))),
        Err(diags) => {
            let problems: Vec<Value> = diags
                .0
                .iter()
                .map(|d| {
                    let mut p = json!({
                        "location": d.origin.to_string(),
                        "job": d.job,
                        "message": d.message,
                    });
                    if let (crate::config::Origin::File { path, line, col }, Some(map)) =
                        (&d.origin, p.as_object_mut())
                    {
                        map.insert("file".into(), json!(path.display().to_string()));
                        map.insert("line".into(), json!(line));
                        map.insert("column".into(), json!(col));
                    }
                    p
                })
                .collect();
            let n = problems.len();
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_config",
                format!(
                    "{n} problem{} in the jobs file; the running jobs are unchanged",
                    if n == 1 { "" } else { "s" }
                ),
            )
            .with(json!({ "problems": problems })))
        }
    }
}

async fn readyz(state: &State) -> Result<Reply, ApiError> {
    let postgres = match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("PostgreSQL unreachable: {e}")),
        Err(_) => Err("PostgreSQL did not answer within 2 s".to_owned()),
    };
    let scheduler = if state.scheduler.is_running() {
        Ok(())
    } else {
        Err("scheduler not running".to_owned())
    };
    let checks = json!({
        "postgres": postgres.as_ref().map_or_else(|e| e.as_str(), |()| "ok"),
        "scheduler": scheduler.as_ref().map_or_else(|e| e.as_str(), |()| "ok"),
    });
    let problems: Vec<String> = [postgres, scheduler]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if problems.is_empty() {
        Ok(Reply::json(
            StatusCode::OK,
            json!({ "status": "ready", "checks": checks }),
        ))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            problems.join("; "),
        )
        .with(json!({ "checks": checks })))
    }
}

async fn readings(state: &State, params: &Params) -> Result<Reply, ApiError> {
    let limit = params.int("limit", 1, 1000)?.unwrap_or(100);
    let before_id = params.int("cursor", 1, i64::MAX)?;
    let from = params.time("from")?;
    let to = params.time("to")?;
    // `from` after `to` is an empty window, answered as such.
    let rows = state
        .store
        .readings(&ReadingQuery {
            before_id,
            from,
            to,
            limit,
        })
        .await?;
    let next = next_cursor(&rows, limit, |r| r.id.to_string());
    Ok(Reply::json(
        StatusCode::OK,
        json!({ "readings": rows, "next_cursor": next }),
    ))
}

/// A full page may have more after it: the last row's key is where the next one starts.
fn next_cursor<T>(page: &[T], limit: i64, key: impl Fn(&T) -> String) -> Option<String> {
    (page.len() as i64 == limit)
        .then(|| page.last().map(key))
        .flatten()
}

pub(super) fn known_job(state: &State, name: &str) -> Result<JobStatus, ApiError> {
    state
        .scheduler
        .jobs()
        .into_iter()
        .find(|j| j.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no job named {name:?}")))
}

fn trigger(state: &State, name: &str, force: bool) -> Result<RunHandle, ApiError> {
    state.scheduler.trigger(name, force).map_err(trigger_error)
}

/// What a client is told when a run was not started.
pub(super) fn trigger_error(e: TriggerError) -> ApiError {
    match e {
        TriggerError::UnknownJob(_) => ApiError::not_found(e.to_string()),
        TriggerError::Disabled(_) => ApiError::new(
            StatusCode::CONFLICT,
            "job_disabled",
            format!("{e} (add ?force=true)"),
        ),
        TriggerError::Refused { running, .. } => {
            ApiError::new(StatusCode::CONFLICT, "run_in_progress", e.to_string())
                .with(json!({ "running_run_id": running }))
        }
        TriggerError::Paused { until, .. } => {
            ApiError::new(StatusCode::CONFLICT, "job_paused", e.to_string())
                .with(json!({ "paused_until": until }))
        }
        TriggerError::Busy { limit, .. } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "concurrency_limit",
            e.to_string(),
        )
        .with(json!({ "max_concurrency": limit }))
        .retry_after(BUSY_RETRY_AFTER_S),
        TriggerError::Stopping => ApiError::unavailable(e.to_string()),
    }
}

/// What a trigger refused at a job's `max_concurrency` is told to wait, in seconds.
const BUSY_RETRY_AFTER_S: u64 = 1;

/// A place among the requests that wait for a run's end, or 503 with `Retry-After`
/// when they are all taken (`VIGIL_MAX_WAITING`).
pub(super) fn waiting_permit(state: &State) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    state
        .guard
        .waiting
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::unavailable(
                "too many requests are waiting for runs to end; retry shortly, or trigger \
             without waiting and poll the run's location",
            )
            .retry_after(WAITING_RETRY_AFTER_S)
        })
}

/// What a request refused for want of a waiting place is told to wait, in seconds.
const WAITING_RETRY_AFTER_S: u64 = 2;

pub(super) fn accepted(run_id: Uuid) -> Reply {
    let location = format!("/api/runs/{run_id}");
    Reply::json(
        StatusCode::ACCEPTED,
        json!({ "run_id": run_id, "status": "running", "location": location }),
    )
    .header(header::LOCATION, location)
}

/// 200 with the outcome if the run ends within `wait`, else 202 with where to poll.
pub(super) async fn finish_or_accept(
    state: &State,
    mut handle: RunHandle,
    wait: Duration,
) -> Result<Reply, ApiError> {
    let run_id = handle.run_id;
    match tokio::time::timeout(wait, handle.finished()).await {
        Ok(result) => {
            flush_ledger(state).await;
            Ok(Reply::json(StatusCode::OK, result_view(&result)))
        }
        Err(_) => Ok(accepted(run_id)),
    }
}

/// Makes the ledger's queued rows visible before reading them; bounded, so a slow
/// database delays the answer by at most two seconds.
pub(super) async fn flush_ledger(state: &State) {
    if let Err(e) = state.scheduler.flush_ledger(Duration::from_secs(2)).await {
        tracing::debug!(error = %e, "answering with the rows written so far");
    }
}

/// Every job's last run: from the view while it is current, else one query (of one
/// index probe per job) after the ledger's queue is written.
async fn last_runs(state: &State) -> Result<Vec<RunRecord>, ApiError> {
    let jobs = state.scheduler.job_names();
    // Read before the query: a record made meanwhile makes this view old at once.
    let made = state.scheduler.records_made();
    if let Some(rows) = state.views.last_runs(&jobs, made) {
        return Ok(rows);
    }
    flush_ledger(state).await;
    let rows = state.store.last_runs_of(&jobs).await?;
    state.views.keep(&jobs, made, &rows);
    Ok(rows)
}

async fn health(
    state: &State,
) -> Result<std::collections::BTreeMap<String, crate::alerts::JobHealth>, ApiError> {
    match &state.alerts {
        Some(alerts) => Ok(alerts.health().await?),
        None => Ok(std::collections::BTreeMap::new()),
    }
}

fn job_view(
    job: &JobStatus,
    last: &[RunRecord],
    health: &std::collections::BTreeMap<String, crate::alerts::JobHealth>,
) -> Value {
    let h = health.get(&job.name);
    json!({
        "name": job.name,
        "kind": job.kind,
        "schedule": job.schedule,
        "enabled": job.enabled,
        "overlap": job.overlap,
        "scope": job.scope.as_str(),
        "applied_at": job.applied_at,
        "next_fire": job.next_fire,
        "running": job.running,
        "paused": job.paused.is_some(),
        "paused_until": job.paused.flatten(),
        "max_concurrency": job.max_concurrency,
        "last_run": last.iter().find(|r| r.job == job.name).map(run_view),
        "health": h.map_or("unknown", |h| h.health.as_str()),
        "last_success_at": h.and_then(|h| h.last_success_at),
        "open_incidents": h.map(|h| h.open_incidents.clone()).unwrap_or_default(),
    })
}

/// `GET /api/alerts`: incidents newest first, with their deliveries.
async fn alerts(state: &State, params: &Params) -> Result<Reply, ApiError> {
    let open = match params.string("status") {
        None | Some("all") => None,
        Some("open") => Some(true),
        Some("resolved") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`status` must be open, resolved or all, got {other:?}"
            )));
        }
    };
    let limit = params.int("limit", 1, 500)?.unwrap_or(50);
    let before = params
        .string("cursor")
        .map(|c| {
            c.parse::<Uuid>().map_err(|_| {
                ApiError::bad_request(format!(
                    "`cursor` must be an incident id (a UUID), got {c:?}"
                ))
            })
        })
        .transpose()?;
    let job = params.string("job");
    let incidents = state
        .store
        .incidents(&crate::store::alerts::IncidentQuery {
            job,
            open,
            before,
            limit,
        })
        .await?;
    let ids: Vec<Uuid> = incidents.iter().map(|i| i.id).collect();
    let deliveries = state.store.deliveries_of(&ids).await?;
    let next = next_cursor(&incidents, limit, |i| i.id.to_string());
    let views: Vec<Value> = incidents
        .iter()
        .map(|i| {
            json!({
                "id": i.id,
                "job": i.job,
                "scope": i.scope_key,
                "kind": i.kind,
                "status": if i.resolved_at.is_some() { "resolved" } else { "open" },
                "opened_at": i.opened_at,
                "opened_by": i.opened_by,
                "run_id": i.run_id,
                "summary": i.summary,
                "details": i.details,
                "notify": i.notify,
                "resolved_at": i.resolved_at,
                "resolved_by": i.resolved_by,
                "resolved_run_id": i.resolved_run_id,
                "deliveries": deliveries
                    .iter()
                    .filter(|d| d.incident_id == i.id)
                    .map(|d| json!({
                        "event": d.event,
                        "notifier": d.notifier,
                        "attempts": d.attempts,
                        "due_at": d.due_at,
                        "delivered_at": d.delivered_at,
                        "gave_up_at": d.gave_up_at,
                        "last_error": d.last_error,
                    }))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Reply::json(
        StatusCode::OK,
        json!({ "incidents": views, "next_cursor": next }),
    ))
}

pub(super) fn run_view(r: &RunRecord) -> Value {
    json!({
        "id": r.id,
        "job": r.job,
        "kind": r.kind,
        "trigger": r.trigger,
        "attempt": r.attempt,
        "retry_of": r.retry_of,
        "scheduled_at": r.scheduled_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "status": r.status,
        "items": r.items,
        "error": r.error,
        "host": r.host,
        "permanent": r.permanent,
        "retry_after_ms": r.retry_after_ms,
        "duration_ms": r.finished_at.map(|f| (f - r.started_at).num_milliseconds()),
        "input": r.input,
        "resources": r.resources,
    })
}

fn result_view(r: &RunResult) -> Value {
    json!({
        "run_id": r.run_id,
        "last_attempt_id": r.last_attempt_id,
        "job": r.job,
        "status": r.status,
        "attempts": r.attempts,
        "items": r.items,
        "error": r.error,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "duration_ms": (r.finished_at - r.started_at).num_milliseconds(),
        "output": r.output.as_ref().map(crate::store::runs::RunOutput::to_json),
        "output_truncated": r.output.as_ref().map(|o| o.truncated),
        "location": format!("/api/runs/{}", r.run_id),
    })
}
