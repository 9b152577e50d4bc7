//! `[limits]`: timeouts, header limits and connection limits, with their
//! defaults.

use std::time::Duration;

use serde::Deserialize;

/// `[limits]`: nothing the proxy holds for a peer is unbounded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Time allowed for a TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time allowed to receive a request's headers (slowloris). Also: the
    /// time a new HTTP connection has to start its first request (HTTP/2:
    /// preface and HEADERS), and the time a graceful close for idleness has
    /// to finish; past either the connection is dropped. An HTTP/1.1
    /// keep-alive connection waiting for its next request is closed after
    /// this long too (hyper times the wait for every head).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this
    /// long is closed. An HTTP/2 connection counts streams only: one with
    /// none open for this long is closed (GOAWAY) whatever PINGs move. An
    /// idle HTTP/1.1 connection is closed at `header_read_timeout` first.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest header block of a request or a response, counted as
    /// HTTP/1.1 writes it (each field's name and value plus 4 bytes for
    /// `: ` and CRLF), the same over HTTP/1.1 and HTTP/2. Also the longest
    /// request target. Over it: 431 (request headers), 414 (target), 502
    /// `response_headers_too_large` (a response).
    pub max_header_bytes: usize,
    /// Most header fields in a request or response head; more gets 431
    /// (request) or 502 (response). Up to 256 keeps hyper's HTTP/1.1
    /// parser on the stack (moat's hyper patch, third_party/README.md);
    /// more costs it two heap buffers per head.
    pub max_header_count: usize,
    /// Most connections open at once on one listener; more wait in the
    /// kernel's accept queue.
    pub max_connections: usize,
    /// An unused pooled connection (to the local service or a peer) is
    /// closed after this long: an HTTP/1.1 connection idle in the pool, the
    /// HTTP/2 connection once it has had no stream open. Keep it below the
    /// upstream's own keep-alive timeout (a moat inbound closes idle
    /// HTTP/1.1 connections after `header_read_timeout`), or a request can
    /// race the upstream's close.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Time allowed to connect to the local service or a peer.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for the upstream to start answering; then 504.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a request with `Expect: 100-continue` waits for the
    /// upstream's `100 Continue` (or its final answer) before its body goes
    /// anyway, as RFC 9110 §10.1.1 lets a client do.
    #[serde(with = "humantime_serde")]
    pub expect_continue_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_header_bytes: 16 * 1024,
            max_header_count: 256,
            max_connections: 10_000,
            pool_idle_timeout: Duration::from_secs(4),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            expect_continue_timeout: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}
