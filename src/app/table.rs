//! The job table printed by `vigil check` and `vigil jobs`.

use chrono::{DateTime, Utc};

use std::collections::BTreeMap;

use crate::config::{JobSpec, Notifier};

/// Fire times shown per job.
pub const UPCOMING: usize = 3;

/// The jobs and their next fire times on `host` (with its jitter, when the job has
/// one).
pub fn jobs_table(jobs: &[JobSpec], now: DateTime<Utc>, host: &str) -> String {
    let headers = [
        "NAME",
        "KIND",
        "SCHEDULE",
        "ENABLED",
        "SCOPE",
        "NEXT (UTC)",
        "NEXT (JOB TIME ZONE)",
    ];
    let mut rows: Vec<[String; 7]> = Vec::new();
    for job in jobs {
        // Shown for disabled jobs too: it is how to check a schedule before enabling it.
        let jitter = chrono::Duration::from_std(job.jitter_on(host)).unwrap_or_default();
        let upcoming: Vec<DateTime<Utc>> = job
            .schedule
            .upcoming(now, UPCOMING)
            .into_iter()
            .map(|t| t + jitter)
            .collect();
        let tz = job.schedule.tz();
        let fmt_utc = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%SZ").to_string();
        let fmt_local = |t: &DateTime<Utc>| {
            t.with_timezone(&tz)
                .format("%Y-%m-%d %H:%M:%S %Z")
                .to_string()
        };
        let first_utc = upcoming
            .first()
            .map(fmt_utc)
            .unwrap_or_else(|| "never".into());
        let first_local = upcoming.first().map(fmt_local).unwrap_or_default();
        rows.push([
            job.name.clone(),
            job.kind.to_string(),
            job.schedule.to_string(),
            if job.enabled { "yes" } else { "no" }.into(),
            job.scope.as_str().into(),
            first_utc,
            first_local,
        ]);
        for t in upcoming.iter().skip(1) {
            rows.push([
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                fmt_utc(t),
                fmt_local(t),
            ]);
        }
    }
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&headers);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// `vigil jobs`: which jobs are paused (through the API), or why that is not known.
pub fn pauses_table(pauses: &super::Pauses) -> String {
    match pauses {
        super::Pauses::Unknown(why) => format!("\nPAUSED: not known here: {why}\n"),
        super::Pauses::Known(p) if p.is_empty() => "\nPAUSED: none\n".to_owned(),
        super::Pauses::Known(p) => {
            let width = p.keys().map(String::len).max().unwrap_or(0);
            let mut out = "\nPAUSED\n".to_owned();
            for (job, until) in p {
                let until = until.map_or_else(
                    || "until resumed".to_owned(),
                    |u| format!("until {}", u.format("%Y-%m-%d %H:%M:%SZ")),
                );
                out.push_str(&format!("{job:<width$}  {until}\n"));
            }
            out
        }
    }
}

/// Each job's alert rule and heartbeat, then the notifiers (by name, kind and where
/// they deliver; never a secret). Empty when the file has none.
pub fn alerts_table(jobs: &[JobSpec], notifiers: &BTreeMap<String, Notifier>) -> String {
    let mut out = String::new();
    let with_rules: Vec<&JobSpec> = jobs
        .iter()
        .filter(|j| j.alert.is_some() || j.heartbeat.is_some())
        .collect();
    if !with_rules.is_empty() {
        let width = with_rules.iter().map(|j| j.name.len()).max().unwrap_or(0);
        out.push_str("\nALERTS\n");
        for j in with_rules {
            let mut what = j
                .alert
                .as_ref()
                .map_or_else(|| "no alert rule".to_owned(), ToString::to_string);
            if let Some(hb) = &j.heartbeat {
                let mut calls = Vec::new();
                if hb.url.is_some() {
                    calls.push("on success");
                }
                if hb.fail_url.is_some() {
                    calls.push("on failure");
                }
                what.push_str(&format!("; heartbeat {}", calls.join(" and ")));
            }
            out.push_str(&format!("{:<width$}  {what}\n", j.name));
        }
    }
    if !notifiers.is_empty() {
        let width = notifiers.keys().map(String::len).max().unwrap_or(0);
        out.push_str("\nNOTIFIERS\n");
        for (name, n) in notifiers {
            out.push_str(&format!(
                "{name:<width$}  {:<7}  {}\n",
                n.kind_name(),
                n.target()
            ));
        }
    }
    out
}
