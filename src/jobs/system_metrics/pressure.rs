//! Pressure stall information (`/proc/pressure/{cpu,memory,io}`, Linux 4.20+): the
//! share of recent time in which tasks waited for CPU, memory or I/O.

use std::path::Path;

use procfs_core::parse_pressure_record;

use super::kept::KeptFile;
use super::sample::{Pressure, Stall, round2};

/// The host's three pressure files under a root, kept open.
#[derive(Debug)]
pub struct PressureFiles {
    cpu: KeptFile,
    memory: KeptFile,
    io: KeptFile,
}

impl PressureFiles {
    pub fn new(root: &Path) -> Self {
        let dir = root.join("proc/pressure");
        Self {
            cpu: KeptFile::new(dir.join("cpu")),
            memory: KeptFile::new(dir.join("memory")),
            io: KeptFile::new(dir.join("io")),
        }
    }

    /// The host's pressure now; `None` where the kernel offers none.
    pub fn read(&mut self) -> Option<Pressure> {
        let one = |f: &mut KeptFile| f.read_str().and_then(parse);
        let p = Pressure {
            cpu: one(&mut self.cpu),
            memory: one(&mut self.memory),
            io: one(&mut self.io),
        };
        (p.cpu.is_some() || p.memory.is_some() || p.io.is_some()).then_some(p)
    }
}

/// One pressure file: a `some` line, and a `full` line where the kernel has one.
pub fn parse(text: &str) -> Option<Stall> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let Ok(r) = parse_pressure_record(line) else {
            continue;
        };
        let pair = (round2(f64::from(r.avg10)), round2(f64::from(r.avg60)));
        if line.starts_with("some") {
            some = Some(pair);
        } else {
            full = Some(pair);
        }
    }
    let (some_avg10, some_avg60) = some?;
    Some(Stall {
        some_avg10,
        some_avg60,
        full_avg10: full.map(|f| f.0),
        full_avg60: full.map(|f| f.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn some_and_full_lines_are_read_and_a_missing_full_line_is_null() {
        let both = "some avg10=4.50 avg60=0.91 avg300=0.00 total=681245\n\
                    full avg10=2.10 avg60=0.12 avg300=0.00 total=391926\n";
        assert_eq!(
            parse(both),
            Some(Stall {
                some_avg10: 4.5,
                some_avg60: 0.91,
                full_avg10: Some(2.1),
                full_avg60: Some(0.12),
            })
        );
        // CPU before Linux 5.13.
        let some_only = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse(some_only).unwrap().full_avg10, None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn a_kernel_without_pressure_files_gives_no_section() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(PressureFiles::new(root.path()).read(), None);
    }
}
