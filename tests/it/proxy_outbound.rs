//! Outbound: the local service speaks plaintext to a loopback listener and
//! the proxy originates mutual TLS to the peer's sidecar, checking that the
//! peer presents the configured SPIFFE ID.

use crate::support;
use crate::support::proxy as proxy_support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use proxy_support::*;
use serde_json::Value;
use support::{Running, TestCa, echo_service};

const A: &str = "spiffe://example.org/ns/prod/sa/web";
const B: &str = "spiffe://example.org/ns/prod/sa/billing";

/// Sidecar B: inbound `api` (protocol `proto`) in front of `service`.
fn sidecar_b(ca: &TestCa, service: SocketAddr, proto: &str) -> (Running, SocketAddr) {
    let files = issue(ca, B, "1h", "b");
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{service}\"\nprotocol = \"{proto}\"\n",
        file_identity(&files, &ca.bundle_file())
    );
    let (proc, addrs) = start_proxy(&write(ca.dir.path(), "b.toml", &config), &["api"]);
    (proc, addrs[0])
}

/// Sidecar A, with its identity from the CA: outbound `billing` to `upstream`, expecting `peer`.
fn sidecar_a(ca: &TestCa, upstream: SocketAddr, peer: &str, proto: &str) -> (Running, SocketAddr) {
    let config = format!(
        "{}{ADMIN}\n[[outbound]]\nname = \"billing\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\npeer = \"{peer}\"\nprotocol = \"{proto}\"\n",
        ca_identity(ca, A, "a", "")
    );
    let (mut proc, addrs) = start_proxy(&write(ca.dir.path(), "a.toml", &config), &["billing"]);
    proc.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "certificate issued"
    });
    (proc, addrs[0])
}

#[test]
fn outbound_reaches_peer_over_mutual_tls_as_its_own_identity() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (_b, b_addr) = sidecar_b(&ca, echo_service(), "http");
    let (_a, a_addr) = sidecar_a(&ca, b_addr, B, "http");
    for _ in 0..3 {
        let (status, body) = curl_http(
            a_addr,
            "/bill?id=7",
            &["-H", "x-moat-peer-id: spiffe://example.org/forged"],
        );
        assert_eq!(status, 200, "{body}");
        let echo: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["path"], "/bill?id=7");
        assert_eq!(
            echo["headers"]["x-moat-peer-id"], A,
            "B's sidecar saw A's certificate"
        );
    }
}

#[test]
fn outbound_answers_502_when_peer_presents_wrong_id() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (_b, b_addr) = sidecar_b(&ca, echo_service(), "http");
    let (mut a, a_addr) = sidecar_a(
        &ca,
        b_addr,
        "spiffe://example.org/ns/prod/sa/payments",
        "http",
    );
    let (status, body) = curl_http(a_addr, "/", &[]);
    assert_eq!(status, 502);
    assert!(body.contains("peer identity refused"), "{body}");
    a.wait_for_log(Duration::from_secs(5), |v| {
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("expected spiffe://example.org/ns/prod/sa/payments"))
    });
}

#[test]
fn outbound_answers_502_when_peer_is_down() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_a, a_addr) = sidecar_a(&ca, dead, B, "http");
    let (status, body) = curl_http(a_addr, "/", &[]);
    assert_eq!(status, 502);
    assert!(body.contains("peer unavailable"), "{body}");
}

/// A `peer` in another trust domain (a typo) can never be reached: the
/// sidecar says so once its own identity, and so its trust domain, is known.
#[test]
fn outbound_warns_at_start_when_peer_is_in_another_trust_domain() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (_b, b_addr) = sidecar_b(&ca, echo_service(), "http");
    let typo = "spiffe://exmaple.org/ns/prod/sa/billing";
    let (mut a, _) = sidecar_a(&ca, b_addr, typo, "http");
    let warning = a.wait_for_log(Duration::from_secs(5), |v| {
        v["level"] == "WARN" && v["peer"] == typo
    });
    assert_eq!(warning["listener"], "billing", "{warning}");
    assert_eq!(warning["peer_trust_domain"], "exmaple.org", "{warning}");
    assert_eq!(warning["trust_domain"], "example.org", "{warning}");
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains("every connection to it will be refused")),
        "{warning}"
    );
    let warnings = a
        .json_logs()
        .into_iter()
        .filter(|v| v["level"] == "WARN" && v["peer"] == typo)
        .count();
    assert_eq!(warnings, 1, "said once");
}

#[test]
fn outbound_keeps_http1_connections_alive_across_requests() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (_b, b_addr) = sidecar_b(&ca, echo_service(), "http");
    let (_a, a_addr) = sidecar_a(&ca, b_addr, B, "http");
    let mut conn = KeepAlive::connect(a_addr);
    for i in 0..20 {
        assert_eq!(conn.get(&format!("/n/{i}")), 200);
    }
}

#[test]
fn tcp_mode_streams_bytes_both_ways_with_half_close() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (_b, b_addr) = sidecar_b(&ca, tcp_echo_after_eof(), "tcp");
    let (_a, a_addr) = sidecar_a(&ca, b_addr, B, "tcp");
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut s = std::net::TcpStream::connect(a_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let payload = payload.clone();
        std::thread::spawn(move || {
            w.write_all(&payload).unwrap();
            // Half-close: the service answers only after it sees our EOF.
            w.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    writer.join().unwrap();
    assert_eq!(&answer[..5], b"echo:");
    assert!(
        answer[5..] == payload[..],
        "{} bytes came back, {} sent",
        answer.len() - 5,
        payload.len()
    );
}

#[test]
fn tcp_mode_closes_when_peer_presents_wrong_id() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (_b, b_addr) = sidecar_b(&ca, tcp_echo_after_eof(), "tcp");
    let (_a, a_addr) = sidecar_a(
        &ca,
        b_addr,
        "spiffe://example.org/ns/prod/sa/payments",
        "tcp",
    );
    let mut s = std::net::TcpStream::connect(a_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"hello");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        answer.is_empty(),
        "nothing reaches the wrong peer's service: {answer:?}"
    );
}

#[test]
fn outbound_answers_502_when_peer_refuses_our_identity() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let files = issue(&ca, B, "1h", "b");
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\nallow_peers = [\"spiffe://example.org/ns/prod/sa/frontend\"]\n",
        file_identity(&files, &ca.bundle_file()),
        echo_service()
    );
    let (mut b, addrs) = start_proxy(&write(ca.dir.path(), "b.toml", &config), &["api"]);
    let (_a, a_addr) = sidecar_a(&ca, addrs[0], B, "http");
    let (status, body) = curl_http(a_addr, "/", &[]);
    assert_eq!(status, 502, "{body}");
    b.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "handshake failed"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("not in allow_peers"))
    });
}

#[test]
fn host_routes_match_http2_traffic_through_a_sidecar_pair() {
    let ca = support::TestCa::start();
    let service = support::echo_service();
    let dir = ca.dir.path();
    let policy = write(
        dir,
        "host-policy.toml",
        "[[route]]\nname = \"billing-host\"\nhost = \"billing.example\"\npath = \"/*\"\nallow = \"any-peer\"\n",
    );
    let server = "spiffe://example.org/ns/prod/sa/billing";
    let server_cfg = write(
        dir,
        "host-server.toml",
        &format!(
            "{}{ADMIN}[[inbound]]\nname = \"in\"\nlisten = \"127.0.0.1:0\"\nforward = \"{service}\"\nforward_http = \"http1\"\npolicy = {:?}\n",
            ca_identity(&ca, server, "host-server", ""),
            support::path_str(&policy)
        ),
    );
    let (_server, addrs) = start_proxy(&server_cfg, &["in"]);
    let client_cfg = write(
        dir,
        "host-client.toml",
        &format!(
            "{}{ADMIN}[[outbound]]\nname = \"out\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\npeer = \"{server}\"\n",
            ca_identity(
                &ca,
                "spiffe://example.org/ns/prod/sa/web",
                "host-client",
                ""
            ),
            addrs[0]
        ),
    );
    let (_client, addrs) = start_proxy(&client_cfg, &["out"]);
    let out = addrs[0];
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        eventually(
            std::time::Duration::from_secs(20),
            "a 200 through the pair",
            || curl_http(out, "/x", &[version, "-H", "Host: billing.example"]).0 == 200,
        );
        let (status, body) = curl_http(out, "/x", &[version, "-H", "Host: other.example"]);
        assert_eq!(status, 403, "{version}: {body}");
    }
}

/// Both sidecars on one worker thread: an application's HTTP/2 (h2c)
/// streams multiplexed on one connection to its outbound, across the pair
/// and to an HTTP/1.1 service, each with a body larger than the
/// flow-control windows, all answered in full. The client is nghttp
/// (nghttp2-client): curl 7.88 cannot multiplex h2c with prior knowledge.
#[test]
fn pair_multiplexes_http2_streams_on_one_thread() {
    if !support::require("nghttp") {
        return;
    }
    let p = SidecarPair::spec(A, B, echo_service())
        .outbound("billing")
        .common("[runtime]\nworker_threads = 1\n")
        .b_extra("forward_http = \"http1\"")
        .start();
    let body = write(p.ca.dir.path(), "body.bin", &"x".repeat(1 << 20));
    let url = format!("http://{}/stream", p.a_addr);
    let out = support::tool(
        "nghttp",
        &["--stat", "-m", "24", "-d", support::path_str(&body), &url],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nghttp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = text.matches(&format!("\"body_len\":{}", 1 << 20)).count();
    assert_eq!(whole, 24, "every request body arrived whole: {text}");
    // The statistics table: one row per stream, its status in the fifth column.
    let codes: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_end().ends_with("/stream"))
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert_eq!(codes, vec!["200"; 24], "{text}");
}

/// A peer on loopback whose port is closed and in the kernel's ephemeral
/// range: the dial can be given that very port as its source and connect to
/// itself (TCP simultaneous open), and the sidecar would then handshake TLS
/// with itself. In a namespace whose ephemeral range is that one port, the
/// first dial always does. It is refused as a closed port is: 502
/// `peer unavailable`, "connection refused", and no handshake tried.
#[test]
fn outbound_refuses_a_tcp_self_connection_to_a_closed_peer_port() {
    use moat_testkit::netns::{Network, in_netns, netns_command};
    if let Some(why) = support::netns::unavailable() {
        support::netns::skip(&why);
        return;
    }
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let files = issue(&ca, A, "1h", "a");
    moat_testkit::netns::sweep_stale("moat-t");
    let net = Network::create(&format!("moat-t{}-selfconn", std::process::id()), &[])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ns = net.hub.clone();
    // The namespace's ephemeral range is the peer's port alone, so every
    // socket that is not bound to a port first would get it: the sidecar's
    // listeners and the clients below use fixed ports outside it (nothing
    // else lives in this namespace to collide with).
    let out = netns_command(&ns, "sh")
        .args([
            "-c",
            "echo '40000 40000' > /proc/sys/net/ipv4/ip_local_port_range",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:15000\"\n\n[[outbound]]\nname = \"billing\"\nlisten = \"127.0.0.1:15001\"\nupstream = \"127.0.0.1:40000\"\npeer = \"{B}\"\n",
        file_identity(&files, &ca.bundle_file())
    );
    let config = write(ca.dir.path(), "a.toml", &config);
    let mut proxy = Running::from_command({
        let mut cmd = netns_command(&ns, support::moat_bin());
        cmd.args(["proxy", "--config", support::path_str(&config)]);
        cmd
    });
    let outbound = proxy.listening_addr("billing");
    let admin = proxy.listening_addr("admin");
    let client = |addr: SocketAddr, path: &'static str, port: &'static str| {
        in_netns(&ns, move || curl_http(addr, path, &["--local-port", port]))
    };
    let (status, body) = client(outbound, "/", "20000-20099");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("peer unavailable"), "{body}");
    let failed = proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "request to peer failed"
    });
    let error = failed.to_string();
    assert!(
        error.contains("127.0.0.1:40000: connection refused (a TCP self-connection"),
        "reported as a refused dial, not a TLS failure: {failed}"
    );
    let (_, metrics) = client(admin, "/metrics", "20100-20199");
    let tried = support::metric_samples(
        &metrics,
        "moat_tls_handshake_failures_total",
        &[("listener", "billing")],
    );
    assert!(tried.is_empty(), "no handshake with itself: {tried:?}");
}
