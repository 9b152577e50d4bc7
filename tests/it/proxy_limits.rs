//! Limits: nothing a client holds open is unbounded.

use crate::support;
use crate::support::proxy as proxy_support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proxy_support::*;
use support::{Running, TestCa, echo_service, path_str};

const A: &str = "spiffe://example.org/ns/prod/sa/web";
const B: &str = "spiffe://example.org/ns/prod/sa/billing";

/// B: inbound in front of `service`; A: outbound to B. `limits` goes to both.
fn pair(service: SocketAddr, limits: &str) -> SidecarPair {
    SidecarPair::spec(A, B, service)
        .outbound("billing")
        .common(limits)
        .start()
}

/// Reads until EOF or error; true if the peer closed within `within`.
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn slow_header_sender_is_cut_off() {
    let p = pair(
        echo_service(),
        "[limits]\nheader_read_timeout = \"300ms\"\n",
    );
    let mut s = std::net::TcpStream::connect(p.a_addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .unwrap();
    let start = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "the connection was closed"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        start.elapsed()
    );
}

#[test]
fn idle_keep_alive_connection_is_closed() {
    let p = pair(echo_service(), "[limits]\nidle_timeout = \"600ms\"\n");
    let mut conn = KeepAlive::connect(p.a_addr);
    assert_eq!(conn.get("/"), 200);
    // Past the idle timeout the proxy closes it: waited for, since a busy
    // machine can run the proxy's timer late.
    assert!(
        closed_within(conn.stream(), Duration::from_secs(10)),
        "the idle connection was closed"
    );
    assert_eq!(conn.get("/"), 0, "the idle connection was closed");
}

/// A connection in use is not idle: requests 300 ms apart keep it open for
/// 3 s under a 2 s idle timeout. (Gaps far under the timeout, so that a busy
/// machine stalling the test for a second and more does not close it.)
#[test]
fn a_connection_in_use_is_not_idle() {
    let p = pair(echo_service(), "[limits]\nidle_timeout = \"2s\"\n");
    let mut busy = KeepAlive::connect(p.a_addr);
    let start = Instant::now();
    for i in 0..10 {
        assert_eq!(busy.get("/"), 200, "request {i} at {:?}", start.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(start.elapsed() > Duration::from_secs(2));
}

/// B's open connections on `api` (from A's outbound) and the handshakes it
/// has completed there (one per connection A dialed).
fn b_connections(p: &mut SidecarPair) -> (f64, f64) {
    use crate::support::hostile::{metric, scrape};
    let text = scrape(p.b.listening_addr("admin"));
    let api = [("listener", "api")];
    (
        metric(&text, "moat_open_connections", &api),
        metric(&text, "moat_tls_handshakes_total", &api),
    )
}

/// The outsider's report: one h2c request through an outbound, and the
/// HTTP/2 connection to the peer stayed open for as long as they watched.
/// It is closed after `pool_idle_timeout` (the peer's own `idle_timeout`
/// is the default 5 min here), and the next request dials a new one.
#[test]
fn an_idle_pooled_http2_connection_to_the_peer_is_closed() {
    let mut p = pair(echo_service(), "[limits]\npool_idle_timeout = \"500ms\"\n");
    let h2 = ["--http2-prior-knowledge"];
    assert_eq!(curl_http(p.a_addr, "/", &h2).0, 200);
    eventually(
        Duration::from_secs(10),
        "B to see A's idle HTTP/2 connection close",
        || b_connections(&mut p).0 == 0.0,
    );
    assert_eq!(curl_http(p.a_addr, "/", &h2).0, 200);
    assert_eq!(
        b_connections(&mut p).1,
        2.0,
        "a new connection for the next request"
    );
}

/// A request still open is no idle connection: held past several pool
/// timeouts, its connection is still the pool's (the next request shares
/// it rather than dialing), and both are answered.
#[test]
fn a_pooled_http2_connection_with_a_request_open_is_kept() {
    let (service, arrived, release) = held_service();
    let mut p = pair(service, "[limits]\npool_idle_timeout = \"300ms\"\n");
    let a = p.a_addr;
    let h2 = ["--http2-prior-knowledge"];
    let first = std::thread::spawn(move || curl_http(a, "/first", &h2).0);
    arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    // Five pool timeouts with the request open: the time passing is what
    // this test is about.
    std::thread::sleep(Duration::from_millis(1500));
    let second = std::thread::spawn(move || curl_http(a, "/second", &h2).0);
    arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    release.send(()).unwrap();
    release.send(()).unwrap();
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(second.join().unwrap(), 200);
    assert_eq!(
        b_connections(&mut p).1,
        1.0,
        "both requests on one connection"
    );
}

/// An HTTP/1.1 connection idle for 250 ms gives its buffers back (the hyper patch,
/// third_party/README.md), and nothing a client sees changes: the next request on it is
/// served, a head arriving in two pieces either side of that point is read whole, and the
/// header read timeout still closes the connection at its own deadline, not at the release.
#[test]
fn idle_connection_gives_buffers_back_and_keeps_its_timeouts() {
    let p = pair(echo_service(), "[limits]\nheader_read_timeout = \"2s\"\n");
    let mut conn = KeepAlive::connect(p.a_addr);
    assert_eq!(conn.get("/"), 200);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(conn.get("/"), 200, "served after the idle release");

    let mut s = std::net::TcpStream::connect(p.a_addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    s.write_all(b"\r\n").unwrap();
    let start = Instant::now();
    // The response, then EOF when the header read timeout (2 s) closes the idle connection.
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let closed_after = start.elapsed();
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        closed_after >= Duration::from_millis(1500) && closed_after < Duration::from_secs(6),
        "closed {closed_after:?} after the response, not at the 2 s header read timeout"
    );
}

/// A launcher's soft limit of 1024 descriptors (systemd's default) would
/// cap a sidecar near 500 proxied connections: moat raises it to the hard
/// limit, and says when even that is below what its listeners can use.
#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let is_warning = |v: &serde_json::Value| {
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the open-file limit is below"))
    };
    let ca = TestCa::start();
    let sidecar = |name: &str, limits: &str| {
        let config = format!(
            "{}{ADMIN}{limits}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\n",
            ca_identity(&ca, B, name, ""),
            echo_service()
        );
        let path = write(ca.dir.path(), &format!("{name}.toml"), &config);
        let mut proxy =
            Running::start_with_fd_limits(&["proxy", "--config", path_str(&path)], 1024, 20_000);
        proxy.listening_addr("api");
        proxy
    };

    // The default 10,000 connections, two descriptors each, do not fit in 20,000.
    let mut proxy = sidecar("default", "");
    assert_eq!(
        proxy.fd_limits(),
        (20_000, 20_000),
        "soft raised to the hard limit"
    );
    let raised = proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "raised the open-file limit (soft RLIMIT_NOFILE) to its hard limit"
    });
    assert_eq!(
        (raised["from"].as_u64(), raised["to"].as_u64()),
        (Some(1024), Some(20_000))
    );
    let warning = proxy.wait_for_log(Duration::from_secs(5), is_warning);
    assert_eq!(warning["limit"], 20_000);
    assert_eq!(warning["needed"], 2 * 10_000 + 256);

    // 5,000 fit: raised, no warning.
    let quiet = sidecar("fits", "[limits]\nmax_connections = 5000\n");
    assert_eq!(quiet.fd_limits(), (20_000, 20_000));
    assert!(
        !quiet.json_logs().iter().any(is_warning),
        "{:#?}",
        quiet.logs()
    );

    // The CA too (its default, 1024 connections, fits).
    let dir = tempfile::tempdir().unwrap();
    let other = support::ca_init(&dir.path().join("ca"));
    let mut served = Running::start_with_fd_limits(
        &[
            "ca",
            "serve",
            "--dir",
            path_str(other.dir()),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
        ],
        1024,
        20_000,
    );
    served.listening_addr("ca");
    assert_eq!(
        served.fd_limits(),
        (20_000, 20_000),
        "the CA's soft limit raised too"
    );
    assert!(
        !served.json_logs().iter().any(is_warning),
        "{:#?}",
        served.logs()
    );
}

#[test]
fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let p = pair(echo_service(), "[limits]\nmax_connections = 1\n");
    let mut first = KeepAlive::connect(p.a_addr);
    assert_eq!(first.get("/"), 200);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut second = KeepAlive::connect(p.a_addr);
        tx.send(second.get("/")).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(700)).is_err(),
        "a second connection is not served while the first holds the only slot"
    );
    drop(first);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        200,
        "served once the slot is free"
    );
}

#[test]
fn slow_upstream_gets_504_naming_the_upstream() {
    let (slow, _arrived) = slow_service(Duration::from_secs(5));
    let p = pair(slow, "[limits]\nrequest_timeout = \"500ms\"\n");
    let start = Instant::now();
    let (status, body) = curl_http(p.a_addr, "/", &[]);
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("upstream timed out"), "{body}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn garbage_on_any_listener_never_takes_the_proxy_down() {
    let mut p = pair(echo_service(), "");
    let junk: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x00\x05hello".to_vec(),
        b"GET / HTTP/1.1\r\nhost: \xff\xfe\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x09\x00\x00\x00\x00\x00".to_vec(),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
        b"GET /../../etc/passwd HTTP/1.0\r\n\r\n".to_vec(),
    ];
    for target in [p.a_addr, p.b_addr] {
        for bytes in &junk {
            let mut s = std::net::TcpStream::connect(target).unwrap();
            let _ = s.write_all(bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = closed_within(&mut s, Duration::from_secs(5));
        }
    }
    assert!(p.a.child.try_wait().unwrap().is_none() && p.b.child.try_wait().unwrap().is_none());
    assert_eq!(curl_http(p.a_addr, "/still-up", &[]).0, 200);
}
