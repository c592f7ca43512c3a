//! One error shape for every answer that is not a success:
//! `{"error": "<code>", "message": "<what went wrong, naming the culprit>"}`.

use serde_json::{Value, json};
use warp::http::StatusCode;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra fields merged into the body (e.g. the running run's id on a 409).
    pub extra: Option<Box<Value>>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: None,
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with(mut self, extra: Value) -> Self {
        self.extra = Some(Box::new(extra));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the details are in vigil's log",
        )
    }

    pub fn body(&self) -> Value {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let (Some(Value::Object(extra)), Value::Object(map)) = (self.extra.as_deref(), &mut body)
        {
            for (k, v) in extra {
                map.insert(k.clone(), v.clone());
            }
        }
        body
    }
}

/// A database failure is vigil's problem, not the client's: 503 while PostgreSQL is
/// unreachable, 500 otherwise, with the detail in the log only.
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match &e {
            StoreError::Query(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
            | StoreError::Unreachable { .. } => {
                tracing::warn!(error = %e, "PostgreSQL unreachable while answering a request");
                ApiError::unavailable("PostgreSQL is unreachable; try again shortly")
            }
            _ => {
                tracing::error!(error = %e, "database error while answering a request");
                ApiError::internal()
            }
        }
    }
}
