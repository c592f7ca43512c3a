//! What vigil keeps on local disk while PostgreSQL is away: rows its writers could
//! not write yet (host samples, ledger records), spilled when their memory buffer is
//! full and at shutdown, and written first when PostgreSQL answers again.
//!
//! A spool is a directory of segments, each a JSON-lines file written whole (to a
//! temporary name, synced, then renamed), named by a sequence number, so the oldest
//! is read first and a crash never leaves half a segment. The rows carry their own
//! keys (`(host, ts)`, a run id), so one replayed twice is harmless. A spool is bounded
//! in bytes; past the bound its oldest segments go, and what they held is counted.

use std::fs;
use std::io::{self, BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
#[error("spool {path}: {source}")]
pub struct SpoolError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError {
        path: path.to_path_buf(),
        source,
    }
}

/// A segment, by its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Segment(u64);

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// The next segment's number.
    next: Mutex<u64>,
    /// Set when a look found no segment, cleared by [`Spool::append`]: this process is
    /// the directory's only writer, so an empty spool stays empty until it appends, and
    /// the writers that ask before every batch need not list the directory each time.
    /// Under its lock a listing and the flag agree with a concurrent append.
    known_empty: Mutex<bool>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spool({})", self.dir.display())
    }
}

impl Spool {
    /// Opens (creating) the spool in `dir`, holding at most `max_bytes` on disk.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir).map_err(err(dir))?;
        // Left over from a crash in the middle of writing one: never a whole segment.
        for entry in fs::read_dir(dir).map_err(err(dir))?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        let me = Self {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1),
            next: Mutex::new(0),
            known_empty: Mutex::new(false),
        };
        let last = me.segments()?.last().map_or(0, |s| s.0);
        *me.next.lock().unwrap_or_else(|p| p.into_inner()) = last + 1;
        Ok(me)
    }

    fn empty_flag(&self) -> std::sync::MutexGuard<'_, bool> {
        self.known_empty.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, seg: Segment) -> PathBuf {
        self.dir.join(format!("{:020}.jsonl", seg.0))
    }

    /// The segments on disk, oldest first.
    fn segments(&self) -> Result<Vec<Segment>, SpoolError> {
        let mut out: Vec<Segment> = fs::read_dir(&self.dir)
            .map_err(err(&self.dir))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".jsonl")?.parse().ok().map(Segment)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| fs::metadata(self.path(*s)).ok())
            .map(|m| m.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        *self.empty_flag() || self.segments().map(|s| s.is_empty()).unwrap_or(true)
    }

    /// Writes `items` as one new segment, after everything already spooled. Returns
    /// how many items older segments held that were dropped to stay within the bound.
    pub fn append<T: Serialize>(&self, items: &[T]) -> Result<u64, SpoolError> {
        if items.is_empty() {
            return Ok(0);
        }
        let seg = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let seg = Segment(*next);
            *next += 1;
            seg
        };
        let path = self.path(seg);
        let tmp = path.with_extension("tmp");
        {
            let file = fs::File::create(&tmp).map_err(err(&tmp))?;
            let mut w = io::BufWriter::new(file);
            for item in items {
                serde_json::to_writer(&mut w, item)
                    .map_err(|e| io::Error::other(e.to_string()))
                    .map_err(err(&tmp))?;
                w.write_all(b"\n").map_err(err(&tmp))?;
            }
            let file = w.into_inner().map_err(|e| err(&tmp)(e.into_error()))?;
            file.sync_all().map_err(err(&tmp))?;
        }
        {
            let mut empty = self.empty_flag();
            fs::rename(&tmp, &path).map_err(err(&path))?;
            *empty = false;
        }
        self.trim()
    }

    /// Drops the oldest segments until the spool fits its bound (the newest always
    /// stays); returns how many items they held.
    fn trim(&self) -> Result<u64, SpoolError> {
        let segments = self.segments()?;
        let sizes: Vec<u64> = segments
            .iter()
            .map(|s| fs::metadata(self.path(*s)).map_or(0, |m| m.len()))
            .collect();
        let mut total: u64 = sizes.iter().sum();
        let mut dropped = 0;
        for (seg, size) in segments
            .iter()
            .zip(&sizes)
            .take(segments.len().saturating_sub(1))
        {
            if total <= self.max_bytes {
                break;
            }
            let path = self.path(*seg);
            dropped += fs::File::open(&path)
                .map(|f| io::BufReader::new(f).lines().count() as u64)
                .unwrap_or(0);
            fs::remove_file(&path).map_err(err(&path))?;
            total -= size;
        }
        Ok(dropped)
    }

    /// The oldest segment and its items. A line that does not parse (a disk error,
    /// another version's format) is skipped and counted in the third value.
    pub fn oldest<T: DeserializeOwned>(
        &self,
    ) -> Result<Option<(Segment, Vec<T>, u64)>, SpoolError> {
        let seg = {
            let mut empty = self.empty_flag();
            if *empty {
                return Ok(None);
            }
            let Some(seg) = self.segments()?.first().copied() else {
                *empty = true;
                return Ok(None);
            };
            seg
        };
        let path = self.path(seg);
        let file = fs::File::open(&path).map_err(err(&path))?;
        let mut items = Vec::new();
        let mut bad = 0;
        for line in io::BufReader::new(file).lines() {
            let line = line.map_err(err(&path))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(&line) {
                Ok(item) => items.push(item),
                Err(_) => bad += 1,
            }
        }
        Ok(Some((seg, items, bad)))
    }

    /// Removes a segment whose items are written.
    pub fn remove(&self, seg: Segment) -> Result<(), SpoolError> {
        let path = self.path(seg);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err(&path)(e)),
            _ => Ok(()),
        }
    }
}

/// A directory name for `name` (a host, a job): letters, digits, `-`, `_`, `.` kept,
/// anything else hex-escaped, so two names never share a spool.
pub fn dir_name(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_come_back_oldest_first_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&[1, 2, 3]).unwrap();
        spool.append(&[4]).unwrap();
        drop(spool);
        // A crash while writing left a temporary file: it is not a segment.
        fs::write(dir.path().join("00000000000000000009.tmp"), "5\n").unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&[6]).unwrap();
        let mut seen = Vec::new();
        while let Some((seg, items, bad)) = spool.oldest::<i32>().unwrap() {
            assert_eq!(bad, 0);
            seen.extend(items);
            spool.remove(seg).unwrap();
        }
        assert_eq!(seen, [1, 2, 3, 4, 6]);
        assert!(spool.is_empty());
    }

    #[test]
    fn an_empty_spool_found_empty_still_sees_every_later_append() {
        let dir = tempfile::tempdir().unwrap();
        let spool = std::sync::Arc::new(Spool::open(dir.path(), 1 << 20).unwrap());
        assert!(spool.oldest::<u32>().unwrap().is_none());
        assert!(spool.is_empty());
        spool.append(&[7u32]).unwrap();
        assert!(!spool.is_empty());
        let (seg, items, _) = spool.oldest::<u32>().unwrap().unwrap();
        assert_eq!(items, [7]);
        spool.remove(seg).unwrap();
        // Appends racing the writer's looks: each one is found.
        let writer = {
            let spool = spool.clone();
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    spool.append(&[i]).unwrap();
                }
            })
        };
        let mut seen = Vec::new();
        while seen.len() < 200 {
            match spool.oldest::<u32>().unwrap() {
                Some((seg, items, _)) => {
                    seen.extend(items);
                    spool.remove(seg).unwrap();
                }
                None => std::thread::yield_now(),
            }
        }
        writer.join().unwrap();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        assert!(spool.oldest::<u32>().unwrap().is_none());
    }

    #[test]
    fn past_its_bound_the_oldest_segments_go_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        // Each segment of ten three-digit numbers is 40 bytes.
        let spool = Spool::open(dir.path(), 100).unwrap();
        let mut dropped = 0;
        for k in 0..5 {
            let items: Vec<i32> = (0..10).map(|i| 100 + k * 10 + i).collect();
            dropped += spool.append(&items).unwrap();
        }
        assert_eq!(dropped, 30);
        assert!(spool.bytes() <= 100);
        let (_, first, _) = spool.oldest::<i32>().unwrap().unwrap();
        assert_eq!(first[0], 130);
    }

    #[test]
    fn a_line_that_does_not_parse_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.append(&[1, 2]).unwrap();
        let path = spool.path(Segment(1));
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{garbage\n3\n");
        fs::write(&path, text).unwrap();
        let (_, items, bad) = spool.oldest::<i32>().unwrap().unwrap();
        assert_eq!((items, bad), (vec![1, 2, 3], 1));
    }

    #[test]
    fn names_map_to_distinct_safe_directories() {
        assert_eq!(dir_name("web-1.example"), "web-1.example");
        assert_eq!(dir_name("../etc"), "%2e.%2fetc");
        assert_ne!(dir_name("a/b"), dir_name("a_b"));
    }
}
