//! Hostile HTTP on the inbound listener, from a peer whose certificate is
//! valid: ambiguous framing (smuggling), oversized and malformed heads,
//! pipelining, hop-by-hop abuse, slow clients, `Host` confusion and HTTP/2
//! floods. Each is refused or answered unambiguously, and the proxy keeps
//! serving the legitimate client.

use crate::support::hostile as hostile_support;

use std::io::Write;
use std::time::{Duration, Instant};

use crate::support::proxy::eventually;
use hostile_support::*;
use serde_json::Value;

const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";

/// The echo service's answers in `text` (moat's own JSON error bodies are
/// not: they carry no `body_len`).
fn bodies(text: &str) -> Vec<Value> {
    text.split("\r\n\r\n")
        .filter_map(|chunk| {
            let start = chunk.find('{')?;
            serde_json::Deserializer::from_str(&chunk[start..])
                .into_iter::<Value>()
                .next()?
                .ok()
        })
        .filter(|v| v.get("body_len").is_some())
        .collect()
}

#[test]
fn ambiguous_framing_is_refused_or_closes_the_connection() {
    let mut s = sidecar("", "");
    // CL+TE: transfer-encoding wins, the request is answered once and the
    // connection closed, so the bytes after the chunked body are never a
    // second request (RFC 9112 §6.3).
    let mut cl_te = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 41\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec();
    cl_te.extend_from_slice(SMUGGLED);
    let text = raw_http1(&s, &cl_te, Duration::from_secs(3));
    assert_eq!(statuses(&text), vec![200], "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(!text.contains("/smuggled"), "{text}");
    // Everything else ambiguous is a 400 before anything is forwarded.
    let refused: Vec<(&str, &[u8])> = vec![
        ("duplicate content-length", b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\ncontent-length: 38\r\n\r\n"),
        ("te: xchunked", b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ("te with space before colon", b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding : chunked\r\n\r\n0\r\n\r\n"),
        ("te: chunked, identity", b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        ("te by obs-fold", b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n"),
        ("te on HTTP/1.0", b"POST / HTTP/1.0\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("invalid method", b"G(T / HTTP/1.1\r\nhost: x\r\n\r\n"),
        ("control byte in a value", b"GET / HTTP/1.1\r\nhost: x\r\nx-a: a\x01b\r\n\r\n"),
        ("NUL in a value", b"GET / HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n"),
        ("space in a name", b"GET / HTTP/1.1\r\nhost: x\r\nx a: b\r\n\r\n"),
    ];
    for (what, bytes) in refused {
        let mut bytes = bytes.to_vec();
        bytes.extend_from_slice(SMUGGLED);
        let text = raw_http1(&s, &bytes, Duration::from_secs(3));
        assert_eq!(statuses(&text), vec![400], "{what}: {text}");
        assert!(
            bodies(&text).is_empty(),
            "{what}: nothing forwarded: {text}"
        );
    }
    s.assert_still_serving();
}

#[test]
fn host_must_be_unambiguous() {
    let mut s = sidecar("", "");
    for (what, bytes) in [
        (
            "two Host headers (RFC 9112 §3.2)",
            &b"GET / HTTP/1.1\r\nhost: public.example\r\nhost: admin.example\r\n\r\n"[..],
        ),
        (
            "absolute-form target naming another host than Host",
            &b"GET http://admin.example/ HTTP/1.1\r\nhost: public.example\r\n\r\n"[..],
        ),
    ] {
        let text = raw_http1(&s, bytes, Duration::from_secs(3));
        assert_eq!(statuses(&text), vec![400], "{what}: {text}");
        assert!(bodies(&text).is_empty(), "{what}: not forwarded: {text}");
    }
    // Absolute form naming the same host as Host is fine.
    let text = raw_http1(
        &s,
        b"GET http://public.example/ok HTTP/1.1\r\nhost: public.example\r\nconnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    assert_eq!(statuses(&text), vec![200], "{text}");
    // HTTP/2: `:authority` and a `host` header that disagree.
    let mut h2 = H2::connect(&s);
    h2.headers(
        1,
        &[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/"),
            (":authority", "admin.example"),
            ("host", "public.example"),
        ],
        true,
    );
    let got = h2.read_for(Duration::from_secs(3));
    assert!(
        got.data.is_empty() || !String::from_utf8_lossy(&got.data).contains("body_len"),
        "the mismatched HTTP/2 request was not forwarded: {}",
        String::from_utf8_lossy(&got.data)
    );
    assert!(
        String::from_utf8_lossy(&got.data).contains("bad request") || got.reset || got.goaway,
        "refused: {got:?}"
    );
    s.assert_still_serving();
}

#[test]
fn hop_by_hop_abuse_cannot_remove_or_forge_the_verified_identity() {
    let mut s = sidecar("", "");
    let text = raw_http1(
        &s,
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close, x-moat-peer-id, x-forwarded-client-cert\r\nx-moat-peer-id: spiffe://example.org/ns/prod/sa/admin\r\nx-forwarded-client-cert: URI=spiffe://example.org/ns/prod/sa/admin\r\n\r\n",
        Duration::from_secs(3),
    );
    let echoed = bodies(&text);
    assert_eq!(echoed.len(), 1, "{text}");
    assert_eq!(echoed[0]["headers"]["x-moat-peer-id"], CLIENT_ID);
    assert_eq!(
        echoed[0]["headers"]["x-forwarded-client-cert"],
        format!("URI={CLIENT_ID}")
    );
    assert!(echoed[0]["headers"].get("connection").is_none());
    s.assert_still_serving();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let s = sidecar("", "");
    let text = raw_http1(
        &s,
        b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\nPOST /2 HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let paths: Vec<String> = bodies(&text)
        .iter()
        .map(|b| b["path"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(paths, ["/1", "/2", "/3"], "{text}");
    assert_eq!(statuses(&text), vec![200, 200, 200]);
}

#[test]
fn oversized_heads_are_refused_with_4xx() {
    let mut s = sidecar("", "");
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let many: String = (0..500).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    for (what, bytes) in [("100 KiB URI", long_uri), ("500 headers", many)] {
        let text = raw_http1(&s, bytes.as_bytes(), Duration::from_secs(3));
        let st = statuses(&text);
        assert!(
            st.len() == 1 && (400..500).contains(&st[0]),
            "{what}: a single 4xx expected: {}",
            &text[..text.len().min(300)]
        );
        assert!(bodies(&text).is_empty(), "{what}: not forwarded");
    }
    s.assert_still_serving();
}

#[test]
fn slow_clients_are_cut_off() {
    let mut s = sidecar(
        "[limits]\nheader_read_timeout = \"400ms\"\nrequest_timeout = \"800ms\"\n",
        "",
    );
    // Slowloris: a head that never ends.
    let mut slow_head = s.raw(&[b"http/1.1"]);
    slow_head
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-a: ")
        .unwrap();
    let start = Instant::now();
    let (_, closed) = read_until_close(&mut slow_head, Duration::from_secs(5));
    assert!(closed, "the slow head was cut off");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // Slow body: a complete head, then a body that never comes. The echo
    // service waits for it; the proxy answers 504 at request_timeout.
    let mut slow_body = s.raw(&[b"http/1.1"]);
    slow_body
        .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nabc")
        .unwrap();
    let start = Instant::now();
    let (bytes, _) = read_until_close(&mut slow_body, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(statuses(&text), vec![504], "{text}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    s.assert_still_serving();
}

#[test]
fn http2_without_alpn_is_not_served() {
    // Over TLS, HTTP/2 is chosen by ALPN (RFC 9113 §3.2). A client that
    // offers no ALPN and sends the HTTP/2 preface anyway gets no stream
    // served: the connection is HTTP/1.1, which cannot parse the preface.
    let mut s = sidecar("", "");
    let mut tls = s.raw(&[]);
    assert_eq!(tls.conn.alpn_protocol(), None);
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let _ = tls.flush();
    let (got, closed) = read_until_close(&mut tls, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got);
    assert!(closed, "the connection is closed: {text:?}");
    assert!(!text.contains(" 200 "), "nothing forwarded: {text:?}");
    s.assert_still_serving();
}

#[test]
fn http2_rapid_reset_is_stopped() {
    rapid_reset_is_stopped("");
}

/// On one worker thread the streams run on their connection's task: the
/// flood of opened-and-reset streams is stopped the same way.
#[test]
fn http2_rapid_reset_is_stopped_on_one_thread() {
    rapid_reset_is_stopped("[runtime]\nworker_threads = 1\n");
}

fn rapid_reset_is_stopped(extra: &str) {
    let mut s = sidecar(extra, "");
    let mut h2 = H2::connect(&s);
    let start = Instant::now();
    let mut sent = 0u32;
    for i in 0..5000u32 {
        let id = 1 + 2 * i;
        let ok = h2.try_headers(
            id,
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/reset"),
                (":authority", "x"),
            ],
            true,
        ) && h2.try_frame(3, 0, id, &8u32.to_be_bytes());
        if !ok {
            break;
        }
        sent += 1;
    }
    let got = h2.read_for(Duration::from_secs(5));
    assert!(
        got.goaway || got.closed,
        "after {sent} reset streams the proxy ends the connection: {got:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(15));
    // Refused: counted and logged with the listener and the peer.
    let calm = [("listener", "api"), ("reason", "enhance_your_calm")];
    eventually(Duration::from_secs(5), "the GOAWAY counted", || {
        metric(&s.scrape(), "moat_http2_goaway_total", &calm) >= 1.0
    });
    assert_goaway_logged(&mut s);
    s.assert_still_serving();
}

/// The WARN line of a GOAWAY sent for the peer's misbehaviour names the
/// listener, the peer's address and identity, and the error code.
fn assert_goaway_logged(s: &mut Sidecar) {
    s.proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("HTTP/2 connection refused"))
            && v["listener"] == "api"
            && v["peer"] == CLIENT_ID
            && v["peer_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:"))
            && v["reason"].is_string()
    });
}

#[test]
fn http2_continuation_flood_is_stopped() {
    let mut s = sidecar("", "");
    let mut h2 = H2::connect(&s);
    // HEADERS without END_HEADERS, then CONTINUATION frames of literal
    // headers that never end: 64 MiB if nobody stops us.
    h2.frame(1, 0x0, 1, &hpack(&[(":method", "GET"), (":path", "/")]));
    let mut block = Vec::new();
    while block.len() < 15 * 1024 {
        block.extend(hpack(&[("x-flood", &"f".repeat(100))]));
    }
    let mut sent = 0usize;
    while sent < 64 * 1024 * 1024 {
        if !h2.try_frame(9, 0x0, 1, &block) {
            break;
        }
        sent += block.len();
    }
    let got = h2.read_for(Duration::from_secs(5));
    assert!(
        got.goaway || got.closed,
        "the proxy ends the connection ({sent} bytes sent): {got:?}"
    );
    assert!(
        sent < 64 * 1024 * 1024,
        "the proxy stopped reading before 64 MiB"
    );
    eventually(Duration::from_secs(5), "the GOAWAY counted", || {
        metric(
            &s.scrape(),
            "moat_http2_goaway_total",
            &[("listener", "api")],
        ) >= 1.0
    });
    assert_goaway_logged(&mut s);
    s.assert_still_serving();
}

/// HPACK literal fields without indexing, no Huffman.
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    fn int7(out: &mut Vec<u8>, mut n: usize) {
        if n < 127 {
            out.push(n as u8);
            return;
        }
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128 + 128) as u8);
            n /= 128;
        }
        out.push(n as u8);
    }
    let mut out = Vec::new();
    for (k, v) in fields {
        out.push(0);
        int7(&mut out, k.len());
        out.extend_from_slice(k.as_bytes());
        int7(&mut out, v.len());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// PINGs are not requests: an HTTP/2 connection that carries none is closed
/// at `idle_timeout` (GOAWAY, then the close) however often its peer pings,
/// as a client's keep-alive does, or a peer holding connections open.
#[test]
fn http2_pings_do_not_keep_an_idle_connection_open() {
    let s = sidecar("[limits]\nidle_timeout = \"1s\"\n", "");
    let mut h2 = H2::connect(&s);
    let get = [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/"),
        (":authority", "moat"),
    ];
    h2.headers(1, &get, true);
    let answered = Instant::now();
    let mut seen = H2Seen::default();
    while !seen.closed && answered.elapsed() < Duration::from_secs(15) {
        let _ = h2.try_frame(6, 0, 0, b"pingping");
        let got = h2.read_for(Duration::from_millis(100));
        // Answered as a client does: a graceful close waits for the ACK
        // of the PING sent with its first GOAWAY.
        for ping in &got.pings {
            let _ = h2.try_frame(6, 0x1, 0, ping);
        }
        seen.goaway |= got.goaway;
        seen.closed = got.closed;
        seen.data.extend_from_slice(&got.data);
    }
    assert!(
        String::from_utf8_lossy(&seen.data).contains("\"path\":\"/\""),
        "the request was answered"
    );
    assert!(
        seen.closed,
        "the idle connection was never closed: its PINGs kept it open"
    );
    assert!(seen.goaway, "with a GOAWAY");
    let after = answered.elapsed();
    assert!(
        after >= Duration::from_millis(800),
        "closed after {after:?}"
    );
}

/// Mutual TLS with ALPN h2, then no preface (or half of one): the peer
/// holds a connection slot without ever asking anything. Dropped at
/// `header_read_timeout` (hyper's HTTP/2 server has no deadline of its own
/// for the preface), counted and logged, while others are served.
#[test]
fn http2_connection_without_a_preface_is_cut_off() {
    let mut s = sidecar("[limits]\nheader_read_timeout = \"500ms\"\n", "");
    let mut silent = s.raw(&[b"h2"]);
    let mut partial = s.raw(&[b"h2"]);
    partial.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    partial.flush().unwrap();
    let start = Instant::now();
    s.assert_still_serving();
    for (what, tls) in [
        ("no preface", &mut silent),
        ("half a preface", &mut partial),
    ] {
        let (_, closed) = read_until_close(tls, Duration::from_secs(30));
        assert!(closed, "{what}: the connection was never closed");
    }
    cut_soon(start, s.admin, "api", "header_timeout", 2.0);
    s.proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "connection cut off" && v["listener"] == "api" && v["peer"] == CLIENT_ID
    });
    s.assert_still_serving();
}

/// A client that finished its preface and SETTINGS but asks nothing (a
/// gRPC channel connected ahead of its first call) is closed gracefully at
/// `header_read_timeout`: a GOAWAY first, not a bare reset, and counted as
/// the same cut.
#[test]
fn an_http2_client_that_connected_ahead_of_its_first_call_gets_a_goaway() {
    let s = sidecar(
        "[limits]
header_read_timeout = \"500ms\"\n",
        "",
    );
    let mut h2 = H2::connect(&s);
    let start = Instant::now();
    let got = h2.read_for(Duration::from_secs(30));
    assert!(got.goaway, "a GOAWAY before the close: {got:?}");
    assert!(got.closed, "then closed: {got:?}");
    cut_soon(start, s.admin, "api", "header_timeout", 1.0);
}

/// An idle HTTP/2 connection is closed gracefully (GOAWAY with a PING); a
/// client that never acknowledges the PING kept it open for hyper's
/// keep-alive timeout (50 s). The graceful close now has
/// `header_read_timeout` to finish, then the connection is dropped.
#[test]
fn an_idle_http2_connection_that_ignores_the_goaway_is_dropped() {
    let s = sidecar(
        "[limits]\nidle_timeout = \"1s\"\nheader_read_timeout = \"1s\"\n",
        "",
    );
    let mut h2 = H2::connect(&s);
    let get = [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/"),
        (":authority", "moat"),
    ];
    h2.headers(1, &get, true);
    let start = Instant::now();
    // Never answers a PING.
    let got = h2.read_for(Duration::from_secs(30));
    assert!(
        String::from_utf8_lossy(&got.data).contains("\"path\":\"/\""),
        "the request was answered: {got:?}"
    );
    assert!(got.goaway, "closed gracefully first: {got:?}");
    assert!(got.closed, "then dropped: {got:?}");
    cut_soon(start, s.admin, "api", "close_timeout", 1.0);
}

/// The plaintext outbound tells HTTP/1.1 from HTTP/2 by the first bytes
/// (hyper-util's `auto`), which had no deadline: a local connection that
/// sends nothing, or the first half of the HTTP/2 preface, is dropped at
/// `header_read_timeout` like a slow HTTP/1.1 head.
#[test]
fn outbound_connection_that_never_sends_a_request_is_cut_off() {
    use crate::support::proxy::{SidecarPair, curl_http};
    use std::net::TcpStream;
    let mut pair = SidecarPair::spec(CLIENT_ID, SERVER_ID, crate::support::echo_service())
        .common("[limits]\nheader_read_timeout = \"500ms\"\n")
        .start();
    let silent = TcpStream::connect(pair.a_addr).unwrap();
    let mut partial = TcpStream::connect(pair.a_addr).unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    let start = Instant::now();
    let (status, body) = curl_http(pair.a_addr, "/", &[]);
    assert_eq!(
        status, 200,
        "a legitimate request is served meanwhile: {body}"
    );
    for (what, mut tcp) in [("nothing", silent), ("half a preface", partial)] {
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 256];
        let closed = match std::io::Read::read(&mut tcp, &mut buf) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        assert!(closed, "{what}: the connection was closed");
    }
    cut_soon(
        start,
        pair.a.listening_addr("admin"),
        "out",
        "header_timeout",
        2.0,
    );
}

/// The connections were closed soon after `start` (10 s: a bound for a busy
/// machine, not a timing) and counted: `moat_connections_cut_total` of
/// `listener` with `reason` reached `n` on the sidecar at `admin`.
fn cut_soon(start: Instant, admin: std::net::SocketAddr, listener: &str, reason: &str, n: f64) {
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        start.elapsed()
    );
    let cut = [("listener", listener), ("reason", reason)];
    eventually(Duration::from_secs(5), "the cuts counted", || {
        metric(&scrape(admin), "moat_connections_cut_total", &cut) >= n
    });
}

/// A raw HTTP/2 connection: frames out, a summary of what came back.
struct H2 {
    tls: Tls,
}

#[derive(Debug, Default)]
struct H2Seen {
    data: Vec<u8>,
    goaway: bool,
    reset: bool,
    closed: bool,
    frames: usize,
    /// Payloads of the PINGs that came (not their ACKs), to answer.
    pings: Vec<Vec<u8>>,
}

impl H2 {
    fn connect(s: &Sidecar) -> Self {
        let mut tls = s.raw(&[b"h2"]);
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"h2"[..]));
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        let mut h2 = Self { tls };
        h2.frame(4, 0, 0, &[]);
        h2
    }

    fn try_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> bool {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        self.tls.write_all(&f).is_ok()
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        assert!(self.try_frame(kind, flags, stream, payload));
    }

    fn try_headers(&mut self, stream: u32, fields: &[(&str, &str)], end_stream: bool) -> bool {
        let flags = 0x4 | if end_stream { 0x1 } else { 0 };
        self.try_frame(1, flags, stream, &hpack(fields))
    }

    fn headers(&mut self, stream: u32, fields: &[(&str, &str)], end_stream: bool) {
        assert!(self.try_headers(stream, fields, end_stream));
    }

    /// Reads frames for `within` or until the connection closes.
    fn read_for(&mut self, within: Duration) -> H2Seen {
        let (bytes, closed) = read_until_close(&mut self.tls, within);
        let mut seen = H2Seen {
            closed,
            ..H2Seen::default()
        };
        let mut rest = &bytes[..];
        while rest.len() >= 9 {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let kind = rest[3];
            if rest.len() < 9 + len {
                break;
            }
            let payload = &rest[9..9 + len];
            match kind {
                0 => seen.data.extend_from_slice(payload),
                3 => seen.reset = true,
                6 if rest[4] & 0x1 == 0 => seen.pings.push(payload.to_vec()),
                7 => seen.goaway = true,
                _ => {}
            }
            seen.frames += 1;
            rest = &rest[9 + len..];
        }
        seen
    }
}
