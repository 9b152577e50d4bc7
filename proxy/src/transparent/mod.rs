//! Transparent mode: the connections that the redirect rules (`moat
//! redirect`, [`crate::redirect`]) send to moat, and where they were going.
//!
//! - [`original_dst`] reads a redirected connection's original destination
//!   from conntrack (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).
//! - [`TransparentInbound`] (`[::]:15006`) takes what peers send to the
//!   app's own ports and hands each connection to the `[[inbound]]` that
//!   forwards to `127.0.0.1:<original port>`: mutual TLS, `allow_peers`,
//!   route policy, forwarding, as on that listener. `mode = "permissive"`
//!   also lets plaintext through, told apart by its first byte (`detect`).
//! - [`TransparentOutbound`] (`127.0.0.1:15001`, `[::1]:15001`) takes what
//!   the app dials and looks the original destination up in the
//!   `[[destination]]` table (`destinations`): a match goes over mutual
//!   TLS, with the entry's peer ID pinned, to the original address (where
//!   the peer pod's own rules send it to its transparent inbound), through
//!   the same code as an explicit `[[outbound]]` (`outbound.rs`); no
//!   match is passed through as plain TCP or refused (`unmatched`). Host
//!   names are resolved on their TTL (`dns`); entries that share an
//!   address are told apart by the first request's `Host` or h2c
//!   `:authority` (`detect`); moat's own connections redirected back to
//!   it (it does not run as `proxy_uid`) are refused as loops.
//!
//! Everything is counted ([`TransparentMetrics`]) and the admin listener
//! shows the configuration and the resolved table at `/transparent`.

mod destinations;
mod detect;
mod dns;
pub(crate) mod inbound;
mod original_dst;
pub(crate) mod outbound;

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;

pub use destinations::{Destination, DestinationTable};
pub use inbound::TransparentInbound;
pub use original_dst::original_dst;
pub use outbound::TransparentOutbound;

use crate::telemetry::ProxyMetrics;

/// The name of the transparent inbound listener in logs and metrics.
pub const INBOUND_NAME: &str = "transparent-inbound";
/// The name of the transparent outbound listener in logs and metrics.
pub const OUTBOUND_NAME: &str = "transparent-outbound";

/// `[redirect] mode`: what the transparent inbound listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// Only mutual TLS from a verified peer reaches the app.
    #[default]
    Strict,
    /// Mutual TLS, or plaintext (for migrating a live service): plaintext
    /// is forwarded to the app as bytes, counted and logged with its source.
    Permissive,
}

/// `[redirect] unmatched`: what the transparent outbound listener does with
/// a destination no `[[destination]]` matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Plain TCP to the original destination, counted per destination.
    #[default]
    Passthrough,
    /// The connection is closed, counted per destination.
    Deny,
}

impl Unmatched {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Unmatched::Passthrough => "passthrough",
            Unmatched::Deny => "deny",
        }
    }
}

/// The transparent listeners' own metrics (the matched traffic is also
/// counted by the request and handshake metrics, under the listener name
/// `transparent-outbound/<destination>`).
#[derive(Clone)]
pub struct TransparentMetrics {
    /// Outbound connections by destination and outcome (`matched`,
    /// `passthrough`, `denied`, `loop`).
    pub outbound: Family<[(&'static str, String); 2], Counter>,
    /// Permissive mode: plaintext connections let through, by original port.
    pub plaintext: Family<[(&'static str, String); 1], Counter>,
    /// Permissive mode: connections that sent nothing within the detection
    /// timeout, by original port.
    pub detection_timeouts: Family<[(&'static str, String); 1], Counter>,
    /// Unmatched destinations given a label of their own so far (the rest
    /// are counted as `other`, so that the label set stays bounded).
    unmatched_seen: std::sync::Arc<Mutex<HashSet<String>>>,
}

/// Distinct unmatched destinations counted by `ip:port`; more are `other`.
const MAX_UNMATCHED_LABELS: usize = 1000;

impl TransparentMetrics {
    /// Registers the families with the proxy's registry.
    pub fn register(metrics: &ProxyMetrics) -> Self {
        let this = Self {
            outbound: Family::default(),
            plaintext: Family::default(),
            detection_timeouts: Family::default(),
            unmatched_seen: Default::default(),
        };
        metrics.register(
            "moat_transparent_outbound_connections",
            "Transparent outbound connections by destination and outcome (matched: mutual TLS to the destination's peer; passthrough: plain TCP; denied; loop: moat's own connection redirected back to it, refused)",
            this.outbound.clone(),
        );
        metrics.register(
            "moat_transparent_inbound_plaintext_connections",
            "Permissive mode: plaintext connections forwarded to the app, by port",
            this.plaintext.clone(),
        );
        metrics.register(
            "moat_transparent_detection_timeouts",
            "Permissive mode: connections that sent nothing within detection_timeout (served as plaintext), by port",
            this.detection_timeouts.clone(),
        );
        this
    }

    /// Counts one outbound connection to `destination` with `outcome`.
    pub fn outbound(&self, destination: &str, outcome: &str) {
        self.outbound
            .get_or_create(&[
                ("destination", destination.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// Counts one unmatched outbound connection, labelled by its address
    /// while fewer than `MAX_UNMATCHED_LABELS` have been seen.
    pub fn unmatched(&self, dst: std::net::SocketAddr, outcome: &str) {
        let label = dst.to_string();
        let label = {
            let mut seen = self.unmatched_seen.lock().expect("unmatched labels");
            if seen.contains(&label) || seen.len() < MAX_UNMATCHED_LABELS {
                seen.insert(label.clone());
                label
            } else {
                "other".to_owned()
            }
        };
        self.outbound(&label, outcome);
    }
}

/// What the admin listener shows at `/transparent`: the `[redirect]`
/// settings in force and the destination table with the addresses its
/// host names resolve to now.
pub fn admin_view(
    r: &crate::redirect::RedirectConfig,
    table: Option<&DestinationTable>,
) -> serde_json::Value {
    use serde_json::json;
    let owner = |o: &crate::redirect::Owner| match o {
        crate::redirect::Owner::Id(id) => json!(id),
        crate::redirect::Owner::Name(n) => json!(n),
    };
    let inbound_ports = match &r.inbound_ports {
        crate::redirect::InboundPorts::All => json!("all"),
        crate::redirect::InboundPorts::Listed(p) => json!(p),
    };
    let destinations: Vec<serde_json::Value> = table
        .map(|t| {
            let resolved = t.resolved();
            t.entries()
                .iter()
                .zip(resolved.iter())
                .map(|(e, addrs)| {
                    let c = &e.config;
                    let addresses: Vec<String> = match (&c.host, c.ip, c.cidr) {
                        (Some(_), _, _) => {
                            addrs.iter().map(std::string::ToString::to_string).collect()
                        }
                        (None, Some(ip), _) => vec![ip.to_string()],
                        (None, None, Some(cidr)) => vec![cidr.to_string()],
                        (None, None, None) => vec!["any".to_owned()],
                    };
                    json!({
                        "name": &*e.name,
                        "host": c.host,
                        "port": c.port,
                        "addresses": addresses,
                        "peer": format!("{:?}", c.peer),
                        "protocol": format!("{:?}", c.protocol).to_lowercase(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "redirect": {
            "inbound_listener_port": r.inbound_listener_port,
            "outbound_listener_port": r.outbound_listener_port,
            "inbound_ports": inbound_ports,
            "skip_inbound_ports": r.skip_inbound_ports,
            "outbound": r.outbound,
            "skip_outbound_ports": r.skip_outbound_ports,
            "skip_outbound_cidrs": r.skip_outbound_cidrs.iter().map(std::string::ToString::to_string).collect::<Vec<_>>(),
            "proxy_uid": owner(&r.proxy_uid),
            "proxy_gid": r.proxy_gid.as_ref().map(owner),
            "mode": format!("{:?}", r.mode).to_lowercase(),
            "opaque_ports": r.opaque_ports,
            "detection_timeout": humantime::format_duration(r.detection_timeout).to_string(),
            "unmatched": r.unmatched.as_str(),
            "dns_refresh": humantime::format_duration(r.dns_refresh).to_string(),
            "dns_min_refresh": humantime::format_duration(dns::MIN_REFRESH).to_string(),
        },
        "destinations": destinations,
    })
}
