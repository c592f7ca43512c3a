//! Reading one setting out of the layers: every bad value becomes a located problem
//! and the key's default stands in, so reading goes on and every problem is reported.

use std::collections::HashMap;
use std::time::Duration;

use config::{Config as Layers, Map, Source, Value, ValueKind};

use super::keys::{DEFAULT_DB_HOST, DEFAULT_DB_NAME, DEFAULT_DB_PORT, DEFAULT_DB_USER};
use super::secret::{DatabaseTarget, Secret};
use crate::config::diagnostic::{Diagnostic, Origin};
use crate::config::file::RunnerEntry;
use crate::config::types::HumanDuration;

/// The `[runner]` table as a `config` source, each value carrying its file position.
#[derive(Debug, Clone)]
pub struct RunnerSource(pub Vec<RunnerEntry>);

impl Source for RunnerSource {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self
            .0
            .iter()
            .map(|e| {
                let origin = e.origin.to_string();
                (e.key.clone(), Value::new(Some(&origin), e.value.clone()))
            })
            .collect())
    }
}

/// The environment variables vigil knows, mapped to their setting keys.
#[derive(Debug, Clone)]
pub struct EnvSource(pub Vec<(String, String, Origin)>);

impl Source for EnvSource {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self
            .0
            .iter()
            .map(|(key, v, origin)| {
                let origin = origin.to_string();
                (
                    key.clone(),
                    Value::new(Some(&origin), ValueKind::String(v.clone())),
                )
            })
            .collect())
    }
}

/// Reads keys out of the layered settings, recording a located problem for each bad one.
pub struct Reader<'a> {
    pub layers: &'a Layers,
    /// Where each key's winning value came from.
    pub origins: &'a HashMap<&'static str, Origin>,
    pub diags: &'a mut Vec<Diagnostic>,
}

impl Reader<'_> {
    pub fn problem(&mut self, key: &'static str, message: String) {
        let origin = self.origins.get(key).cloned().unwrap_or(Origin::Unknown);
        self.diags.push(Diagnostic {
            origin,
            job: None,
            message,
        });
    }

    /// A present, non-empty string value (empty counts as unset, as in shells).
    pub fn string(&mut self, key: &'static str) -> Option<String> {
        match self.layers.get_string(key) {
            Ok(s) if s.trim().is_empty() => None,
            Ok(s) => Some(s),
            Err(config::ConfigError::NotFound(_)) => None,
            Err(e) => {
                self.problem(key, format!("{key}: {e}"));
                None
            }
        }
    }

    /// The value parsed by `parse`, `None` when unset or bad (then with a problem).
    pub fn maybe<T>(
        &mut self,
        key: &'static str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let raw = self.string(key)?;
        let value = parse(raw.trim());
        if value.is_none() {
            self.problem(
                key,
                format!("{key}: invalid value {raw:?}, expected {expected}"),
            );
        }
        value
    }

    /// The value parsed by `parse`, or `default` when unset (or bad: then a problem).
    pub fn parsed<T>(
        &mut self,
        key: &'static str,
        default: T,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> T {
        self.maybe(key, expected, parse).unwrap_or(default)
    }

    pub fn flag(&mut self, key: &'static str, default: bool) -> bool {
        self.parsed(key, default, "true or false", parse_bool)
    }

    pub fn duration(&mut self, key: &'static str, default: Duration) -> Duration {
        let Some(raw) = self.string(key) else {
            return default;
        };
        match HumanDuration::parse(raw.trim()) {
            Ok(d) => d.get(),
            Err(e) => {
                self.problem(key, format!("{key}: {e}"));
                default
            }
        }
    }

    /// A duration, or `0`/`off` for none.
    pub fn duration_or_off(&mut self, key: &'static str, default: Duration) -> Option<Duration> {
        match self.string(key).as_deref().map(str::trim) {
            Some("0" | "off") => None,
            _ => Some(self.duration(key, default)),
        }
    }

    /// A whole number within `range`.
    pub fn count(
        &mut self,
        key: &'static str,
        default: u32,
        range: std::ops::RangeInclusive<u32>,
    ) -> u32 {
        let expected = format!("a whole number from {} to {}", range.start(), range.end());
        self.parsed(key, default, &expected, |s| {
            s.parse::<u32>().ok().filter(|n| range.contains(n))
        })
    }

    /// A size such as `8MiB`, at least `min` bytes.
    pub fn bytes(
        &mut self,
        key: &'static str,
        default: usize,
        expected: &str,
        min: usize,
    ) -> usize {
        self.parsed(key, default, expected, |s| {
            parse_bytes(s).filter(|b| *b >= min)
        })
    }

    /// `DATABASE_URL`, else the `DB_*` parts if any is set, else none (embedded).
    pub fn database(&mut self) -> Option<DatabaseTarget> {
        if let Some(url) = self.string("database_url") {
            let secret = Secret::new(url);
            let url = secret.expose();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                self.problem(
                    "database_url",
                    "database_url: expected a URL starting with postgres:// or postgresql://"
                        .into(),
                );
                return None;
            }
            if url::Url::parse(url).is_err() || !userinfo_intact(url) {
                self.problem("database_url", format!("database_url: {NOT_A_URL}"));
                return None;
            }
            return Some(DatabaseTarget::Url(secret));
        }
        let parts = [
            "db_host",
            "db_port",
            "db_user",
            "db_password",
            "db_name",
            "db_sslmode",
            "db_sslrootcert",
        ];
        if !parts.iter().any(|k| self.origins.contains_key(k)) {
            return None;
        }
        let port = match self.origins.contains_key("db_port") {
            true => self.maybe("db_port", "a port number from 1 to 65535", |s| {
                s.parse::<u16>().ok().filter(|p| *p > 0)
            })?,
            false => DEFAULT_DB_PORT,
        };
        Some(DatabaseTarget::Parts {
            host: self
                .string("db_host")
                .unwrap_or_else(|| DEFAULT_DB_HOST.into()),
            port,
            user: self
                .string("db_user")
                .unwrap_or_else(|| DEFAULT_DB_USER.into()),
            password: self.string("db_password").map(Secret::new),
            name: self
                .string("db_name")
                .unwrap_or_else(|| DEFAULT_DB_NAME.into()),
            sslmode: self.maybe(
                "db_sslmode",
                "disable, allow, prefer, require, verify-ca or verify-full",
                |s| {
                    [
                        "disable",
                        "allow",
                        "prefer",
                        "require",
                        "verify-ca",
                        "verify-full",
                    ]
                    .contains(&s)
                    .then(|| s.to_owned())
                },
            ),
            sslrootcert: self.sslrootcert(),
        })
    }
}

impl Reader<'_> {
    /// `DB_SSLROOTCERT`: a file that must be there to be read at connect time.
    fn sslrootcert(&mut self) -> Option<std::path::PathBuf> {
        let path = std::path::PathBuf::from(self.string("db_sslrootcert")?);
        if !path.is_file() {
            self.problem(
                "db_sslrootcert",
                format!(
                    "db_sslrootcert: {} is not a readable file (a PEM file of the CA that signed \
                     the server's certificate)",
                    path.display()
                ),
            );
            return None;
        }
        Some(path)
    }
}

/// `VIGIL_HOST_ROOT`: a directory holding the host's `proc/`.
pub fn host_root(r: &mut Reader<'_>) -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from(r.string("host_root")?);
    if !path.join("proc/1").is_dir() {
        r.problem(
            "host_root",
            format!(
                "host_root: {} holds no proc/1: mount the host's / there (read-only), and its \
                 /proc with it",
                path.display()
            ),
        );
        return None;
    }
    Some(path)
}

/// What a URL setting that does not parse is told (never its value).
pub const NOT_A_URL: &str = "not a valid URL (the value is not shown: it may hold a \
     password). Percent-encode characters such as / ? # @ : % in a user name or password, \
     e.g. / as %2F";

/// Whether the parser saw the userinfo the user meant: a `/`, `?` or `#` before the
/// last `@` (an unencoded character in a password) makes part of it look like a path.
pub fn userinfo_intact(url: &str) -> bool {
    url.split_once("://").is_none_or(|(_, rest)| {
        rest.rfind('@')
            .is_none_or(|at| !rest[..at].contains(['/', '?', '#']))
    })
}

/// `MONGO_URI`, checked as the driver will read it.
pub fn mongo_uri(r: &mut Reader<'_>) -> Option<Secret> {
    let secret = Secret::new(r.string("mongo_uri")?);
    if mongodb::options::ConnectionString::parse(secret.expose()).is_err()
        || !userinfo_intact(secret.expose())
    {
        r.problem(
            "mongo_uri",
            "mongo_uri: not a MongoDB connection string (mongodb://… or mongodb+srv://…; the \
             value is not shown: it may hold a password). Percent-encode characters such as \
             / ? # @ : % in a user name or password"
                .into(),
        );
        return None;
    }
    Some(secret)
}

/// `env=prod,region=eu-1` → pairs; empty gives none.
pub fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        let (k, v) = (k.trim(), v.trim());
        let name_ok = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !["service", "host", "level", "job"].contains(&k);
        if !name_ok || v.is_empty() {
            return None;
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Some(out)
}

/// `https://a.example, http://localhost:3000` → origins, lowercased, as browsers send
/// them in `Origin` (scheme, host, port; no path).
pub fn parse_origins(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let url = url::Url::parse(item).ok()?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none()
            || url.path() != "/"
            || url.query().is_some()
        {
            return None;
        }
        out.push(url.origin().ascii_serialization());
    }
    Some(out)
}

/// `8MiB`, `512KiB`, `1GiB`, `1048576` → bytes.
pub fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: usize = digits.parse().ok()?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

pub fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `VIGIL_CALLBACK_ALLOW`: host patterns (`host`, `host:port`, `*` wildcards), lower case.
pub fn parse_host_patterns(text: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let ok = item
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*' | ':' | '[' | ']'));
        if !ok || item.contains("://") {
            return None;
        }
        out.push(item.to_ascii_lowercase());
    }
    Some(out)
}
