//! The CPU cost of one host sample, against the naive way of taking one (a fresh
//! sysinfo `System`, disk and network list per sample) in the same run.
//!
//!     cargo bench --bench sample

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sysinfo::{Disks, Networks, System};
use vigil::jobs::system_metrics::{Sampler, SystemMetricsConfig};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("sample");
    group.measurement_time(Duration::from_secs(5));

    let mut sampler = Sampler::new(&SystemMetricsConfig::default()).expect("sampler");
    sampler.set_min_cpu_interval_for_benchmarks(Duration::ZERO);
    group.bench_function("vigil_sampler_all_sections", |b| {
        b.iter(|| std::hint::black_box(sampler.sample()))
    });

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
