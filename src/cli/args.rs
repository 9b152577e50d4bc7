//! The command line's shape: every command, flag and argument (clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `moat [--log-format F] COMMAND ...`.
#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "mTLS sidecar proxy and workload certificate authority",
    after_help = examples::MOAT
)]
pub(crate) struct Cli {
    /// Log format, before the command (older spelling; each command that
    /// logs takes `--log-format` itself).
    #[arg(long, value_enum, hide = true, env = "MOAT_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written on standard error.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    /// One JSON object a line (for a log collector).
    Json,
    /// Human-readable lines.
    Text,
}

/// `--log-format`, on the commands that log.
#[derive(Args, Clone, Copy)]
pub(crate) struct LogArgs {
    /// Log format on standard error [default: json].
    #[arg(long, value_enum, env = "MOAT_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// The workload certificate authority.
    #[command(subcommand, after_help = examples::CA)]
    Ca(CaCommand),
    /// Run the sidecar proxy.
    #[command(after_help = examples::PROXY)]
    Proxy(ProxyArgs),
    /// Check a proxy configuration and everything it points at, without serving traffic.
    #[command(after_help = examples::DOCTOR)]
    Doctor(DoctorArgs),
    /// Check, explain and test route authorization policy files.
    #[command(subcommand, after_help = examples::POLICY)]
    Policy(PolicyCommand),
    /// Run the demo: a CA, two services with sidecars, allowed and denied traffic, on loopback.
    #[command(after_help = examples::DEMO)]
    Demo {
        /// Leave everything running afterwards, for you to curl (Ctrl-C stops it).
        #[arg(long)]
        keep_running: bool,
        /// Where to keep the CA, configuration and logs (a temporary directory if absent).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Transparent mode instead: each service in its own network namespace with
        /// `moat redirect` rules, calling its peer by plain address (needs root).
        #[arg(long)]
        transparent: bool,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Add the moat sidecar to Kubernetes manifests (the manifests on stdout, what was done on stderr).
    #[command(after_help = examples::INJECT)]
    Inject(InjectArgs),
    /// Install the transparent-mode redirect rules (nftables) in this network
    /// namespace, replacing earlier ones; or print or remove them. Needs CAP_NET_ADMIN.
    #[command(after_help = examples::REDIRECT)]
    Redirect(RedirectArgs),
    /// Print a shell completion script.
    #[command(after_help = examples::COMPLETION)]
    Completion {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `moat doctor`.
#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// The proxy's configuration file (TOML), as `moat proxy --config` takes it.
    #[arg(long, env = "MOAT_CONFIG")]
    pub config: PathBuf,
    /// Print the findings as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// How long each network check (the CA, the JWKS, the forward target) may take.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `moat redirect`: values from `[redirect]` of `--config`, each flag overriding its field.
/// (Lists are written `::std::vec::Vec` so that clap takes one comma-separated value.)
#[derive(Args)]
pub(crate) struct RedirectArgs {
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
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Args)]
pub(crate) struct InjectArgs {
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
    /// Explicit mode: the sidecar alone, no redirect init container, probes
    /// left as they are (the default is transparent mode).
    #[arg(long)]
    pub explicit: bool,
    /// Print only warnings on standard error, not what was done to each document.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate policy files; prints file:line:column: message for each problem (exit 64).
    #[command(after_help = examples::POLICY_CHECK)]
    Check {
        /// The policy files (TOML) to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Say which route decides a request, and why.
    #[command(after_help = examples::POLICY_EXPLAIN)]
    Explain {
        /// The policy file (TOML).
        file: PathBuf,
        /// The caller's SPIFFE ID.
        #[arg(long)]
        peer: String,
        /// The request method (GET, POST, ...).
        #[arg(long)]
        method: String,
        /// The raw request path, possibly with a query.
        #[arg(long)]
        path: String,
        /// The request's Host (or :authority), for routes that name hosts.
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
    #[command(after_help = examples::POLICY_TEST)]
    Test {
        /// The policy file (TOML).
        file: PathBuf,
        /// The expected decisions (TOML, `[[case]]` tables).
        cases: PathBuf,
    },
}

/// Where a CA's keys and its configuration are.
#[derive(Args)]
pub(crate) struct CaLocation {
    /// The CA directory: keys, and the SQLite state unless ca.toml chooses PostgreSQL.
    #[arg(long)]
    pub dir: PathBuf,
    /// The CA's configuration file ([store], [kubernetes], limits). Defaults to DIR/ca.toml if present.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Create a new CA (root key and certificate, token key, state store) in DIR.
    #[command(after_help = examples::CA_INIT)]
    Init {
        #[command(flatten)]
        at: CaLocation,
        /// The SPIFFE trust domain, e.g. example.org.
        #[arg(long)]
        trust_domain: String,
        /// Lifetime of the root certificate (e.g. 365d, 720h); at least 48h.
        #[arg(long, default_value = "365d", value_parser = parse_root_ttl)]
        root_ttl: Duration,
    },
    /// Serve the CA's HTTPS API.
    #[command(after_help = examples::CA_SERVE)]
    Serve(ServeArgs),
    /// Mint a single-use join token for a VM workload; prints the token alone.
    #[command(after_help = examples::CA_TOKEN)]
    Token {
        #[command(flatten)]
        at: CaLocation,
        /// The SPIFFE ID the token's holder will get.
        #[arg(long)]
        id: String,
        /// How long the token may be used (at most 24h).
        #[arg(long, default_value = "15m", value_parser = parse_typed_duration)]
        ttl: TypedDuration,
    },
    /// Issue a certificate and key directly to files (for file-managed
    /// identities). Each file is replaced atomically (written beside it,
    /// then renamed), so a proxy watching them never reads half a file.
    // One group for the two ways to say where the files go, so a command
    // with neither names both (`--cert-out` alone sent people looking for
    // a third flag to pair with it).
    #[command(after_help = examples::CA_ISSUE)]
    #[command(group(clap::ArgGroup::new("output").required(true).args(["cert_out", "out"])))]
    Issue {
        #[command(flatten)]
        at: CaLocation,
        /// The SPIFFE ID to put in the certificate.
        #[arg(long)]
        id: String,
        /// The certificate's lifetime [default: `[issuance] default_ttl` in
        /// the CA's ca.toml, else 1h; at most its `max_ttl`, else 24h].
        #[arg(long, value_parser = parse_typed_duration)]
        ttl: Option<TypedDuration>,
        /// Where to write the certificate chain (PEM, leaf first).
        #[arg(long, requires = "key_out")]
        cert_out: Option<PathBuf>,
        /// Where to write the private key (PEM, mode 0600).
        #[arg(long, requires = "cert_out")]
        key_out: Option<PathBuf>,
        /// Write certificate chain and key into this one PEM file (mode 0600)
        /// instead: one rename replaces both, so a reader never sees a
        /// certificate without its key. Point `cert` and `key` at it.
        #[arg(long, conflicts_with_all = ["cert_out", "key_out"])]
        out: Option<PathBuf>,
        /// Replace files that exist (a renewal); without it an existing file is refused.
        #[arg(long)]
        force: bool,
    },
    /// Print the trust bundle (PEM).
    #[command(after_help = examples::CA_BUNDLE)]
    Bundle {
        #[command(flatten)]
        at: CaLocation,
    },
    /// Rotate the CA: --prepare, then --activate, then --retire. Done once,
    /// against the store; every replica follows within seconds.
    #[command(after_help = examples::CA_ROTATE)]
    Rotate {
        #[command(flatten)]
        at: CaLocation,
        #[command(flatten)]
        step: RotateStep,
        /// Lifetime of the new root (with --prepare); at least 48h.
        #[arg(long, default_value = "365d", value_parser = parse_root_ttl)]
        root_ttl: Duration,
        /// With --retire: retire even though certificates issued under the
        /// old root are still valid (their holders are cut off at once).
        #[arg(long)]
        force: bool,
    },
    /// Revoke a certificate (--serial) or an identity (--id), or --list
    /// what is revoked. Renewals and tokens of it are refused at once;
    /// every sidecar closes its connections within seconds.
    #[command(after_help = examples::CA_REVOKE)]
    Revoke {
        #[command(flatten)]
        at: CaLocation,
        #[command(flatten)]
        args: crate::revoke::RevokeArgs,
    },
    /// Undo `moat ca revoke`.
    #[command(after_help = examples::CA_UNREVOKE)]
    Unrevoke {
        #[command(flatten)]
        at: CaLocation,
        #[command(flatten)]
        args: crate::revoke::UnrevokeArgs,
    },
    /// Bring the store's schema up to date (and nothing else), or copy a
    /// SQLite CA's whole state into the PostgreSQL store ca.toml names.
    #[command(after_help = examples::CA_MIGRATE)]
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
pub(crate) struct RotateStep {
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
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub at: CaLocation,
    /// Address to listen on (port 0 picks a free port; the bound address is logged).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: std::net::SocketAddr,
    /// A DNS name or IP address for the CA's own serving certificate (repeat
    /// for several), added to localhost and 127.0.0.1, which are always in it.
    #[arg(long = "san", value_parser = parse_san)]
    pub sans: Vec<String>,
    /// Plain-HTTP admin listener for /metrics, /live and /ready (loopback by default; "off" disables).
    #[arg(long, default_value = "127.0.0.1:9902")]
    pub admin: String,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Args)]
pub(crate) struct ProxyArgs {
    /// The proxy's configuration file (TOML).
    #[arg(long, env = "MOAT_CONFIG")]
    pub config: PathBuf,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Parses durations such as `90s`, `15m`, `1h`, `365d`, `500ms`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    moat_ca::parse_duration(s)
}

/// `--san`: a DNS name or an IP address, as the certificate will carry it.
/// A URL or `host:port` is refused with the host to give instead.
fn parse_san(s: &str) -> Result<String, String> {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Ok(s.to_owned());
    }
    if rustls_pki_types::DnsName::try_from(s).is_ok() {
        return Ok(s.to_owned());
    }
    let host = |authority: &str| -> String {
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default().to_owned(),
            None => authority.split(':').next().unwrap_or_default().to_owned(),
        }
    };
    let suggestion = match s.split_once("://") {
        Some((_, rest)) => Some(host(rest.split(['/', '?', '#']).next().unwrap_or_default())),
        None if s.contains(':') => Some(host(s)),
        None => None,
    }
    .filter(|h| {
        h.parse::<std::net::IpAddr>().is_ok()
            || rustls_pki_types::DnsName::try_from(h.as_str()).is_ok()
    });
    Err(match suggestion {
        Some(h) => format!("a DNS name or an IP address, not a URL or port: give --san {h}"),
        None => "not a DNS name or an IP address".to_owned(),
    })
}

/// A duration flag's value with the text the operator typed, so that a
/// refusal echoes `1y`, not the `8766h` it became.
#[derive(Debug, Clone)]
pub(crate) struct TypedDuration {
    /// The duration.
    pub value: Duration,
    /// As typed.
    pub text: String,
}

fn parse_typed_duration(s: &str) -> Result<TypedDuration, String> {
    no_bare_number(s, "15m or 1h")?;
    Ok(TypedDuration {
        value: parse_duration(s)?,
        text: s.to_owned(),
    })
}

/// `--root-ttl`: a bare number is most likely days (humantime's own hint,
/// `365sec or 365ms`, would make a root that expires at once).
fn parse_root_ttl(s: &str) -> Result<Duration, String> {
    no_bare_number(s, &format!("{}d", s.trim()))?;
    parse_duration(s)
}

/// Refuses a number without a unit, suggesting `example`.
fn no_bare_number(s: &str, example: &str) -> Result<(), String> {
    if !s.trim().is_empty() && s.trim().bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} has no unit; write it like {example}"));
    }
    Ok(())
}

fn parse_cidrs(s: &str) -> Result<Vec<moat_proxy::redirect::Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::parse)
        .collect()
}

/// The examples that end each command's `--help`.
mod examples {
    pub(crate) const MOAT: &str = "\
Examples:
  moat ca init --dir ./ca --trust-domain example.org
  moat ca serve --dir ./ca --listen 0.0.0.0:8443 --san ca.example.internal
  moat proxy --config /etc/moat/proxy.toml
  moat doctor --config /etc/moat/proxy.toml
  moat demo

Exit codes: 0 success; 64 bad configuration or usage (restarting will not help);
1 anything else (a port in use, a CA that cannot be reached).";

    pub(crate) const CA: &str = "\
Examples:
  moat ca init --dir ./ca --trust-domain example.org
  moat ca serve --dir ./ca --listen 0.0.0.0:8443 --san ca.example.internal
  moat ca token --dir ./ca --id spiffe://example.org/vm/billing-1 > billing-1.token
  moat ca issue --dir ./ca --id spiffe://example.org/vm/db --out db.pem   # a certificate without a CA call
  moat ca bundle --dir ./ca > bundle.pem";

    pub(crate) const CA_INIT: &str = "\
Examples:
  moat ca init --dir ./ca --trust-domain example.org
  moat ca init --dir ./ca --config ./ca.toml --trust-domain example.org --root-ttl 730d";

    pub(crate) const CA_SERVE: &str = "\
Examples:
  moat ca serve --dir ./ca
  moat ca serve --dir /var/lib/moat/ca --listen 0.0.0.0:8443 --san ca.example.internal --san 10.0.0.5";

    pub(crate) const CA_TOKEN: &str = "\
Examples:
  moat ca token --dir ./ca --id spiffe://example.org/vm/billing-1 > billing-1.token
  moat ca token --dir ./ca --id spiffe://example.org/vm/billing-1 --ttl 1h";

    pub(crate) const CA_ISSUE: &str = "\
Examples:
  moat ca issue --dir ./ca --id spiffe://example.org/vm/db --cert-out tls.crt --key-out tls.key
  # renewal from a timer: one file holding chain and key, replaced atomically
  moat ca issue --dir ./ca --id spiffe://example.org/vm/db --ttl 24h --out /etc/moat/tls.pem --force";

    pub(crate) const CA_BUNDLE: &str = "\
Examples:
  moat ca bundle --dir ./ca > bundle.pem";

    pub(crate) const CA_ROTATE: &str = "\
Examples:
  moat ca rotate --dir ./ca --prepare   # then wait for every sidecar's bundle_refresh (5m by default)
  moat ca rotate --dir ./ca --activate
  moat ca rotate --dir ./ca --retire    # refused until the old root's certificates have expired
  moat ca rotate --dir ./ca --retire --force   # cut them off now";

    pub(crate) const CA_REVOKE: &str = "\
Examples:
  moat ca revoke --dir ./ca --id spiffe://example.org/ns/shop/sa/frontend --reason \"key compromise\"
  moat ca revoke --dir ./ca --serial 4f3a9c...e1     # one certificate
  moat ca revoke --dir ./ca --id spiffe://example.org/vm/db1 --until 2h
  moat ca revoke --dir ./ca --list";

    pub(crate) const CA_UNREVOKE: &str = "\
Examples:
  moat ca unrevoke --dir ./ca --id spiffe://example.org/ns/shop/sa/frontend
  moat ca unrevoke --dir ./ca --serial 4f3a9c...e1";

    pub(crate) const CA_MIGRATE: &str = "\
Examples:
  moat ca migrate --dir ./ca --config ./ca.toml
  moat ca migrate --dir ./ca --config ./ca.toml --from-sqlite ./ca/ca.db";

    pub(crate) const PROXY: &str = "\
Examples:
  moat proxy --config /etc/moat/proxy.toml
  moat proxy --config proxy.toml --log-format text
  moat doctor --config proxy.toml      # check it first, without serving";

    pub(crate) const DOCTOR: &str = "\
Examples:
  moat doctor --config /etc/moat/proxy.toml
  moat doctor --config proxy.toml --json | jq '.findings[]'

Exit codes: 0 all well; 1 findings (each with a fix); 64 the configuration does not parse.";

    pub(crate) const POLICY: &str = "\
Examples:
  moat policy check policy.toml
  moat policy explain policy.toml --peer spiffe://example.org/ns/prod/sa/frontend --method GET --path /invoices/42
  moat policy test policy.toml policy-tests.toml";

    pub(crate) const POLICY_CHECK: &str = "\
Examples:
  moat policy check /etc/moat/policy.toml
  moat policy check policies/*.toml";

    pub(crate) const POLICY_EXPLAIN: &str = "\
Examples:
  moat policy explain policy.toml --peer spiffe://example.org/ns/prod/sa/frontend --method GET --path /invoices/42
  moat policy explain policy.toml --peer spiffe://example.org/ns/prod/sa/frontend --method GET --path /export \\
    --claims '{\"sub\":\"alice\",\"scope\":\"invoices:read\"}'";

    pub(crate) const POLICY_TEST: &str = "\
Examples:
  moat policy test policy.toml policy-tests.toml";

    pub(crate) const DEMO: &str = "\
Examples:
  moat demo
  moat demo --keep-running --dir ./moat-demo
  sudo moat demo --transparent   # network namespaces, redirect rules, plain http:// between services";

    pub(crate) const INJECT: &str = "\
Examples:
  moat inject deployment.yaml | kubectl apply -f -            # transparent mode (redirect init container)
  moat inject --explicit deployment.yaml | kubectl apply -f - # the sidecar alone, apps call its listeners
  kustomize build overlays/prod | moat inject - | kubectl apply -f -
  kubectl get deploy billing -o json | moat inject --upgrade --image registry.example/moat:0.2.0 - | kubectl apply -f -";

    pub(crate) const REDIRECT: &str = "\
Examples:
  moat redirect --config /etc/moat/proxy.toml
  moat redirect --config /etc/moat/proxy.toml --dry-run
  moat redirect --cleanup";

    pub(crate) const COMPLETION: &str = "\
Examples:
  moat completion bash > /etc/bash_completion.d/moat
  moat completion zsh > \"${fpath[1]}/_moat\"
  moat completion fish > ~/.config/fish/completions/moat.fish";
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap's own consistency checks, and what `--help` owes an operator:
    /// every argument described, every command with examples.
    #[test]
    fn every_argument_is_described_and_every_command_has_examples() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        fn walk(cmd: &clap::Command, path: &str) {
            if cmd.get_name() != "help" {
                assert!(
                    cmd.get_after_help()
                        .is_some_and(|h| h.to_string().contains("Examples:")),
                    "{path}: no examples"
                );
            }
            for arg in cmd.get_arguments() {
                if arg.is_hide_set() || ["help", "version"].contains(&arg.get_id().as_str()) {
                    continue;
                }
                assert!(
                    arg.get_help().is_some() || arg.get_long_help().is_some(),
                    "{path}: {} has no description",
                    arg.get_id()
                );
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        walk(&cli, "moat");
    }
}
