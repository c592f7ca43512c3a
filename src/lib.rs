//! vigil: a declarative `jobs.toml` turned into scheduled jobs whose results land in
//! PostgreSQL. Data flows one way: config → scheduler → jobs → store; telemetry (and
//! the gateway) stand beside it; alerts watch the scheduler's runs. See ARCHITECTURE.md.

pub mod alerts;
pub mod app;
pub mod config;
pub mod gateway;
pub mod jobs;
pub mod scheduler;
pub mod store;
pub mod telemetry;
