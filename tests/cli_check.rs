//! `vigil check` / `vigil jobs` / `--version` through the real binary.

mod common;

use std::path::Path;

use common::vigil;

fn check(config: &str) -> (i32, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = vigil(root, &["check", "--config", config], &[])
        .output()
        .expect("run vigil");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_jobs_file_and_prints_three_fire_times_per_job() {
    let (code, stdout, stderr) = check("jobs.toml");
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.starts_with("NAME"), "{stdout}");
    assert!(stdout.contains("NEXT (UTC)") && stdout.contains("NEXT (JOB TIME ZONE)"));
    // Each job: one line with its name, then two more fire times.
    for job in [
        "host-metrics",
        "prune-metrics",
        "prune-run-history",
        "nightly-dump",
    ] {
        let lines: Vec<&str> = stdout.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with(job))
            .unwrap_or_else(|| panic!("{job} missing:\n{stdout}"));
        let times = lines[at..at + 3]
            .iter()
            .filter(|l| l.contains("Z  "))
            .count();
        assert_eq!(times, 3, "{job} should show 3 fire times:\n{stdout}");
    }
    // Scope: host metrics on every replica, the rest once per cluster.
    let column = stdout.lines().next().and_then(|h| h.find("SCOPE")).unwrap();
    let scope_of = |job: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(job))
            .and_then(|l| l.get(column..))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    assert_eq!(
        scope_of("host-metrics").as_deref(),
        Some("host"),
        "{stdout}"
    );
    assert_eq!(
        scope_of("prune-metrics").as_deref(),
        Some("cluster"),
        "{stdout}"
    );
    // The Berlin job shows local times with the zone's abbreviation.
    assert!(
        stdout.contains("CET") || stdout.contains("CEST"),
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("jobs.toml: 5 jobs OK"),
        "{stdout}"
    );
}

#[test]
fn the_compose_stacks_jobs_files_pass_check() {
    for (file, jobs) in [
        (
            "docker/vigil/jobs.toml",
            &["reading-sync", "prune-run-history"][..],
        ),
        ("docker/host-metrics.toml", &["host-metrics"][..]),
    ] {
        let (code, stdout, stderr) = check(file);
        assert_eq!(code, 0, "{file}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        for job in jobs {
            assert!(
                stdout.lines().any(|l| l.starts_with(job)),
                "{file}: {job} missing:\n{stdout}"
            );
        }
    }
}

/// Each bad fixture fails with exactly this message (and nothing else).
#[test]
fn check_rejects_each_bad_fixture_with_a_located_message() {
    let cases: &[(&str, &str)] = &[
        (
            "unknown_key",
            "tests/fixtures/bad/unknown_key.toml:5:1: job \"prune\": unknown field `cronn`, expected one of `name`, `kind`, `cron`, `timezone`, `every`, `enabled`, `timeout`, `retries`, `overlap`, `catch_up`, `scope`, `max_concurrency`, `jitter`, `alert`, `heartbeat_url`, `heartbeat_fail_url`, `settings`",
        ),
        (
            "both_schedules",
            "tests/fixtures/bad/both_schedules.toml:5:9: job \"prune\": a job takes exactly one of `cron` and `every`, not both",
        ),
        (
            "bad_cron",
            "tests/fixtures/bad/bad_cron.toml:4:8: job \"prune\": invalid cron expression \"0 3 * * *\": expected 6 fields (second minute hour day-of-month month day-of-week), found 5",
        ),
        (
            "bad_duration",
            "tests/fixtures/bad/bad_duration.toml:4:9: job \"prune\": invalid duration \"10 parsecs\": unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations) (write e.g. \"30s\", \"5m\", \"1h\", \"7d\")",
        ),
        (
            "duplicate_name",
            "tests/fixtures/bad/duplicate_name.toml:10:8: job \"prune\": duplicate job name \"prune\" (first defined on line 2)",
        ),
        (
            "unknown_kind",
            "tests/fixtures/bad/unknown_kind.toml:3:8: job \"prune\": unknown job kind \"retension\", expected one of \"system_metrics\", \"mongo_sync\", \"retention\", \"command\"",
        ),
        (
            "bad_timezone",
            "tests/fixtures/bad/bad_timezone.toml:5:12: job \"prune\": unknown time zone \"Europe/Atlantis\": use an IANA name such as \"UTC\" or \"Europe/Berlin\"",
        ),
        (
            "bad_identifier",
            "tests/fixtures/bad/bad_identifier.toml:7:21: job \"prune\" settings: invalid SQL identifier \"job_runs; DROP TABLE job_runs\": use `name` or `schema.name`, each 1 to 63 characters of a-z, 0-9 or '_', not starting with a digit",
        ),
        (
            "syntax_error",
            "tests/fixtures/bad/syntax_error.toml:2:14: invalid TOML: invalid basic string, expected `\"`",
        ),
    ];
    for (fixture, expected) in cases {
        let (code, stdout, stderr) = check(&format!("tests/fixtures/bad/{fixture}.toml"));
        assert_eq!(
            code, 1,
            "{fixture}: exit code\nstdout:{stdout}\nstderr:{stderr}"
        );
        assert_eq!(stdout, "", "{fixture}: nothing on stdout");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines,
            vec![*expected, "vigil: 1 problem in the configuration"],
            "{fixture}"
        );
    }
}

#[test]
fn check_reports_every_problem_of_a_file_in_one_go() {
    let (code, _, stderr) = check("tests/fixtures/bad/many_errors.toml");
    assert_eq!(code, 1);
    let f = "tests/fixtures/bad/many_errors.toml";
    let expected = [
        format!("{f}:2:8: port: invalid value \"eighty\", expected a port number from 0 to 65535"),
        format!("{f}:5:8: job \"Bad Name\": invalid job name \"Bad Name\""),
        format!("{f}:7:9: job \"Bad Name\": invalid duration \"0s\": must be more than 0"),
        format!("{f}:8:11: job \"Bad Name\": unknown variant `sometimes`"),
        format!("{f}:11:42: job \"Bad Name\" settings: invalid SQL identifier \"1st\""),
        format!("{f}:11:62: job \"Bad Name\" settings: invalid duration \"forever\""),
        format!("{f}:12:1: job \"Bad Name\" settings: unknown field `batch`"),
        format!("{f}:17:8: job \"second\": invalid cron expression \"0 0 3 * *\""),
        format!("{f}:18:12: job \"second\": unknown time zone \"Mars/Olympus\""),
        format!("{f}:19:28: job \"second\": max_attempts must be between 1 and 100, found 0"),
        format!("{f}:22:11: job \"second\" settings: `command` must name a program"),
        "vigil: 11 problems in the configuration".to_owned(),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, want) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(want.as_str()),
            "got:  {line}\nwant: {want}…"
        );
    }
}

#[test]
fn check_reports_every_alerting_problem_at_its_place() {
    let (code, _, stderr) = check("tests/fixtures/bad/bad_alerts.toml");
    assert_eq!(code, 1);
    let f = "tests/fixtures/bad/bad_alerts.toml";
    let expected = [
        format!(
            "{f}:3:7: notifier \"ops\": `url`: not an http:// or https:// URL (the value is not shown: it may hold a secret)"
        ),
        format!(
            "{f}:4:10: notifier \"ops\": `secret`: environment variable VIGIL_TEST_UNSET_SECRET_ENV is not set"
        ),
        format!(
            "{f}:7:8: notifier \"pager\": unknown notifier kind \"pigeon\", expected one of \"webhook\", \"slack\", \"command\""
        ),
        format!(
            "{f}:10:11: [alerts]: notify: unknown notifier \"opps\"; defined: \"ops\", \"pager\""
        ),
        format!(
            "{f}:16:27: job \"nightly\": unknown variant `exploded`, expected one of `failed`, `timed_out`, `abandoned`, `skipped`"
        ),
        format!("{f}:16:54: job \"nightly\": invalid duration \"15 fortnights\""),
        format!(
            "{f}:16:88: job \"nightly\": alert.notify: unknown notifier \"chat\"; defined: \"ops\", \"pager\""
        ),
        format!("{f}:17:17: job \"nightly\": `heartbeat_url`: not an http:// or https:// URL"),
        "vigil: 8 problems in the configuration".to_owned(),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, want) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(want.as_str()),
            "got:  {line}\nwant: {want}…"
        );
    }
}

#[test]
fn check_shows_each_jobs_alert_rule_and_the_notifiers_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write(
        dir.path(),
        "jobs.toml",
        r#"
[notifiers.ops]
kind = "webhook"
url = "https://hooks.example/vigil/t0k3n-in-the-path"
secret = "hmac-secret-value"

[notifiers.chat]
kind = "slack"
url = { env = "SLACK_URL_FOR_TEST" }

[alerts]
notify = ["chat"]

[[jobs]]
name = "nightly"
kind = "command"
every = "1h"
alert = { on = ["failed", "timed_out"], stale_after = "15m", late_after = "2m", notify = ["ops", "chat"] }
heartbeat_url = "https://hc-ping.example/abc-uuid"
[jobs.settings]
command = ["true"]

[[jobs]]
name = "hourly"
kind = "command"
every = "1h"
[jobs.settings]
command = ["true"]
"#,
    );
    let out = vigil(
        dir.path(),
        &["check", "--config", path.to_str().unwrap()],
        &[(
            "SLACK_URL_FOR_TEST",
            "https://hooks.slack.example/services/T/B/secretpath",
        )],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("nightly  on failed, timed_out; stale after 15m; late after 2m; notify ops, chat; heartbeat on success"),
        "{stdout}"
    );
    assert!(
        stdout.contains("hourly   on failed, timed_out; notify chat"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ops   webhook  https://hooks.example"),
        "{stdout}"
    );
    assert!(
        stdout.contains("chat  slack    https://hooks.slack.example"),
        "{stdout}"
    );
    for secret in ["t0k3n", "hmac-secret-value", "secretpath", "abc-uuid"] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
}

#[test]
fn check_names_bad_environment_variables_too() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = vigil(
        root,
        &["check"],
        &[("PORT", "http"), ("VIGIL_SHUTDOWN_GRACE", "later")],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("environment variable PORT: port: invalid value \"http\""),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "environment variable VIGIL_SHUTDOWN_GRACE: shutdown_grace: invalid duration \"later\""
        ),
        "{stderr}"
    );
}

#[test]
fn missing_jobs_file_is_a_clear_error() {
    let (code, _, stderr) = check("does/not/exist.toml");
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("does/not/exist.toml:1:1: cannot read the jobs file:"),
        "{stderr}"
    );
}

#[test]
fn jobs_prints_the_table_without_running_anything() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = vigil(root, &["jobs"], &[]).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("NAME"));
    assert!(stdout.contains("prune-metrics"));
    assert!(!stdout.contains("OK"), "jobs prints only the table");
}

#[test]
fn version_and_help_describe_the_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = vigil(root, &["--version"], &[]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vigil {}", env!("CARGO_PKG_VERSION"))
    );
    let out = vigil(root, &["--help"], &[]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "check", "jobs", "trigger", "migrate", "--config"] {
        assert!(help.contains(word), "help lacks {word}:\n{help}");
    }
}

#[test]
fn check_reports_bad_concurrency_limits_and_jitter_at_their_place() {
    let (code, _, stderr) = check("tests/fixtures/bad/bad_invocation.toml");
    assert_eq!(code, 1, "{stderr}");
    let f = "tests/fixtures/bad/bad_invocation.toml";
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!(
                "{f}:5:19: job \"forbidding\": max_concurrency limits overlapping runs: it needs overlap = \"allow\" (forbid and replace already allow one run at a time)"
            ),
            format!("{f}:14:19: job \"zero\": max_concurrency must be between 1 and 1000, found 0"),
            format!(
                "{f}:22:10: job \"jittery\": jitter 1m must be shorter than the time between firings (1m)"
            ),
            "vigil: 3 problems in the configuration".to_owned(),
        ]
    );
}
