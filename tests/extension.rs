//! A fifth job kind, defined outside vigil's modules: config reads its settings with
//! located problems, and the scheduler runs it, with no change to config.

mod common;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use common::TestDb;
use serde::Deserialize;
use toml::Spanned;
use vigil::config::{self, JobSettings, Kinds as _, Scope, Validate};
use vigil::jobs::{Job, JobError, Kind, Registry, RunContext, RunOutcome};
use vigil::scheduler::{Ledger, Scheduler, ledger};
use vigil::store::RunStatus;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoSettings {
    message: Spanned<String>,
}

impl Validate for EchoSettings {
    fn validate(&self) -> Vec<(Option<Range<usize>>, String)> {
        if self.message.get_ref().is_empty() {
            vec![(
                Some(self.message.span()),
                "`message` must not be empty".into(),
            )]
        } else {
            Vec::new()
        }
    }
}

struct Echo(String);

#[async_trait::async_trait]
impl Job for Echo {
    async fn run(&self, _ctx: RunContext) -> Result<RunOutcome, JobError> {
        tracing::info!("{}", self.0);
        Ok(RunOutcome::Completed {
            items: Some(self.0.len() as u64),
        })
    }
}

const ECHO: Kind = Kind {
    name: "echo",
    default_scope: Scope::Host,
    read: |r| r.read::<EchoSettings>().map(JobSettings::new),
    build: |spec, _deps| {
        let s: &EchoSettings = vigil::jobs::settings(spec)?;
        Ok(Arc::new(Echo(s.message.get_ref().clone())))
    },
    input: vigil::jobs::InputSpec::NONE,
};

#[tokio::test(flavor = "multi_thread")]
async fn a_kind_from_outside_is_read_checked_and_run_like_the_built_in_ones() {
    let kinds = Registry::builtin().and(ECHO);
    assert_eq!(
        kinds.names(),
        [
            "system_metrics",
            "mongo_sync",
            "retention",
            "command",
            "echo"
        ]
    );
    let text = "[[jobs]]\nname = \"hello\"\nkind = \"echo\"\nevery = \"1h\"\n\
                [jobs.settings]\nmessage = \"hello, world\"\n\n\
                [[jobs]]\nname = \"true\"\nkind = \"command\"\nevery = \"1h\"\n\
                [jobs.settings]\ncommand = [\"true\"]\n";
    let file = config::parse_jobs(Path::new("t.toml"), text, &kinds).unwrap();
    assert_eq!(file.jobs[0].kind, "echo");
    assert_eq!(file.jobs[0].scope, Scope::Host, "the kind's default scope");

    // Its settings are checked where they are written, like any kind's.
    let bad = "[[jobs]]\nname = \"hello\"\nkind = \"echo\"\nevery = \"1h\"\n\
               [jobs.settings]\nmessage = \"\"\n\n\
               [[jobs]]\nname = \"noisy\"\nkind = \"echo\"\nevery = \"1h\"\n\
               [jobs.settings]\nmessage = \"hi\"\nloud = true\n\n\
               [[jobs]]\nname = \"other\"\nkind = \"ecko\"\nevery = \"1h\"\n";
    let err = config::parse_jobs(Path::new("t.toml"), bad, &kinds)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            "t.toml:6:11: job \"hello\" settings: `message` must not be empty",
            "t.toml:14:1: job \"noisy\" settings: unknown field `loud`, expected `message`",
            "t.toml:18:8: job \"other\": unknown job kind \"ecko\", expected one of \"system_metrics\", \"mongo_sync\", \"retention\", \"command\", \"echo\"",
        ],
        "{err}"
    );

    // And it runs under the scheduler's governance, recorded in the ledger.
    let db = TestDb::new().await;
    let scheduler = Scheduler::new(
        Ledger::start(
            db.store.clone(),
            ledger::DEFAULT_CAPACITY,
            Default::default(),
        ),
        "h",
    )
    .await
    .unwrap();
    let report = scheduler
        .apply(file.jobs.clone(), |spec| {
            kinds.build(spec, &db.deps()).map_err(|e| e.to_string())
        })
        .await
        .unwrap();
    assert_eq!(report.added, ["hello", "true"]);
    let result = scheduler.trigger("hello", false).unwrap().finished().await;
    assert_eq!(result.status, RunStatus::Succeeded);
    assert_eq!(result.items, Some(12));
    scheduler.shutdown(std::time::Duration::from_secs(5)).await;
    assert_eq!(db.runs("hello").await[0].kind, "echo");
}
