//! The validated model of one `[[jobs]]` entry.

use std::time::Duration;

use serde::Deserialize;

use super::alerts::{AlertRule, Heartbeat};
use super::kinds::JobSettings;
use super::schedule::Schedule;
use super::types::HumanDuration;

/// What happens when a job fires while an earlier run of it is still going.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Refuse the new firing; it is recorded `skipped` with the running run's id.
    #[default]
    Forbid,
    /// Start the new run beside the old one.
    Allow,
    /// Cancel the running run, then start the new one.
    Replace,
}

/// What to do at start-up about firings missed while vigil was not running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Forget them; wait for the next firing.
    #[default]
    Skip,
    /// Run once at start-up for the latest missed firing, however many were missed.
    Once,
}

/// Where a job runs when several vigil replicas share one database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Once per firing across all replicas, and never two runs at once: the replica
    /// that claims the firing runs it under a PostgreSQL advisory lock.
    Cluster,
    /// On every replica (host metrics).
    Host,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Cluster => "cluster",
            Scope::Host => "host",
        }
    }
}

/// `retries = { max_attempts = 3, initial_backoff = "1s", max_backoff = "1m" }`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    pub max_attempts: Option<Attempts>,
    pub initial_backoff: Option<HumanDuration>,
    pub max_backoff: Option<HumanDuration>,
}

/// `retries.max_attempts`, checked while it is read so the error points at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts(pub u32);

impl<'de> Deserialize<'de> for Attempts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        match u32::try_from(n) {
            Ok(n) if (1..=RetryPolicy::MAX_ATTEMPTS_LIMIT).contains(&n) => Ok(Attempts(n)),
            _ => Err(serde::de::Error::custom(format!(
                "max_attempts must be between 1 and {}, found {n}",
                RetryPolicy::MAX_ATTEMPTS_LIMIT
            ))),
        }
    }
}

/// How a failed run is retried: attempt `n + 1` starts `initial * 2^(n-1)` (capped at
/// `max_backoff`) after attempt `n` failed or timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// One attempt, no retry: a job is retried only when its author asks for it.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 1;
    /// Upper bound on attempts, so a typo cannot retry a failing job forever.
    pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);

    /// The pause before attempt `next_attempt` (2 or more).
    pub fn backoff_before(&self, next_attempt: u32) -> Duration {
        let doublings = next_attempt.saturating_sub(2).min(30);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
        }
    }
}

/// One job, fully validated.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub name: String,
    /// The kind's name, as the kinds in use know it.
    pub kind: &'static str,
    pub schedule: Schedule,
    pub enabled: bool,
    /// Limit on one attempt; the attempt is cancelled and recorded `timed_out`.
    pub timeout: Duration,
    pub retries: RetryPolicy,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub scope: Scope,
    /// The kind's own settings; the kind reads them back with [`JobSettings::get`].
    pub settings: JobSettings,
    /// When the job's health opens an incident, and who is told (`[alerts]` merged).
    pub alert: Option<AlertRule>,
    /// URLs called after each run, for a watcher outside vigil.
    pub heartbeat: Option<Heartbeat>,
    /// With `overlap = "allow"`: at most this many runs at once (across replicas for
    /// `cluster` jobs); beyond it a manual trigger is refused (429), a firing skipped.
    pub max_concurrency: Option<u32>,
    /// Up to this much delay after each firing's instant, fixed per job and host, so
    /// many jobs and replicas do not all start in the same second.
    pub jitter: Option<Duration>,
}

impl JobSpec {
    /// A run that never ends would block a `forbid` job forever; ten minutes is long
    /// for any periodic job and short enough to notice.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
    /// More concurrent runs than this is a typo, not a plan (each cluster slot is a
    /// PostgreSQL advisory lock).
    pub const MAX_CONCURRENCY_LIMIT: u32 = 1000;

    /// This job's delay on `host`: the same on every start and every build (FNV-1a of
    /// job and host), below `jitter`.
    pub fn jitter_on(&self, host: &str) -> Duration {
        let Some(jitter) = self.jitter else {
            return Duration::ZERO;
        };
        let mut h = 0xcbf2_9ce4_8422_2325_u64;
        for b in self.name.bytes().chain([0]).chain(host.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let span = u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX).max(1);
        Duration::from_millis(h % span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_stable_per_job_and_host_and_below_its_bound() {
        let text = "[[jobs]]\nname = \"a\"\nkind = \"command\"\nevery = \"1m\"\njitter = \"30s\"\n[jobs.settings]\ncommand = [\"true\"]\n";
        let spec = super::super::file::parse(
            std::path::Path::new("t.toml"),
            text,
            &super::super::file::test_kinds::Commands,
            &super::super::settings::Environment::default(),
        )
        .unwrap()
        .jobs
        .remove(0);
        let a = spec.jitter_on("host-a");
        assert_eq!(a, spec.jitter_on("host-a"), "stable");
        assert_eq!(
            a.as_millis(),
            6_400,
            "pinned: every build, replica and restart agree"
        );
        let spread: std::collections::BTreeSet<u128> = (0..50)
            .map(|i| spec.jitter_on(&format!("host-{i}")).as_millis())
            .collect();
        assert!(spread.len() > 40, "hosts spread out: {spread:?}");
        assert!(spread.iter().all(|ms| *ms < 30_000));
    }

    #[test]
    fn backoff_doubles_from_the_initial_value_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        let got: Vec<u128> = (2..=6).map(|a| p.backoff_before(a).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 500, 500]);
        // Huge attempt numbers neither overflow nor exceed the cap.
        assert_eq!(p.backoff_before(u32::MAX), Duration::from_millis(500));
    }
}
