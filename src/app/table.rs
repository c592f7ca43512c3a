//! The job table printed by `vigil check` and `vigil jobs`.

use chrono::{DateTime, Utc};

use crate::config::JobSpec;

/// Fire times shown per job.
pub const UPCOMING: usize = 3;

pub fn jobs_table(jobs: &[JobSpec], now: DateTime<Utc>) -> String {
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
        let upcoming = job.schedule.upcoming(now, UPCOMING);
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
