//! How a served HTTP connection ended, told to the operator: a client cut
//! off for holding a connection without using it ([`Cut`]) and an HTTP/2
//! connection we ended for the peer's misbehaviour (a GOAWAY with an error
//! code: rapid reset, CONTINUATION or header floods, protocol errors) are
//! counted and logged with the listener and the peer; anything else (the
//! peer went away) is a debug line, as before.

use std::error::Error;
use std::net::SocketAddr;

use super::Cut;
use crate::telemetry::ProxyMetrics;

/// Counts and logs why a connection of `listener` from `peer_addr` (with
/// the verified `peer` identity on the inbound) ended with `error`. Called
/// once per connection that ended with an error, never per request.
pub(crate) fn report(
    metrics: &ProxyMetrics,
    listener: &str,
    peer_addr: SocketAddr,
    peer: Option<&str>,
    error: &(dyn Error + 'static),
) {
    if let Some(cut) = error.downcast_ref::<Cut>() {
        let reason = cut.reason();
        metrics.connection_cut(listener, reason);
        tracing::info!(listener, %peer_addr, peer, reason, error = %cut, "connection cut off");
        return;
    }
    if let Some(reason) = our_goaway(error) {
        let name = reason_name(reason);
        metrics.http2_goaway(listener, name);
        tracing::warn!(listener, %peer_addr, peer, reason = name, %error, "HTTP/2 connection refused: GOAWAY sent for the peer's misbehaviour");
        return;
    }
    tracing::debug!(listener, %peer_addr, peer, %error, "connection ended with an error");
}

impl Cut {
    /// The `reason` label of `moat_connections_cut_total`.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::NoFirstRequest => "header_timeout",
            Self::CloseUnfinished => "close_timeout",
        }
    }
}

/// The error code of a GOAWAY that h2 sent (not received, not our own
/// graceful NO_ERROR one), as hyper reports it: a `hyper::Error` whose
/// source is the `h2::Error`.
fn our_goaway(error: &(dyn Error + 'static)) -> Option<h2::Reason> {
    let h2 = error
        .downcast_ref::<hyper::Error>()
        .and_then(|e| e.source())
        .and_then(|e| e.downcast_ref::<h2::Error>())?;
    let reason = h2.reason()?;
    (h2.is_go_away() && !h2.is_remote() && reason != h2::Reason::NO_ERROR).then_some(reason)
}

/// RFC 9113 §7's error codes, by name: a bounded label set.
fn reason_name(reason: h2::Reason) -> &'static str {
    match u32::from(reason) {
        0x0 => "no_error",
        0x1 => "protocol_error",
        0x2 => "internal_error",
        0x3 => "flow_control_error",
        0x4 => "settings_timeout",
        0x5 => "stream_closed",
        0x6 => "frame_size_error",
        0x7 => "refused_stream",
        0x8 => "cancel",
        0x9 => "compression_error",
        0xa => "connect_error",
        0xb => "enhance_your_calm",
        0xc => "inadequate_security",
        0xd => "http_1_1_required",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_h2_error_code_has_its_own_name() {
        let names: std::collections::HashSet<_> = (0..=0xdu32)
            .map(|code| reason_name(h2::Reason::from(code)))
            .collect();
        assert_eq!(names.len(), 14);
        assert!(!names.contains("other"));
        assert_eq!(
            reason_name(h2::Reason::ENHANCE_YOUR_CALM),
            "enhance_your_calm"
        );
        assert_eq!(reason_name(h2::Reason::from(0x77)), "other");
    }
}
