//! Reads the host, keeping its counters' previous values (and the kernel files they
//! come from, open) between samples, so CPU usage and every rate cover exactly the
//! time since the previous sample.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use std::path::{Path, PathBuf};

use sysinfo::{CpuRefreshKind, MINIMUM_CPU_UPDATE_INTERVAL, System};
use wildmatch::WildMatch;

use super::containers::ContainerTable;
use super::disks::{self, IoCounters, Probe, Prober};
use super::host::{CpuTicks, HostFiles};
use super::kept::KeptFile;
use super::pressure::PressureFiles;
use super::processes::ProcessTable;
use super::sample::{
    Cpu, Disk, Interface, Load, Memory, Network, OwnProcess, SHAPE_VERSION, Sample, Traffic,
    UnavailableDisk, round2,
};
use super::{Collect, SystemMetricsConfig};

/// Which mounts and interfaces to leave out.
#[derive(Debug, Clone)]
pub struct Filters {
    mounts: Vec<WildMatch>,
    fs_types: Vec<WildMatch>,
    interfaces: Vec<WildMatch>,
}

impl Filters {
    pub fn new(config: &SystemMetricsConfig) -> Self {
        let compile = |v: &[String]| v.iter().map(|p| WildMatch::new(p)).collect();
        Self {
            mounts: compile(&config.exclude_mounts),
            fs_types: compile(&config.exclude_fs_types),
            interfaces: compile(&config.exclude_interfaces),
        }
    }

    fn keeps_disk(&self, mount: &str, fs: &str) -> bool {
        !self.mounts.iter().any(|m| m.matches(mount))
            && !self.fs_types.iter().any(|m| m.matches(fs))
    }

    fn keeps_interface(&self, name: &str) -> bool {
        !self.interfaces.iter().any(|m| m.matches(name))
    }
}

/// Cumulative counters from the previous sample.
#[derive(Debug, Default)]
struct Previous {
    disks: HashMap<(String, String), IoCounters>,
    interfaces: HashMap<String, [u64; 6]>,
    own_cpu_ms: Option<u64>,
    /// The sum of all CPUs, then each core.
    cpu: Vec<CpuTicks>,
}

/// Figures that barely move, read again once a minute: every second they cost more
/// than all the counters (the frequency makes the kernel ask every core).
#[derive(Debug, Default)]
struct Slow {
    read_at: Option<Instant>,
    frequency_mhz: Option<u64>,
    cgroup_memory_bytes: Option<u64>,
    cgroup_cores: Option<f64>,
}

/// The kernel files read every sample, kept open.
#[derive(Debug)]
struct Files {
    host: HostFiles,
    net_dev: KeptFile,
    mountinfo: disks::MountTable,
    /// This process's own mounts, to tell which of the host's are visible through
    /// its root; only with a host root.
    own_mountinfo: Option<disks::MountTable>,
    diskstats: KeptFile,
    pressure: PressureFiles,
}

pub struct Sampler {
    collect: BTreeSet<Collect>,
    filters: Filters,
    system: System,
    /// Where the host's `/proc` and mounts are seen from (`/` natively).
    root: PathBuf,
    /// The host's processes as seen from `root`: `self` natively, `1` (the host's
    /// init, for its mount and network namespaces) through a host root.
    host_pid: &'static str,
    prober: Prober,
    files: Files,
    slow: Slow,
    /// vigil's own `/proc/self/stat`.
    own_stat: KeptFile,
    /// Clock ticks per second and page size, for `stat`'s figures.
    ticks_per_s: u64,
    page_size: u64,
    last_at: Instant,
    previous: Previous,
    min_cpu_interval: std::time::Duration,
    /// Kept between samples for CPU over the interval; only when collected.
    processes: Option<ProcessTable>,
    containers: Option<ContainerTable>,
    top_n: usize,
    process_cmdline: bool,
}

/// How often the CPU frequency and the cgroup limits are read again (samples between
/// repeat the last values).
const SLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[error("cannot read host metrics: {0}")]
pub struct SamplerError(String);

/// The counter's growth since `prev`; a counter that went backwards was reset (an
/// interface re-created, a disk re-attached) and counts from zero again.
pub fn counter_delta(prev: u64, now: u64) -> u64 {
    if now >= prev { now - prev } else { now }
}

impl Sampler {
    /// Takes the baseline the first sample is measured against.
    pub fn new(config: &SystemMetricsConfig) -> Result<Self, SamplerError> {
        Self::with_root(config, None)
    }

    /// Samples the host whose root file system is mounted at `host_root` (in a
    /// container: `/` of the host mounted read-only, as node_exporter's
    /// `--path.rootfs`), or this machine with `None`.
    pub fn with_root(
        config: &SystemMetricsConfig,
        host_root: Option<&std::path::Path>,
    ) -> Result<Self, SamplerError> {
        let system = System::new().map_err(|e| SamplerError(e.to_string()))?;
        let root = host_root.map_or_else(|| PathBuf::from("/"), PathBuf::from);
        let collect: BTreeSet<Collect> = config.collect.iter().copied().collect();
        let (ticks_per_s, page_size) = super::processes::ticks_and_page_size();
        let host_pid = if host_root.is_some() { "1" } else { "self" };
        let mut me = Self {
            processes: collect
                .contains(&Collect::TopProcesses)
                .then(|| ProcessTable::new(&root)),
            containers: collect
                .contains(&Collect::Containers)
                .then(|| ContainerTable::new(&root)),
            top_n: *config.top_n.get_ref() as usize,
            process_cmdline: config.process_cmdline,
            collect,
            filters: Filters::new(config),
            system,
            host_pid,
            prober: Prober::new(disks::statvfs, disks::STAT_TIMEOUT),
            files: Files {
                host: HostFiles::new(),
                net_dev: KeptFile::new(root.join("proc").join(host_pid).join("net/dev")),
                mountinfo: disks::MountTable::new(disks::mountinfo_path(&root, host_pid)),
                own_mountinfo: host_root
                    .is_some()
                    .then(|| disks::MountTable::new(disks::mountinfo_path(Path::new("/"), "self"))),
                diskstats: KeptFile::new(root.join("proc/diskstats")),
                pressure: PressureFiles::new(&root),
            },
            slow: Slow::default(),
            root,
            own_stat: KeptFile::new("/proc/self/stat"),
            ticks_per_s,
            page_size,
            // Pretend the minimum interval has passed: this baseline is discarded, and
            // start-up should not wait for it.
            last_at: Instant::now()
                .checked_sub(MINIMUM_CPU_UPDATE_INTERVAL)
                .unwrap_or_else(Instant::now),
            previous: Previous::default(),
            min_cpu_interval: MINIMUM_CPU_UPDATE_INTERVAL,
        };
        me.sample();
        Ok(me)
    }

    fn wants(&self, c: Collect) -> bool {
        self.collect.contains(&c)
    }

    /// Reads the host. Blocking (it reads /proc and /sys); run it off the async threads.
    pub fn sample(&mut self) -> Sample {
        // CPU usage is the busy share between two refreshes; closer than sysinfo's
        // minimum they are meaningless, so wait out the remainder.
        let since = self.last_at.elapsed();
        if self.wants(Collect::Cpu) && since < self.min_cpu_interval {
            std::thread::sleep(self.min_cpu_interval - since);
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_at).as_secs_f64();
        self.last_at = now;
        let per_s = |n: u64| round2(n as f64 / elapsed);

        if self.wants(Collect::Cpu) || self.wants(Collect::Memory) {
            self.read_slow(now);
        }
        let cpu = self.wants(Collect::Cpu).then(|| {
            let ticks = self.files.host.cpu_ticks();
            let usage = |i: usize| {
                let prev = self.previous.cpu.get(i).copied().unwrap_or_default();
                round2(ticks.get(i).map_or(0.0, |t| t.usage_since(prev)))
            };
            let cpu = Cpu {
                usage_pct: usage(0),
                per_core_pct: (1..ticks.len()).map(usage).collect(),
                cores: ticks.len().saturating_sub(1),
                frequency_mhz: self.slow.frequency_mhz,
                cgroup_limit_cores: self.slow.cgroup_cores,
            };
            self.previous.cpu = ticks;
            cpu
        });

        let memory = self.wants(Collect::Memory).then(|| {
            let m = self.files.host.memory().unwrap_or_default();
            let used = m.total.saturating_sub(m.available);
            Memory {
                total_bytes: m.total,
                used_bytes: used,
                available_bytes: m.available,
                used_pct: pct(used, m.total),
                swap_total_bytes: m.swap_total,
                swap_used_bytes: m.swap_total.saturating_sub(m.swap_free),
                cgroup_limit_bytes: self
                    .slow
                    .cgroup_memory_bytes
                    .filter(|&l| l > 0 && l < m.total),
            }
        });

        let mut unavailable = Vec::new();
        let disks = self.wants(Collect::Disk).then(|| {
            let mounts = self.files.mountinfo.mounts().to_vec();
            // Through a host root: where the host's mounts appear in this process's view.
            let visible: Option<HashSet<PathBuf>> = self.files.own_mountinfo.as_mut().map(|f| {
                f.mounts()
                    .iter()
                    .map(|m| PathBuf::from(&m.mount_point))
                    .collect()
            });
            let stats = self
                .files
                .diskstats
                .parse_or_default(disks::parse_diskstats);
            let mut seen = HashMap::new();
            let mut out = Vec::new();
            for m in mounts {
                // Excluded mounts are never touched, so they can never hang a sample.
                if !self.filters.keeps_disk(&m.mount_point, &m.fs_type) {
                    continue;
                }
                let path = self.root.join(m.mount_point.trim_start_matches('/'));
                let space = match self.prober.probe(&path, &m.fs_type) {
                    // Through a host root, a mount the host made after the root was
                    // bind-mounted without propagation is not there: the directory
                    // beneath it is, and its numbers would be another file system's.
                    Probe::Space(_)
                        if visible
                            .as_ref()
                            .is_some_and(|v| !v.contains(path.as_path())) =>
                    {
                        unavailable.push(UnavailableDisk {
                            error: format!(
                                "not visible under the host root {} (mount the host's / \
                                 with rslave propagation)",
                                self.root.display()
                            ),
                            mount: m.mount_point,
                            device: m.source,
                            fs: m.fs_type,
                        });
                        continue;
                    }
                    Probe::Space(space) => space,
                    Probe::Failed(error) => {
                        unavailable.push(UnavailableDisk {
                            mount: m.mount_point,
                            device: m.source,
                            fs: m.fs_type,
                            error,
                        });
                        continue;
                    }
                    Probe::Unresponsive { since } => {
                        unavailable.push(UnavailableDisk {
                            error: format!(
                                "statistics not answering for {} s; skipped until they do",
                                since.elapsed().as_secs()
                            ),
                            mount: m.mount_point,
                            device: m.source,
                            fs: m.fs_type,
                        });
                        continue;
                    }
                };
                let io = disks::io_of(&m, &stats, &self.root).unwrap_or_default();
                let key = (m.mount_point.clone(), m.source.clone());
                let delta = self.previous.disks.get(&key).map(|p| IoCounters {
                    reads: counter_delta(p.reads, io.reads),
                    read_bytes: counter_delta(p.read_bytes, io.read_bytes),
                    writes: counter_delta(p.writes, io.writes),
                    written_bytes: counter_delta(p.written_bytes, io.written_bytes),
                    busy_ms: counter_delta(p.busy_ms, io.busy_ms),
                });
                seen.insert(key, io);
                let inodes_used = space.inodes.saturating_sub(space.inodes_free);
                out.push(Disk {
                    mount: m.mount_point,
                    device: m.source,
                    fs: m.fs_type,
                    total_bytes: space.total_bytes,
                    available_bytes: space.available_bytes,
                    used_pct: pct(
                        space.total_bytes.saturating_sub(space.available_bytes),
                        space.total_bytes,
                    ),
                    read_bytes: delta.map(|d| d.read_bytes),
                    written_bytes: delta.map(|d| d.written_bytes),
                    read_bytes_per_s: delta.map(|d| per_s(d.read_bytes)),
                    written_bytes_per_s: delta.map(|d| per_s(d.written_bytes)),
                    inodes_total: (space.inodes > 0).then_some(space.inodes),
                    inodes_used: (space.inodes > 0).then_some(inodes_used),
                    inodes_used_pct: (space.inodes > 0).then(|| pct(inodes_used, space.inodes)),
                    reads_per_s: delta.map(|d| per_s(d.reads)),
                    writes_per_s: delta.map(|d| per_s(d.writes)),
                    busy_pct: delta.map(|d| {
                        round2((d.busy_ms as f64 / (elapsed * 1000.0) * 100.0).clamp(0.0, 100.0))
                    }),
                });
            }
            self.previous.disks = seen;
            out.sort_by(|a, b| a.mount.cmp(&b.mount));
            out
        });

        let network = self.wants(Collect::Network).then(|| {
            let counters = self.files.net_dev.parse_or_default(parse_net_dev);
            let mut seen = HashMap::new();
            let mut interfaces = Vec::new();
            let mut total = Traffic::default();
            for (name, counts) in counters {
                if !self.filters.keeps_interface(&name) {
                    continue;
                }
                let traffic = self.previous.interfaces.get(&name).map(|prev| {
                    let d: Vec<u64> = prev
                        .iter()
                        .zip(counts)
                        .map(|(&p, n)| counter_delta(p, n))
                        .collect();
                    Traffic {
                        rx_bytes: d[0],
                        tx_bytes: d[1],
                        rx_packets: d[2],
                        tx_packets: d[3],
                        rx_errors: d[4],
                        tx_errors: d[5],
                        rx_bytes_per_s: per_s(d[0]),
                        tx_bytes_per_s: per_s(d[1]),
                        rx_packets_per_s: per_s(d[2]),
                        tx_packets_per_s: per_s(d[3]),
                        rx_errors_per_s: per_s(d[4]),
                        tx_errors_per_s: per_s(d[5]),
                    }
                });
                if let Some(t) = &traffic {
                    total.rx_bytes += t.rx_bytes;
                    total.tx_bytes += t.tx_bytes;
                    total.rx_packets += t.rx_packets;
                    total.tx_packets += t.tx_packets;
                    total.rx_errors += t.rx_errors;
                    total.tx_errors += t.tx_errors;
                }
                seen.insert(name.clone(), counts);
                interfaces.push(Interface { name, traffic });
            }
            total.rx_bytes_per_s = per_s(total.rx_bytes);
            total.tx_bytes_per_s = per_s(total.tx_bytes);
            total.rx_packets_per_s = per_s(total.rx_packets);
            total.tx_packets_per_s = per_s(total.tx_packets);
            total.rx_errors_per_s = per_s(total.rx_errors);
            total.tx_errors_per_s = per_s(total.tx_errors);
            self.previous.interfaces = seen;
            interfaces.sort_by(|a, b| a.name.cmp(&b.name));
            Network { interfaces, total }
        });

        // One read serves the load section and the process table's new-pid check.
        let loadavg = (self.wants(Collect::Load) || self.processes.is_some())
            .then(|| self.files.host.loadavg())
            .flatten();
        let load = self.wants(Collect::Load).then(|| {
            let (one, five, fifteen) = loadavg.as_ref().map_or((0.0, 0.0, 0.0), |l| {
                (f64::from(l.one), f64::from(l.five), f64::from(l.fifteen))
            });
            Load { one, five, fifteen }
        });

        let uptime_s = self
            .wants(Collect::Uptime)
            .then(|| self.files.host.uptime_s().unwrap_or(0));
        let (top_n, cmdline) = (self.top_n, self.process_cmdline);
        let top_processes = self
            .processes
            .as_mut()
            .map(|t| t.top(top_n, elapsed, cmdline, loadavg.map(|l| l.latest_pid)));
        // top_processes has just listed /proc: its count saves a second listing.
        let processes = self
            .wants(Collect::Processes)
            .then(|| match &self.processes {
                Some(t) => t.listed(),
                None => count_processes(&self.root),
            });

        let own = self
            .wants(Collect::Own)
            .then(|| self.own_process(elapsed))
            .flatten();
        let containers = self.containers.as_mut().map(|t| t.sample(elapsed));
        let pressure = self
            .wants(Collect::Pressure)
            .then(|| self.files.pressure.read())
            .flatten();

        Sample {
            v: SHAPE_VERSION,
            // Microseconds: it is the rates' denominator, exact enough to recompute them.
            interval_s: (elapsed * 1e6).round() / 1e6,
            cpu,
            memory,
            disks,
            disks_unavailable: (!unavailable.is_empty()).then_some(unavailable),
            network,
            load,
            uptime_s,
            processes,
            own,
            top_processes,
            containers,
            pressure,
        }
    }

    /// Lowers the wait between CPU readings. Only for measuring the cost of a sample:
    /// below sysinfo's minimum the CPU figures are meaningless.
    pub fn set_min_cpu_interval_for_benchmarks(&mut self, interval: std::time::Duration) {
        self.min_cpu_interval = interval;
    }

    /// The frequency and the cgroup limits, when a minute has passed since they were
    /// last read. A cgroup limit is this process's own: a host seen through its root
    /// has none of it.
    fn read_slow(&mut self, now: Instant) {
        if self
            .slow
            .read_at
            .is_some_and(|t| now.duration_since(t) < SLOW_EVERY)
        {
            return;
        }
        self.slow.read_at = Some(now);
        if self.wants(Collect::Cpu) {
            self.system
                .refresh_cpu_specifics(CpuRefreshKind::nothing().with_frequency());
            let freqs: Vec<u64> = self
                .system
                .cpus()
                .iter()
                .map(|c| c.frequency())
                .filter(|f| *f > 0)
                .collect();
            self.slow.frequency_mhz =
                (!freqs.is_empty()).then(|| freqs.iter().sum::<u64>() / freqs.len() as u64);
        }
        let own = self.host_pid == "self";
        self.slow.cgroup_cores = own.then(cgroup_cpu_limit).flatten();
        self.slow.cgroup_memory_bytes = own
            .then(|| self.system.cgroup_limits())
            .flatten()
            .map(|l| l.total_memory);
    }

    fn own_process(&mut self, elapsed: f64) -> Option<OwnProcess> {
        let stat = super::processes::parse_stat(self.own_stat.read()?)?;
        let ticks = stat.utime.saturating_add(stat.stime);
        let cpu_ms = ticks.saturating_mul(1000) / self.ticks_per_s.max(1);
        let used = self
            .previous
            .own_cpu_ms
            .map_or(0, |prev| counter_delta(prev, cpu_ms));
        self.previous.own_cpu_ms = Some(cpu_ms);
        Some(OwnProcess {
            cpu_pct: round2(used as f64 / 1000.0 / elapsed * 100.0),
            rss_bytes: stat.rss.saturating_mul(self.page_size),
        })
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        round2(part as f64 / whole as f64 * 100.0)
    }
}

/// The name of the host whose root is mounted at `root` (its `/etc/hostname`).
pub fn host_name(root: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(root.join("etc/hostname")).ok()?;
    let name = text.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// `/proc/net/dev`: per interface, cumulative [rx bytes, tx bytes, rx packets, tx
/// packets, rx errors, tx errors].
pub fn parse_net_dev(text: &str) -> Vec<(String, [u64; 6])> {
    let mut out = Vec::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|n| n.parse().unwrap_or(0))
            .collect();
        if f.len() < 11 {
            continue;
        }
        out.push((
            name.trim().to_owned(),
            [f[0], f[8], f[1], f[9], f[2], f[10]],
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Processes on the host: the numeric entries of `/proc` under `root` (a directory
/// listing, far cheaper than reading every process).
fn count_processes(root: &std::path::Path) -> u64 {
    std::fs::read_dir(root.join("proc"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .count() as u64
        })
        .unwrap_or(0)
}

/// The CPU quota of the cgroup vigil sees as its root (a container's own), in cores.
fn cgroup_cpu_limit() -> Option<f64> {
    // cgroup v2: "max 100000" or "<quota> <period>".
    if let Ok(s) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        let mut parts = s.split_whitespace();
        let quota = parts.next()?.parse::<f64>().ok()?;
        let period = parts.next()?.parse::<f64>().ok()?;
        return (period > 0.0).then(|| round2(quota / period));
    }
    // cgroup v1: quota -1 means unlimited.
    for dir in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"] {
        let quota = std::fs::read_to_string(format!("{dir}/cpu.cfs_quota_us"));
        let period = std::fs::read_to_string(format!("{dir}/cpu.cfs_period_us"));
        if let (Ok(q), Ok(p)) = (quota, period) {
            let q: f64 = q.trim().parse().ok()?;
            let p: f64 = p.trim().parse().ok()?;
            return (q > 0.0 && p > 0.0).then(|| round2(q / p));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_that_goes_backwards_counts_from_zero_never_negative() {
        assert_eq!(counter_delta(100, 150), 50);
        assert_eq!(counter_delta(100, 100), 0);
        // Interface re-created: the kernel counter restarted at 0 and is now 30.
        assert_eq!(counter_delta(1_000_000, 30), 30);
    }

    #[test]
    fn net_dev_gives_each_interfaces_counters() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0: 5120      40    1    0    0     0          0         0     8192      35    2    0    0     0       0          0
";
        assert_eq!(
            parse_net_dev(text),
            [
                ("eth0".to_owned(), [5120, 8192, 40, 35, 1, 2]),
                ("lo".to_owned(), [1000, 1000, 10, 10, 0, 0]),
            ]
        );
    }

    #[test]
    fn the_self_section_sees_this_process_use_cpu_and_hold_memory() {
        let config = SystemMetricsConfig {
            collect: vec![Collect::Own],
            ..SystemMetricsConfig::default()
        };
        let mut sampler = Sampler::new(&config).unwrap();
        let start = Instant::now();
        let mut spin = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(300) {
            spin = spin.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(spin);
        let own = sampler.sample().own.expect("the self section");
        assert!(own.cpu_pct > 10.0, "spun 300 ms: {}", own.cpu_pct);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        let rss = own.rss_bytes as f64 / 1024.0;
        assert!(
            (rss - rss_kib as f64).abs() < rss_kib as f64 * 0.5,
            "stat's {rss} KiB against status's {rss_kib} KiB"
        );
    }

    #[test]
    fn filters_match_wildcards() {
        let config = SystemMetricsConfig::default();
        let f = Filters::new(&config);
        assert!(!f.keeps_interface("lo"));
        assert!(!f.keeps_interface("veth12ab"));
        assert!(f.keeps_interface("eth0"));
        assert!(!f.keeps_disk("/run/user/0", "tmpfs"));
        assert!(!f.keeps_disk("/var/lib/docker/overlay2/x/merged", "overlay"));
        assert!(f.keeps_disk("/", "ext4"));
    }

    #[test]
    fn network_and_fuse_file_systems_and_container_dirs_are_left_out_by_default() {
        let f = Filters::new(&SystemMetricsConfig::default());
        for fs in [
            "nfs",
            "nfs4",
            "cifs",
            "smb3",
            "ceph",
            "9p",
            "fuse",
            "fuse.sshfs",
            "fuse.lxcfs",
            "fuseblk",
        ] {
            assert!(!f.keeps_disk("/mnt/x", fs), "{fs}");
        }
        for mount in [
            "/var/lib/docker",
            "/var/lib/docker/volumes",
            "/var/lib/containers",
        ] {
            assert!(!f.keeps_disk(mount, "ext4"), "{mount}");
        }
        for fs in ["ext4", "xfs", "btrfs", "zfs", "vfat"] {
            assert!(f.keeps_disk("/data", fs), "{fs}");
        }
    }
}
