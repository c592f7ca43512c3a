//! The heaviest processes of the host, by CPU and by resident memory, read from
//! `/proc/<pid>/stat` under the sampler's root (the host's `/proc` through a host root).
//!
//! One file per process a sample (no status, no cmdline unless asked): the owner and
//! the command line are read only for the processes that make the list. CPU is the
//! time a process used since the previous sample; a process that started since then
//! used all of its time within the interval.

use std::collections::HashMap;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::kept::read_whole_at;
use super::sample::{ProcessUse, TopProcesses, round2};

/// Most of a command line kept: enough to tell processes apart, bounded.
pub const MAX_CMDLINE_BYTES: usize = 4096;
/// How often `/etc/passwd` is read again for a uid it did not name.
const USERS_EVERY: Duration = Duration::from_secs(60);
/// Most `stat` files kept open between samples. Reading an open one again is one
/// `pread`; opening it is a path walk, a size query and a close as well. Past this,
/// the rest are opened each time, so a host with many processes cannot take the file
/// descriptors the gateway and the pool need.
const MAX_OPEN_STATS: usize = 512;

/// What is known of one process between samples.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Its start (in ticks since boot): a reused pid is another process.
    started: u64,
    ticks: u64,
}

/// `stat`'s flag for a kernel thread (PF_KTHREAD).
const PF_KTHREAD: u64 = 0x0020_0000;

/// A process's file kept open between samples.
#[derive(Debug)]
enum Kept {
    /// `/proc/<pid>/stat`.
    Stat(std::fs::File),
    /// A kernel thread (two thirds of the processes of a small host): its
    /// `/proc/<pid>/schedstat`, whose first figure is its CPU time in nanoseconds. It
    /// has no memory and keeps its name and start, so `stat`, which the kernel takes
    /// four times as long to produce, is read once.
    Kernel {
        schedstat: std::fs::File,
        comm: String,
        starttime: u64,
    },
}

/// One process read this time.
struct Read {
    pid: i32,
    name: String,
    cpu_pct: f64,
    rss_bytes: u64,
}

pub struct ProcessTable {
    proc_dir: PathBuf,
    passwd: PathBuf,
    users: HashMap<u32, String>,
    users_read_at: Option<Instant>,
    previous: HashMap<i32, Seen>,
    /// Whether `previous` holds a whole table (the first read has no interval).
    baseline: bool,
    ticks_per_s: f64,
    page_size: u64,
    buf: Vec<u8>,
    /// The files of processes seen before, open. A descriptor belongs to its process,
    /// not its pid: once the process is gone, reading it fails, so a reused pid is
    /// never read through its predecessor's file.
    open: HashMap<i32, Kept>,
    /// Processes the last listing found (the `processes` section reuses it).
    listed: u64,
    /// Whether `/proc` is this process's own pid namespace's (natively), which
    /// `/proc/self` naming this process shows. Only then can the last pid handed out
    /// (`/proc/loadavg`'s last figure, which counts in the reader's namespace) tell
    /// that no process has started: see [`ProcessTable::top`].
    own_namespace: bool,
    /// The last pid handed out when `previous` was last complete: every process was
    /// listed, read and kept open, so one that is gone is told by its read failing.
    complete_at: Option<u32>,
}

/// The kernel's clock ticks per second and page size, for `stat`'s figures.
pub fn ticks_and_page_size() -> (u64, u64) {
    let sysconf = |v| {
        nix::unistd::sysconf(v)
            .ok()
            .flatten()
            .and_then(|n| u64::try_from(n).ok())
            .filter(|&n| n > 0)
    };
    (
        sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100),
        sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096),
    )
}

impl ProcessTable {
    /// The processes under `root` (`/` natively, the host's root in a container).
    pub fn new(root: &Path) -> Self {
        let (ticks_per_s, page_size) = ticks_and_page_size();
        Self {
            proc_dir: root.join("proc"),
            passwd: root.join("etc/passwd"),
            users: HashMap::new(),
            users_read_at: None,
            previous: HashMap::new(),
            baseline: false,
            ticks_per_s: ticks_per_s as f64,
            page_size,
            listed: 0,
            buf: Vec::with_capacity(1024),
            open: HashMap::new(),
            own_namespace: own_namespace(root),
            complete_at: None,
        }
    }

    /// Reads every process; the `n` heaviest by CPU over the last `elapsed` seconds
    /// and the `n` heaviest by resident memory, with command lines when `cmdline`.
    ///
    /// `last_pid` is the last pid the kernel handed out, to a process or a thread, read
    /// before this call. While it stays the same, no process can have started, so the
    /// processes known are all there are, less those gone, and the listing of `/proc`
    /// (a tenth of a one-second host job's CPU) is skipped.
    pub fn top(
        &mut self,
        n: usize,
        elapsed: f64,
        cmdline: bool,
        last_pid: Option<u32>,
    ) -> TopProcesses {
        let mut now: HashMap<i32, Seen> = HashMap::with_capacity(self.previous.len() + 16);
        let mut all: Vec<Read> = Vec::with_capacity(self.previous.len() + 16);
        let last_pid = last_pid.filter(|_| self.own_namespace);
        let known = last_pid.is_some() && last_pid == self.complete_at;
        let pids: Vec<i32> = if known {
            self.previous.keys().copied().collect()
        } else {
            match list_pids(&self.proc_dir) {
                Some(pids) => pids,
                None => {
                    self.listed = 0;
                    self.complete_at = None;
                    return TopProcesses {
                        by_cpu: Vec::new(),
                        by_memory: Vec::new(),
                    };
                }
            }
        };
        // Without the listing, a known process that cannot be read is gone.
        let mut listed = if known { 0 } else { pids.len() as u64 };
        let mut complete = true;
        for pid in pids {
            // Gone since the listing, or not ours to read: left out.
            let Some(stat) = self.read_stat(pid) else {
                complete &= known;
                continue;
            };
            if known {
                listed += 1;
            }
            complete &= self.open.contains_key(&pid);
            let ticks = stat.utime.saturating_add(stat.stime);
            let used = match self.previous.get(&pid) {
                Some(p) if p.started == stat.starttime => ticks.saturating_sub(p.ticks),
                _ if self.baseline => ticks,
                _ => 0,
            };
            now.insert(
                pid,
                Seen {
                    started: stat.starttime,
                    ticks,
                },
            );
            all.push(Read {
                pid,
                name: stat.comm,
                cpu_pct: if elapsed > 0.0 {
                    round2(used as f64 / self.ticks_per_s / elapsed * 100.0)
                } else {
                    0.0
                },
                rss_bytes: stat.rss.saturating_mul(self.page_size),
            });
        }
        // Files of processes that were not listed this time are let go.
        self.open.retain(|pid, _| now.contains_key(pid));
        self.previous = now;
        self.baseline = true;
        self.listed = listed;
        self.complete_at = if complete { last_pid } else { None };

        let mut by_cpu: Vec<&Read> = all.iter().collect();
        by_cpu.sort_by(|a, b| {
            b.cpu_pct
                .total_cmp(&a.cpu_pct)
                .then(b.rss_bytes.cmp(&a.rss_bytes))
                .then(a.pid.cmp(&b.pid))
        });
        by_cpu.truncate(n);
        let mut by_memory: Vec<&Read> = all.iter().collect();
        by_memory.sort_by(|a, b| {
            b.rss_bytes
                .cmp(&a.rss_bytes)
                .then(b.cpu_pct.total_cmp(&a.cpu_pct))
                .then(a.pid.cmp(&b.pid))
        });
        by_memory.truncate(n);
        TopProcesses {
            by_cpu: by_cpu
                .into_iter()
                .map(|r| self.describe(r, cmdline))
                .collect(),
            by_memory: by_memory
                .into_iter()
                .map(|r| self.describe(r, cmdline))
                .collect(),
        }
    }

    /// How many processes the last [`ProcessTable::top`] listed.
    pub fn listed(&self) -> u64 {
        self.listed
    }

    fn read_stat(&mut self, pid: i32) -> Option<ProcStat> {
        let hz = self.ticks_per_s;
        if let Some(kept) = self.open.get(&pid) {
            let fresh = match kept {
                Kept::Stat(file) => read_stat_at(file, &mut self.buf),
                Kept::Kernel {
                    schedstat,
                    comm,
                    starttime,
                } => read_schedstat_at(schedstat, &mut self.buf).map(|ns| ProcStat {
                    comm: comm.clone(),
                    utime: ns_to_ticks(ns, hz),
                    stime: 0,
                    starttime: *starttime,
                    rss: 0,
                    flags: PF_KTHREAD,
                }),
            };
            if fresh.is_some() {
                return fresh;
            }
            // The process is gone (the pid may be another's now): open it afresh.
            self.open.remove(&pid);
        }
        let dir = self.proc_dir.join(pid.to_string());
        let file = std::fs::File::open(dir.join("stat")).ok()?;
        let mut stat = read_stat_at(&file, &mut self.buf)?;
        let mut kept = Kept::Stat(file);
        if stat.flags & PF_KTHREAD != 0
            && let Ok(schedstat) = std::fs::File::open(dir.join("schedstat"))
            && let Some(ns) = read_schedstat_at(&schedstat, &mut self.buf)
        {
            // Counted from schedstat from the first, so later samples compare alike.
            stat.utime = ns_to_ticks(ns, hz);
            stat.stime = 0;
            kept = Kept::Kernel {
                schedstat,
                comm: stat.comm.clone(),
                starttime: stat.starttime,
            };
        }
        if self.open.len() < MAX_OPEN_STATS {
            self.open.insert(pid, kept);
        }
        Some(stat)
    }

    fn describe(&mut self, r: &Read, cmdline: bool) -> ProcessUse {
        let dir = self.proc_dir.join(r.pid.to_string());
        let user = match std::fs::metadata(&dir).map(|m| m.uid()) {
            Ok(uid) => self.user(uid),
            Err(_) => "?".to_owned(),
        };
        ProcessUse {
            pid: r.pid,
            name: r.name.clone(),
            user,
            cpu_pct: r.cpu_pct,
            rss_bytes: r.rss_bytes,
            cmdline: cmdline.then(|| read_cmdline(&dir, &r.name)),
        }
    }

    /// The name `/etc/passwd` (the host's, under a host root) gives `uid`, else the uid.
    fn user(&mut self, uid: u32) -> String {
        if !self.users.contains_key(&uid)
            && self
                .users_read_at
                .is_none_or(|t| t.elapsed() >= USERS_EVERY)
        {
            self.users = std::fs::read_to_string(&self.passwd)
                .map(|t| parse_passwd(&t))
                .unwrap_or_default();
            self.users_read_at = Some(Instant::now());
        }
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }
}

/// The numeric entries of a `/proc`; `None` if it cannot be listed.
fn list_pids(proc_dir: &Path) -> Option<Vec<i32>> {
    let entries = std::fs::read_dir(proc_dir).ok()?;
    Some(
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect(),
    )
}

/// Whether `root`'s `/proc` is of this process's pid namespace (its `self` is us).
fn own_namespace(root: &Path) -> bool {
    std::fs::read_link(root.join("proc/self"))
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id())
}

/// What a sample needs of `/proc/<pid>/stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    /// Ticks in user and in kernel mode.
    pub utime: u64,
    pub stime: u64,
    /// Ticks after boot the process started: with the pid, who it is.
    pub starttime: u64,
    /// Resident pages.
    pub rss: u64,
    /// The kernel's PF_* flags.
    pub flags: u64,
}

/// A kept `stat` file read again into `buf`: `None` once its process is gone.
fn read_stat_at(file: &std::fs::File, buf: &mut Vec<u8>) -> Option<ProcStat> {
    read_whole_at(file, buf).ok()?;
    parse_stat(buf)
}

/// A kept `schedstat` file read again: the task's CPU time in nanoseconds, `None` once
/// its process is gone.
fn read_schedstat_at(file: &std::fs::File, buf: &mut Vec<u8>) -> Option<u64> {
    read_whole_at(file, buf).ok()?;
    let first = buf.split(|&b| b == b' ').next()?;
    std::str::from_utf8(first).ok()?.trim_end().parse().ok()
}

/// Nanoseconds of CPU time as clock ticks, as `stat` counts them.
fn ns_to_ticks(ns: u64, ticks_per_s: f64) -> u64 {
    (ns as f64 * ticks_per_s / 1e9) as u64
}

/// One `stat` line, reading only the six fields a sample uses. Every process is read
/// every sample, and a full parse (procfs_core's 52 fields) was a third of that cost.
/// The name is what lies between the first `(` and the last `)`: it may hold both.
pub fn parse_stat(line: &[u8]) -> Option<ProcStat> {
    let open = line.iter().position(|&b| b == b'(')?;
    let close = line.iter().rposition(|&b| b == b')')?;
    let comm = String::from_utf8_lossy(line.get(open + 1..close)?).into_owned();
    // Fields from the third (state) on; field n is at n - 3.
    let mut fields = line.get(close + 2..)?.split(|&b| b == b' ');
    let mut number = |skip: usize| -> Option<u64> {
        let f = fields.nth(skip)?;
        std::str::from_utf8(f).ok()?.trim_end().parse().ok()
    };
    let flags = number(6)?;
    let utime = number(4)?;
    let stime = number(0)?;
    let starttime = number(6)?;
    let rss = number(1)?;
    Some(ProcStat {
        comm,
        utime,
        stime,
        starttime,
        rss,
        flags,
    })
}

/// `/etc/passwd`: uid to name.
pub fn parse_passwd(text: &str) -> HashMap<u32, String> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            (!name.is_empty() && !name.starts_with('#')).then(|| (uid, name.to_owned()))
        })
        .collect()
}

/// The command line, arguments joined by spaces, cut at [`MAX_CMDLINE_BYTES`]; a
/// kernel thread (no command line) is shown as `[name]`, as `ps` does. Secrets vigil
/// knows of are redacted; others are the reason this is off by default.
fn read_cmdline(dir: &Path, name: &str) -> String {
    let mut bytes = Vec::new();
    let read = std::fs::File::open(dir.join("cmdline"))
        .and_then(|f| f.take(MAX_CMDLINE_BYTES as u64 + 1).read_to_end(&mut bytes));
    if read.is_err() || bytes.is_empty() {
        return format!("[{name}]");
    }
    let cut = bytes.len() > MAX_CMDLINE_BYTES;
    bytes.truncate(MAX_CMDLINE_BYTES);
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    for b in &mut bytes {
        if *b == 0 {
            *b = b' ';
        }
    }
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if cut {
        text.push('…');
    }
    crate::config::redact(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_line(pid: i32, comm: &str, utime: u64, starttime: u64, rss_pages: u64) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 {utime} 0 0 0 20 0 1 0 \
             {starttime} 10000000 {rss_pages} 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 \
             17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    fn put(root: &Path, pid: i32, comm: &str, utime: u64, start: u64, rss: u64) {
        let dir = root.join("proc").join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), stat_line(pid, comm, utime, start, rss)).unwrap();
        std::fs::write(dir.join("cmdline"), format!("{comm}\0--flag\0value\0")).unwrap();
    }

    #[test]
    fn cpu_is_the_time_used_since_the_previous_sample_and_memory_is_resident_pages() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n",
        )
        .unwrap();
        put(root.path(), 10, "idle one", 500, 1, 1000);
        put(root.path(), 20, "busy (x)", 100, 2, 10);
        let mut t = ProcessTable::new(root.path());
        t.ticks_per_s = 100.0;
        t.page_size = 4096;
        let first = t.top(5, 1.0, false, None);
        assert!(
            first.by_cpu.iter().all(|p| p.cpu_pct == 0.0),
            "no interval yet"
        );

        // One second later: pid 20 used 0.5 s, pid 10 nothing; pid 30 is new and used
        // 0.2 s since it started.
        put(root.path(), 10, "idle one", 500, 1, 1000);
        put(root.path(), 20, "busy (x)", 150, 2, 10);
        put(root.path(), 30, "new", 20, 9, 5);
        let top = t.top(2, 1.0, false, None);
        let cpu: Vec<(i32, f64)> = top.by_cpu.iter().map(|p| (p.pid, p.cpu_pct)).collect();
        assert_eq!(cpu, [(20, 50.0), (30, 20.0)]);
        assert_eq!(
            top.by_cpu[0].name, "busy (x)",
            "a name with spaces and parentheses"
        );
        let mem: Vec<(i32, u64)> = top.by_memory.iter().map(|p| (p.pid, p.rss_bytes)).collect();
        assert_eq!(mem, [(10, 4_096_000), (20, 40_960)]);
        assert!(top.by_cpu.iter().all(|p| p.cmdline.is_none()));
        // This test runs as some user: named from the fake passwd when root, else the uid.
        let me = nix::unistd::getuid().as_raw();
        let expected = if me == 0 {
            "root".to_owned()
        } else {
            me.to_string()
        };
        assert_eq!(top.by_cpu[0].user, expected);

        put(root.path(), 40, "x", 0, 3, 1);
        let with = t.top(1, 1.0, true, None);
        assert_eq!(
            with.by_memory[0].cmdline.as_deref(),
            Some("idle one --flag value")
        );
    }

    #[test]
    fn a_kept_stat_file_reads_fresh_figures_and_fails_once_its_process_is_gone() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let file = std::fs::File::open(format!("/proc/{pid}/stat")).unwrap();
        let mut buf = Vec::new();
        let ticks = |buf: &[u8]| parse_stat(buf).map(|s| s.utime + s.stime).unwrap();
        read_whole_at(&file, &mut buf).unwrap();
        let first = ticks(&buf);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            read_whole_at(&file, &mut buf).unwrap();
            if ticks(&buf) > first {
                break;
            }
            assert!(Instant::now() < deadline, "the kept file never moved");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Gone and reaped: whoever gets the pid next is never read through this file.
        assert!(read_whole_at(&file, &mut buf).is_err());

        // The table lets go of it and reads the rest.
        let mut t = ProcessTable::new(Path::new("/"));
        t.top(1, 1.0, false, None);
        assert!(!t.open.contains_key(&pid));
        assert!(t.open.contains_key(&(std::process::id() as i32)));
    }

    #[test]
    fn a_kernel_thread_is_timed_from_schedstat_after_its_first_stat() {
        let root = tempfile::tempdir().unwrap();
        let kthread = |ns: u64| {
            let dir = root.path().join("proc/7");
            std::fs::create_dir_all(&dir).unwrap();
            // PF_KTHREAD | PF_NOFREEZE, as kworkers have; stat's own times are stale
            // on purpose: schedstat must be what counts.
            let line = stat_line(7, "kworker/0:1", 1, 3, 0).replace("4194560", "2129984");
            std::fs::write(dir.join("stat"), line).unwrap();
            std::fs::write(dir.join("schedstat"), format!("{ns} 5000 12\n")).unwrap();
        };
        kthread(2_000_000_000);
        put(root.path(), 10, "user", 100, 1, 10);
        let mut t = ProcessTable::new(root.path());
        t.ticks_per_s = 100.0;
        t.top(5, 1.0, false, None);
        assert!(matches!(t.open.get(&7), Some(Kept::Kernel { .. })));
        assert!(matches!(t.open.get(&10), Some(Kept::Stat(_))));

        // 0.3 s of CPU in the second since: 30 %. The stat file is not read again
        // (removing it changes nothing) and the name is the one it gave.
        kthread(2_300_000_000);
        std::fs::remove_file(root.path().join("proc/7/stat")).unwrap();
        put(root.path(), 10, "user", 110, 1, 10);
        let top = t.top(5, 1.0, false, None);
        let cpu: Vec<(i32, &str, f64, u64)> = top
            .by_cpu
            .iter()
            .map(|p| (p.pid, p.name.as_str(), p.cpu_pct, p.rss_bytes))
            .collect();
        assert_eq!(
            cpu,
            [(7, "kworker/0:1", 30.0, 0), (10, "user", 10.0, 40_960)]
        );

        // Without schedstat (a kernel built without it), stat serves as for any process.
        kthread(0);
        std::fs::remove_file(root.path().join("proc/7/schedstat")).unwrap();
        let mut t = ProcessTable::new(root.path());
        t.top(5, 1.0, false, None);
        assert!(matches!(t.open.get(&7), Some(Kept::Stat(_))));
    }

    #[test]
    fn this_hosts_kernel_threads_read_the_same_cpu_time_from_schedstat_as_from_stat() {
        let mut t = ProcessTable::new(Path::new("/"));
        t.top(1, 1.0, false, None);
        let hz = t.ticks_per_s;
        let kernel: Vec<i32> = t
            .open
            .iter()
            .filter(|(_, k)| matches!(k, Kept::Kernel { .. }))
            .map(|(pid, _)| *pid)
            .collect();
        assert!(!kernel.is_empty(), "every Linux host has kthreadd");
        assert!(
            matches!(
                t.open.get(&(std::process::id() as i32)),
                Some(Kept::Stat(_))
            ),
            "this process is no kernel thread"
        );
        for pid in kernel {
            let (Ok(stat), Ok(sched)) = (
                std::fs::read(format!("/proc/{pid}/stat")),
                std::fs::read(format!("/proc/{pid}/schedstat")),
            ) else {
                continue; // gone meanwhile
            };
            let stat = parse_stat(&stat).unwrap();
            assert_ne!(stat.flags & PF_KTHREAD, 0);
            let ns: u64 = std::str::from_utf8(&sched)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let from_sched = ns_to_ticks(ns, hz);
            let from_stat = stat.utime + stat.stime;
            assert!(
                from_sched.abs_diff(from_stat) <= 2,
                "pid {pid}: {from_sched} ticks from schedstat, {from_stat} from stat"
            );
        }
    }

    #[test]
    fn proc_is_listed_again_only_once_a_pid_was_handed_out() {
        let root = tempfile::tempdir().unwrap();
        put(root.path(), 10, "a", 1, 1, 1);
        put(root.path(), 20, "b", 1, 2, 1);
        let mut t = ProcessTable::new(root.path());
        assert!(!t.own_namespace, "a fake root is no namespace of ours");
        t.own_namespace = true;
        t.top(5, 1.0, false, Some(20));
        assert_eq!(t.listed(), 2);

        // A directory appearing without a pid handed out is not looked for (a real
        // /proc cannot do that): proof the listing was skipped. One gone is dropped.
        put(root.path(), 30, "c", 1, 3, 1);
        // Emptied first: the kept descriptor of a fake file would read on after removal.
        std::fs::write(root.path().join("proc/10/stat"), "").unwrap();
        std::fs::remove_dir_all(root.path().join("proc/10")).unwrap();
        let pids = |t: &mut ProcessTable, last_pid: u32| {
            let mut p: Vec<i32> = t
                .top(5, 1.0, false, Some(last_pid))
                .by_memory
                .iter()
                .map(|p| p.pid)
                .collect();
            p.sort();
            p
        };
        assert_eq!(pids(&mut t, 20), [20]);
        assert_eq!(t.listed(), 1);

        // A pid handed out: listed again.
        assert_eq!(pids(&mut t, 30), [20, 30]);
        assert_eq!(t.listed(), 2);
    }

    #[test]
    fn a_process_started_or_ended_between_samples_is_seen_on_this_host() {
        let mut t = ProcessTable::new(Path::new("/"));
        assert!(t.own_namespace, "natively, /proc is our namespace's");
        // Read before each look, as the sampler does.
        let last_pid = || {
            use procfs_core::FromRead as _;
            let text = std::fs::read("/proc/loadavg").unwrap();
            Some(
                procfs_core::LoadAverage::from_read(text.as_slice())
                    .unwrap()
                    .latest_pid,
            )
        };
        let listed = |t: &mut ProcessTable, pid: i32| {
            t.top(usize::MAX, 1.0, false, last_pid())
                .by_memory
                .iter()
                .any(|p| p.pid == pid)
        };
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        t.top(1, 1.0, false, last_pid());
        // A second look with no process started in between: the known ones, read again.
        assert!(listed(&mut t, pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            !listed(&mut t, pid),
            "gone, whether /proc was listed or not"
        );
        let mut next = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(
            listed(&mut t, next.id() as i32),
            "a new one is always found"
        );
        next.kill().unwrap();
        next.wait().unwrap();
    }

    #[test]
    fn the_listing_counts_every_process_and_nothing_when_proc_cannot_be_read() {
        let root = tempfile::tempdir().unwrap();
        put(root.path(), 10, "a", 1, 1, 1);
        put(root.path(), 20, "b", 1, 2, 1);
        std::fs::create_dir_all(root.path().join("proc/self")).unwrap();
        let mut t = ProcessTable::new(root.path());
        t.top(1, 1.0, false, None);
        assert_eq!(t.listed(), 2, "numeric entries only");
        std::fs::remove_dir_all(root.path().join("proc")).unwrap();
        t.top(1, 1.0, false, None);
        assert_eq!(t.listed(), 0, "not the last listing's count");
    }

    proptest::proptest! {
        #[test]
        fn the_lean_stat_parser_reads_what_procfs_core_reads(
            pid in 1i32..4_194_304,
            comm in "[^\\n\\x00]{0,15}",
            utime in proptest::prelude::any::<u64>(),
            stime in proptest::prelude::any::<u64>(),
            start in proptest::prelude::any::<u64>(),
            rss in 0u64..(i64::MAX as u64),
            flags in proptest::prelude::any::<u32>(),
        ) {
            let line = format!(
                "{pid} ({comm}) S 1 {pid} {pid} 0 -1 {flags} 100 0 0 0 {utime} {stime} 0 0 20 0 \
                 1 0 {start} 10000000 {rss} 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 \
                 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
            );
            use procfs_core::FromRead as _;
            let full = procfs_core::process::Stat::from_read(line.as_bytes()).unwrap();
            let lean = parse_stat(line.as_bytes()).unwrap();
            proptest::prop_assert_eq!(
                lean,
                ProcStat {
                    comm: full.comm,
                    utime: full.utime,
                    stime: full.stime,
                    starttime: full.starttime,
                    rss: full.rss,
                    flags: u64::from(full.flags),
                }
            );
        }

        #[test]
        fn any_bytes_as_a_stat_line_give_an_answer_or_none_never_a_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let _ = parse_stat(&bytes);
        }
    }

    #[test]
    fn this_processs_own_stat_reads_as_procfs_core_reads_it() {
        use procfs_core::FromRead as _;
        let bytes = std::fs::read("/proc/self/stat").unwrap();
        let full = procfs_core::process::Stat::from_read(bytes.as_slice()).unwrap();
        let lean = parse_stat(&bytes).unwrap();
        assert_eq!(lean.comm, full.comm);
        assert_eq!(lean.starttime, full.starttime);
        assert!(lean.rss > 0);
    }

    #[test]
    fn passwd_names_uids() {
        let users = parse_passwd(
            "root:x:0:0::/root:/bin/sh\nvigil:x:999:999::/:/usr/sbin/nologin\nbroken\n",
        );
        assert_eq!(users.get(&0).map(String::as_str), Some("root"));
        assert_eq!(users.get(&999).map(String::as_str), Some("vigil"));
        assert_eq!(users.len(), 2);
    }
}
