//! Reading the kernel's cgroup files (v1 and v2), shared by the kinds that measure
//! through cgroups: `system_metrics` (containers) and `command` (a cgroup per run).

use std::path::Path;

/// A memory limit at or above this is no limit (cgroup v1 writes "unlimited" as the
/// largest page count, v2 as `max`).
pub const UNLIMITED: u64 = 1 << 60;

/// A file holding one number (`memory.current`, `cpuacct.usage`); `None` when it is
/// missing or holds something else (`max`).
pub fn number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a file of `key value` lines (`memory.stat`, `cpu.stat`).
pub fn keyed(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// cgroup v2 `io.stat`: `8:0 rbytes=1 wbytes=2 rios=3 …` per device; bytes read and
/// written, summed.
pub fn parse_io_stat(text: &str) -> (u64, u64) {
    let mut total = (0u64, 0u64);
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("rbytes=") {
            total.0 = total.0.saturating_add(v.parse().unwrap_or(0));
        } else if let Some(v) = field.strip_prefix("wbytes=") {
            total.1 = total.1.saturating_add(v.parse().unwrap_or(0));
        }
    }
    total
}

/// cgroup v1 `blkio.throttle.io_service_bytes`: `8:0 Read 4096` per device and
/// operation, and a `Total` line, left out; bytes read and written, summed.
pub fn parse_blkio(text: &str) -> (u64, u64) {
    let mut total = (0u64, 0u64);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [_, op, n] = f[..] {
            let n: u64 = n.parse().unwrap_or(0);
            match op {
                "Read" => total.0 = total.0.saturating_add(n),
                "Write" => total.1 = total.1.saturating_add(n),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_counters_of_both_versions_sum_devices() {
        assert_eq!(
            parse_io_stat("8:0 rbytes=10 wbytes=2 rios=1 wios=1\n8:16 rbytes=5 wbytes=0\n"),
            (15, 2)
        );
        assert_eq!(
            parse_blkio("8:0 Read 100\n8:0 Write 50\n8:16 Read 1\nTotal 151\n"),
            (101, 50)
        );
    }
}
