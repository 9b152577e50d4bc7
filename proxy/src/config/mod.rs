//! The proxy's configuration file (TOML).
//!
//! Parsed once, strictly (unknown fields are errors), into typed values:
//! after [`Config::load`] the rest of the proxy never sees a string that
//! should have been a `SocketAddr`, a `SpiffeId` or a `Duration`. Errors name
//! the file, line and column, and quote the offending line so the field is
//! plain to see.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use moat_ca::toml_error::Step;
use serde::Deserialize;

mod identity;
mod limits;
mod listeners;

pub use identity::{CaIdentity, FileIdentity, Identity};
pub use limits::Limits;
pub use listeners::{
    AppProtocol, Inbound, Outbound, PeerPattern, Protocol, UpgradeProtocol, Upstream,
};

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

/// The admin listener's port when `[admin] listen` is not set.
pub const DEFAULT_ADMIN_PORT: u16 = 9901;

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
        // Checks across fields run on the parsed values, which carry no
        // position: each failure names the value it is about, found again
        // in the text, so that it points there as a parse error would.
        config
            .validate()
            .map_err(|invalid| invalid.locate(path, text))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Every listener name, inbound then outbound.
    fn validate(&self) -> Result<(), Invalid> {
        let transparent_out = self.redirect.as_ref().is_some_and(|r| r.outbound);
        if self.inbound.is_empty() && self.outbound.is_empty() && !transparent_out {
            return Err(Invalid::new(
                "no [[inbound]] or [[outbound]] listener is configured",
            ));
        }
        if !self.destination.is_empty() && !transparent_out {
            return Err(Invalid::new(
                "[[destination]] needs [redirect] with outbound = true: only redirected connections are looked up in it",
            )
            .at(["destination"]));
        }
        let mut destinations: Vec<String> = Vec::new();
        for (i, d) in self.destination.iter().enumerate() {
            d.validate(i)
                .map_err(|e| Invalid::new(e).at_entry("destination", i, None))?;
            let label = d.label(i);
            if destinations.contains(&label) {
                return Err(Invalid::new(format!(
                    "[[destination]] {label:?} is named twice (set name = to tell them apart)"
                ))
                .at_entry("destination", i, None));
            }
            destinations.push(label);
        }
        let mut names: Vec<&str> = vec!["admin"];
        let inbound = self.inbound.iter().enumerate();
        let outbound = self.outbound.iter().enumerate();
        let all = inbound
            .map(|(i, l)| ("inbound", i, &l.name))
            .chain(outbound.map(|(i, l)| ("outbound", i, &l.name)));
        for (kind, i, name) in all {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(Invalid::new(format!(
                    "[[{kind}]] name {name:?}: use letters, digits, '-', '_' or '.'"
                ))
                .at_entry(kind, i, Some("name")));
            }
            if names.contains(&name.as_str()) {
                return Err(Invalid::new(format!(
                    "[[{kind}]] name {name:?} is used twice (or is the reserved name \"admin\")"
                ))
                .at_entry(kind, i, Some("name")));
            }
            names.push(name);
        }
        for (i, l) in self.inbound.iter().enumerate() {
            if !l.forward.ip().is_loopback() && !l.unsafe_forward {
                return Err(Invalid::new(format!(
                    "[[inbound]] {:?}: forward = {} is off loopback; plaintext would cross a network (set unsafe_forward = true to allow)",
                    l.name, l.forward
                ))
                .at_entry("inbound", i, Some("forward")));
            }
            if l.protocol == Protocol::Tcp && l.policy.is_some() {
                return Err(Invalid::new(format!(
                    "[[inbound]] {:?}: policy applies to protocol = \"http\" only; a tcp listener authorizes by allow_peers",
                    l.name
                ))
                .at_entry("inbound", i, Some("policy")));
            }
            if l.app_protocol.is_some() && l.forward_http.is_some() {
                return Err(Invalid::new(format!(
                    "[[inbound]] {:?}: forward_http is the old name of app_protocol; set app_protocol only",
                    l.name
                ))
                .at_entry("inbound", i, Some("forward_http")));
            }
            if matches!(&l.allow_peers, Some(p) if p.is_empty()) {
                return Err(Invalid::new(format!(
                    "[[inbound]] {:?}: allow_peers = [] would refuse every peer; remove it to allow the whole trust domain",
                    l.name
                ))
                .at_entry("inbound", i, Some("allow_peers")));
            }
        }
        for (i, l) in self.outbound.iter().enumerate() {
            if !l.listen.ip().is_loopback() && !l.unsafe_listen {
                return Err(Invalid::new(format!(
                    "[[outbound]] {:?}: listen = {} is off loopback; anyone on the network could use this identity (set unsafe_listen = true to allow)",
                    l.name, l.listen
                ))
                .at_entry("outbound", i, Some("listen")));
            }
        }
        if let Some(r) = &self.redirect {
            r.validate(&self.own_ports())
                .map_err(|e| Invalid::new(format!("[redirect] {e}")).at(["redirect"]))?;
            self.validate_transparent().map_err(Invalid::new)?;
        }
        let l = &self.limits;
        let limits = |message: &str, field: &str| Err(Invalid::new(message).at(["limits", field]));
        if l.max_connections == 0 {
            return limits(
                "[limits] max_connections must be at least 1",
                "max_connections",
            );
        }
        if !(1024..=1 << 20).contains(&l.max_header_bytes) {
            return limits(
                "[limits] max_header_bytes must be at least 1024 and at most 1048576",
                "max_header_bytes",
            );
        }
        if !(16..=10_000).contains(&l.max_header_count) {
            return limits(
                "[limits] max_header_count must be between 16 and 10000",
                "max_header_count",
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

/// A TOML error as file, line, column and the offending line. A table's
/// own check (`[identity]`'s) is raised at the table; when its message
/// starts with the field it is about (`identity.deny_list ...`), it
/// points at that field's value instead.
pub(crate) fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    use moat_ca::toml_error::TomlError;
    let located = TomlError::new(path, text, e);
    // Only ever further in: an error already inside the field's value
    // (one URL of a list) is more precise than the field.
    let field = TomlError::at_named_field(path, text, &located.message)
        .filter(|f| (f.line, f.column) > (located.line, located.column));
    located_error(field.unwrap_or(located))
}

fn located_error(located: moat_ca::toml_error::TomlError) -> ConfigError {
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

/// A check across fields that failed, and the value it is about (none:
/// the whole file).
#[derive(Debug)]
struct Invalid {
    message: String,
    at: Vec<Step>,
}

impl Invalid {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            at: Vec::new(),
        }
    }

    /// About the value at these keys.
    fn at<const N: usize>(mut self, keys: [&str; N]) -> Self {
        self.at = keys.iter().map(|k| Step::Key((*k).to_owned())).collect();
        self
    }

    /// About entry `index` of `[[table]]`, or its `field`.
    fn at_entry(mut self, table: &str, index: usize, field: Option<&str>) -> Self {
        self.at = vec![Step::Key(table.to_owned()), Step::Index(index)];
        self.at.extend(field.map(|f| Step::Key(f.to_owned())));
        self
    }

    /// The error, placed at the value it names when the text has it (a
    /// value left to its default is not in the text: the file is named alone).
    fn locate(self, path: &Path, text: &str) -> ConfigError {
        match moat_ca::toml_error::TomlError::at_value(path, text, &self.at, &self.message) {
            Some(located) => located_error(located),
            None => ConfigError::Invalid {
                file: path.to_owned(),
                message: self.message,
            },
        }
    }
}

#[cfg(test)]
mod tests;
