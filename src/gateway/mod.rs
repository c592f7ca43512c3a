//! The HTTP gateway (warp): the seed's endpoints, job triggers, run history, health,
//! metrics and the API description.
//!
//! Routing is one table ([`routes::ROUTES`]) matched in code, so an unknown path is
//! always 404 and a known path with the wrong method always 405 with `Allow` (warp's
//! composed filters blur the two). Every handler runs under `catch_unwind`: a panic is
//! a 500 for that request and the server goes on. The gateway never runs job code: a
//! trigger asks the scheduler, so manual runs obey overlap, timeout and ledger rules.

mod error;
mod invoke;
mod params;
mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt as _;
use serde_json::Value;
use subtle::ConstantTimeEq as _;
use tokio::sync::oneshot;
use warp::Filter as _;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::config::{Diagnostics, Secret};
use crate::scheduler::{ApplyReport, Scheduler};
use crate::store::Store;
use crate::telemetry::metrics::{HttpLabels, Metrics, RouteLabels};
pub use error::ApiError;
pub use routes::{Access, OPENAPI, ROUTES, Route};

/// The API's handler, for wrapping in tests.
pub fn api_handler() -> Handler {
    Arc::new(routes::handle)
}

/// Re-reads the jobs file and applies it (`POST /api/reload`). The app provides it:
/// the gateway reads no files.
#[async_trait::async_trait]
pub trait Reload: Send + Sync {
    async fn reload(&self) -> Result<ApplyReport, Diagnostics>;
}

/// What handlers can reach.
#[derive(Clone)]
pub struct State {
    pub scheduler: Scheduler,
    pub store: Store,
    pub metrics: Metrics,
    /// Who may call what.
    pub guard: Guard,
    pub reading_sync_job: String,
    /// `None` where nothing can be reloaded (`POST /api/reload` answers 503).
    pub reload: Option<Arc<dyn Reload>>,
    /// Job health; `None`: every job's health is `unknown`.
    pub alerts: Option<crate::alerts::Alerts>,
    /// What invoking a job with input needs.
    pub invoke: Invoke,
    /// Views of the ledger kept between requests.
    pub views: Views,
}

/// How long a view of the ledger serves requests: another replica's runs show within
/// this; this replica's at once (a new ledger record makes the view old).
pub const VIEW_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a `/api/jobs` answer is served again while nothing it shows changed: what
/// depends on the clock alone (staleness, lateness) moves on within this.
pub const ANSWER_FOR: std::time::Duration = std::time::Duration::from_millis(250);

/// Each job's last run, as last read, and the last `/api/jobs` answer, so that route
/// under load costs no query and no rendering per request. Cheap to clone.
#[derive(Clone, Default)]
pub struct Views(
    Arc<std::sync::Mutex<Option<LastRuns>>>,
    Arc<std::sync::Mutex<Option<Answer>>>,
);

/// What a `/api/jobs` answer was rendered from: the scheduler's records and changes,
/// and the health inputs' version.
pub type AnswerKey = (u64, u64, u64);

struct Answer {
    at: Instant,
    key: AnswerKey,
    body: String,
}

struct LastRuns {
    at: Instant,
    /// The scheduler's record count when read.
    records: u64,
    jobs: Vec<String>,
    rows: Vec<crate::store::RunRecord>,
}

impl Views {
    fn last_runs(&self, jobs: &[String], records: u64) -> Option<Vec<crate::store::RunRecord>> {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let v = guard.as_ref()?;
        (v.records == records && v.at.elapsed() < VIEW_FOR && v.jobs == jobs)
            .then(|| v.rows.clone())
    }

    fn answer(&self, key: AnswerKey) -> Option<String> {
        let guard = self.1.lock().unwrap_or_else(|p| p.into_inner());
        let a = guard.as_ref()?;
        (a.key == key && a.at.elapsed() < ANSWER_FOR).then(|| a.body.clone())
    }

    fn keep_answer(&self, key: AnswerKey, body: &str) {
        *self.1.lock().unwrap_or_else(|p| p.into_inner()) = Some(Answer {
            at: Instant::now(),
            key,
            body: body.to_owned(),
        });
    }

    fn keep(&self, jobs: &[String], records: u64, rows: &[crate::store::RunRecord]) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastRuns {
            at: Instant::now(),
            records,
            jobs: jobs.to_vec(),
            rows: rows.to_vec(),
        });
    }
}

/// Invoking jobs like functions: the kinds' input checks, the input bound, and where
/// callbacks may go.
#[derive(Clone)]
pub struct Invoke {
    pub kinds: crate::jobs::Registry,
    pub max_input_bytes: usize,
    pub callback_allow: Vec<String>,
    /// `None`: a `Callback-Url` is refused.
    pub callbacks: Option<crate::alerts::callbacks::Callbacks>,
}

impl Default for Invoke {
    fn default() -> Self {
        Self {
            kinds: crate::jobs::Registry::builtin(),
            max_input_bytes: crate::config::DEFAULT_MAX_INPUT_BYTES,
            callback_allow: Vec::new(),
            callbacks: None,
        }
    }
}

type Chunks = Pin<Box<dyn futures::Stream<Item = Result<Vec<u8>, String>> + Send>>;

/// A request's body, read on demand (most routes take none).
pub struct Body(Option<Chunks>);

impl Body {
    pub fn empty() -> Self {
        Self(None)
    }

    /// warp's body stream, read only when a handler asks.
    fn stream<S, B>(stream: S) -> Self
    where
        S: futures::Stream<Item = Result<B, warp::Error>> + Send + 'static,
        B: warp::Buf,
    {
        use futures::StreamExt as _;
        Self(Some(Box::pin(stream.map(|chunk| {
            chunk
                .map(|mut b| b.copy_to_bytes(b.remaining()).to_vec())
                .map_err(|e| e.to_string())
        }))))
    }

    /// The whole body, or 413 past `limit` bytes (the rest is not read).
    pub async fn read(self, limit: usize) -> Result<Vec<u8>, ApiError> {
        use futures::StreamExt as _;
        let Some(mut stream) = self.0 else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
            if out.len() + chunk.len() > limit {
                return Err(invoke::too_large(limit));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

/// The gateway's rules of entry.
#[derive(Clone)]
pub struct Guard {
    /// With a token, every route but `/`, `/healthz` and `/readyz` needs it.
    pub token: Option<Secret>,
    /// Reads need no token even when one is set.
    pub reads_open: bool,
    /// `/metrics` needs no token even when one is set.
    pub metrics_public: bool,
    /// Origins whose pages may send state-changing requests, beside the gateway's own.
    pub allowed_origins: Vec<String>,
    /// The gateway listens on loopback only: a `Host` that names anything else is a
    /// DNS-rebinding attempt.
    pub loopback_only: bool,
    /// Requests that may wait for a run's end at once.
    pub waiting: Arc<tokio::sync::Semaphore>,
    /// Open connections.
    pub max_connections: usize,
}

impl Guard {
    /// No token, every read open, loopback only; the settings' default caps.
    pub fn open() -> Self {
        Self {
            token: None,
            reads_open: true,
            metrics_public: true,
            allowed_origins: Vec::new(),
            loopback_only: true,
            waiting: Arc::new(tokio::sync::Semaphore::new(
                crate::config::DEFAULT_MAX_WAITING as usize,
            )),
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS as usize,
        }
    }
}

/// A request as handlers see it.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    /// Values of the `{…}` segments of the matched route, in order.
    pub captures: Vec<String>,
    pub body: Body,
}

/// A reply: JSON unless `text` is set.
pub struct Reply {
    pub status: StatusCode,
    pub json: Value,
    pub text: Option<(String, &'static str)>,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl Reply {
    pub fn json(status: StatusCode, json: Value) -> Self {
        Self {
            status,
            json,
            text: None,
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: header::HeaderName, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Self {
        let reply = Reply::json(e.status, e.body());
        match e.retry_after {
            Some(s) => reply.header(header::RETRY_AFTER, s.to_string()),
            None => reply,
        }
    }
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Reply, ApiError>> + Send>>;

/// The handler behind every route; tests can wrap it.
pub type Handler = Arc<dyn Fn(State, &'static Route, Request) -> HandlerFuture + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source} (set PORT or VIGIL_BIND)")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// A running gateway.
pub struct Gateway {
    pub local_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Binds `addr` (port 0 picks a free port) and serves the API.
    pub async fn start(state: State, addr: SocketAddr) -> Result<Self, BindError> {
        Self::start_with(state, addr, api_handler()).await
    }

    /// Like [`Gateway::start`] with a custom handler (tests).
    pub async fn start_with(
        state: State,
        addr: SocketAddr,
        handler: Handler,
    ) -> Result<Self, BindError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| BindError { addr, source })?;
        let max_connections = state.guard.max_connections.max(1);
        let filter = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::stream())
            .and_then(
                move |method: Method,
                      path: warp::path::FullPath,
                      query: String,
                      headers: HeaderMap,
                      body| {
                    let state = state.clone();
                    let handler = handler.clone();
                    async move {
                        let body = Body::stream(body);
                        Ok::<_, Infallible>(
                            dispatch(
                                state,
                                handler,
                                method,
                                path.as_str().to_owned(),
                                query,
                                headers,
                                body,
                            )
                            .await,
                        )
                    }
                },
            );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            warp::service(filter),
            max_connections,
            stopped,
        ));
        tracing::info!(address = %local_addr, "gateway listening");
        Ok(Self {
            local_addr,
            stop,
            task,
        })
    }

    /// Stops accepting connections and lets in-flight requests finish.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(std::time::Duration::from_secs(10), self.task)
            .await
            .is_err()
        {
            tracing::warn!("gateway connections still open after 10 s; leaving them");
        }
    }
}

/// Accepts connections while fewer than `max_connections` are open (past it, new
/// ones wait in the kernel's backlog), each served by hyper with the API as its
/// service; on `stopped`, stops accepting and lets open connections finish.
async fn serve<S>(
    listener: tokio::net::TcpListener,
    service: S,
    max_connections: usize,
    stopped: oneshot::Receiver<()>,
) where
    S: tower_service::Service<
            warp::http::Request<warp::hyper::body::Incoming>,
            Response = warp::reply::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stopped => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: pause rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stopped => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(service.clone());
        let conn = Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that hangs up mid-request is no error of ours.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn dispatch(
    state: State,
    handler: Handler,
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Body,
) -> warp::reply::Response {
    let started = Instant::now();
    // HEAD is GET without a body (hyper drops the body).
    let lookup_method = if method == Method::HEAD {
        Method::GET
    } else {
        method.clone()
    };
    let (route, reply) = match routes::find(&lookup_method, &path) {
        _ if !host_allowed(&state.guard, &headers) => (
            "unmatched",
            Reply::from(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the Host header names another machine, but this gateway listens on loopback \
                 only (DNS-rebinding protection): use http://127.0.0.1:PORT or \
                 http://localhost:PORT",
            )),
        ),
        routes::Found::Route(route, captures) => {
            let checked = match authorize(&state, route.access, &headers) {
                Err(e) => Err(Reply::from(e).header(header::WWW_AUTHENTICATE, "Bearer".into())),
                Ok(()) => match origin_allowed(&state.guard, route, &headers) {
                    Err(e) => Err(Reply::from(e)),
                    Ok(()) => Ok(()),
                },
            };
            let reply = match checked {
                Err(reply) => reply,
                Ok(()) => {
                    let request = Request {
                        method: method.clone(),
                        path: path.clone(),
                        query,
                        headers,
                        captures,
                        body,
                    };
                    let fut = handler(state.clone(), route, request);
                    match AssertUnwindSafe(fut).catch_unwind().await {
                        Ok(Ok(reply)) => reply,
                        Ok(Err(e)) => Reply::from(e),
                        Err(panic) => {
                            let message = panic
                                .downcast_ref::<&str>()
                                .map(|s| (*s).to_owned())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_default();
                            tracing::error!(%method, %path, panic = %message, "handler panicked");
                            Reply::from(ApiError::internal())
                        }
                    }
                }
            };
            (route.template, reply)
        }
        routes::Found::WrongMethod(allowed) => {
            let allow = allowed
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let reply = Reply::from(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {path}; use {allow}"),
            ))
            .header(header::ALLOW, allow);
            ("unmatched", reply)
        }
        routes::Found::Nothing => (
            "unmatched",
            Reply::from(ApiError::not_found(format!("no route for {method} {path}"))),
        ),
    };

    let elapsed = started.elapsed();
    let status = reply.status.as_u16();
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method: method_label(&method).to_owned(),
            route: route.to_owned(),
            status,
        })
        .inc();
    state
        .metrics
        .http_duration
        .get_or_create(&RouteLabels {
            route: route.to_owned(),
        })
        .observe(elapsed.as_secs_f64());
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    if matches!(route, "/healthz" | "/readyz" | "/metrics") && status < 500 {
        tracing::debug!(%method, %path, status, latency_ms, "request");
    } else if status >= 500 {
        tracing::warn!(%method, %path, status, latency_ms, "request");
    } else {
        tracing::info!(%method, %path, status, latency_ms, "request");
    }
    into_response(reply)
}

fn into_response(reply: Reply) -> warp::reply::Response {
    let (body, content_type) = match reply.text {
        Some((text, ct)) => (text, ct),
        None => (reply.json.to_string(), "application/json"),
    };
    // Every answer leaves vigil through here: no secret in it.
    let body = crate::config::redact(&body).into_owned();
    let mut response = warp::reply::Response::new(body.into());
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in reply.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    response
}

/// The method as a metrics label: one of the standard verbs, else `other`, so no
/// client can make up new series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Checks the bearer token for routes that need one. The scheme name is matched
/// without regard to case (RFC 9110); the token in constant time.
fn authorize(state: &State, access: Access, headers: &HeaderMap) -> Result<(), ApiError> {
    let guard = &state.guard;
    let Some(token) = &guard.token else {
        return Ok(());
    };
    let needed = match access {
        Access::Open => false,
        Access::Metrics => !guard.metrics_public,
        Access::Read => !guard.reads_open,
        Access::Work => true,
    };
    if !needed {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, t)| t.trim());
    // Constant time, so the comparison leaks nothing about the token.
    if bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs `Authorization: Bearer <VIGIL_API_TOKEN>`",
        ))
    }
}

/// On a loopback-only gateway, the `Host` must name this machine: a web page whose
/// name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name.
fn host_allowed(guard: &Guard, headers: &HeaderMap) -> bool {
    if !guard.loopback_only {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        // HTTP/1.0 without Host: nothing to rebind.
        return true;
    };
    is_loopback_host(host)
}

/// `localhost`, `*.localhost`, `127.x.y.z`, `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        },
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A request that changes state (any POST; `GET /api/sync/reading` starts a run) from a
/// web page of another origin is refused: any page a user opens could send it.
fn origin_allowed(guard: &Guard, route: &Route, headers: &HeaderMap) -> Result<(), ApiError> {
    let changes_state = route.method == Method::POST || route.template == "/api/sync/reading";
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    if !changes_state {
        return Ok(());
    }
    let origin = origin.to_str().unwrap_or("").trim().to_ascii_lowercase();
    let own = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.to_ascii_lowercase());
    let same_origin = own.is_some_and(|host| {
        origin == format!("http://{host}") || origin == format!("https://{host}")
    });
    if same_origin || guard.allowed_origins.contains(&origin) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "a web page from {origin:?} may not start work here; list that origin in \
                 VIGIL_ALLOWED_ORIGINS to allow it"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_addresses_are_recognised_and_others_not() {
        for host in [
            "localhost",
            "localhost:8085",
            "LOCALHOST.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:8085",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8085",
            "localhost.evil.example",
            "10.0.0.1:8085",
            "[2001:db8::1]:8085",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn only_standard_methods_become_labels() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
