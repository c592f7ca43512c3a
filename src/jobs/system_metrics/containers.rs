//! Containers, found by their cgroups (Docker, Podman, containerd, CRI-O; cgroup v1
//! and v2) and measured from the kernel's own counters in them: CPU time, memory
//! charged, block I/O. Named from the runtime's metadata where it is readable
//! (Docker's `config.v2.json`, Podman's `containers.json`), else by id.
//!
//! The hierarchy is walked (to a bounded depth) every [`REDISCOVER_EVERY`] and when a
//! known container's files are gone; in between a sample reads only the counters of
//! the containers it knows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::sample::{Container, round2};
use crate::jobs::cgroupfs::{UNLIMITED, keyed, number, parse_blkio, parse_io_stat};

/// How often the cgroup tree is walked again for new containers.
pub const REDISCOVER_EVERY: Duration = Duration::from_secs(10);
/// How deep below the hierarchy's root containers are looked for (Kubernetes nests
/// them four levels down).
const MAX_DEPTH: usize = 6;

/// Where one container's counters are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cgroup {
    V2(PathBuf),
    V1 {
        cpu: Option<PathBuf>,
        memory: Option<PathBuf>,
        blkio: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    id: String,
    runtime: &'static str,
    cgroup: Cgroup,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    cpu_ns: u64,
    read_bytes: u64,
    written_bytes: u64,
}

/// What one read of a container's files gave.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    counters: Counters,
    memory_bytes: u64,
    inactive_file_bytes: u64,
    memory_limit: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Meta {
    name: String,
    project: Option<String>,
    service: Option<String>,
}

pub struct ContainerTable {
    root: PathBuf,
    found: Vec<Found>,
    found_at: Option<Instant>,
    previous: HashMap<String, Counters>,
    /// By full id; `None`: the runtime's metadata could not be read.
    meta: HashMap<String, Option<Meta>>,
}

impl ContainerTable {
    /// The containers of the host whose root is `root` (`/` natively).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            found: Vec::new(),
            found_at: None,
            previous: HashMap::new(),
            meta: HashMap::new(),
        }
    }

    /// Every container now, heaviest CPU first; rates over `elapsed` seconds.
    pub fn sample(&mut self, elapsed: f64) -> Vec<Container> {
        if self
            .found_at
            .is_none_or(|t| t.elapsed() >= REDISCOVER_EVERY)
        {
            self.discover();
        }
        let mut out = Vec::with_capacity(self.found.len());
        let mut seen = HashMap::with_capacity(self.found.len());
        let mut vanished = false;
        for f in &self.found {
            let Some(r) = read(&f.cgroup) else {
                vanished = true;
                continue;
            };
            let prev = self.previous.get(&f.id);
            let rate = |now: u64, then: u64| {
                (elapsed > 0.0).then(|| round2(super::counter_delta(then, now) as f64 / elapsed))
            };
            let meta = self.meta.get(&f.id).cloned().flatten();
            let short: String = f.id.chars().take(12).collect();
            out.push(Container {
                name: meta
                    .as_ref()
                    .map_or_else(|| short.clone(), |m| m.name.clone()),
                id: short,
                runtime: f.runtime.to_owned(),
                compose_project: meta.as_ref().and_then(|m| m.project.clone()),
                compose_service: meta.and_then(|m| m.service),
                cpu_pct: prev.and_then(|p| {
                    rate(r.counters.cpu_ns, p.cpu_ns).map(|ns| round2(ns / 1e9 * 100.0))
                }),
                memory_used_bytes: r.memory_bytes.saturating_sub(r.inactive_file_bytes),
                memory_limit_bytes: r.memory_limit,
                io_read_bytes_per_s: prev.and_then(|p| rate(r.counters.read_bytes, p.read_bytes)),
                io_written_bytes_per_s: prev
                    .and_then(|p| rate(r.counters.written_bytes, p.written_bytes)),
            });
            seen.insert(f.id.clone(), r.counters);
        }
        self.previous = seen;
        if vanished {
            // Walk again next time: the rest of the tree may have changed too.
            self.found_at = None;
        }
        out.sort_by(|a, b| {
            b.cpu_pct
                .unwrap_or(-1.0)
                .total_cmp(&a.cpu_pct.unwrap_or(-1.0))
                .then(b.memory_used_bytes.cmp(&a.memory_used_bytes))
                .then(a.name.cmp(&b.name))
        });
        out
    }

    fn discover(&mut self) {
        self.found = find(&self.root.join("sys/fs/cgroup"));
        self.found_at = Some(Instant::now());
        self.meta
            .retain(|id, _| self.found.iter().any(|f| &f.id == id));
        let missing: Vec<(String, &'static str)> = self
            .found
            .iter()
            .filter(|f| !self.meta.contains_key(&f.id))
            .map(|f| (f.id.clone(), f.runtime))
            .collect();
        if missing.is_empty() {
            return;
        }
        let podman = if missing.iter().any(|(_, r)| *r == "podman") {
            podman_names(&self.root)
        } else {
            HashMap::new()
        };
        for (id, runtime) in missing {
            let meta = match runtime {
                "docker" => docker_meta(&self.root, &id),
                "podman" => podman.get(&id).map(|name| Meta {
                    name: name.clone(),
                    ..Meta::default()
                }),
                _ => None,
            };
            self.meta.insert(id, meta);
        }
    }
}

/// The containers under the cgroup mount `cg`: cgroup v2 when it is the unified
/// hierarchy, else v1's cpuacct, memory and blkio controllers.
fn find(cg: &Path) -> Vec<Found> {
    let mut rel = Vec::new();
    if cg.join("cgroup.controllers").exists() {
        walk(cg, Path::new(""), 0, &mut rel);
        return rel
            .into_iter()
            .map(|(id, runtime, r)| Found {
                id,
                runtime,
                cgroup: Cgroup::V2(cg.join(r)),
            })
            .collect();
    }
    let controller = |names: &[&str], file: &str| {
        names
            .iter()
            .map(|n| cg.join(n))
            .find(|d| d.join(file).exists())
    };
    let cpu = controller(
        &["cpuacct", "cpu,cpuacct", "cpuacct,cpu", "cpu"],
        "cpuacct.usage",
    );
    let memory = controller(&["memory"], "memory.usage_in_bytes");
    let blkio = controller(&["blkio"], "blkio.throttle.io_service_bytes");
    let Some(tree) = memory.clone().or_else(|| cpu.clone()) else {
        return Vec::new();
    };
    walk(&tree, Path::new(""), 0, &mut rel);
    rel.into_iter()
        .map(|(id, runtime, r)| Found {
            id,
            runtime,
            cgroup: Cgroup::V1 {
                cpu: cpu.as_ref().map(|d| d.join(&r)),
                memory: memory.as_ref().map(|d| d.join(&r)),
                blkio: blkio.as_ref().map(|d| d.join(&r)),
            },
        })
        .collect()
}

fn walk(dir: &Path, rel: &Path, depth: usize, out: &mut Vec<(String, &'static str, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let here = rel.join(name);
        if let Some(id) = container_id(name) {
            out.push((id.to_owned(), runtime(name, rel), here));
        } else if depth + 1 < MAX_DEPTH {
            walk(&e.path(), &here, depth + 1, out);
        }
    }
}

/// The 64-hex-digit id in a container's cgroup name (`docker-<id>.scope`, `<id>`
/// under `docker/`, `libpod-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`);
/// Podman's monitor (`libpod-conmon-…`) is not a container.
pub fn container_id(name: &str) -> Option<&str> {
    if name.contains("conmon") {
        return None;
    }
    name.split(['-', '.'])
        .find(|part| part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn runtime(name: &str, parent: &Path) -> &'static str {
    let under = |p: &str| parent.components().any(|c| c.as_os_str() == p);
    if name.starts_with("docker-") || under("docker") {
        "docker"
    } else if name.starts_with("libpod-") || under("libpod_parent") {
        "podman"
    } else if name.starts_with("cri-containerd-") || under("containerd") {
        "containerd"
    } else if name.starts_with("crio-") {
        "cri-o"
    } else {
        "container"
    }
}

/// A container's counters; `None` when it is gone.
fn read(cgroup: &Cgroup) -> Option<Reading> {
    match cgroup {
        Cgroup::V2(dir) => {
            let memory_bytes = number(&dir.join("memory.current"))?;
            let (read_bytes, written_bytes) = std::fs::read_to_string(dir.join("io.stat"))
                .map(|t| parse_io_stat(&t))
                .unwrap_or_default();
            Some(Reading {
                counters: Counters {
                    cpu_ns: keyed(&dir.join("cpu.stat"), "usage_usec")
                        .unwrap_or(0)
                        .saturating_mul(1000),
                    read_bytes,
                    written_bytes,
                },
                memory_bytes,
                inactive_file_bytes: keyed(&dir.join("memory.stat"), "inactive_file").unwrap_or(0),
                memory_limit: number(&dir.join("memory.max")).filter(|&l| l < UNLIMITED),
            })
        }
        Cgroup::V1 { cpu, memory, blkio } => {
            let memory_bytes = memory
                .as_ref()
                .map(|d| number(&d.join("memory.usage_in_bytes")));
            let cpu_ns = cpu.as_ref().map(|d| number(&d.join("cpuacct.usage")));
            // Gone from whichever controller the walk found it in.
            if memory_bytes.as_ref().is_some_and(Option::is_none)
                || (memory.is_none() && cpu_ns.as_ref().is_some_and(Option::is_none))
            {
                return None;
            }
            let (read_bytes, written_bytes) = blkio
                .as_ref()
                .and_then(|d| {
                    std::fs::read_to_string(d.join("blkio.throttle.io_service_bytes")).ok()
                })
                .map(|t| parse_blkio(&t))
                .unwrap_or_default();
            Some(Reading {
                counters: Counters {
                    cpu_ns: cpu_ns.flatten().unwrap_or(0),
                    read_bytes,
                    written_bytes,
                },
                memory_bytes: memory_bytes.flatten().unwrap_or(0),
                inactive_file_bytes: memory
                    .as_ref()
                    .and_then(|d| keyed(&d.join("memory.stat"), "total_inactive_file"))
                    .unwrap_or(0),
                memory_limit: memory
                    .as_ref()
                    .and_then(|d| number(&d.join("memory.limit_in_bytes")))
                    .filter(|&l| l < UNLIMITED),
            })
        }
    }
}

/// Docker's own record of a container: its name and compose labels.
fn docker_meta(root: &Path, id: &str) -> Option<Meta> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(rename = "Labels", default)]
        labels: Option<HashMap<String, String>>,
    }
    #[derive(Deserialize)]
    struct V2 {
        #[serde(rename = "Name")]
        name: String,
        #[serde(rename = "Config")]
        config: Option<Config>,
    }
    let path = root
        .join("var/lib/docker/containers")
        .join(id)
        .join("config.v2.json");
    let c: V2 = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
    Some(Meta {
        name: c.name.trim_start_matches('/').to_owned(),
        project: labels.get("com.docker.compose.project").cloned(),
        service: labels.get("com.docker.compose.service").cloned(),
    })
}

/// Podman's (rootful) container names, by id.
fn podman_names(root: &Path) -> HashMap<String, String> {
    #[derive(Deserialize)]
    struct Entry {
        id: String,
        #[serde(default)]
        names: Vec<String>,
    }
    let path = root.join("var/lib/containers/storage/overlay-containers/containers.json");
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<Entry>>(&b).ok())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| Some((e.id, e.names.into_iter().next()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn ids_are_found_in_every_runtimes_cgroup_names() {
        assert_eq!(container_id(&format!("docker-{A}.scope")), Some(A));
        assert_eq!(container_id(A), Some(A));
        assert_eq!(container_id(&format!("cri-containerd-{B}.scope")), Some(B));
        assert_eq!(container_id(&format!("libpod-conmon-{B}.scope")), None);
        assert_eq!(container_id("system.slice"), None);
        assert_eq!(container_id(&A[1..]), None);
    }

    #[test]
    fn cgroup_v2_containers_are_measured_and_named_from_dockers_metadata() {
        let root = tempfile::tempdir().unwrap();
        let cg = root.path().join("sys/fs/cgroup");
        write(&cg.join("cgroup.controllers"), "cpu io memory\n");
        let a = cg.join(format!("system.slice/docker-{A}.scope"));
        let b = cg.join(format!("machine.slice/libpod-{B}.scope"));
        for (dir, usec, mem, max) in [(&a, 1_000_000, 300, "max"), (&b, 5_000_000, 900, "1000")] {
            write(
                &dir.join("cpu.stat"),
                &format!("usage_usec {usec}\nuser_usec 1\n"),
            );
            write(&dir.join("memory.current"), &format!("{mem}\n"));
            write(&dir.join("memory.max"), &format!("{max}\n"));
            write(&dir.join("memory.stat"), "anon 1\ninactive_file 100\n");
            write(
                &dir.join("io.stat"),
                "8:0 rbytes=1000 wbytes=0 rios=1 wios=0\n",
            );
        }
        write(
            &root
                .path()
                .join(format!("var/lib/docker/containers/{A}/config.v2.json")),
            r#"{"Name":"/web-1","Config":{"Labels":{"com.docker.compose.project":"shop","com.docker.compose.service":"web"}}}"#,
        );
        let mut t = ContainerTable::new(root.path());
        let first = t.sample(1.0);
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|c| c.cpu_pct.is_none()), "no interval yet");
        // Two seconds later: A used 1 s of CPU (50 %), B 0.5 s; A read 4000 bytes.
        write(&a.join("cpu.stat"), "usage_usec 2000000\n");
        write(&b.join("cpu.stat"), "usage_usec 5500000\n");
        write(
            &a.join("io.stat"),
            "8:0 rbytes=5000 wbytes=20 rios=1 wios=0\n",
        );
        let now = t.sample(2.0);
        assert_eq!(now[0].name, "web-1");
        assert_eq!(now[0].runtime, "docker");
        assert_eq!(now[0].compose_project.as_deref(), Some("shop"));
        assert_eq!(now[0].compose_service.as_deref(), Some("web"));
        assert_eq!(now[0].cpu_pct, Some(50.0));
        assert_eq!(now[0].memory_used_bytes, 200);
        assert_eq!(now[0].memory_limit_bytes, None);
        assert_eq!(now[0].io_read_bytes_per_s, Some(2000.0));
        assert_eq!(now[0].io_written_bytes_per_s, Some(10.0));
        assert_eq!(now[1].id, &B[..12]);
        assert_eq!(now[1].name, &B[..12], "no metadata: named by id");
        assert_eq!(now[1].runtime, "podman");
        assert_eq!(now[1].cpu_pct, Some(25.0));
        assert_eq!(now[1].memory_limit_bytes, Some(1000));
        // A container that is gone is left out at once.
        std::fs::remove_dir_all(&b).unwrap();
        assert_eq!(t.sample(1.0).len(), 1);
    }

    #[test]
    fn cgroup_v1_containers_are_read_from_each_controller() {
        let root = tempfile::tempdir().unwrap();
        let cg = root.path().join("sys/fs/cgroup");
        write(&cg.join("cpu,cpuacct/cpuacct.usage"), "1\n");
        write(&cg.join("memory/memory.usage_in_bytes"), "1\n");
        write(
            &cg.join("blkio/blkio.throttle.io_service_bytes"),
            "Total 0\n",
        );
        let rel = format!("docker/{A}");
        write(
            &cg.join("cpu,cpuacct").join(&rel).join("cpuacct.usage"),
            "3000000000\n",
        );
        let mem = cg.join("memory").join(&rel);
        write(&mem.join("memory.usage_in_bytes"), "5000\n");
        write(&mem.join("memory.limit_in_bytes"), "9223372036854771712\n");
        write(
            &mem.join("memory.stat"),
            "cache 10\ntotal_inactive_file 1000\n",
        );
        write(
            &cg.join("blkio")
                .join(&rel)
                .join("blkio.throttle.io_service_bytes"),
            "8:0 Read 100\n8:0 Write 50\n8:16 Read 1\nTotal 151\n",
        );
        let mut t = ContainerTable::new(root.path());
        t.sample(1.0);
        write(
            &cg.join("cpu,cpuacct").join(&rel).join("cpuacct.usage"),
            "4000000000\n",
        );
        let c = &t.sample(1.0)[0];
        assert_eq!((c.runtime.as_str(), c.cpu_pct), ("docker", Some(100.0)));
        assert_eq!(c.memory_used_bytes, 4000);
        assert_eq!(c.memory_limit_bytes, None, "v1's unlimited");
        assert_eq!(c.io_read_bytes_per_s, Some(0.0));
    }
}
