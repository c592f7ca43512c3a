//! Query-string parsing: every parameter is known to its route, and a bad one is a 400
//! that names it.

use chrono::{DateTime, Utc};
use std::collections::HashMap;

use super::error::ApiError;

pub struct Params {
    values: HashMap<String, String>,
}

impl Params {
    /// Parses `raw`, refusing parameters outside `allowed` and repeated ones.
    pub fn parse(raw: &str, allowed: &[&str]) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
            .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))?;
        let mut values = HashMap::new();
        for (k, v) in pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::bad_request(if allowed.is_empty() {
                    format!("unknown query parameter `{k}`: this endpoint takes none")
                } else {
                    format!(
                        "unknown query parameter `{k}`; this endpoint takes {}",
                        allowed
                            .iter()
                            .map(|a| format!("`{a}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }));
            }
            if values.insert(k.clone(), v).is_some() {
                return Err(ApiError::bad_request(format!(
                    "query parameter `{k}` is given more than once"
                )));
            }
        }
        Ok(Self { values })
    }

    fn raw(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        self.raw(name)
            .map(|v| match v.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad_request(format!(
                    "`{name}` must be a whole number from {min} to {max}, got {v:?}"
                ))),
            })
            .transpose()
    }

    pub fn bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.raw(name) {
            None => Ok(false),
            Some("true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(v) => Err(ApiError::bad_request(format!(
                "`{name}` must be true or false, got {v:?}"
            ))),
        }
    }

    pub fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.raw(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        ApiError::bad_request(format!(
                            "`{name}` must be an RFC 3339 time like 2026-01-31T12:00:00Z, got {v:?}"
                        ))
                    })
            })
            .transpose()
    }

    pub fn string(&self, name: &str) -> Option<&str> {
        self.raw(name)
    }
}
