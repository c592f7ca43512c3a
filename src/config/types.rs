//! Small validated value types used in `jobs.toml`. Each checks itself while it is
//! deserialized, so a bad value is reported at its own line and column.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, de::Error as _};

/// A job name: lowercase slug, safe in URLs, log labels and advisory-lock keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slug(String);

impl Slug {
    const MAX_LEN: usize = 63;

    pub fn parse(s: &str) -> Result<Self, String> {
        let ok_first = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let ok_rest = s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if ok_first && ok_rest && s.len() <= Self::MAX_LEN {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "invalid job name {s:?}: use 1 to {} lowercase letters, digits, '-' or '_', starting with a letter or digit",
                Self::MAX_LEN
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Slug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Slug {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Slug::parse(&s).map_err(D::Error::custom)
    }
}

/// A PostgreSQL identifier taken from configuration (`table` or `schema.table`).
///
/// Only lowercase unquoted-style names are accepted, so the quoted form used in SQL
/// names the same object a user sees in `psql`, and nothing can be spliced in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ident {
    schema: Option<String>,
    name: String,
}

impl Ident {
    /// PostgreSQL's NAMEDATALEN - 1.
    const MAX_LEN: usize = 63;

    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid SQL identifier {s:?}: use `name` or `schema.name`, each 1 to {} characters of a-z, 0-9 or '_', not starting with a digit",
                Self::MAX_LEN
            )
        };
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= Self::MAX_LEN
                && p.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        match s.split_once('.') {
            Some((schema, name)) if part_ok(schema) && part_ok(name) => Ok(Self {
                schema: Some(schema.to_owned()),
                name: name.to_owned(),
            }),
            None if part_ok(s) => Ok(Self {
                schema: None,
                name: s.to_owned(),
            }),
            _ => Err(bad()),
        }
    }

    /// The identifier quoted for SQL. Safe to splice: `parse` admits no quotes.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }

    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl<'de> Deserialize<'de> for Ident {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ident::parse(&s).map_err(D::Error::custom)
    }
}

/// A positive duration written the human way: "500ms", "10s", "5m", "1h 30m", "7d".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<Self, String> {
        match humantime::parse_duration(s) {
            Ok(d) if d.is_zero() => Err(format!("invalid duration {s:?}: must be more than 0")),
            Ok(d) => Ok(Self(d)),
            Err(e) => Err(format!(
                "invalid duration {s:?}: {e} (write e.g. \"30s\", \"5m\", \"1h\", \"7d\")"
            )),
        }
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_accept_lowercase_names_and_reject_the_rest() {
        assert!(Slug::parse("reading-sync").is_ok());
        assert!(Slug::parse("m1_fast").is_ok());
        for bad in ["", "Reading", "-x", "a b", "a/b", &"x".repeat(64)] {
            assert!(Slug::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn identifiers_are_quoted_and_injection_is_refused() {
        assert_eq!(Ident::parse("job_runs").unwrap().quoted(), "\"job_runs\"");
        assert_eq!(
            Ident::parse("public.system_metrics").unwrap().quoted(),
            "\"public\".\"system_metrics\""
        );
        for bad in [
            "",
            "1abc",
            "Users",
            "a;drop table x",
            "a\"b",
            "a.b.c",
            ".a",
            "a.",
            "sp ace",
            &"x".repeat(64),
        ] {
            assert!(Ident::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations_parse_human_units_and_refuse_zero() {
        assert_eq!(
            HumanDuration::parse("10s").unwrap().get(),
            Duration::from_secs(10)
        );
        assert_eq!(
            HumanDuration::parse("1h 30m").unwrap().get(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            HumanDuration::parse("7d").unwrap().get(),
            Duration::from_secs(7 * 86400)
        );
        assert!(HumanDuration::parse("0s").is_err());
        assert!(HumanDuration::parse("ten seconds").is_err());
        assert!(HumanDuration::parse("10").is_err());
    }
}
