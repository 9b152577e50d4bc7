//! The `moat` command line: parse arguments, load configuration, call into
//! `moat-ca` or `moat-proxy`, and map errors to exit codes.
//!
//! Exit codes: 0 success, 64 bad configuration or usage (before any port is
//! bound), 1 anything else.
//!
//! `args` is the command line's shape; each command's behaviour is in the
//! module named after it.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

mod args;
mod ca;
mod inject;
mod memory;
mod nofile;
mod policy;
mod proxy;
mod redirect;

use args::{CaCommand, Cli, Command, LogFormat};

/// Exit code for bad configuration or usage (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Parses the command line, runs the command, and maps its outcome to an exit code.
pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and succeed; a usage error is bad
        // input like any other: exit 64, not clap's 2.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    moat_ca::install_crypto_provider();
    match run(cli.command, cli.log_format) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(err)) => {
            eprintln!("moat: {}", causes(&err));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(err)) => {
            eprintln!("moat: {}", causes(&err));
            ExitCode::from(1)
        }
        Err(Failure::Findings) => ExitCode::from(1),
    }
}

/// How a command failed.
enum Failure {
    /// Bad input from the operator: usage, configuration, files it names
    /// (exit 64; a restart will not fix it, so systemd does not retry).
    Config(anyhow::Error),
    /// Anything else, such as a port in use or an unreachable CA (exit 1).
    Other(anyhow::Error),
    /// The command already said what is wrong on its own output (exit 1).
    Findings,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Other(e.into())
    }
}

/// A configuration or usage error (exit 64), keeping `e`'s sources.
fn config_err<E>(e: E) -> Failure
where
    E: std::error::Error + Send + Sync + 'static,
{
    Failure::Config(anyhow::Error::new(e))
}

/// A configuration or usage error (exit 64) that is a message.
fn config_msg(msg: impl std::fmt::Display) -> Failure {
    Failure::Config(anyhow::anyhow!("{msg}"))
}

/// An error and its causes on one line, outermost first, each said once:
/// a cause whose text the message before it already contains (as in
/// `cannot read x: No such file or directory`, whose source is the I/O
/// error) is not repeated.
fn causes(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// True if binding `addr` failed for want of the capability to bind a
/// privileged port (below `net.ipv4.ip_unprivileged_port_start`, 1024 by default).
fn privileged_port(addr: std::net::SocketAddr, source: &std::io::Error) -> bool {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    source.kind() == std::io::ErrorKind::PermissionDenied && addr.port() != 0 && addr.port() < start
}

/// A listener that could not be bound. A privileged port without the
/// capability is configuration (exit 64, with the fix); anything else, such
/// as a port still in use, may pass (exit 1: systemd restarts the unit).
fn bind_failure(privileged: bool, e: impl Into<anyhow::Error>) -> Failure {
    let e = e.into();
    if privileged {
        config_msg(format!(
            "{}; ports below 1024 need CAP_NET_BIND_SERVICE: add \
             AmbientCapabilities=CAP_NET_BIND_SERVICE and CapabilityBoundingSet=CAP_NET_BIND_SERVICE \
             to the systemd unit (or `setcap cap_net_bind_service=+ep` on the binary), or use a port above 1023",
            causes(&e)
        ))
    } else {
        Failure::Other(e)
    }
}

fn run(command: Command, before: Option<LogFormat>) -> Result<(), Failure> {
    // `--log-format` after the command, else before it (the older place), else JSON.
    let format = |log: args::LogArgs| log.log_format.or(before).unwrap_or(LogFormat::Json);
    match command {
        Command::Ca(CaCommand::Serve(args)) => {
            let log_format = format(args.log);
            ca::run_ca_serve(args, log_format)
        }
        Command::Ca(command) => {
            quiet_logging();
            ca::run_ca(command)
        }
        Command::Proxy(args) => {
            let log_format = format(args.log);
            proxy::run_proxy(args, log_format)
        }
        Command::Doctor(args) => {
            // The doctor reports every finding itself, with a fix; a log
            // line would only repeat one (an unreadable JWKS file is both
            // a problem and a loader's warning), so logs only on request.
            if std::env::var_os("RUST_LOG").is_some() {
                quiet_logging();
            }
            match crate::doctor::run(&args.config, args.json, args.timeout) {
                Ok(crate::doctor::Outcome::Healthy) => Ok(()),
                Ok(crate::doctor::Outcome::Findings) => Err(Failure::Findings),
                Err(e) => Err(config_err(e)),
            }
        }
        // `moat policy` prints its findings itself: no log lines in its output.
        Command::Policy(command) => policy::run_policy(command),
        Command::Demo {
            keep_running,
            dir,
            transparent,
            log,
        } => {
            if transparent && !moat_testkit::netns::is_root() {
                return Err(config_msg(
                    "moat demo --transparent needs root: network namespaces and nftables \
                     (the plain `moat demo` does not)",
                ));
            }
            init_logging(format(log), None, None);
            Ok(crate::demo::run(crate::demo::DemoOptions {
                keep_running,
                dir,
                transparent,
            })?)
        }
        Command::Inject(args) => {
            quiet_logging();
            inject::run_inject(args)
        }
        Command::Redirect(args) => {
            init_logging(format(args.log), None, None);
            redirect::run_redirect(args)
        }
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "moat", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// Logging for the commands whose output is the point (`ca token`, `policy
/// check`, ...): warnings and errors only, as text on standard error, so
/// standard output holds the command's output alone. `RUST_LOG` still
/// raises it.
fn quiet_logging() {
    init_logging(LogFormat::Text, Some("warn"), None);
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
        // Colours only for a terminal: escape codes in a file or a
        // journal are noise.
        LogFormat::Text => fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
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
