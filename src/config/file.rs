//! Reading `jobs.toml`: syntax, structure and meaning, with every problem located.
//!
//! serde stops at the first error in a value. To report *all* problems in one go, a
//! job (or settings table) that fails is deserialized again with the offending key
//! removed, until it parses or nothing more can be attributed to a key.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::alerts::{AlertContext, Notifier, RawAlert, SecretText};
use super::diagnostic::{Diagnostic, Diagnostics, Origin, SourceMap};
use super::job::{CatchUp, JobSpec, Overlap, RetryConfig, RetryPolicy, Scope};
use super::kinds::{Kinds, SettingsReader};
use super::schedule::{CronExpr, MIN_EVERY, Schedule, TimeZone};
use super::settings::Environment;
use super::types::{HumanDuration, Slug};

/// A `[runner]` value, kept with where it was written; `settings` layers it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerEntry {
    pub key: String,
    pub value: config::ValueKind,
    pub origin: Origin,
}

/// A parsed and validated `jobs.toml`.
#[derive(Debug, Clone)]
pub struct JobsFile {
    pub path: PathBuf,
    pub runner: Vec<RunnerEntry>,
    pub jobs: Vec<JobSpec>,
    /// Where each job's `name` is written, for problems found after parsing (a job
    /// that cannot be built). Kept beside the specs, not in them: moving a job within
    /// the file does not change it.
    pub origins: HashMap<String, Origin>,
    /// Identifies the text this was read from, so a reload can tell whether the file
    /// really changed (within one process only).
    pub digest: u64,
    /// Valid choices worth a second look, located like problems.
    pub warnings: Vec<Diagnostic>,
    /// `[notifiers.<name>]`, by name.
    pub notifiers: std::collections::BTreeMap<String, Notifier>,
}

/// The [`JobsFile::digest`] of `text`.
pub fn digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Reads and validates `path`. On failure the `[runner]` entries that could be read are
/// still returned, so settings problems are reported alongside job problems.
pub fn load(
    path: &Path,
    kinds: &dyn Kinds,
    env: &Environment,
) -> Result<JobsFile, (Diagnostics, Vec<RunnerEntry>)> {
    let text = std::fs::read_to_string(path).map_err(|e| (unreadable(path, &e), Vec::new()))?;
    parse_keeping_runner(path, &text, kinds, env)
}

/// The problem reported when the jobs file cannot be read.
pub fn unreadable(path: &Path, e: &std::io::Error) -> Diagnostics {
    Diagnostics(vec![Diagnostic {
        origin: Origin::File {
            path: path.to_path_buf(),
            line: 1,
            col: 1,
        },
        job: None,
        message: format!("cannot read the jobs file: {e}"),
    }])
}

/// Validates `text` as the contents of `path` (used for messages only); secrets named
/// by `{ env = "…" }` are looked up in `env`.
pub fn parse(
    path: &Path,
    text: &str,
    kinds: &dyn Kinds,
    env: &Environment,
) -> Result<JobsFile, Diagnostics> {
    parse_keeping_runner(path, text, kinds, env).map_err(|(d, _)| d)
}

/// Like [`parse`], also returning the `[runner]` entries that could be read on failure.
pub fn parse_keeping_runner(
    path: &Path,
    text: &str,
    kinds: &dyn Kinds,
    env: &Environment,
) -> Result<JobsFile, (Diagnostics, Vec<RunnerEntry>)> {
    let map = SourceMap::new(path, text);
    let (doc, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        // A document that does not parse cannot be trusted any further.
        let diags = syntax_errors
            .iter()
            .map(|e| map.diagnostic(e.span(), None, syntax_message(e)))
            .collect();
        return Err((Diagnostics(diags), Vec::new()));
    }

    let mut diags = Vec::new();
    let mut warnings = Vec::new();
    let mut runner = Vec::new();
    let mut jobs_value = None;
    let (mut notifiers_value, mut alerts_value) = (None, None);
    for (key, value) in doc.into_inner() {
        match key.get_ref().as_ref() {
            "runner" => runner = runner_entries(&map, value, &mut diags),
            "jobs" => jobs_value = Some(value),
            "notifiers" => notifiers_value = Some(value),
            "alerts" => alerts_value = Some(value),
            other => diags.push(map.diagnostic(
                Some(key.span()),
                None,
                format!(
                    "unknown top-level key `{other}`, expected `runner`, `jobs`, `notifiers` or `alerts`"
                ),
            )),
        }
    }
    // Before the jobs: their rules name notifiers and inherit the defaults.
    let alerts = AlertContext::read(&map, notifiers_value, alerts_value, env, &mut diags);

    let mut jobs = Vec::new();
    let mut origins: HashMap<String, Origin> = HashMap::new();
    if let Some(value) = jobs_value {
        let span = value.span();
        match value.into_inner() {
            DeValue::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    let Some((spec, name_span)) = parse_job(
                        &map,
                        kinds,
                        &alerts,
                        index,
                        item.clone(),
                        &mut diags,
                        &mut warnings,
                    ) else {
                        continue;
                    };
                    if let Some(first) = origins.get(&spec.name) {
                        let first = match first {
                            Origin::File { line, .. } => *line,
                            _ => 0,
                        };
                        diags.push(map.diagnostic(
                            Some(name_span),
                            Some(format!("job \"{}\"", spec.name)),
                            format!(
                                "duplicate job name \"{}\" (first defined on line {first})",
                                spec.name
                            ),
                        ));
                    } else {
                        origins.insert(spec.name.clone(), map.origin_of(&name_span));
                        jobs.push(spec);
                    }
                }
            }
            _ => diags.push(map.diagnostic(
                Some(span),
                None,
                "`jobs` must be an array of tables: write each job under a `[[jobs]]` header",
            )),
        }
    }

    if diags.is_empty() {
        Ok(JobsFile {
            path: path.to_path_buf(),
            runner,
            jobs,
            origins,
            digest: digest(text),
            warnings,
            notifiers: alerts.notifiers,
        })
    } else {
        diags.sort_by_key(|d| match &d.origin {
            Origin::File { line, col, .. } => (*line, *col),
            _ => (0, 0),
        });
        Err((Diagnostics(diags), runner))
    }
}

fn syntax_message(e: &toml::de::Error) -> String {
    format!("invalid TOML: {}", e.message().trim_end())
}

fn runner_entries(
    map: &SourceMap<'_>,
    value: Spanned<DeValue<'_>>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<RunnerEntry> {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        diags.push(map.diagnostic(Some(span), None, "`runner` must be a table"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, value) in table {
        let origin = map.origin_of(&value.span());
        let span = value.span();
        let kind = match toml::Value::deserialize(ValueDeserializer::from(value)) {
            Ok(toml::Value::String(s)) => config::ValueKind::String(s),
            Ok(toml::Value::Integer(i)) => config::ValueKind::I64(i),
            Ok(toml::Value::Float(f)) => config::ValueKind::Float(f),
            Ok(toml::Value::Boolean(b)) => config::ValueKind::Boolean(b),
            Ok(other) => {
                diags.push(map.diagnostic(
                    Some(span),
                    None,
                    format!(
                        "[runner] {}: expected a string, number or boolean, found {}",
                        key.get_ref(),
                        other.type_str()
                    ),
                ));
                continue;
            }
            Err(e) => {
                diags.push(map.diagnostic(
                    e.span().or(Some(span)),
                    None,
                    format!("[runner] {}: {}", key.get_ref(), e.message().trim_end()),
                ));
                continue;
            }
        };
        out.push(RunnerEntry {
            key: key.get_ref().to_string(),
            value: kind,
            origin,
        });
    }
    out
}

/// The structure of a `[[jobs]]` entry as written; meaning is checked afterwards.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Spanned<Slug>,
    /// Read (and checked against the kinds) before deserializing; declared so that a
    /// missing or mistyped `kind` is reported like any other field.
    #[serde(rename = "kind")]
    _kind: Spanned<String>,
    cron: Option<Spanned<CronExpr>>,
    timezone: Option<Spanned<TimeZone>>,
    every: Option<Spanned<HumanDuration>>,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    timeout: Option<HumanDuration>,
    retries: Option<RetryConfig>,
    #[serde(default)]
    overlap: Overlap,
    #[serde(default)]
    catch_up: CatchUp,
    scope: Option<Scope>,
    max_concurrency: Option<Spanned<u32>>,
    jitter: Option<Spanned<HumanDuration>>,
    /// Taken out and read on their own (so their problems are reported whatever else
    /// is wrong with the job); declared so that unknown-key messages list them.
    #[serde(default, rename = "alert")]
    _alert: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "heartbeat_url")]
    _heartbeat_url: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "heartbeat_fail_url")]
    _heartbeat_fail_url: Option<serde::de::IgnoredAny>,
    /// Taken out before deserializing and parsed by the job's kind; declared so that
    /// unknown-key messages list it.
    #[serde(default, rename = "settings")]
    _settings: Option<serde::de::IgnoredAny>,
}

fn enabled_by_default() -> bool {
    true
}

/// How the user would recognise job number `index` in a message.
fn job_label(index: usize, table: &DeTable<'_>) -> String {
    match table.get("name").map(|v| v.get_ref()) {
        Some(DeValue::String(name)) => format!("job \"{name}\""),
        _ => format!("job #{}", index + 1),
    }
}

fn parse_job(
    map: &SourceMap<'_>,
    kinds: &dyn Kinds,
    alerts: &AlertContext<'_>,
    index: usize,
    item: Spanned<DeValue<'_>>,
    diags: &mut Vec<Diagnostic>,
    warnings: &mut Vec<Diagnostic>,
) -> Option<(JobSpec, Range<usize>)> {
    let header = item.span();
    let (span, value) = (item.span(), item.into_inner());
    let DeValue::Table(mut table) = value else {
        diags.push(map.diagnostic(
            Some(header),
            None,
            format!("jobs[{index}] must be a table: write it under a `[[jobs]]` header"),
        ));
        return None;
    };
    let errors_before = diags.len();
    let label = job_label(index, &table);
    let settings = take_key(&mut table, "settings");
    let alert_value = take_key(&mut table, "alert");
    let heartbeat_value = take_key(&mut table, "heartbeat_url");
    let heartbeat_fail_value = take_key(&mut table, "heartbeat_fail_url");
    // Read the kind up front so the settings are checked even if other fields are bad.
    let names = kinds.names();
    let kind: Option<&'static str> = match table.get("kind").map(|k| (k.span(), k.get_ref())) {
        Some((span, DeValue::String(k))) => match names.iter().find(|n| **n == k.as_ref()) {
            Some(name) => Some(*name),
            None => {
                diags.push(map.diagnostic(
                    Some(span.clone()),
                    Some(label.clone()),
                    format!(
                        "unknown job kind {:?}, expected one of {}",
                        k.as_ref(),
                        names
                            .iter()
                            .map(|n| format!("\"{n}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
                // Reported here; the structure check below need not say it again.
                table.remove("kind");
                table.insert(
                    Spanned::new(span.clone(), "kind".into()),
                    Spanned::new(span, DeValue::String("?".into())),
                );
                None
            }
        },
        _ => None,
    };

    let raw: Option<RawJob> = deserialize_collecting(
        map,
        &label,
        Spanned::new(span.clone(), DeValue::Table(table)),
        diags,
    );
    let settings_value =
        settings.unwrap_or_else(|| Spanned::new(header.clone(), DeValue::Table(DeTable::new())));
    let settings = kind.and_then(|kind| {
        let mut reader = SettingsReader {
            map,
            label: format!("{label} settings"),
            value: Some(settings_value),
            diags,
            warnings,
        };
        kinds.read_settings(kind, &mut reader)
    });
    // The alert rule and heartbeat, whatever else is wrong with the job.
    // What is left of a partly bad `alert` is still checked (its notifier names).
    let alert_raw: Option<RawAlert> = alert_value
        .and_then(|v| deserialize_pruning(map, &label, v, diags))
        .map(|(a, _)| a);
    let alert = alerts.rule(map, &label, alert_raw, diags);
    let secret_text = |v: Spanned<DeValue<'_>>, diags: &mut Vec<Diagnostic>| {
        let span = v.span();
        deserialize_collecting::<SecretText>(map, &label, v, diags).map(|t| Spanned::new(span, t))
    };
    let heartbeat_url = heartbeat_value.and_then(|v| secret_text(v, diags));
    let heartbeat_fail_url = heartbeat_fail_value.and_then(|v| secret_text(v, diags));
    let heartbeat = alerts.heartbeat(map, &label, heartbeat_url, heartbeat_fail_url, diags);
    let raw = raw?;
    let job = Some(label.clone());

    let schedule = match (&raw.cron, &raw.every) {
        (Some(_), Some(every)) => {
            diags.push(map.diagnostic(
                Some(every.span()),
                job.clone(),
                "a job takes exactly one of `cron` and `every`, not both",
            ));
            None
        }
        (None, None) => {
            diags.push(map.diagnostic(
                Some(header.clone()),
                job.clone(),
                "a job needs a schedule: set `cron` (6 fields, with seconds) or `every` (like \"10s\")",
            ));
            None
        }
        (Some(cron), None) => {
            let tz = raw
                .timezone
                .as_ref()
                .map_or(chrono_tz::Tz::UTC, |t| t.get_ref().0);
            let schedule = Schedule::Cron {
                expr: cron.get_ref().clone(),
                tz,
            };
            if schedule.next_after(chrono::Utc::now()).is_none() {
                diags.push(map.diagnostic(
                    Some(cron.span()),
                    job.clone(),
                    format!(
                        "cron expression \"{}\" never fires",
                        cron.get_ref().as_str()
                    ),
                ));
            }
            Some(schedule)
        }
        (None, Some(every)) => {
            if let Some(tz) = &raw.timezone {
                diags.push(map.diagnostic(
                    Some(tz.span()),
                    job.clone(),
                    "`timezone` applies only to `cron` schedules; `every` counts real time",
                ));
            }
            if every.get_ref().get() < MIN_EVERY {
                diags.push(map.diagnostic(
                    Some(every.span()),
                    job.clone(),
                    format!(
                        "`every` must be at least {}",
                        humantime::format_duration(MIN_EVERY)
                    ),
                ));
            }
            Some(Schedule::Every {
                period: every.get_ref().get(),
            })
        }
    };

    let retries = retry_policy(map, &job, raw.retries.unwrap_or_default(), &header, diags);
    if let Some(n) = &raw.max_concurrency {
        if !(1..=JobSpec::MAX_CONCURRENCY_LIMIT).contains(n.get_ref()) {
            diags.push(map.diagnostic(
                Some(n.span()),
                job.clone(),
                format!(
                    "max_concurrency must be between 1 and {}, found {}",
                    JobSpec::MAX_CONCURRENCY_LIMIT,
                    n.get_ref()
                ),
            ));
        } else if raw.overlap != Overlap::Allow {
            diags.push(map.diagnostic(
                Some(n.span()),
                job.clone(),
                "max_concurrency limits overlapping runs: it needs overlap = \"allow\" \
                 (forbid and replace already allow one run at a time)",
            ));
        }
    }
    if let (Some(jitter), Some(schedule)) = (&raw.jitter, &schedule)
        && let Some(interval) = schedule.typical_interval()
        && jitter.get_ref().get() >= interval
    {
        diags.push(map.diagnostic(
            Some(jitter.span()),
            job.clone(),
            format!(
                "jitter {} must be shorter than the time between firings ({})",
                jitter.get_ref(),
                humantime::format_duration(interval)
            ),
        ));
    }
    if let Some(rule) = &alert
        && rule.is_active()
        && rule.notify.is_empty()
    {
        warnings.push(map.diagnostic(
            Some(header.clone()),
            job.clone(),
            "alert: incidents are recorded and served, but no notifier is told (set \
             alert.notify, or notify in [alerts])",
        ));
    }

    if diags.len() > errors_before {
        return None;
    }
    let kind = kind?;
    Some((
        JobSpec {
            name: raw.name.get_ref().to_string(),
            kind,
            schedule: schedule?,
            enabled: raw.enabled,
            timeout: raw
                .timeout
                .map_or(JobSpec::DEFAULT_TIMEOUT, HumanDuration::get),
            retries,
            overlap: raw.overlap,
            catch_up: raw.catch_up,
            scope: raw.scope.unwrap_or_else(|| kinds.default_scope(kind)),
            settings: settings?,
            alert,
            heartbeat,
            max_concurrency: raw.max_concurrency.map(Spanned::into_inner),
            jitter: raw.jitter.map(|j| j.into_inner().get()),
        },
        raw.name.span(),
    ))
}

fn retry_policy(
    map: &SourceMap<'_>,
    job: &Option<String>,
    raw: RetryConfig,
    header: &Range<usize>,
    diags: &mut Vec<Diagnostic>,
) -> RetryPolicy {
    let default = RetryPolicy::default();
    let policy = RetryPolicy {
        max_attempts: raw.max_attempts.map_or(default.max_attempts, |a| a.0),
        initial_backoff: raw
            .initial_backoff
            .map_or(default.initial_backoff, HumanDuration::get),
        max_backoff: raw.max_backoff.map_or(
            default.max_backoff.max(
                raw.initial_backoff
                    .map_or(default.initial_backoff, HumanDuration::get),
            ),
            HumanDuration::get,
        ),
    };
    if policy.max_backoff < policy.initial_backoff {
        diags.push(map.diagnostic(
            Some(header.clone()),
            job.clone(),
            "retries.max_backoff must not be shorter than retries.initial_backoff",
        ));
    }
    policy
}

/// Cross-field checks a kind's settings do on themselves after deserializing.
pub trait Validate {
    /// Problems as (span, message); an empty list means valid.
    fn validate(&self) -> Vec<(Option<Range<usize>>, String)>;

    /// Choices that are valid but worth a second look (as (span, message)):
    /// `vigil check` prints them, `vigil run` logs them.
    fn warnings(&self) -> Vec<(Option<Range<usize>>, String)> {
        Vec::new()
    }
}

pub(super) fn check<T: Validate>(
    map: &SourceMap<'_>,
    label: &str,
    config: T,
    diags: &mut Vec<Diagnostic>,
    warnings: &mut Vec<Diagnostic>,
) -> Option<T> {
    let problems = config.validate();
    if problems.is_empty() {
        for (span, message) in config.warnings() {
            warnings.push(map.diagnostic(span, Some(label.to_owned()), message));
        }
        return Some(config);
    }
    for (span, message) in problems {
        diags.push(map.diagnostic(span, Some(label.to_owned()), message));
    }
    None
}

/// Upper bound on re-deserializations of one value; each removes one bad key.
const MAX_ATTEMPTS_PER_VALUE: usize = 64;

/// Deserializes `value`, recording every error it can attribute to a key.
pub(super) fn deserialize_collecting<'i, T: Deserialize<'i>>(
    map: &SourceMap<'_>,
    label: &str,
    value: Spanned<DeValue<'i>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<T> {
    match deserialize_pruning(map, label, value, diags) {
        Some((v, true)) => Some(v),
        _ => None,
    }
}

/// Like [`deserialize_collecting`], also returning what is left once the bad keys are
/// removed (`false`: keys were removed), for values whose other parts are still worth
/// checking (every field optional).
pub(super) fn deserialize_pruning<'i, T: Deserialize<'i>>(
    map: &SourceMap<'_>,
    label: &str,
    mut value: Spanned<DeValue<'i>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<(T, bool)> {
    let whole = value.span();
    let mut removed: BTreeSet<String> = BTreeSet::new();
    for _ in 0..MAX_ATTEMPTS_PER_VALUE {
        let err = match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(v) => return Some((v, removed.is_empty())),
            Err(e) => e,
        };
        let message = err.message().trim_end().to_owned();
        // "missing field" for a key we already reported as wrong would be noise.
        if removed.iter().any(|path| {
            let leaf = path.rsplit('.').next().unwrap_or(path);
            message == format!("missing field `{leaf}`")
        }) {
            return None;
        }
        let span = err.span().unwrap_or_else(|| whole.clone());
        diags.push(map.diagnostic(Some(span.clone()), Some(label.to_owned()), message));
        match prune(value.get_mut(), &span) {
            Some(key) => {
                removed.insert(key);
            }
            None => return None,
        }
    }
    None
}

/// Removes the innermost table entry whose key or value contains `span`; returns its key.
fn prune(value: &mut DeValue<'_>, span: &Range<usize>) -> Option<String> {
    let contains = |r: &Range<usize>| r.start <= span.start && span.end <= r.end.max(r.start + 1);
    match value {
        DeValue::Table(table) => {
            let key = table
                .iter()
                .find(|(k, v)| contains(&k.span()) || contains(&v.span()))
                .map(|(k, _)| k.clone())?;
            if let Some(v) = table.get_mut(key.get_ref().as_ref())
                && !contains(&key.span())
                && let Some(inner) = prune(v.get_mut(), span)
            {
                return Some(format!("{}.{inner}", key.get_ref()));
            }
            table.remove(key.get_ref().as_ref());
            Some(key.get_ref().to_string())
        }
        DeValue::Array(items) => items
            .iter_mut()
            .find(|v| contains(&v.span()))
            .and_then(|v| prune(v.get_mut(), span)),
        _ => None,
    }
}

fn take_key<'i>(table: &mut DeTable<'i>, key: &str) -> Option<Spanned<DeValue<'i>>> {
    table.remove(key)
}

/// A stand-in for the real kinds, for config's own tests: config knows none.
#[cfg(test)]
pub(super) mod test_kinds {
    use super::super::kinds::JobSettings;
    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CommandSettings {
        pub command: Vec<String>,
    }

    impl Validate for CommandSettings {
        fn validate(&self) -> Vec<(Option<Range<usize>>, String)> {
            Vec::new()
        }
    }

    /// One kind, `command`, with a `command` list.
    pub struct Commands;

    impl Kinds for Commands {
        fn names(&self) -> Vec<&'static str> {
            vec!["command"]
        }
        fn default_scope(&self, _kind: &str) -> Scope {
            Scope::Cluster
        }
        fn read_settings(
            &self,
            _kind: &str,
            reader: &mut SettingsReader<'_, '_>,
        ) -> Option<JobSettings> {
            reader.read::<CommandSettings>().map(JobSettings::new)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_job_is_located_by_its_name() {
        let text = "[[jobs]]\nname = \"a\"\nkind = \"command\"\nevery = \"1s\"\n[jobs.settings]\ncommand = [\"true\"]\n\n[[jobs]]\n  name = 'b'\nkind = \"command\"\nevery = \"1s\"\n[jobs.settings]\ncommand = [\"true\"]\n";
        let file = parse(
            Path::new("jobs.toml"),
            text,
            &test_kinds::Commands,
            &Environment::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(file.origins["a"].to_string(), "jobs.toml:2:8");
        assert_eq!(file.origins["b"].to_string(), "jobs.toml:9:10");
        assert_eq!(file.origins.len(), 2);
    }
}
