//! Located configuration errors: every problem a user can cause names where it is.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A position in a file; `line` and `col` are 1-based, `col` counts characters.
    File {
        path: PathBuf,
        line: usize,
        col: usize,
    },
    /// An environment variable (or a line of `.env`, which sets one).
    Env(String),
    /// Nowhere in particular (a built-in default, or the file as a whole).
    Unknown,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, col } => write!(f, "{}:{line}:{col}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Unknown => f.write_str("configuration"),
        }
    }
}

/// One problem in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub origin: Origin,
    /// The job the problem belongs to, as the user would recognise it.
    pub job: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.origin)?;
        if let Some(job) = &self.job {
            write!(f, "{job}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found, reported together so a user fixes them in one go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl Diagnostics {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Maps byte offsets of one source text to `file:line:col` origins.
#[derive(Debug, Clone)]
pub struct SourceMap<'a> {
    path: &'a Path,
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> SourceMap<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            path,
            text,
            line_starts,
        }
    }

    pub fn path(&self) -> &Path {
        self.path
    }

    pub fn origin(&self, offset: usize) -> Origin {
        let offset = offset.min(self.text.len());
        let line_idx = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = self.line_starts[line_idx];
        // Columns count characters, as editors do; a non-boundary offset is snapped back.
        let mut end = offset;
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let col = self.text[start..end].chars().count() + 1;
        Origin::File {
            path: self.path.to_path_buf(),
            line: line_idx + 1,
            col,
        }
    }

    pub fn origin_of(&self, span: &Range<usize>) -> Origin {
        self.origin(span.start)
    }

    pub fn diagnostic(
        &self,
        span: Option<Range<usize>>,
        job: Option<String>,
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            origin: span.map_or(Origin::Unknown, |s| self.origin_of(&s)),
            job,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_one_based_lines_and_character_columns() {
        let text = "a = 1\nnamé = \"x\"\n";
        let map = SourceMap::new(Path::new("jobs.toml"), text);
        assert_eq!(map.origin(0).to_string(), "jobs.toml:1:1");
        assert_eq!(map.origin(6).to_string(), "jobs.toml:2:1");
        // 'é' is two bytes but one column.
        let eq = text.find(" = \"x").unwrap();
        assert_eq!(map.origin(eq).to_string(), "jobs.toml:2:5");
    }

    #[test]
    fn diagnostics_print_one_per_line_with_job() {
        let d = Diagnostics(vec![
            Diagnostic {
                origin: Origin::Env("PORT".into()),
                job: None,
                message: "not a port".into(),
            },
            Diagnostic {
                origin: Origin::File {
                    path: "j.toml".into(),
                    line: 3,
                    col: 9,
                },
                job: Some("job \"a\"".into()),
                message: "bad".into(),
            },
        ]);
        assert_eq!(
            d.to_string(),
            "environment variable PORT: not a port\nj.toml:3:9: job \"a\": bad"
        );
    }
}
