//! The environment, read once: the process's variables over those of `./.env`, each
//! remembered with where it came from for messages.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::diagnostic::{Diagnostic, Diagnostics, Origin};

/// The process environment, captured once, with `.env` underneath it.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, (String, Origin)>,
}

impl Environment {
    /// Reads the process environment and `./.env` (real variables win over `.env`).
    pub fn capture() -> Result<Self, Diagnostics> {
        let mut env = Self::default();
        let dotenv = Path::new(".env");
        if dotenv.exists() {
            let iter = dotenvy::from_path_iter(dotenv).map_err(|e| {
                Diagnostics(vec![Diagnostic {
                    origin: Origin::File {
                        path: dotenv.into(),
                        line: 1,
                        col: 1,
                    },
                    job: None,
                    message: format!("cannot read .env: {e}"),
                }])
            })?;
            for item in iter {
                let (k, v) = item.map_err(|e| {
                    Diagnostics(vec![Diagnostic {
                        origin: Origin::File {
                            path: dotenv.into(),
                            line: 1,
                            col: 1,
                        },
                        job: None,
                        message: format!("invalid .env: {e}"),
                    }])
                })?;
                let origin = Origin::Env(format!("{k} (from .env)"));
                env.vars.insert(k, (v, origin));
            }
        }
        for (k, v) in std::env::vars_os() {
            if let (Ok(k), Ok(v)) = (k.into_string(), v.into_string()) {
                let origin = Origin::Env(k.clone());
                env.vars.insert(k, (v, origin));
            }
        }
        Ok(env)
    }

    /// An environment made of exactly these variables (tests, embedding).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let vars = pairs
            .into_iter()
            .map(|(k, v)| {
                let k = k.into();
                let origin = Origin::Env(k.clone());
                (k, (v.into(), origin))
            })
            .collect();
        Self { vars }
    }

    /// What a program vigil starts may see: the variables that make a process work
    /// (`PATH`, `HOME`, `LANG`, `LC_*`, `TZ`) and no others, or, with `inherit`,
    /// everything vigil has (its secrets included).
    pub fn for_programs(&self, inherit: bool) -> Vec<(String, String)> {
        self.vars
            .iter()
            .filter(|(k, _)| {
                inherit
                    || matches!(k.as_str(), "PATH" | "HOME" | "LANG" | "TZ")
                    || k.starts_with("LC_")
            })
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(|(v, _)| v.as_str())
    }

    pub(super) fn origin(&self, name: &str) -> Option<&Origin> {
        self.vars.get(name).map(|(_, o)| o)
    }

    /// Every variable, with where it came from.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Origin)> {
        self.vars.iter().map(|(k, (_, o))| (k.as_str(), o))
    }
}
