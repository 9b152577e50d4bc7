//! What the inbound and outbound HTTP paths share: the body type, hop-by-hop
//! header handling, head-size limits, and the one place where proxy errors
//! become statuses.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::config::Limits;

/// The body of every response the proxy sends: the upstream's, streamed, or
/// a short one of its own.
#[derive(Debug)]
pub enum ProxyBody {
    /// The upstream's body, streamed; its trailers are held to the header
    /// limits (over them, the body ends in an error: the caller's stream
    /// is reset, and only it).
    Upstream {
        /// The body.
        body: Incoming,
        /// The limits its trailers are held to.
        limit: HeadLimit,
        /// When it answers a request whose body was held back for
        /// `Expect: 100-continue` and never asked for: gives that request
        /// up (closing its upstream connection) once this body ends or drops.
        give_up: Option<crate::expect::GiveUp>,
    },
    /// A body the proxy made (an error, or nothing).
    Short(Full<Bytes>),
}

/// `max_header_bytes` and `max_header_count`, as a body carries them to
/// check its trailers.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimit {
    bytes: u32,
    count: u32,
}

/// Trailers over the header limits: the stream is ended with an error.
#[derive(Debug, thiserror::Error)]
#[error("response trailers over the header limits ({0} fields)")]
pub struct TrailersTooLarge(usize);

/// The header carrying the verified peer SPIFFE ID to the local service.
pub static PEER_ID: HeaderName = HeaderName::from_static("x-moat-peer-id");
/// An XFCC-style header beside it (`By=<us>;URI=<peer>`).
pub static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// A response's `content-length`, when it has one.
pub fn content_length<B>(resp: &Response<B>) -> Option<u64> {
    resp.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Why a proxied request failed, by side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The local service could not be reached (inbound).
    #[error("local service unavailable: {0}")]
    LocalUnavailable(String),
    /// The peer sidecar could not be reached (outbound).
    #[error("peer unavailable: {0}")]
    PeerUnavailable(String),
    /// The peer presented a certificate we refuse (outbound).
    #[error("peer identity refused: {detail}")]
    PeerRefused {
        /// Why, for the log.
        detail: String,
        /// The SPIFFE ID the peer presented, if its certificate had one.
        presented: Option<String>,
    },
    /// The peer's certificate or identity is revoked (outbound).
    #[error("peer revoked: {0}")]
    PeerRevoked(String),
    /// The upstream (service or peer) failed mid-exchange.
    #[error("upstream failed: {0}")]
    Upstream(String),
    /// The upstream did not answer in time.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// We hold no certificate yet (outbound before the first issue).
    #[error("proxy not ready: no workload certificate yet")]
    NotReady,
    /// The request's header fields are over `max_header_bytes` or
    /// `max_header_count`.
    #[error("request headers too large")]
    HeadersTooLarge,
    /// The request target is longer than `max_header_bytes`.
    #[error("request target too long")]
    UriTooLong,
    /// The upstream's response head is over `max_header_bytes` or
    /// `max_header_count`; it is not passed on.
    #[error("response headers too large: {0}")]
    ResponseHeadersTooLarge(String),
    /// A gRPC request to a service configured (or found) to speak HTTP/1.1.
    #[error("gRPC request, but the service is spoken to in HTTP/1.1")]
    AppProtocolMismatch,
    /// `CONNECT` (a tunnel to anywhere) is not something moat forwards.
    #[error("CONNECT is not supported")]
    ConnectNotSupported,
    /// The request is not something we can forward.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

impl ProxyError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::LocalUnavailable(_)
            | ProxyError::PeerUnavailable(_)
            | ProxyError::PeerRefused { .. }
            | ProxyError::PeerRevoked(_)
            | ProxyError::Upstream(_)
            | ProxyError::ResponseHeadersTooLarge(_)
            | ProxyError::AppProtocolMismatch => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::ConnectNotSupported => StatusCode::NOT_IMPLEMENTED,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A stable code for the body's `reason` (and for scripts and alerts).
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::LocalUnavailable(_) => "local_unavailable",
            ProxyError::PeerUnavailable(_) => "peer_unavailable",
            ProxyError::PeerRefused { .. } => "peer_refused",
            ProxyError::PeerRevoked(_) => "revoked",
            ProxyError::Upstream(_) => "upstream_failed",
            ProxyError::Timeout(_) => "upstream_timeout",
            ProxyError::NotReady => "not_ready",
            ProxyError::HeadersTooLarge => "request_headers_too_large",
            ProxyError::UriTooLong => "uri_too_long",
            ProxyError::ResponseHeadersTooLarge(_) => "response_headers_too_large",
            ProxyError::AppProtocolMismatch => "app_protocol_mismatch",
            ProxyError::ConnectNotSupported => "connect_not_supported",
            ProxyError::BadRequest(_) => "bad_request",
        }
    }

    /// A short message saying which side failed; no internal detail leaks.
    fn message(&self) -> &'static str {
        match self {
            ProxyError::LocalUnavailable(_) => "moat: local service unavailable",
            ProxyError::PeerUnavailable(_) => "moat: peer unavailable",
            ProxyError::PeerRefused { .. } => "moat: peer identity refused",
            ProxyError::PeerRevoked(_) => "moat: the peer's certificate is revoked",
            ProxyError::Upstream(_) => "moat: upstream failed",
            ProxyError::Timeout(_) => "moat: upstream timed out",
            ProxyError::NotReady => "moat: proxy not ready",
            ProxyError::HeadersTooLarge => "moat: request headers too large",
            ProxyError::UriTooLong => "moat: request target too long",
            ProxyError::ResponseHeadersTooLarge(_) => {
                "moat: the upstream's response headers are over the limit (max_header_bytes, max_header_count)"
            }
            ProxyError::AppProtocolMismatch => MISMATCH,
            ProxyError::ConnectNotSupported => "moat: CONNECT is not supported",
            ProxyError::BadRequest(_) => "moat: bad request",
        }
    }

    /// The response for this error: a small JSON body with the status's
    /// class, the stable `reason` and a message.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let is_mismatch = matches!(self, ProxyError::AppProtocolMismatch);
        let body = serde_json::json!({
            "error": error_class(status),
            "reason": self.reason(),
            "message": self.message(),
        })
        .to_string();
        let mut resp = Response::new(ProxyBody::Short(Full::new(Bytes::from(body))));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if is_mismatch {
            // The caller is a gRPC client, which shows `grpc-message` rather
            // than a body: UNAVAILABLE, with the setting to change.
            headers.insert(GRPC_STATUS.clone(), HeaderValue::from_static("14"));
            headers.insert(GRPC_MESSAGE.clone(), HeaderValue::from_static(MISMATCH));
        }
        resp
    }
}

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const MISMATCH: &str = "moat: gRPC needs HTTP/2 to the service, and this listener speaks HTTP/1.1 to it; set app_protocol = \"grpc\" on its [[inbound]] if the service speaks h2c";

/// The `error` of a JSON error body: the status's name, in snake case.
fn error_class(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "request_header_fields_too_large",
        StatusCode::NOT_IMPLEMENTED => "not_implemented",
        StatusCode::BAD_GATEWAY => "bad_gateway",
        StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
        StatusCode::GATEWAY_TIMEOUT => "gateway_timeout",
        _ => "error",
    }
}

/// A refusal made by the proxy itself (not by the policy file): the JSON
/// body of every proxy error, or for a gRPC caller a trailers-only gRPC
/// answer (see [`grpc_denial`]).
pub fn refusal(
    status: StatusCode,
    reason: &'static str,
    message: &'static str,
    grpc: bool,
) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": error_class(status),
        "reason": reason,
        "message": message,
    })
    .to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if grpc {
        grpc_denial(&mut resp, reason, None);
    }
    resp.map(ProxyBody::Short)
}

/// Reshapes a denial for a gRPC caller, which reads `grpc-status` rather
/// than the HTTP status or a body: a trailers-only answer (no body,
/// `content-type: application/grpc`) carrying `grpc-status` (401 → 16
/// UNAUTHENTICATED, 403 → 7 PERMISSION_DENIED, 400 → 3 INVALID_ARGUMENT)
/// and a `grpc-message` naming the reason and route. The HTTP status is
/// 200, as the gRPC spec writes a trailers-only response: grpc-core clients
/// (Python, C++, Ruby) read `grpc-status` on a 401/403 too (checked with
/// grpcio, both ways), but others (grpc-go) let a non-200 status win, map it
/// to a code of their own and drop `grpc-message`. The access log and
/// metrics of this sidecar still show the denial's own status
/// ([`logged_status`]); the caller's sidecar relays a 200.
pub fn grpc_denial(resp: &mut Response<Full<Bytes>>, reason: &str, route: Option<&str>) {
    let code = match resp.status() {
        StatusCode::UNAUTHORIZED => "16",
        StatusCode::FORBIDDEN => "7",
        StatusCode::BAD_REQUEST => "3",
        _ => "2",
    };
    let message = match route {
        Some(route) => format!("moat: denied by route {route:?}: {reason}"),
        None => format!("moat: denied: {reason}"),
    };
    *resp.body_mut() = Full::new(Bytes::new());
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(GRPC_STATUS.clone(), HeaderValue::from_static(code));
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&message)) {
        headers.insert(GRPC_MESSAGE.clone(), v);
    }
    if GRPC_DENIAL_AS_200 {
        // The denial's own status, for the access log and metrics.
        let denied = DeniedStatus(resp.status());
        resp.extensions_mut().insert(denied);
        *resp.status_mut() = StatusCode::OK;
    }
}

/// See [`grpc_denial`].
const GRPC_DENIAL_AS_200: bool = true;

/// The status a gRPC denial stands for, on a response sent as 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedStatus(pub StatusCode);

/// The status to log and count for a response: a gRPC denial's own
/// status rather than the 200 it is sent with.
pub fn logged_status<B>(resp: &Response<B>) -> u16 {
    resp.extensions()
        .get::<DeniedStatus>()
        .map_or(resp.status(), |d| d.0)
        .as_u16()
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and
/// `%`, become `%XX` (gRPC over HTTP/2, "Responses").
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A small plain-text response.
pub fn short_response(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Short(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl ProxyBody {
    /// No body (a HEAD answer, a 101).
    pub fn empty() -> Self {
        ProxyBody::Short(Full::new(Bytes::new()))
    }

    /// The upstream's body, its trailers held to `limits`.
    pub fn upstream(body: Incoming, limits: &Limits) -> Self {
        ProxyBody::Upstream {
            body,
            limit: HeadLimit::from(limits),
            give_up: None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, limit, .. } => {
                let frame = std::task::ready!(Pin::new(body).poll_frame(cx));
                if let Some(Ok(f)) = &frame
                    && let Some(trailers) = f.trailers_ref()
                    && !limit.admits(trailers)
                {
                    return Poll::Ready(Some(Err(Box::new(TrailersTooLarge(trailers.len())))));
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            ProxyBody::Short(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Short(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Short(b) => b.size_hint(),
        }
    }
}

impl From<&Limits> for HeadLimit {
    fn from(limits: &Limits) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            bytes: clamp(limits.max_header_bytes),
            count: clamp(limits.max_header_count),
        }
    }
}

impl HeadLimit {
    /// True when `headers` is within the limits (see [`head_within`]).
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        headers.len() <= self.count as usize
            && headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>()
                <= self.bytes as usize
    }
}

/// True when a head is within `max_header_count` fields and
/// `max_header_bytes` (each field's name and value, plus 4 bytes for `: `
/// and CRLF, as HTTP/1.1 writes it; the same count over HTTP/2).
pub fn head_within(headers: &HeaderMap, limits: &Limits) -> bool {
    HeadLimit::from(limits).admits(headers)
}

/// The parsers' own limits, set above the checks moat makes itself
/// ([`head_within`], [`uri_within`]) so that those decide and answer with
/// a status for the one request, and a peer or service configured with up
/// to twice the limits is still parsed rather than cut off.
#[derive(Debug, Clone, Copy)]
pub struct Wire {
    /// An HTTP/1.1 head (request line or status line, and fields): room for
    /// a target and a field block each at `max_header_bytes`. The server's
    /// read buffer is this size, so a longer target gets 414 from moat
    /// rather than 431 from the parser.
    pub h1_head: usize,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` of the HTTP/2 servers. HTTP/2 counts
    /// 32 bytes of overhead per field, HTTP/1.1 4: room for
    /// `max_header_count` fields, a target and the pseudo-headers.
    pub h2_header_list: u32,
    /// The same for the HTTP/2 clients (to peers and services), four times
    /// larger and at least 1 MiB: the h2 crate resets the stream of a
    /// header block over it, and tears down the whole connection (every
    /// caller's streams to that peer or service) only for one four times
    /// over again, which a peer sidecar (checking its own limits before it
    /// sends) never sends, and a service would have to send several MiB
    /// of headers to cause. Fields past the limit are not kept, so the
    /// margin costs decoding time, not memory.
    pub h2_client_header_list: u32,
}

/// The parser limits for `limits`.
pub fn wire(limits: &Limits) -> Wire {
    let bytes = limits.max_header_bytes;
    let list = 2 * bytes + 32 * limits.max_header_count + 1024;
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Wire {
        h1_head: (2 * bytes + 4096).max(8192),
        h2_header_list: clamp(list),
        h2_client_header_list: clamp((4 * list).max(1 << 20)),
    }
}

/// True when a request target is within `max_header_bytes`.
pub fn uri_within(uri: &Uri, limits: &Limits) -> bool {
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let pq = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    authority + pq <= limits.max_header_bytes
}

/// Checks a request head against the limits: its target, then its fields.
pub fn check_request_head(parts: &http::request::Parts, limits: &Limits) -> Result<(), ProxyError> {
    if !uri_within(&parts.uri, limits) {
        return Err(ProxyError::UriTooLong);
    }
    if !head_within(&parts.headers, limits) {
        return Err(ProxyError::HeadersTooLarge);
    }
    Ok(())
}

/// True for a gRPC request (`application/grpc`, `application/grpc+proto`,
/// ...; not gRPC-Web, which has its own HTTP/1.1 servers).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in
/// `Connection`. `te: trailers` survives: gRPC needs it. When `Connection`
/// names `upgrade`, returns the `Upgrade` header that went with it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Most requests and responses carry none: one pass over the names
    // (comparisons, no hashing) decides whether there is anything to do.
    if !headers.keys().any(is_hop_by_hop) {
        return None;
    }
    let mut upgrade = false;
    // Names listed in `Connection` go too; the usual tokens (`keep-alive`,
    // `close`) are removed below anyway or name nothing, so they cost no
    // allocation here.
    let mut named: Vec<HeaderName> = Vec::new();
    for token in headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        if token.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
            continue;
        }
        if token.is_empty()
            || token.eq_ignore_ascii_case("close")
            || token.eq_ignore_ascii_case(header::TE.as_str())
            || ALWAYS_HOP_BY_HOP
                .iter()
                .any(|n| token.eq_ignore_ascii_case(n.as_str()))
        {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            named.push(name);
        }
    }
    for name in named {
        headers.remove(&name);
    }
    let upgrade = if upgrade {
        headers.remove(header::UPGRADE)
    } else {
        None
    };
    for name in ALWAYS_HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(te) = headers.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        headers.remove(header::TE);
    }
    upgrade
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop whatever `Connection` says (`te` is judged by its value).
static ALWAYS_HOP_BY_HOP: [&HeaderName; 8] = [
    &header::CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
];

/// A header that does not travel past this hop (or may name others that don't).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE || ALWAYS_HOP_BY_HOP.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn each_failing_side_has_its_status() {
        assert_eq!(ProxyError::LocalUnavailable(String::new()).status(), 502);
        let refused = ProxyError::PeerRefused {
            detail: String::new(),
            presented: None,
        };
        assert_eq!(refused.status(), 502);
        assert_eq!(ProxyError::Timeout(Duration::from_secs(1)).status(), 504);
        assert_eq!(ProxyError::NotReady.status(), 503);
        assert_eq!(ProxyError::HeadersTooLarge.status(), 431);
        assert_eq!(ProxyError::UriTooLong.status(), 414);
        assert_eq!(ProxyError::AppProtocolMismatch.status(), 502);
        assert_eq!(ProxyError::ConnectNotSupported.status(), 501);
    }

    #[test]
    fn an_upgrade_is_reported_and_its_headers_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("sec-websocket-key", HeaderValue::from_static("k"));
        assert_eq!(strip_hop_by_hop(&mut h).unwrap(), "websocket");
        assert!(h.get(header::UPGRADE).is_none() && h.get(header::CONNECTION).is_none());
        assert!(h.get("sec-websocket-key").is_some());
        // `Upgrade` without `Connection: upgrade` is no upgrade (RFC 9110 §7.8).
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(strip_hop_by_hop(&mut h).is_none());
        assert!(h.get(header::UPGRADE).is_none());
    }

    #[test]
    fn head_limits_count_fields_and_bytes_as_http1_writes_them() {
        let limits = Limits {
            max_header_bytes: 1024,
            max_header_count: 16,
            ..Limits::default()
        };
        let mut h = HeaderMap::new();
        for i in 0..16 {
            h.insert(
                HeaderName::from_bytes(format!("x-{i:02}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(head_within(&h, &limits), "16 fields of 9 bytes");
        h.insert("x-16", HeaderValue::from_static("v"));
        assert!(!head_within(&h, &limits), "17 fields");
        let mut h = HeaderMap::new();
        h.insert("x-big", HeaderValue::from_str(&"a".repeat(1015)).unwrap());
        assert!(head_within(&h, &limits), "5 + 1015 + 4 bytes");
        h.insert("x-big", HeaderValue::from_str(&"a".repeat(1016)).unwrap());
        assert!(!head_within(&h, &limits));
    }

    #[test]
    fn grpc_denials_carry_the_grpc_status_and_a_readable_message() {
        for (status, code) in [
            (StatusCode::UNAUTHORIZED, "16"),
            (StatusCode::FORBIDDEN, "7"),
            (StatusCode::BAD_REQUEST, "3"),
        ] {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
            *resp.status_mut() = status;
            grpc_denial(&mut resp, "peer_not_allowed", Some("caf\u{e9} 100%"));
            assert_eq!(resp.headers()["grpc-status"], code);
            assert_eq!(
                resp.headers()["grpc-message"],
                "moat: denied by route \"caf%C3%A9 100%25\": peer_not_allowed"
            );
            assert_eq!(resp.headers()["content-type"], "application/grpc");
            assert_eq!(logged_status(&resp), status.as_u16());
        }
    }

    #[test]
    fn grpc_is_told_from_grpc_web_by_content_type() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("Application/GRPC;charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grpc-web+proto"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
