//! Process lifecycle: SIGTERM drains in-flight requests then exits 0,
//! SIGHUP reloads identity files, and bad configuration exits 64 before
//! any port is bound.

use crate::support;
use crate::support::proxy as proxy_support;

use std::time::{Duration, Instant};

use proxy_support::*;
use support::{TestCa, echo_service, path_str};

const A: &str = "spiffe://example.org/ns/prod/sa/web";
const B: &str = "spiffe://example.org/ns/prod/sa/billing";

#[test]
fn sigterm_lets_in_flight_request_finish_then_exits_zero() {
    drain_lets_in_flight_request_finish("", "--http1.1");
}

/// On one worker thread an HTTP/2 stream runs on its connection's task; the
/// graceful close still waits for it.
#[test]
fn sigterm_lets_in_flight_http2_stream_finish_on_one_thread() {
    drain_lets_in_flight_request_finish("[runtime]\nworker_threads = 1\n", "--http2");
}

/// A request in flight through the inbound (`curl_flag` picks the HTTP
/// version) when SIGTERM arrives gets its answer, new connections are
/// refused meanwhile, and the process exits 0 as soon as it is done.
fn drain_lets_in_flight_request_finish(extra: &str, curl_flag: &'static str) {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let client = issue(&ca, A, "1h", "client");
    let server = issue(&ca, B, "1h", "server");
    let (slow, arrived, release) = held_service();
    let config = format!(
        "{}{ADMIN}{extra}[limits]\nshutdown_grace = \"10s\"\n\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{slow}\"\nforward_http = \"http1\"\n",
        file_identity(&server, &ca.bundle_file())
    );
    let (mut proxy, addrs) = start_proxy(
        &write(ca.dir.path(), "proxy.toml", &config),
        &["api", "admin"],
    );
    let (api, admin) = (addrs[0], addrs[1]);
    let in_flight = std::thread::spawn(move || curl(api, "/slow", Some(&client), &[curl_flag]));
    arrived
        .recv_timeout(Duration::from_secs(10))
        .expect("the request reached the service");
    proxy.signal("TERM");
    // While draining (the request held until both are seen): readiness is
    // withdrawn and new connections are refused.
    eventually(Duration::from_secs(10), "readiness to go false", || {
        curl_http(admin, "/ready", &[]).0 == 503
    });
    eventually(Duration::from_secs(10), "the listener to close", || {
        std::net::TcpStream::connect(api).is_err()
    });
    let released = Instant::now();
    drop(release);
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "slow"),
        "the in-flight request completed"
    );
    let exit = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("exited after the drain");
    assert!(exit.success(), "{exit}");
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "did not wait for the whole grace period"
    );
}

#[test]
fn sigterm_exits_after_grace_even_if_a_request_hangs() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let client = issue(&ca, A, "1h", "client");
    let server = issue(&ca, B, "1h", "server");
    let (slow, arrived) = slow_service(Duration::from_secs(30));
    let config = format!(
        "{}{ADMIN}[limits]\nshutdown_grace = \"500ms\"\n\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{slow}\"\n",
        file_identity(&server, &ca.bundle_file())
    );
    let (mut proxy, addrs) = start_proxy(&write(ca.dir.path(), "proxy.toml", &config), &["api"]);
    let api = addrs[0];
    let _hung = std::thread::spawn(move || curl(api, "/hang", Some(&client), &["--http1.1"]));
    arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    proxy.signal("TERM");
    let exit = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("exited once the grace ran out");
    assert!(exit.success(), "{exit}");
}

#[test]
fn sighup_reloads_identity_files() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let server = issue(&ca, B, "1h", "server");
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\n",
        file_identity(&server, &ca.bundle_file()),
        echo_service()
    );
    let (mut proxy, _) = start_proxy(&write(ca.dir.path(), "proxy.toml", &config), &["api"]);
    proxy.signal("HUP");
    proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "SIGHUP: reloading identity and route policies"
    });
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "SIGHUP does not stop the proxy"
    );
}

#[test]
fn bad_configuration_exits_64_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "proxy.toml",
        "[identity]\ncert = \"a\"\nkey = \"b\"\nbundle = \"c\"\n\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"127.0.0.1:1\"\nallow_peer = []\n",
    );
    let out = support::moat(&["proxy", "--config", path_str(&path)]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("proxy.toml:10:1"), "{stderr}");
    assert!(stderr.contains("allow_peer"), "{stderr}");
}
