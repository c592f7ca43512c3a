//! What a `command` run used, measured by the kernel: CPU time (user and system), peak
//! resident memory and bytes read and written, of the program and everything it
//! started.
//!
//! Where vigil may create cgroups (cgroup v1 controllers it can write to, or a cgroup
//! v2 subtree delegated to it), each run gets one: the child moves itself there before
//! it executes the program, so every descendant is counted, also one that left the
//! process group, and the cgroup's own counters are read when the run ends. Elsewhere
//! (a container without cgroup access) the process tree is accounted: the kernel's
//! resource usage of the program and the children it waited for (`wait4`), and the
//! tree's resident memory summed every [`POLL_EVERY`] for its peak. Either way the
//! figures are the larger of what each source saw.

use std::io;
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use procfs_core::FromRead as _;
use procfs_core::process::Stat;
use uuid::Uuid;

use crate::jobs::cgroupfs::{keyed, number, parse_blkio, parse_io_stat};
pub use crate::store::runs::{MeasuredBy, RunResources};

/// How often the process tree is read for its resident memory when no cgroup counts
/// the peak.
pub const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long the end of a run waits for its cgroup to empty before removing it.
const REMOVE_WAIT: Duration = Duration::from_secs(2);
/// The controllers a run's cgroup v2 needs, where the kernel offers them.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "io"];

/// Where run cgroups are made on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// `runs` is a cgroup v2 directory with the controllers enabled for its children.
    V2 { runs: PathBuf },
    /// vigil's own cgroup in each v1 hierarchy (the run's goes beneath).
    V1 {
        cpuacct: PathBuf,
        memory: Option<PathBuf>,
        blkio: Option<PathBuf>,
    },
}

/// This machine's place for run cgroups, found once (and logged once); `None`: runs
/// are accounted by their process tree.
pub fn place() -> Option<&'static Place> {
    static PLACE: OnceLock<Option<Place>> = OnceLock::new();
    PLACE
        .get_or_init(|| {
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            match detect(Path::new("/sys/fs/cgroup"), &own, std::process::id()) {
                Ok(p) => {
                    tracing::info!(place = ?p, "command runs are measured in a cgroup each");
                    Some(p)
                }
                Err(why) => {
                    tracing::info!(
                        reason = %why,
                        "command runs are measured by their process tree (no cgroup per run)"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// Finds where run cgroups can go under the cgroup mount `cg`, given this process's
/// `/proc/self/cgroup`, and prepares it; the reason when nowhere.
pub fn detect(cg: &Path, own: &str, pid: u32) -> Result<Place, String> {
    if cg.join("cgroup.controllers").exists() {
        return detect_v2(cg, own, pid);
    }
    // cgroup v1: `4:memory:/some/path`, `2:cpu,cpuacct:/`.
    let mut cpuacct = None;
    let mut memory = None;
    let mut blkio = None;
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let dir = cg.join(controllers).join(path.trim_start_matches('/'));
        let names: Vec<&str> = controllers.split(',').collect();
        if names.contains(&"cpuacct") {
            cpuacct = Some(dir.clone());
        }
        if names.contains(&"memory") {
            memory = Some(dir.clone());
        }
        if names.contains(&"blkio") {
            blkio = Some(dir);
        }
    }
    let cpuacct = cpuacct
        .filter(|d| d.join("cpuacct.usage").exists())
        .ok_or("no cgroup v1 cpuacct controller of this process")?;
    let place = Place::V1 {
        cpuacct,
        memory: memory.filter(|d| d.join("memory.usage_in_bytes").exists()),
        blkio: blkio.filter(|d| d.join("blkio.throttle.io_service_bytes").exists()),
    };
    // Writable here? One directory made and removed in each.
    for dir in place.parents() {
        let probe = dir.join(format!("vigil-probe-{pid}"));
        std::fs::create_dir(&probe)
            .map_err(|e| format!("cannot make a cgroup in {}: {e}", dir.display()))?;
        let _ = std::fs::remove_dir(&probe);
    }
    Ok(place)
}

/// cgroup v2: runs go in `<own>/vigil-runs/run-…`. Enabling controllers for children
/// needs a cgroup without processes of its own (but the root): when vigil's has them,
/// vigil moves into `<own>/vigil` first, as a service with a delegated subtree does.
fn detect_v2(cg: &Path, own: &str, pid: u32) -> Result<Place, String> {
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
    let base = cg.join(path.trim_start_matches('/'));
    let runs = base.join("vigil-runs");
    match std::fs::create_dir(&runs) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot make {}: {e}", runs.display())),
    }
    let available = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<&str> = V2_CONTROLLERS
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    if !wanted.is_empty() {
        let enable = wanted
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        if std::fs::write(base.join("cgroup.subtree_control"), &enable).is_err() {
            // Processes in vigil's own cgroup: move vigil (all its threads) to a leaf.
            let leaf = base.join("vigil");
            let _ = std::fs::create_dir(&leaf);
            std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
                .map_err(|e| format!("cannot move vigil into {}: {e}", leaf.display()))?;
            std::fs::write(base.join("cgroup.subtree_control"), &enable)
                .map_err(|e| format!("cannot enable {enable} for {}: {e}", base.display()))?;
        }
        std::fs::write(runs.join("cgroup.subtree_control"), &enable)
            .map_err(|e| format!("cannot enable {enable} for {}: {e}", runs.display()))?;
    }
    Ok(Place::V2 { runs })
}

impl Place {
    /// The directories a run's cgroups are made in.
    fn parents(&self) -> Vec<&Path> {
        match self {
            Place::V2 { runs } => vec![runs.as_path()],
            Place::V1 {
                cpuacct,
                memory,
                blkio,
            } => [Some(cpuacct), memory.as_ref(), blkio.as_ref()]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path)
                .collect(),
        }
    }

    /// Whether a run's cgroup records its peak memory (else the tree is polled).
    fn counts_peak(&self) -> bool {
        match self {
            Place::V2 { runs } => std::fs::read_to_string(runs.join("cgroup.subtree_control"))
                .is_ok_and(|t| {
                    t.split_whitespace()
                        .any(|c| c.trim_start_matches('+') == "memory")
                }),
            Place::V1 { memory, .. } => memory.is_some(),
        }
    }
}

/// Counters read from a run's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counted {
    user_s: f64,
    system_s: f64,
    peak_rss: u64,
    read: u64,
    written: u64,
}

impl Counted {
    fn max(self, o: Counted) -> Counted {
        Counted {
            user_s: self.user_s.max(o.user_s),
            system_s: self.system_s.max(o.system_s),
            peak_rss: self.peak_rss.max(o.peak_rss),
            read: self.read.max(o.read),
            written: self.written.max(o.written),
        }
    }
}

/// One run's cgroup (one directory per v1 hierarchy).
pub struct RunCgroup {
    place: Place,
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each, open for the child to write itself into.
    procs: Vec<std::fs::File>,
}

impl RunCgroup {
    /// Makes the run's cgroup in `place`.
    pub fn create(place: &Place, run: Uuid) -> io::Result<Self> {
        let mut me = Self {
            place: place.clone(),
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        for parent in place.parents() {
            let dir = parent.join(format!("run-{run}"));
            std::fs::create_dir(&dir)?;
            me.dirs.push(dir.clone());
            // The kernel makes cgroup.procs with the directory; `create` only matters
            // where cgroupfs is emulated by plain directories (the unit tests).
            me.procs.push(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(dir.join("cgroup.procs"))?,
            );
        }
        Ok(me)
    }

    /// The descriptors the child writes `0` (itself) to before it executes the program.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    fn read(&self) -> Counted {
        let ns = 1e-9;
        match &self.place {
            Place::V2 { .. } => {
                let dir = &self.dirs[0];
                let (read, written) = std::fs::read_to_string(dir.join("io.stat"))
                    .map(|t| parse_io_stat(&t))
                    .unwrap_or_default();
                Counted {
                    user_s: keyed(&dir.join("cpu.stat"), "user_usec").unwrap_or(0) as f64 * 1e-6,
                    system_s: keyed(&dir.join("cpu.stat"), "system_usec").unwrap_or(0) as f64
                        * 1e-6,
                    peak_rss: number(&dir.join("memory.peak")).unwrap_or(0),
                    read,
                    written,
                }
            }
            Place::V1 { memory, blkio, .. } => {
                let mut dirs = self.dirs.iter();
                let cpu = dirs.next();
                let mem = memory.as_ref().and_then(|_| dirs.next());
                let blk = blkio.as_ref().and_then(|_| dirs.next());
                let (user_s, system_s) = cpu.map_or((0.0, 0.0), |d| {
                    match (
                        number(&d.join("cpuacct.usage_user")),
                        number(&d.join("cpuacct.usage_sys")),
                    ) {
                        (Some(u), Some(s)) => (u as f64 * ns, s as f64 * ns),
                        // Older kernels: the same in USER_HZ.
                        _ => {
                            let hz = ticks_per_second();
                            let stat = d.join("cpuacct.stat");
                            (
                                keyed(&stat, "user").unwrap_or(0) as f64 / hz,
                                keyed(&stat, "system").unwrap_or(0) as f64 / hz,
                            )
                        }
                    }
                });
                let (read, written) = blk
                    .and_then(|d| {
                        std::fs::read_to_string(d.join("blkio.throttle.io_service_bytes")).ok()
                    })
                    .map(|t| parse_blkio(&t))
                    .unwrap_or_default();
                Counted {
                    user_s,
                    system_s,
                    peak_rss: mem
                        .and_then(|d| number(&d.join("memory.max_usage_in_bytes")))
                        .unwrap_or(0),
                    read,
                    written,
                }
            }
        }
    }

    /// Kills whatever is still in the run's cgroup (a process that left the group
    /// with `setsid`), then removes it once empty, off the async threads.
    fn remove(self) {
        let dirs = self.dirs;
        let work = move || {
            let deadline = std::time::Instant::now() + REMOVE_WAIT;
            for dir in &dirs {
                loop {
                    let left =
                        std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    for pid in left.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    match std::fs::remove_dir(dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                        Err(_) if std::time::Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            tracing::warn!(cgroup = %dir.display(), error = %e, "a run's cgroup could not be removed");
                            break;
                        }
                    }
                }
            }
        };
        if std::thread::Builder::new()
            .name("vigil-cgroup-rm".into())
            .spawn(work)
            .is_err()
        {
            tracing::warn!("no thread to remove a run's cgroup");
        }
    }
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&n| n > 0)
        .map_or(100.0, |n| n as f64)
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(4096)
}

/// The program and its descendants, now: `/proc/<pid>/task/*/children`, breadth first.
pub fn tree(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for c in text
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// The live tree's totals at one moment.
fn tree_now(root: i32, hz: f64, page: u64) -> Counted {
    let mut c = Counted::default();
    for pid in tree(root) {
        let Ok(bytes) = std::fs::read(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Ok(stat) = Stat::from_read(bytes.as_slice()) else {
            continue;
        };
        // A child the process waited for is in its cutime: counted once, there.
        c.user_s += (stat.utime as f64 + stat.cutime.max(0) as f64) / hz;
        c.system_s += (stat.stime as f64 + stat.cstime.max(0) as f64) / hz;
        c.peak_rss += stat.rss.saturating_mul(page);
        if let Ok(io) = std::fs::read(format!("/proc/{pid}/io"))
            .map_err(|_| ())
            .and_then(|b| procfs_core::process::Io::from_read(b.as_slice()).map_err(|_| ()))
        {
            c.read += io.read_bytes;
            c.written += io.write_bytes;
        }
    }
    c
}

/// Polls the process tree of a run for the largest totals seen.
struct TreeWatch {
    seen: Arc<Mutex<Counted>>,
    task: tokio::task::JoinHandle<()>,
}

impl TreeWatch {
    fn start(root: i32) -> Self {
        let seen = Arc::new(Mutex::new(Counted::default()));
        let out = seen.clone();
        let (hz, page) = (ticks_per_second(), page_size());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = tokio::task::spawn_blocking(move || tree_now(root, hz, page))
                    .await
                    .unwrap_or_default();
                let mut s = out.lock().unwrap_or_else(|p| p.into_inner());
                *s = s.max(now);
            }
        });
        Self { seen, task }
    }

    fn seen(&self) -> Counted {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TreeWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the kernel said of the program when it was reaped (`wait4`): itself and the
/// children it waited for.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    user_s: f64,
    system_s: f64,
    max_rss: u64,
    read: u64,
    written: u64,
}

impl Usage {
    pub fn from_rusage(ru: &libc::rusage) -> Self {
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        // ru_maxrss in KiB; the block counts in 512-byte units.
        Self {
            user_s: secs(ru.ru_utime),
            system_s: secs(ru.ru_stime),
            max_rss: u64::try_from(ru.ru_maxrss)
                .unwrap_or(0)
                .saturating_mul(1024),
            read: u64::try_from(ru.ru_inblock)
                .unwrap_or(0)
                .saturating_mul(512),
            written: u64::try_from(ru.ru_oublock)
                .unwrap_or(0)
                .saturating_mul(512),
        }
    }

    fn counted(self) -> Counted {
        Counted {
            user_s: self.user_s,
            system_s: self.system_s,
            peak_rss: self.max_rss,
            read: self.read,
            written: self.written,
        }
    }
}

/// Measures one run from its start to its end; a run cut off (timeout, shutdown)
/// leaves what was measured until then.
pub struct Meter {
    cgroup: Option<RunCgroup>,
    watch: Option<TreeWatch>,
    sink: crate::jobs::ResourcesSink,
}

impl Meter {
    /// Before the program starts: its cgroup where run cgroups can be made.
    pub fn prepare(place: Option<&Place>, run: Uuid, sink: crate::jobs::ResourcesSink) -> Self {
        let cgroup = place.and_then(|p| match RunCgroup::create(p, run) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no cgroup for this run: measuring its process tree");
                None
            }
        });
        Self {
            cgroup,
            watch: None,
            sink,
        }
    }

    /// The descriptors the child writes itself into before it executes the program.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.cgroup
            .as_ref()
            .map_or_else(Vec::new, RunCgroup::procs_fds)
    }

    /// Once the program runs: poll its tree where no cgroup counts the peak.
    pub fn started(&mut self, pid: i32) {
        if self.cgroup.as_ref().is_none_or(|c| !c.place.counts_peak()) {
            self.watch = Some(TreeWatch::start(pid));
        }
    }

    fn measure(&self, usage: Option<Usage>) -> RunResources {
        let mut c = Counted::default();
        if let Some(cg) = &self.cgroup {
            c = c.max(cg.read());
        }
        if let Some(w) = &self.watch {
            c = c.max(w.seen());
        }
        if let Some(u) = usage {
            c = c.max(u.counted());
        }
        RunResources {
            cpu_user_s: round3(c.user_s),
            cpu_system_s: round3(c.system_s),
            peak_rss_bytes: c.peak_rss,
            read_bytes: c.read,
            written_bytes: c.written,
            measured_by: if self.cgroup.is_some() {
                MeasuredBy::Cgroup
            } else {
                MeasuredBy::ProcessTree
            },
        }
    }

    /// The program was reaped with `usage` and its group is gone: the run's figures.
    pub fn finish(self, usage: Option<Usage>) -> RunResources {
        let r = self.measure(usage);
        self.sink.set(r.clone());
        r
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if !self.sink.is_set() {
            self.sink.set(self.measure(None));
        }
        if let Some(cg) = self.cgroup.take() {
            cg.remove();
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn v1_places_are_vigils_own_cgroups_in_each_hierarchy() {
        let cg = tempfile::tempdir().unwrap();
        write(&cg.path().join("cpu,cpuacct/cpuacct.usage"), "0");
        write(&cg.path().join("memory/box/memory.usage_in_bytes"), "0");
        write(&cg.path().join("blkio/blkio.throttle.io_service_bytes"), "");
        let own = "9:name=systemd:/\n4:memory:/box\n2:cpu,cpuacct:/\n7:blkio:/\n0::/\n";
        let p = detect(cg.path(), own, 1).unwrap();
        assert_eq!(
            p,
            Place::V1 {
                cpuacct: cg.path().join("cpu,cpuacct/"),
                memory: Some(cg.path().join("memory/box")),
                blkio: Some(cg.path().join("blkio/")),
            }
        );
        // A run's cgroup: one directory per hierarchy, counters read from each.
        let run = Uuid::now_v7();
        let c = RunCgroup::create(&p, run).unwrap();
        assert_eq!(c.procs_fds().len(), 3);
        let name = format!("run-{run}");
        write(
            &cg.path()
                .join("cpu,cpuacct")
                .join(&name)
                .join("cpuacct.usage_user"),
            "1500000000",
        );
        write(
            &cg.path()
                .join("cpu,cpuacct")
                .join(&name)
                .join("cpuacct.usage_sys"),
            "250000000",
        );
        write(
            &cg.path()
                .join("memory/box")
                .join(&name)
                .join("memory.max_usage_in_bytes"),
            "209715200",
        );
        write(
            &cg.path()
                .join("blkio")
                .join(&name)
                .join("blkio.throttle.io_service_bytes"),
            "8:0 Read 4096\n8:0 Write 8192\nTotal 12288\n",
        );
        assert_eq!(
            c.read(),
            Counted {
                user_s: 1.5,
                system_s: 0.25,
                peak_rss: 209_715_200,
                read: 4096,
                written: 8192
            }
        );
    }

    #[test]
    fn without_cpuacct_there_is_no_place() {
        let cg = tempfile::tempdir().unwrap();
        assert!(detect(cg.path(), "4:memory:/\n", 1).is_err());
    }

    #[test]
    fn v2_enables_the_controllers_for_runs_and_reads_their_counters() {
        let cg = tempfile::tempdir().unwrap();
        write(
            &cg.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        );
        write(
            &cg.path().join("svc/cgroup.controllers"),
            "cpu io memory pids\n",
        );
        let p = detect(cg.path(), "0::/svc\n", 1).unwrap();
        let runs = cg.path().join("svc/vigil-runs");
        assert_eq!(p, Place::V2 { runs: runs.clone() });
        assert_eq!(
            std::fs::read_to_string(runs.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +io"
        );
        assert!(p.counts_peak());
        let run = Uuid::now_v7();
        let c = RunCgroup::create(&p, run).unwrap();
        let dir = runs.join(format!("run-{run}"));
        write(
            &dir.join("cpu.stat"),
            "usage_usec 3000000\nuser_usec 2000000\nsystem_usec 1000000\n",
        );
        write(&dir.join("memory.peak"), "1048576\n");
        write(
            &dir.join("io.stat"),
            "8:0 rbytes=10 wbytes=20 rios=1 wios=1\n",
        );
        assert_eq!(
            c.read(),
            Counted {
                user_s: 2.0,
                system_s: 1.0,
                peak_rss: 1_048_576,
                read: 10,
                written: 20
            }
        );
    }

    #[test]
    fn the_live_tree_of_this_process_includes_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let t = tree(me);
        assert_eq!(t[0], me);
        assert!(t.contains(&i32::try_from(child.id()).unwrap()), "{t:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
