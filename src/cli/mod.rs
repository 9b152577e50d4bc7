//! The `moat` command line: parse arguments, load configuration, call into
//! `moat-ca` or `moat-proxy`, and map errors to exit codes.
//!
//! Exit codes: 0 success, 64 bad configuration or usage (before any port is
//! bound), 1 anything else.
//!
//! `args` is the command line's shape; each command's behaviour is in the
//! module named after it.

use std::process::ExitCode;

use clap::Parser;

mod args;
mod ca;
mod inject;
mod policy;
mod proxy;
mod redirect;

use args::{CaCommand, Cli, Command, LogFormat};

/// Exit code for bad configuration or usage (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Parses the command line, runs the command, and maps its outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    moat_ca::install_crypto_provider();
    match run(cli.command, cli.log_format) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(msg)) => {
            eprintln!("moat: {msg}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(err)) => {
            eprintln!("moat: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// How a command failed: bad input from the operator (exit 64), or anything else.
enum Failure {
    Config(String),
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Other(e.into())
    }
}

fn config_err(e: impl std::fmt::Display) -> Failure {
    Failure::Config(e.to_string())
}

fn run(command: Command, log_format: LogFormat) -> Result<(), Failure> {
    // The proxy and the CA server set up logging themselves, with their
    // trace exporters; every other command logs plainly.
    if !matches!(
        command,
        Command::Proxy(_) | Command::Ca(CaCommand::Serve(_))
    ) {
        init_logging(log_format, None, None);
    }
    match command {
        Command::Ca(command) => ca::run_ca(command, log_format),
        Command::Policy(command) => policy::run_policy(command),
        Command::Demo { keep_running, dir } => Ok(crate::demo::run(crate::demo::DemoOptions {
            keep_running,
            dir,
        })?),
        Command::Inject(args) => inject::run_inject(args),
        Command::Redirect(args) => redirect::run_redirect(args),
        Command::Proxy(args) => proxy::run_proxy(args, log_format),
    }
}

/// The Tokio runtime. With exactly one worker thread the current-thread
/// scheduler does the same job without the work-stealing machinery: measured
/// 12 % less CPU per proxied HTTP/1.1 request (benches/results/analysis.md).
fn runtime(worker_threads: Option<usize>) -> Result<tokio::runtime::Runtime, Failure> {
    let mut builder = match worker_threads {
        Some(n) if n <= 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    Ok(builder.enable_all().build()?)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Installs the log formatter (JSON or text, on stderr) behind a filter from
/// `RUST_LOG`, else `default_level`, else `info`, plus the OpenTelemetry
/// layer when traces are exported. The log filter does not apply to spans
/// bound for OpenTelemetry: quieter logs never lose traces. Returns a handle
/// that changes the log filter at runtime, which can never quiet the audit
/// trail (`moat_proxy::telemetry::log_filter`).
fn init_logging(
    format: LogFormat,
    default_level: Option<&str>,
    traces: Option<&moat_proxy::telemetry::Tracing>,
) -> moat_proxy::telemetry::LogLevelHandle {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, filter::Targets, fmt};
    // RUST_LOG when it parses, else the configured level, else info.
    let startup = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty() && EnvFilter::try_new(v).is_ok())
        .or_else(|| {
            default_level
                .filter(|l| EnvFilter::try_new(l).is_ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "info".to_owned());
    let (filter, handle) = moat_proxy::telemetry::log_filter(&startup);
    let logs = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
    };
    let spans = traces.map(|t| {
        t.layer().with_filter(
            Targets::new()
                .with_target("moat_proxy", tracing::Level::INFO)
                .with_target("moat_ca", tracing::Level::INFO),
        )
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .init();
    handle
}
