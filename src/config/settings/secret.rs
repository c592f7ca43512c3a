//! Values that must never be printed: secrets, and URLs that may carry passwords.

use std::fmt;

/// A value that must never reach a log line or a `Debug` dump.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where vigil's PostgreSQL is. `None` in [`Settings`] means: start the embedded one.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    /// `DATABASE_URL` (or `database_url` in `[runner]`).
    Url(Secret),
    /// `DB_HOST`, `DB_PORT`, `DB_USER`, `DB_PASSWORD`, `DB_NAME`.
    Parts {
        host: String,
        port: u16,
        user: String,
        password: Option<Secret>,
        name: String,
        /// libpq's sslmode: disable, allow, prefer, require, verify-ca, verify-full.
        sslmode: Option<String>,
    },
}

impl fmt::Debug for DatabaseTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseTarget({self})")
    }
}

/// Shows where the database is without any password.
impl fmt::Display for DatabaseTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseTarget::Url(url) => f.write_str(&redact_url(url.expose())),
            DatabaseTarget::Parts {
                host,
                port,
                user,
                name,
                ..
            } => write!(f, "postgres://{user}@{host}:{port}/{name}"),
        }
    }
}

/// `scheme://user:password@host/...` → `scheme://user:***@host/...`; anything it cannot
/// parse is hidden entirely rather than risk printing a password.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    // Strip any query string: it may carry `password=`.
    let tail = tail.split('?').next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}
