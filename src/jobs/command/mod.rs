//! `command`: runs a program, like a crontab line, under vigil's governance.
//!
//! Its output becomes log events of the run (stdout at info, stderr at warn). Nothing
//! the program does can hurt vigil:
//! - output is read as bytes in chunks, invalid UTF-8 replaced, each line cut at
//!   `max_line_bytes` and the run's logged output at `max_log_bytes`; beyond that the
//!   pipes are still drained (and the amount counted), so the program never blocks on
//!   a full pipe and vigil's memory does not grow with what it prints;
//! - when the program exits, whatever it left running in its process group (a
//!   backgrounded child) is killed and reaped, so the run ends with it: no orphan, no
//!   zombie, no pipe held open;
//! - a cancelled run (timeout, replacement, shutdown) kills the whole process group.
//!
//! What the run used (CPU, peak memory, I/O of its whole process tree) is measured by
//! the kernel (`resources`) and recorded with the run.

mod resources;

pub use resources::{Meter, Place, place as cgroup_place};

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::Deserialize;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use toml::Spanned;

use super::{Deps, Job, JobError, Kind, RunContext, RunOutcome};
use crate::config::{JobSettings, JobSpec, Scope, Validate};

/// Work done once per firing across replicas.
pub const KIND: Kind = Kind {
    name: "command",
    default_scope: Scope::Cluster,
    read: |r| r.read::<CommandConfig>().map(JobSettings::new),
    build,
    input: super::InputSpec {
        schema: || {
            serde_json::json!({
                "description": "Any JSON: the program reads it on stdin."
            })
        },
        check: |_| Ok(()),
    },
};

fn build(spec: &JobSpec, deps: &Deps) -> Result<std::sync::Arc<dyn Job>, JobError> {
    let c: &CommandConfig = super::settings(spec)?;
    let base_env = deps.env.for_programs(*c.inherit_env.get_ref());
    let mut job = CommandJob::with_env(c.clone(), base_env);
    job.cgroups = deps.run_cgroups;
    Ok(std::sync::Arc::new(job))
}

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
    /// Give the program vigil's whole environment, secrets included, instead of only
    /// `PATH`, `HOME`, `LANG`, `LC_*`, `TZ` and the job's `env`.
    #[serde(default = "no_inherit")]
    pub inherit_env: Spanned<bool>,
    /// Longest output line logged; the rest of a longer line is cut (and counted).
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: Spanned<usize>,
    /// Most output logged per run (stdout and stderr together); the rest is read and
    /// counted, not logged.
    #[serde(default = "default_max_log_bytes")]
    pub max_log_bytes: Spanned<usize>,
    /// Most of stdout kept as the run's output (returned to whoever invoked it); the
    /// rest is read and counted.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: Spanned<usize>,
}

/// 16 KiB: longer than any sensible log line, short enough to log as one event.
pub const DEFAULT_MAX_LINE_BYTES: usize = 16 << 10;
/// 1 MiB a run: a chatty job's whole story, not a runaway's flood.
pub const DEFAULT_MAX_LOG_BYTES: usize = 1 << 20;
/// 1 MiB of stdout kept as the run's output.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;
const MAX_LIMIT: usize = 1 << 30;

fn no_inherit() -> Spanned<bool> {
    Spanned::new(0..0, false)
}
fn default_max_line_bytes() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_MAX_LINE_BYTES)
}
fn default_max_log_bytes() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_MAX_LOG_BYTES)
}
fn default_max_output_bytes() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_MAX_OUTPUT_BYTES)
}

impl Validate for CommandConfig {
    fn validate(&self) -> Vec<(Option<Range<usize>>, String)> {
        let mut problems = Vec::new();
        match self.command.get_ref().first() {
            Some(program) if !program.is_empty() => {}
            _ => problems.push((
                Some(self.command.span()),
                "`command` must name a program, e.g. [\"sh\", \"-c\", \"echo hi\"]".into(),
            )),
        }
        for (name, value, min) in [
            ("max_line_bytes", &self.max_line_bytes, 1),
            ("max_log_bytes", &self.max_log_bytes, 1),
            ("max_output_bytes", &self.max_output_bytes, 0),
        ] {
            if !(min..=MAX_LIMIT).contains(value.get_ref()) {
                problems.push((
                    Some(value.span()),
                    format!(
                        "`{name}` must be between {min} and {MAX_LIMIT}, found {}",
                        value.get_ref()
                    ),
                ));
            }
        }
        problems
    }

    fn warnings(&self) -> Vec<(Option<Range<usize>>, String)> {
        if *self.inherit_env.get_ref() {
            vec![(
                Some(self.inherit_env.span()),
                "inherit_env = true gives the program vigil's whole environment, its \
                 secrets (DATABASE_URL, MONGO_URI, VIGIL_API_TOKEN, …) included; prefer \
                 naming what it needs in `env`"
                    .into(),
            )]
        } else {
            Vec::new()
        }
    }
}

pub struct CommandJob {
    config: CommandConfig,
    /// The part of vigil's environment the program gets.
    base_env: Vec<(String, String)>,
    /// Whether each run may get a cgroup of its own (see `resources`).
    cgroups: bool,
}

impl CommandJob {
    /// A job whose program gets no environment but the job's `env` and vigil's run
    /// variables.
    pub fn new(config: CommandConfig) -> Self {
        Self::with_env(config, Vec::new())
    }

    /// A job whose program also gets `base_env` (see `Environment::for_programs`).
    pub fn with_env(config: CommandConfig, base_env: Vec<(String, String)>) -> Self {
        Self {
            config,
            base_env,
            cgroups: false,
        }
    }

    /// Measures each run in a cgroup of its own where the machine allows (`true`), or
    /// by its process tree.
    pub fn with_run_cgroups(mut self, cgroups: bool) -> Self {
        self.cgroups = cgroups;
        self
    }
}

/// Waits for `pid` and reaps it, with what the kernel says it and the children it
/// waited for used. Blocking: run on a blocking thread.
fn wait_for(pid: i32) -> std::io::Result<(std::process::ExitStatus, resources::Usage)> {
    loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid value for wait4 to fill in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 writes only into the two locals it is given.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            return Ok((
                std::process::ExitStatus::from_raw(status),
                resources::Usage::from_rusage(&usage),
            ));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How much of stderr a failure message quotes.
const STDERR_TAIL_LINES: usize = 20;
/// And at most this many bytes of it.
const STDERR_TAIL_BYTES: usize = 4096;
/// Bytes read from a pipe at a time.
const CHUNK: usize = 64 << 10;
/// How long to keep reading after the program and its group are gone: a process
/// outside the group (one that called `setsid`) may still hold the pipes.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the killed stragglers to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(1);

/// Kills the child's process group when the run is dropped before it is over.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// What reading one stream came to.
#[derive(Debug, Default)]
struct Pumped {
    /// Bytes read from the pipe.
    read: u64,
    /// Bytes of lines not logged because the run's budget was spent.
    unlogged: u64,
    /// Lines cut at `max_line_bytes`.
    cut_lines: u64,
    /// The last lines (stderr), for the failure message.
    tail: VecDeque<String>,
    /// The first bytes as read (stdout: the run's output).
    captured: Vec<u8>,
}

/// Reads `pipe` to its end, logging each line within the limits.
async fn pump<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: Stream,
    max_line: usize,
    budget: &AtomicUsize,
    capture: usize,
) -> Pumped {
    let mut out = Pumped::default();
    let mut buf = vec![0u8; CHUNK];
    let mut line: Vec<u8> = Vec::new();
    // Length of the current line, counting what was cut.
    let mut line_len = 0usize;
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        out.read += n as u64;
        let room = capture.saturating_sub(out.captured.len());
        out.captured.extend_from_slice(&buf[..n.min(room)]);
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let (piece, ended) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            let room = max_line.saturating_sub(line.len());
            line.extend_from_slice(&piece[..piece.len().min(room)]);
            line_len += piece.len();
            rest = &rest[piece.len() + usize::from(ended)..];
            if ended {
                emit(&mut out, stream, &line, line_len, budget);
                line.clear();
                line_len = 0;
            }
        }
    }
    if line_len > 0 {
        emit(&mut out, stream, &line, line_len, budget);
    }
    out
}

fn emit(out: &mut Pumped, stream: Stream, line: &[u8], full_len: usize, budget: &AtomicUsize) {
    let mut text = String::from_utf8_lossy(line).into_owned();
    if full_len > line.len() {
        out.cut_lines += 1;
        text.push_str(&format!(
            " … [line cut at {} of {full_len} bytes]",
            line.len()
        ));
    }
    // What is logged is what counts against the budget.
    let cost = text.len().max(1);
    let logged = budget
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            left.checked_sub(cost)
        })
        .is_ok();
    if logged {
        match stream {
            Stream::Stdout => tracing::info!(stream = "stdout", "{text}"),
            Stream::Stderr => tracing::warn!(stream = "stderr", "{text}"),
        }
    } else {
        out.unlogged += full_len as u64;
    }
    if stream == Stream::Stderr {
        if out.tail.len() == STDERR_TAIL_LINES {
            out.tail.pop_front();
        }
        out.tail.push_back(text);
    }
}

/// Kills what is left of process group `pgid` and reaps those of its members that
/// became vigil's children (when vigil is PID 1 or a subreaper; otherwise init reaps
/// them).
async fn end_group(pgid: Pid) {
    let _ = killpg(pgid, Signal::SIGKILL);
    let deadline = tokio::time::Instant::now() + REAP_WAIT;
    loop {
        match waitpid(Pid::from_raw(-pgid.as_raw()), Some(WaitPidFlag::WNOHANG)) {
            // Reaped one; look for more.
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => continue,
            // Members of ours still dying.
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // ECHILD: none of the group is our child any more.
            _ => return,
        }
    }
}

#[async_trait::async_trait]
impl Job for CommandJob {
    async fn run(&self, ctx: RunContext) -> Result<RunOutcome, JobError> {
        let c = &self.config;
        let argv = c.command.get_ref();
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| JobError::Failed("empty command".into()))?;
        let mut meter = Meter::prepare(
            if self.cgroups {
                resources::place()
            } else {
                None
            },
            ctx.run_id,
            ctx.resources.clone(),
        );
        // std's Command, not tokio's: vigil reaps the program itself (wait4), for the
        // kernel's account of what it used; tokio's reaper would take it first.
        let mut cmd = std::process::Command::new(program);
        // Least privilege: none of vigil's own environment (its secrets) unless the job
        // asks for it; then the job's own variables, then the run's.
        cmd.args(args)
            .env_clear()
            .envs(self.base_env.iter().map(|(k, v)| (k, v)))
            .envs(&c.env)
            .env("VIGIL_RUN_ID", ctx.run_id.to_string())
            .env("VIGIL_JOB", &*ctx.job)
            .env("VIGIL_TRIGGER", ctx.trigger.as_str())
            .stdin(if ctx.input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(dir) = &c.workdir {
            cmd.current_dir(dir);
        }
        let fds = meter.procs_fds();
        if !fds.is_empty() {
            // SAFETY: between fork and exec the closure only calls write(2), which is
            // async-signal-safe, on descriptors opened before the fork; it allocates
            // nothing. Writing "0" moves the calling process (the child) into the run's
            // cgroup, so everything it starts is counted there. A failed write leaves
            // the program outside it; the process tree's account still stands.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &fds {
                        libc::write(*fd, b"0".as_ptr().cast(), 1);
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| {
            let message = format!("cannot start {program:?}: {e}");
            // A missing program (or work directory) or one that may not be run stays so
            // however often it is tried.
            match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    JobError::Permanent(message)
                }
                _ => JobError::Failed(message),
            }
        })?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        let pgid = Pid::from_raw(pid);
        // Reaps the program even if this run is dropped (its group is killed then).
        let mut waiter = tokio::task::spawn_blocking(move || wait_for(pid));
        let mut guard = GroupGuard { pgid: Some(pgid) };
        meter.started(pid);
        let stdin = child
            .stdin
            .take()
            .and_then(|p| tokio::process::ChildStdin::from_std(p).ok());
        let stdout = child
            .stdout
            .take()
            .and_then(|p| tokio::process::ChildStdout::from_std(p).ok());
        let stderr = child
            .stderr
            .take()
            .and_then(|p| tokio::process::ChildStderr::from_std(p).ok());
        // The input on stdin, then end of file; a program that never reads it is not
        // waited for (the write stops with the pipe).
        if let (Some(mut stdin), Some(input)) = (stdin, ctx.input.clone()) {
            let body = serde_json::to_vec(&*input).unwrap_or_default();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt as _;
                let _ = stdin.write_all(&body).await;
            });
        }

        let budget = AtomicUsize::new(*c.max_log_bytes.get_ref());
        let max_line = *c.max_line_bytes.get_ref();
        let max_output = if ctx.output.wanted() {
            *c.max_output_bytes.get_ref()
        } else {
            0
        };
        let pumps = async {
            let out = async {
                match stdout {
                    Some(p) => pump(p, Stream::Stdout, max_line, &budget, max_output).await,
                    None => Pumped::default(),
                }
            };
            let err = async {
                match stderr {
                    Some(p) => pump(p, Stream::Stderr, max_line, &budget, 0).await,
                    None => Pumped::default(),
                }
            };
            tokio::join!(out, err)
        };
        tokio::pin!(pumps);
        // Drain the pipes while waiting for the program, so it never blocks on them.
        let (waited, pumped) = tokio::select! {
            waited = &mut waiter => (waited, None),
            pumped = &mut pumps => ((&mut waiter).await, Some(pumped)),
        };
        let (status, usage) = waited
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|w| w)
            .map_err(|e| JobError::Failed(format!("waiting for {program:?}: {e}")))?;
        // The program is gone: so is anything it left behind in its group.
        if let Some(pgid) = guard.pgid.take() {
            end_group(pgid).await;
        }
        meter.finish(Some(usage));
        let (out, err) = match pumped {
            Some(p) => p,
            None => match tokio::time::timeout(OUTPUT_GRACE, &mut pumps).await {
                Ok(p) => p,
                Err(_) => {
                    tracing::warn!(
                        "a process outside the job's process group still holds its output; stopped reading it"
                    );
                    (Pumped::default(), Pumped::default())
                }
            },
        };
        let unlogged = out.unlogged + err.unlogged;
        if unlogged > 0 || out.cut_lines + err.cut_lines > 0 {
            tracing::warn!(
                read_bytes = out.read + err.read,
                unlogged_bytes = unlogged,
                cut_lines = out.cut_lines + err.cut_lines,
                max_log_bytes = *c.max_log_bytes.get_ref(),
                max_line_bytes = max_line,
                "output beyond the job's limits was read but not logged"
            );
        }
        ctx.output.set(super::RunOutput {
            truncated: out.read > out.captured.len() as u64,
            total_bytes: out.read,
            bytes: out.captured,
        });
        if status.success() {
            return Ok(RunOutcome::Completed { items: None });
        }
        let mut message = format!("{program:?} {status}");
        let mut tail: Vec<&str> = Vec::new();
        let mut bytes = 0;
        for line in err.tail.iter().rev() {
            bytes += line.len() + 1;
            if bytes > STDERR_TAIL_BYTES {
                break;
            }
            tail.push(line);
        }
        tail.reverse();
        if !tail.is_empty() {
            message.push_str(": ");
            message.push_str(&tail.join("\n"));
        }
        Err(JobError::Failed(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pumped(input: &[u8], max_line: usize, budget: usize) -> Pumped {
        let budget = AtomicUsize::new(budget);
        pump(input, Stream::Stderr, max_line, &budget, 0).await
    }

    #[tokio::test]
    async fn lines_are_cut_at_the_limit_and_bad_utf8_replaced_never_a_reason_to_stop() {
        let mut input = b"first\n".to_vec();
        input.extend_from_slice(&[b'x'; 100]);
        input.extend_from_slice(b"\n\xff\xfe ok\nlast without newline");
        let p = pumped(&input, 10, 1 << 20).await;
        assert_eq!(p.read, input.len() as u64);
        assert_eq!(p.cut_lines, 2);
        let tail: Vec<&str> = p.tail.iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "first",
                "xxxxxxxxxx … [line cut at 10 of 100 bytes]",
                "\u{FFFD}\u{FFFD} ok",
                "last witho … [line cut at 10 of 20 bytes]",
            ]
        );
    }

    #[tokio::test]
    async fn past_the_budget_lines_are_counted_not_logged_and_reading_goes_on() {
        let input = "0123456789\n".repeat(1000);
        let p = pumped(input.as_bytes(), 1024, 100).await;
        assert_eq!(p.read, 11_000, "read to the end");
        // Ten lines of ten bytes fit the budget; the other 990 are counted.
        assert_eq!(p.unlogged, 9_900);
    }
}
