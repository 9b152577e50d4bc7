//! WebSocket (HTTP/1.1 `Upgrade`) through moat, with the python
//! `websockets` library at both ends (tests/ws_peer.py): through a sidecar
//! pair (app → outbound → mutual TLS → inbound → app), `wss://` straight to
//! an inbound with a client certificate, authorized by route policy before
//! any 101, counted while open, and drained on SIGTERM.

use crate::support;
use crate::support::proxy as proxy_support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use proxy_support::*;
use serde_json::Value;
use support::{Running, metric_samples, path_str};

const A: &str = "spiffe://example.org/ns/prod/sa/web";
const B: &str = "spiffe://example.org/ns/prod/sa/chat";

fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ws_peer.py")
}

/// True when python3 with `websockets` is here; otherwise as
/// `support::require` (SKIPPED, or a failure under MOAT_TEST_REQUIRE_ALL=1).
fn have_websockets() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import websockets.asyncio.client"])
        .output()
        .is_ok_and(|o| o.status.success());
    support::require_that(
        ok,
        "python3 with websockets is not installed",
        "python3 -m pip install websockets==17.4",
    )
}

/// A python process whose stdout lines arrive on a channel; killed on drop.
struct Python {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Python {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg(script())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn line(&self, within: Duration) -> String {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("no line from ws_peer.py within {within:?}: {e}"))
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn close_stdin(&mut self) {
        self.stdin.take();
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The python echo server and its address.
fn ws_server() -> (Python, SocketAddr) {
    let server = Python::start(&["server"]);
    let port: u16 = server.line(Duration::from_secs(20)).parse().unwrap();
    (server, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `ws_peer.py check URL [TLS]`: its JSON line.
fn check(url: &str, tls: &[&str]) -> Value {
    let mut args = vec![script(), "check", url];
    args.extend(tls);
    let out = Command::new("python3").args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ws_peer.py check {url}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn assert_echoed(v: &Value) {
    assert_eq!(v["text"], "hello", "{v}");
    assert_eq!(v["binary"], serde_json::json!([0, 1, 254, 255]), "{v}");
    assert_eq!(v["big_len"], 70_000, "{v}");
    assert_eq!(v["big_same"], true, "{v}");
    assert_eq!(v["pong"], true, "{v}");
}

/// B: inbound `api` in front of `service` (`b_extra` in its listener); A:
/// outbound `chat` to B. `common` goes into both files (e.g. `[limits]`).
fn pair(service: SocketAddr, b_extra: &str, common: &str) -> SidecarPair {
    SidecarPair::spec(A, B, service)
        .outbound("chat")
        .b_extra(b_extra)
        .common(common)
        .start()
}

fn upgraded_open(proc: &mut Running, listener: &str) -> f64 {
    let admin = proc.listening_addr("admin");
    let (status, text) = curl_http(admin, "/metrics", &[]);
    assert_eq!(status, 200);
    metric_samples(
        &text,
        "moat_upgraded_connections",
        &[("listener", listener), ("protocol", "websocket")],
    )
    .first()
    .copied()
    .unwrap_or(0.0)
}

#[test]
fn websocket_messages_cross_a_sidecar_pair() {
    if !have_websockets() {
        return;
    }
    let (server, service) = ws_server();
    let mut p = pair(service, "", "");
    let url = format!("ws://{}/chat/room1", p.a_addr);
    assert_echoed(&check(&url, &[]));
    assert_eq!(server.line(Duration::from_secs(5)), "conn /chat/room1");
    // Both sidecars log the 101 as an access line.
    for proc in [&mut p.a, &mut p.b] {
        proc.wait_for_log(Duration::from_secs(5), |v| {
            v["message"] == "access" && v["status"] == 101 && v["path"] == "/chat/room1"
        });
    }
    // Plain requests still go over the same listeners.
    let (status, _) = curl_http(p.a_addr, "/chat/room1", &[]);
    assert_eq!(status, 426, "the websocket server's answer to a plain GET");
}

#[test]
fn wss_straight_to_the_inbound_with_a_client_certificate() {
    if !have_websockets() {
        return;
    }
    let (_server, service) = ws_server();
    let p = pair(service, "", "");
    let client = p.client();
    let bundle = p.ca.bundle_file();
    let tls = [
        "--cert",
        path_str(&client.cert),
        "--key",
        path_str(&client.key),
        "--ca",
        path_str(&bundle),
    ];
    assert_echoed(&check(&format!("wss://{}/direct", p.b_addr), &tls));
}

#[test]
fn a_route_that_denies_the_upgrade_path_answers_403_before_any_101() {
    if !have_websockets() {
        return;
    }
    let (server, service) = ws_server();
    let dir = tempfile::tempdir().unwrap();
    let policy = write(
        dir.path(),
        "policy.toml",
        "[[route]]\nname = \"chat\"\npath = \"/chat/*\"\nmethods = [\"GET\"]\npeers = [\"spiffe://example.org/ns/prod/sa/web\"]\n\n[[route]]\nname = \"private\"\npath = \"/private/*\"\ndeny = true\n",
    );
    let mut p = pair(service, &format!("policy = {:?}", path_str(&policy)), "");
    let refused = check(&format!("ws://{}/private/room", p.a_addr), &[]);
    assert_eq!(refused["refused"], 403, "{refused}");
    p.b.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "access" && v["status"] == 403 && v["route"] == "private"
    });
    // The allowed path upgrades; the service saw only that one.
    assert_echoed(&check(&format!("ws://{}/chat/ok", p.a_addr), &[]));
    assert_eq!(server.line(Duration::from_secs(5)), "conn /chat/ok");
}

#[test]
fn open_websockets_are_counted_until_they_close() {
    if !have_websockets() {
        return;
    }
    let (_server, service) = ws_server();
    let mut p = pair(service, "", "");
    let mut ws = Python::start(&["hold", &format!("ws://{}/count", p.a_addr)]);
    assert_eq!(ws.line(Duration::from_secs(20)), "open");
    ws.send("one");
    assert_eq!(ws.line(Duration::from_secs(10)), "one");
    assert_eq!(upgraded_open(&mut p.a, "chat"), 1.0);
    assert_eq!(upgraded_open(&mut p.b, "api"), 1.0);
    ws.close_stdin();
    assert_eq!(ws.line(Duration::from_secs(10)), "eof");
    eventually(Duration::from_secs(10), "the gauges back at 0", || {
        upgraded_open(&mut p.a, "chat") == 0.0 && upgraded_open(&mut p.b, "api") == 0.0
    });
}

/// On SIGTERM an open WebSocket keeps working; when its ends close it the
/// sidecar exits at once, without waiting for the rest of the grace.
#[test]
fn sigterm_lets_an_open_websocket_finish() {
    if !have_websockets() {
        return;
    }
    let (_server, service) = ws_server();
    let mut p = pair(service, "", "[limits]\nshutdown_grace = \"60s\"\n");
    let mut ws = Python::start(&["hold", &format!("ws://{}/drain", p.a_addr)]);
    assert_eq!(ws.line(Duration::from_secs(20)), "open");
    p.b.signal("TERM");
    p.b.wait_for_log(Duration::from_secs(5), |v| v["message"] == "draining");
    ws.send("still here");
    assert_eq!(ws.line(Duration::from_secs(10)), "still here");
    let closed_at = Instant::now();
    ws.close_stdin();
    assert_eq!(ws.line(Duration::from_secs(10)), "eof");
    let status = p.b.wait_exit(Duration::from_secs(20)).expect("B exited");
    assert!(status.success(), "{status}");
    assert!(
        closed_at.elapsed() < Duration::from_secs(20),
        "exited {:?} after the close, well inside the 60 s grace",
        closed_at.elapsed()
    );
}

/// A WebSocket still open when the grace runs out is closed then, and the
/// sidecar exits.
#[test]
fn sigterm_closes_a_websocket_still_open_when_the_grace_runs_out() {
    if !have_websockets() {
        return;
    }
    let (_server, service) = ws_server();
    let mut p = pair(service, "", "[limits]\nshutdown_grace = \"2s\"\n");
    let mut ws = Python::start(&["hold", &format!("ws://{}/linger", p.a_addr)]);
    assert_eq!(ws.line(Duration::from_secs(20)), "open");
    let term = Instant::now();
    p.a.signal("TERM");
    p.a.wait_for_log(Duration::from_secs(5), |v| v["message"] == "draining");
    ws.send("during grace");
    assert_eq!(ws.line(Duration::from_secs(10)), "during grace");
    let closed = ws.line(Duration::from_secs(20));
    assert!(closed.starts_with("closed"), "{closed}");
    let status = p.a.wait_exit(Duration::from_secs(20)).expect("A exited");
    assert!(status.success(), "{status}");
    let took = term.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(15),
        "closed {took:?} after SIGTERM, with a 2 s grace"
    );
}

/// `CONNECT` from the app is refused, not tunnelled to wherever it names.
#[test]
fn connect_from_the_app_is_refused_with_501() {
    let p = {
        moat_ca::install_crypto_provider();
        pair(support::echo_service(), "", "")
    };
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(p.a_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT db.internal:5432 HTTP/1.1\r\nhost: db.internal:5432\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("connect_not_supported") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 501"), "{text}");
    assert!(
        text.contains("\"reason\":\"connect_not_supported\""),
        "{text}"
    );
}
