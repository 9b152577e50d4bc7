//! What a request head must be before the policy reads it: one that the
//! policy and every service behind the proxy read alike. Each check here
//! closes a gap a lenient service would open: a method it upper-cases, a
//! `Host` it reduces to another host, a transfer coding moat would drop.
//!
//! Every check is a scan of bytes already parsed; none allocates.

use std::net::Ipv6Addr;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Version};

use crate::proxy_error::{Malformed, ProxyError};

/// The checks of every request head, inbound and outbound alike: the
/// method's case, `Transfer-Encoding`, and the host.
pub(crate) fn check(parts: &Parts) -> Result<(), ProxyError> {
    check_method(&parts.method)?;
    check_transfer_encoding(&parts.headers)?;
    check_host(parts)
}

/// Methods are case-sensitive (RFC 9110 §9.1) and every standard one is
/// upper case: `delete` does not match a route's `DELETE`, but a service
/// that upper-cases methods (Werkzeug does) would run its `DELETE` handler.
fn check_method(method: &Method) -> Result<(), ProxyError> {
    if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(ProxyError::Malformed(Malformed::MethodNotUppercase));
    }
    Ok(())
}

/// `Transfer-Encoding` is taken only as one field saying `chunked`. hyper
/// reads any list ending in `chunked` as chunked and moat re-frames the
/// body: the other codings (`gzip, chunked`) would be dropped and the
/// service would read coded bytes as the body.
fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut values = headers.get_all(header::TRANSFER_ENCODING).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    if values.next().is_none()
        && first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
    {
        return Ok(());
    }
    Err(ProxyError::Malformed(
        Malformed::UnsupportedTransferEncoding,
    ))
}

/// One host, well formed: a single `Host`, present on HTTP/1.1 (RFC 9112
/// §3.2), equal to the target's authority when there is one (HTTP/1.1
/// absolute form, HTTP/2 `:authority`), and `host[:port]` either way.
fn check_host(parts: &Parts) -> Result<(), ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        // The policy would read the first, a service may read the last.
        return Err(ProxyError::BadRequest("several Host headers"));
    }
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    match (host.map(HeaderValue::as_bytes), authority) {
        (Some(host), Some(authority)) if !authority.eq_ignore_ascii_case(host) => {
            // The policy decides on Host; an HTTP/2 upstream is sent the
            // :authority (and RFC 9112 §3.2.2 says absolute-form wins).
            Err(ProxyError::BadRequest("Host and :authority differ"))
        }
        (None, _) if parts.version == Version::HTTP_11 => {
            Err(ProxyError::Malformed(Malformed::MissingHost))
        }
        (Some(h), _) | (None, Some(h)) if !is_host_port(h) => {
            Err(ProxyError::Malformed(Malformed::InvalidHost))
        }
        _ => Ok(()),
    }
}

/// True for `host[:port]` (RFC 3986 §3.2.2, §3.2.3), strictly: the host a
/// reg-name (or IPv4) of letters, digits and `-._~!$&'()*+,;=`, or an IPv6
/// `[literal]`; the port 1 to 5 digits up to 65535. Empty is allowed (RFC
/// 9112 §3.2: a target with no authority); an empty port is not, nor
/// userinfo (`@`), a path, query or fragment, nor percent-encoding (which
/// no client puts in a host name, and which a service decoding it, as Go's
/// `url.Parse` does, would turn into a host the policy did not see).
fn is_host_port(v: &[u8]) -> bool {
    let (host_ok, rest) = match v.first() {
        Some(b'[') => match v.iter().position(|&b| b == b']') {
            Some(end) => {
                let literal = std::str::from_utf8(&v[1..end]).ok();
                (
                    literal.is_some_and(|l| l.parse::<Ipv6Addr>().is_ok()),
                    &v[end + 1..],
                )
            }
            None => return false,
        },
        _ => {
            // The host runs to the first byte a reg-name cannot hold; what
            // follows must be nothing or `:port`.
            let end = v
                .iter()
                .position(|&b| !REG_NAME[usize::from(b)])
                .unwrap_or(v.len());
            // No port without a host (`:80`).
            (end > 0 || end == v.len(), &v[end..])
        }
    };
    host_ok
        && match rest {
            [] => true,
            [b':', port @ ..] => {
                (1..=5).contains(&port.len())
                    && port.iter().all(u8::is_ascii_digit)
                    && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65535
            }
            _ => false,
        }
}

/// The bytes of a reg-name: RFC 3986 unreserved and sub-delims (no
/// pct-encoded: see [`is_host_port`]). A table: one load per byte of every
/// request's host.
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_host_and_port_and_nothing_a_lenient_parser_reduces() {
        for ok in [
            "internal.svc",
            "internal.svc:443",
            "Internal.SVC:1",
            "127.0.0.1:65535",
            "[::1]",
            "[::1]:8080",
            "a_b-c~d",
            "",
        ] {
            assert!(is_host_port(ok.as_bytes()), "{ok:?} is a host");
        }
        for bad in [
            "internal.svc:abc",
            "user@internal.svc",
            "internal.svc:443:80",
            "internal.svc/x",
            "internal.svc?x",
            "internal.svc#x",
            "internal.svc:-1",
            "internal.svc:",
            "internal.svc:65536",
            "internal.svc:000443",
            "internal%2esvc",
            "internal.svc ",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[v1.x]",
            "[fe80::1%25eth0]",
            ":80",
        ] {
            assert!(!is_host_port(bad.as_bytes()), "{bad:?} is refused");
        }
    }
}
