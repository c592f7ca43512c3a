//! Who is told about a job's health, and when: `[notifiers.<name>]`, the `[alerts]`
//! defaults, and each job's `alert` rule and heartbeat URLs. Read like the rest of the
//! file, every problem located. Secret values may come from the environment
//! (`url = { env = "SLACK_WEBHOOK_URL" }`); every one is registered for redaction whole.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;
use toml::de::DeValue;

use super::diagnostic::{Diagnostic, SourceMap};
use super::file::deserialize_collecting;
use super::settings::{Environment, Secret};
use super::types::HumanDuration;

/// A final status an alert rule can open a failure incident on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertOn {
    Failed,
    TimedOut,
    Abandoned,
    Skipped,
}

impl AlertOn {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertOn::Failed => "failed",
            AlertOn::TimedOut => "timed_out",
            AlertOn::Abandoned => "abandoned",
            AlertOn::Skipped => "skipped",
        }
    }
}

/// What opens a failure incident when neither the job nor `[alerts]` says.
pub const DEFAULT_ALERT_ON: [AlertOn; 2] = [AlertOn::Failed, AlertOn::TimedOut];

/// How long a notifier may take to answer (or a `command` notifier to finish).
pub const DEFAULT_NOTIFIER_TIMEOUT: Duration = Duration::from_secs(10);

/// A job's alert rule, with the `[alerts]` defaults merged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRule {
    /// Final statuses (after retries) that open a failure incident.
    pub on: Vec<AlertOn>,
    /// Open a staleness incident when no run has succeeded for this long.
    pub stale_after: Option<Duration>,
    /// Open a lateness incident when a run is still going (or started) this long
    /// after its scheduled time.
    pub late_after: Option<Duration>,
    /// The notifiers told; none: incidents are recorded and served, nobody is called.
    pub notify: Vec<String>,
}

impl AlertRule {
    /// Whether the rule can open any incident at all.
    pub fn is_active(&self) -> bool {
        !self.on.is_empty() || self.stale_after.is_some() || self.late_after.is_some()
    }
}

impl fmt::Display for AlertRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.on.is_empty() {
            let on: Vec<&str> = self.on.iter().map(|o| o.as_str()).collect();
            parts.push(format!("on {}", on.join(", ")));
        }
        if let Some(d) = self.stale_after {
            parts.push(format!("stale after {}", humantime::format_duration(d)));
        }
        if let Some(d) = self.late_after {
            parts.push(format!("late after {}", humantime::format_duration(d)));
        }
        if parts.is_empty() {
            parts.push("no incidents".to_owned());
        }
        let to = if self.notify.is_empty() {
            "recorded only".to_owned()
        } else {
            format!("notify {}", self.notify.join(", "))
        };
        write!(f, "{}; {to}", parts.join("; "))
    }
}

/// URLs called after each run: `url` on success, `fail_url` on a final failure, so an
/// outside service notices when runs (or vigil itself) stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub url: Option<Secret>,
    pub fail_url: Option<Secret>,
}

/// How a notifier delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifierKind {
    /// POST of the alert as JSON; with `secret`, an HMAC-SHA256 of the body in the
    /// `X-Vigil-Signature` header.
    Webhook { url: Secret, secret: Option<Secret> },
    /// POST in Slack's incoming-webhook format.
    Slack { url: Secret },
    /// A program, given the alert as JSON on stdin; exit 0 is delivered.
    Command {
        command: Vec<String>,
        env: BTreeMap<String, String>,
    },
}

/// One `[notifiers.<name>]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    pub name: String,
    pub kind: NotifierKind,
    pub timeout: Duration,
}

impl Notifier {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            NotifierKind::Webhook { .. } => "webhook",
            NotifierKind::Slack { .. } => "slack",
            NotifierKind::Command { .. } => "command",
        }
    }

    /// Where it delivers, safe to print: scheme and host of a URL, a program's name.
    pub fn target(&self) -> String {
        match &self.kind {
            NotifierKind::Webhook { url, .. } | NotifierKind::Slack { url } => {
                url::Url::parse(url.expose()).map_or_else(
                    |_| "(invalid URL)".to_owned(),
                    |u| format!("{}://{}", u.scheme(), u.host_str().unwrap_or("")),
                )
            }
            NotifierKind::Command { command, .. } => command.first().cloned().unwrap_or_default(),
        }
    }
}

/// A secret as written: the value, or the environment variable that holds it.
#[derive(Debug, Clone)]
pub enum SecretText {
    Literal(String),
    Env(String),
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, or { env = \"VARIABLE\" }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<SecretText, E> {
                Ok(SecretText::Literal(s.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretText, A::Error> {
                let mut env = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "env" || env.is_some() {
                        return Err(de::Error::custom(format!(
                            "unknown key `{key}`: write a string, or {{ env = \"VARIABLE\" }}"
                        )));
                    }
                    env = Some(map.next_value::<String>()?);
                }
                env.map(SecretText::Env)
                    .ok_or_else(|| de::Error::custom("write a string, or { env = \"VARIABLE\" }"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A job's `alert = { … }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlert {
    on: Option<Vec<AlertOn>>,
    stale_after: Option<HumanDuration>,
    late_after: Option<HumanDuration>,
    notify: Option<Vec<Spanned<String>>>,
}

/// `[alerts]` as written: what applies to every job without its own `alert`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    on: Option<Vec<AlertOn>>,
    notify: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUrlNotifier {
    #[serde(rename = "kind")]
    _kind: String,
    url: Spanned<SecretText>,
    secret: Option<Spanned<SecretText>>,
    timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlack {
    #[serde(rename = "kind")]
    _kind: String,
    url: Spanned<SecretText>,
    timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    #[serde(rename = "kind")]
    _kind: String,
    command: Spanned<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout: Option<HumanDuration>,
}

const NOTIFIER_KINDS: [&str; 3] = ["webhook", "slack", "command"];

/// What jobs need to resolve their `alert` and heartbeat: the notifiers' names, the
/// defaults, the environment.
pub(super) struct AlertContext<'e> {
    pub notifiers: BTreeMap<String, Notifier>,
    /// Every `[notifiers.<name>]` written, valid or not: a reference to one that has
    /// its own problems is not a second problem.
    declared: std::collections::BTreeSet<String>,
    defaults_on: Option<Vec<AlertOn>>,
    defaults_notify: Option<Vec<String>>,
    env: &'e Environment,
}

impl<'e> AlertContext<'e> {
    pub fn empty(env: &'e Environment) -> Self {
        Self {
            notifiers: BTreeMap::new(),
            declared: std::collections::BTreeSet::new(),
            defaults_on: None,
            defaults_notify: None,
            env,
        }
    }

    /// Reads `[notifiers]` and `[alerts]` (either may be absent).
    pub fn read(
        map: &SourceMap<'_>,
        notifiers: Option<Spanned<DeValue<'_>>>,
        defaults: Option<Spanned<DeValue<'_>>>,
        env: &'e Environment,
        diags: &mut Vec<Diagnostic>,
    ) -> Self {
        let mut me = Self::empty(env);
        if let Some(value) = notifiers {
            me.read_notifiers(map, value, diags);
        }
        if let Some(value) = defaults {
            let raw: Option<RawDefaults> = deserialize_collecting(map, "[alerts]", value, diags);
            if let Some(raw) = raw {
                me.defaults_notify = raw
                    .notify
                    .map(|names| me.check_names(map, "[alerts]", "notify", names, diags));
                me.defaults_on = raw.on.map(normalised);
            }
        }
        me
    }

    fn read_notifiers(
        &mut self,
        map: &SourceMap<'_>,
        value: Spanned<DeValue<'_>>,
        diags: &mut Vec<Diagnostic>,
    ) {
        let span = value.span();
        let DeValue::Table(table) = value.into_inner() else {
            diags.push(map.diagnostic(
                Some(span),
                None,
                "`notifiers` must be a table of tables: write each under `[notifiers.<name>]`",
            ));
            return;
        };
        for (key, value) in table {
            let name = key.get_ref().to_string();
            self.declared.insert(name.clone());
            let label = format!("notifier \"{name}\"");
            if let Err(e) = super::types::Slug::parse(&name) {
                diags.push(map.diagnostic(
                    Some(key.span()),
                    Some(label.clone()),
                    e.replace("job name", "notifier name"),
                ));
                continue;
            }
            let span = value.span();
            let kind = match value.get_ref() {
                DeValue::Table(t) => match t.get("kind").map(|k| (k.span(), k.get_ref())) {
                    Some((span, DeValue::String(k))) => {
                        if NOTIFIER_KINDS.contains(&k.as_ref()) {
                            k.to_string()
                        } else {
                            diags.push(map.diagnostic(
                                Some(span),
                                Some(label),
                                format!(
                                    "unknown notifier kind {:?}, expected one of \"webhook\", \"slack\", \"command\"",
                                    k.as_ref()
                                ),
                            ));
                            continue;
                        }
                    }
                    _ => {
                        diags.push(map.diagnostic(
                            Some(span),
                            Some(label),
                            "a notifier needs `kind`: \"webhook\", \"slack\" or \"command\"",
                        ));
                        continue;
                    }
                },
                _ => {
                    diags.push(map.diagnostic(
                        Some(span),
                        Some(label),
                        "a notifier must be a table: write it under `[notifiers.<name>]`",
                    ));
                    continue;
                }
            };
            let notifier = match kind.as_str() {
                "webhook" => {
                    let raw: Option<RawUrlNotifier> =
                        deserialize_collecting(map, &label, value, diags);
                    raw.and_then(|r| {
                        let url = self.secret(map, &label, "url", r.url, true, diags);
                        let secret = r
                            .secret
                            .map(|s| self.secret(map, &label, "secret", s, false, diags));
                        Some(Notifier {
                            name: name.clone(),
                            kind: NotifierKind::Webhook {
                                url: url?,
                                secret: secret.flatten(),
                            },
                            timeout: r
                                .timeout
                                .map_or(DEFAULT_NOTIFIER_TIMEOUT, HumanDuration::get),
                        })
                    })
                }
                "slack" => {
                    let raw: Option<RawSlack> = deserialize_collecting(map, &label, value, diags);
                    raw.and_then(|r| {
                        Some(Notifier {
                            name: name.clone(),
                            kind: NotifierKind::Slack {
                                url: self.secret(map, &label, "url", r.url, true, diags)?,
                            },
                            timeout: r
                                .timeout
                                .map_or(DEFAULT_NOTIFIER_TIMEOUT, HumanDuration::get),
                        })
                    })
                }
                _ => {
                    let raw: Option<RawCommand> = deserialize_collecting(map, &label, value, diags);
                    raw.and_then(|r| {
                        if r.command.get_ref().first().is_none_or(String::is_empty) {
                            diags.push(map.diagnostic(
                                Some(r.command.span()),
                                Some(label.clone()),
                                "`command` needs a program: [\"/path/to/program\", \"arg\", …]",
                            ));
                            return None;
                        }
                        Some(Notifier {
                            name: name.clone(),
                            kind: NotifierKind::Command {
                                command: r.command.into_inner(),
                                env: r.env,
                            },
                            timeout: r
                                .timeout
                                .map_or(DEFAULT_NOTIFIER_TIMEOUT, HumanDuration::get),
                        })
                    })
                }
            };
            if let Some(n) = notifier {
                self.notifiers.insert(name, n);
            }
        }
    }

    /// A secret's value, from the file or the environment; `url`: it must be an
    /// http(s) URL. Problems never show the value.
    fn secret(
        &self,
        map: &SourceMap<'_>,
        label: &str,
        field: &str,
        text: Spanned<SecretText>,
        url: bool,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<Secret> {
        let span = text.span();
        let value = match text.into_inner() {
            SecretText::Literal(s) => s,
            SecretText::Env(var) => match self.env.get(&var) {
                Some(v) if !v.is_empty() => v.to_owned(),
                _ => {
                    diags.push(map.diagnostic(
                        Some(span),
                        Some(label.to_owned()),
                        format!("`{field}`: environment variable {var} is not set"),
                    ));
                    return None;
                }
            },
        };
        if url {
            let ok = url::Url::parse(&value).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                diags.push(map.diagnostic(
                    Some(span),
                    Some(label.to_owned()),
                    format!(
                        "`{field}`: not an http:// or https:// URL (the value is not shown: it \
                         may hold a secret)"
                    ),
                ));
                return None;
            }
        } else if value.is_empty() {
            diags.push(map.diagnostic(
                Some(span),
                Some(label.to_owned()),
                format!("`{field}` is empty"),
            ));
            return None;
        }
        Some(Secret::whole(value))
    }

    /// Notifier names checked against `[notifiers]`, each problem at its name.
    fn check_names(
        &self,
        map: &SourceMap<'_>,
        label: &str,
        field: &str,
        names: Vec<Spanned<String>>,
        diags: &mut Vec<Diagnostic>,
    ) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for name in names {
            if self.declared.contains(name.get_ref()) {
                if !out.contains(name.get_ref()) {
                    out.push(name.get_ref().clone());
                }
                continue;
            }
            let known = if self.declared.is_empty() {
                "no notifier is defined (add a [notifiers.<name>] table)".to_owned()
            } else {
                format!(
                    "defined: {}",
                    self.declared
                        .iter()
                        .map(|k| format!("\"{k}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            diags.push(map.diagnostic(
                Some(name.span()),
                Some(label.to_owned()),
                format!("{field}: unknown notifier \"{}\"; {known}", name.get_ref()),
            ));
        }
        out
    }

    /// A job's rule: its own `alert` over the `[alerts]` defaults; `None` when neither.
    pub fn rule(
        &self,
        map: &SourceMap<'_>,
        label: &str,
        raw: Option<RawAlert>,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<AlertRule> {
        let defaults = self.defaults_on.is_some() || self.defaults_notify.is_some();
        let rule = match raw {
            None if !defaults => return None,
            None => AlertRule {
                on: self
                    .defaults_on
                    .clone()
                    .unwrap_or_else(|| DEFAULT_ALERT_ON.to_vec()),
                stale_after: None,
                late_after: None,
                notify: self.defaults_notify.clone().unwrap_or_default(),
            },
            Some(raw) => AlertRule {
                on: raw.on.map(normalised).unwrap_or_else(|| {
                    self.defaults_on
                        .clone()
                        .unwrap_or_else(|| DEFAULT_ALERT_ON.to_vec())
                }),
                stale_after: raw.stale_after.map(HumanDuration::get),
                late_after: raw.late_after.map(HumanDuration::get),
                notify: match raw.notify {
                    Some(names) => self.check_names(map, label, "alert.notify", names, diags),
                    None => self.defaults_notify.clone().unwrap_or_default(),
                },
            },
        };
        Some(rule)
    }

    /// A job's heartbeat URLs, if it has any.
    pub fn heartbeat(
        &self,
        map: &SourceMap<'_>,
        label: &str,
        url: Option<Spanned<SecretText>>,
        fail_url: Option<Spanned<SecretText>>,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<Heartbeat> {
        if url.is_none() && fail_url.is_none() {
            return None;
        }
        let url = url.and_then(|u| self.secret(map, label, "heartbeat_url", u, true, diags));
        let fail_url =
            fail_url.and_then(|u| self.secret(map, label, "heartbeat_fail_url", u, true, diags));
        Some(Heartbeat { url, fail_url })
    }
}

fn normalised(mut on: Vec<AlertOn>) -> Vec<AlertOn> {
    on.sort();
    on.dedup();
    on
}
