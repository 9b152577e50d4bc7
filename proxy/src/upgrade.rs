//! HTTP/1.1 `Upgrade` through the sidecars: WebSocket, and any other
//! protocol a listener lists in `upgrade_protocols`.
//!
//! An upgrade request is a request like any other until its answer: the
//! inbound authorizes it by route policy (peer, JWT) and the outbound sends
//! it to the peer named in its configuration. It then goes upstream on an
//! HTTP/1.1 connection of its own ([`crate::upstream::UpstreamClient::send_upgrade`]),
//! and a `101 Switching Protocols` is relayed to the caller. From then on
//! the two connections are spliced: bytes both ways, with back-pressure
//! (each direction has one small buffer and reads only when it has
//! written), the listener's idle timeout, and `moat_upgraded_connections`
//! counting it while it lasts. The connection stays the caller's
//! connection: it holds its slot under `max_connections`, and on SIGTERM
//! it keeps working until its ends close it or `shutdown_grace` runs out.
//!
//! Between sidecars an upgraded request always takes an HTTP/1.1 connection
//! of its own (ALPN `http/1.1`), even when the caller's other requests share
//! one HTTP/2 connection, rather than an RFC 8441 extended CONNECT stream on
//! that connection: a long-lived tunnel then has no HTTP/2 flow-control
//! windows or framing between its bytes, does not share the fate of other
//! callers' streams (a GOAWAY, a keep-alive timeout, a stalled reader), and
//! needs no translation between the HTTP/1.1 and HTTP/2 forms of a
//! WebSocket handshake (RFC 6455 keys against `:protocol`); the cost is one
//! TLS handshake per upgraded connection, which lives long enough to repay
//! it. For the same reason moat does not offer extended CONNECT to callers
//! (`SETTINGS_ENABLE_CONNECT_PROTOCOL` is never sent): WebSocket clients
//! that find it missing use HTTP/1.1, as browsers do.
//!
//! Which protocols: `websocket` unless a listener says otherwise. Other
//! tokens pass only when listed, because after a 101 the route policy no
//! longer sees what flows; `h2c` can never be listed (its requests would
//! bypass the policy altogether). An `Upgrade` the listener does not pass
//! is removed and the request forwarded as a plain one, as a server that
//! does not know the protocol would treat it (RFC 9110 §7.8).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body::ProxyBody;
use crate::config::{Limits, UpgradeProtocol};
use crate::conn::{self, Activity};
use crate::head_limits::head_within;
use crate::headers::strip_hop_by_hop;
use crate::proxy_error::ProxyError;
use crate::telemetry::ProxyMetrics;
use crate::upstream::{Dial, UpstreamClient};

/// An upgrade the listener passes: the protocol, and the caller's side of
/// the connection once the 101 has been written.
pub(crate) struct Upgrade {
    /// The protocol, as configured (lowercase); the metric's label.
    pub protocol: UpgradeProtocol,
    /// The `Upgrade` value sent upstream: the caller's token for it.
    pub token: HeaderValue,
    client: OnUpgrade,
}

/// A spliced pair of upgraded connections, run by the caller's connection
/// task once hyper has handed it over.
pub(crate) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a request handler leaves its tunnel for the connection task.
#[derive(Default)]
pub(crate) struct TunnelSlot(Mutex<Option<Tunnel>>);

/// What a tunnel needs of its listener.
pub(crate) struct TunnelContext<'a> {
    /// The listener's name (logs, metric).
    pub listener: &'a str,
    /// The metrics.
    pub metrics: &'a ProxyMetrics,
    /// The caller's connection's activity (its reads and writes touch it).
    pub activity: Arc<Activity>,
    /// The listener's idle timeout.
    pub idle: Duration,
}

impl TunnelSlot {
    /// Leaves a tunnel to run after the HTTP connection hands over.
    pub(crate) fn put(&self, tunnel: Tunnel) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tunnel);
    }

    /// The tunnel left by a request, if any.
    pub(crate) fn take(&self) -> Option<Tunnel> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// The upgrade a request asks for, if `allowed` passes it: the first token
/// of its `Upgrade` header (`value`) that is listed. Takes the caller's
/// side of the connection from the request's extensions (there only on an
/// HTTP/1.1 connection served with upgrades). Boxed: a request future
/// holds a pointer for it, and only an upgrade pays for the rest.
pub(crate) fn accept(
    value: &HeaderValue,
    allowed: &[UpgradeProtocol],
    extensions: &mut http::Extensions,
) -> Option<Box<Upgrade>> {
    let (protocol, token) = choose(value, allowed)?;
    let client = extensions.remove::<OnUpgrade>()?;
    Some(Box::new(Upgrade {
        protocol,
        token,
        client,
    }))
}

/// The first token of an `Upgrade` value that `allowed` lists, and the
/// caller's spelling of it.
fn choose(
    value: &HeaderValue,
    allowed: &[UpgradeProtocol],
) -> Option<(UpgradeProtocol, HeaderValue)> {
    value
        .to_str()
        .ok()?
        .split(',')
        .map(str::trim)
        .find_map(|t| {
            let p = allowed
                .iter()
                .find(|p| p.as_str().eq_ignore_ascii_case(t))?;
            Some((p.clone(), HeaderValue::from_str(t).ok()?))
        })
}

impl Upgrade {
    /// Marks a request head as this upgrade (`Connection: upgrade` and the
    /// `Upgrade` token), after the hop-by-hop headers were stripped.
    pub(crate) fn mark(&self, headers: &mut http::HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.token.clone());
    }

    /// Sends the upgrade request on a connection of its own (never
    /// pooled), relays the answer, and after a 101 leaves the tunnel in
    /// `slot` for the caller's connection task. Inbound and outbound forward
    /// upgrades alike; only whose connection the tunnel belongs to differs.
    pub(crate) async fn forward<D: Dial>(
        self: Box<Self>,
        upstream: &UpstreamClient<D>,
        req: Request<Incoming>,
        limits: &Limits,
        cx: TunnelContext<'_>,
        slot: &TunnelSlot,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let resp = upstream.send_upgrade(req).await?;
        let (resp, tunnel) = (*self).relay(resp, limits, cx)?;
        if let Some(tunnel) = tunnel {
            slot.put(tunnel);
        }
        Ok(resp)
    }

    /// The upstream's answer as it goes to the caller, and for a 101 the
    /// tunnel to run once the caller's connection is handed over. Any
    /// other answer is relayed as an ordinary response.
    pub(crate) fn relay(
        self,
        mut resp: Response<Incoming>,
        limits: &Limits,
        cx: TunnelContext<'_>,
    ) -> Result<(Response<ProxyBody>, Option<Tunnel>), ProxyError> {
        let upstream = hyper::upgrade::on(&mut resp);
        let (mut parts, body) = resp.into_parts();
        let switched_to = strip_hop_by_hop(&mut parts.headers);
        if !head_within(&parts.headers, limits) {
            return Err(ProxyError::ResponseHeadersTooLarge(format!(
                "{} fields",
                parts.headers.len()
            )));
        }
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            let body = ProxyBody::upstream(body, limits);
            return Ok((Response::from_parts(parts, body), None));
        }
        // A 101 must switch to what was asked for (RFC 9110 §15.2.2);
        // anything else would carry a protocol the listener never allowed.
        let agreed = switched_to.as_ref().is_some_and(|v| {
            v.to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case(self.protocol.as_str()))
        });
        if !agreed {
            return Err(ProxyError::Upstream(format!(
                "101 to {:?}, not to the requested {}",
                switched_to,
                self.protocol.as_str()
            )));
        }
        self.mark(&mut parts.headers);
        let open = cx
            .metrics
            .upgraded_opened(cx.listener, self.protocol.as_str());
        let listener: Arc<str> = cx.listener.into();
        let Upgrade {
            protocol, client, ..
        } = self;
        let (activity, idle) = (cx.activity, cx.idle);
        let tunnel: Tunnel = Box::pin(async move {
            let _open = open;
            let (client, upstream) = tokio::join!(client, upstream);
            let (client, upstream) = match (client, upstream) {
                (Ok(c), Ok(u)) => (c, u),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(listener = %listener, protocol = protocol.as_str(), error = %e, "upgrade not completed");
                    return;
                }
            };
            let copied = conn::splice(
                TokioIo::new(client),
                TokioIo::new(upstream),
                &activity,
                idle,
            )
            .await;
            match copied {
                Ok((up, down)) => {
                    tracing::debug!(listener = %listener, protocol = protocol.as_str(), bytes_up = up, bytes_down = down, "upgraded connection closed");
                }
                Err(e) => {
                    tracing::debug!(listener = %listener, protocol = protocol.as_str(), error = %e, "upgraded connection ended with an error");
                }
            }
        });
        Ok((
            Response::from_parts(parts, ProxyBody::empty()),
            Some(tunnel),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_protocols_are_chosen() {
        let allowed = [
            UpgradeProtocol::parse("websocket").unwrap(),
            UpgradeProtocol::parse("mqtt").unwrap(),
        ];
        let chosen = |v: &'static str| {
            choose(&HeaderValue::from_static(v), &allowed)
                .map(|(p, t)| (p.as_str().to_owned(), t.to_str().unwrap().to_owned()))
        };
        assert_eq!(
            chosen("WebSocket"),
            Some(("websocket".into(), "WebSocket".into()))
        );
        assert_eq!(chosen("h2c, mqtt"), Some(("mqtt".into(), "mqtt".into())));
        assert_eq!(chosen("h2c"), None);
        assert_eq!(chosen("TLS/1.2"), None);
        // No `OnUpgrade` outside a real connection: nothing to accept.
        let mut ext = http::Extensions::new();
        assert!(accept(&HeaderValue::from_static("websocket"), &allowed, &mut ext).is_none());
    }
}
