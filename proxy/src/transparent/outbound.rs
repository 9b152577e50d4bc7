//! The transparent outbound listener: what the app dials, redirected by the
//! `output` rules to `127.0.0.1:15001` (`[::1]:15001` for IPv6).
//!
//! Each connection's original destination is looked up in the
//! `[[destination]]` table. A match is served exactly as an explicit
//! `[[outbound]]` would serve it ([`crate::outbound::OutboundService`]: pooled
//! HTTP/1.1, multiplexed HTTP/2, upgrades, limits, metrics, access log),
//! with the original `ip:port` as its upstream and the entry's peer pattern
//! pinned in the handshake: the peer pod's redirect rules hand that
//! connection to its transparent inbound. One such path (and its pool) is
//! kept per entry and address. Anything else follows `unmatched`: plain TCP
//! to where the app was going (`passthrough`), or closed (`deny`); either
//! way counted per destination.
//!
//! A loop is refused: when moat runs as neither `proxy_uid` nor
//! `proxy_gid`, the rules redirect its own connections (to peers, and
//! passed through) back to this listener, where each would open another,
//! until the connection limit. Then every connection is checked for coming
//! from moat's own process (`original_dst::from_this_process`); one that
//! does is closed, logged as an error and counted (`outcome="loop"`), so
//! the app's connection fails at once instead.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;

use super::destinations::DestinationTable;
use super::original_dst::{self as odst, original_dst};
use super::{OUTBOUND_NAME, TransparentMetrics, Unmatched, detect};
use crate::config::{Limits, Upstream};
use crate::conn::{self, RelayConnectError, Serve};
use crate::outbound::{OutboundService, PeerTarget};
use crate::telemetry::Observability;
use crate::tls::{CredentialStore, TlsFactory};
use crate::{drain, redirect::RedirectConfig};

/// Most (destination, address) paths kept with their connection pools; a
/// `cidr` entry could otherwise grow the map without bound. Past it, a
/// connection gets a path of its own, dropped with it.
const MAX_PATHS: usize = 4096;

/// The transparent outbound listener's state (shared by its IPv4 and IPv6
/// sockets).
pub struct TransparentOutbound {
    table: Arc<DestinationTable>,
    unmatched: Unmatched,
    opaque_ports: Vec<u16>,
    detection_timeout: Duration,
    listen_port: u16,
    limits: Limits,
    tls: TlsFactory,
    store: Arc<CredentialStore>,
    obs: Observability,
    metrics: TransparentMetrics,
    paths: Mutex<HashMap<(usize, SocketAddr), Arc<OutboundService>>>,
    /// moat's own connections are redirected back to it (it runs as
    /// neither `proxy_uid` nor `proxy_gid`): check each for a loop.
    self_redirected: bool,
}

/// Everything the transparent outbound listener is built from.
pub struct OutboundParts<'a> {
    /// `[redirect]`.
    pub redirect: &'a RedirectConfig,
    /// The destination table.
    pub table: Arc<DestinationTable>,
    /// `[limits]`.
    pub limits: &'a Limits,
    /// TLS configurations.
    pub tls: &'a TlsFactory,
    /// The workload's credentials.
    pub store: Arc<CredentialStore>,
    /// Metrics and tracing.
    pub obs: &'a Observability,
    /// The transparent metrics.
    pub metrics: TransparentMetrics,
}

impl TransparentOutbound {
    /// Binds `127.0.0.1:outbound_listener_port` and, where the host has
    /// IPv6, `[::1]` on the same port.
    pub async fn bind(
        parts: OutboundParts<'_>,
    ) -> Result<Vec<(conn::Listener<Arc<Self>>, SocketAddr)>, crate::Error> {
        let port = parts.redirect.outbound_listener_port;
        let (v4, addr4) =
            conn::bind(OUTBOUND_NAME, SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
        let v6 =
            match conn::bind(OUTBOUND_NAME, SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await {
                Ok(bound) => Some(bound),
                Err(crate::Error::Bind { source, .. })
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                    ) =>
                {
                    None
                }
                Err(e) => return Err(e),
            };
        let r = parts.redirect;
        let self_redirected = self_redirected(r);
        let state = Arc::new(Self {
            table: parts.table,
            unmatched: r.unmatched,
            opaque_ports: r.opaque_ports.clone(),
            detection_timeout: r.detection_timeout,
            listen_port: addr4.port(),
            limits: parts.limits.clone(),
            tls: parts.tls.clone(),
            store: parts.store,
            obs: parts.obs.clone(),
            metrics: parts.metrics,
            paths: Mutex::default(),
            self_redirected,
        });
        let max = parts.limits.max_connections;
        let mut out = Vec::new();
        for (listener, addr) in std::iter::once((v4, addr4)).chain(v6) {
            let l = conn::Listener::new(listener, addr, OUTBOUND_NAME.into(), max, state.clone());
            out.push((l, addr));
        }
        Ok(out)
    }

    /// The path to `dst` for the entry `index`, made on first use.
    fn path(&self, index: usize, dst: SocketAddr) -> Result<Arc<OutboundService>, crate::Error> {
        let key = (index, dst);
        if let Some(p) = self.paths.lock().expect("paths").get(&key) {
            return Ok(p.clone());
        }
        let entry = &self.table.entries()[index];
        let target = PeerTarget {
            name: format!("{OUTBOUND_NAME}/{}", entry.name).into(),
            upstream: Upstream {
                host: dst.ip().to_canonical().to_string(),
                port: dst.port(),
            },
            peer: entry.config.peer.clone(),
            protocol: entry.config.listener_protocol(),
            upgrades: vec![
                crate::config::UpgradeProtocol::parse("websocket").expect("a valid protocol token"),
            ],
        };
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.listen_port));
        let service = Arc::new(OutboundService::new(
            target,
            &self.limits,
            &self.tls,
            self.store.clone(),
            &self.obs,
            listen,
        )?);
        let mut paths = self.paths.lock().expect("paths");
        if paths.len() < MAX_PATHS {
            paths.entry(key).or_insert_with(|| service.clone());
        }
        Ok(service)
    }

    /// Which entry serves a connection to `dst`, if any.
    async fn choose(&self, tcp: &TcpStream, dst: SocketAddr) -> Option<usize> {
        let candidates = self.table.matching(dst);
        match candidates.as_slice() {
            [] => None,
            [one] => Some(*one),
            [first, ..] => {
                let http = self.table.entries()[*first].config.is_http();
                let host = if http && !self.opaque_ports.contains(&dst.port()) {
                    detect::request_authority(tcp, self.detection_timeout).await
                } else {
                    None
                };
                Some(self.table.select(&candidates, host.as_deref()))
            }
        }
    }

    /// Plain TCP to where the app was going.
    async fn passthrough(&self, tcp: TcpStream, dst: SocketAddr) {
        let _open = self.obs.metrics.connection_opened(OUTBOUND_NAME);
        let (connect, idle) = (self.limits.connect_timeout, self.limits.idle_timeout);
        match conn::relay_plain(tcp, dst, connect, idle, OUTBOUND_NAME).await {
            Ok(()) => {}
            Err(RelayConnectError::Refused(e)) => {
                tracing::info!(listener = OUTBOUND_NAME, original_dst = %dst, error = %e, "passthrough: cannot connect");
            }
            Err(RelayConnectError::TimedOut) => {
                tracing::info!(listener = OUTBOUND_NAME, original_dst = %dst, "passthrough: connect timed out");
            }
        }
    }
}

/// True when the redirect rules built from `r` would send moat's own
/// connections back to it: it runs as neither `proxy_uid` nor `proxy_gid`
/// (the socket owner the rules exempt). Logged once, as a warning.
fn self_redirected(r: &RedirectConfig) -> bool {
    use std::path::Path;
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let is = |owner: &crate::redirect::Owner, id: u32, file: &str| {
        crate::redirect::resolve(owner, Path::new(file), "").is_ok_and(|want| want == id)
    };
    let exempt = is(&r.proxy_uid, uid, "/etc/passwd")
        || r.proxy_gid
            .as_ref()
            .is_some_and(|g| is(g, gid, "/etc/group"));
    if !exempt {
        tracing::warn!(
            uid,
            gid,
            proxy_uid = %r.proxy_uid,
            // Absent when unset (Option's Debug, `None`, told an operator nothing).
            proxy_gid = r.proxy_gid.as_ref().map(tracing::field::display),
            "[redirect] outbound: moat runs as neither proxy_uid nor proxy_gid, so the rules redirect its own connections back to it; each such loop is refused (outcome=\"loop\"), and calls to peers and passed-through destinations fail: run moat as proxy_uid"
        );
    }
    !exempt
}

impl Serve for Arc<TransparentOutbound> {
    async fn connection(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr, drain: drain::Watch) {
        let this: &Arc<TransparentOutbound> = &self;
        let dst = match original_dst(&tcp) {
            Ok(dst) => dst,
            Err(e) => {
                tracing::info!(listener = OUTBOUND_NAME, peer_addr = %addr, error = %e, "refused: no original destination (not redirected?)");
                return;
            }
        };
        // Dialed directly (loopback is never redirected): there is nowhere
        // else to go, and passing it through would loop.
        if dst.ip().to_canonical().is_loopback() && dst.port() == this.listen_port {
            tracing::info!(listener = OUTBOUND_NAME, peer_addr = %addr, "refused: a direct connection, not a redirected one");
            return;
        }
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        if this.self_redirected && odst::from_this_process(addr, dst) {
            this.metrics.unmatched(dst, "loop");
            tracing::error!(listener = OUTBOUND_NAME, original_dst = %dst, "refused: a redirect loop: moat's own connection was redirected back to it, because moat runs as neither [redirect] proxy_uid nor proxy_gid; run it as proxy_uid");
            return;
        }
        let Some(index) = this.choose(&tcp, dst).await else {
            match this.unmatched {
                Unmatched::Passthrough => {
                    // Looping, moat's own connection to `dst` comes back
                    // here and is counted as the loop: one outcome per
                    // app connection, not a passthrough and a loop.
                    if !this.self_redirected {
                        this.metrics.unmatched(dst, "passthrough");
                    }
                    tracing::debug!(listener = OUTBOUND_NAME, original_dst = %dst, "no [[destination]]: passed through as plain TCP");
                    Box::pin(this.passthrough(tcp, dst)).await;
                }
                Unmatched::Deny => {
                    this.metrics.unmatched(dst, "denied");
                    tracing::info!(listener = OUTBOUND_NAME, original_dst = %dst, "refused: no [[destination]] matches (unmatched = \"deny\")");
                }
            }
            return;
        };
        let entry = &this.table.entries()[index];
        this.metrics.outbound(&entry.name, "matched");
        match this.path(index, dst) {
            Ok(path) => Box::pin(path.connection(tcp, addr, drain)).await,
            Err(e) => {
                tracing::warn!(listener = OUTBOUND_NAME, destination = %entry.name, original_dst = %dst, error = %e, "cannot build the path to the destination");
            }
        }
    }
}
