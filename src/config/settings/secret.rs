//! Values that must never be printed: secrets, and URLs that may carry passwords.
//!
//! Every [`Secret`] registers what must not be shown (a token, a URL's password, raw
//! and percent-decoded) when it is made; [`redact`] then hides those values, and the
//! credentials of any URL, in any text. The places where text leaves vigil (log lines,
//! ledger rows, API answers) run it through [`redact`].

use std::borrow::Cow;
use std::fmt;
use std::sync::RwLock;

/// Shorter values are hidden only inside URLs: replacing every two-letter run in every
/// log line would say nothing and hide everything.
pub const MIN_REDACTED_LEN: usize = 4;

/// Values to hide wherever they appear, longest first.
static REGISTERED: RwLock<Vec<String>> = RwLock::new(Vec::new());

fn register(value: &str) {
    if value.len() < MIN_REDACTED_LEN {
        return;
    }
    let mut all = REGISTERED.write().unwrap_or_else(|p| p.into_inner());
    if !all.iter().any(|v| v == value) {
        all.push(value.to_owned());
        all.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }
}

/// The password in `url`'s userinfo, as written (found from the last `@`, so a `/` or
/// `?` that should have been percent-encoded still counts as part of it).
fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let (userinfo, _) = rest.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// Registers what `value` must not show: a URL's password (raw and decoded), or, for
/// anything else, the whole value.
pub fn register_secret(value: &str) {
    if value.contains("://") {
        if let Some(password) = url_password(value) {
            register(password);
            register(&percent_encoding::percent_decode_str(password).decode_utf8_lossy());
        }
        // The query may carry credentials too (`?password=`, `authSource` aside).
        if let Ok(url) = url::Url::parse(value) {
            for (key, v) in url.query_pairs() {
                if ["password", "pass", "pwd", "token", "secret"]
                    .contains(&&*key.to_ascii_lowercase())
                {
                    register(&v);
                }
            }
        }
    } else {
        register(value);
    }
}

/// `text` with every registered secret replaced by `***`, and every URL's password and
/// query hidden (see [`redact_url`]).
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    if text.contains("://") {
        out = Cow::Owned(redact_urls_in(text));
    }
    let registered = REGISTERED.read().unwrap_or_else(|p| p.into_inner());
    for secret in registered.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), "***"));
        }
    }
    out
}

/// Rewrites each URL-looking token that carries userinfo or a query.
fn redact_urls_in(text: &str) -> String {
    let ends =
        |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | '\\' | ')');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // Back over the scheme.
        let start = rest[..i]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map_or(i, |(j, _)| j);
        let end = rest[i + 3..].find(ends).map_or(rest.len(), |j| i + 3 + j);
        let token = &rest[start..end];
        out.push_str(&rest[..start]);
        if token[i - start + 3..].contains(['@', '?']) {
            out.push_str(&redact_url(token));
        } else {
            out.push_str(token);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A value that must never reach a log line or a `Debug` dump.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`, and registers it for [`redact`].
    pub fn new(s: impl Into<String>) -> Self {
        let s = s.into();
        register_secret(&s);
        Self(s)
    }

    /// Wraps `s` and registers all of it for [`redact`]: for URLs whose path is the
    /// credential (Slack's incoming webhooks, heartbeat pings, signed hooks).
    pub fn whole(s: impl Into<String>) -> Self {
        let s = s.into();
        register(&s);
        register_secret(&s);
        Self(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
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
        /// The CA certificate(s) a `verify-ca`/`verify-full` server certificate must
        /// chain to (PEM).
        sslrootcert: Option<std::path::PathBuf>,
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

/// `scheme://user:password@host/path?query` → `scheme://user:***@host/path`: the URL
/// parsed with the `url` crate, password replaced, query dropped (it may carry
/// `password=`). One that does not parse (a `/` or `?` in a password that should have
/// been percent-encoded) keeps only its scheme and what follows its last `@`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    if let Ok(mut parsed) = url::Url::parse(url)
        && parsed.has_host()
        // The parse must agree with where the userinfo ends, else a stray `/` in a
        // password made part of it look like the path.
        && rest.rfind('@').is_none_or(|at| !rest[..at].contains(['/', '?', '#']))
    {
        if parsed.password().is_some() {
            let _ = parsed.set_password(Some("***"));
        }
        parsed.set_query(None);
        parsed.set_fragment(None);
        return parsed.to_string().replace("%2A%2A%2A", "***");
    }
    let after = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let after = after.split(['?', '#']).next().unwrap_or("");
    if rest.contains('@') {
        format!("{scheme}://***@{after}")
    } else {
        format!("{scheme}://{after}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_by_parsing_them_whatever_the_password_holds() {
        assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db?password=x"), "postgres://h/db");
        assert_eq!(redact_url("garbage"), "***");
        assert_eq!(redact_url("postgres://u:p:q@h"), "postgres://u:***@h");
        // Characters that should have been percent-encoded, as users write them.
        assert_eq!(
            redact_url("postgres://app:se/cret@db:5432/app"),
            "postgres://***@db:5432/app"
        );
        assert_eq!(
            redact_url("postgres://app:se?cret@db/app"),
            "postgres://***@db/app"
        );
        assert_eq!(
            redact_url("postgres://app:a#b@db/app"),
            "postgres://***@db/app"
        );
        assert_eq!(
            redact_url("http://u:pw@[::1]:3100/x"),
            "http://u:***@[::1]:3100/x"
        );
        assert_eq!(
            redact_url("mongodb://u:p%2Fw@a:27017,b:27017/db?authSource=admin"),
            "mongodb://***@a:27017,b:27017/db"
        );
    }

    #[test]
    fn registered_secrets_and_url_credentials_are_hidden_in_any_text() {
        let _ = Secret::new("postgres://app:Sw0rd%2Fish@db/app");
        let _ = Secret::new("t0ken-abcdef");
        let text = "error connecting to postgres://app:Sw0rd%2Fish@db/app: password Sw0rd/ish \
                    rejected; header Bearer t0ken-abcdef; see http://docs.example/x";
        let r = redact(text);
        for secret in ["Sw0rd%2Fish", "Sw0rd/ish", "t0ken-abcdef"] {
            assert!(!r.contains(secret), "{r}");
        }
        assert!(r.contains("http://docs.example/x"), "{r}");
        assert!(r.contains("postgres://app:***@db/app"), "{r}");
        // Short values are only hidden inside URLs.
        let _ = Secret::new("ab");
        assert_eq!(redact("a cab"), "a cab");
    }
}
