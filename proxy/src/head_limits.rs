//! What a request or response head may hold (`max_header_bytes`,
//! `max_header_count`), checked by moat itself so that it answers 414 or
//! 431 for the one request, and the parsers' own limits, set above those.

use http::Uri;
use http::header::HeaderMap;

use crate::config::Limits;
use crate::proxy_error::ProxyError;

/// `max_header_bytes` and `max_header_count`, as a body carries them to
/// check its trailers.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimit {
    bytes: u32,
    count: u32,
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
pub(crate) fn head_within(headers: &HeaderMap, limits: &Limits) -> bool {
    HeadLimit::from(limits).admits(headers)
}

/// The parsers' own limits, set above the checks moat makes itself
/// ([`head_within`], [`uri_within`]) so that those decide and answer with
/// a status for the one request, and a peer or service configured with up
/// to twice the limits is still parsed rather than cut off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wire {
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
pub(crate) fn wire(limits: &Limits) -> Wire {
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
pub(crate) fn uri_within(uri: &Uri, limits: &Limits) -> bool {
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    let pq = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    authority + pq <= limits.max_header_bytes
}

/// Checks a request head against the limits: its target, then its fields.
pub(crate) fn check_request_head(
    parts: &http::request::Parts,
    limits: &Limits,
) -> Result<(), ProxyError> {
    if !uri_within(&parts.uri, limits) {
        return Err(ProxyError::UriTooLong);
    }
    if !head_within(&parts.headers, limits) {
        return Err(ProxyError::HeadersTooLarge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::header::{HeaderName, HeaderValue};

    use super::*;

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
}
