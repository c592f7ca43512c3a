//! Mounted file systems, read from the kernel: `/proc/self/mountinfo` for what is
//! mounted, `statvfs` for space, `/proc/diskstats` for I/O.
//!
//! Done here rather than by sysinfo so that excluded mounts are never touched and a
//! mount whose statistics hang (a dead NFS server, a stuck FUSE daemon) costs one
//! bounded wait: each `statvfs` runs on a worker thread with a deadline; a worker that
//! misses it is left behind with that mount, which is then reported unresponsive and
//! skipped, without a new thread, until the stuck call returns. So however long a
//! mount hangs, at most one thread waits on it. Local disk file systems ([`LOCAL_FS`])
//! answer `statvfs` from their superblock in memory, so they are asked directly: the
//! hand-off to the worker and back was two thread wake-ups a sample.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::kept::KeptFile;

/// How long one mount's statistics may take before it counts as unresponsive.
pub const STAT_TIMEOUT: Duration = Duration::from_secs(2);

/// File systems whose `statvfs` answers from memory (no server, daemon or pool to wait
/// on), so it runs on the sampling thread.
pub const LOCAL_FS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "vfat", "exfat", "ntfs3", "tmpfs", "ramfs",
    "squashfs", "erofs", "iso9660",
];

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: String,
    pub fs_type: String,
    /// What is mounted (`/dev/vda1`, `server:/export`, `overlay`…).
    pub source: String,
    /// The file system's device numbers, as `/proc/diskstats` names block devices.
    pub dev: (u32, u32),
}

/// Pseudo file systems and kernel mounts that hold no data (as sysinfo skips them).
const PSEUDO_FS: &[&str] = &[
    "rootfs",
    "sysfs",
    "proc",
    "devtmpfs",
    "cgroup",
    "cgroup2",
    "pstore",
    "rpc_pipefs",
    "iso9660",
    "devpts",
    "hugetlbfs",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "configfs",
    "bpf",
    "binfmt_misc",
    "fusectl",
    "efivarfs",
];

/// Where `/proc/<pid>/mountinfo` is under `root` (`/` and `self`, or the host's root
/// mounted into a container and `1`, its init).
pub fn mountinfo_path(root: &Path, pid: &str) -> PathBuf {
    root.join("proc").join(pid).join("mountinfo")
}

/// A `mountinfo` file, parsed again only after the kernel announces a change: reading
/// it renders every mount afresh (a twentieth of a one-second host job's CPU), and
/// mounts change seldom.
#[derive(Debug)]
pub struct MountTable {
    file: KeptFile,
    mounts: Option<Vec<Mount>>,
    /// Times the file was read, for tests.
    reads: u64,
}

impl MountTable {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            file: KeptFile::new(path),
            mounts: None,
            reads: 0,
        }
    }

    /// The mounts now; none while the file cannot be read (tried again next time).
    pub fn mounts(&mut self) -> &[Mount] {
        if self.mounts.is_none() || self.file.announced_change() {
            self.reads += 1;
            self.mounts = self.file.read_str().map(parse_mountinfo);
        }
        self.mounts.as_deref().unwrap_or_default()
    }

    #[cfg(test)]
    pub fn reads(&self) -> u64 {
        self.reads
    }
}

/// A `mountinfo` text: the visible mount of each mount point, pseudo file systems and
/// kernel trees (`/sys`, `/proc`, `/dev`) left out.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out: Vec<Mount> = Vec::new();
    for line in text.lines() {
        // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rest: Vec<&str> = right.split(' ').collect();
        let (Some(dev), Some(point), Some(fs_type), Some(source)) =
            (fields.get(2), fields.get(4), rest.first(), rest.get(1))
        else {
            continue;
        };
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else {
            continue;
        };
        let mount_point = unescape(point);
        if PSEUDO_FS.contains(fs_type)
            || ["/sys", "/proc", "/dev"]
                .iter()
                .any(|p| mount_point == *p || mount_point.starts_with(&format!("{p}/")))
        {
            continue;
        }
        let mount = Mount {
            mount_point,
            fs_type: (*fs_type).to_owned(),
            source: unescape(source),
            dev: (major, minor),
        };
        // A later mount on the same point hides the earlier one.
        out.retain(|m| m.mount_point != mount.mount_point);
        out.push(mount);
    }
    out
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let n = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Cumulative I/O of one block device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounters {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub written_bytes: u64,
    /// Milliseconds the device had I/O in flight.
    pub busy_ms: u64,
}

/// `/proc/diskstats`, by device numbers and by name.
pub fn parse_diskstats(text: &str) -> HashMap<(u32, u32), (String, IoCounters)> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 14 {
            continue;
        }
        let n = |i: usize| f[i].parse::<u64>().unwrap_or(0);
        let (Ok(major), Ok(minor)) = (f[0].parse(), f[1].parse()) else {
            continue;
        };
        // Sectors are 512 bytes in this file whatever the device's sector size.
        let counters = IoCounters {
            reads: n(3),
            read_bytes: n(5).saturating_mul(512),
            writes: n(7),
            written_bytes: n(9).saturating_mul(512),
            busy_ms: n(12),
        };
        out.insert((major, minor), (f[2].to_owned(), counters));
    }
    out
}

/// The I/O counters of `mount`'s device: by device numbers, else (a file system on
/// an anonymous device, like btrfs) by the name of the device it was mounted from.
pub fn io_of(
    mount: &Mount,
    stats: &HashMap<(u32, u32), (String, IoCounters)>,
    root: &Path,
) -> Option<IoCounters> {
    if let Some((_, c)) = stats.get(&mount.dev) {
        return Some(*c);
    }
    let source = mount.source.strip_prefix('/')?;
    let resolved = std::fs::canonicalize(root.join(source)).ok()?;
    let name = resolved.file_name()?.to_str()?;
    stats.values().find(|(n, _)| n == name).map(|(_, c)| *c)
}

/// Size and free space of a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// Inodes in all and free; 0 in all where the file system has no fixed number.
    pub inodes: u64,
    pub inodes_free: u64,
}

/// `statvfs(path)`: the blocking call that may hang.
pub fn statvfs(path: &Path) -> io::Result<Space> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let frsize = s.fragment_size() as u64;
    Ok(Space {
        total_bytes: (s.blocks() as u64).saturating_mul(frsize),
        available_bytes: (s.blocks_available() as u64).saturating_mul(frsize),
        inodes: s.files() as u64,
        inodes_free: s.files_free() as u64,
    })
}

/// What one mount's statistics gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    Space(Space),
    Failed(String),
    /// No answer within the bound (now or since `since`); skipped.
    Unresponsive {
        since: Instant,
    },
}

type Answer = (PathBuf, io::Result<Space>);

/// A thread that runs `statvfs` calls one after another.
struct Worker {
    ask: mpsc::Sender<PathBuf>,
    answers: mpsc::Receiver<Answer>,
}

impl Worker {
    fn spawn(stat: fn(&Path) -> io::Result<Space>) -> io::Result<Self> {
        let (ask, asked) = mpsc::channel::<PathBuf>();
        let (answer, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("vigil-statvfs".into())
            .spawn(move || {
                // Ends when its sender is dropped (replaced, or the sampler is gone).
                while let Ok(path) = asked.recv() {
                    let result = stat(&path);
                    if answer.send((path, result)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self { ask, answers })
    }
}

/// Runs `statvfs` with a deadline, remembering the mounts that did not answer.
pub struct Prober {
    stat: fn(&Path) -> io::Result<Space>,
    timeout: Duration,
    worker: Option<Worker>,
    /// Mounts whose call is still outstanding, with the worker left waiting on it.
    stuck: HashMap<PathBuf, (Instant, Worker)>,
}

impl Prober {
    pub fn new(stat: fn(&Path) -> io::Result<Space>, timeout: Duration) -> Self {
        Self {
            stat,
            timeout,
            worker: None,
            stuck: HashMap::new(),
        }
    }

    /// Threads currently waiting on an unresponsive mount.
    #[cfg(test)]
    pub fn stuck_threads(&self) -> usize {
        self.stuck.len()
    }

    /// `path`'s space; `fs_type` says whether it may hang (see [`LOCAL_FS`]).
    pub fn probe(&mut self, path: &Path, fs_type: &str) -> Probe {
        if LOCAL_FS.contains(&fs_type) {
            return match (self.stat)(path) {
                Ok(space) => Probe::Space(space),
                Err(e) => Probe::Failed(e.to_string()),
            };
        }
        if let Some((since, worker)) = self.stuck.get(path) {
            match worker.answers.try_recv() {
                // It answered at last: that worker ends, and the mount is probed anew.
                Ok(_) | Err(mpsc::TryRecvError::Disconnected) => {
                    self.stuck.remove(path);
                }
                Err(mpsc::TryRecvError::Empty) => return Probe::Unresponsive { since: *since },
            }
        }
        let worker = match self.worker.take() {
            Some(w) => w,
            None => match Worker::spawn(self.stat) {
                Ok(w) => w,
                Err(e) => return Probe::Failed(format!("cannot start a thread: {e}")),
            },
        };
        if worker.ask.send(path.to_path_buf()).is_err() {
            return Probe::Failed("the statistics thread ended".into());
        }
        match worker.answers.recv_timeout(self.timeout) {
            Ok((_, result)) => {
                self.worker = Some(worker);
                match result {
                    Ok(space) => Probe::Space(space),
                    Err(e) => Probe::Failed(e.to_string()),
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let since = Instant::now() - self.timeout;
                self.stuck.insert(path.to_path_buf(), (since, worker));
                Probe::Unresponsive { since }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Probe::Failed("the statistics thread ended".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[test]
    fn mountinfo_keeps_real_file_systems_and_the_visible_mount_of_each_point() {
        let text = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw - proc proc rw
24 22 0:22 / /sys rw - sysfs sysfs rw
25 22 0:5 / /dev rw - devtmpfs udev rw
26 22 0:23 / /run rw - tmpfs tmpfs rw
27 22 0:45 / /mnt/my\\040data rw - nfs4 server:/export rw
28 22 252:16 / /srv rw - xfs /dev/vdb rw
29 22 252:32 / /srv rw - ext4 /dev/vdc rw
30 22 0:50 / /home/u/.cache/doc rw - fuse.portal portal rw
";
        let m = parse_mountinfo(text);
        let points: Vec<&str> = m.iter().map(|m| m.mount_point.as_str()).collect();
        assert_eq!(
            points,
            ["/", "/run", "/mnt/my data", "/srv", "/home/u/.cache/doc"]
        );
        let srv = m.iter().find(|m| m.mount_point == "/srv").unwrap();
        assert_eq!(
            (srv.fs_type.as_str(), srv.dev),
            ("ext4", (252, 32)),
            "the later mount hides the earlier"
        );
        assert_eq!(m[0].source, "/dev/vda1");
    }

    #[test]
    fn diskstats_counts_operations_bytes_and_busy_time() {
        let text = "252       0 vda 12 3 800 5 40 6 1600 7 0 90 12\n 252 1 vda1 1 0 8 0 0 0 0 0 0 1 0 0 0 0 0\n";
        let s = parse_diskstats(text);
        let (name, c) = &s[&(252, 0)];
        assert_eq!(name, "vda");
        assert_eq!(
            *c,
            IoCounters {
                reads: 12,
                read_bytes: 800 * 512,
                writes: 40,
                written_bytes: 1600 * 512,
                busy_ms: 90
            }
        );
        assert_eq!(s[&(252, 1)].1.reads, 1);
    }

    static RELEASE: AtomicBool = AtomicBool::new(false);
    static CALLS: AtomicUsize = AtomicUsize::new(0);

    /// `/hang` answers only once released; everything else at once.
    fn fake_stat(path: &Path) -> io::Result<Space> {
        if path == Path::new("/hang") {
            CALLS.fetch_add(1, Ordering::SeqCst);
            while !RELEASE.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(Space {
            total_bytes: 100,
            available_bytes: 40,
            inodes: 10,
            inodes_free: 5,
        })
    }

    #[test]
    fn a_hanging_mount_costs_one_bounded_wait_and_one_thread_until_it_answers() {
        let mut p = Prober::new(fake_stat, Duration::from_millis(100));
        let ok = Probe::Space(Space {
            total_bytes: 100,
            available_bytes: 40,
            inodes: 10,
            inodes_free: 5,
        });
        assert_eq!(p.probe(Path::new("/"), "nfs4"), ok);
        let t = Instant::now();
        assert!(matches!(
            p.probe(Path::new("/hang"), "nfs4"),
            Probe::Unresponsive { .. }
        ));
        assert!(t.elapsed() < Duration::from_secs(1));
        // The next mounts still answer, on a fresh thread.
        assert_eq!(p.probe(Path::new("/srv"), "fuse.sshfs"), ok);
        // Sample after sample, the hung mount is skipped at once, with no new thread.
        for _ in 0..20 {
            let t = Instant::now();
            assert!(matches!(
                p.probe(Path::new("/hang"), "nfs4"),
                Probe::Unresponsive { .. }
            ));
            assert!(t.elapsed() < Duration::from_millis(50));
        }
        assert_eq!(
            CALLS.load(Ordering::SeqCst),
            1,
            "never a second call on a hung mount"
        );
        assert_eq!(p.stuck_threads(), 1);
        // Once it answers, it is probed again like any other.
        RELEASE.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(p.probe(Path::new("/hang"), "nfs4"), ok);
        assert_eq!(p.stuck_threads(), 0);
    }

    #[test]
    fn a_local_file_system_is_asked_on_the_sampling_thread_and_others_on_the_worker() {
        thread_local! {
            static HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        fn where_asked(_: &Path) -> io::Result<Space> {
            Ok(Space {
                total_bytes: u64::from(HERE.with(|h| h.get())),
                available_bytes: 0,
                inodes: 0,
                inodes_free: 0,
            })
        }
        HERE.with(|h| h.set(true));
        let mut p = Prober::new(where_asked, Duration::from_secs(5));
        let on_this_thread = |probe: Probe| match probe {
            Probe::Space(s) => s.total_bytes == 1,
            other => panic!("{other:?}"),
        };
        assert!(on_this_thread(p.probe(Path::new("/"), "ext4")));
        assert!(on_this_thread(p.probe(Path::new("/tmp"), "tmpfs")));
        assert!(!on_this_thread(p.probe(Path::new("/mnt"), "nfs4")));
        assert!(!on_this_thread(p.probe(Path::new("/fuse"), "fuse.sshfs")));
        assert!(!on_this_thread(p.probe(Path::new("/tank"), "zfs")));
    }

    #[test]
    fn the_mount_table_is_read_again_only_after_the_kernel_announces_a_mount() {
        // A shell in a mount namespace of its own mounts a tmpfs when told (by a file
        // appearing), so the test's own mounts stay as they are.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let go = dir.path().join("go");
        std::fs::create_dir(&target).unwrap();
        let script = format!(
            "while [ ! -e {go} ]; do sleep 0.02; done; mount -t tmpfs vigil-test {t} && exec sleep 30",
            go = go.display(),
            t = target.display()
        );
        struct KillOnDrop(std::process::Child);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let Ok(child) = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .spawn()
        else {
            eprintln!("no unshare here: not checked");
            return;
        };
        let mut child = KillOnDrop(child);
        // Opened before the shell has its own namespace, the file would show ours.
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns(&child.0.id().to_string()) == ns("self") {
            assert!(Instant::now() < deadline, "unshare never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut table = MountTable::new(format!("/proc/{}/mountinfo", child.0.id()));
        let has_target = |t: &mut MountTable| {
            t.mounts()
                .iter()
                .any(|m| Path::new(&m.mount_point) == target)
        };
        assert!(!has_target(&mut table));
        let before = table.reads();
        for _ in 0..20 {
            assert!(!has_target(&mut table));
        }
        assert_eq!(table.reads(), before, "nothing mounted, nothing read again");

        std::fs::write(&go, "").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !has_target(&mut table) {
            if child.0.try_wait().unwrap().is_some() {
                eprintln!("mount not permitted here: not checked");
                return;
            }
            assert!(Instant::now() < deadline, "the new mount was never seen");
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = table.reads();
        assert!(after > before);
        assert!(has_target(&mut table));
        assert_eq!(table.reads(), after, "read once per change");
    }

    #[test]
    fn statvfs_reads_the_root_file_system() {
        let s = statvfs(Path::new("/")).unwrap();
        assert!(s.total_bytes > 0 && s.available_bytes <= s.total_bytes);
    }
}
