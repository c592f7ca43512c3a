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
                    "read_bytes_per_s": 409.6, "written_bytes_per_s": null
                }],
                "network": {
                    "interfaces": [eth0, {"name": "wg0"}],
                    "total": traffic_json
                },
                "load": {"1m": 0.5, "5m": 0.25, "15m": 0.125},
                "uptime_s": 3600,
                "processes": 123,
                "self": {"cpu_pct": 0.7, "rss_bytes": 9000000}
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
        };
        assert_eq!(
            serde_json::to_value(&sample).unwrap(),
            json!({"v": 1, "interval_s": 1.0, "uptime_s": 5})
        );
    }
}
