//! The CPU cost of one host sample, against the naive way of taking one (a fresh
//! sysinfo `System`, disk and network list per sample) in the same run: with every
//! section, with the sections the shipped jobs.toml collects, and each section alone
//! (what turning it on costs).
//!
//!     cargo bench --bench sample

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sysinfo::{Disks, Networks, System};
use vigil::jobs::system_metrics::{Collect, Sampler, SystemMetricsConfig};

/// The `collect` of the shipped jobs.toml's system_metrics job.
fn shipped() -> Vec<Collect> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/jobs.toml"))
        .expect("jobs.toml");
    let file = vigil::config::parse_jobs(
        std::path::Path::new("jobs.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .expect("the shipped jobs.toml is valid");
    let spec = file
        .jobs
        .iter()
        .find(|j| j.kind == "system_metrics")
        .expect("a system_metrics job");
    spec.settings
        .get::<SystemMetricsConfig>()
        .expect("its settings")
        .collect
        .clone()
}

fn sampler(collect: Vec<Collect>) -> Sampler {
    let config = SystemMetricsConfig {
        collect,
        ..SystemMetricsConfig::default()
    };
    let mut s = Sampler::new(&config).expect("sampler");
    s.set_min_cpu_interval_for_benchmarks(Duration::ZERO);
    s
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("sample");
    group.measurement_time(Duration::from_secs(5));

    let mut all = sampler(Collect::ALL.to_vec());
    group.bench_function("vigil_sampler_all_sections", |b| {
        b.iter(|| std::hint::black_box(all.sample()))
    });
    let mut shipped = sampler(shipped());
    group.bench_function("vigil_sampler_shipped_sections", |b| {
        b.iter(|| std::hint::black_box(shipped.sample()))
    });
    for section in Collect::ALL {
        let mut one = sampler(vec![section]);
        group.bench_function(format!("section_{}", section.name()), |b| {
            b.iter(|| std::hint::black_box(one.sample()))
        });
    }

    group.bench_function("baseline_fresh_sysinfo_each_time", |b| {
        b.iter(|| {
            let mut sys = System::new_all().expect("system");
            sys.refresh_all();
            let disks = Disks::new_with_refreshed_list().expect("disks");
            let nets = Networks::new_with_refreshed_list().expect("networks");
            std::hint::black_box((sys.global_cpu_usage(), disks.len(), nets.len()))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
