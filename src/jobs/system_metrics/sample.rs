//! The stored shape of one host sample: `system_metrics.metrics`, version 1.
//!
//! Changing a field's name or meaning is a new version (`v`); adding an optional field
//! is not. Sections not in `collect` are absent; values that cannot be known yet (a
//! rate on the first sample of a new disk or interface) are `null`.

use serde::Serialize;

pub const SHAPE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub v: u32,
    /// Seconds since the previous sample of this job (the rates' denominator).
    pub interval_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<Disk>>,
    /// Mounts whose statistics could not be read this time (not answering within the
    /// bound, or an error): absent when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disks_unavailable: Option<Vec<UnavailableDisk>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    #[serde(rename = "self", skip_serializing_if = "Option::is_none")]
    pub own: Option<OwnProcess>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_processes: Option<TopProcesses>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containers: Option<Vec<Container>>,
    /// Absent where the kernel offers no pressure information (before 4.20, or
    /// `psi=0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pressure: Option<Pressure>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cpu {
    /// Busy share of all cores since the previous sample, 0 to 100.
    pub usage_pct: f64,
    pub per_core_pct: Vec<f64>,
    pub cores: usize,
    /// Mean current frequency; `null` where the kernel does not expose it.
    pub frequency_mhz: Option<u64>,
    /// CPU quota of the cgroup vigil runs in, in cores; `null` when unlimited.
    pub cgroup_limit_cores: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    pub total_bytes: u64,
    /// total − available.
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub used_pct: f64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
    /// Memory limit of the cgroup vigil runs in; `null` when unlimited.
    pub cgroup_limit_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Disk {
    pub mount: String,
    pub device: String,
    pub fs: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// (total − available) / total.
    pub used_pct: f64,
    pub read_bytes: Option<u64>,
    pub written_bytes: Option<u64>,
    pub read_bytes_per_s: Option<f64>,
    pub written_bytes_per_s: Option<f64>,
    /// Inodes of the file system; `null` where it has no fixed number (btrfs).
    pub inodes_total: Option<u64>,
    pub inodes_used: Option<u64>,
    pub inodes_used_pct: Option<f64>,
    /// Read and write operations completed per second, and the share of the interval
    /// the device had I/O in flight (0 to 100), from the kernel's `/proc/diskstats`.
    pub reads_per_s: Option<f64>,
    pub writes_per_s: Option<f64>,
    pub busy_pct: Option<f64>,
}

/// A mount left out of `disks`, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnavailableDisk {
    pub mount: String,
    pub device: String,
    pub fs: String,
    pub error: String,
}

/// Counts since the previous sample, and the same per second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Traffic {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_bytes_per_s: f64,
    pub tx_bytes_per_s: f64,
    pub rx_packets_per_s: f64,
    pub tx_packets_per_s: f64,
    pub rx_errors_per_s: f64,
    pub tx_errors_per_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interface {
    pub name: String,
    /// Absent on the first sample after the interface appeared.
    #[serde(flatten)]
    pub traffic: Option<Traffic>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Network {
    pub interfaces: Vec<Interface>,
    /// Sum over the interfaces with known counts.
    pub total: Traffic,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Load {
    #[serde(rename = "1m")]
    pub one: f64,
    #[serde(rename = "5m")]
    pub five: f64,
    #[serde(rename = "15m")]
    pub fifteen: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OwnProcess {
    /// vigil's CPU time since the previous sample, as a share of one core (can exceed 100).
    pub cpu_pct: f64,
    pub rss_bytes: u64,
}

/// The heaviest processes of the host, by CPU and by resident memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopProcesses {
    pub by_cpu: Vec<ProcessUse>,
    pub by_memory: Vec<ProcessUse>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessUse {
    pub pid: i32,
    /// The kernel's name of the process (`comm`, at most 15 bytes).
    pub name: String,
    /// The owner's name in the host's `/etc/passwd`, else the uid.
    pub user: String,
    /// CPU time since the previous sample, as a share of one core (can exceed 100).
    pub cpu_pct: f64,
    pub rss_bytes: u64,
    /// Only with `process_cmdline = true`: command lines carry secrets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// One container, found by its cgroup.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Container {
    /// The first 12 characters of the container's id, as `docker ps` shows it.
    pub id: String,
    /// From the runtime's own metadata where readable, else the id.
    pub name: String,
    /// `docker`, `podman`, `containerd`, `cri-o` or `container` (unknown).
    pub runtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compose_project: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compose_service: Option<String>,
    /// CPU time since the previous sample as a share of one core; `null` the first
    /// time the container is seen.
    pub cpu_pct: Option<f64>,
    /// Memory charged to the container less its inactive file cache (as `docker
    /// stats` counts it).
    pub memory_used_bytes: u64,
    /// `null`: no limit.
    pub memory_limit_bytes: Option<u64>,
    pub io_read_bytes_per_s: Option<f64>,
    pub io_written_bytes_per_s: Option<f64>,
}

/// Pressure stall information: the share of the last 10 and 60 seconds in which some
/// (or all) non-idle tasks waited for the resource.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pressure {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Stall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Stall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io: Option<Stall>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stall {
    pub some_avg10: f64,
    pub some_avg60: f64,
    /// `null` where the kernel does not report it (CPU before 5.13).
    pub full_avg10: Option<f64>,
    pub full_avg60: Option<f64>,
}

/// Rounds a percentage or rate for storage: two decimals say all there is to say.
pub fn round2(x: f64) -> f64 {
    if x.is_finite() {
        (x * 100.0).round() / 100.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn traffic(n: u64) -> Traffic {
        Traffic {
            rx_bytes: n,
            tx_bytes: n * 2,
            rx_packets: 3,
            tx_packets: 4,
            rx_errors: 0,
            tx_errors: 1,
            rx_bytes_per_s: n as f64 / 10.0,
            tx_bytes_per_s: n as f64 / 5.0,
            rx_packets_per_s: 0.3,
            tx_packets_per_s: 0.4,
            rx_errors_per_s: 0.0,
            tx_errors_per_s: 0.1,
        }
    }

    /// The stored JSON is an interface: dashboards and users query these exact paths.
    #[test]
    fn version_1_shape_is_pinned() {
        let sample = Sample {
            v: SHAPE_VERSION,
            interval_s: 10.0,
            cpu: Some(Cpu {
                usage_pct: 12.5,
                per_core_pct: vec![10.0, 15.0],
                cores: 2,
                frequency_mhz: Some(2400),
                cgroup_limit_cores: None,
            }),
            memory: Some(Memory {
                total_bytes: 1000,
                used_bytes: 600,
                available_bytes: 400,
                used_pct: 60.0,
                swap_total_bytes: 0,
                swap_used_bytes: 0,
                cgroup_limit_bytes: Some(800),
            }),
            disks: Some(vec![Disk {
                mount: "/".into(),
                device: "/dev/vda".into(),
                fs: "ext4".into(),
                total_bytes: 100,
                available_bytes: 25,
                used_pct: 75.0,
                read_bytes: Some(4096),
                written_bytes: None,
                read_bytes_per_s: Some(409.6),
                written_bytes_per_s: None,
                inodes_total: Some(1000),
                inodes_used: Some(250),
                inodes_used_pct: Some(25.0),
                reads_per_s: Some(12.5),
                writes_per_s: None,
                busy_pct: Some(3.2),
            }]),
            disks_unavailable: None,
            network: Some(Network {
                interfaces: vec![
                    Interface {
                        name: "eth0".into(),
                        traffic: Some(traffic(100)),
                    },
                    Interface {
                        name: "wg0".into(),
                        traffic: None,
                    },
                ],
                total: traffic(100),
            }),
            load: Some(Load {
                one: 0.5,
                five: 0.25,
                fifteen: 0.125,
            }),
            uptime_s: Some(3600),
            processes: Some(123),
            own: Some(OwnProcess {
                cpu_pct: 0.7,
                rss_bytes: 9_000_000,
            }),
            top_processes: Some(TopProcesses {
                by_cpu: vec![ProcessUse {
                    pid: 42,
                    name: "postgres".into(),
                    user: "postgres".into(),
                    cpu_pct: 97.5,
                    rss_bytes: 1 << 20,
                    cmdline: Some("postgres: checkpointer".into()),
                }],
                by_memory: vec![ProcessUse {
                    pid: 7,
                    name: "java".into(),
                    user: "1000".into(),
                    cpu_pct: 0.5,
                    rss_bytes: 1 << 30,
                    cmdline: None,
                }],
            }),
            containers: Some(vec![Container {
                id: "0123456789ab".into(),
                name: "shop-web-1".into(),
                runtime: "docker".into(),
                compose_project: Some("shop".into()),
                compose_service: Some("web".into()),
                cpu_pct: Some(12.5),
                memory_used_bytes: 5000,
                memory_limit_bytes: None,
                io_read_bytes_per_s: Some(1.5),
                io_written_bytes_per_s: None,
            }]),
            pressure: Some(Pressure {
                cpu: Some(Stall {
                    some_avg10: 1.5,
                    some_avg60: 0.5,
                    full_avg10: None,
                    full_avg60: None,
                }),
                memory: None,
                io: Some(Stall {
                    some_avg10: 2.0,
                    some_avg60: 1.0,
                    full_avg10: Some(1.0),
                    full_avg60: Some(0.25),
                }),
            }),
        };
        let traffic_json = json!({
            "rx_bytes": 100, "tx_bytes": 200, "rx_packets": 3, "tx_packets": 4,
            "rx_errors": 0, "tx_errors": 1,
            "rx_bytes_per_s": 10.0, "tx_bytes_per_s": 20.0,
            "rx_packets_per_s": 0.3, "tx_packets_per_s": 0.4,
            "rx_errors_per_s": 0.0, "tx_errors_per_s": 0.1
        });
        let mut eth0 = traffic_json.clone();
        eth0["name"] = json!("eth0");
        assert_eq!(
            serde_json::to_value(&sample).unwrap(),
            json!({
                "v": 1,
                "interval_s": 10.0,
                "cpu": {
                    "usage_pct": 12.5, "per_core_pct": [10.0, 15.0], "cores": 2,
                    "frequency_mhz": 2400, "cgroup_limit_cores": null
                },
                "memory": {
                    "total_bytes": 1000, "used_bytes": 600, "available_bytes": 400,
                    "used_pct": 60.0, "swap_total_bytes": 0, "swap_used_bytes": 0,
                    "cgroup_limit_bytes": 800
                },
                "disks": [{
                    "mount": "/", "device": "/dev/vda", "fs": "ext4",
                    "total_bytes": 100, "available_bytes": 25, "used_pct": 75.0,
                    "read_bytes": 4096, "written_bytes": null,
                    "read_bytes_per_s": 409.6, "written_bytes_per_s": null,
                    "inodes_total": 1000, "inodes_used": 250, "inodes_used_pct": 25.0,
                    "reads_per_s": 12.5, "writes_per_s": null, "busy_pct": 3.2
                }],
                "network": {
                    "interfaces": [eth0, {"name": "wg0"}],
                    "total": traffic_json
                },
                "load": {"1m": 0.5, "5m": 0.25, "15m": 0.125},
                "uptime_s": 3600,
                "processes": 123,
                "self": {"cpu_pct": 0.7, "rss_bytes": 9000000},
                "top_processes": {
                    "by_cpu": [{
                        "pid": 42, "name": "postgres", "user": "postgres", "cpu_pct": 97.5,
                        "rss_bytes": 1048576, "cmdline": "postgres: checkpointer"
                    }],
                    "by_memory": [{
                        "pid": 7, "name": "java", "user": "1000", "cpu_pct": 0.5,
                        "rss_bytes": 1073741824
                    }]
                },
                "containers": [{
                    "id": "0123456789ab", "name": "shop-web-1", "runtime": "docker",
                    "compose_project": "shop", "compose_service": "web", "cpu_pct": 12.5,
                    "memory_used_bytes": 5000, "memory_limit_bytes": null,
                    "io_read_bytes_per_s": 1.5, "io_written_bytes_per_s": null
                }],
                "pressure": {
                    "cpu": {"some_avg10": 1.5, "some_avg60": 0.5, "full_avg10": null, "full_avg60": null},
                    "io": {"some_avg10": 2.0, "some_avg60": 1.0, "full_avg10": 1.0, "full_avg60": 0.25}
                }
            })
        );
    }

    #[test]
    fn sections_not_collected_are_absent() {
        let sample = Sample {
            v: 1,
            interval_s: 1.0,
            cpu: None,
            memory: None,
            disks: None,
            disks_unavailable: None,
            network: None,
            load: None,
            uptime_s: Some(5),
            processes: None,
            own: None,
            top_processes: None,
            containers: None,
            pressure: None,
        };
        assert_eq!(
            serde_json::to_value(&sample).unwrap(),
            json!({"v": 1, "interval_s": 1.0, "uptime_s": 5})
        );
    }
}
