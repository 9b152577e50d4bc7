//! The command line's shape: every command, flag and argument (clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "mTLS sidecar proxy and workload certificate authority"
)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json, env = "MOAT_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
pub enum Command {
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
pub struct RedirectArgs {
    /// The proxy's configuration file: its `[redirect]` (required), and
    /// moat's own ports (`[admin]`, `[[inbound]] listen`), never redirected.
    #[arg(long, env = "MOAT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the rules (nft syntax, for `nft -f`) instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules (the table inet moat).
    #[arg(long)]
    pub cleanup: bool,
    /// Port of moat's transparent inbound listener [default: 15006].
    #[arg(long)]
    pub inbound_listener_port: Option<u16>,
    /// Port of moat's transparent outbound listener [default: 15001].
    #[arg(long)]
    pub outbound_listener_port: Option<u16>,
    /// Inbound ports to redirect: "all" [default], or a comma-separated list ("" for none).
    #[arg(long)]
    pub inbound_ports: Option<moat_proxy::redirect::InboundPorts>,
    /// With --inbound-ports all: ports to leave alone (comma-separated).
    #[arg(long, value_parser = moat_proxy::redirect::parse_ports)]
    pub skip_inbound_ports: Option<::std::vec::Vec<u16>>,
    /// Leave outbound traffic alone.
    #[arg(long)]
    pub no_outbound: bool,
    /// Outbound destination ports to leave alone (comma-separated).
    #[arg(long, value_parser = moat_proxy::redirect::parse_ports)]
    pub skip_outbound_ports: Option<::std::vec::Vec<u16>>,
    /// Outbound destination addresses or CIDRs to leave alone (comma-separated).
    #[arg(long, value_parser = parse_cidrs)]
    pub skip_outbound_cidrs: Option<::std::vec::Vec<moat_proxy::redirect::Cidr>>,
    /// The UID (or user name) moat runs as; its connections are never redirected [default: 65532].
    #[arg(long)]
    pub proxy_uid: Option<moat_proxy::redirect::Owner>,
    /// Also exempt connections of this GID (or group name).
    #[arg(long)]
    pub proxy_gid: Option<moat_proxy::redirect::Owner>,
    /// moat's admin port, never redirected [default: from --config, else 9901].
    #[arg(long)]
    pub admin_port: Option<u16>,
}

#[derive(Args)]
pub struct InjectArgs {
    /// A YAML or JSON file (one or more YAML documents); `-` or absent reads standard input.
    pub file: Option<PathBuf>,
    /// The moat image for the sidecar.
    #[arg(long, default_value_t = crate::inject::Options::default().image)]
    pub image: String,
    /// The sidecar's mTLS port (the `[[inbound]] listen` port in proxy.toml).
    #[arg(long, default_value_t = 15443)]
    pub inbound_port: u16,
    /// The sidecar's admin port (`[admin] listen` in proxy.toml), probed by the kubelet.
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// The projected token's audience; must match the CA's `[kubernetes] audience`.
    #[arg(long, default_value = "moat-ca")]
    pub audience: String,
    /// The ConfigMap that holds the trust bundle (`bundle.pem`).
    #[arg(long, default_value = "moat-bundle")]
    pub bundle_config_map: String,
    /// Replace moat's own init container and volumes where they differ from
    /// what these flags make (a new --image, --audience, ...), and move the
    /// sidecar first; without it only what is missing is added.
    #[arg(long)]
    pub upgrade: bool,
    /// Print only warnings on standard error, not what was done to each document.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
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
pub struct CaLocation {
    /// The CA directory: keys, and the SQLite state unless ca.toml chooses PostgreSQL.
    #[arg(long)]
    pub dir: PathBuf,
    /// The CA's configuration file ([store], [kubernetes], limits). Defaults to DIR/ca.toml if present.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum CaCommand {
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
pub struct RotateStep {
    /// Add a new root to the bundle; the current root keeps signing.
    #[arg(long)]
    pub prepare: bool,
    /// Make the prepared root sign; the old root stays in the bundle.
    #[arg(long)]
    pub activate: bool,
    /// Drop the old root from the bundle.
    #[arg(long)]
    pub retire: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub at: CaLocation,
    /// Address to listen on (port 0 picks a free port; the bound address is logged).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: std::net::SocketAddr,
    /// DNS names and IP addresses for the CA's own serving certificate.
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// Plain-HTTP admin listener for /metrics, /live and /ready (loopback by default; "off" disables).
    #[arg(long, default_value = "127.0.0.1:9902")]
    pub admin: String,
}

#[derive(Args)]
pub struct ProxyArgs {
    /// The proxy's configuration file (TOML).
    #[arg(long, env = "MOAT_CONFIG")]
    pub config: PathBuf,
}

/// Parses durations such as `90s`, `15m`, `1h`, `365d`, `500ms`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    moat_ca::parse_duration(s)
}

fn parse_cidrs(s: &str) -> Result<Vec<moat_proxy::redirect::Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::parse)
        .collect()
}
