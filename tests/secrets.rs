//! Generated passwords in every URL setting, and vigil made to fail in every way that
//! prints a URL: no log line, ledger row, API answer or `/metrics` line shows one.
//!
//! Passwords are printable ASCII with the characters URLs give meaning to (`/ ? # @ :
//! % [ ]`) and percent-encoded bytes, put in the URLs percent-encoded (as they must be)
//! and, for the settings checks, also raw (as users paste them). The seed is printed;
//! `VIGIL_TEST_SEED` replays it.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Running, TestDb, admin_url, vigil, write};
use nix::sys::signal::Signal;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use proptest::strategy::{Strategy as _, ValueTree as _};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// What a URL's userinfo must encode: everything but the unreserved characters.
const USERINFO: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn passwords(seed: u64, n: usize) -> Vec<String> {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (seed >> ((i % 8) * 8)) as u8 ^ (i as u8);
    }
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let special = proptest::sample::select(vec![
        "/", "?", "#", "@", ":", "%", "[", "]", "%41", "%2F", "%%",
    ]);
    let strategy = (
        "[!-~]{6,14}",
        proptest::collection::vec(special, 2..5),
        proptest::collection::vec(0usize..14, 2..5),
    )
        .prop_map(|(base, specials, at)| {
            let mut p: Vec<String> = base.chars().map(String::from).collect();
            for (s, i) in specials.into_iter().zip(at) {
                p.insert(i.min(p.len()), s.to_owned());
            }
            p.concat()
        });
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// Every form a password may take in text: as written, percent-encoded (as in a URL),
/// and decoded once more (a `%41` in it read as `A`).
fn forms(password: &str) -> Vec<String> {
    let encoded = utf8_percent_encode(password, USERINFO).to_string();
    let decoded = percent_encoding::percent_decode_str(password)
        .decode_utf8_lossy()
        .into_owned();
    let mut all = vec![password.to_owned(), encoded, decoded];
    all.sort();
    all.dedup();
    all
}

fn assert_hidden(what: &str, text: &str, password: &str) {
    for form in forms(password) {
        assert!(
            !text.contains(&form),
            "{what} shows the password {password:?} (as {form:?}):\n{text}"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `postgres://<user>:<password>@<host:port>/<db>` on the test server.
fn pg_url(password_in_url: &str, db: &str) -> String {
    let admin = admin_url();
    let rest = admin.split_once("://").unwrap().1;
    let (user, hostport) = match rest.split_once('@') {
        Some((userinfo, after)) => (userinfo.split(':').next().unwrap(), after),
        None => ("postgres", rest),
    };
    let hostport = hostport.split('/').next().unwrap();
    format!("postgres://{user}:{password_in_url}@{hostport}/{db}")
}

#[tokio::test(flavor = "multi_thread")]
async fn no_password_in_any_url_setting_ever_leaves_vigil() {
    let seed: u64 = std::env::var("VIGIL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (replay with VIGIL_TEST_SEED={seed})");
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "jobs.toml",
        "[[jobs]]\nname = \"reading-sync\"\nkind = \"mongo_sync\"\nevery = \"1h\"\n\
         [jobs.settings]\ndatabase = \"obs\"\ncollection = \"readings\"\n",
    );
    let closed = free_port();
    // The shapes reported broken (a `/`, a `?` in the password), then generated ones.
    let mut all = vec!["se/cret-pw".to_owned(), "half?way#there@x".to_owned()];
    all.extend(passwords(seed, 4));
    for password in all {
        let encoded = utf8_percent_encode(&password, USERINFO).to_string();

        // 1. Start-up failures that print the database URL: a host that does not
        // exist, a refused connection, a database that is not there; and URLs that do
        // not even parse (the password pasted raw).
        let failing = [
            format!("postgres://app:{encoded}@host.invalid:5432/vigil"),
            format!("postgres://app:{encoded}@127.0.0.1:{closed}/vigil"),
            pg_url(&encoded, "vigil_no_such_database"),
            format!("postgres://app:{password}@127.0.0.1:{closed}/vigil"),
        ];
        for url in &failing {
            let out = vigil(
                dir.path(),
                &["migrate"],
                &[("DATABASE_URL", url), ("VIGIL_DB_CONNECT_TIMEOUT", "1s")],
            )
            .output()
            .unwrap();
            assert!(!out.status.success(), "{url} should fail");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("vigil"), "an error is printed: {text}");
            assert_hidden("migrate's output", &text, &password);
        }
        // Raw in MONGO_URI and LOKI_URL: refused by name, the value not shown.
        for (var, url) in [
            (
                "MONGO_URI",
                format!("mongodb://app:{password}@127.0.0.1:{closed}/"),
            ),
            (
                "LOKI_URL",
                format!("http://app:{password}@127.0.0.1:{closed}"),
            ),
        ] {
            let out = vigil(dir.path(), &["check"], &[(var, &url)])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success() {
                assert!(text.contains(var), "the setting is named: {text}");
            }
            assert_hidden("check's output", &text, &password);
        }

        // 2. A running vigil whose database, MongoDB and Loki URLs all carry the
        // password: MongoDB and Loki unreachable, errors everywhere.
        let db = TestDb::new().await;
        let port = free_port();
        let port_text = port.to_string();
        let database_url = pg_url(&encoded, &db.name);
        let mongo_uri =
            format!("mongodb://app:{encoded}@127.0.0.1:{closed}/?serverSelectionTimeoutMS=300");
        let loki_url = format!("http://app:{encoded}@127.0.0.1:{closed}");
        let token = "t-0123456789abcdef";
        let child = Running(
            vigil(
                dir.path(),
                &["run"],
                &[
                    ("DATABASE_URL", database_url.as_str()),
                    ("MONGO_URI", mongo_uri.as_str()),
                    ("LOKI_URL", loki_url.as_str()),
                    ("PORT", port_text.as_str()),
                    ("VIGIL_API_TOKEN", token),
                    ("VIGIL_WATCH_CONFIG", "false"),
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        );
        let base = format!("http://127.0.0.1:{port}");
        let http = common::http();
        common::eventually(Duration::from_secs(20), "the gateway", || {
            let r = http.get(format!("{base}/healthz"));
            async move { r.send().await.ok().map(|_| ()) }
        })
        .await;
        let mut answers = String::new();
        let run = http
            .post(format!("{base}/api/jobs/reading-sync/runs?wait=true"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(run.contains("\"failed\""), "the sync failed: {run}");
        answers.push_str(&run);
        for path in [
            "/api/jobs",
            "/api/jobs/reading-sync",
            "/api/jobs/reading-sync/runs",
            "/metrics",
            "/readyz",
            "/api/nowhere",
        ] {
            let body = http
                .get(format!("{base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            answers.push_str(&body);
        }
        assert_hidden("the API", &answers, &password);
        let ledger: Vec<Option<String>> = sqlx::query_scalar("SELECT error FROM job_runs")
            .fetch_all(db.pool())
            .await
            .unwrap();
        assert!(
            ledger.iter().flatten().any(|e| e.contains("MongoDB")),
            "{ledger:?}"
        );
        assert_hidden("the ledger", &format!("{ledger:?}"), &password);

        child.signal(Signal::SIGTERM);
        let mut child = child;
        child
            .wait_exit(Duration::from_secs(30))
            .expect("vigil exits");
        let mut logs = String::new();
        use std::io::Read as _;
        child
            .0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut logs)
            .unwrap();
        child
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut logs)
            .unwrap();
        assert!(
            logs.contains("MongoDB") && logs.contains("Loki"),
            "the failures are logged:\n{logs}"
        );
        assert_hidden("the logs", &logs, &password);
    }
}
