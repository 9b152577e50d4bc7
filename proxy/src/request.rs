//! One proxied request, the same whichever way it goes: what every request
//! gets from its arrival to its answer on the inbound and outbound
//! listeners (and on the transparent ones, which serve through those).
//!
//! - Before it travels on: [`check_head`] (no `CONNECT`, the head within
//!   the limits, read alike by the policy and any service:
//!   [`crate::head_checks`]) and [`strip_head`] (no identity headers from
//!   the client, under any spelling; no hop-by-hop ones; the upgrade it
//!   asks for). Inbound then sets the verified peer's identity
//!   ([`PeerHeaders`]); outbound leaves that to the peer's sidecar.
//! - Around it: an [`Exchange`], started by the listener's
//!   [`RequestTelemetry`]: in-flight count, request id, the server span
//!   (continuing the caller's trace), and once the answer is there the
//!   access-log entry, the request metrics and, when a policy decided, the
//!   decision's metric and span fields.
//!
//! What differs by direction (the span's fields, the forwarding itself,
//! who the peer is) stays in `inbound` and `outbound`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, Version};
use moat_ca::SpiffeId;
use tracing::{Instrument, Span};

use crate::authz::{AuthzDecision, AuthzRecord};
use crate::body::ProxyBody;
use crate::config::{Limits, UpgradeProtocol};
use crate::conn::{Activity, InFlight};
use crate::head_checks;
use crate::head_limits::check_request_head;
use crate::headers::{content_length, strip_request_fields};
use crate::proxy_error::{ProxyError, logged_status};
use crate::telemetry::{
    AccessEntry, ListenerMetrics, Observability, ProxyMetrics, RequestId, continue_trace,
    request_done, trace_id,
};
use crate::upgrade::{self, Upgrade};

/// The header carrying the verified peer SPIFFE ID to the local service.
pub(crate) static PEER_ID: HeaderName = HeaderName::from_static("x-moat-peer-id");
/// An XFCC-style header beside it (`URI=<peer>`).
pub(crate) static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The first checks of every request head: `CONNECT` (a tunnel to
/// anywhere) is not something moat forwards, the target and fields are
/// held to `max_header_bytes` and `max_header_count`, and the method, host
/// and framing must be read alike by the policy and the service.
pub(crate) fn check_head(parts: &Parts, limits: &Limits) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::ConnectNotSupported);
    }
    check_request_head(parts, limits)?;
    head_checks::check(parts)
}

/// Removes what does not travel on: the identity headers (only a sidecar
/// says who the peer is, from its own handshake) and the hop-by-hop ones.
/// Returns the upgrade the request asks for when it is HTTP/1.1 and
/// `upgrades` passes it.
pub(crate) fn strip_head(parts: &mut Parts, upgrades: &[UpgradeProtocol]) -> Option<Box<Upgrade>> {
    parts.headers.remove(&PEER_ID);
    parts.headers.remove(&XFCC);
    // `x_moat_peer_id`: see `remove_underscore_spellings`.
    match strip_request_fields(&mut parts.headers, &[&PEER_ID, &XFCC]) {
        Some(v) if parts.version == Version::HTTP_11 => {
            upgrade::accept(&v, upgrades, &mut parts.extensions)
        }
        _ => None,
    }
}

/// A verified peer's identity headers, built once per connection and set
/// on each of its requests to the local service.
#[derive(Debug)]
pub(crate) struct PeerHeaders {
    id: HeaderValue,
    xfcc: HeaderValue,
}

impl PeerHeaders {
    /// The headers naming `id`; `None` if it cannot be a header value.
    pub(crate) fn new(id: &SpiffeId) -> Option<Self> {
        Some(Self {
            id: HeaderValue::from_str(id.as_str()).ok()?,
            xfcc: HeaderValue::from_str(&format!("URI={}", id.as_str())).ok()?,
        })
    }

    /// Sets them, replacing any of the same name.
    pub(crate) fn set(&self, headers: &mut HeaderMap) {
        headers.insert(PEER_ID.clone(), self.id.clone());
        headers.insert(XFCC.clone(), self.xfcc.clone());
    }
}

/// What one listener's requests are counted and logged under, built once
/// with the listener.
pub(crate) struct RequestTelemetry {
    listener: Arc<str>,
    direction: &'static str,
    tracing: bool,
    metrics: ProxyMetrics,
    requests: ListenerMetrics,
}

/// One request from its arrival to its answer: what its access-log entry,
/// metrics and span need that the listener does not hold.
pub(crate) struct Exchange {
    /// Counts the request in flight on its connection (idle tracking and
    /// drain) until the exchange is dropped, after the access log.
    _inflight: InFlight,
    started: Instant,
    id: RequestId,
    method: Method,
    trace_id: String,
    span: Span,
}

/// What the access log says of a request beyond what its [`Exchange`]
/// knows: who the peer is, the path, and the policy's verdict.
pub(crate) struct Logged<'a> {
    /// The peer (inbound: the verified caller; outbound: the server, or the
    /// identity it presented when refused; `-` if none).
    pub peer: &'a str,
    /// Outbound: the identity the configuration expects of the peer.
    pub expected_peer: Option<&'a str>,
    /// The path as authorized.
    pub path: &'a str,
    /// The path as received, when the policy normalized it to another.
    pub raw_path: Option<&'a str>,
    /// The policy's verdict, when one was asked for.
    pub verdict: Option<&'a AuthzRecord>,
}

impl RequestTelemetry {
    /// The request telemetry of the listener `listener` (`direction` is
    /// `inbound` or `outbound`, in metrics and the access log).
    pub(crate) fn new(listener: Arc<str>, direction: &'static str, obs: &Observability) -> Self {
        Self {
            requests: obs.metrics.listener(&listener, direction),
            listener,
            direction,
            tracing: obs.tracing,
            metrics: obs.metrics.clone(),
        }
    }

    /// Starts a request's exchange on a connection with `activity`. `span`
    /// makes its server span, called only when spans are exported (an
    /// untraced proxy pays nothing per request for them); the span
    /// continues the trace the request's headers carry.
    pub(crate) fn start<B>(
        &self,
        activity: &Arc<Activity>,
        req: &Request<B>,
        span: impl FnOnce() -> Span,
    ) -> Exchange {
        let inflight = activity.request();
        let started = Instant::now();
        let id = RequestId::next();
        let method = req.method().clone();
        let span = if self.tracing {
            let span = span();
            crate::telemetry::record_method_original(&span, req.method());
            continue_trace(&span, req.headers());
            span
        } else {
            Span::none()
        };
        let trace_id = trace_id(&span, req.headers());
        Exchange {
            _inflight: inflight,
            started,
            id,
            method,
            trace_id,
            span,
        }
    }
}

impl Exchange {
    /// This request's id (on its access-log line, its decision line and
    /// its warnings).
    pub(crate) fn id(&self) -> RequestId {
        self.id
    }

    /// The request's server span (none when spans are not exported).
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// The request's answer: `forward`, run in the request's span, then
    /// `answer`, which turns what it gives into the response and logs it
    /// (with [`Exchange::finish`]).
    ///
    /// Not an `async fn`: an async fn keeps its by-value arguments in its
    /// state next to the locals they move into (rustc #62958); as a `map`,
    /// the request's state is `forward`'s, once.
    pub(crate) fn answer<F, T, A>(
        self,
        forward: F,
        answer: A,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + use<F, T, A>
    where
        F: Future<Output = T> + Send,
        A: FnOnce(&Exchange, T) -> Response<ProxyBody> + Send,
    {
        forward
            .instrument(self.span.clone())
            .map(move |out| Ok(answer(&self, out)))
    }

    /// Counts and logs the answer `resp`: the decision (when a policy
    /// made one), the span's status and decision fields, the request
    /// metrics and the access-log line.
    pub(crate) fn finish(
        &self,
        resp: &Response<ProxyBody>,
        telemetry: &RequestTelemetry,
        logged: Logged<'_>,
    ) {
        // A gRPC denial's own status, not the 200 it is sent with.
        let status = logged_status(resp);
        let verdict = logged.verdict;
        let route = verdict.and_then(|v| v.route.as_deref()).unwrap_or("-");
        let decision = verdict.map_or(AuthzDecision::None, |v| v.decision);
        let elapsed = self.started.elapsed();
        if let Some(v) = verdict
            && v.decision != AuthzDecision::None
        {
            telemetry
                .metrics
                .decision(&telemetry.listener, route, v.decision, v.reason);
            self.span.record("moat.route", route);
            self.span.record("moat.decision", v.decision.as_str());
            if v.decision != AuthzDecision::Allow {
                self.span.record("moat.deny.reason", v.reason.as_str());
            }
        }
        let entry = AccessEntry {
            request_id: self.id,
            trace_id: &self.trace_id,
            listener: &telemetry.listener,
            direction: telemetry.direction,
            peer: logged.peer,
            expected_peer: logged.expected_peer,
            method: &self.method,
            path: logged.path,
            raw_path: logged.raw_path,
            status,
            route,
            decision,
            reason: verdict.filter(|v| v.decision.is_denial()).map(|v| v.reason),
            duration: elapsed,
            bytes: content_length(resp),
        };
        request_done(&self.span, &telemetry.requests, &entry);
    }
}
