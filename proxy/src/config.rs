//! The proxy's configuration file (TOML).
//!
//! Parsed once, strictly (unknown fields are errors), into typed values:
//! after [`Config::load`] the rest of the proxy never sees a string that
//! should have been a `SocketAddr`, a `SpiffeId` or a `Duration`. Errors name
//! the file, line and column, and quote the offending line so the field is
//! plain to see.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_ca::{SpiffeId, TrustDomain};
use serde::Deserialize;

/// The whole proxy configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[runtime]`: threads.
    #[serde(default)]
    pub runtime: Runtime,
    /// `[identity]`: where this workload's certificate comes from.
    pub identity: Identity,
    /// `[admin]`: the admin listener.
    #[serde(default)]
    pub admin: Admin,
    /// `[tls]`: protocol versions.
    #[serde(default)]
    pub tls: Tls,
    /// `[limits]`: timeouts and bounds shared by every listener.
    #[serde(default)]
    pub limits: Limits,
    /// `[[inbound]]`: peers to this service.
    #[serde(default)]
    pub inbound: Vec<Inbound>,
    /// `[[outbound]]`: this service to a peer.
    #[serde(default)]
    pub outbound: Vec<Outbound>,
    /// `[telemetry]`: traces and logs.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// `[redirect]`: transparent mode. The rules `moat redirect` installs,
    /// and the transparent listener the proxy binds for them.
    pub redirect: Option<crate::redirect::RedirectConfig>,
    /// `[[destination]]`: where the app's redirected outbound connections
    /// go over mutual TLS, and to whom (transparent mode).
    #[serde(default)]
    pub destination: Vec<crate::transparent::Destination>,
    /// The file this configuration was read from (relative paths inside it
    /// are resolved against its directory).
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[runtime]`: how many worker threads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Tokio worker threads; `None` means one per core.
    pub worker_threads: Option<usize>,
}

/// Where the workload's identity (certificate, key, trust bundle) comes from.
#[derive(Debug, Clone)]
pub enum Identity {
    /// From the moat CA: a key made in memory, a first certificate got with a
    /// token, renewals over mutual TLS, the bundle refreshed from the CA.
    Ca(CaIdentity),
    /// From files managed elsewhere, watched and reloaded when they change.
    Files(FileIdentity),
}

/// `[identity]` with `ca_url`.
#[derive(Debug, Clone)]
pub struct CaIdentity {
    /// `https://host:port` of the CA: one URL (a Kubernetes Service in
    /// front of the replicas), or several replicas tried in turn.
    pub ca_urls: Vec<String>,
    /// The trust bundle file: verifies the CA (and peers, until the CA's
    /// own bundle has been fetched).
    pub bundle: PathBuf,
    /// The join token or Kubernetes service-account token.
    pub token_file: PathBuf,
    /// How often the trust bundle is fetched from the CA again.
    pub bundle_refresh: Duration,
    /// The certificate lifetime to ask for; the CA's default when absent.
    pub ttl: Option<Duration>,
    /// The first wait before retrying an unreachable CA (it doubles, with jitter).
    pub retry_base: Duration,
    /// The longest wait between retries.
    pub retry_max: Duration,
    /// Where the current certificate and key are kept across restarts
    /// (0600, written atomically); `None` keeps the key in memory only.
    pub state_dir: Option<PathBuf>,
}

/// `[identity]` with `cert` and `key`.
#[derive(Debug, Clone)]
pub struct FileIdentity {
    /// Certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// PKCS#8 private key, PEM.
    pub key: PathBuf,
    /// Trust bundle, PEM.
    pub bundle: PathBuf,
    /// A deny-list file (`deny_list`), in the JSON the CA serves at
    /// `GET /v1/revocations` (and `moat ca revoke --list --json` prints):
    /// the revocations a sidecar without a CA connection enforces. Watched
    /// and reloaded with the other files.
    pub deny_list: Option<PathBuf>,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of `/live`, `/ready` and `/identity`.
    #[serde(default = "default_admin_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
}

/// `[tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Also accept and offer TLS 1.2 (TLS 1.3 only by default).
    #[serde(default)]
    pub allow_tls12: bool,
}

/// `[limits]`: nothing the proxy holds for a peer is unbounded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Time allowed for a TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time allowed to receive a request's headers (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this
    /// long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest header block of a request or a response, counted as
    /// HTTP/1.1 writes it (each field's name and value plus 4 bytes for
    /// `: ` and CRLF), the same over HTTP/1.1 and HTTP/2. Also the longest
    /// request target. Over it: 431 (request headers), 414 (target), 502
    /// `response_headers_too_large` (a response).
    pub max_header_bytes: usize,
    /// Most header fields in a request or response head; more gets 431
    /// (request) or 502 (response). Up to 100 keeps hyper's HTTP/1.1
    /// parser on the stack; more costs it a heap buffer per head.
    pub max_header_count: usize,
    /// Most connections open at once on one listener; more wait in the
    /// kernel's accept queue.
    pub max_connections: usize,
    /// An unused pooled connection (to the local service or a peer) is
    /// closed after this long. Keep it below the upstream's own keep-alive
    /// timeout (a moat inbound closes idle HTTP/1.1 connections after
    /// `header_read_timeout`), or a request can race the upstream's close.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Time allowed to connect to the local service or a peer.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for the upstream to start answering; then 504.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// What a listener carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 (by ALPN inbound; by preface on the plaintext side).
    #[default]
    Http,
    /// Bytes both ways.
    Tcp,
}

/// Who may connect: an exact SPIFFE ID, or every ID under a prefix (`/*`).
#[derive(Clone, PartialEq, Eq)]
pub enum PeerPattern {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID starting with this prefix, which ends with `/`.
    Prefix(String),
}

/// `[[inbound]]`: peers to this service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// Name used in logs and metrics.
    pub name: String,
    /// Where peers connect (mutual TLS).
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// The local service, plaintext.
    #[serde(deserialize_with = "socket_addr")]
    pub forward: SocketAddr,
    /// `http` or `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Who may connect at all; absent means any peer of the trust domain.
    pub allow_peers: Option<Vec<PeerPattern>>,
    /// Per-route authorization file (http only).
    pub policy: Option<PathBuf>,
    /// What the local service speaks; read it with
    /// [`Inbound::app_protocol`]. Absent: `http1`.
    #[serde(default)]
    pub app_protocol: Option<AppProtocol>,
    /// The old name of `app_protocol` (its `auto` now probes the service
    /// instead of following the caller); accepted with a warning.
    #[serde(default)]
    pub forward_http: Option<AppProtocol>,
    /// `Upgrade` protocols passed through to the service (WebSocket by
    /// default); an upgrade to anything else is forwarded as a plain request.
    #[serde(default = "default_upgrade_protocols")]
    pub upgrade_protocols: Vec<UpgradeProtocol>,
    /// Allow `forward` off loopback (plaintext over a network).
    #[serde(default)]
    pub unsafe_forward: bool,
}

/// The HTTP version the local service speaks, whatever version the caller
/// spoke to the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (most Python, Node, Ruby and Java services). A gRPC request
    /// is answered 502 `app_protocol_mismatch`.
    #[default]
    Http1,
    /// HTTP/2 without TLS (h2c, prior knowledge).
    Http2,
    /// As `http2`; says that the service is a gRPC server.
    Grpc,
    /// Found out: an h2c prior-knowledge probe of the service, its answer
    /// kept until a request to the service fails.
    Auto,
}

/// An `Upgrade` protocol token a listener passes through (lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeProtocol(String);

/// `[[outbound]]`: this service to a peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// Name used in logs and metrics.
    pub name: String,
    /// Where the local service connects (plaintext, loopback).
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// `host:port` of the peer's sidecar, resolved by DNS at each connect.
    pub upstream: Upstream,
    /// The SPIFFE ID the peer must present.
    pub peer: SpiffeId,
    /// `http` or `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `Upgrade` protocols passed through to the peer (WebSocket by
    /// default); an upgrade to anything else is forwarded as a plain request.
    #[serde(default = "default_upgrade_protocols")]
    pub upgrade_protocols: Vec<UpgradeProtocol>,
    /// Allow `listen` off loopback (plaintext from the network).
    #[serde(default)]
    pub unsafe_listen: bool,
}

/// A `host:port` upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// A configuration error naming file, line and field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("{file}:{line}:{column}: {message}{context}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
        /// The offending line, quoted.
        context: String,
    },
    /// A route policy file named by an inbound listener is invalid.
    #[error("inbound {listener}: policy: {message}")]
    Policy {
        /// The inbound listener.
        listener: String,
        /// The policy engine's diagnostics (file, line, column).
        message: String,
    },
    /// The values parse but do not make a usable configuration.
    #[error("{file}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    ca_url: Option<CaUrls>,
    state_dir: Option<PathBuf>,
    bundle: PathBuf,
    token_file: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    bundle_refresh: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_base: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_max: Option<Duration>,
    deny_list: Option<PathBuf>,
}

/// The admin listener's port when `[admin] listen` is not set.
pub const DEFAULT_ADMIN_PORT: u16 = 9901;

fn default_upgrade_protocols() -> Vec<UpgradeProtocol> {
    vec![UpgradeProtocol("websocket".into())]
}

/// An `ip:port`, refused with a message that says what is expected: the
/// standard library's `invalid socket address syntax` does not say that a
/// host name (`localhost:8080`) is not accepted here.
fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an IP address and port, such as 127.0.0.1:8080 or [::1]:8080 \
             (host names are not resolved here)"
        ))
    })
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT))
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_header_bytes: 16 * 1024,
            max_header_count: 256,
            max_connections: 10_000,
            pool_idle_timeout: Duration::from_secs(4),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Loads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let config = Self::parse(path, &text)?;
        // Policy files are configuration too: a broken one is exit 64, before
        // any port is bound. (The proxy loads them again to serve them.)
        for l in &config.inbound {
            if let Some(policy) = &l.policy {
                crate::policy::Policy::load(policy).map_err(|e| ConfigError::Policy {
                    listener: l.name.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        Ok(config)
    }

    /// Parses and validates configuration text read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
        config.source = path.to_owned();
        let invalid = |message: String| ConfigError::Invalid {
            file: path.to_owned(),
            message,
        };
        config.validate().map_err(invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Every listener name, inbound then outbound.
    fn validate(&self) -> Result<(), String> {
        let transparent_out = self.redirect.as_ref().is_some_and(|r| r.outbound);
        if self.inbound.is_empty() && self.outbound.is_empty() && !transparent_out {
            return Err("no [[inbound]] or [[outbound]] listener is configured".into());
        }
        if !self.destination.is_empty() && !transparent_out {
            return Err(
                "[[destination]] needs [redirect] with outbound = true: only redirected connections are looked up in it"
                    .into(),
            );
        }
        let mut destinations: Vec<String> = Vec::new();
        for (i, d) in self.destination.iter().enumerate() {
            d.validate(i)?;
            let label = d.label(i);
            if destinations.contains(&label) {
                return Err(format!(
                    "[[destination]] {label:?} is named twice (set name = to tell them apart)"
                ));
            }
            destinations.push(label);
        }
        let mut names: Vec<&str> = vec!["admin"];
        let all = self
            .inbound
            .iter()
            .map(|l| ("inbound", &l.name))
            .chain(self.outbound.iter().map(|l| ("outbound", &l.name)));
        for (kind, name) in all {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(format!(
                    "[[{kind}]] name {name:?}: use letters, digits, '-', '_' or '.'"
                ));
            }
            if names.contains(&name.as_str()) {
                return Err(format!(
                    "[[{kind}]] name {name:?} is used twice (or is the reserved name \"admin\")"
                ));
            }
            names.push(name);
        }
        for l in &self.inbound {
            if !l.forward.ip().is_loopback() && !l.unsafe_forward {
                return Err(format!(
                    "[[inbound]] {:?}: forward = {} is off loopback; plaintext would cross a network (set unsafe_forward = true to allow)",
                    l.name, l.forward
                ));
            }
            if l.protocol == Protocol::Tcp && l.policy.is_some() {
                return Err(format!(
                    "[[inbound]] {:?}: policy applies to protocol = \"http\" only; a tcp listener authorizes by allow_peers",
                    l.name
                ));
            }
            if l.app_protocol.is_some() && l.forward_http.is_some() {
                return Err(format!(
                    "[[inbound]] {:?}: forward_http is the old name of app_protocol; set app_protocol only",
                    l.name
                ));
            }
            if matches!(&l.allow_peers, Some(p) if p.is_empty()) {
                return Err(format!(
                    "[[inbound]] {:?}: allow_peers = [] would refuse every peer; remove it to allow the whole trust domain",
                    l.name
                ));
            }
        }
        for l in &self.outbound {
            if !l.listen.ip().is_loopback() && !l.unsafe_listen {
                return Err(format!(
                    "[[outbound]] {:?}: listen = {} is off loopback; anyone on the network could use this identity (set unsafe_listen = true to allow)",
                    l.name, l.listen
                ));
            }
        }
        if let Some(r) = &self.redirect {
            r.validate(&self.own_ports())
                .map_err(|e| format!("[redirect] {e}"))?;
            self.validate_transparent()?;
        }
        let l = &self.limits;
        if l.max_connections == 0 || l.max_header_bytes < 1024 {
            return Err(
                "[limits] max_connections must be at least 1 and max_header_bytes at least 1024"
                    .into(),
            );
        }
        if l.max_header_bytes > 1 << 20 || !(16..=10_000).contains(&l.max_header_count) {
            return Err(
                "[limits] max_header_bytes must be at most 1048576 and max_header_count between 16 and 10000"
                    .into(),
            );
        }
        Ok(())
    }

    /// moat's own ports, which the redirect rules leave alone.
    pub fn own_ports(&self) -> crate::redirect::OwnPorts {
        crate::redirect::OwnPorts {
            admin: Some(self.admin.listen.port()),
            inbound: self.inbound.iter().map(|l| l.listen.port()).collect(),
        }
    }

    /// With `[redirect]`, each redirected connection is served by the
    /// `[[inbound]]` whose loopback `forward` port is its original port:
    /// that must be one listener.
    fn validate_transparent(&self) -> Result<(), String> {
        let name = crate::transparent::INBOUND_NAME;
        if let Some(l) = self.inbound.iter().find(|l| l.name == name) {
            return Err(format!(
                "[[inbound]] name {:?} is reserved for the transparent listener of [redirect]",
                l.name
            ));
        }
        if let Some(r) = &self.redirect {
            let taken = self
                .inbound
                .iter()
                .map(|l| (l.listen.port(), l.name.as_str()))
                .chain(
                    self.outbound
                        .iter()
                        .map(|l| (l.listen.port(), l.name.as_str())),
                )
                .chain([(self.admin.listen.port(), "admin")]);
            for (port, name) in taken {
                if port != 0
                    && (port == r.inbound_listener_port
                        || (r.outbound && port == r.outbound_listener_port))
                {
                    return Err(format!(
                        "listener {name:?} listens on port {port}, which [redirect] uses for a transparent listener"
                    ));
                }
            }
        }
        let mut seen: Vec<(u16, &str)> = Vec::new();
        for l in self.inbound.iter().filter(|l| l.forward.ip().is_loopback()) {
            let port = l.forward.port();
            if let Some((_, other)) = seen.iter().find(|(p, _)| *p == port) {
                return Err(format!(
                    "[[inbound]] {:?} and {other:?} both forward to port {port}; with [redirect] a redirected connection to that port must have one listener",
                    l.name
                ));
            }
            seen.push((port, &l.name));
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match &mut self.identity {
            Identity::Ca(ca) => {
                fix(&mut ca.bundle);
                fix(&mut ca.token_file);
                if let Some(dir) = &mut ca.state_dir {
                    fix(dir);
                }
            }
            Identity::Files(f) => {
                fix(&mut f.cert);
                fix(&mut f.key);
                fix(&mut f.bundle);
                if let Some(p) = &mut f.deny_list {
                    fix(p);
                }
            }
        }
        for l in &mut self.inbound {
            if let Some(p) = &mut l.policy {
                fix(p);
            }
        }
    }

    /// Warnings about configuration that widens exposure or leaves requests
    /// unauthorized; logged once at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in &self.inbound {
            if l.unsafe_forward {
                out.push(format!(
                    "inbound {}: unsafe_forward: plaintext to {} leaves this host",
                    l.name, l.forward
                ));
            }
            if let Some(old) = l.forward_http {
                out.push(format!(
                    "inbound {}: forward_http is deprecated; write app_protocol = {:?} (the version the service speaks{})",
                    l.name,
                    old.as_str(),
                    if old == AppProtocol::Auto {
                        "; \"auto\" now probes the service instead of following the caller"
                    } else {
                        ""
                    }
                ));
            }
            if l.protocol == Protocol::Http && l.policy.is_none() {
                out.push(format!(
                    "inbound {}: no route policy is set; every request from an allowed peer is forwarded",
                    l.name
                ));
            }
        }
        for l in &self.outbound {
            if l.unsafe_listen {
                out.push(format!(
                    "outbound {}: unsafe_listen: plaintext listener on {} is reachable off this host",
                    l.name, l.listen
                ));
            }
        }
        if self.tls.allow_tls12 {
            out.push("tls: allow_tls12: TLS 1.2 is accepted and offered".into());
        }
        out
    }
}

/// A TOML error as file, line, column and the offending line.
pub(crate) fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let located = moat_ca::toml_error::TomlError::new(path, text, e);
    ConfigError::Parse {
        file: located.file,
        line: located.line,
        column: located.column,
        message: located.message,
        context: located
            .source_line
            .map(|l| format!(" (at `{l}`)"))
            .unwrap_or_default(),
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = RawIdentity::deserialize(d)?;
        match (raw.ca_url, raw.token_file, raw.cert, raw.key) {
            (Some(CaUrls(ca_urls)), Some(token_file), None, None) => {
                if ca_urls.is_empty() {
                    return Err(D::Error::custom(
                        "identity.ca_url: name at least one CA URL",
                    ));
                }
                for (i, url) in ca_urls.iter().enumerate() {
                    if !url.starts_with("https://") {
                        return Err(D::Error::custom(format!(
                            "identity.ca_url {url:?} must be an https:// URL"
                        )));
                    }
                    if ca_urls[..i].contains(url) {
                        return Err(D::Error::custom(format!(
                            "identity.ca_url {url:?} is listed twice"
                        )));
                    }
                }
                let retry_base = raw.retry_base.unwrap_or(Duration::from_secs(1));
                let retry_max = raw.retry_max.unwrap_or(Duration::from_secs(60));
                let bundle_refresh = raw.bundle_refresh.unwrap_or(Duration::from_secs(300));
                if raw.deny_list.is_some() {
                    return Err(D::Error::custom(
                        "identity.deny_list applies to cert + key only: with ca_url the CA publishes the deny-list",
                    ));
                }
                if retry_base.is_zero() || retry_max < retry_base || bundle_refresh.is_zero() {
                    return Err(D::Error::custom(
                        "identity: retry_base and bundle_refresh must be positive, and retry_max at least retry_base",
                    ));
                }
                Ok(Identity::Ca(CaIdentity {
                    ca_urls,
                    bundle: raw.bundle,
                    token_file,
                    bundle_refresh,
                    ttl: raw.ttl,
                    retry_base,
                    retry_max,
                    state_dir: raw.state_dir,
                }))
            }
            (None, None, Some(cert), Some(key)) => {
                if raw.bundle_refresh.is_some()
                    || raw.retry_base.is_some()
                    || raw.retry_max.is_some()
                    || raw.state_dir.is_some()
                {
                    return Err(D::Error::custom(
                        "identity: bundle_refresh, retry_base, retry_max and state_dir apply to ca_url only",
                    ));
                }
                Ok(Identity::Files(FileIdentity {
                    cert,
                    key,
                    bundle: raw.bundle,
                    deny_list: raw.deny_list,
                }))
            }
            _ => Err(D::Error::custom(
                "identity: set either ca_url + token_file + bundle (certificates from the CA) or cert + key + bundle (files), not a mix",
            )),
        }
    }
}

impl Inbound {
    /// What the local service speaks (`app_protocol`, or the deprecated
    /// `forward_http`; `http1` when neither is set).
    pub fn app_protocol(&self) -> AppProtocol {
        self.app_protocol.or(self.forward_http).unwrap_or_default()
    }
}

impl AppProtocol {
    /// The value as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http1",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Auto => "auto",
        }
    }
}

impl UpgradeProtocol {
    /// The token, lowercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses one `Upgrade` token (RFC 9110 §7.8: `name[/version]`).
    /// `h2c` is refused: a connection upgraded to HTTP/2 would carry
    /// requests that no route policy ever sees.
    pub fn parse(s: &str) -> Result<Self, String> {
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        let valid = match s.split_once('/') {
            Some((name, version)) => token(name) && token(version),
            None => token(s),
        };
        if !valid {
            return Err(format!(
                "upgrade_protocols entry {s:?} is not a protocol token (e.g. \"websocket\")"
            ));
        }
        let lower = s.to_ascii_lowercase();
        if lower == "h2c" || lower.starts_with("h2c/") {
            return Err(
                "upgrade_protocols: \"h2c\" is refused: an upgraded connection's HTTP/2 requests would bypass route policy".into(),
            );
        }
        Ok(Self(lower))
    }
}

impl<'de> Deserialize<'de> for UpgradeProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UpgradeProtocol::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `ca_url`: one URL, or a list of them.
struct CaUrls(Vec<String>);

impl<'de> Deserialize<'de> for CaUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CaUrls;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an https:// URL, or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CaUrls, E> {
                Ok(CaUrls(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CaUrls, A::Error> {
                let mut urls = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    urls.push(url);
                }
                Ok(CaUrls(urls))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl PeerPattern {
    /// True when `id` matches this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            PeerPattern::Exact(want) => want == id,
            PeerPattern::Prefix(prefix) => id.as_str().starts_with(prefix.as_str()),
        }
    }

    /// Parses `spiffe://td/path`, `spiffe://td/path/*` or `spiffe://td/*`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |e: moat_ca::identity::IdError| format!("allow_peers entry {s:?}: {e}");
        match s.strip_suffix("/*") {
            Some(prefix) => {
                match SpiffeId::parse(prefix) {
                    Ok(_) => {}
                    Err(moat_ca::identity::IdError::NoPath) => {
                        let td = prefix.strip_prefix("spiffe://").unwrap_or(prefix);
                        TrustDomain::parse(td).map_err(bad)?;
                    }
                    Err(e) => return Err(bad(e)),
                }
                Ok(PeerPattern::Prefix(format!("{prefix}/")))
            }
            None => SpiffeId::parse(s).map(PeerPattern::Exact).map_err(bad),
        }
    }
}

impl From<SpiffeId> for PeerPattern {
    fn from(id: SpiffeId) -> Self {
        PeerPattern::Exact(id)
    }
}

impl fmt::Debug for PeerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerPattern::Exact(id) => write!(f, "{}", id.as_str()),
            PeerPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

impl<'de> Deserialize<'de> for PeerPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PeerPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Upstream::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Upstream {
    /// Parses `host:port` or `[v6]:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("upstream {s:?} must be host:port");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 || host.contains(['/', ' ', '@']) {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests;
