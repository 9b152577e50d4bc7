//! What the inbound and outbound HTTP paths share: the body type, hop-by-hop
//! header handling, and the one place where proxy errors become statuses.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// The body of every response the proxy sends: the upstream's, streamed, or
/// a short one of its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

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
    #[error("peer identity refused: {0}")]
    PeerRefused(String),
    /// The upstream (service or peer) failed mid-exchange.
    #[error("upstream failed: {0}")]
    Upstream(String),
    /// The upstream did not answer in time.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// We hold no certificate yet (outbound before the first issue).
    #[error("proxy not ready: no workload certificate yet")]
    NotReady,
    /// The request head is larger than the limit.
    #[error("request headers too large")]
    HeadersTooLarge,
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
            | ProxyError::PeerRefused(_)
            | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A short body saying which side failed; no internal detail leaks.
    fn body(&self) -> &'static str {
        match self {
            ProxyError::LocalUnavailable(_) => "moat: local service unavailable\n",
            ProxyError::PeerUnavailable(_) => "moat: peer unavailable\n",
            ProxyError::PeerRefused(_) => "moat: peer identity refused\n",
            ProxyError::Upstream(_) => "moat: upstream failed\n",
            ProxyError::Timeout(_) => "moat: upstream timed out\n",
            ProxyError::NotReady => "moat: proxy not ready\n",
            ProxyError::HeadersTooLarge => "moat: request headers too large\n",
            ProxyError::BadRequest(_) => "moat: bad request\n",
        }
    }

    /// The response for this error.
    pub fn into_response(self) -> Response<ProxyBody> {
        short_response(self.status(), self.body())
    }
}

/// A small plain-text response.
pub fn short_response(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in
/// `Connection`. `te: trailers` survives: gRPC needs it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests and responses carry none: one pass over the names
    // (comparisons, no hashing) decides whether there is anything to do.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
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
    for name in ALWAYS_HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(te) = headers.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        headers.remove(header::TE);
    }
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

/// The size of a header block as HTTP/2 counts it (name + value + 32 each).
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum()
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
        assert_eq!(ProxyError::PeerRefused(String::new()).status(), 502);
        assert_eq!(ProxyError::Timeout(Duration::from_secs(1)).status(), 504);
        assert_eq!(ProxyError::NotReady.status(), 503);
        assert_eq!(ProxyError::HeadersTooLarge.status(), 431);
    }
}
