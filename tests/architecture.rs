//! The invariants ARCHITECTURE.md states, enforced on the source text (as
//! rust-analyzer's tidy test does): each failure names the file and line.
//!
//! - `config` imports no other module of the crate;
//! - SQL (`sqlx::query…`) only in `store/`;
//! - environment reads only in `config/`;
//! - `jobs` never imports `scheduler` or `gateway`; `store` never imports `jobs`,
//!   `scheduler` or `gateway`; `telemetry` imports nothing but `config`; `alerts` is
//!   imported only by `app` and `gateway`, and imports no job;
//! - no import circle among the crate's top-level modules;
//! - every source file opens with a `//!` comment saying what it is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out.sort();
    out
}

/// `src/jobs/command.rs` → `jobs`; `src/main.rs` → `main`.
fn module_of(path: &Path) -> String {
    let rel = path
        .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
        .unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

fn shown(path: &Path) -> String {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap()
        .display()
        .to_string()
}

/// Each line of code with its number, comments and the `#[cfg(test)]` tail left out
/// (tests may reach across modules).
fn code_lines(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        if !code.trim().is_empty() {
            out.push((i + 1, code));
        }
    }
    out
}

/// The crate's top-level modules a line refers to (`crate::x…`, `use crate::{x, y}`).
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// Modules `from` may not import, and why.
fn forbidden(from: &str) -> (&'static [&'static str], &'static str) {
    match from {
        "config" => (
            &[
                "alerts",
                "app",
                "gateway",
                "jobs",
                "scheduler",
                "store",
                "telemetry",
            ],
            "config depends on nothing else in the crate",
        ),
        "jobs" => (
            &["alerts", "app", "gateway", "scheduler"],
            "a job does not know when or why it runs, nor who asked",
        ),
        "store" => (
            &["alerts", "app", "gateway", "jobs", "scheduler", "telemetry"],
            "the store knows tables, not what uses them",
        ),
        "telemetry" => (
            &["alerts", "app", "gateway", "jobs", "scheduler", "store"],
            "telemetry stands beside the data flow",
        ),
        "scheduler" => (
            &["alerts", "app", "gateway"],
            "the scheduler is driven, it does not drive (observers register with it)",
        ),
        "alerts" => (
            &["app", "gateway", "jobs"],
            "alerts watch runs through the scheduler, whatever the jobs do",
        ),
        "gateway" => (&["app"], "the gateway is wired by app"),
        _ => (&[], ""),
    }
}

#[test]
fn modules_import_only_what_the_architecture_allows() {
    let mut problems = Vec::new();
    for path in sources() {
        let module = module_of(&path);
        let (banned, why) = forbidden(&module);
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in code_lines(&text) {
            for target in crate_refs(line) {
                if banned.contains(&target.as_str()) {
                    problems.push(format!(
                        "{}:{n}: {module} imports crate::{target} ({why})",
                        shown(&path)
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn there_is_no_import_circle_among_top_level_modules() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut witness: BTreeMap<(String, String), String> = BTreeMap::new();
    for path in sources() {
        let module = module_of(&path);
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in code_lines(&text) {
            for target in crate_refs(line) {
                if target != module && target != "self" {
                    graph
                        .entry(module.clone())
                        .or_default()
                        .insert(target.clone());
                    witness
                        .entry((module.clone(), target))
                        .or_insert_with(|| format!("{}:{n}", shown(&path)));
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == node) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            let edges: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    format!(
                        "{} → {} ({})",
                        w[0],
                        w[1],
                        witness[&(w[0].clone(), w[1].clone())]
                    )
                })
                .collect();
            panic!("import circle:\n{}", edges.join("\n"));
        }
    }
}

#[test]
fn sql_is_written_only_in_store() {
    let mut problems = Vec::new();
    for path in sources() {
        if module_of(&path) == "store" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in code_lines(&text) {
            if line.contains("sqlx::query")
                || line.contains("query_as(")
                || line.contains("query_scalar(")
            {
                problems.push(format!(
                    "{}:{n}: SQL outside store/: {}",
                    shown(&path),
                    line.trim()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_environment_is_read_only_in_config() {
    let reads = [
        "env::var(",
        "env::var_os(",
        "env::vars(",
        "env::vars_os(",
        "dotenvy::",
        "env = \"",
    ];
    let mut problems = Vec::new();
    for path in sources() {
        if module_of(&path) == "config" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in code_lines(&text) {
            if let Some(r) = reads.iter().find(|r| reads_with(line, r)) {
                problems.push(format!(
                    "{}:{n}: reads the environment ({r}) outside config/: {}",
                    shown(&path),
                    line.trim()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// `line` uses `pattern` as a word of its own: `env = "X"` (clap reading a variable),
/// not `target_env = "gnu"` (a `cfg` naming the C library).
fn reads_with(line: &str, pattern: &str) -> bool {
    line.match_indices(pattern).any(|(at, _)| {
        !line[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

#[test]
fn every_source_file_opens_with_a_module_comment() {
    let problems: Vec<String> = sources()
        .into_iter()
        .filter(|p| {
            !std::fs::read_to_string(p)
                .unwrap()
                .trim_start()
                .starts_with("//!")
        })
        .map(|p| format!("{}:1: no `//!` comment saying what this file is", shown(&p)))
        .collect();
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_checks_see_what_they_look_for() {
    // Guards against a parser that finds nothing and so passes everything.
    assert_eq!(
        crate_refs("use crate::{config::Scope, store::Store};"),
        ["config", "store"]
    );
    assert_eq!(crate_refs("let x = crate::jobs::build(a);"), ["jobs"]);
    assert_eq!(
        code_lines("a // crate::jobs\n// crate::x\n#[cfg(test)]\nb"),
        [(1, "a ")]
    );
    assert!(reads_with("#[arg(long, env = \"VIGIL_X\")]", "env = \""));
    assert!(reads_with("std::env::var(\"X\")", "env::var("));
    assert!(!reads_with("#[cfg(target_env = \"gnu\")]", "env = \""));
    assert!(sources().len() > 30, "found the sources");
    assert_eq!(
        module_of(&sources()[0]),
        "alerts",
        "the first source is src/alerts/mod.rs"
    );
}
