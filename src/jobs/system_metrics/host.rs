//! Host-wide counters read every sample from kept files: CPU time (`/proc/stat`),
//! memory (`/proc/meminfo`), load (`/proc/loadavg`) and uptime (`/proc/uptime`).
//!
//! sysinfo reads the same files but opens them afresh each time and, for memory, reads
//! the cgroup's limit files too; every second that was most of a sample's fixed cost.
//! What barely moves (CPU frequency, cgroup limits) still comes from sysinfo, once a
//! minute. CPU usage is computed as sysinfo computes it, so the figures are unchanged.

use procfs_core::FromRead as _;

use super::kept::KeptFile;

/// One CPU's (or the sum's) cumulative ticks: busy and in all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub busy: u64,
    pub total: u64,
}

impl CpuTicks {
    /// Busy share of the time between `prev` and `self`, in percent. Counters that
    /// went backwards or did not move read as idle, as sysinfo reads them.
    pub fn usage_since(self, prev: CpuTicks) -> f64 {
        let total = self.total.saturating_sub(prev.total);
        if total == 0 {
            return 0.0;
        }
        let busy = self.busy.saturating_sub(prev.busy);
        (busy as f64 / total as f64 * 100.0).clamp(0.0, 100.0)
    }
}

/// `/proc/stat`'s `cpu` lines: the sum first, then each core in order. Reading stops
/// at the first other line (the long `intr` line is never parsed).
pub fn parse_cpu_ticks(text: &str) -> Vec<CpuTicks> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            break;
        };
        let mut fields = rest.split_ascii_whitespace();
        // "cpu" for the sum, "cpuN" for a core: the label's tail is not a figure.
        if rest.starts_with(|c: char| c.is_ascii_digit()) {
            fields.next();
        }
        // user nice system idle iowait irq softirq steal [guest guest_nice]: guest
        // time is already inside user and nice, so it is not added again.
        let mut n = [0u64; 8];
        for (slot, f) in n.iter_mut().zip(fields) {
            *slot = f.parse().unwrap_or(0);
        }
        let [user, nice, system, idle, iowait, irq, softirq, steal] = n;
        let busy = [user, nice, system, irq, softirq, steal]
            .iter()
            .fold(0u64, |a, &b| a.saturating_add(b));
        out.push(CpuTicks {
            busy,
            total: busy.saturating_add(idle).saturating_add(iowait),
        });
    }
    out
}

/// What the memory section needs of `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

/// `/proc/meminfo` (KiB, though it says kB). Without `MemAvailable` (Linux before
/// 3.14) available memory is estimated as sysinfo estimates it.
pub fn parse_meminfo(text: &str) -> MemInfo {
    let mut m = MemInfo::default();
    let (mut free, mut buffers, mut cached, mut reclaimable, mut shmem) = (0, 0, 0, 0, 0);
    let mut available = None;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "MemTotal" => &mut m.total,
            "MemFree" => &mut free,
            "Buffers" => &mut buffers,
            "Cached" => &mut cached,
            "SReclaimable" => &mut reclaimable,
            "Shmem" => &mut shmem,
            "SwapTotal" => &mut m.swap_total,
            "SwapFree" => &mut m.swap_free,
            "MemAvailable" => available.insert(0),
            _ => continue,
        };
        let kib: u64 = rest
            .split_ascii_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        *slot = kib.saturating_mul(1024);
    }
    m.available = available.unwrap_or_else(|| {
        [free, buffers, cached, reclaimable]
            .iter()
            .fold(0u64, |a, &b| a.saturating_add(b))
            .saturating_sub(shmem)
    });
    m
}

/// The kept files behind the host-wide sections.
#[derive(Debug)]
pub struct HostFiles {
    stat: KeptFile,
    meminfo: KeptFile,
    loadavg: KeptFile,
    uptime: KeptFile,
}

impl HostFiles {
    /// This machine's files, where sysinfo reads them: CPU, memory, load and uptime
    /// are not namespaced, so a container's `/proc` shows the host's.
    pub fn new() -> Self {
        Self {
            stat: KeptFile::new("/proc/stat"),
            meminfo: KeptFile::new("/proc/meminfo"),
            loadavg: KeptFile::new("/proc/loadavg"),
            uptime: KeptFile::new("/proc/uptime"),
        }
    }

    pub fn cpu_ticks(&mut self) -> Vec<CpuTicks> {
        self.stat.parse_or_default(parse_cpu_ticks)
    }

    pub fn memory(&mut self) -> Option<MemInfo> {
        self.meminfo
            .read_str()
            .map(parse_meminfo)
            .filter(|m| m.total > 0)
    }

    /// `/proc/loadavg`: the 1, 5 and 15 minute load averages, and the last pid handed
    /// out (which the process table watches).
    pub fn loadavg(&mut self) -> Option<procfs_core::LoadAverage> {
        procfs_core::LoadAverage::from_read(self.loadavg.read()?).ok()
    }

    /// Whole seconds since boot.
    pub fn uptime_s(&mut self) -> Option<u64> {
        let u = procfs_core::Uptime::from_read(self.uptime.read()?).ok()?;
        Some(u.uptime as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpu_lines_give_the_sum_then_each_core_and_guest_time_is_not_counted_twice() {
        let text = "cpu  100 20 30 800 50 5 5 10 40 0\n\
                    cpu0 60 10 15 400 25 3 2 5 40 0\n\
                    cpu1 40 10 15 400 25 2 3 5 0 0\n\
                    intr 123456 1 2 3\nctxt 99\n";
        let t = parse_cpu_ticks(text);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[0],
            CpuTicks {
                busy: 170,
                total: 1020
            }
        );
        assert_eq!(
            t[1],
            CpuTicks {
                busy: 95,
                total: 520
            }
        );
        let later = CpuTicks {
            busy: 270,
            total: 1420,
        };
        assert_eq!(later.usage_since(t[0]), 25.0);
        assert_eq!(t[0].usage_since(t[0]), 0.0, "no time passed");
        assert_eq!(t[0].usage_since(later), 0.0, "a counter that went back");
    }

    #[test]
    fn cpu_usage_agrees_with_sysinfos_reading_of_this_machine() {
        // Both read /proc/stat over the same interval; only the ticks between the two
        // reads at each end can set them apart.
        let mut files = HostFiles::new();
        let mut sys = sysinfo::System::new().unwrap();
        sys.refresh_cpu_usage();
        let before = files.cpu_ticks();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL * 3);
        sys.refresh_cpu_usage();
        let after = files.cpu_ticks();
        assert_eq!(after.len(), sys.cpus().len() + 1, "the sum and each core");
        let ours = after[0].usage_since(before[0]);
        let theirs = f64::from(sys.global_cpu_usage());
        assert!((ours - theirs).abs() < 15.0, "ours {ours} sysinfo {theirs}");
    }

    #[test]
    fn meminfo_gives_bytes_and_estimates_available_memory_on_old_kernels() {
        let text = "MemTotal:        2000 kB\nMemFree:          500 kB\n\
                    MemAvailable:    1200 kB\nBuffers:          100 kB\n\
                    Cached:           300 kB\nShmem:             50 kB\n\
                    SReclaimable:      80 kB\nSwapTotal:       1000 kB\n\
                    SwapFree:         900 kB\n";
        assert_eq!(
            parse_meminfo(text),
            MemInfo {
                total: 2_048_000,
                available: 1_228_800,
                swap_total: 1_024_000,
                swap_free: 921_600,
            }
        );
        let old = text.replace("MemAvailable:    1200 kB\n", "");
        assert_eq!(
            parse_meminfo(&old).available,
            (500 + 100 + 300 + 80 - 50) * 1024
        );
    }

    #[test]
    fn this_machines_memory_load_and_uptime_agree_with_sysinfo() {
        let mut files = HostFiles::new();
        let mut sys = sysinfo::System::new().unwrap();
        sys.refresh_memory();
        let m = files.memory().expect("meminfo");
        assert_eq!(m.total, sys.total_memory());
        assert_eq!(m.swap_total, sys.total_swap());
        let one = files.loadavg().expect("loadavg").one;
        assert!(one >= 0.0);
        let up = files.uptime_s().expect("uptime");
        assert!(up.abs_diff(sysinfo::System::uptime().unwrap_or(0)) <= 1);
    }

    proptest! {
        #[test]
        fn any_stat_text_parses_without_panicking_and_busy_never_exceeds_total(
            lines in prop::collection::vec(
                (prop::option::of(0u16..64), prop::collection::vec(any::<u64>(), 0..12)),
                0..6,
            ),
            tail in ".{0,40}",
        ) {
            let mut text = String::new();
            for (core, nums) in &lines {
                text.push_str("cpu");
                if let Some(c) = core {
                    text.push_str(&c.to_string());
                }
                for n in nums {
                    text.push(' ');
                    text.push_str(&n.to_string());
                }
                text.push('\n');
            }
            text.push_str(&tail);
            let ticks = parse_cpu_ticks(&text);
            prop_assert!(ticks.len() >= lines.len());
            for t in &ticks {
                prop_assert!(t.busy <= t.total);
            }
            for pair in ticks.windows(2) {
                let u = pair[1].usage_since(pair[0]);
                prop_assert!((0.0..=100.0).contains(&u));
            }
        }

        #[test]
        fn meminfo_reads_its_keys_in_any_order_among_other_keys_and_junk_lines(
            values in prop::collection::vec(0u64..(u64::MAX / 1024), 5),
            extra in prop::collection::vec(("[A-Z][A-Za-z_()]{0,14}", any::<u64>()), 0..20),
            junk in prop::collection::vec("[^\n:]{0,30}", 0..4),
            order in any::<u64>(),
        ) {
            let keys = ["MemTotal", "MemAvailable", "SwapTotal", "SwapFree", "MemFree"];
            let ours = |k: &str| {
                keys.contains(&k) || matches!(k, "Buffers" | "Cached" | "SReclaimable" | "Shmem")
            };
            let mut lines: Vec<String> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| format!("{k}:{v:>16} kB"))
                .collect();
            lines.extend(
                extra
                    .iter()
                    .filter(|(k, _)| !ours(k))
                    .map(|(k, v)| format!("{k}: {v} kB")),
            );
            lines.extend(junk.iter().cloned());
            // A shuffle fixed by the generated seed.
            for i in (1..lines.len()).rev() {
                lines.swap(i, (order.rotate_left(i as u32) % (i as u64 + 1)) as usize);
            }
            let m = parse_meminfo(&(lines.join("\n") + "\n"));
            prop_assert_eq!(
                m,
                MemInfo {
                    total: values[0] * 1024,
                    available: values[1] * 1024,
                    swap_total: values[2] * 1024,
                    swap_free: values[3] * 1024,
                }
            );
        }
    }
}
