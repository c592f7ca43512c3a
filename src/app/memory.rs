//! Gives back the pages of vigil's own code that only start-up needed.
//!
//! Start-up (argument and configuration parsing, migrations, TLS set-up, the embedded
//! server's management) touches most of the binary once; the kernel keeps every page
//! it touched mapped, so they count in vigil's resident memory for as long as it runs
//! although steady work never needs them again. Some seconds after start, vigil asks
//! the kernel to reclaim its code pages (`MADV_PAGEOUT`, Linux 5.4+); those the
//! steady work uses come back on their next use, the rest stay out. Only read-only
//! mappings of the binary itself are touched: nothing is lost, a page is at most read
//! again from the file.

use std::time::Duration;

/// Long enough for start-up and every job's first firings to have run.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Asks the kernel to reclaim the read-only pages of vigil's binary; returns how many
/// bytes of mappings it was asked about.
pub fn release_start_up_code() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut asked = 0;
    for (start, len) in code_mappings(&maps, &exe.to_string_lossy()) {
        // SAFETY: the range is a whole read-only, file-backed mapping of this process
        // (from its own maps); MADV_PAGEOUT only drops its pages, which the kernel
        // reads back from the file on the next access. No memory is freed or changed.
        let r = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
        if r == 0 {
            asked += len;
        }
    }
    Ok(asked)
}

/// `(start, length)` of each read-only mapping of `exe` in a `/proc/self/maps` text.
fn code_mappings(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            // 55d7c0a00000-55d7c0f00000 r-xp 00100000 fe:01 1234   /usr/local/bin/vigil
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3)?;
            if path != exe || perms.contains('w') || !perms.starts_with('r') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let a = usize::from_str_radix(a, 16).ok()?;
            let b = usize::from_str_radix(b, 16).ok()?;
            (b > a).then_some((a, b - a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_mappings_of_the_binary_are_chosen() {
        let maps = "\
55d7c0a00000-55d7c0b00000 r--p 00000000 fe:01 1234 /usr/local/bin/vigil
55d7c0b00000-55d7c0f00000 r-xp 00100000 fe:01 1234 /usr/local/bin/vigil
55d7c0f00000-55d7c1000000 rw-p 00500000 fe:01 1234 /usr/local/bin/vigil
7f0000000000-7f0000100000 r-xp 00000000 fe:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
";
        assert_eq!(
            code_mappings(maps, "/usr/local/bin/vigil"),
            [(0x55d7c0a00000, 0x100000), (0x55d7c0b00000, 0x400000)]
        );
    }

    fn resident_file_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }

    const PRIVATE_COPY: &str = "vigil-memory-test-private-copy";

    #[test]
    fn releasing_the_binarys_code_lowers_resident_memory_and_the_process_runs_on() {
        // MADV_PAGEOUT leaves alone pages another process maps too, and the test runner
        // runs other tests of this same binary at once; so the check runs in a private
        // copy of the binary, whose pages only it maps.
        let exe = std::env::current_exe().unwrap();
        if exe.file_name() != Some(std::ffi::OsStr::new(PRIVATE_COPY)) {
            let dir = tempfile::tempdir().unwrap();
            let copy = dir.path().join(PRIVATE_COPY);
            std::fs::copy(&exe, &copy).unwrap();
            let name = "app::memory::tests::releasing_the_binarys_code_lowers_resident_memory_and_the_process_runs_on";
            let out = std::process::Command::new(&copy)
                .args(["--exact", name, "--test-threads", "1"])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let before = resident_file_kib();
        let asked = release_start_up_code().unwrap();
        let after = resident_file_kib();
        assert!(asked > 0);
        assert!(
            after < before,
            "resident file pages {before} KiB -> {after} KiB"
        );
        // Code paged out comes back on use.
        assert_eq!(code_mappings("", "x"), []);
    }
}
