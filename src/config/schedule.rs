//! When a job fires: a 6-field cron expression in a time zone, or a fixed interval.
//!
//! The scheduler asks only one question of a schedule: "what is the first firing
//! strictly after this instant?". Answering it here, rather than inside
//! tokio-cron-scheduler, is what makes named time zones correct: that crate turns a
//! zone into the fixed UTC offset in force when the job is created, so every job
//! drifts by an hour after the next DST change.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone as _, Timelike as _, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::{Cron, JobType};
use serde::{Deserialize, Deserializer, de::Error as _};

/// The shortest interval accepted for `every`.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// A parsed, validated cron expression (with seconds).
#[derive(Clone)]
pub struct CronExpr {
    source: String,
    // Boxed: croner's parsed pattern is a few hundred bytes.
    cron: Box<Cron>,
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronExpr({:?})", self.source)
    }
}

impl PartialEq for CronExpr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl CronExpr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let trimmed = s.trim();
        if !trimmed.starts_with('@') {
            let fields = trimmed.split_whitespace().count();
            if fields != 6 {
                return Err(format!(
                    "invalid cron expression {s:?}: expected 6 fields (second minute hour day-of-month month day-of-week), found {fields}"
                ));
            }
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .year(Year::Disallowed)
            .build()
            .parse(trimmed)
            .map_err(|e| format!("invalid cron expression {s:?}: {e}"))?;
        Ok(Self {
            source: trimmed.to_owned(),
            cron: Box::new(cron),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl<'de> Deserialize<'de> for CronExpr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CronExpr::parse(&s).map_err(D::Error::custom)
    }
}

/// An IANA time zone name ("Europe/Berlin", "UTC").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeZone(pub Tz);

impl TimeZone {
    pub fn parse(s: &str) -> Result<Self, String> {
        s.parse::<Tz>().map(TimeZone).map_err(|_| {
            format!(
                "unknown time zone {s:?}: use an IANA name such as \"UTC\" or \"Europe/Berlin\""
            )
        })
    }
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TimeZone::parse(&s).map_err(D::Error::custom)
    }
}

/// A job's schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Fires at every local wall-clock time the expression matches, in `tz`.
    Cron { expr: CronExpr, tz: Tz },
    /// Fires at every whole multiple of `period` since the Unix epoch, so `every = "1m"`
    /// fires on the minute and firing times are the same on every replica and restart.
    Every { period: Duration },
}

impl Schedule {
    /// The first firing strictly after `after`, or `None` if there is none.
    ///
    /// Cron in a named zone fires once per matching local time: in a fall-back hour
    /// only the first occurrence of a repeated local time fires; a fixed time that a
    /// spring-forward gap skips fires at the first instant after the gap (as Vixie
    /// cron does), while repeating patterns simply have no firings inside the gap.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every { period } => {
                let period_ms = i64::try_from(period.as_millis()).ok()?.max(1);
                let t = after.timestamp_millis();
                let next = (t.div_euclid(period_ms) + 1).checked_mul(period_ms)?;
                DateTime::from_timestamp_millis(next)
            }
            Schedule::Cron { expr, tz } => next_cron(&expr.cron, *tz, after),
        }
    }

    /// The next `n` firings after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    /// The latest firing in `(after, upto]`, or `None` if there is none; catch-up uses
    /// it to find the one missed firing to run. Looks back through growing windows so a
    /// dense schedule missed for a long time costs little.
    pub fn latest_in(&self, after: DateTime<Utc>, upto: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if upto <= after {
            return None;
        }
        if let Schedule::Every { period } = self {
            let period_ms = i64::try_from(period.as_millis()).ok()?.max(1);
            let t = upto.timestamp_millis().div_euclid(period_ms) * period_ms;
            let latest = DateTime::from_timestamp_millis(t)?;
            return (latest > after).then_some(latest);
        }
        const WINDOWS_HOURS: [i64; 5] = [1, 24, 24 * 32, 24 * 366, 24 * 366 * 5];
        const MAX_STEPS: usize = 100_000;
        for hours in WINDOWS_HOURS {
            let start = after.max(upto - chrono::Duration::hours(hours));
            let mut latest = None;
            let mut t = start;
            for _ in 0..MAX_STEPS {
                match self.next_after(t) {
                    Some(next) if next <= upto => {
                        latest = Some(next);
                        t = next;
                    }
                    _ => break,
                }
            }
            if latest.is_some() || start == after {
                return latest;
            }
        }
        None
    }

    /// The usual time between firings (for sizing buffers): the period of `every`, or
    /// the gap between the next two cron firings.
    pub fn typical_interval(&self) -> Option<Duration> {
        match self {
            Schedule::Every { period } => Some(*period),
            Schedule::Cron { .. } => {
                let next = self.upcoming(Utc::now(), 2);
                (next.len() == 2)
                    .then(|| (next[1] - next[0]).to_std().ok())
                    .flatten()
            }
        }
    }

    /// The time zone firing times are shown in.
    pub fn tz(&self) -> Tz {
        match self {
            Schedule::Cron { tz, .. } => *tz,
            Schedule::Every { .. } => Tz::UTC,
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron { expr, tz } => write!(f, "cron \"{}\" {tz}", expr.as_str()),
            Schedule::Every { period } => {
                write!(f, "every {}", humantime::format_duration(*period))
            }
        }
    }
}

/// How many matching local times to examine before giving up. A per-second pattern
/// needs up to 3600 to get through a repeated fall-back hour.
const MAX_CRON_CANDIDATES: usize = 10_000;

/// Searches matching *local wall-clock times* in order (croner on a naive time labelled
/// UTC, which has no DST), and maps each to its first instant in `tz`. That first
/// instant grows with the local time, so the first candidate past `after` is the answer,
/// and a local time repeated by a fall-back can never fire twice.
fn next_cron(cron: &Cron, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let fixed_time = cron.determine_job_type() == JobType::FixedTime;
    // Cron has whole seconds; croner would carry `after`'s fraction into the result, and
    // replicas must compute the very same instant to claim a firing once.
    let mut local = after.with_timezone(&tz).naive_local().with_nanosecond(0)?;
    for _ in 0..MAX_CRON_CANDIDATES {
        let next_local = cron
            .find_next_occurrence(&Utc.from_utc_datetime(&local), false)
            .ok()?
            .naive_utc();
        let instant = match tz.from_local_datetime(&next_local) {
            LocalResult::Single(t) => Some(t),
            LocalResult::Ambiguous(first, _) => Some(first),
            LocalResult::None if fixed_time => first_instant_after_gap(tz, next_local),
            LocalResult::None => None,
        };
        if let Some(t) = instant.map(|t| t.with_timezone(&Utc))
            && t > after
        {
            return Some(t);
        }
        local = next_local;
    }
    None
}

/// The first existing instant after a local time that a spring-forward skipped.
/// Zone transitions happen on whole minutes, so stepping by minutes finds the gap's end.
fn first_instant_after_gap(tz: Tz, in_gap: NaiveDateTime) -> Option<DateTime<Tz>> {
    let mut m = in_gap.with_second(0)?;
    for _ in 0..(24 * 60) {
        m += chrono::Duration::minutes(1);
        if let Some(t) = tz.from_local_datetime(&m).earliest() {
            return Some(t);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn cron_firings_are_whole_seconds_whatever_the_fraction_of_now() {
        let schedule = cron("0 15 3 * * *", "Europe/Berlin");
        let a = schedule.next_after(utc("2026-11-27T05:37:08.613819402Z"));
        let b = schedule.next_after(utc("2026-11-27T05:37:08.000000001Z"));
        assert_eq!(a, Some(utc("2026-11-28T02:15:00Z")));
        assert_eq!(a, b);
        let every_second = cron("* * * * * *", "UTC");
        assert_eq!(
            every_second.next_after(utc("2026-11-27T05:37:08.5Z")),
            Some(utc("2026-11-27T05:37:09Z"))
        );
        assert_eq!(
            every_second.next_after(utc("2026-11-27T05:37:08Z")),
            Some(utc("2026-11-27T05:37:09Z"))
        );
    }

    fn cron(expr: &str, tz: &str) -> Schedule {
        Schedule::Cron {
            expr: CronExpr::parse(expr).unwrap(),
            tz: tz.parse().unwrap(),
        }
    }

    /// All firings whose local date is `day`, as local wall-clock strings with offsets.
    fn firings_on(s: &Schedule, day: NaiveDate) -> Vec<String> {
        let tz = s.tz();
        let start = day.and_hms_opt(0, 0, 0).unwrap() - chrono::Duration::hours(30);
        let mut t = Utc.from_utc_datetime(&start);
        let mut out = vec![];
        loop {
            t = s.next_after(t).unwrap();
            let local = t.with_timezone(&tz);
            if local.date_naive() > day {
                return out;
            }
            if local.date_naive() == day {
                out.push(local.format("%H:%M:%S%:z").to_string());
            }
        }
    }

    #[test]
    fn cron_requires_six_fields() {
        let err = CronExpr::parse("0 3 * * *").unwrap_err();
        assert!(err.contains("expected 6 fields"), "{err}");
        assert!(CronExpr::parse("0 0 3 * * *").is_ok());
        assert!(CronExpr::parse("0 0 3 * * * 2030").is_err());
        assert!(CronExpr::parse("@daily").is_ok());
        assert!(CronExpr::parse("0 61 * * * *").is_err());
    }

    #[test]
    fn unknown_time_zone_is_refused() {
        assert!(TimeZone::parse("Europe/Berlin").is_ok());
        assert!(
            TimeZone::parse("Mars/Olympus")
                .unwrap_err()
                .contains("unknown time zone")
        );
    }

    #[test]
    fn every_fires_on_multiples_of_the_period_since_the_epoch() {
        let s = Schedule::Every {
            period: Duration::from_secs(10),
        };
        assert_eq!(
            s.next_after(utc("2026-01-01T00:00:03Z")),
            Some(utc("2026-01-01T00:00:10Z"))
        );
        assert_eq!(
            s.next_after(utc("2026-01-01T00:00:10Z")),
            Some(utc("2026-01-01T00:00:20Z"))
        );
    }

    #[test]
    fn cron_in_utc_fires_at_the_matching_second() {
        let s = cron("30 0 3 * * *", "UTC");
        assert_eq!(
            s.upcoming(utc("2026-01-01T03:00:30Z"), 2),
            vec![utc("2026-01-02T03:00:30Z"), utc("2026-01-03T03:00:30Z")]
        );
    }

    #[test]
    fn daily_job_fires_once_on_a_spring_forward_day() {
        // Europe/Berlin: 2026-03-29 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
        let s = cron("0 30 2 * * *", "Europe/Berlin");
        let day = NaiveDate::from_ymd_opt(2026, 3, 29).unwrap();
        assert_eq!(firings_on(&s, day), vec!["03:00:00+02:00"]);
        // The days around it are unaffected.
        assert_eq!(
            firings_on(&s, day.pred_opt().unwrap()),
            vec!["02:30:00+01:00"]
        );
        assert_eq!(
            firings_on(&s, day.succ_opt().unwrap()),
            vec!["02:30:00+02:00"]
        );
    }

    #[test]
    fn daily_job_fires_once_on_a_fall_back_day() {
        // Europe/Berlin: 2026-10-25 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        let s = cron("0 30 2 * * *", "Europe/Berlin");
        let day = NaiveDate::from_ymd_opt(2026, 10, 25).unwrap();
        assert_eq!(firings_on(&s, day), vec!["02:30:00+02:00"]);
    }

    #[test]
    fn half_hourly_job_fires_once_per_local_time_across_dst() {
        let s = cron("0 */30 * * * *", "America/New_York");
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT.
        let spring = firings_on(&s, NaiveDate::from_ymd_opt(2026, 3, 8).unwrap());
        assert_eq!(spring.len(), 46, "{spring:?}");
        assert!(spring.iter().all(|t| !t.starts_with("02:")), "{spring:?}");
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:00 and 01:30 fire once each.
        let fall = firings_on(&s, NaiveDate::from_ymd_opt(2026, 11, 1).unwrap());
        assert_eq!(fall.len(), 48, "{fall:?}");
        let one_am: Vec<_> = fall.iter().filter(|t| t.starts_with("01:")).collect();
        assert_eq!(one_am, vec!["01:00:00-04:00", "01:30:00-04:00"]);
        let mut sorted = fall.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), fall.len());
    }

    #[test]
    fn next_after_is_strictly_increasing_through_transitions() {
        for (expr, tz) in [
            ("0 */30 * * * *", "Europe/Berlin"),
            ("*/20 * * * * *", "Europe/Berlin"),
            ("0 30 2 * * *", "Europe/Berlin"),
            ("0 0 * * * *", "Australia/Lord_Howe"),
        ] {
            let s = cron(expr, tz);
            let mut t = utc("2026-10-24T20:00:00Z");
            while t < utc("2026-10-25T06:00:00Z") {
                let next = s.next_after(t).unwrap();
                assert!(next > t, "{expr} {tz}: {next} after {t}");
                t = next;
            }
        }
    }

    #[test]
    fn impossible_cron_has_no_next_firing() {
        let s = cron("0 0 0 30 2 *", "UTC");
        assert_eq!(s.next_after(utc("2026-01-01T00:00:00Z")), None);
    }

    #[test]
    fn latest_missed_firing_is_found_for_both_schedule_kinds() {
        let every = Schedule::Every {
            period: Duration::from_secs(60),
        };
        assert_eq!(
            every.latest_in(utc("2026-01-01T00:00:00Z"), utc("2026-01-03T10:30:30Z")),
            Some(utc("2026-01-03T10:30:00Z"))
        );
        assert_eq!(
            every.latest_in(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T00:00:59Z")),
            None
        );
        let daily = cron("0 0 3 * * *", "UTC");
        assert_eq!(
            daily.latest_in(utc("2026-01-01T03:00:00Z"), utc("2026-03-01T12:00:00Z")),
            Some(utc("2026-03-01T03:00:00Z"))
        );
        assert_eq!(
            daily.latest_in(utc("2026-01-01T03:00:00Z"), utc("2026-01-02T02:59:59Z")),
            None
        );
        let yearly = cron("0 0 0 1 1 *", "UTC");
        assert_eq!(
            yearly.latest_in(utc("2020-06-01T00:00:00Z"), utc("2026-06-01T00:00:00Z")),
            Some(utc("2026-01-01T00:00:00Z"))
        );
    }
}
