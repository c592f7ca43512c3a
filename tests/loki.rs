//! Direct shipping to Loki, against a receiver that decodes real Loki pushes (snappy
//! block format + protobuf PushRequest) with its own message definitions, independent
//! of the shipping code.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Running, TestDb, eventually, vigil, write};
use nix::sys::signal::Signal;
use prost::Message as _;
use serde_json::Value;
use vigil::telemetry::loki::LokiOptions;
use vigil::telemetry::metrics::Metrics;
use warp::Filter as _;

/// Loki's push protocol, written down here from its .proto, not taken from vigil.
mod wire {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<Stream>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Stream {
        #[prost(string, tag = "1")]
        pub labels: String,
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<Entry>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<Timestamp>,
        #[prost(string, tag = "2")]
        pub line: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Timestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Accept,
    Status(u16),
    Hang,
}

/// One received log line with its stream's labels.
#[derive(Debug, Clone)]
struct Received {
    labels: BTreeMap<String, String>,
    line: Value,
}

#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    got: Arc<Mutex<Vec<Received>>>,
    requests: Arc<Mutex<Vec<u16>>>,
    /// Held so the server runs: dropping it shuts the receiver down.
    _running: Arc<tokio::sync::oneshot::Sender<()>>,
}

/// `{a="x",b="y \"q\""}` → map.
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let inner = s.trim().trim_start_matches('{').trim_end_matches('}');
    let mut out = BTreeMap::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").expect("label name");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(name.trim_start_matches(',').to_owned(), value);
        rest = after[end..].trim_start_matches(',');
    }
    out
}

impl Receiver {
    async fn start(addr: SocketAddr, mode: Mode) -> Self {
        let mode = Arc::new(Mutex::new(mode));
        let got = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (m, g, r) = (mode.clone(), got.clone(), requests.clone());
        let route = warp::post()
            .and(warp::path!("loki" / "api" / "v1" / "push"))
            .and(warp::header::<String>("content-type"))
            .and(warp::body::bytes())
            .then(move |ct: String, body: bytes::Bytes| {
                let (m, g, r) = (m.clone(), g.clone(), r.clone());
                async move {
                    let mode = *m.lock().unwrap();
                    match mode {
                        Mode::Hang => {
                            futures::future::pending::<()>().await;
                            unreachable!()
                        }
                        Mode::Status(code) => {
                            r.lock().unwrap().push(code);
                            warp::http::StatusCode::from_u16(code).unwrap()
                        }
                        Mode::Accept => {
                            assert_eq!(ct, "application/x-protobuf");
                            let raw = snap::raw::Decoder::new()
                                .decompress_vec(&body)
                                .expect("snappy block");
                            let push =
                                wire::PushRequest::decode(raw.as_slice()).expect("PushRequest");
                            let mut got = g.lock().unwrap();
                            for stream in push.streams {
                                let labels = parse_labels(&stream.labels);
                                for e in stream.entries {
                                    assert!(e.timestamp.is_some_and(|t| t.seconds > 1_700_000_000));
                                    got.push(Received {
                                        labels: labels.clone(),
                                        line: serde_json::from_str(&e.line).expect("JSON line"),
                                    });
                                }
                            }
                            r.lock().unwrap().push(204);
                            warp::http::StatusCode::NO_CONTENT
                        }
                    }
                }
            });
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            warp::serve(route)
                .incoming(listener)
                .graceful(async move {
                    let _ = rx.await;
                })
                .run(),
        );
        Self {
            addr,
            mode,
            got,
            requests,
            _running: Arc::new(tx),
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

fn options(url: &str, cap: usize) -> LokiOptions {
    LokiOptions {
        push_url: LokiOptions::push_url(url),
        labels: vec![
            ("service".into(), "vigil".into()),
            ("host".into(), "test-host".into()),
        ],
        max_buffer_bytes: cap,
        request_timeout: Duration::from_millis(500),
        batch_wait: Duration::from_millis(100),
    }
}

/// Emits `n` numbered events inside a run span through a Loki-only subscriber.
fn emit(dispatch: &tracing::Dispatch, from: usize, n: usize) -> Duration {
    let t = Instant::now();
    tracing::dispatcher::with_default(dispatch, || {
        let span = tracing::info_span!(
            "run",
            job = "unit",
            run_id = "r-1",
            attempt = 1u32,
            trigger = "manual"
        );
        let _g = span.enter();
        for i in from..from + n {
            tracing::info!(seq = i as u64, "event {i}");
        }
    });
    t.elapsed()
}

fn seqs(received: &[Received]) -> Vec<u64> {
    let mut s: Vec<u64> = received
        .iter()
        .filter_map(|r| r.line["seq"].as_u64())
        .collect();
    s.sort_unstable();
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn events_in_a_run_carry_exactly_the_documented_labels_and_run_id_in_the_line() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Accept).await;
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.toml",
        r#"
[[jobs]]
name = "echoer"
kind = "command"
every = "1s"
[jobs.settings]
command = ["sh", "-c", "echo hello loki"]
"#,
    );
    let mut child = Running(
        vigil(
            dir.path(),
            &["run"],
            &[
                ("DATABASE_URL", &db.url),
                ("PORT", "0"),
                ("VIGIL_HOST", "loki-test"),
                ("LOKI_URL", &receiver.url()),
                ("VIGIL_LOKI_LABELS", "env=test"),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let hello = eventually(Duration::from_secs(20), "a job's line in Loki", || async {
        receiver
            .received()
            .into_iter()
            .find(|r| r.line["message"] == "hello loki")
    })
    .await;
    let want: BTreeMap<String, String> = [
        ("service", "vigil"),
        ("host", "loki-test"),
        ("env", "test"),
        ("level", "info"),
        ("job", "echoer"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(hello.labels, want, "exactly these labels, no ids");
    assert!(hello.line["run_id"].is_string(), "{}", hello.line);
    assert_eq!(hello.line["job"], "echoer");
    assert_eq!(hello.line["attempt"], 1);
    assert_eq!(hello.line["trigger"], "schedule");
    for field in ["ts", "level", "target", "message"] {
        assert!(hello.line.get(field).is_some(), "{field}: {}", hello.line);
    }
    // Events outside runs have no job label.
    let started = receiver
        .received()
        .into_iter()
        .find(|r| r.line["message"] == "vigil started")
        .expect("start-up event shipped");
    assert!(!started.labels.contains_key("job"), "{:?}", started.labels);
    assert_eq!(started.labels["service"], "vigil");
    // The run's end event is in the same stream as its output.
    eventually(Duration::from_secs(10), "the run's end event", || async {
        receiver.received().into_iter().find(|r| {
            r.line["message"] == "run finished" && r.line["run_id"] == hello.line["run_id"]
        })
    })
    .await;
    child.signal(Signal::SIGTERM);
    assert!(child.wait_exit(Duration::from_secs(20)).unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_429_and_500_are_retried_until_every_event_is_delivered() {
    for code in [429, 500] {
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Status(code)).await;
        let metrics = Metrics::new();
        let (subscriber, handle) =
            vigil::telemetry::loki_subscriber(options(&receiver.url(), 1 << 20), &metrics).unwrap();
        let subscriber = tracing::Dispatch::new(subscriber);
        emit(&subscriber, 0, 500);
        eventually(Duration::from_secs(10), "refused pushes", || async {
            (receiver.requests.lock().unwrap().len() >= 2).then_some(())
        })
        .await;
        assert!(receiver.received().is_empty());
        receiver.set(Mode::Accept);
        emit(&subscriber, 500, 500);
        let got = eventually(Duration::from_secs(30), "every event delivered", || async {
            let got = seqs(&receiver.received());
            (got.len() >= 1000).then_some(got)
        })
        .await;
        assert_eq!(
            got,
            (0..1000).collect::<Vec<u64>>(),
            "after {code}: each event once, none lost"
        );
        assert_eq!(handle.dropped(), 0);
        assert_eq!(metrics.loki_dropped.get(), 0);
        handle.shutdown(Duration::from_secs(2));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_loki_never_blocks_logging_and_delivery_resumes() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Hang).await;
    let metrics = Metrics::new();
    let (subscriber, handle) =
        vigil::telemetry::loki_subscriber(options(&receiver.url(), 4 << 20), &metrics).unwrap();
    let subscriber = tracing::Dispatch::new(subscriber);
    // While pushes hang, logging goes on at full speed.
    let mut slowest = Duration::ZERO;
    for round in 0..10 {
        slowest = slowest.max(emit(&subscriber, round * 100, 100));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "100 events took {slowest:?}"
    );
    assert!(receiver.received().is_empty());
    receiver.set(Mode::Accept);
    let got = eventually(
        Duration::from_secs(30),
        "delivery after the hang",
        || async {
            let mut got = seqs(&receiver.received());
            got.dedup();
            (got.len() >= 1000).then_some(got)
        },
    )
    .await;
    assert_eq!(got, (0..1000).collect::<Vec<u64>>());
    assert_eq!(handle.dropped(), 0);
    handle.shutdown(Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_batches_are_dropped_and_counted_not_retried_forever() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Status(400)).await;
    let metrics = Metrics::new();
    let (subscriber, handle) =
        vigil::telemetry::loki_subscriber(options(&receiver.url(), 1 << 20), &metrics).unwrap();
    let subscriber = tracing::Dispatch::new(subscriber);
    emit(&subscriber, 0, 50);
    eventually(
        Duration::from_secs(10),
        "the batch counted as dropped",
        || async { (handle.dropped() == 50).then_some(()) },
    )
    .await;
    assert_eq!(metrics.loki_dropped.get(), 50);
    receiver.set(Mode::Accept);
    emit(&subscriber, 50, 10);
    let got = eventually(
        Duration::from_secs(10),
        "later events delivered",
        || async {
            let got = seqs(&receiver.received());
            (got.len() >= 10).then_some(got)
        },
    )
    .await;
    assert_eq!(got, (50..60).collect::<Vec<u64>>());
    handle.shutdown(Duration::from_secs(2));
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// Loki absent for 60 s while a job logs 10,000 events a second.
#[tokio::test(flavor = "multi_thread")]
async fn loki_away_under_a_flood_caps_memory_counts_every_drop_and_recovers() {
    const CAP: usize = 8 << 20;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let stop = dir.path().join("stop");
    std::fs::write(&stop, "").unwrap();
    write(
        dir.path(),
        "jobs.toml",
        &format!(
            r#"
[[jobs]]
name = "flood"
kind = "command"
every = "1s"
[jobs.settings]
command = ["sh", "-c", "[ -f {stop} ] || yes 'flood line' | head -n 10000"]

[[jobs]]
name = "tick"
kind = "command"
every = "1s"
[jobs.settings]
command = ["true"]
"#,
            stop = stop.display()
        ),
    );
    // Loki's address, with nothing listening yet.
    let loki_addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Running(
        vigil(
            dir.path(),
            &["run"],
            &[
                ("DATABASE_URL", &db.url),
                ("PORT", "0"),
                ("LOKI_URL", &format!("http://{loki_addr}")),
                ("VIGIL_LOKI_MAX_BUFFER", &CAP.to_string()),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let pid = child.0.id();
    // Drain stdout (10,000 lines a second), keeping the gateway address and the
    // drop warnings.
    let lines = Arc::new(Mutex::new((None::<String>, 0usize, 0usize)));
    {
        let out = child.0.stdout.take().unwrap();
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut l = lines.lock().unwrap();
                l.2 += 1;
                if line.contains("\"gateway listening\"") {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    l.0 = v["address"].as_str().map(String::from);
                }
                if line.contains("dropping the oldest queued log events") {
                    l.1 += 1;
                }
            }
        });
    }
    let gateway = eventually(Duration::from_secs(20), "the gateway", || async {
        lines.lock().unwrap().0.clone()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline = rss_kib(pid);

    // The flood, with Loki away: until 600,000 events were logged (a minute at 10,000
    // a second; longer on a machine too busy to keep that pace, so the flood is the same
    // size everywhere).
    std::fs::remove_file(&stop).unwrap();
    let flood_start = chrono::Utc::now();
    let began = std::time::Instant::now();
    let mut peak = baseline;
    let events_so_far = || async {
        let text = common::http()
            .get(format!("http://{gateway}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(counter(&text, "vigil_loki_events_total"))
    };
    while began.elapsed() < Duration::from_secs(150) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(rss_kib(pid));
        if began.elapsed() >= Duration::from_secs(60)
            && events_so_far().await.is_some_and(|n| n >= 600_000)
        {
            break;
        }
    }
    let flood_s = began.elapsed().as_secs();
    println!("flood of {flood_s} s");
    let growth = (peak.saturating_sub(baseline)) * 1024;
    println!(
        "RSS baseline {} KiB, peak {} KiB, growth {} KiB; cap {} KiB",
        baseline,
        peak,
        growth / 1024,
        CAP / 1024
    );
    assert!(
        growth < CAP as u64,
        "RSS grew {growth} bytes, over the {CAP}-byte cap"
    );
    // Dropping is said at most once a minute.
    let warnings = lines.lock().unwrap().1;
    assert!(
        (1..=flood_s / 60 + 1).contains(&(warnings as u64)),
        "drop warnings in {flood_s} s: {warnings}"
    );

    // Loki comes back; the flood stops so the books can be closed.
    let receiver = Receiver::start(loki_addr, Mode::Accept).await;
    std::fs::write(&stop, "").unwrap();
    let flood_end = chrono::Utc::now();
    eventually(Duration::from_secs(30), "logs flowing again", || async {
        receiver
            .received()
            .iter()
            .any(|r| r.line["message"] == "flood line")
            .then_some(())
    })
    .await;
    // Every event is delivered or counted as dropped, exactly.
    let (events, dropped, received) =
        eventually(Duration::from_secs(60), "the queue drained", || async {
            let text = common::http()
                .get(format!("http://{gateway}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let events = counter(&text, "vigil_loki_events_total");
            let dropped = counter(&text, "vigil_loki_dropped_total");
            let received = receiver.received().len() as u64;
            (received + dropped == events).then_some((events, dropped, received))
        })
        .await;
    println!("events {events}, delivered {received}, dropped {dropped}");
    assert!(
        events >= 580_000,
        "the flood reached {events} events, not 10,000 a second"
    );
    assert!(
        dropped > 100_000,
        "a minute of flood cannot fit the cap: {dropped}"
    );
    assert!(received > 0);

    // Scheduled jobs fired on time throughout.
    let lags: Vec<(chrono::DateTime<chrono::Utc>, f64)> = sqlx::query_as(
        "SELECT scheduled_at, extract(epoch FROM started_at - scheduled_at)::float8 FROM job_runs
         WHERE job = 'tick' AND scheduled_at BETWEEN $1 AND $2 ORDER BY scheduled_at",
    )
    .bind(flood_start)
    .bind(flood_end)
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert!(
        lags.len() as u64 >= flood_s - 2,
        "tick fired {} times in ~{flood_s} s",
        lags.len()
    );
    let worst = lags.iter().map(|l| l.1).fold(0.0, f64::max);
    println!(
        "tick: {} runs during the flood, worst start lag {worst:.3} s",
        lags.len()
    );
    assert!(worst < 1.0, "a scheduled run started {worst} s late");
    child.signal(Signal::SIGTERM);
    child.wait_exit(Duration::from_secs(30));
}
