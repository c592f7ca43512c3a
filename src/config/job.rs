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
}

impl JobSpec {
    /// A run that never ends would block a `forbid` job forever; ten minutes is long
    /// for any periodic job and short enough to notice.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
}

#[cfg(test)]
mod tests {
    use super::*;

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
