//! The transparent inbound listener: what peers send to the app's own
//! ports, each connection served by the `[[inbound]]` whose `forward` is
//! `127.0.0.1:<original port>`. A port no `[[inbound]]` forwards to is
//! refused: plaintext from outside never reaches the app.
//!
//! `mode = "strict"`: every connection goes straight into that listener's
//! TLS handshake (plaintext fails it, and is counted in
//! `moat_tls_handshake_failures_total` under the listener's name).
//! `mode = "permissive"`: the first byte decides: a TLS record goes to the
//! listener; anything else, or nothing within `detection_timeout`, is
//! spliced to the app as bytes, counted and logged with its source.
//! `opaque_ports` are never peeked at: mutual TLS only, whatever the mode
//! (a server-first protocol's plaintext client sends nothing to tell it
//! by, and would otherwise wait out the timeout on every connection).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::detect::{self, FirstBytes};
use super::{INBOUND_NAME, InboundMode, TransparentMetrics, original_dst};
use crate::config::Limits;
use crate::conn::{self, RelayConnectError, Serve};
use crate::{drain, inbound};

/// The `[[inbound]]` that serves one app port.
#[derive(Clone)]
pub struct PortTarget {
    /// The listener's service: its TLS, policy and forwarding.
    pub service: Arc<inbound::InboundService>,
    /// Where it forwards (the app, on loopback): permissive plaintext goes there.
    pub forward: SocketAddr,
}

/// How the transparent inbound listener treats what arrives.
#[derive(Debug, Clone)]
pub struct InboundSettings {
    /// Strict or permissive.
    pub mode: InboundMode,
    /// Ports never peeked at.
    pub opaque_ports: Vec<u16>,
    /// How long permissive mode waits for a first byte.
    pub detection_timeout: Duration,
}

/// The transparent inbound listener's state.
pub struct TransparentInbound {
    by_port: HashMap<u16, PortTarget>,
    listen_port: u16,
    settings: InboundSettings,
    limits: Limits,
    metrics: TransparentMetrics,
}

impl TransparentInbound {
    /// Binds `[::]:port` (IPv4 and IPv6; `0.0.0.0:port` where the host has
    /// no IPv6), serving connections by their original port with `by_port`.
    pub async fn bind(
        port: u16,
        by_port: HashMap<u16, PortTarget>,
        settings: InboundSettings,
        limits: &Limits,
        metrics: TransparentMetrics,
    ) -> Result<(conn::Listener<Self>, SocketAddr), crate::Error> {
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let (listener, addr) = match conn::bind(INBOUND_NAME, any6).await {
            Ok(bound) => bound,
            Err(crate::Error::Bind { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
            {
                conn::bind(
                    INBOUND_NAME,
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                )
                .await?
            }
            Err(e) => return Err(e),
        };
        if settings.mode == InboundMode::Permissive {
            tracing::warn!(
                listener = INBOUND_NAME,
                "mode = \"permissive\": plaintext reaches the app unauthenticated (each connection counted and logged); switch to \"strict\" once every client is meshed"
            );
        }
        let service = Self {
            by_port,
            listen_port: addr.port(),
            settings,
            limits: limits.clone(),
            metrics,
        };
        let max = limits.max_connections;
        let listener = conn::Listener::new(listener, addr, INBOUND_NAME.into(), max, service);
        Ok((listener, addr))
    }

    /// Splices a plaintext connection to the app (permissive mode).
    async fn plaintext(&self, tcp: TcpStream, addr: SocketAddr, dst: SocketAddr, to: SocketAddr) {
        let port = dst.port().to_string();
        self.metrics
            .plaintext
            .get_or_create(&[("port", port)])
            .inc();
        tracing::warn!(listener = INBOUND_NAME, peer_addr = %addr, original_dst = %dst, "permissive: plaintext connection forwarded to the app");
        let (connect, idle) = (self.limits.connect_timeout, self.limits.idle_timeout);
        match conn::relay_plain(tcp, to, connect, idle, INBOUND_NAME).await {
            Ok(()) => {}
            Err(RelayConnectError::Refused(e)) => {
                tracing::warn!(listener = INBOUND_NAME, forward = %to, error = %e, "permissive: the app refused the connection");
            }
            Err(RelayConnectError::TimedOut) => {
                tracing::warn!(listener = INBOUND_NAME, forward = %to, "permissive: connecting to the app timed out");
            }
        }
    }
}

impl Serve for TransparentInbound {
    async fn connection(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr, drain: drain::Watch) {
        let dst = match original_dst(&tcp) {
            Ok(dst) => dst,
            Err(e) => {
                tracing::info!(listener = INBOUND_NAME, peer_addr = %addr, error = %e, "refused: no original destination (not redirected?)");
                return;
            }
        };
        // A connection made to this port directly was not redirected; its
        // "original" port is ours, and forwarding it would loop.
        let target = (dst.port() != self.listen_port)
            .then(|| self.by_port.get(&dst.port()))
            .flatten()
            .cloned();
        let Some(target) = target else {
            tracing::info!(listener = INBOUND_NAME, peer_addr = %addr, original_dst = %dst, "refused: no [[inbound]] forwards to this port");
            return;
        };
        let peek = self.settings.mode == InboundMode::Permissive
            && !self.settings.opaque_ports.contains(&dst.port());
        if peek {
            match detect::first_bytes(&tcp, self.settings.detection_timeout).await {
                FirstBytes::Tls => {}
                FirstBytes::Closed => return,
                FirstBytes::Plaintext => {
                    return Box::pin(self.plaintext(tcp, addr, dst, target.forward)).await;
                }
                FirstBytes::Timeout => {
                    let port = dst.port().to_string();
                    self.metrics
                        .detection_timeouts
                        .get_or_create(&[("port", port)])
                        .inc();
                    tracing::info!(listener = INBOUND_NAME, peer_addr = %addr, original_dst = %dst, "permissive: nothing sent within detection_timeout; served as plaintext");
                    return Box::pin(self.plaintext(tcp, addr, dst, target.forward)).await;
                }
            }
        }
        target.service.connection(tcp, addr, drain).await;
    }
}
