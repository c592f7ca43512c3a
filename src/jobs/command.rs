//! `command`: runs a program, like a crontab line, under vigil's governance.
//!
//! Its output becomes log events of the run (stdout at info, stderr at warn), and a
//! cancelled run (timeout, replacement, shutdown) kills the whole process group.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::process::Stdio;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use toml::Spanned;

use super::{Job, JobError, RunContext, RunOutcome};
use crate::config::Validate;

/// ```toml
/// [jobs.settings]
/// command = ["pg_dump", "--file=/backups/vigil.sql", "vigil"]
/// env = { PGHOST = "db" }
/// workdir = "/var/lib/vigil"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Program and arguments; no shell is involved unless you name one.
    pub command: Spanned<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
}

impl Validate for CommandConfig {
    fn validate(&self) -> Vec<(Option<Range<usize>>, String)> {
        match self.command.get_ref().first() {
            Some(program) if !program.is_empty() => Vec::new(),
            _ => vec![(
                Some(self.command.span()),
                "`command` must name a program, e.g. [\"sh\", \"-c\", \"echo hi\"]".into(),
            )],
        }
    }
}

pub struct CommandJob {
    config: CommandConfig,
}

impl CommandJob {
    pub fn new(config: CommandConfig) -> Self {
        Self { config }
    }
}

/// How much of stderr a failure message quotes.
const STDERR_TAIL_LINES: usize = 20;

/// Kills the child's process group when the run is dropped before the child exits.
struct GroupGuard {
    pgid: Option<nix::unistd::Pid>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[async_trait::async_trait]
impl Job for CommandJob {
    async fn run(&self, _ctx: RunContext) -> Result<RunOutcome, JobError> {
        let argv = self.config.command.get_ref();
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| JobError::Failed("empty command".into()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(&self.config.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.config.workdir {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| JobError::Failed(format!("cannot start {program:?}: {e}")))?;
        let mut guard = GroupGuard {
            pgid: child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(nix::unistd::Pid::from_raw),
        };

        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let out_task = async {
            if let Some(out) = stdout {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(stream = "stdout", "{line}");
                }
            }
        };
        let err_task = async {
            let mut tail = std::collections::VecDeque::new();
            if let Some(err) = stderr {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(stream = "stderr", "{line}");
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
            tail
        };
        let ((), tail, status) = tokio::join!(out_task, err_task, child.wait());
        let status =
            status.map_err(|e| JobError::Failed(format!("waiting for {program:?}: {e}")))?;
        // The leader exited; stragglers in its group are no longer ours to kill.
        guard.pgid = None;
        if status.success() {
            return Ok(RunOutcome::Completed { items: None });
        }
        let tail: Vec<String> = tail.into_iter().collect();
        let mut message = format!("{program:?} {status}");
        if !tail.is_empty() {
            message.push_str(": ");
            message.push_str(&tail.join("\n"));
        }
        Err(JobError::Failed(message))
    }
}
