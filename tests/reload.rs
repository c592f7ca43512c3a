//! Live reload of jobs.toml: a running vigil (scheduler and gateway) against a real
//! PostgreSQL, its jobs file edited on disk and reloaded through `POST /api/reload` or
//! the file watch.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{TestDb, eventually};
use reqwest::StatusCode;
use serde_json::Value;
use vigil::app::App;
use vigil::config::{self, Environment};
use vigil::store::{RunRecord, RunStatus, Trigger};

struct Live {
    db: TestDb,
    _dir: tempfile::TempDir,
    path: PathBuf,
    app: Option<App>,
    base: String,
    http: reqwest::Client,
}

impl Live {
    async fn start(jobs: &str, watch: bool) -> Self {
        let db = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let path = common::write(dir.path(), "jobs.toml", jobs);
        let env = Environment::from_pairs([
            ("PORT", "0"),
            ("VIGIL_HOST", "reload-test"),
            ("VIGIL_WATCH_CONFIG", if watch { "true" } else { "false" }),
        ]);
        let config = config::load(&path, &env, &vigil::jobs::Registry::builtin())
            .unwrap_or_else(|e| panic!("{e}"));
        let app = App::start(&config, &db.store).await.unwrap();
        let base = format!("http://{}", app.address());
        Self {
            db,
            _dir: dir,
            path,
            app: Some(app),
            base,
            http: common::http(),
        }
    }

    fn edit(&self, jobs: &str) {
        // Write then rename, as editors do, so a reader never sees half a file.
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, jobs).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    async fn reload(&self) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}/api/reload", self.base))
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn job(&self, name: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}/api/jobs/{name}", self.base))
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

fn job(name: &str, schedule: &str, command: &str) -> String {
    format!(
        "[[jobs]]\nname = \"{name}\"\nkind = \"command\"\n{schedule}\n[jobs.settings]\ncommand = {command}\n\n"
    )
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect()
}

fn scheduled(runs: &[RunRecord]) -> Vec<DateTime<Utc>> {
    runs.iter()
        .filter(|r| r.trigger == Trigger::Schedule)
        .map(|r| r.scheduled_at)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_adds_a_new_job_which_then_fires_on_schedule() {
    let a = job("a", "every = \"1h\"", "[\"true\"]");
    let live = Live::start(&a, false).await;
    assert_eq!(live.job("b").await.0, StatusCode::NOT_FOUND);

    live.edit(&format!("{a}{}", job("b", "every = \"1s\"", "[\"true\"]")));
    let (status, report) = live.reload().await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(names(&report["added"]), ["b"]);
    assert_eq!(names(&report["unchanged"]), ["a"]);
    assert!(names(&report["removed"]).is_empty() && names(&report["changed"]).is_empty());

    let (status, b) = live.job("b").await;
    assert_eq!(status, StatusCode::OK);
    assert!(b["next_fire"].is_string(), "{b}");
    eventually(
        Duration::from_secs(5),
        "b's first scheduled run",
        || async {
            let runs = live.db.runs("b").await;
            runs.iter()
                .any(|r| r.trigger == Trigger::Schedule && r.status == RunStatus::Succeeded)
                .then_some(())
        },
    )
    .await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_removes_a_job_and_lets_its_run_in_progress_finish() {
    let keep = job("keep", "every = \"1h\"", "[\"true\"]");
    let slow = job(
        "slow",
        "every = \"1h\"\ntimeout = \"30s\"",
        "[\"sh\", \"-c\", \"sleep 2\"]",
    );
    let live = Live::start(&format!("{keep}{slow}"), false).await;
    let r = live
        .http
        .post(format!("{}/api/jobs/slow/runs", live.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let run: Value = r.json().await.unwrap();
    let run_id = run["run_id"].as_str().unwrap().to_owned();

    live.edit(&keep);
    let (status, report) = live.reload().await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(names(&report["removed"]), ["slow"]);
    assert_eq!(names(&report["unchanged"]), ["keep"]);
    assert_eq!(live.job("slow").await.0, StatusCode::NOT_FOUND);
    // Removed means no more firings and no more triggers.
    let r = live
        .http
        .post(format!("{}/api/jobs/slow/runs", live.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The run that was going when the job was removed finishes and is recorded.
    let finished = eventually(
        Duration::from_secs(10),
        "the removed job's run to end",
        || async {
            let r = live
                .http
                .get(format!("{}/api/runs/{run_id}", live.base))
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap();
            // 404 until the ledger writer has the row; then running, then final.
            (v["status"].is_string() && v["status"] != "running").then_some(v)
        },
    )
    .await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let runs = live.db.runs("slow").await;
    assert_eq!(runs.len(), 1, "exactly the one run: {runs:?}");
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_reschedules_a_changed_job() {
    let live = Live::start(&job("c", "every = \"1h\"", "[\"true\"]"), false).await;
    let (_, before) = live.job("c").await;
    assert_eq!(before["schedule"], "every 1h");

    live.edit(&job("c", "cron = \"* * * * * *\"", "[\"true\"]"));
    let (status, report) = live.reload().await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(names(&report["changed"]), ["c"]);

    let (_, after) = live.job("c").await;
    assert_ne!(after["schedule"], before["schedule"], "{after}");
    assert_ne!(after["next_fire"], before["next_fire"], "{after}");
    assert!(after["applied_at"].as_str() > before["applied_at"].as_str());
    // It now fires every second.
    let fired = eventually(
        Duration::from_secs(6),
        "three firings on the new schedule",
        || async {
            let s = scheduled(&live.db.runs("c").await);
            (s.len() >= 3).then_some(s)
        },
    )
    .await;
    for pair in fired.windows(2) {
        assert_eq!((pair[1] - pair[0]).num_seconds(), 1, "{fired:?}");
    }
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_file_changes_nothing_and_every_problem_is_reported_with_its_place() {
    let good = job("tick", "every = \"1s\"", "[\"true\"]");
    let live = Live::start(&good, false).await;
    eventually(Duration::from_secs(5), "tick firing", || async {
        (!live.db.runs("tick").await.is_empty()).then_some(())
    })
    .await;
    let (_, before) = live.job("tick").await;

    // Two mistakes, and a new job that must not be half-applied.
    let bad = format!(
        "{}{}",
        job("tick", "every = \"1s\"\novrlap = \"allow\"", "[\"true\"]"),
        job("new-one", "cron = \"not a cron\"", "[\"true\"]")
    );
    live.edit(&bad);
    let (status, body) = live.reload().await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "invalid_config");
    let problems = body["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{body}");
    let file = live.path.display().to_string();
    assert_eq!(problems[0]["file"], file.as_str());
    assert_eq!(problems[0]["line"], 5, "{body}");
    assert_eq!(problems[0]["column"], 1, "{body}");
    assert!(
        problems[0]["message"].as_str().unwrap().contains("ovrlap"),
        "{body}"
    );
    assert_eq!(
        problems[0]["location"],
        format!("{file}:5:1").as_str(),
        "{body}"
    );
    assert_eq!(problems[1]["line"], 12, "{body}");
    assert!(problems[1]["job"].as_str().unwrap().contains("new-one"));

    // The old set is untouched and keeps firing.
    assert_eq!(live.job("new-one").await.0, StatusCode::NOT_FOUND);
    let (_, after) = live.job("tick").await;
    assert_eq!(after["applied_at"], before["applied_at"]);
    let count = live.db.runs("tick").await.len();
    eventually(Duration::from_secs(5), "tick to keep firing", || async {
        (live.db.runs("tick").await.len() >= count + 2).then_some(())
    })
    .await;

    // Fixing the file applies it.
    live.edit(&format!(
        "{good}{}",
        job("new-one", "every = \"1h\"", "[\"true\"]")
    ));
    let (status, report) = live.reload().await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(names(&report["added"]), ["new-one"]);
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_jobs_keep_their_timers_across_reloads() {
    let steady = job("steady", "every = \"1s\"", "[\"true\"]");
    let hourly = job("hourly", "cron = \"0 0 * * * *\"", "[\"true\"]");
    let live = Live::start(&format!("{steady}{hourly}"), false).await;
    let (_, hourly_before) = live.job("hourly").await;
    let (_, steady_before) = live.job("steady").await;

    // Reload over and over while `steady` fires, changing only a third job.
    for i in 0..6 {
        let other = job("other", &format!("every = \"{}h\"", i + 1), "[\"true\"]");
        live.edit(&format!("{steady}{hourly}{other}"));
        let (status, report) = live.reload().await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(names(&report["unchanged"]), ["steady", "hourly"]);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    let (_, hourly_after) = live.job("hourly").await;
    let (_, steady_after) = live.job("steady").await;
    assert_eq!(hourly_after["next_fire"], hourly_before["next_fire"]);
    assert_eq!(hourly_after["applied_at"], hourly_before["applied_at"]);
    assert_eq!(steady_after["applied_at"], steady_before["applied_at"]);

    // `steady` fired every second throughout: no firing lost, none doubled.
    let fired = scheduled(&live.db.runs("steady").await);
    assert!(fired.len() >= 4, "{fired:?}");
    for pair in fired.windows(2) {
        assert_eq!((pair[1] - pair[0]).num_seconds(), 1, "{fired:?}");
    }
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn saving_the_file_reloads_it_without_being_asked() {
    let a = job("a", "every = \"1h\"", "[\"true\"]");
    let live = Live::start(&a, true).await;
    live.edit(&format!(
        "{a}{}",
        job("watched", "every = \"1h\"", "[\"true\"]")
    ));
    eventually(
        Duration::from_secs(5),
        "the watcher to add the job",
        || async { (live.job("watched").await.0 == StatusCode::OK).then_some(()) },
    )
    .await;
    // An in-place write (not a rename) is seen too.
    std::fs::write(&live.path, &a).unwrap();
    eventually(
        Duration::from_secs(5),
        "the watcher to remove the job",
        || async { (live.job("watched").await.0 == StatusCode::NOT_FOUND).then_some(()) },
    )
    .await;
    live.stop().await;
}
