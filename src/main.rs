//! The `moat` command line: parse arguments, load configuration, call into
//! `moat-ca` or `moat-proxy`, and map errors to exit codes.
//!
//! Exit codes: 0 success, 64 bad configuration or usage (before any port is
//! bound), 1 anything else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod demo;
mod inject;
mod revoke;

/// Exit code for bad configuration or usage (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "mTLS sidecar proxy and workload certificate authority"
)]
struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json, env = "MOAT_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// The workload certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run the sidecar proxy.
    Proxy(ProxyArgs),
    /// Check, explain and test route authorization policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the demo: a CA, two services with sidecars, allowed and denied traffic, on loopback.
    Demo {
        /// Leave everything running afterwards, for you to curl (Ctrl-C stops it).
        #[arg(long)]
        keep_running: bool,
        /// Where to keep the CA, configuration and logs (a temporary directory if absent).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Add the moat sidecar to Kubernetes manifests (the manifests on stdout, what was done on stderr).
    Inject(InjectArgs),
    /// Install the transparent-mode redirect rules (nftables) in this network
    /// namespace, replacing earlier ones; or print or remove them. Needs CAP_NET_ADMIN.
    Redirect(RedirectArgs),
}

/// `moat redirect`: values from `[redirect]` of `--config`, each flag overriding its field.
/// (Lists are written `::std::vec::Vec` so that clap takes one comma-separated value.)
#[derive(Args)]
struct RedirectArgs {
    /// The proxy's configuration file: its `[redirect]` (required), and
    /// moat's own ports (`[admin]`, `[[inbound]] listen`), never redirected.
    #[arg(long, env = "MOAT_CONFIG")]
    config: Option<PathBuf>,
    /// Print the rules (nft syntax, for `nft -f`) instead of installing them.
    #[arg(long)]
    dry_run: bool,
    /// Remove the rules (the table inet moat).
    #[arg(long)]
    cleanup: bool,
    /// Port of moat's transparent inbound listener [default: 15006].
    #[arg(long)]
    inbound_listener_port: Option<u16>,
    /// Port of moat's transparent outbound listener [default: 15001].
    #[arg(long)]
    outbound_listener_port: Option<u16>,
    /// Inbound ports to redirect: "all" [default], or a comma-separated list ("" for none).
    #[arg(long)]
    inbound_ports: Option<moat_proxy::redirect::InboundPorts>,
    /// With --inbound-ports all: ports to leave alone (comma-separated).
    #[arg(long, value_parser = moat_proxy::redirect::parse_ports)]
    skip_inbound_ports: Option<::std::vec::Vec<u16>>,
    /// Leave outbound traffic alone.
    #[arg(long)]
    no_outbound: bool,
    /// Outbound destination ports to leave alone (comma-separated).
    #[arg(long, value_parser = moat_proxy::redirect::parse_ports)]
    skip_outbound_ports: Option<::std::vec::Vec<u16>>,
    /// Outbound destination addresses or CIDRs to leave alone (comma-separated).
    #[arg(long, value_parser = parse_cidrs)]
    skip_outbound_cidrs: Option<::std::vec::Vec<moat_proxy::redirect::Cidr>>,
    /// The UID (or user name) moat runs as; its connections are never redirected [default: 65532].
    #[arg(long)]
    proxy_uid: Option<moat_proxy::redirect::Owner>,
    /// Also exempt connections of this GID (or group name).
    #[arg(long)]
    proxy_gid: Option<moat_proxy::redirect::Owner>,
    /// moat's admin port, never redirected [default: from --config, else 9901].
    #[arg(long)]
    admin_port: Option<u16>,
}

#[derive(Args)]
struct InjectArgs {
    /// A YAML or JSON file (one or more YAML documents); `-` or absent reads standard input.
    file: Option<PathBuf>,
    /// The moat image for the sidecar.
    #[arg(long, default_value_t = inject::Options::default().image)]
    image: String,
    /// The sidecar's mTLS port (the `[[inbound]] listen` port in proxy.toml).
    #[arg(long, default_value_t = 15443)]
    inbound_port: u16,
    /// The sidecar's admin port (`[admin] listen` in proxy.toml), probed by the kubelet.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// The projected token's audience; must match the CA's `[kubernetes] audience`.
    #[arg(long, default_value = "moat-ca")]
    audience: String,
    /// The ConfigMap that holds the trust bundle (`bundle.pem`).
    #[arg(long, default_value = "moat-bundle")]
    bundle_config_map: String,
    /// Replace moat's own init container and volumes where they differ from
    /// what these flags make (a new --image, --audience, ...), and move the
    /// sidecar first; without it only what is missing is added.
    #[arg(long)]
    upgrade: bool,
    /// Print only warnings on standard error, not what was done to each document.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files; prints file:line:column: message for each problem (exit 64).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Say which route decides a request, and why.
    Explain {
        file: PathBuf,
        /// The caller's SPIFFE ID.
        #[arg(long)]
        peer: String,
        #[arg(long)]
        method: String,
        /// The raw request path, possibly with a query.
        #[arg(long)]
        path: String,
        #[arg(long)]
        host: Option<String>,
        /// A bearer token, verified with the policy's keys.
        #[arg(long, conflicts_with = "claims")]
        jwt: Option<String>,
        /// A JSON object of claims standing in for a verified token.
        #[arg(long)]
        claims: Option<String>,
    },
    /// Run a file of expected decisions against a policy (exit 1 if any fails).
    Test { file: PathBuf, cases: PathBuf },
}

/// Where a CA's keys and its configuration are.
#[derive(Args)]
struct CaLocation {
    /// The CA directory: keys, and the SQLite state unless ca.toml chooses PostgreSQL.
    #[arg(long)]
    dir: PathBuf,
    /// The CA's configuration file ([store], [kubernetes], limits). Defaults to DIR/ca.toml if present.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new CA (root key and certificate, token key, state store) in DIR.
    Init {
        #[command(flatten)]
        at: CaLocation,
        /// The SPIFFE trust domain, e.g. example.org.
        #[arg(long)]
        trust_domain: String,
        /// Lifetime of the root certificate (e.g. 365d, 720h).
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        root_ttl: Duration,
    },
    /// Serve the CA's HTTPS API.
    Serve(ServeArgs),
    /// Mint a single-use join token for a VM workload; prints the token alone.
    Token {
        #[command(flatten)]
        at: CaLocation,
        /// The SPIFFE ID the token's holder will get.
        #[arg(long)]
        id: String,
        /// How long the token may be used.
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Issue a certificate and key directly to files (for file-managed identities).
    Issue {
        #[command(flatten)]
        at: CaLocation,
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Where to write the certificate chain (PEM, leaf first).
        #[arg(long)]
        cert_out: PathBuf,
        /// Where to write the private key (PEM, mode 0600).
        #[arg(long)]
        key_out: PathBuf,
    },
    /// Print the trust bundle (PEM).
    Bundle {
        #[command(flatten)]
        at: CaLocation,
    },
    /// Rotate the CA: --prepare, then --activate, then --retire. Done once,
    /// against the store; every replica follows within seconds.
    Rotate {
        #[command(flatten)]
        at: CaLocation,
        #[command(flatten)]
        step: RotateStep,
        /// Lifetime of the new root (with --prepare).
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        root_ttl: Duration,
    },
    /// Revoke a certificate (--serial) or an identity (--id), or --list
    /// what is revoked. Renewals and tokens of it are refused at once;
    /// every sidecar closes its connections within seconds.
    Revoke {
        #[command(flatten)]
        at: CaLocation,
        #[command(flatten)]
        args: revoke::RevokeArgs,
    },
    /// Undo `moat ca revoke`.
    Unrevoke {
        #[command(flatten)]
        at: CaLocation,
        #[command(flatten)]
        args: revoke::UnrevokeArgs,
    },
    /// Bring the store's schema up to date (and nothing else), or copy a
    /// SQLite CA's whole state into the PostgreSQL store ca.toml names.
    Migrate {
        #[command(flatten)]
        at: CaLocation,
        /// A SQLite CA to copy from: its ca.db, or the directory holding it.
        #[arg(long)]
        from_sqlite: Option<PathBuf>,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct RotateStep {
    /// Add a new root to the bundle; the current root keeps signing.
    #[arg(long)]
    prepare: bool,
    /// Make the prepared root sign; the old root stays in the bundle.
    #[arg(long)]
    activate: bool,
    /// Drop the old root from the bundle.
    #[arg(long)]
    retire: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    at: CaLocation,
    /// Address to listen on (port 0 picks a free port; the bound address is logged).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: std::net::SocketAddr,
    /// DNS names and IP addresses for the CA's own serving certificate.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Plain-HTTP admin listener for /metrics, /live and /ready (loopback by default; "off" disables).
    #[arg(long, default_value = "127.0.0.1:9902")]
    admin: String,
}

#[derive(Args)]
struct ProxyArgs {
    /// The proxy's configuration file (TOML).
    #[arg(long, env = "MOAT_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
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
        Command::Ca(ca) => run_ca(ca, log_format),
        Command::Policy(policy) => run_policy(policy),
        Command::Demo { keep_running, dir } => {
            Ok(demo::run(demo::DemoOptions { keep_running, dir })?)
        }
        Command::Inject(args) => run_inject(args),
        Command::Redirect(args) => run_redirect(args),
        Command::Proxy(args) => {
            use moat_proxy::telemetry::{Observability, ProxyMetrics, Tracing};
            let config = moat_proxy::config::Config::load(&args.config).map_err(config_err)?;
            let traces = config
                .telemetry
                .resolve(|k| std::env::var(k).ok())
                .map_err(|e| config_err(format!("{}: {e}", args.config.display())))?;
            let runtime = runtime(config.runtime.worker_threads)?;
            // The gRPC exporter must be built inside the runtime.
            let _inside = runtime.enter();
            let metrics = ProxyMetrics::new();
            let tracing = traces
                .as_ref()
                .map(|t| Tracing::start(t, metrics.spans_dropped.clone()))
                .transpose()
                .map_err(config_err)?;
            let log_level = init_logging(
                log_format,
                config.telemetry.log_level.as_deref(),
                tracing.as_ref(),
            );
            if let Some(t) = &traces {
                tracing::info!(endpoint = %t.endpoint, protocol = ?t.protocol, service = %t.service_name, sample_ratio = t.sample_ratio, "exporting traces");
            }
            let obs = Observability {
                metrics,
                tracing: tracing.is_some(),
                log_level: Some(log_level),
            };
            runtime.block_on(moat_proxy::run_with(config, obs))?;
            drop(tracing);
            Ok(())
        }
    }
}

fn run_redirect(args: RedirectArgs) -> Result<(), Failure> {
    use moat_proxy::redirect::{self, InboundPorts, OwnPorts, RedirectError, Ruleset};
    let apply_err = |e: RedirectError| match e {
        RedirectError::Invalid(_) => config_err(e),
        other => Failure::Other(other.into()),
    };
    if args.cleanup {
        if args.dry_run {
            print!("{}", redirect::cleanup_nft());
            return Ok(());
        }
        redirect::cleanup().map_err(apply_err)?;
        tracing::info!(table = "inet moat", "redirect rules removed");
        return Ok(());
    }
    let (mut config, mut own) = match &args.config {
        Some(path) => redirect::load(path).map_err(config_err)?,
        None => (
            Default::default(),
            OwnPorts {
                admin: Some(moat_proxy::config::DEFAULT_ADMIN_PORT),
                inbound: Vec::new(),
            },
        ),
    };
    if let Some(p) = args.inbound_listener_port {
        config.inbound_listener_port = p;
    }
    if let Some(p) = args.outbound_listener_port {
        config.outbound_listener_port = p;
    }
    if let Some(p) = args.inbound_ports {
        config.inbound_ports = p;
    }
    if let Some(p) = args.skip_inbound_ports {
        config.skip_inbound_ports = p;
    }
    if args.no_outbound {
        config.outbound = false;
    }
    if let Some(p) = args.skip_outbound_ports {
        config.skip_outbound_ports = p;
    }
    if let Some(c) = args.skip_outbound_cidrs {
        config.skip_outbound_cidrs = c;
    }
    if let Some(u) = args.proxy_uid {
        config.proxy_uid = u;
    }
    if let Some(g) = args.proxy_gid {
        config.proxy_gid = Some(g);
    }
    if let Some(p) = args.admin_port {
        own.admin = Some(p);
    }
    let rules = Ruleset::new(&config, &own).map_err(apply_err)?;
    if args.dry_run {
        print!("{}", rules.to_nft());
        return Ok(());
    }
    rules.apply().map_err(apply_err)?;
    let inbound = match &config.inbound_ports {
        InboundPorts::All => "all".to_owned(),
        InboundPorts::Listed(p) => format!("{p:?}"),
    };
    tracing::info!(
        table = "inet moat",
        inbound_ports = %inbound,
        inbound_listener_port = config.inbound_listener_port,
        outbound = config.outbound,
        outbound_listener_port = config.outbound_listener_port,
        "redirect rules installed"
    );
    Ok(())
}

fn parse_cidrs(s: &str) -> Result<Vec<moat_proxy::redirect::Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::parse)
        .collect()
}

fn run_inject(args: InjectArgs) -> Result<(), Failure> {
    use std::io::{Read, Write};
    let input = match args.file.as_deref() {
        None => None,
        Some(p) if p.as_os_str() == "-" => None,
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| config_err(format!("{}: {e}", p.display())))?,
        ),
    };
    let input = match input {
        Some(text) => text,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| config_err(format!("standard input: {e}")))?;
            text
        }
    };
    let options = inject::Options {
        image: args.image,
        inbound_port: args.inbound_port,
        admin_port: args.admin_port,
        audience: args.audience,
        bundle_config_map: args.bundle_config_map,
        upgrade: args.upgrade,
    };
    let injected = inject::inject(&input, &options).map_err(config_err)?;
    // What was done goes to stderr, so stdout can be piped to kubectl.
    let mut stderr = std::io::stderr().lock();
    for line in injected.report.lines() {
        if line.warning || !args.quiet {
            writeln!(stderr, "moat inject: {line}")?;
        }
    }
    std::io::stdout().write_all(injected.output.as_bytes())?;
    Ok(())
}

fn run_policy(command: PolicyCommand) -> Result<(), Failure> {
    use moat_proxy::policy::cli;
    match command {
        PolicyCommand::Check { files } => {
            let report = cli::check(&files);
            for (file, hash, routes) in &report.valid {
                println!("{}: ok ({routes} routes, hash {hash})", file.display());
            }
            for d in &report.diagnostics {
                eprintln!("{d}");
            }
            match report.diagnostics.len() {
                0 => Ok(()),
                n => Err(Failure::Config(format!("{n} problem(s) found"))),
            }
        }
        PolicyCommand::Explain {
            file,
            peer,
            method,
            path,
            host,
            jwt,
            claims,
        } => {
            let req = cli::ExplainRequest {
                peer,
                method,
                path,
                host,
                jwt,
                claims,
            };
            print!("{}", cli::explain(&file, &req).map_err(config_err)?);
            Ok(())
        }
        PolicyCommand::Test { file, cases } => {
            let report = cli::test(&file, &cases).map_err(config_err)?;
            for f in &report.failed {
                println!(
                    "FAIL {} ({}:{}): {}",
                    f.name,
                    cases.display(),
                    f.line,
                    f.message
                );
            }
            println!("{} passed, {} failed", report.passed, report.failed.len());
            if report.failed.is_empty() {
                Ok(())
            } else {
                Err(Failure::Other(anyhow::anyhow!(
                    "{} policy test(s) failed",
                    report.failed.len()
                )))
            }
        }
    }
}

fn run_ca(command: CaCommand, log_format: LogFormat) -> Result<(), Failure> {
    use moat_ca::store::CaDir;
    if let CaCommand::Serve(args) = command {
        return run_ca_serve(args, log_format);
    }
    // Every other command is one short conversation with the store.
    let runtime = runtime(Some(1))?;
    runtime.block_on(async move {
        match command {
            CaCommand::Serve(_) => unreachable!("handled above"),
            CaCommand::Init {
                at,
                trust_domain,
                root_ttl,
            } => {
                let td = moat_ca::TrustDomain::parse(&trust_domain)
                    .map_err(|e| config_err(format!("--trust-domain {trust_domain:?}: {e}")))?;
                let (_, engine) = ca_config(&at)?;
                let ca = CaDir::init(&at.dir, &engine, td, root_ttl)
                    .await
                    .map_err(store_err)?;
                println!(
                    "initialized CA for trust domain {} in {} (state: {} {})",
                    ca.trust_domain(),
                    at.dir.display(),
                    ca.store().engine(),
                    ca.store().location()
                );
                Ok(())
            }
            CaCommand::Token { at, id, ttl } => {
                let ca = open_ca(&at).await?;
                let id = moat_ca::SpiffeId::parse(&id)
                    .map_err(|e| config_err(format!("--id {id:?}: {e}")))?;
                let token = ca.mint_join_token(&id, ttl).map_err(store_err)?;
                println!("{token}");
                Ok(())
            }
            CaCommand::Issue {
                at,
                id,
                ttl,
                cert_out,
                key_out,
            } => {
                let ca = open_ca(&at).await?;
                let id = moat_ca::SpiffeId::parse(&id)
                    .map_err(|e| config_err(format!("--id {id:?}: {e}")))?;
                let (svid, key) = ca
                    .issue_to_files(&id, ttl, &cert_out, &key_out)
                    .await
                    .map_err(store_err)?;
                println!(
                    "issued {} serial {} valid until {} ({} and {})",
                    svid.id,
                    svid.serial,
                    moat_ca::store::format_time(svid.not_after),
                    cert_out.display(),
                    key_out.display()
                );
                drop(key);
                Ok(())
            }
            CaCommand::Bundle { at } => {
                let ca = open_ca(&at).await?;
                print!("{}", ca.bundle().await.map_err(store_err)?.to_pem());
                Ok(())
            }
            CaCommand::Rotate { at, step, root_ttl } => {
                let ca = open_ca(&at).await?;
                let msg = if step.prepare {
                    ca.rotate_prepare(root_ttl).await
                } else if step.activate {
                    ca.rotate_activate().await
                } else {
                    ca.rotate_retire().await
                }
                .map_err(store_err)?;
                println!("{msg}");
                Ok(())
            }
            CaCommand::Migrate { at, from_sqlite } => run_migrate(&at, from_sqlite).await,
            CaCommand::Revoke { at, args } => revoke::revoke(&open_ca(&at).await?, args)
                .await
                .map_err(store_err),
            CaCommand::Unrevoke { at, args } => revoke::unrevoke(&open_ca(&at).await?, args)
                .await
                .map_err(store_err),
        }
    })
}

fn run_ca_serve(args: ServeArgs, log_format: LogFormat) -> Result<(), Failure> {
    let (config, engine) = ca_config(&args.at)?;
    let sans = if args.sans.is_empty() {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
    } else {
        args.sans
    };
    let runtime = runtime(None)?;
    let _inside = runtime.enter();
    let traces = moat_proxy::telemetry::TelemetryConfig {
        service_name: Some(std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "moat-ca".into())),
        ..Default::default()
    }
    .resolve(|k| std::env::var(k).ok())
    .map_err(config_err)?;
    let tracing = traces
        .as_ref()
        .map(|t| moat_proxy::telemetry::Tracing::start(t, Default::default()))
        .transpose()
        .map_err(config_err)?;
    init_logging(log_format, None, tracing.as_ref());
    runtime.block_on(async move {
        let ca = moat_ca::store::CaDir::open(&args.at.dir, &engine)
            .await
            .map_err(store_err)?;
        tracing::info!(
            engine = ca.store().engine(),
            store = ca.store().location(),
            "state store opened"
        );
        let mut server = moat_ca::server::CaServer::bind(ca, config, args.listen, sans)
            .await
            .map_err(|e| match e {
                moat_ca::server::ServerError::Config(_) => config_err(e),
                moat_ca::server::ServerError::Store(e) => store_err(e),
                other => Failure::Other(other.into()),
            })?;
        if args.admin != "off" {
            let addr = args
                .admin
                .parse()
                .map_err(|e| config_err(format!("--admin {:?}: {e}", args.admin)))?;
            server.bind_admin(addr).await?;
        }
        server.run(shutdown_signal()).await?;
        Ok(())
    })
}

/// `moat ca migrate`: the schema alone, or a SQLite CA copied into PostgreSQL.
async fn run_migrate(at: &CaLocation, from_sqlite: Option<PathBuf>) -> Result<(), Failure> {
    use moat_ca::store::config::Engine;
    use moat_ca::store::{CaDir, SqliteStore, copy_sqlite_to_postgres};
    let (_, engine) = ca_config(at)?;
    let Some(source) = from_sqlite else {
        let store = CaDir::open_store(&at.dir, &engine)
            .await
            .map_err(store_err)?;
        let version = store.schema_version().await.map_err(store_err)?;
        println!(
            "{} {} is at schema version {version}",
            store.engine(),
            store.location()
        );
        return Ok(());
    };
    let Engine::Postgres(settings) = &engine else {
        return Err(config_err(
            "--from-sqlite copies into PostgreSQL: set [store] url in the configuration (--config)",
        ));
    };
    let db = if source.is_dir() {
        source.join("ca.db")
    } else {
        source.clone()
    };
    if !db.is_file() {
        return Err(config_err(format!(
            "--from-sqlite {}: no SQLite CA there (expected DIR/ca.db)",
            source.display()
        )));
    }
    let roots = db
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("roots");
    let src = SqliteStore::open(&db, &roots).map_err(store_err)?;
    let dst = moat_ca::store::PgStore::connect(settings)
        .await
        .map_err(store_err)?;
    let report = copy_sqlite_to_postgres(&src, &dst)
        .await
        .map_err(store_err)?;
    println!(
        "copied the CA for {} from {} into {}: {} roots, {} issuances, {} spent join tokens, {} revocations. \
         Serve it with this configuration; keep {} (its keys) as the CA directory of every replica.",
        report.trust_domain,
        db.display(),
        settings.display,
        report.roots,
        report.issued,
        report.used_tokens,
        report.revocations,
        at.dir.display()
    );
    Ok(())
}

/// The CA's configuration (DIR/ca.toml unless --config says otherwise) and
/// the store engine it chooses.
fn ca_config(
    at: &CaLocation,
) -> Result<
    (
        moat_ca::server::ServerConfig,
        moat_ca::store::config::Engine,
    ),
    Failure,
> {
    let path = at.config.clone().or_else(|| {
        let default = at.dir.join("ca.toml");
        default.exists().then_some(default)
    });
    let config = match &path {
        Some(path) => moat_ca::server::ServerConfig::load(path).map_err(config_err)?,
        None => moat_ca::server::ServerConfig::default(),
    };
    let engine = config.store.engine().map_err(|e| match &path {
        Some(p) => config_err(format!("{}: {e}", p.display())),
        None => config_err(e),
    })?;
    Ok((config, engine))
}

async fn open_ca(at: &CaLocation) -> Result<moat_ca::store::CaDir, Failure> {
    let (_, engine) = ca_config(at)?;
    moat_ca::store::CaDir::open(&at.dir, &engine)
        .await
        .map_err(store_err)
}

/// Operator mistakes (bad flags, a missing or existing CA directory, a refused
/// rotation step) are configuration errors; anything else is a failure.
fn store_err(e: moat_ca::store::StoreError) -> Failure {
    if e.is_operator_error() {
        Failure::Config(e.to_string())
    } else {
        Failure::Other(e.into())
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

/// Parses durations such as `90s`, `15m`, `1h`, `365d`, `500ms`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    moat_ca::parse_duration(s)
}
