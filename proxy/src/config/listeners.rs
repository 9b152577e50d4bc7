//! `[[inbound]]` and `[[outbound]]`: the listeners, the protocol each
//! speaks, the app's HTTP version, the upgrades they pass, the peers they
//! accept or pin, and an outbound's upstream.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use moat_ca::{SpiffeId, TrustDomain};
use serde::Deserialize;

use super::socket_addr;

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

fn default_upgrade_protocols() -> Vec<UpgradeProtocol> {
    vec![UpgradeProtocol("websocket".into())]
}

impl Inbound {
    /// What the local service speaks (`app_protocol`, or the deprecated
    /// `forward_http`; `http1` when neither is set).
    pub fn app_protocol(&self) -> AppProtocol {
        self.app_protocol.or(self.forward_http).unwrap_or_default()
    }

    /// `allow_peers` as an operator writes it, for logs: the patterns
    /// separated by commas, or `any-peer` when the entry is absent (any
    /// verified peer of the trust domain, as a route's `allow = "any-peer"`).
    pub fn allow_peers_text(&self) -> String {
        match &self.allow_peers {
            None => "any-peer".to_owned(),
            Some(patterns) => patterns
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }
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

impl PeerPattern {
    /// True when `id` matches this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            PeerPattern::Exact(want) => want == id,
            PeerPattern::Prefix(prefix) => id.as_str().starts_with(prefix.as_str()),
        }
    }

    /// The trust domain the pattern names (`example.org` of
    /// `spiffe://example.org/ns/*`).
    pub fn trust_domain_name(&self) -> &str {
        match self {
            PeerPattern::Exact(id) => id.trust_domain_name(),
            PeerPattern::Prefix(prefix) => prefix
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default(),
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

/// As written in the configuration: `spiffe://td/path` or `spiffe://td/path/*`.
impl fmt::Display for PeerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerPattern::Exact(id) => f.write_str(id.as_str()),
            PeerPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

impl fmt::Debug for PeerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
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
