//! Inbound: peers to this service.
//!
//! TCP accept → TLS handshake (timeout; client certificate verified by chain
//! and SPIFFE ID, `allow_peers` checked) → for `http`: HTTP/1.1 or HTTP/2 by
//! ALPN → strip client-supplied identity headers → [`Authorizer`] → add the
//! verified peer ID → pooled plaintext connection to `forward`, in the
//! version the service speaks ([`crate::app`]), or for an allowed
//! `Upgrade` a connection of its own, spliced after the 101
//! ([`crate::upgrade`]). For `tcp`: bytes both ways to `forward`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use moat_ca::SpiffeId;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::Instrument;

use crate::app::AppVersion;
use crate::authz::{self, Authorizer};
use crate::body::ProxyBody;
use crate::config::{Inbound, Limits, Protocol, UpgradeProtocol};
use crate::conn::{self, Activity, TickBatched, Tracked};
use crate::conn_registry::{self, AllowPeers, ConnRegistry, Lease};
use crate::headers::is_grpc;
use crate::proxy_error::ProxyError;
use crate::request::{self, Logged, PeerHeaders, RequestTelemetry};
use crate::telemetry::{Observability, otel_method, record_answer, span_method};
use crate::tls::TlsFactory;
use crate::upgrade::{self, TunnelSlot, Upgrade};
use crate::upstream::{Dial, UpstreamClient};
use crate::{Error, drain};

/// Dials the local service.
struct LocalDial {
    forward: SocketAddr,
    connect_timeout: std::time::Duration,
}

impl Dial for LocalDial {
    type Io = TickBatched<TcpStream>;

    async fn dial(&self) -> Result<Self::Io, ProxyError> {
        let unavailable =
            |why: String| ProxyError::LocalUnavailable(format!("{}: {why}", self.forward));
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            crate::upstream::connect_local(self.forward),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(unavailable(e.to_string())),
            Err(_) => return Err(unavailable("connect timed out".into())),
        };
        let _ = stream.set_nodelay(true);
        Ok(TickBatched::new(stream))
    }
}

/// A request's answer, with what its access-log line needs: the policy's
/// verdict (if it decided) and the path as received and as authorized.
type Forwarded = (Response<ProxyBody>, Option<authz::AuthzRecord>, Paths);

/// The request's path as received and, when the policy normalized it to
/// something else, as authorized (the common case allocates nothing more).
struct Paths {
    raw: String,
    normalized: Option<String>,
}

/// After the policy: forward (verdict, paths, span of the call to the
/// service), or the answer already made.
enum Decided {
    Forward(Option<authz::AuthzRecord>, Paths, tracing::Span),
    Answered(Forwarded),
}

/// One inbound listener's service: everything its connections need,
/// shared by all of them. [`InboundService::bind`] makes the listener.
pub struct InboundService {
    name: Arc<str>,
    protocol: Protocol,
    app: AppVersion,
    upgrades: Vec<UpgradeProtocol>,
    forward: SocketAddr,
    forward_authority: Authority,
    acceptor: TlsAcceptor,
    limits: Limits,
    h1: http1::Builder,
    upstream: UpstreamClient<LocalDial>,
    authz: Authorizer,
    obs: Observability,
    telemetry: RequestTelemetry,
    listen_addr: SocketAddr,
    connections: Arc<ConnRegistry>,
    /// `allow_peers`, replaced on reload (SIGHUP).
    allow: AllowPeers,
}

/// Per-connection facts, built once after the handshake.
struct Peer {
    id: SpiffeId,
    /// ALPN chose HTTP/2.
    h2: bool,
    addr: SocketAddr,
    /// Set on each request to the local service.
    identity: PeerHeaders,
    activity: Arc<Activity>,
    /// An upgraded request's tunnel, run once hyper hands the connection over.
    tunnel: TunnelSlot,
    /// The connection's registration: says when its credential lapsed.
    lease: Option<Lease>,
}

impl InboundService {
    /// Binds the listener and builds everything a connection needs.
    pub async fn bind(
        config: &Inbound,
        limits: &Limits,
        tls: &TlsFactory,
        authz: Authorizer,
        obs: &Observability,
    ) -> Result<(conn::Listener<Self>, SocketAddr), Error> {
        let alpn: &[&[u8]] = match config.protocol {
            Protocol::Http => crate::tls::ALPN_HTTP,
            Protocol::Tcp => &[],
        };
        let allow: AllowPeers = Arc::new(ArcSwap::from_pointee(config.allow_peers.clone()));
        let server = tls.server_with_allow(allow.clone(), alpn)?;
        let (listener, addr) = conn::bind(&config.name, config.listen).await?;
        let forward = config.forward;
        let dial = || LocalDial {
            forward,
            connect_timeout: limits.connect_timeout,
        };
        let name: Arc<str> = config.name.as_str().into();
        let service = Self {
            name: name.clone(),
            protocol: config.protocol,
            app: AppVersion::new(config.app_protocol()),
            upgrades: config.upgrade_protocols.clone(),
            forward,
            forward_authority: Authority::try_from(forward.to_string())
                .expect("a socket address is an authority"),
            acceptor: TlsAcceptor::from(server),
            limits: limits.clone(),
            h1: conn::http1_server(limits),
            upstream: UpstreamClient::new(dial(), dial(), limits),
            authz,
            obs: obs.clone(),
            telemetry: RequestTelemetry::new(name, "inbound", obs),
            listen_addr: addr,
            connections: tls.connections().clone(),
            allow,
        };
        let (name, max) = (service.name.clone(), service.limits.max_connections);
        Ok((
            conn::Listener::new(listener, addr, name, max, service),
            addr,
        ))
    }

    /// This listener's `allow_peers`, which a reload replaces.
    pub fn allow_peers(&self) -> AllowPeers {
        self.allow.clone()
    }
}

impl conn::Serve for InboundService {
    async fn connection(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr, drain: drain::Watch) {
        let _open = self.obs.metrics.connection_opened(&self.name);
        // Each phase is boxed, so the connection task holds only the live
        // one: not the handshake state once it is done, not both protocols'
        // state side by side, and no second copy of the TLS stream (a value
        // borrowed in an async fn stays in its state until the end of its
        // scope). benches/results/analysis.md has the sizes; the tests at the
        // end of this file hold them.
        let Some((tls, peer)) = Box::pin(self.handshake(tcp, addr)).await else {
            return;
        };
        match self.protocol {
            Protocol::Http => Box::pin(self.serve_http(tls, peer, &drain)).await,
            Protocol::Tcp => Box::pin(self.serve_tcp(tls, peer)).await,
        }
    }
}

impl InboundService {
    /// The TLS handshake (with its timeout), counted and logged, and the
    /// verified peer.
    async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> Option<(TlsStream<Tracked<TcpStream>>, Peer)> {
        let activity = Activity::new();
        let tcp = Tracked::new(tcp, activity.clone());
        let tls = match tokio::time::timeout(
            self.limits.handshake_timeout,
            self.acceptor.accept(tcp),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let error = crate::tls::describe_handshake_error(&e);
                let reason = crate::tls::handshake_failure_reason(&e);
                self.obs.metrics.handshake_failed(&self.name, reason);
                tracing::info!(listener = %self.name, peer_addr = %addr, reason, %error, "handshake failed");
                return None;
            }
            Err(_) => {
                self.obs.metrics.handshake_failed(&self.name, "timeout");
                tracing::info!(listener = %self.name, peer_addr = %addr, reason = "timeout", "handshake timed out");
                return None;
            }
        };
        self.obs.metrics.handshake_ok(&self.name);
        let Some(mut peer) = peer_of(&tls, addr, activity) else {
            // The verifier admitted the chain, so this cannot happen; refuse anyway.
            tracing::warn!(listener = %self.name, peer_addr = %addr, "peer certificate has no SPIFFE ID");
            return None;
        };
        peer.lease = self.connections.register(
            &self.name,
            tls.get_ref().1.peer_certificates(),
            Some(self.allow.clone()),
        );
        tracing::debug!(listener = %self.name, peer_addr = %addr, peer = %peer.id.as_str(), "peer connected");
        Some((tls, peer))
    }

    /// Serves HTTP (the version ALPN chose) on a verified connection
    /// until it ends.
    ///
    /// Not an async fn: hyper's connection, which takes the TLS stream, is
    /// built and boxed before the future exists, so the future (what an
    /// idle connection holds) keeps the box and not also the moved-from
    /// TLS stream an async fn keeps as its argument (rustc #62958): about
    /// 1 KiB less per connection (benches/results/analysis.md).
    fn serve_http<'a>(
        self: &'a Arc<Self>,
        tls: TlsStream<Tracked<TcpStream>>,
        peer: Peer,
        drain: &'a drain::Watch,
    ) -> impl Future<Output = ()> + Send + 'a {
        let peer = Arc::new(peer);
        let this = self.clone();
        let svc_peer = peer.clone();
        let handle = move |req| this.request(req, &svc_peer);
        let io = TokioIo::new(tls);
        // Boxed: hyper keeps one slot per HTTP/1.1 connection, for its life,
        // the size of this future, and moves an HTTP/2 stream's future into a
        // task or the connection's `conn::Streams`; a box costs a pointer
        // there, not the whole request state (measured: unboxed, HTTP/2 took
        // 10 % more CPU per request).
        let service = hyper::service::service_fn(move |req| Box::pin(handle(req)));
        // Over TLS the version is the one ALPN chose (RFC 9113 §3.2): no
        // sniffing of the first bytes, and an HTTP/1.1 connection holds
        // only HTTP/1.1 state.
        let conn = if peer.h2 {
            // Idle by streams from the start: a connection that never
            // carries a request is not kept open by its PINGs either.
            peer.activity.count_streams_only();
            let streams = conn::Streams::for_connection(&peer.activity);
            let h2 = conn::http2_server(&self.limits, streams.clone());
            Either::Left(Box::pin(streams.run(h2.serve_connection(io, service))))
        } else {
            // With upgrades: after a 101 hyper hands the connection to
            // the request's tunnel. Two boxes, once per connection: the
            // inner pins hyper's connection, the outer is what
            // `serve_http` takes.
            let conn = self.h1.serve_connection(io, service).with_upgrades();
            Either::Right(Box::pin(UpgradeableH1(Box::pin(conn))))
        };
        async move {
            let (activity, limits) = (&peer.activity, &self.limits);
            let lapsed = conn_registry::closed(peer.lease.as_ref());
            let served = match conn {
                Either::Left(h2) => {
                    conn::serve_http_until(h2, activity, limits, drain, lapsed).await
                }
                Either::Right(h1) => {
                    conn::serve_http_until(h1, activity, limits, drain, lapsed).await
                }
            };
            if let Err(e) = served {
                let id = Some(peer.id.as_str());
                conn::report(&self.obs.metrics, &self.name, peer.addr, id, &*e);
            }
            // An upgraded connection: hyper has handed it over, and it lives on
            // in this task (its slot under max_connections, its drain watch).
            if let Some(tunnel) = peer.tunnel.take() {
                tokio::select! {
                    () = tunnel => {}
                    _ = conn_registry::closed(peer.lease.as_ref()) => {}
                }
            }
        }
    }

    async fn serve_tcp(&self, tls: TlsStream<Tracked<TcpStream>>, peer: Peer) {
        let local = match tokio::time::timeout(
            self.limits.connect_timeout,
            crate::upstream::connect_local(self.forward),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(listener = %self.name, peer = %peer.id.as_str(), error = %e, "local service unavailable");
                return;
            }
            Err(_) => {
                tracing::warn!(listener = %self.name, peer = %peer.id.as_str(), "local service connect timed out");
                return;
            }
        };
        let _ = local.set_nodelay(true);
        // XXX: a TCP stream has no request boundary to drain at; it runs until
        // it ends or the shutdown grace expires and the process exits.
        let lapsed = conn_registry::closed(peer.lease.as_ref());
        if let Err(e) =
            conn::splice_until(tls, local, &peer.activity, self.limits.idle_timeout, lapsed).await
        {
            tracing::debug!(listener = %self.name, peer = %peer.id.as_str(), error = %e, "tcp stream ended with an error");
        }
    }

    /// Serves one request: authorize, forward, count, log (the counting
    /// and logging in [`request::Exchange`]).
    ///
    /// Not an `async fn`, nor is [`InboundService::forward`]: an async fn
    /// keeps its by-value arguments in its state next to the locals they
    /// move into (rustc #62958), and an `.await` on a captured future keeps
    /// it twice; the request future is built, moved and allocated once per
    /// request. As plain fns and a `map`, the request lives in its state
    /// once.
    fn request(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: &Arc<Peer>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + use<> {
        let exchange = self.telemetry.start(&peer.activity, &req, || {
            let method = req.method();
            tracing::info_span!(
                "inbound",
                otel.name = %format_args!("{} {}", span_method(method), self.name),
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                http.request.method = otel_method(method),
                http.request.method_original = tracing::field::Empty,
                url.path = req.uri().path(),
                http.response.status_code = tracing::field::Empty,
                server.address = %self.listen_addr,
                network.peer.address = %peer.addr.ip(),
                moat.listener = &*self.name,
                moat.peer.id = peer.id.as_str(),
                moat.route = tracing::field::Empty,
                moat.decision = tracing::field::Empty,
                moat.deny.reason = tracing::field::Empty,
            )
        });
        let forward =
            self.clone()
                .forward(req, peer.clone(), exchange.span().clone(), exchange.id());
        let (this, peer) = (self.clone(), peer.clone());
        exchange.answer(forward, move |exchange, (resp, verdict, paths)| {
            let (path, raw_path) = match &paths.normalized {
                Some(normalized) => (normalized.as_str(), Some(paths.raw.as_str())),
                None => (paths.raw.as_str(), None),
            };
            let logged = Logged {
                peer: peer.id.as_str(),
                expected_peer: None,
                path,
                raw_path,
                verdict: verdict.as_ref(),
            };
            exchange.finish(&resp, &this.telemetry, logged);
            resp
        })
    }

    /// Authorizes and forwards one request; also returns what the access
    /// log needs: the decision (if one was made) and the path as authorized.
    ///
    /// The synchronous steps are in [`InboundService::admit`] and
    /// [`InboundService::upstream_head`], so that their temporaries are not part of
    /// the future's state.
    fn forward(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<Peer>,
        span: tracing::Span,
        request_id: crate::telemetry::RequestId,
    ) -> impl Future<Output = Forwarded> + Send + 'static {
        let (mut parts, body) = req.into_parts();
        async move {
            let raw_path = parts.uri.path().to_owned();
            let upgrade = match self.admit(&mut parts) {
                Ok(upgrade) => upgrade,
                Err(e) => {
                    let paths = Paths {
                        raw: raw_path,
                        normalized: None,
                    };
                    let verdict = self.authz.refused_before_policy(e.reason());
                    return (e.into_response(), verdict, paths);
                }
            };
            let outcome = self.authz.authorize(&mut parts, &peer.id, request_id).await;
            // An upgrade goes to the service in HTTP/1.1, whatever it
            // speaks otherwise (an h2c service that takes WebSockets takes
            // them over HTTP/1.1 too; extended CONNECT is not offered).
            let to_h2 = match (&upgrade, self.app.known()) {
                (Some(_), _) => false,
                (None, Some(h2)) => h2,
                (None, None) => {
                    let wait = self.limits.connect_timeout;
                    Box::pin(self.app.probe(&self.name, self.forward, wait)).await
                }
            };
            let (verdict, paths, upstream_span) =
                match self.decided(outcome, raw_path, &mut parts, &peer, &span, to_h2) {
                    Decided::Forward(verdict, paths, span) => (verdict, paths, span),
                    Decided::Answered(answered) => return answered,
                };
            if let Some(upgrade) = &upgrade {
                upgrade.mark(&mut parts.headers);
            }
            let req = Request::from_parts(parts, body);
            let sent = match upgrade {
                None => {
                    // Awaited in place, so that the client span is still
                    // there to take the status (no second span held in
                    // this future: its size is bounded, see the tests).
                    let mut call =
                        std::pin::pin!(self.upstream.send(req).instrument(upstream_span));
                    let sent = call.as_mut().await;
                    record_answer(call.span(), &sent);
                    sent
                }
                Some(upgrade) => {
                    Box::pin(self.upgrade(req, upgrade, &peer))
                        .instrument(upstream_span)
                        .await
                }
            };
            let resp = match sent {
                Ok(resp) => resp,
                Err(e) => {
                    // The service failed at the protocol level or went away:
                    // what a probe found may no longer hold.
                    if matches!(e, ProxyError::Upstream(_) | ProxyError::LocalUnavailable(_)) {
                        self.app.forget();
                    }
                    if matches!(e, ProxyError::BadRequestBody(_)) {
                        // The caller's fault, not the service's: no warning.
                        tracing::info!(request_id = %request_id, listener = %self.name, peer = %peer.id.as_str(), error = %e, "request body from the caller failed");
                    } else {
                        tracing::warn!(request_id = %request_id, listener = %self.name, peer = %peer.id.as_str(), error = %e, "forwarding failed");
                    }
                    e.into_response()
                }
            };
            (resp, verdict, paths)
        }
    }

    /// Sends an upgrade request to the service on a connection of its own;
    /// after a 101, leaves the tunnel for the caller's connection task.
    async fn upgrade(
        &self,
        req: Request<Incoming>,
        upgrade: Box<Upgrade>,
        peer: &Peer,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let cx = upgrade::TunnelContext {
            listener: &self.name,
            metrics: &self.obs.metrics,
            activity: peer.activity.clone(),
            idle: self.limits.idle_timeout,
        };
        upgrade
            .forward(&self.upstream, req, &self.limits, cx, &peer.tunnel)
            .await
    }

    /// Acts on the policy's outcome: the answer if the request goes no
    /// further, else what the access log keeps and the span of the call to
    /// the local service (the head rewritten for it).
    fn decided(
        &self,
        outcome: authz::Outcome,
        raw_path: String,
        parts: &mut http::request::Parts,
        peer: &Peer,
        span: &tracing::Span,
        to_h2: bool,
    ) -> Decided {
        let authz::Outcome {
            record: verdict,
            forward_path,
            deny,
        } = outcome;
        let normalized = forward_path
            .as_ref()
            .map(http::uri::PathAndQuery::path)
            .filter(|p| *p != raw_path)
            .map(str::to_owned);
        let paths = Paths {
            raw: raw_path,
            normalized,
        };
        let verdict = Some(verdict);
        if let Some(denied) = deny {
            return Decided::Answered((*denied, verdict, paths));
        }
        match self.upstream_head(parts, forward_path, peer, span, to_h2) {
            Ok(upstream_span) => Decided::Forward(verdict, paths, upstream_span),
            Err(e) => Decided::Answered((e.into_response(), verdict, paths)),
        }
    }

    /// Checks a request head before the policy sees it, removes the
    /// headers that only this sidecar may set and the hop-by-hop ones, and
    /// returns the upgrade it asks for if this listener passes it.
    fn admit(&self, parts: &mut http::request::Parts) -> Result<Option<Box<Upgrade>>, ProxyError> {
        // Also: one Host, well formed and the same as the authority.
        request::check_head(parts, &self.limits)?;
        // Only we say who the peer is.
        Ok(request::strip_head(parts, &self.upgrades))
    }

    /// Rewrites an allowed request's head for the local service (peer
    /// identity headers, version, authority, the authorized path) and
    /// returns the span of the call to it. A gRPC request (which needs
    /// HTTP/2) to a service spoken to in HTTP/1.1 is refused here, with
    /// the setting to change.
    fn upstream_head(
        &self,
        parts: &mut http::request::Parts,
        forward_path: Option<http::uri::PathAndQuery>,
        peer: &Peer,
        span: &tracing::Span,
        to_h2: bool,
    ) -> Result<tracing::Span, ProxyError> {
        if !to_h2 && parts.version == Version::HTTP_2 && is_grpc(&parts.headers) {
            return Err(ProxyError::AppProtocolMismatch);
        }
        peer.identity.set(&mut parts.headers);
        // The authority the client addressed travels on: in the URI for
        // HTTP/2 (`:authority`), in `Host` for HTTP/1.1. The connector
        // always dials `forward`, whatever the URI says.
        let authority = if to_h2 {
            let from_host = parts
                .headers
                .remove(http::header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok());
            parts.uri.authority().cloned().or(from_host)
        } else {
            if !parts.headers.contains_key(http::header::HOST)
                && let Some(a) = parts.uri.authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                parts.headers.insert(http::header::HOST, v);
            }
            None
        };
        let pq = forward_path.unwrap_or_else(|| {
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
        });
        parts.uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority.unwrap_or_else(|| self.forward_authority.clone()))
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::BadRequest("request target"))?;
        parts.version = if to_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        // The service continues the trace from the upstream call's span.
        let upstream_span = if self.obs.tracing {
            tracing::info_span!(
                parent: span,
                "upstream",
                otel.name = %format_args!("{} local service", span_method(&parts.method)),
                otel.kind = "client",
                server.address = %self.forward,
                http.request.method = otel_method(&parts.method),
                http.response.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        crate::telemetry::propagate(&upstream_span, &mut parts.headers);
        Ok(upstream_span)
    }
}

fn peer_of(
    tls: &TlsStream<Tracked<TcpStream>>,
    addr: SocketAddr,
    activity: Arc<Activity>,
) -> Option<Peer> {
    let session = tls.get_ref().1;
    let h2 = session.alpn_protocol() == Some(b"h2");
    let leaf = session.peer_certificates()?.first()?;
    let id = SpiffeId::from_cert_der(leaf).ok()?;
    let identity = PeerHeaders::new(&id)?;
    Some(Peer {
        id,
        h2,
        addr,
        identity,
        activity,
        tunnel: TunnelSlot::default(),
        lease: None,
    })
}

/// An HTTP/1.1 server connection that hands itself over after a 101, as
/// [`conn::serve_http`] takes it.
struct UpgradeableH1<C>(Pin<Box<C>>);

type H1Conn<S> = http1::UpgradeableConnection<TokioIo<TlsStream<Tracked<TcpStream>>>, S>;

impl<S> Future for UpgradeableH1<H1Conn<S>>
where
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().0.as_mut().poll(cx)
    }
}

impl<S> conn::Graceful for UpgradeableH1<H1Conn<S>>
where
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().0.as_mut().graceful_shutdown();
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Serve;
    use crate::future_size::{assert_between, returned_3, returned_4};

    /// What each connection's task holds for its whole life: its phases
    /// are boxed, so only a pointer to the live one (144 bytes measured).
    #[test]
    fn the_connection_future_holds_only_the_live_phase() {
        let size = returned_4(<InboundService as Serve>::connection);
        assert_between("the inbound connection future", size, 96, 256);
    }

    /// The boxed phases, each allocated once per connection: the TLS
    /// handshake (1,480 bytes measured), HTTP (664, what an idle
    /// keep-alive connection holds: 2,120 while `serve_http` was an async
    /// fn that also kept the moved-from TLS stream) and TCP (4,744).
    #[test]
    fn each_connection_phase_stays_small() {
        let handshake = returned_3(InboundService::handshake);
        assert_between("the inbound handshake future", handshake, 1184, 1664);
        let http = returned_4(InboundService::serve_http);
        assert_between("the inbound HTTP connection future", http, 512, 832);
        let tcp = returned_3(InboundService::serve_tcp);
        assert_between("the inbound TCP connection future", tcp, 3760, 5120);
    }

    /// Boxed per request: 992 bytes measured (1,584 before the policy's
    /// first decision, a denial's response and the decided head stopped
    /// being held across the `.await`s; 952 at 18840f0, before upgrades
    /// and 100-continue joined the request path); the request is held once,
    /// not once per async layer. At most 1,024: up to 1,032 bytes glibc's
    /// malloc serves from its per-thread cache, ~40 instructions, and
    /// ~300 above (benches/results/analysis.md, "Run 25").
    #[test]
    fn the_request_future_holds_the_request_once() {
        let size = returned_3(InboundService::request);
        assert_between("the inbound request future", size, 896, 1024);
    }
}
