//! Why a proxied request failed, by side, and the one place where that
//! becomes a status and a body; also the refusals the proxy makes itself
//! and their gRPC form.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::body::ProxyBody;

/// Why a proxied request failed, by side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ProxyError {
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
    /// The request head is one that some service could read otherwise
    /// than the policy did; its reason says which.
    #[error("malformed request: {}", .0.reason())]
    Malformed(Malformed),
    /// The caller's request body broke off or was malformed (a bad chunk,
    /// a connection closed mid-body): the caller's fault, not the
    /// upstream's, however far the upstream exchange had got.
    #[error("bad request body: {0}")]
    BadRequestBody(String),
}

/// A request head refused before the policy sees it, because a service
/// behind the proxy could read it otherwise than the policy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum Malformed {
    /// The method has a lowercase ASCII letter: methods are case-sensitive
    /// (RFC 9110 §9.1), so `delete` is not `DELETE` to the policy, but a
    /// service that upper-cases methods would run its `DELETE` handler.
    MethodNotUppercase,
    /// `Host` or `:authority` is not `host[:port]` (userinfo, a path, a
    /// non-numeric or empty port...): a lenient parser reduces it to a host
    /// the policy did not decide on.
    InvalidHost,
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    MissingHost,
    /// A `Transfer-Encoding` other than `chunked` alone: moat would drop
    /// the other codings and the service read coded bytes as the body.
    UnsupportedTransferEncoding,
}

impl Malformed {
    /// The stable `reason` of the answer.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Malformed::MethodNotUppercase => "method_not_uppercase",
            Malformed::InvalidHost => "invalid_host",
            Malformed::MissingHost => "missing_host",
            Malformed::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Malformed::MethodNotUppercase => {
                "moat: methods are case-sensitive; one with lowercase letters is refused"
            }
            Malformed::InvalidHost => "moat: Host must be host[:port]",
            Malformed::MissingHost => "moat: an HTTP/1.1 request needs a Host header",
            Malformed::UnsupportedTransferEncoding => {
                "moat: the only Transfer-Encoding taken is chunked"
            }
        }
    }
}

impl ProxyError {
    /// The status this error is answered with.
    pub(crate) fn status(&self) -> StatusCode {
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
            ProxyError::BadRequest(_)
            | ProxyError::Malformed(_)
            | ProxyError::BadRequestBody(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A stable code for the body's `reason` (and for scripts and alerts).
    pub(crate) fn reason(&self) -> &'static str {
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
            ProxyError::Malformed(m) => m.reason(),
            ProxyError::BadRequestBody(_) => "bad_request_body",
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
            ProxyError::Malformed(m) => m.message(),
            ProxyError::BadRequestBody(_) => "moat: the request body is malformed or incomplete",
        }
    }

    /// The response for this error: a small JSON body with the status's
    /// class, the stable `reason` and a message.
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let is_mismatch = matches!(self, ProxyError::AppProtocolMismatch);
        // The body's framing is what is in doubt: nothing after it on this
        // connection is read as another request.
        let close = matches!(
            self,
            ProxyError::Malformed(Malformed::UnsupportedTransferEncoding)
        );
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
        if close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
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
pub(crate) fn refusal(
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
pub(crate) fn grpc_denial(resp: &mut Response<Full<Bytes>>, reason: &str, route: Option<&str>) {
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
pub(crate) struct DeniedStatus(pub StatusCode);

/// The status to log and count for a response: a gRPC denial's own
/// status rather than the 200 it is sent with.
pub(crate) fn logged_status<B>(resp: &Response<B>) -> u16 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
