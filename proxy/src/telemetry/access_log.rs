//! The access log: one line per request (target `moat::access`), with the
//! request's id, and what a listener records once a request has its answer.

use std::time::Duration;

use super::ListenerMetrics;
use crate::authz::{AuthzDecision, AuthzReason};

/// A request's id in this proxy's logs: the access-log line and the
/// decision line of one request carry the same `request_id`. A `u64` (a
/// random start per process, then a counter), formatted as 16 hex digits
/// only when a line is written: nothing is allocated for it per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(u64);

impl RequestId {
    /// The next id of this process.
    pub fn next() -> Self {
        use std::sync::LazyLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: LazyLock<AtomicU64> = LazyLock::new(|| AtomicU64::new(rand::random()));
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One access-log entry.
#[derive(Debug)]
pub struct AccessEntry<'a> {
    /// This request's id (also on its decision log line).
    pub request_id: RequestId,
    /// The trace this request belongs to.
    pub trace_id: &'a str,
    /// Listener name.
    pub listener: &'a str,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The peer (inbound: the verified caller; outbound: the server, or
    /// the identity it presented when it was refused; `-` if none).
    pub peer: &'a str,
    /// Outbound: the identity the configuration expects of the peer.
    pub expected_peer: Option<&'a str>,
    /// Method.
    pub method: &'a http::Method,
    /// Path as authorized: normalized by the policy (no query: it may hold
    /// secrets).
    pub path: &'a str,
    /// The path as received, when normalization changed it.
    pub raw_path: Option<&'a str>,
    /// Status sent back.
    pub status: u16,
    /// Route that decided (`-` when none).
    pub route: &'a str,
    /// `allow`, `deny`, `audit_allow`, or `none` (no policy).
    pub decision: AuthzDecision,
    /// For a denial or an audited one: the policy's reason code
    /// (`no_route`, `peer_not_allowed`, `jwt_expired`, ...).
    pub reason: Option<AuthzReason>,
    /// Time to the response head.
    pub duration: Duration,
    /// Response body bytes, when known: from `content-length`, or the
    /// body's exact size.
    pub bytes: Option<u64>,
}

/// What a listener does once a request has its answer: the server span's
/// status, the request metrics, and the access-log line.
pub fn request_done(span: &tracing::Span, metrics: &ListenerMetrics, e: &AccessEntry<'_>) {
    super::record_status(span, e.status);
    if e.status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    metrics.request(e.route, e.method, e.status, e.decision, e.duration);
    access_log(e);
}

/// Milliseconds, rounded to the microsecond (`0.165`, not `0.16532100000000002`).
pub fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// Writes one access-log line (target `moat::access`, message `access`).
/// Tokens and keys never appear: only the fields above.
fn access_log(e: &AccessEntry<'_>) {
    tracing::info!(
        target: "moat::access",
        request_id = %e.request_id,
        trace_id = e.trace_id,
        listener = e.listener,
        direction = e.direction,
        peer = e.peer,
        expected_peer = e.expected_peer,
        method = %e.method,
        path = e.path,
        raw_path = e.raw_path,
        status = e.status,
        route = e.route,
        decision = e.decision.as_str(),
        reason = e.reason.map(AuthzReason::as_str),
        duration_ms = millis(e.duration),
        bytes = e.bytes,
        "access"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_logged_in_whole_microseconds() {
        assert_eq!(millis(Duration::from_nanos(165_321)), 0.165);
        assert_eq!(
            millis(Duration::from_nanos(165_321_999)).to_string(),
            "165.321"
        );
        assert_eq!(millis(Duration::from_secs(2)), 2000.0);
    }

    #[test]
    fn request_ids_are_distinct_16_hex_digits() {
        let (a, b) = (RequestId::next(), RequestId::next());
        assert_ne!(a, b);
        for id in [a, b] {
            let s = id.to_string();
            assert!(
                s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit()),
                "{s}"
            );
        }
    }
}
