//! Keeps vigil's own code out of its resident memory unless it runs.
//!
//! Two habits of the kernel make a binary's resident code far larger than the code
//! it runs. On a fault in a file mapping it reads ahead (128 KiB) and maps the cached
//! pages around the one asked for (fault-around, 64 KiB); vigil's steady work is
//! spread over its whole 8 MB of code, so nearly every 64 KiB window of it ended up
//! resident. And start-up (argument and configuration parsing, migrations, TLS
//! set-up, the embedded server's management) touches most of the binary once, then
//! never again, while the kernel keeps every page it touched mapped.
//!
//! So at start vigil advises its read-only mappings `MADV_RANDOM` (no read-ahead) and
//! drops the unmapped pages of its file from the page cache (`POSIX_FADV_DONTNEED`):
//! fault-around then finds no neighbours to map, and a page becomes resident when it
//! is used. (Since Linux 6.16 the kernel still reads ahead for executable mappings, so
//! there this shrinks the read-only data, 0.98 to 0.25 MiB measured, more than the
//! code.) Then it asks the kernel to reclaim those pages (`MADV_PAGEOUT`, Linux 5.4+)
//! and drops them from the cache again, twice: once the database is open and migrated
//! (that code is not needed again, and the services' start-up would add to it), and
//! [`SETTLE`] after start. Those the steady work uses come back on their next use, the
//! rest stay out. Only read-only mappings of the binary itself are touched: nothing is
//! lost, a page is at most read again from the file.

use std::time::Duration;

/// Long enough for start-up and every job's first firings to have run.
pub const SETTLE: Duration = Duration::from_secs(30);

/// From now on, reads vigil's code from its file a page at a time, as it is used;
/// returns how many bytes of mappings were advised. Called first thing at start.
pub fn read_code_on_demand() -> std::io::Result<usize> {
    let asked = advise_code(libc::MADV_RANDOM)?;
    drop_cached_code()?;
    Ok(asked)
}

/// Asks the kernel to reclaim the read-only pages of vigil's binary; returns how many
/// bytes of mappings it was asked about.
pub fn release_start_up_code() -> std::io::Result<usize> {
    let asked = advise_code(libc::MADV_PAGEOUT)?;
    drop_cached_code()?;
    Ok(asked)
}

/// `madvise(advice)` over every read-only mapping of vigil's binary.
fn advise_code(advice: libc::c_int) -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut asked = 0;
    for (start, len) in code_mappings(&maps, &exe.to_string_lossy()) {
        // SAFETY: the range is a whole read-only, file-backed mapping of this process
        // (from its own maps). The advice used here (MADV_RANDOM, MADV_PAGEOUT) only
        // changes read-ahead or drops pages, which the kernel reads back from the file
        // on the next access. No memory is freed or changed.
        let r = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
        if r == 0 {
            asked += len;
        }
    }
    Ok(asked)
}

/// Drops the pages of vigil's binary that no process maps from the page cache, so a
/// later fault reads the one page it needs rather than mapping its cached neighbours.
fn drop_cached_code() -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // The running image itself, even if its path has since been replaced.
    let file = std::fs::File::open("/proc/self/exe")?;
    // SAFETY: a plain system call on a descriptor this function owns.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

/// `(start, length)` of each read-only mapping of `exe` in a `/proc/self/maps` text.
fn code_mappings(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            // 55d7c0a00000-55d7c0f00000 r-xp 00100000 fe:01 1234   /usr/local/bin/vigil
            // The path is the rest of the line: it may hold spaces, and ends in
            // " (deleted)" once the binary is replaced on disk, as readlink's does too.
            let mut f = line.splitn(6, ' ');
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3)?.trim_start();
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

    #[test]
    fn a_binary_under_a_path_with_spaces_or_replaced_on_disk_is_still_found() {
        let maps = "\
55d7c0a00000-55d7c0b00000 r--p 00000000 fe:01 1234                       /opt/my tools/vigil
55d7c0b00000-55d7c0f00000 r-xp 00100000 fe:01 1234                       /opt/my tools/vigil
7f0000000000-7f0000100000 r-xp 00000000 fe:01 1235                       /opt/my
";
        assert_eq!(
            code_mappings(maps, "/opt/my tools/vigil"),
            [(0x55d7c0a00000, 0x100000), (0x55d7c0b00000, 0x400000)]
        );
        let maps =
            "55d7c0b00000-55d7c0f00000 r-xp 00100000 fe:01 1234   /usr/local/bin/vigil (deleted)\n";
        assert_eq!(
            code_mappings(maps, "/usr/local/bin/vigil (deleted)"),
            [(0x55d7c0b00000, 0x400000)]
        );
        assert_eq!(code_mappings(maps, "/usr/local/bin/vigil"), []);
    }

    fn resident_file_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }

    /// Pages of `path` in the page cache, as mincore(2) reports them for a mapping of it.
    fn cached_pages(path: &std::path::Path) -> usize {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            assert_eq!(libc::mincore(at, len, vec.as_mut_ptr()), 0);
            libc::munmap(at, len);
        }
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    /// The `VmFlags` of each read-only mapping of this binary, from /proc/self/smaps.
    fn code_vm_flags() -> Vec<String> {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_string_lossy();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut flags = Vec::new();
        let mut ours = false;
        for line in smaps.lines() {
            if let Some(v) = line.strip_prefix("VmFlags:") {
                if ours {
                    flags.push(v.trim().to_owned());
                }
            } else if line
                .split(' ')
                .next()
                .is_some_and(|t| t.contains('-') && !t.ends_with(':'))
            {
                // A mapping's header line: the fields as code_mappings reads them.
                ours = !code_mappings(line, &exe).is_empty();
            }
        }
        flags
    }

    /// MADV_PAGEOUT leaves alone pages another process maps, and the test runner runs
    /// other tests of this same binary at once; so each check runs in a private copy
    /// of the binary, whose pages only it maps, written to disk first so that its
    /// cached pages are clean and can be dropped. Returns true in the copy, where the
    /// test goes on; the original only runs the copy and checks it passed.
    fn in_private_copy(test: &str) -> bool {
        const PRIVATE_COPY: &str = "vigil-memory-test-private-copy";
        let exe = std::env::current_exe().unwrap();
        if exe.file_name() == Some(std::ffi::OsStr::new(PRIVATE_COPY)) {
            return true;
        }
        // A space in the path, as /proc/self/maps shows it, on purpose.
        let dir = tempfile::Builder::new()
            .prefix("private copy")
            .tempdir()
            .unwrap();
        let copy = dir.path().join(PRIVATE_COPY);
        std::fs::copy(&exe, &copy).unwrap();
        std::fs::File::open(&copy).unwrap().sync_all().unwrap();
        let out = std::process::Command::new(&copy)
            .args([
                "--exact",
                &format!("app::memory::tests::{test}"),
                "--test-threads",
                "1",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        false
    }

    #[test]
    fn releasing_the_binarys_code_lowers_resident_memory_and_the_process_runs_on() {
        if !in_private_copy(
            "releasing_the_binarys_code_lowers_resident_memory_and_the_process_runs_on",
        ) {
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
        // That the process runs on, its code read back as it is used, is what the
        // original checks: this copy goes on to report "1 passed".
    }

    #[test]
    fn a_binary_deleted_from_disk_while_running_still_hands_its_code_back() {
        if !in_private_copy("a_binary_deleted_from_disk_while_running_still_hands_its_code_back") {
            return;
        }
        // As an upgrade in place leaves a running vigil: its binary's path is gone.
        std::fs::remove_file(std::env::current_exe().unwrap()).unwrap();
        let before = resident_file_kib();
        let asked = read_code_on_demand().unwrap() + release_start_up_code().unwrap();
        let after = resident_file_kib();
        assert!(asked > 0);
        assert!(
            after < before,
            "resident file pages {before} KiB -> {after} KiB"
        );
    }

    #[test]
    fn reading_code_on_demand_turns_off_read_ahead_and_drops_the_binarys_unmapped_cached_pages() {
        if !in_private_copy(
            "reading_code_on_demand_turns_off_read_ahead_and_drops_the_binarys_unmapped_cached_pages",
        ) {
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let flags = code_vm_flags();
        assert!(!flags.is_empty());
        assert!(
            flags.iter().all(|f| !f.split(' ').any(|x| x == "rr")),
            "{flags:?}"
        );
        let cached_before = cached_pages(&exe);
        let asked = read_code_on_demand().unwrap();
        let cached_after = cached_pages(&exe);
        assert!(asked > 0);
        // smaps shows MADV_RANDOM as `rr` on every code mapping.
        let flags = code_vm_flags();
        assert!(
            flags.iter().all(|f| f.split(' ').any(|x| x == "rr")),
            "{flags:?}"
        );
        // Only what is mapped stays cached: a fraction of the (just written) file.
        assert!(
            cached_after * 2 < cached_before,
            "cached pages of the binary {cached_before} -> {cached_after}"
        );
        // The copy goes on to report "1 passed": code dropped from the cache is read
        // again as it is used.
    }
}
