//! The `system_metrics` job on this machine, into real PostgreSQL.

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{TestDb, eventually};
use serde_json::Value;
use vigil::config::{self, JobSpec};
use vigil::jobs::system_metrics::SystemMetricsConfig;
use vigil::jobs::{self, Deps, Job as _, RunContext};
use vigil::scheduler::{Ledger, Scheduler, ledger};
use vigil::store::embedded::{self, EmbeddedPostgres};
use vigil::store::{Store, Target};

fn spec(every: &str, settings: &str) -> JobSpec {
    let text = format!(
        "[[jobs]]\nname = \"host\"\nkind = \"system_metrics\"\nevery = \"{every}\"\n[jobs.settings]\n{settings}\n"
    );
    config::parse_jobs(
        Path::new("t.toml"),
        &text,
        &vigil::jobs::Registry::builtin(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .jobs
    .remove(0)
}

fn ctx() -> RunContext {
    RunContext {
        job: "host".into(),
        trigger: vigil::store::Trigger::Manual,
        run_id: uuid::Uuid::now_v7(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(60),
        input: None,
        output: Default::default(),
        resources: Default::default(),
    }
}

async fn samples(store: &Store) -> Vec<(DateTime<Utc>, Value)> {
    sqlx::query_as::<_, (DateTime<Utc>, Value)>(
        "SELECT ts, metrics FROM system_metrics ORDER BY ts",
    )
    .fetch_all(store.pool())
    .await
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sample_read_back_from_postgres_is_sane() {
    let db = TestDb::new().await;
    let job = jobs::build(
        &spec("10s", "host = \"test-host\""),
        &Deps {
            store: db.store.clone(),
            host: "runner".into(),
            metrics: Default::default(),
            mongo_uri: None,
            env: vigil::config::Environment::capture().unwrap(),
            host_root: None,
            spool: None,
            run_cgroups: true,
        },
    )
    .unwrap();
    job.run(ctx()).await.unwrap();
    job.run(ctx()).await.unwrap();
    let rows = eventually(Duration::from_secs(10), "two samples", || async {
        let rows = samples(&db.store).await;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    let host: String = sqlx::query_scalar("SELECT DISTINCT host FROM system_metrics")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(host, "test-host");

    for (_, m) in &rows {
        assert_eq!(m["v"], 1);
        let cpu = m["cpu"]["usage_pct"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&cpu), "{cpu}");
        for core in m["cpu"]["per_core_pct"].as_array().unwrap() {
            assert!((0.0..=100.0).contains(&core.as_f64().unwrap()));
        }
        assert!(m["cpu"]["cores"].as_u64().unwrap() >= 1);

        let mem = &m["memory"];
        assert!(mem["used_bytes"].as_u64().unwrap() <= mem["total_bytes"].as_u64().unwrap());
        assert!(mem["available_bytes"].as_u64().unwrap() <= mem["total_bytes"].as_u64().unwrap());
        assert!(mem["total_bytes"].as_u64().unwrap() > 0);

        let disks = m["disks"].as_array().unwrap();
        assert!(!disks.is_empty(), "at least one disk: {m}");
        for d in disks {
            assert!(d["available_bytes"].as_u64().unwrap() <= d["total_bytes"].as_u64().unwrap());
            let used = d["used_pct"].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&used));
            assert_ne!(d["fs"], "tmpfs", "tmpfs excluded by default");
            // Inodes from statvfs; operations and busy time from /proc/diskstats.
            if let Some(p) = d["inodes_used_pct"].as_f64() {
                assert!((0.0..=100.0).contains(&p), "{d}");
                assert!(d["inodes_used"].as_u64().unwrap() <= d["inodes_total"].as_u64().unwrap());
            }
            let busy = d["busy_pct"].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&busy), "{d}");
            assert!(d["reads_per_s"].as_f64().unwrap() >= 0.0, "{d}");
            assert!(d["writes_per_s"].as_f64().unwrap() >= 0.0, "{d}");
        }
        assert!(
            disks
                .iter()
                .any(|d| d["inodes_total"].as_u64().unwrap_or(0) > 0),
            "some disk has inodes: {m}"
        );
        // The sections new in the default collect.
        assert_eq!(
            m["top_processes"]["by_cpu"].as_array().unwrap().len(),
            5,
            "{m}"
        );
        assert_eq!(
            m["top_processes"]["by_memory"].as_array().unwrap().len(),
            5,
            "{m}"
        );
        assert!(m["containers"].is_array(), "{m}");
        if Path::new("/proc/pressure/cpu").exists() {
            for r in ["cpu", "memory", "io"] {
                let some = m["pressure"][r]["some_avg10"].as_f64().unwrap();
                assert!((0.0..=100.0).contains(&some), "{m}");
            }
        }

        let ifaces = m["network"]["interfaces"].as_array().unwrap();
        assert!(!ifaces.is_empty(), "at least one interface: {m}");
        assert!(
            ifaces.iter().all(|i| i["name"] != "lo"),
            "loopback excluded by default"
        );

        assert!(m["load"]["1m"].as_f64().unwrap() >= 0.0);
        assert!(m["uptime_s"].as_u64().unwrap() > 0);
        assert!(m["processes"].as_u64().unwrap() > 1);
        assert!(m["self"]["rss_bytes"].as_u64().unwrap() > 1_000_000);
    }
    // The first sample already has real CPU and rates: it is measured from the baseline
    // taken when the job was built, never the 0 % of a first refresh.
    let first = &rows[0].1;
    assert!(first["interval_s"].as_f64().unwrap() >= 0.2, "{first}");
    assert!(
        first["network"]["interfaces"][0]["rx_bytes"].is_u64(),
        "{first}"
    );

    // The typed columns dashboards read are filled from the JSON.
    let (cpu, mem): (Option<f32>, Option<f32>) =
        sqlx::query_as("SELECT cpu_pct, mem_pct FROM system_metrics ORDER BY ts DESC LIMIT 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(cpu.is_some() && mem.is_some());

    // And folded into the per-minute rollup, each sample once.
    let (samples, cpu_n, cpu_sum, raw_sum): (i64, i64, f64, f64) = sqlx::query_as(
        "SELECT sum(samples)::bigint, sum(cpu_n)::bigint, sum(cpu_sum),
                (SELECT sum(cpu_pct::float8) FROM system_metrics)
         FROM system_metrics_1m",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((samples, cpu_n), (2, 2));
    assert!((cpu_sum - raw_sum).abs() < 1e-6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sample_written_twice_is_stored_and_counted_once() {
    let db = TestDb::new().await;
    let ts = Utc::now();
    let m = r#"{"v":1,"interval_s":10,"cpu":{"usage_pct":40.0},"memory":{"used_pct":50.0}}"#;
    let m2 = r#"{"v":1,"interval_s":10,"cpu":{"usage_pct":60.0},"memory":{"used_pct":70.0}}"#;
    let later = ts + chrono::Duration::seconds(10);
    db.store.insert_samples("h", &[(ts, m)]).await.unwrap();
    // A batch re-sent after a reconnect, plus one new sample.
    db.store
        .insert_samples("h", &[(ts, m), (later, m2)])
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM system_metrics")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rows, 2);
    let (samples, cpu_sum, mem_max): (i64, f64, f32) = sqlx::query_as(
        "SELECT sum(samples)::bigint, sum(cpu_sum), max(mem_max) FROM system_metrics_1m",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(samples, 2);
    assert!((cpu_sum - 100.0).abs() < 1e-6, "{cpu_sum}");
    assert!((mem_max - 70.0).abs() < 1e-6);
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_sent_over_loopback_show_up_in_its_rates() {
    let db = TestDb::new().await;
    let job = jobs::build(
        &spec("10s", "exclude_interfaces = []\ncollect = [\"network\"]"),
        &db.deps(),
    )
    .unwrap();
    job.run(ctx()).await.unwrap();

    const SENT: usize = 8 * 1024 * 1024;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < SENT {
            got += s.read(&mut buf).unwrap();
        }
        got
    });
    let mut out = std::net::TcpStream::connect(addr).unwrap();
    out.write_all(&vec![7u8; SENT]).unwrap();
    assert_eq!(reader.join().unwrap(), SENT);

    job.run(ctx()).await.unwrap();
    let rows = eventually(Duration::from_secs(10), "two samples", || async {
        let rows = samples(&db.store).await;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    let m = &rows[1].1;
    let lo = m["network"]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "lo")
        .unwrap_or_else(|| panic!("lo included: {m}"));
    let rx = lo["rx_bytes"].as_u64().unwrap();
    let tx = lo["tx_bytes"].as_u64().unwrap();
    assert!(rx >= SENT as u64 && tx >= SENT as u64, "lo rx {rx} tx {tx}");
    let interval = m["interval_s"].as_f64().unwrap();
    let rate = lo["rx_bytes_per_s"].as_f64().unwrap();
    assert!(
        (rate - rx as f64 / interval).abs() / rate < 0.02,
        "rate {rate} = {rx} / {interval}"
    );
    assert!(m["network"]["total"]["rx_bytes"].as_u64().unwrap() >= rx);
    assert!(
        m.get("cpu").is_none(),
        "only the collected sections are stored"
    );
}

/// An embedded cluster of this test's own, which it can stop and start.
fn own_cluster(dir: &Path) -> EmbeddedPostgres {
    EmbeddedPostgres::start(dir, None).expect("start a throwaway PostgreSQL")
}

#[tokio::test(flavor = "multi_thread")]
async fn samples_taken_while_postgres_is_down_are_written_in_order_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("pg");
    let pg = tokio::task::spawn_blocking({
        let data = data.clone();
        move || own_cluster(&data)
    })
    .await
    .unwrap();
    vigil::store::ensure_database(&pg.connect_options("postgres"), embedded::DATABASE)
        .await
        .unwrap();
    let target = Target {
        options: pg.connect_options(embedded::DATABASE),
        display: pg.describe(),
    };
    let store = Store::connect(&target, 5, Duration::from_secs(10))
        .await
        .unwrap();
    store.migrate().await.unwrap();

    let spec = spec("1s", "collect = [\"cpu\", \"memory\"]");
    let job = jobs::build(
        &spec,
        &Deps {
            store: store.clone(),
            host: "outage".into(),
            metrics: Default::default(),
            mongo_uri: None,
            env: vigil::config::Environment::capture().unwrap(),
            host_root: None,
            spool: None,
            run_cgroups: true,
        },
    )
    .unwrap();
    let scheduler = Scheduler::new(
        Ledger::start(store.clone(), ledger::DEFAULT_CAPACITY, Default::default()),
        "outage",
    )
    .await
    .unwrap();
    scheduler.add(spec, Arc::clone(&job)).await.unwrap();
    scheduler.start().await.unwrap();

    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::task::spawn_blocking(move || pg.stop().unwrap())
        .await
        .unwrap();
    let down_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pg = tokio::task::spawn_blocking({
        let data = data.clone();
        move || own_cluster(&data)
    })
    .await
    .unwrap();
    let up_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    scheduler.shutdown(Duration::from_secs(5)).await;

    let rows = samples(&store).await;
    let seconds: Vec<i64> = rows.iter().map(|(ts, _)| ts.timestamp()).collect();
    assert!(seconds.len() >= 18, "{} rows", seconds.len());
    let first = seconds[0];
    let last = *seconds.last().unwrap();
    // Every second of the run has exactly one row, in order.
    assert_eq!(
        seconds,
        (first..=last).collect::<Vec<_>>(),
        "one row per second"
    );
    // And the outage is inside it: samples exist for the seconds PostgreSQL was down.
    let down = rows
        .iter()
        .filter(|(ts, _)| *ts > down_at && *ts < up_at)
        .count();
    assert!(down >= 8, "samples taken during the outage: {down}");
    // The ledger, buffered the same way, recorded the runs of the outage too.
    let runs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_runs WHERE job = 'host' AND started_at > $1 AND started_at < $2",
    )
    .bind(down_at)
    .bind(up_at)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(runs >= 8, "ledger rows during the outage: {runs}");
    store.close().await;
    tokio::task::spawn_blocking(move || pg.stop().unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_buffer_drops_the_oldest_samples_and_counts_them() {
    // A store pointing nowhere: every write fails.
    let target = Target {
        options: "postgres://nobody@127.0.0.1:1/none".parse().unwrap(),
        display: "nowhere".into(),
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(200))
        .connect_lazy_with(target.options.clone());
    let store = Store::from_pool(pool);
    let job = vigil::jobs::system_metrics::SystemMetrics::new(
        "host",
        spec("1s", "collect = [\"uptime\"]\nbuffer = 10")
            .settings
            .get::<SystemMetricsConfig>()
            .unwrap(),
        store,
        "h",
        None,
        &Default::default(),
    )
    .unwrap();
    use vigil::jobs::Job as _;
    for _ in 0..25 {
        job.run(ctx()).await.unwrap();
    }
    assert_eq!(job.queue().len(), 10);
    assert_eq!(job.queue().dropped(), 15);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sample_still_in_progress_makes_the_next_firing_skip_not_wait() {
    let db = TestDb::new().await;
    let spec = spec("1s", "collect = [\"cpu\", \"memory\"]");
    let c: &SystemMetricsConfig = spec.settings.get().unwrap();
    let job = vigil::jobs::system_metrics::SystemMetrics::new(
        "host",
        c,
        db.store.clone(),
        "h",
        Some(Duration::from_secs(1)),
        &Default::default(),
    )
    .unwrap();
    job.inject_stall(Duration::from_secs(3));
    // The run is cut off (as its timeout would), but the blocked read goes on...
    assert!(
        tokio::time::timeout(Duration::from_millis(500), job.run(ctx()))
            .await
            .is_err()
    );
    // ...so the next firings skip, at once, saying why, rather than queue up threads.
    for _ in 0..3 {
        let started = std::time::Instant::now();
        match job.run(ctx()).await.unwrap() {
            vigil::jobs::RunOutcome::Skipped { reason } => {
                assert!(
                    reason.contains("previous sample is still being taken"),
                    "{reason}"
                )
            }
            other => panic!("expected a skip, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Once it is done, sampling goes on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        job.run(ctx()).await.unwrap(),
        vigil::jobs::RunOutcome::Completed { items: Some(1) }
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_buffer_spills_to_disk_instead_of_dropping_and_disk_is_written_first() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    // First PostgreSQL is nowhere: every write fails.
    let nowhere = Store::from_pool(
        sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(200))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap(),
    );
    let spec = spec("1s", "collect = [\"uptime\"]\nbuffer = 10");
    let place = vigil::jobs::SpoolPlace {
        dir: dir.path().to_path_buf(),
        max_bytes: 1 << 20,
    };
    let build = |store: Store| {
        let job = vigil::jobs::system_metrics::SystemMetrics::new(
            "host",
            spec.settings.get::<SystemMetricsConfig>().unwrap(),
            store,
            "h",
            None,
            &Default::default(),
        )
        .unwrap();
        job.queue().set_spool(place.open("samples-h").unwrap());
        job
    };
    let job = build(nowhere);
    for _ in 0..25 {
        job.run(ctx()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(job.queue().len() <= 10, "memory stays within the buffer");
    assert_eq!(
        job.queue().dropped(),
        0,
        "nothing dropped: the rest is on disk"
    );
    assert!(job.queue().spooled_bytes() > 0);
    job.shutdown().await;
    drop(job);

    // Then it is back: the next start writes the spooled samples, and newer ones after.
    let job = build(db.store.clone());
    job.run(ctx()).await.unwrap();
    let rows = eventually(Duration::from_secs(10), "26 samples", || async {
        let rows = samples(&db.store).await;
        (rows.len() == 26).then_some(rows)
    })
    .await;
    let times: Vec<DateTime<Utc>> = rows.iter().map(|r| r.0).collect();
    let mut sorted = times.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(times, sorted, "each once, in order");
    assert_eq!(
        job.queue().spooled_bytes(),
        0,
        "the spool is empty once written"
    );
}

/// A host's root as a container sees it mounted at /host: its init's mounts and
/// network, its processes, its name.
fn fake_host_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for pid in ["1", "2", "300", "4711"] {
        std::fs::create_dir_all(root.join("proc").join(pid)).unwrap();
    }
    // Not processes: only numeric entries count.
    std::fs::create_dir_all(root.join("proc/sys")).unwrap();
    std::fs::write(root.join("proc/self"), "").unwrap();
    std::fs::write(
        root.join("proc/1/mountinfo"),
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
         23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw\n\
         24 22 254:16 / /srv/data rw,relatime shared:3 - xfs /dev/vdb rw\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("srv/data")).unwrap();
    std::fs::create_dir_all(root.join("proc/1/net")).unwrap();
    std::fs::write(
        root.join("proc/1/net/dev"),
        "Inter-|   Receive |  Transmit\n\
         \x20face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n\
         \x20   lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0\n\
         \x20enp7s0: 9000 90 0 0 0 0 0 0 4000 40 0 0 0 0 0 0\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "far-host\n").unwrap();
    dir
}

#[test]
fn sampling_through_a_host_root_reads_that_hosts_processes_mounts_network_and_name_and_flags_hidden_mounts()
 {
    let host = fake_host_root();
    let config = SystemMetricsConfig::default();
    let mut sampler =
        vigil::jobs::system_metrics::Sampler::with_root(&config, Some(host.path())).unwrap();
    let sample = serde_json::to_value(sampler.sample()).unwrap();

    assert_eq!(sample["processes"], 4, "{sample:#}");
    // The host's mounts, from its init's mountinfo. This fake root is a plain
    // directory, not the host's / bind-mounted: its mounts are not really there, and
    // the sampler says so rather than report the numbers of the file system beneath.
    assert_eq!(sample["disks"], serde_json::json!([]), "{sample:#}");
    let unavailable: Vec<(&str, &str)> = sample["disks_unavailable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["mount"].as_str().unwrap(), d["device"].as_str().unwrap()))
        .collect();
    assert_eq!(
        unavailable,
        [("/", "/dev/vda"), ("/srv/data", "/dev/vdb")],
        "{sample:#}"
    );
    assert!(
        sample["disks_unavailable"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not visible under the host root"),
        "{sample:#}"
    );
    let interfaces: Vec<&str> = sample["network"]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        interfaces,
        ["enp7s0"],
        "loopback is left out by default: {sample:#}"
    );
    // This process's cgroup limits are not the host's.
    assert!(sample["memory"]["cgroup_limit_bytes"].is_null());
    assert_eq!(
        vigil::jobs::system_metrics::host_name(host.path()).as_deref(),
        Some("far-host")
    );
}

/// A process of this test's: killed when dropped.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_busy_process_leads_by_cpu_a_large_one_by_memory_and_command_lines_need_the_setting() {
    let marker = format!("vigil-top-test-{}", std::process::id());
    // Three spinning threads: busier than anything else here, whatever runs beside.
    let spinner = Spawned(
        std::process::Command::new("perl")
            .args([
                "-Mthreads",
                "-e",
                "threads->create(sub { 1 while 1 }) for 1..3; sleep 60",
                &marker,
            ])
            .spawn()
            .unwrap(),
    );
    // 2 GiB, every page touched, then idle: larger than anything else here, a compiler
    // running beside the tests included (clippy's rustc reached 1 GiB, and a 300 MiB
    // holder lost the lead to it).
    let mut holder = Spawned(
        std::process::Command::new("python3")
            .args([
                "-c",
                "import time\nb = bytearray(2048 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ready', flush=True)\ntime.sleep(60)",
                &marker,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Wait until its memory is touched.
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.0.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    for cmdline in [false, true] {
        let config: SystemMetricsConfig = toml::from_str(&format!(
            "collect = [\"top_processes\"]\ntop_n = 3\nprocess_cmdline = {cmdline}\n"
        ))
        .unwrap();
        let mut sampler = vigil::jobs::system_metrics::Sampler::new(&config).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let sample = serde_json::to_value(sampler.sample()).unwrap();
        let top = &sample["top_processes"];
        let by_cpu = top["by_cpu"].as_array().unwrap();
        let by_memory = top["by_memory"].as_array().unwrap();
        assert_eq!(by_cpu.len(), 3, "{top:#}");
        assert_eq!(by_cpu[0]["pid"], spinner.0.id(), "{top:#}");
        assert!(by_cpu[0]["cpu_pct"].as_f64().unwrap() > 50.0, "{top:#}");
        assert_eq!(by_cpu[0]["name"], "perl");
        assert_eq!(by_memory[0]["pid"], holder.0.id(), "{top:#}");
        let rss = by_memory[0]["rss_bytes"].as_u64().unwrap();
        assert!(rss >= 2048 << 20, "{rss}");
        let me = nix::unistd::User::from_uid(nix::unistd::getuid())
            .unwrap()
            .map_or_else(|| nix::unistd::getuid().to_string(), |u| u.name);
        assert_eq!(by_memory[0]["user"], me.as_str());
        for p in by_cpu.iter().chain(by_memory) {
            match cmdline {
                false => assert!(p.get("cmdline").is_none(), "{p}"),
                true => assert!(p["cmdline"].is_string(), "{p}"),
            }
        }
        if cmdline {
            let line = by_cpu[0]["cmdline"].as_str().unwrap();
            assert!(
                line.starts_with("perl -Mthreads -e") && line.ends_with(&marker),
                "{line}"
            );
        }
    }
}
