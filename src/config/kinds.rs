//! What configuration needs from job kinds, which live elsewhere (`jobs`): their
//! names, their default scope, and how to read a kind's `[jobs.settings]` table with
//! every problem located. Config names no kind; `jobs` implements [`Kinds`] and the
//! binary chooses the implementation, so a new kind touches `jobs/` only.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeValue;

use super::diagnostic::{Diagnostic, SourceMap};
use super::file::{Validate, check, deserialize_collecting};
use super::job::Scope;

/// The kinds a jobs file may name.
pub trait Kinds: Send + Sync {
    /// Every kind's name, in the order messages list them.
    fn names(&self) -> Vec<&'static str>;
    /// Where a job of `kind` runs when it does not say.
    fn default_scope(&self, kind: &str) -> Scope;
    /// Reads job `kind`'s `[jobs.settings]` (an empty table when absent). `None` once
    /// every problem is recorded in `reader`.
    fn read_settings(&self, kind: &str, reader: &mut SettingsReader<'_, '_>)
    -> Option<JobSettings>;
}

/// A job's `[jobs.settings]`, handed to its kind to read.
pub struct SettingsReader<'m, 'i> {
    pub(super) map: &'m SourceMap<'m>,
    pub(super) label: String,
    pub(super) value: Option<Spanned<DeValue<'i>>>,
    pub(super) diags: &'m mut Vec<Diagnostic>,
    pub(super) warnings: &'m mut Vec<Diagnostic>,
}

impl<'i> SettingsReader<'_, 'i> {
    /// Deserializes the table as `T` (every bad key reported at its position), then
    /// runs `T`'s own cross-field checks.
    pub fn read<T: Deserialize<'i> + Validate>(&mut self) -> Option<T> {
        let value = self.value.take()?;
        deserialize_collecting(self.map, &self.label, value, self.diags)
            .and_then(|c| check(self.map, &self.label, c, self.diags, self.warnings))
    }
}

/// A kind's validated settings, opaque to config: compared (so a reload can tell an
/// unchanged job), cloned cheaply, and read back by the kind that made them.
#[derive(Clone)]
pub struct JobSettings(Arc<dyn AnySettings>);

/// What settings types provide; every `Debug + PartialEq + Send + Sync` type does.
trait AnySettings: Any + Send + Sync {
    fn eq_dyn(&self, other: &dyn AnySettings) -> bool;
    fn as_any(&self) -> &dyn Any;
    fn debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
}

impl<T: Any + fmt::Debug + PartialEq + Send + Sync> AnySettings for T {
    fn eq_dyn(&self, other: &dyn AnySettings) -> bool {
        other.as_any().downcast_ref::<T>() == Some(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl JobSettings {
    pub fn new<T: Any + fmt::Debug + PartialEq + Send + Sync>(settings: T) -> Self {
        Self(Arc::new(settings))
    }

    /// The settings, if they are a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref()
    }
}

impl PartialEq for JobSettings {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_dyn(&*other.0)
    }
}

impl fmt::Debug for JobSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.debug(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_compare_by_value_and_type_and_read_back_as_what_they_are() {
        let a = JobSettings::new(vec![1, 2]);
        assert_eq!(a, JobSettings::new(vec![1, 2]));
        assert_ne!(a, JobSettings::new(vec![1, 3]));
        assert_ne!(a, JobSettings::new("[1, 2]".to_owned()));
        assert_eq!(a.get::<Vec<i32>>(), Some(&vec![1, 2]));
        assert_eq!(a.get::<String>(), None);
        assert_eq!(format!("{a:?}"), "[1, 2]");
    }
}
