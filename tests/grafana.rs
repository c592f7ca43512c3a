//! The Grafana provisioning, checked without a Grafana: every dashboard parses, refers
//! only to provisioned datasources, every SQL query (macros and variables expanded)
//! runs against the migrated schema over seeded rows and returns what its panel needs,
//! and every LogQL selector uses labels vigil or the log agent emit.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use common::TestDb;
use serde_json::Value;
use sqlx::{Column as _, Row as _, TypeInfo as _};
use vigil::jobs::system_metrics::{Sampler, SystemMetricsConfig};
use vigil::store::{RunRecord, RunStatus, Trigger};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("grafana-provisioning")
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = root().join("dashboards/json");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The `uid:` values of the datasource provisioning.
fn datasource_uids() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("datasources/datasources.yaml")).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("uid:"))
        .map(|u| u.trim().trim_matches('"').to_owned())
        .collect()
}

/// Labels on streams in Loki: vigil's own (src/telemetry/loki.rs) and the agent's
/// (docker/alloy/config.alloy, docker/promtail/config.yaml).
fn emitted_labels() -> BTreeSet<String> {
    let mut labels: BTreeSet<String> = ["service", "host", "level", "job"].map(String::from).into();
    for config in ["docker/alloy/config.alloy", "docker/promtail/config.yaml"] {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(config)).unwrap();
        for line in text.lines() {
            let line = line.trim();
            let value = line.strip_prefix("target_label").map(|r| {
                r.trim_start_matches([' ', '=', ':'])
                    .trim()
                    .trim_matches('"')
            });
            if let Some(v) = value {
                labels.insert(v.to_owned());
            }
        }
    }
    labels
}

/// Every `{…}` stream selector of a LogQL expression, as label names.
fn selector_labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        let inner = &rest[start + 1..start + end];
        for matcher in inner.split(',') {
            let name: String = matcher
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
        rest = &rest[start + end + 1..];
    }
    out
}

#[test]
fn every_dashboard_parses_has_a_stable_uid_and_uses_provisioned_datasources() {
    let uids = datasource_uids();
    assert_eq!(
        uids,
        ["vigil-loki", "vigil-postgres"].map(String::from).into()
    );
    let all = dashboards();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "containers.json",
            "host-metrics.json",
            "jobs.json",
            "logs.json",
            "reading-sync.json"
        ]
    );
    let mut dashboard_uids = BTreeSet::new();
    for (name, d) in &all {
        let uid = d["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no uid"));
        assert!(uid.starts_with("vigil-"), "{name}: {uid}");
        assert!(
            dashboard_uids.insert(uid.to_owned()),
            "{name}: duplicate uid {uid}"
        );
        let panels = d["panels"].as_array().unwrap();
        assert!(!panels.is_empty(), "{name}: no panels");
        let mut ids = BTreeSet::new();
        for p in panels {
            assert!(
                ids.insert(p["id"].as_i64().unwrap()),
                "{name}: duplicate panel id"
            );
            let ds = p["datasource"]["uid"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: panel without datasource"));
            assert!(
                uids.contains(ds),
                "{name}/{}: unknown datasource {ds}",
                p["title"]
            );
            for t in p["targets"].as_array().unwrap() {
                let ds = t["datasource"]["uid"].as_str().unwrap();
                assert!(
                    uids.contains(ds),
                    "{name}/{}: unknown datasource {ds}",
                    p["title"]
                );
            }
        }
        for v in d["templating"]["list"].as_array().unwrap() {
            if let Some(ds) = v["datasource"]["uid"].as_str() {
                assert!(
                    uids.contains(ds),
                    "{name}: variable {} uses {ds}",
                    v["name"]
                );
            }
        }
    }
}

#[test]
fn the_required_panels_exist() {
    let all: HashMap<String, Value> = dashboards()
        .into_iter()
        .map(|(_, d)| (d["uid"].as_str().unwrap().to_owned(), d))
        .collect();
    let titles = |uid: &str| -> Vec<String> {
        all[uid]["panels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["title"].as_str().unwrap().to_owned())
            .collect()
    };
    for t in [
        "CPU %",
        "Memory %",
        "Network",
        "Disk used % by mount",
        "Top processes by CPU",
        "Processes at the end of the range",
        "Pressure (some, avg10)",
        "Disk operations and busy time",
    ] {
        assert!(titles("vigil-host-metrics").contains(&t.to_owned()), "{t}");
    }
    for t in [
        "Container CPU %",
        "Container memory",
        "Container I/O",
        "Heaviest containers now",
    ] {
        assert!(titles("vigil-containers").contains(&t.to_owned()), "{t}");
    }
    // Job runs marked on the host's graphs.
    let annotations = all["vigil-host-metrics"]["annotations"]["list"]
        .as_array()
        .unwrap();
    assert!(
        annotations.iter().any(|a| a["name"] == "Job runs"),
        "{annotations:?}"
    );
    for t in [
        "Runs by status",
        "Duration p50 and p95",
        "Last success per job",
        "Failures",
        "Logs of the selected jobs (and run)",
        "Health",
        "Resources per run",
        "Heaviest runs",
    ] {
        assert!(titles("vigil-jobs").contains(&t.to_owned()), "{t}");
    }
    for t in ["Documents synced", "Rejects", "Latest rejects"] {
        assert!(titles("vigil-reading-sync").contains(&t.to_owned()), "{t}");
    }
    let vars: Vec<&str> = all["vigil-host-metrics"]["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["host"]);
}

#[test]
fn every_logql_selector_uses_labels_that_are_emitted() {
    let emitted = emitted_labels();
    for l in ["container", "compose_service", "compose_project"] {
        assert!(
            emitted.contains(l),
            "the agent configs should emit {l}: {emitted:?}"
        );
    }
    let mut checked = 0;
    for (name, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                if let Some(expr) = t["expr"].as_str() {
                    let labels = selector_labels(expr);
                    assert!(!labels.is_empty(), "{name}: no selector in {expr}");
                    for l in labels {
                        assert!(
                            emitted.contains(&l),
                            "{name}/{}: label {l} is never emitted",
                            p["title"]
                        );
                    }
                    checked += 1;
                }
            }
        }
        for v in d["templating"]["list"].as_array().unwrap() {
            if let Some(label) = v["query"]["label"].as_str() {
                assert!(emitted.contains(label), "{name}: variable on {label}");
            }
        }
    }
    assert!(checked >= 5, "{checked} LogQL queries checked");
}

/// Grafana's macros and the dashboards' variables, as Grafana would expand them.
fn expand(sql: &str, from: DateTime<Utc>, to: DateTime<Utc>, interval_ms: i64) -> String {
    let ts = |t: DateTime<Utc>| format!("'{}'", t.to_rfc3339());
    let mut out = sql.to_owned();
    while let Some(start) = out.find("$__timeFilter(") {
        let end = start + out[start..].find(')').unwrap();
        let column = out[start + "$__timeFilter(".len()..end].trim().to_owned();
        out.replace_range(
            start..=end,
            &format!("{column} BETWEEN {} AND {}", ts(from), ts(to)),
        );
    }
    out.replace("$__timeFrom()", &ts(from))
        .replace("$__timeTo()", &ts(to))
        .replace("$__interval_ms", &interval_ms.to_string())
        .replace("$__interval", &format!("{}ms", interval_ms))
        // Single-value variables are inserted raw, multi-value ones quoted and joined.
        .replace("$host", "host-a")
        .replace("$job", "'host-metrics','reading-sync','prune','backup'")
}

async fn seed(db: &TestDb) {
    // Real samples of this machine, for two hosts, over the last two hours.
    let mut sampler = Sampler::new(&SystemMetricsConfig::default()).unwrap();
    let mut sample = serde_json::to_value(sampler.sample()).unwrap();
    // Containers as a Docker host's samples hold them (this machine may run none).
    sample["containers"] = serde_json::json!([
        {"id": "0123456789ab", "name": "shop-web-1", "runtime": "docker",
         "compose_project": "shop", "compose_service": "web", "cpu_pct": 35.5,
         "memory_used_bytes": 104857600, "memory_limit_bytes": 536870912,
         "io_read_bytes_per_s": 1024.0, "io_written_bytes_per_s": 2048.0},
        {"id": "ba9876543210", "name": "shop-db-1", "runtime": "docker",
         "compose_project": "shop", "compose_service": "db", "cpu_pct": 4.0,
         "memory_used_bytes": 209715200, "memory_limit_bytes": null,
         "io_read_bytes_per_s": 0.0, "io_written_bytes_per_s": 4096.0}
    ]);
    let sample = sample.to_string();
    let now = Utc::now();
    for host in ["host-a", "host-b"] {
        let rows: Vec<(DateTime<Utc>, &str)> = (0..720)
            .map(|i| (now - Duration::seconds(10 * i), sample.as_str()))
            .collect();
        db.store.insert_samples(host, &rows).await.unwrap();
    }
    let mut runs = Vec::new();
    for (i, (job, kind, status, error)) in [
        ("host-metrics", "system_metrics", RunStatus::Succeeded, None),
        ("reading-sync", "mongo_sync", RunStatus::Succeeded, None),
        (
            "reading-sync",
            "mongo_sync",
            RunStatus::Failed,
            Some("MongoDB unreachable"),
        ),
        (
            "prune",
            "retention",
            RunStatus::TimedOut,
            Some("timed out after 1s"),
        ),
        ("prune", "retention", RunStatus::Skipped, Some("overlap")),
        ("backup", "command", RunStatus::Succeeded, None),
    ]
    .into_iter()
    .enumerate()
    {
        for k in 0..20 {
            let at = now - Duration::minutes(5 * k + i as i64);
            runs.push(RunRecord {
                id: uuid::Uuid::now_v7(),
                job: job.into(),
                kind: kind.into(),
                trigger: Trigger::Schedule,
                attempt: 1,
                retry_of: None,
                scheduled_at: at,
                started_at: at,
                finished_at: Some(at + Duration::milliseconds(150 + k * 10)),
                status,
                items: Some(k),
                error: error.map(String::from),
                host: "host-a".into(),
                permanent: false,
                retry_after_ms: None,
                input: None,
                output: None,
                resources: (kind == "command").then_some(vigil::store::RunResources {
                    cpu_user_s: 1.5 + k as f64,
                    cpu_system_s: 0.25,
                    peak_rss_bytes: 200 << 20,
                    read_bytes: 4096,
                    written_bytes: 1 << 20,
                    measured_by: vigil::store::MeasuredBy::Cgroup,
                }),
            });
        }
    }
    db.store.upsert_runs(&runs).await.unwrap();
    // Job health as vigil keeps it, and an open incident.
    for job in ["host-metrics", "reading-sync", "prune"] {
        db.store.seed_job_health(job, "", None).await.unwrap();
    }
    sqlx::query(
        "INSERT INTO alert_incidents (id, job, scope_key, kind, opened_at, opened_by, summary,
             details, notify)
         VALUES ($1, 'prune', '', 'failed', now() - interval '5 minutes', 'host-a',
                 'timed_out after 1 attempt', '{}', '{ops}')",
    )
    .bind(uuid::Uuid::now_v7())
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO reading_analytics (source_id, payload, occurred_at, synced_at)
         SELECT 'r-' || g, jsonb_build_object('v', g), now() - g * interval '1 minute', now() - g * interval '30 seconds'
         FROM generate_series(1, 200) g",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sync_rejects (job, mongo_id, source_id, error, document, at)
         SELECT 'reading-sync', 'm-' || g, NULL, 'no `reading_id` field', '{}'::jsonb, now() - g * interval '3 minutes'
         FROM generate_series(1, 20) g",
    )
    .execute(db.pool())
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_sql_query_runs_on_the_schema_and_returns_what_its_panel_needs() {
    let db = TestDb::new().await;
    seed(&db).await;
    let to = Utc::now();
    let from = to - Duration::hours(6);
    let mut checked = 0;
    for (name, d) in dashboards() {
        for v in d["templating"]["list"].as_array().unwrap() {
            if let Some(q) = v["query"].as_str()
                && v["datasource"]["uid"] == "vigil-postgres"
            {
                let rows = sqlx::query(q)
                    .fetch_all(db.pool())
                    .await
                    .unwrap_or_else(|e| panic!("{name}: variable {}: {e}", v["name"]));
                assert!(
                    !rows.is_empty(),
                    "{name}: variable {} has no values",
                    v["name"]
                );
            }
        }
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let Some(raw) = t["rawSql"].as_str() else {
                    continue;
                };
                // Both sides of the rollup/raw switch: long and short bins.
                for interval_ms in [300_000, 10_000] {
                    let sql = expand(raw, from, to, interval_ms);
                    let what = format!("{name} / {} / {} @{interval_ms}ms", p["title"], t["refId"]);
                    let rows = sqlx::query(&sql)
                        .fetch_all(db.pool())
                        .await
                        .unwrap_or_else(|e| panic!("{what}: {e}\n{sql}"));
                    assert!(
                        !rows.is_empty(),
                        "{what}: no rows over the seeded data\n{sql}"
                    );
                    let columns = rows[0].columns();
                    if t["format"] == "time_series" {
                        assert_eq!(columns[0].name(), "time", "{what}: first column");
                        assert_eq!(columns[0].type_info().name(), "TIMESTAMPTZ", "{what}");
                        let numeric = columns.iter().skip(1).filter(|c| {
                            matches!(
                                c.type_info().name(),
                                "INT2" | "INT4" | "INT8" | "FLOAT4" | "FLOAT8" | "NUMERIC"
                            )
                        });
                        assert!(numeric.count() >= 1, "{what}: no value column");
                        // Each value column has at least one value.
                        for c in columns.iter().skip(1).filter(|c| c.name() != "metric") {
                            let any = rows.iter().any(|r| {
                                r.try_get::<Option<f64>, _>(c.ordinal())
                                    .ok()
                                    .flatten()
                                    .is_some()
                                    || r.try_get::<Option<i64>, _>(c.ordinal())
                                        .ok()
                                        .flatten()
                                        .is_some()
                            });
                            assert!(any, "{what}: column {} is always null", c.name());
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 30, "{checked} query runs");

    // Annotations: Grafana reads time, timeend, text and tags.
    let mut annotations = 0;
    for (name, d) in dashboards() {
        for a in d["annotations"]["list"].as_array().unwrap() {
            let Some(raw) = a["target"]["rawSql"].as_str() else {
                continue;
            };
            assert_eq!(a["datasource"]["uid"], "vigil-postgres", "{name}");
            let sql = expand(raw, from, to, 10_000);
            let rows = sqlx::query(&sql)
                .fetch_all(db.pool())
                .await
                .unwrap_or_else(|e| panic!("{name} / {}: {e}\n{sql}", a["name"]));
            assert!(!rows.is_empty(), "{name} / {}: no rows\n{sql}", a["name"]);
            let columns: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
            assert_eq!(columns, ["time", "timeend", "text", "tags"], "{name}");
            let text: String = rows[0].get("text");
            assert!(
                !text.starts_with("host-metrics"),
                "host samples are not marked"
            );
            annotations += 1;
        }
    }
    assert_eq!(annotations, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_provisioned_alert_rule_queries_the_schema_and_feeds_its_condition() {
    let path = root().join("alerting/vigil-rules.json");
    let rules: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert_eq!(rules["apiVersion"], 1);
    let uids = datasource_uids();
    let boards: HashMap<String, Value> = dashboards()
        .into_iter()
        .map(|(_, d)| (d["uid"].as_str().unwrap().to_owned(), d))
        .collect();
    let db = TestDb::new().await;
    seed(&db).await;
    let mut titles = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let title = rule["title"].as_str().unwrap();
            titles.push(title.to_owned());
            assert!(
                rule["uid"].as_str().unwrap().starts_with("vigil-"),
                "{title}"
            );
            let data = rule["data"].as_array().unwrap();
            let refs: Vec<&str> = data.iter().map(|d| d["refId"].as_str().unwrap()).collect();
            assert!(
                refs.contains(&rule["condition"].as_str().unwrap()),
                "{title}: condition"
            );
            // The dashboard and panel it links to exist.
            let board = &boards[rule["dashboardUid"].as_str().unwrap()];
            assert!(
                board["panels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["id"] == rule["panelId"]),
                "{title}: panel {}",
                rule["panelId"]
            );
            for d in data {
                let ds = d["datasourceUid"].as_str().unwrap();
                if ds == "__expr__" {
                    let input = d["model"]["expression"].as_str().unwrap();
                    assert!(refs.contains(&input), "{title}: expression on {input}");
                    continue;
                }
                assert!(uids.contains(ds), "{title}: datasource {ds}");
                let sql = d["model"]["rawSql"].as_str().unwrap();
                let rows = sqlx::query(sql)
                    .fetch_all(db.pool())
                    .await
                    .unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
                assert!(!rows.is_empty(), "{title}: no rows over the seeded data");
                // One series per job: a text label column and a numeric value.
                let columns = rows[0].columns();
                assert_eq!(columns.len(), 2, "{title}");
                assert_eq!(columns[0].type_info().name(), "TEXT", "{title}: label");
                assert_eq!(columns[1].type_info().name(), "FLOAT8", "{title}: value");
                for r in &rows {
                    let v: Option<f64> = r.try_get(1).unwrap();
                    assert!(v.is_some(), "{title}: a null value");
                }
            }
        }
    }
    assert_eq!(
        titles,
        [
            "vigil: job failures",
            "vigil: job without a success for an hour"
        ]
    );
    // The failures rule counts only a run's last attempt: the seeded failures and
    // time-outs, not retries still to come.
    let failures: Vec<(String, f64)> = sqlx::query_as(
        rules["groups"][0]["rules"][0]["data"][0]["model"]["rawSql"]
            .as_str()
            .unwrap(),
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let jobs: Vec<&str> = failures.iter().map(|(j, _)| j.as_str()).collect();
    assert!(
        jobs.contains(&"reading-sync") && jobs.contains(&"prune"),
        "{failures:?}"
    );
}
