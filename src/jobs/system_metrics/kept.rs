//! Kernel files a sampler reads every time (`/proc/stat`, `/proc/meminfo`, `net/dev`,
//! `mountinfo`, `diskstats`, pressure), kept open between samples.
//!
//! procfs and sysfs produce such a file afresh on every read from its start, so one
//! `pread` at offset 0 reads it again: no path walk, no open and no close each time,
//! which were a tenth of a one-second host job's CPU.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

/// One file read whole each time, opened on first use and again after a failure.
#[derive(Debug)]
pub struct KeptFile {
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
}

impl KeptFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            file: None,
            buf: Vec::new(),
        }
    }

    /// The file's whole content now, or `None` while it cannot be read.
    ///
    /// A kept file that fails (its `/proc/<pid>` gone with its process, a cgroup
    /// removed) is let go and the path opened again at once, so a replaced file is
    /// read the same time it fails; a path that does not exist costs one failed `open`.
    pub fn read(&mut self) -> Option<&[u8]> {
        if let Some(file) = &self.file {
            if read_whole_at(file, &mut self.buf).is_ok() {
                return Some(&self.buf);
            }
            self.file = None;
        }
        let file = File::open(&self.path).ok()?;
        read_whole_at(&file, &mut self.buf).ok()?;
        self.file = Some(file);
        Some(&self.buf)
    }

    /// Whether a file that announces its changes through `poll` (a `mountinfo`:
    /// `POLLPRI` after a mount or unmount in its namespace since the last poll) has
    /// changed; `true` while it is not open, as nothing read can be trusted then.
    pub fn announced_change(&self) -> bool {
        use std::os::fd::AsRawFd as _;
        let Some(file) = &self.file else {
            return true;
        };
        let mut fd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for a descriptor `file` keeps open; timeout 0.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n != 0 && (n < 0 || fd.revents & (libc::POLLPRI | libc::POLLERR | libc::POLLNVAL) != 0)
    }

    /// [`KeptFile::read`] as text; a file that is not UTF-8 reads as `None`.
    pub fn read_str(&mut self) -> Option<&str> {
        self.read().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// The file's text through `parse`; what an unreadable file gives, `T`'s default
    /// (no mounts, no interfaces): a sample goes on without it.
    pub fn parse_or_default<T: Default>(&mut self, parse: impl FnOnce(&str) -> T) -> T {
        self.read_str().map(parse).unwrap_or_default()
    }
}

/// The whole of `file` from its start into `buf`, without moving its offset.
pub fn read_whole_at(file: &File, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    buf.resize(buf.capacity().max(1024), 0);
    let mut filled = 0;
    loop {
        let room = buf.len() - filled;
        let n = file.read_at(&mut buf[filled..], filled as u64)?;
        filled += n;
        // procfs and sysfs fill a read as far as they have data (seq_file copies part
        // of a record and keeps the rest for the next read): a read that left room
        // was the last. One pread per file, not two.
        if n < room {
            break;
        }
        buf.resize(buf.len() * 2, 0);
    }
    buf.truncate(filled);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_proc_file_reads_fresh_content_each_time() {
        // This thread's scheduler statistics: its CPU time moves as it spins.
        let mut kept = KeptFile::new("/proc/thread-self/schedstat");
        let first = kept.read_str().expect("schedstat").to_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut spin = 0u64;
            for i in 0..100_000u64 {
                spin = spin.wrapping_add(std::hint::black_box(i));
            }
            std::hint::black_box(spin);
            if kept.read_str().expect("schedstat") != first {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the kept file never changed"
            );
        }
    }

    #[test]
    fn a_file_larger_than_the_first_buffer_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let mut kept = KeptFile::new(&path);
        assert_eq!(kept.read_str(), Some(text.as_str()));
        // procfs's own many-record files too: mountinfo is read as `cat` reads it.
        let mut mounts = KeptFile::new("/proc/self/mountinfo");
        let whole = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(mounts.read_str(), Some(whole.as_str()));
    }

    #[test]
    fn a_replaced_file_is_read_after_its_kept_descriptor_fails_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut kept = KeptFile::new(&path);
        assert_eq!(kept.read(), None, "absent");
        std::fs::write(&path, "one").unwrap();
        assert_eq!(kept.read_str(), Some("one"));

        // A process's file: failing once the process is gone, then found again at the
        // path (here a new file takes the place, as a new process takes a pid).
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let proc_path = dir.path().join("stat");
        std::os::unix::fs::symlink(format!("/proc/{}/stat", child.id()), &proc_path).unwrap();
        let mut kept = KeptFile::new(&proc_path);
        assert!(kept.read_str().unwrap().contains("(sleep)"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(kept.read(), None, "gone and reaped");
        std::fs::remove_file(&proc_path).unwrap();
        std::fs::write(&proc_path, "1 (next) S").unwrap();
        assert_eq!(kept.read_str(), Some("1 (next) S"));
    }
}
