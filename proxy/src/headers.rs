//! Header fields the proxy itself handles on the way through: the
//! hop-by-hop ones (RFC 9110 §7.6.1), removed at each hop, and the few it
//! reads (`content-type` for gRPC, `content-length` for the access log).
//! The identity headers are set and removed in `request.rs`, claim headers
//! in the policy; both with [`remove_underscore_spellings`] from here.

use std::borrow::Borrow;

use http::Response;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::Body;

/// A response's `content-length`, when it has one, or else its body's
/// exact size when that is known. A response the sidecar makes itself (a
/// 400, a policy's 403) has no header yet: hyper writes it later, from that
/// same size.
pub(crate) fn content_length<B: Body>(resp: &Response<B>) -> Option<u64> {
    resp.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or_else(|| resp.body().size_hint().exact())
}

/// True for a gRPC request (`application/grpc`, `application/grpc+proto`,
/// ...; not gRPC-Web, which has its own HTTP/1.1 servers).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
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
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Most requests carry none and most responses only `Connection`: one
    // pass over the names (comparisons, no hashing) finds which are
    // there, and only those are removed (each removal hashes its name).
    let present = present_hop_by_hop(headers, &[]);
    strip_present(headers, present)
}

/// [`strip_hop_by_hop`] and [`remove_underscore_spellings`] of `protected`
/// on a request's fields, from one pass over their names: a request
/// without an `_` in a name pays no second pass.
pub(crate) fn strip_request_fields(
    headers: &mut HeaderMap,
    protected: &[&HeaderName],
) -> Option<HeaderValue> {
    let present = present_hop_by_hop(headers, protected);
    if present & UNDERSCORE_PRESENT != 0 {
        remove_underscore_spellings(headers, protected);
    }
    strip_present(headers, present & !UNDERSCORE_PRESENT)
}

/// [`strip_hop_by_hop`] once [`present_hop_by_hop`] has said which are there.
fn strip_present(headers: &mut HeaderMap, present: u16) -> Option<HeaderValue> {
    if present == 0 {
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
    for (i, name) in ALWAYS_HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    if present & TE_PRESENT != 0
        && let Some(te) = headers.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        headers.remove(header::TE);
    }
    upgrade
}

/// Removes the fields whose name is one of `protected` spelled with `_`
/// for some `-` (`x_moat_peer_id`, `x-moat_peer-id`): CGI and WSGI servers
/// that map both to one variable (Werkzeug's, Python's `wsgiref`) name
/// them like the real header (`HTTP_X_MOAT_PEER_ID`) and merge them with
/// it, the forged value first. (nginx and Apache drop such names by
/// default; a service cannot count on either.) The real spelling is the
/// caller's to remove.
///
/// Only a name as long as a protected one is compared, so a request
/// without one costs a length comparison per field and allocates nothing.
pub(crate) fn remove_underscore_spellings<N: Borrow<HeaderName>>(
    headers: &mut HeaderMap,
    protected: &[N],
) {
    let forged = |name: &HeaderName| {
        let name = name.as_str().as_bytes();
        protected.iter().any(|p| {
            let p = p.borrow().as_str().as_bytes();
            p.len() == name.len()
                && name != p
                && name
                    .iter()
                    .zip(p)
                    .all(|(&n, &p)| n == p || (n == b'_' && p == b'-'))
        })
    };
    // Collected first (the map cannot be changed while its names are
    // borrowed); the `Vec` allocates only once a forged name is found.
    let found: Vec<HeaderName> = headers.keys().filter(|n| forged(n)).cloned().collect();
    for name in found {
        headers.remove(&name);
    }
}

/// Which hop-by-hop names `headers` holds: bit `i` for
/// `ALWAYS_HOP_BY_HOP[i]`, [`TE_PRESENT`] for `te`; and
/// [`UNDERSCORE_PRESENT`] when a name as long as one of `protected` has an
/// `_` in it (only those are scanned: this runs on every request).
fn present_hop_by_hop(headers: &HeaderMap, protected: &[&HeaderName]) -> u16 {
    let mut present = 0;
    for name in headers.keys() {
        if name == header::TE {
            present |= TE_PRESENT;
        } else if let Some(i) = ALWAYS_HOP_BY_HOP.iter().position(|n| *n == name) {
            present |= 1 << i;
        } else if !protected.is_empty() {
            let name = name.as_str();
            if protected.iter().any(|p| p.as_str().len() == name.len())
                && name.as_bytes().contains(&b'_')
            {
                present |= UNDERSCORE_PRESENT;
            }
        }
    }
    present
}

/// The bit of `te` in what [`present_hop_by_hop`] returns.
const TE_PRESENT: u16 = 1 << ALWAYS_HOP_BY_HOP.len();
/// The bit of a name with an `_` in what [`present_hop_by_hop`] returns.
const UNDERSCORE_PRESENT: u16 = TE_PRESENT << 1;

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
    fn underscore_spellings_of_protected_names_go_and_others_stay() {
        let mut h = HeaderMap::new();
        for name in [
            "x_user_id",
            "x-user_id",
            "x_user-id",
            "x-user-id",
            "x_other_id",
        ] {
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        remove_underscore_spellings(&mut h, &[HeaderName::from_static("x-user-id")]);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-user-id", "x_other_id"]);
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
