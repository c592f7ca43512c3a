//! The HTTP gateway (warp): the seed's endpoints, job triggers, run history, health,
//! metrics and the API description.
//!
//! Routing is one table ([`routes::ROUTES`]) matched in code, so an unknown path is
//! always 404 and a known path with the wrong method always 405 with `Allow` (warp's
//! composed filters blur the two). Every handler runs under `catch_unwind`: a panic is
//! a 500 for that request and the server goes on. The gateway never runs job code: a
//! trigger asks the scheduler, so manual runs obey overlap, timeout and ledger rules.

mod error;
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
    pub api_token: Option<Secret>,
    pub reads_open: bool,
    pub reading_sync_job: String,
    /// `None` where nothing can be reloaded (`POST /api/reload` answers 503).
    pub reload: Option<Arc<dyn Reload>>,
}

/// A request as handlers see it.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    /// Values of the `{…}` segments of the matched route, in order.
    pub captures: Vec<String>,
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
        Reply::json(e.status, e.body())
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
        let filter = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and_then(
                move |method: Method,
                      path: warp::path::FullPath,
                      query: String,
                      headers: HeaderMap| {
                    let state = state.clone();
                    let handler = handler.clone();
                    async move {
                        Ok::<_, Infallible>(
                            dispatch(
                                state,
                                handler,
                                method,
                                path.as_str().to_owned(),
                                query,
                                headers,
                            )
                            .await,
                        )
                    }
                },
            );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            warp::serve(filter)
                .incoming(listener)
                .graceful(async move {
                    let _ = stopped.await;
                })
                .run(),
        );
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

async fn dispatch(
    state: State,
    handler: Handler,
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
) -> warp::reply::Response {
    let started = Instant::now();
    // HEAD is GET without a body (hyper drops the body).
    let lookup_method = if method == Method::HEAD {
        Method::GET
    } else {
        method.clone()
    };
    let (route, reply) = match routes::find(&lookup_method, &path) {
        routes::Found::Route(route, captures) => {
            let reply = match authorize(&state, route.access, &headers) {
                Err(e) => Reply::from(e).header(header::WWW_AUTHENTICATE, "Bearer".into()),
                Ok(()) => {
                    let request = Request {
                        method: method.clone(),
                        path: path.clone(),
                        query,
                        headers,
                        captures,
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
            method: method.as_str().to_owned(),
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

/// Checks the bearer token for routes that need one.
fn authorize(state: &State, access: Access, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.api_token else {
        return Ok(());
    };
    let needed = match access {
        Access::Open => false,
        Access::Read => !state.reads_open,
        Access::Work => true,
    };
    if !needed {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
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
