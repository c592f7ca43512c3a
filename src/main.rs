//! The `vigil` command line: parses arguments, then hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use vigil::config::{self, Environment};
use vigil::store::RunStatus;
use vigil::telemetry::loki::LokiOptions;
use vigil::telemetry::metrics::Metrics;
use vigil::{app, jobs, telemetry};

/// Turns a declarative jobs.toml into scheduled jobs whose results land in PostgreSQL.
#[derive(Parser)]
#[command(name = "vigil", version, about, long_about = None)]
struct Cli {
    /// The jobs file [default: $VIGIL_CONFIG, else jobs.toml].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the scheduler until SIGINT or SIGTERM (the default command).
    Run,
    /// Validate jobs.toml and the settings; print each job's next fire times. Exit 1 on any error.
    Check,
    /// Print the jobs and their next fire times, without running anything.
    Jobs,
    /// Run one job now in this process, record it in the ledger, exit non-zero if it failed.
    Trigger {
        /// The job's name.
        job: String,
        /// Run it even if it is disabled or paused.
        #[arg(long)]
        force: bool,
        /// The run's input: a JSON file, or `-` for standard input (checked against
        /// the job kind's input schema, as the API checks it).
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Take one host sample, as a system_metrics job with default settings records it
    /// (through $VIGIL_HOST_ROOT when set), and print it as JSON.
    Sample {
        /// What CPU use and rates are measured over (e.g. 2s); default: the shortest
        /// interval that gives meaningful CPU figures.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<std::time::Duration>,
    },
    /// Insert demo readings, marked pending, into MongoDB ($MONGO_URI), for the sync.
    DemoReadings {
        /// How many.
        #[arg(long, default_value_t = 500)]
        count: u32,
        #[arg(long, default_value = "observability")]
        database: String,
        #[arg(long, default_value = "readings")]
        collection: String,
        /// Insert nothing when the collection holds any document already.
        #[arg(long)]
        if_empty: bool,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil: {}", config::redact(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let env = Environment::capture()?;
    let command = cli.command.unwrap_or(Command::Run);
    // Before start-up has touched most of the binary (see src/app/memory.rs).
    let on_demand = matches!(command, Command::Run).then(app::read_code_on_demand);

    let path = cli
        .config
        .or_else(|| env.get("VIGIL_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("jobs.toml"));
    // Migrations and demo data need settings only: no jobs file is needed for them
    // (one that exists still lends its `[runner]` table, and must be valid).
    if matches!(
        command,
        Command::Migrate | Command::DemoReadings { .. } | Command::Sample { .. }
    ) {
        let settings = if path.exists() {
            match config::load(&path, &env, &jobs::Registry::builtin()) {
                Ok(c) => c.settings,
                Err(diags) => return Ok(report(&diags)),
            }
        } else {
            match config::Settings::load(&[], &env) {
                Ok(s) => s,
                Err(diags) => return Ok(report(&diags)),
            }
        };
        let telemetry = telemetry::init(
            &telemetry::LogOptions::from_env(&env, telemetry::LogTarget::Stderr)?,
            None,
            &Metrics::new(),
        )?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let result = runtime.block_on(async {
            match command {
                Command::DemoReadings {
                    count,
                    database,
                    collection,
                    if_empty,
                } => {
                    let uri = settings
                        .mongo_uri
                        .clone()
                        .unwrap_or_else(|| config::Secret::new(jobs::mongo_sync::DEFAULT_URI));
                    let n = jobs::mongo_sync::demo::insert_readings(
                        &uri,
                        &database,
                        &collection,
                        count,
                        if_empty,
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?;
                    if n == 0 && if_empty {
                        println!("{database}.{collection} holds documents already: none inserted");
                    } else {
                        println!("inserted {n} pending readings into {database}.{collection}");
                    }
                    Ok::<_, anyhow::Error>(())
                }
                Command::Sample { interval } => {
                    let config = jobs::system_metrics::SystemMetricsConfig::default();
                    let root = settings.host_root.as_deref();
                    let mut sampler = jobs::system_metrics::Sampler::with_root(&config, root)?;
                    let sample = tokio::task::spawn_blocking(move || {
                        if let Some(d) = interval {
                            std::thread::sleep(d);
                        }
                        sampler.sample()
                    })
                    .await?;
                    let host = root
                        .and_then(jobs::system_metrics::host_name)
                        .unwrap_or_else(|| settings.host.clone());
                    let out = serde_json::json!({ "host": host, "sample": sample });
                    println!("{}", serde_json::to_string_pretty(&out)?);
                    Ok(())
                }
                _ => {
                    app::migrate(&settings).await?;
                    println!("migrations applied");
                    Ok(())
                }
            }
        });
        telemetry.shutdown(LOKI_FLUSH);
        result?;
        return Ok(ExitCode::SUCCESS);
    }

    let config = match config::load(&path, &env, &jobs::Registry::builtin()) {
        Ok(c) => c,
        Err(diags) => return Ok(report(&diags)),
    };

    match command {
        Command::Check => {
            for w in &config.file.warnings {
                eprintln!("warning: {w}");
            }
            print!(
                "{}",
                app::jobs_table(&config.file.jobs, chrono::Utc::now(), &config.settings.host)
            );
            print!(
                "{}",
                app::alerts_table(&config.file.jobs, &config.file.notifiers)
            );
            println!(
                "{}: {} job{} OK",
                config.file.path.display(),
                config.file.jobs.len(),
                if config.file.jobs.len() == 1 { "" } else { "s" }
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Jobs => {
            print!(
                "{}",
                app::jobs_table(&config.file.jobs, chrono::Utc::now(), &config.settings.host)
            );
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let pauses = runtime.block_on(app::paused_jobs(&config.settings));
            print!("{}", app::pauses_table(&pauses));
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }

    let log_target = match command {
        Command::Run => telemetry::LogTarget::Stdout,
        _ => telemetry::LogTarget::Stderr,
    };
    let metrics = Metrics::new();
    // Only the long-running command ships to Loki; one-shot commands log to stderr.
    let loki = match (&command, &config.settings.loki_url) {
        (Command::Run, Some(url)) => Some(LokiOptions {
            push_url: LokiOptions::push_url(url),
            labels: [
                ("service".to_owned(), "vigil".to_owned()),
                ("host".to_owned(), config.settings.host.clone()),
            ]
            .into_iter()
            .chain(config.settings.loki_labels.iter().cloned())
            .collect(),
            max_buffer_bytes: config.settings.loki_max_buffer,
            request_timeout: LokiOptions::DEFAULT_REQUEST_TIMEOUT,
            batch_wait: LokiOptions::DEFAULT_BATCH_WAIT,
        }),
        _ => None,
    };
    let telemetry = telemetry::init(
        &telemetry::LogOptions::from_env(&env, log_target)?,
        loki,
        &metrics,
    )?;
    match on_demand {
        Some(Ok(bytes)) => tracing::debug!(bytes, "code read from the binary on demand"),
        Some(Err(e)) => {
            tracing::debug!(error = %e, "code read from the binary in read-ahead windows")
        }
        None => {}
    }
    // tokio-cron-scheduler needs the multi-threaded runtime (with one worker too).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let host_only = matches!(command, Command::Run) && app::host_only(&config);
    if let Some(n) = config.settings.worker_threads(host_only) {
        builder.worker_threads(n);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        match command {
            Command::Run => {
                app::run(config, metrics, shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Trigger { job, force, input } => {
                let input = match input {
                    Some(path) => Some(read_input(&config, &job, &path)?),
                    None => None,
                };
                let result = app::trigger(&config, &job, force, input).await?;
                println!("{}", serde_json::to_string_pretty(&result)?);
                Ok(if result.status == RunStatus::Succeeded {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::Migrate => {
                app::migrate(&config.settings).await?;
                println!("migrations applied");
                Ok(ExitCode::SUCCESS)
            }
            Command::Check
            | Command::Jobs
            | Command::DemoReadings { .. }
            | Command::Sample { .. } => Ok(ExitCode::SUCCESS),
        }
    });
    // Last: logs written during shutdown still reach Loki.
    telemetry.shutdown(LOKI_FLUSH);
    result
}

/// `vigil trigger --input FILE`: the file (or stdin for `-`) as JSON, checked against
/// the job kind's input schema.
fn read_input(
    config: &config::Config,
    job: &str,
    path: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    use std::io::Read as _;
    let (text, shown) = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the input from standard input")?;
        (text, "standard input".to_owned())
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the input file {}", path.display()))?;
        (text, path.display().to_string())
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{shown}:{}:{}: the input is not JSON: {e}",
            e.line(),
            e.column()
        )
    })?;
    let Some(spec) = config.file.jobs.iter().find(|j| j.name == job) else {
        anyhow::bail!("no job named {job:?} in {}", config.file.path.display());
    };
    jobs::Registry::builtin()
        .check_input(spec.kind, &value)
        .map_err(|e| anyhow::anyhow!("{shown}: input for job {job:?} (kind {}): {e}", spec.kind))?;
    Ok(value)
}

/// glibc gives each thread that allocates under contention an arena of its own (up to
/// eight per core) and keeps what is freed in each: resident memory then grows with
/// load, not with what vigil holds. Two arenas are plenty for vigil's few threads.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any
    // thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Prints every configuration problem, then how many: the exit code says the rest.
fn report(diags: &config::Diagnostics) -> ExitCode {
    eprintln!("{}", config::redact(&diags.to_string()));
    eprintln!(
        "vigil: {} problem{} in the configuration",
        diags.0.len(),
        if diags.0.len() == 1 { "" } else { "s" }
    );
    ExitCode::FAILURE
}

/// How long exit waits for Loki to take the last queued log events.
const LOKI_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the only way out is ctrl-c.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
