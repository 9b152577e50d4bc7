//! Outbound: this service to a peer.
//!
//! The local service speaks plaintext to a loopback listener; the proxy
//! opens mutual TLS to `upstream` with its own certificate and refuses the
//! peer unless it presents the configured SPIFFE ID (502 for http, a closed
//! connection for tcp). HTTP/1.1 requests go over pooled keep-alive HTTP/1.1
//! connections, HTTP/2 (h2c from the service, gRPC) over multiplexed HTTP/2:
//! the peer is a moat sidecar, which takes both and speaks to its own
//! service in the version that service speaks. An allowed `Upgrade`
//! (WebSocket) takes an HTTP/1.1 connection of its own ([`crate::upgrade`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::Instrument;

use crate::body::ProxyBody;
use crate::config::{Limits, Outbound, PeerPattern, Protocol, UpgradeProtocol, Upstream};
use crate::conn::{self, Activity, Tracked};
use crate::conn_registry::{self, ConnRegistry, Lease};
use crate::proxy_error::ProxyError;
use crate::request::{self, Logged, RequestTelemetry};
use crate::telemetry::{Observability, otel_method, record_answer, span_method};
use crate::tls::PeerIdError;
use crate::tls::{CredentialStore, TlsFactory};
use crate::upgrade::{self, TunnelSlot, Upgrade};
use crate::upstream::{Dial, UpstreamClient};
use crate::{Error, drain};

/// One outbound path's service: everything the local service's
/// connections to one peer need, shared by all of them.
/// [`OutboundService::bind`] makes an `[[outbound]]` listener; the
/// transparent outbound listener makes one per destination
/// ([`OutboundService::new`]).
pub(crate) struct OutboundService {
    name: Arc<str>,
    protocol: Protocol,
    upgrades: Vec<UpgradeProtocol>,
    upstream_authority: Authority,
    /// The expected peer (an ID or a `/*` pattern), for logs and spans.
    peer: Arc<str>,
    store: Arc<CredentialStore>,
    limits: Limits,
    connector: PeerConnector,
    upstream: UpstreamClient<PeerConnector>,
    obs: Observability,
    telemetry: RequestTelemetry,
    listen_addr: SocketAddr,
}

/// Where an outbound path leads: an explicit `[[outbound]]`, or one
/// transparent destination's original address
/// ([`crate::transparent::outbound`]).
#[derive(Debug, Clone)]
pub(crate) struct PeerTarget {
    /// Name in logs and metrics.
    pub name: Arc<str>,
    /// The peer sidecar's address.
    pub upstream: Upstream,
    /// Who the peer must be.
    pub peer: PeerPattern,
    /// `http` or `tcp`.
    pub protocol: Protocol,
    /// `Upgrade` protocols passed through.
    pub upgrades: Vec<UpgradeProtocol>,
}

/// Dials the peer sidecar and completes mutual TLS, checking its identity.
#[derive(Clone)]
struct PeerConnector {
    upstream: Arc<Upstream>,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    connect_timeout: std::time::Duration,
    name: Arc<str>,
    peer: Arc<str>,
    obs: Observability,
    connections: Arc<ConnRegistry>,
}

impl OutboundService {
    /// Binds the listener and builds the peer clients.
    pub(crate) async fn bind(
        config: &Outbound,
        limits: &Limits,
        tls: &TlsFactory,
        store: Arc<CredentialStore>,
        obs: &Observability,
    ) -> Result<(conn::Listener<Self>, SocketAddr), Error> {
        let (listener, addr) = conn::bind(&config.name, config.listen).await?;
        let target = PeerTarget {
            name: config.name.as_str().into(),
            upstream: config.upstream.clone(),
            peer: PeerPattern::Exact(config.peer.clone()),
            protocol: config.protocol,
            upgrades: config.upgrade_protocols.clone(),
        };
        let service = Self::new(target, limits, tls, store, obs, addr)?;
        let (name, max) = (service.name.clone(), service.limits.max_connections);
        Ok((
            conn::Listener::new(listener, addr, name, max, service),
            addr,
        ))
    }

    /// Everything a connection to `target` needs: its TLS clients and
    /// connection pools. `listen_addr` is where the service's connections
    /// arrive (for spans).
    pub(crate) fn new(
        target: PeerTarget,
        limits: &Limits,
        tls: &TlsFactory,
        store: Arc<CredentialStore>,
        obs: &Observability,
        listen_addr: SocketAddr,
    ) -> Result<Self, Error> {
        let name = target.name.clone();
        let peer: Arc<str> = format!("{:?}", target.peer).into();
        let upstream = Arc::new(target.upstream.clone());
        let server_name = ServerName::try_from(upstream.host.clone())
            .unwrap_or_else(|_| ServerName::try_from("moat.invalid").expect("a valid DNS name"));
        let connector = |alpn: &[&[u8]]| -> Result<PeerConnector, Error> {
            let client: Arc<ClientConfig> = tls.client(target.peer.clone(), alpn)?;
            Ok(PeerConnector {
                upstream: upstream.clone(),
                server_name: server_name.clone(),
                tls: TlsConnector::from(client),
                connect_timeout: limits.connect_timeout,
                name: name.clone(),
                peer: peer.clone(),
                obs: obs.clone(),
                connections: tls.connections().clone(),
            })
        };
        let upstream_authority = Authority::try_from(upstream.to_string())
            .map_err(|_| Error::Upstream(name.to_string(), upstream.to_string()))?;
        Ok(Self {
            name: name.clone(),
            protocol: target.protocol,
            upgrades: target.upgrades,
            upstream_authority,
            peer: peer.clone(),
            store,
            limits: limits.clone(),
            connector: connector(&[])?,
            upstream: UpstreamClient::new(connector(&[b"http/1.1"])?, connector(&[b"h2"])?, limits),
            obs: obs.clone(),
            telemetry: RequestTelemetry::new(name, "outbound", obs),
            listen_addr,
        })
    }
}

impl conn::Serve for OutboundService {
    async fn connection(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr, drain: drain::Watch) {
        let _open = self.obs.metrics.connection_opened(&self.name);
        let activity = Activity::new();
        let local = Tracked::new(tcp, activity.clone());
        match self.protocol {
            Protocol::Http => {
                let this = self.clone();
                let local_conn = Arc::new(LocalConn {
                    addr: addr.ip(),
                    activity: activity.clone(),
                    tunnel: TunnelSlot::default(),
                });
                let this_conn = local_conn.clone();
                // Boxed: hyper's per-connection slot then holds a pointer.
                let service =
                    hyper::service::service_fn(move |req| Box::pin(this.request(req, &this_conn)));
                // An h2c connection counts bytes until its first stream (the
                // preface is not seen here); one that never opens a stream is
                // dropped at `header_read_timeout` whatever its PINGs
                // (`conn::serve_http`).
                let streams = conn::Streams::for_connection(&activity);
                let builder = conn::http_server(&self.limits, streams.clone());
                let http = builder.serve_connection_with_upgrades(TokioIo::new(local), service);
                let http = Box::pin(streams.run(http));
                if let Err(e) = conn::serve_http(http, &activity, &self.limits, &drain).await {
                    conn::report(&self.obs.metrics, &self.name, addr, None, &*e);
                }
                // An upgraded connection lives on in this task (see inbound).
                if let Some(tunnel) = local_conn.tunnel.take() {
                    tunnel.await;
                }
            }
            // Boxed, as the inbound's phases: the TLS stream to the peer and
            // the splice are held only by TCP connections.
            Protocol::Tcp => Box::pin(self.serve_tcp(local, &activity)).await,
        }
    }
}

impl OutboundService {
    /// A TCP connection: mutual TLS to the peer, then bytes both ways until
    /// either side ends or the peer's credential lapses.
    async fn serve_tcp(&self, local: Tracked<TcpStream>, activity: &Activity) {
        let peer = match self.connector.connect().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(listener = %self.name, error = %e, "closing local connection: peer refused or unavailable");
                return;
            }
        };
        let lease = self.connector.lease(&peer);
        let lapsed = conn_registry::closed(lease.as_ref());
        if let Err(e) =
            conn::splice_until(local, peer, activity, self.limits.idle_timeout, lapsed).await
        {
            tracing::debug!(listener = %self.name, error = %e, "tcp stream ended with an error");
        }
    }

    /// Serves one request: forward, count, log (the counting and logging
    /// in [`request::Exchange`]). Not an `async fn` (see
    /// `InboundService::request`): the future holds the request once.
    fn request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        local: &Arc<LocalConn>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + use<> {
        // For the access log: a reference to the request head's own bytes,
        // not a copy of the path (a malloc and a free per request).
        let path = req.uri().path_and_query().cloned();
        // The service's call into its sidecar is the server span; the call
        // to the peer is its client child, whose context the peer continues.
        let exchange = self.telemetry.start(&local.activity, &req, || {
            let method = req.method();
            tracing::info_span!(
                "outbound",
                otel.name = %format_args!("{} {}", span_method(method), self.name),
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                http.request.method = otel_method(method),
                http.request.method_original = tracing::field::Empty,
                url.path = path_of(path.as_ref()),
                http.response.status_code = tracing::field::Empty,
                server.address = %self.listen_addr,
                network.peer.address = %local.addr,
                moat.listener = &*self.name,
                // The peer reached, recorded with the answer (as on the access log).
                moat.peer.id = tracing::field::Empty,
            )
        });
        let forward = self
            .clone()
            .forward(req, local, exchange.span(), exchange.id());
        let this = self.clone();
        exchange.answer(forward, move |exchange, resp| {
            // The peer is the configured one whenever it answered (the
            // handshake checked it); a refused one is named as presented,
            // and none (`-`) when no peer was reached.
            let peer = resp
                .extensions()
                .get::<Presented>()
                .map_or(&*this.peer, |p| p.0.as_deref().unwrap_or("-"));
            exchange.span().record("moat.peer.id", peer);
            let logged = Logged {
                peer,
                expected_peer: Some(&*this.peer),
                path: path_of(path.as_ref()),
                raw_path: None,
                verdict: None,
            };
            exchange.finish(&resp, &this.telemetry, logged);
            resp
        })
    }

    /// Sends the request on to the peer. The head is rewritten before the
    /// future is built, so that the rewrite's temporaries are not part of
    /// the future's state.
    fn forward(
        self: Arc<Self>,
        req: Request<Incoming>,
        local: &Arc<LocalConn>,
        span: &tracing::Span,
        request_id: crate::telemetry::RequestId,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + use<> {
        // Boxed: what the future captures stays in its state for its whole
        // life (rustc #62958), and the request would keep it over glibc's
        // per-thread cache size (1,032 bytes; 1,072 unboxed), where a
        // malloc costs ~5x as much and varies with the heap's state.
        let prepared = self.prepare(req, span).map(Box::new);
        // Only an upgrade needs the connection (for its tunnel).
        let upgrading = match &prepared {
            Ok(p) if p.1.is_some() => Some(local.clone()),
            _ => None,
        };
        async move {
            let (req, upgrade, upstream_span) = match prepared {
                // Refused here: no peer was reached.
                Err(refused) => return unreached(refused.into_response()),
                Ok(prepared) => *prepared,
            };
            let sent = match (upgrade, upgrading) {
                (Some(upgrade), Some(local)) => {
                    Box::pin(self.upgrade(req, upgrade, &local))
                        .instrument(upstream_span)
                        .await
                }
                _ => {
                    // Awaited in place, so that the client span is still
                    // there to take the status (no second span held in
                    // this future: its size is bounded, see the tests).
                    let mut call =
                        std::pin::pin!(self.upstream.send(req).instrument(upstream_span));
                    let sent = call.as_mut().await;
                    record_answer(call.span(), &sent);
                    sent
                }
            };
            sent.unwrap_or_else(|e| {
                if matches!(e, ProxyError::BadRequestBody(_)) {
                    // The caller's fault, not the peer's: no warning.
                    tracing::info!(request_id = %request_id, listener = %self.name, error = %e, "request body from the caller failed");
                } else {
                    tracing::warn!(request_id = %request_id, listener = %self.name, error = %e, "request to peer failed");
                }
                let presented = match &e {
                    ProxyError::PeerRefused { presented, .. } => Some(Presented(presented.clone())),
                    // Nothing answered, or nothing was sent: no peer to name.
                    ProxyError::PeerUnavailable(_) | ProxyError::NotReady => Some(Presented(None)),
                    _ => None,
                };
                let mut resp = e.into_response();
                if let Some(p) = presented {
                    resp.extensions_mut().insert(p);
                }
                resp
            })
        }
    }

    /// Sends an upgrade request to the peer on a connection of its own;
    /// after a 101, leaves the tunnel for the local connection's task.
    async fn upgrade(
        &self,
        req: Request<Incoming>,
        upgrade: Box<Upgrade>,
        local: &LocalConn,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let cx = upgrade::TunnelContext {
            listener: &self.name,
            metrics: &self.obs.metrics,
            activity: local.activity.clone(),
            idle: self.limits.idle_timeout,
        };
        upgrade
            .forward(&self.upstream, req, &self.limits, cx, &local.tunnel)
            .await
    }

    /// The request as it goes to the peer, the upgrade it asks for (if
    /// this listener passes it), and its client span; or why it is refused
    /// here.
    fn prepare(
        &self,
        req: Request<Incoming>,
        span: &tracing::Span,
    ) -> Result<Prepared, ProxyError> {
        if !self.store.is_ready() {
            return Err(ProxyError::NotReady);
        }
        let (mut parts, body) = req.into_parts();
        // A tunnel to wherever the service names is not what this listener
        // is for: it reaches one peer, by route.
        request::check_head(&parts, &self.limits)?;
        // Identity headers are for the peer's sidecar to set, from its own handshake.
        let upgrade = request::strip_head(&mut parts, &self.upgrades);
        if let Some(upgrade) = &upgrade {
            upgrade.mark(&mut parts.headers);
        }
        // HTTP/2 carries the host in `:authority`, so it keeps the one the
        // service addressed (as `Host` does for HTTP/1.1): the peer's route
        // policy then sees the same host over either version. The connector
        // dials the configured upstream whatever the URI says.
        let authority = if parts.version == Version::HTTP_2 {
            parts
                .uri
                .authority()
                .cloned()
                .or_else(|| {
                    parts
                        .headers
                        .get(http::header::HOST)
                        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                })
                .unwrap_or_else(|| self.upstream_authority.clone())
        } else {
            self.upstream_authority.clone()
        };
        let mut uri = Uri::builder().scheme(Scheme::HTTPS).authority(authority);
        uri = match parts.uri.path_and_query() {
            Some(pq) => uri.path_and_query(pq.clone()),
            None => uri.path_and_query("/"),
        };
        parts.uri = match uri.build() {
            Ok(u) => u,
            Err(_) => return Err(ProxyError::BadRequest("request target")),
        };
        if parts.version != Version::HTTP_2 {
            parts.version = Version::HTTP_11;
        }
        let upstream_span = if self.obs.tracing {
            tracing::info_span!(
                parent: span,
                "upstream",
                otel.name = %format_args!("{} {}", span_method(&parts.method), self.upstream_authority),
                otel.kind = "client",
                server.address = %self.upstream_authority,
                http.request.method = otel_method(&parts.method),
                http.response.status_code = tracing::field::Empty,
                moat.peer.id = &*self.peer,
            )
        } else {
            tracing::Span::none()
        };
        crate::telemetry::propagate(&upstream_span, &mut parts.headers);
        Ok((Request::from_parts(parts, body), upgrade, upstream_span))
    }
}

/// Warns about each outbound `peer` and `[[destination]] peer` outside
/// `own`, the sidecar's trust domain: peers are verified against its own
/// bundle and trust domain, so every connection to that peer will be
/// refused (a typo such as `exmaple.org`; `moat doctor` says the same
/// before the start).
pub(crate) fn warn_foreign_peers(
    outbound: &[Outbound],
    destinations: &[crate::transparent::Destination],
    own: &moat_ca::TrustDomain,
) {
    for l in outbound.iter().filter(|l| !l.peer.is_in(own)) {
        tracing::warn!(
            listener = %l.name,
            peer = %l.peer,
            peer_trust_domain = l.peer.trust_domain_name(),
            trust_domain = own.as_str(),
            "outbound peer is not in this sidecar's trust domain; every connection to it will be refused"
        );
    }
    for (i, d) in destinations.iter().enumerate() {
        let td = d.peer.trust_domain_name();
        if td != own.as_str() {
            tracing::warn!(
                destination = %d.label(i),
                peer = %d.peer,
                peer_trust_domain = td,
                trust_domain = own.as_str(),
                "[[destination]] peer is not in this sidecar's trust domain; every connection to it will be refused"
            );
        }
    }
}

/// The path of a request whose path and query are `pq`, as `Uri::path`
/// gives it (empty for an authority-form target, which has none).
fn path_of(pq: Option<&PathAndQuery>) -> &str {
    pq.map_or("", PathAndQuery::path)
}

/// A request ready for the peer: the request, the upgrade it asks for (if
/// this listener passes it), and its client span.
type Prepared = (Request<Incoming>, Option<Box<Upgrade>>, tracing::Span);

/// One connection from the local service: its activity, and the tunnel of
/// an upgraded request on it.
struct LocalConn {
    /// The local service's address (`network.peer.address` on spans).
    addr: std::net::IpAddr,
    activity: Arc<Activity>,
    tunnel: TunnelSlot,
}

/// On an error response: the SPIFFE ID a refused peer presented (`None`
/// when its certificate had none we could read, or when no peer was
/// reached at all), for the access log. Absent: the configured peer
/// answered (the handshake checked it).
#[derive(Debug, Clone)]
struct Presented(Option<String>);

/// An error response made before any peer was reached: logged with `peer`
/// `-`, not as the configured peer.
fn unreached(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    resp.extensions_mut().insert(Presented(None));
    resp
}

impl PeerConnector {
    async fn connect(&self) -> Result<TlsStream<TcpStream>, ProxyError> {
        let addr = (self.upstream.host.as_str(), self.upstream.port);
        let dial = crate::upstream::connect_tcp(addr);
        let tcp = match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(ProxyError::PeerUnavailable(format!(
                    "{}: {e}",
                    self.upstream
                )));
            }
            Err(_) => {
                return Err(ProxyError::PeerUnavailable(format!(
                    "{}: connect timed out",
                    self.upstream
                )));
            }
        };
        let _ = tcp.set_nodelay(true);
        // A new connection to the peer: its handshake gets a span of its own
        // (a child of the request that caused it).
        let span = if self.obs.tracing {
            tracing::info_span!(
                "tls_handshake",
                otel.kind = "client",
                server.address = %self.upstream,
                moat.peer.id = &*self.peer,
            )
        } else {
            tracing::Span::none()
        };
        let handshake = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .instrument(span);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Ok(inner)) => {
                self.obs.metrics.handshake_ok(&self.name);
                Ok(inner)
            }
            Ok(Err(e)) => {
                self.obs
                    .metrics
                    .handshake_failed(&self.name, crate::tls::handshake_failure_reason(&e));
                let refused = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>());
                if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) =
                    refused
                {
                    Err(ProxyError::PeerRevoked(format!(
                        "{}: {} is revoked",
                        self.upstream, self.peer
                    )))
                } else if let Some(rustls::Error::InvalidCertificate(why)) = refused {
                    let reason = crate::tls::describe_handshake_error(&e);
                    Err(ProxyError::PeerRefused {
                        detail: format!("{}: {reason}", self.upstream),
                        presented: presented_id(why),
                    })
                } else {
                    Err(ProxyError::PeerUnavailable(format!(
                        "{}: TLS: {e}",
                        self.upstream
                    )))
                }
            }
            Err(_) => Err({
                self.obs.metrics.handshake_failed(&self.name, "timeout");
                ProxyError::PeerUnavailable(format!("{}: TLS handshake timed out", self.upstream))
            }),
        }
    }
}

impl Dial for PeerConnector {
    type Io = TlsStream<TcpStream>;

    fn dial(&self) -> impl std::future::Future<Output = Result<Self::Io, ProxyError>> + Send {
        self.connect()
    }

    fn lease(&self, io: &Self::Io) -> Option<Lease> {
        self.connections
            .register(&self.name, io.get_ref().1.peer_certificates(), None)
    }
}

/// The SPIFFE ID a refused peer presented, when the verifier read one.
fn presented_id(why: &rustls::CertificateError) -> Option<String> {
    let rustls::CertificateError::Other(other) = why else {
        return None;
    };
    match other.0.downcast_ref::<PeerIdError>()? {
        PeerIdError::WrongId { got, .. } => Some(got.clone()),
        PeerIdError::ForeignTrustDomain { id, .. } => Some(id.clone()),
        PeerIdError::NotAllowed(id) => Some(id.clone()),
        _ => None,
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Serve;
    use crate::future_size::{assert_between, returned_3, returned_4};

    /// What each local connection's task holds for its whole life (960
    /// bytes measured; 3,296 before the TCP phase, which holds the TLS
    /// stream to the peer and the splice, was boxed like the inbound's).
    #[test]
    fn the_connection_future_stays_small() {
        let size = returned_4(<OutboundService as Serve>::connection);
        assert_between("the outbound connection future", size, 768, 1280);
    }

    /// Boxed per request: 512 bytes measured (release: 1,072 before `forward` boxed
    /// the prepared request; 824 at 18840f0, as benches/results/analysis.md
    /// has it). Over glibc's tcache size (1,032) its malloc costs ~5x.
    #[test]
    fn the_request_future_holds_the_request_once() {
        let size = returned_3(OutboundService::request);
        assert_between("the outbound request future", size, 448, 640);
    }
}
