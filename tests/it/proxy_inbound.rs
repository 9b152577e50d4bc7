//! Inbound: peers reach the local service through mutual TLS, verified by
//! chain and SPIFFE ID; everyone else is refused at the handshake.

use crate::support;
use crate::support::proxy as proxy_support;

use std::net::SocketAddr;
use std::time::Duration;

use proxy_support::*;
use serde_json::Value;
use support::{Running, TestCa, echo_service, path_str};

const SERVER_ID: &str = "spiffe://example.org/ns/prod/sa/api";
const CLIENT_ID: &str = "spiffe://example.org/ns/prod/sa/web";

struct Fixture {
    ca: TestCa,
    proxy: Running,
    inbound: SocketAddr,
    client: CertFiles,
}

/// A CA, an echo service, and `moat proxy` in file mode with one inbound
/// listener that admits `spiffe://example.org/ns/prod/*`.
fn fixture(extra_inbound: &str, extra: &str) -> Fixture {
    fixture_with_allow(
        "allow_peers = [\"spiffe://example.org/ns/prod/*\"]",
        extra_inbound,
        extra,
    )
}

fn fixture_with_allow(allow: &str, extra_inbound: &str, extra: &str) -> Fixture {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let echo = echo_service();
    let server = issue(&ca, SERVER_ID, "1h", "server");
    let client = issue(&ca, CLIENT_ID, "1h", "client");
    let config = format!(
        "{identity}{ADMIN}{extra}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{echo}\"\n{allow}\n{extra_inbound}\n",
        identity = file_identity(&server, &ca.bundle_file()),
    );
    let path = write(ca.dir.path(), "proxy.toml", &config);
    let (proxy, addrs) = start_proxy(&path, &["api"]);
    Fixture {
        ca,
        proxy,
        inbound: addrs[0],
        client,
    }
}

fn echoed(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not echo JSON ({e}): {body:?}"))
}

#[test]
fn inbound_forwards_request_from_ca_issued_client_with_verified_peer_id() {
    let f = fixture("", "");
    let (status, body) = curl(
        f.inbound,
        "/hello?x=1",
        Some(&f.client),
        &[
            "--http1.1",
            "-H",
            "x-moat-peer-id: spiffe://example.org/ns/prod/sa/admin",
            "-H",
            "x-forwarded-client-cert: By=forged",
        ],
    );
    assert_eq!(status, 200, "{body}");
    let echo = echoed(&body);
    assert_eq!(echo["path"], "/hello?x=1");
    assert_eq!(
        echo["headers"]["x-moat-peer-id"], CLIENT_ID,
        "the verified ID, not the forged one"
    );
    assert_eq!(
        echo["headers"]["x-forwarded-client-cert"],
        format!("URI={CLIENT_ID}")
    );
    // One access-log line, without the query.
    let mut f = f;
    let line = f
        .proxy
        .wait_for_log(Duration::from_secs(5), |v| v["message"] == "access");
    assert_eq!(line["listener"], "api");
    assert_eq!(line["direction"], "inbound");
    assert_eq!(line["peer"], CLIENT_ID);
    assert_eq!(line["path"], "/hello");
    assert_eq!(line["status"], 200);
    assert_eq!(line["decision"], "none");
}

#[test]
fn inbound_speaks_http2_by_alpn() {
    let f = fixture("forward_http = \"http1\"", "");
    let out = curl_raw(
        f.inbound,
        "/h2",
        Some(&f.client),
        &[
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "2 200", "curl's HTTP version and status");
}

/// A client that asks for HTTP/1.0 by ALPN (`curl --http1.0`,
/// `openssl s_client -alpn http/1.0`) gets through the handshake and an
/// HTTP/1.0 answer from the service, not `no_application_protocol`.
#[test]
fn inbound_serves_http10_client_that_offers_alpn_http10() {
    let f = fixture("", "");
    // `-i`: the status line as received (curl 7.88's `%{http_version}`
    // says `1` for 1.0).
    let out = curl_raw(f.inbound, "/old", Some(&f.client), &["--http1.0", "-i"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}\n{stderr}");
    assert!(
        text.contains("\"path\":\"/old\""),
        "the service answered: {text}"
    );

    // The ALPN agreed is `http/1.0`, and a 1.0 request is answered as 1.0.
    // `-ign_eof`: the request is sent, then s_client reads until the
    // sidecar closes (an HTTP/1.0 connection ends with its response);
    // `timeout` bounds it if it does not.
    let out = std::process::Command::new("timeout")
        .args([
            "10",
            "openssl",
            "s_client",
            "-connect",
            &f.inbound.to_string(),
            "-cert",
            path_str(&f.client.cert),
            "-key",
            path_str(&f.client.key),
            "-alpn",
            "http/1.0",
            "-ign_eof",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(b"GET /old HTTP/1.0\r\n\r\n")?;
            child.wait_with_output()
        })
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("ALPN protocol: http/1.0"), "{text}\n{stderr}");
    let (_, answer) = text
        .split_once("HTTP/1.0 200 OK\r\n")
        .unwrap_or_else(|| panic!("an HTTP/1.0 200: {text}\n{stderr}"));
    assert!(answer.contains("\"path\":\"/old\""), "{answer}");
}

/// On one worker thread an HTTP/2 connection's streams run on the
/// connection's own task: many streams at once on one connection, each
/// with a request body larger than the flow-control windows, all answered
/// in full.
#[test]
fn inbound_multiplexes_http2_streams_on_one_thread() {
    let f = fixture(
        "forward_http = \"http1\"",
        "[runtime]\nworker_threads = 1\n",
    );
    let base = format!("https://{}", f.inbound);
    let tls = [
        "--http2",
        "--cert",
        path_str(&f.client.cert),
        "--key",
        path_str(&f.client.key),
    ];
    assert_parallel_http2_posts(&base, f.ca.dir.path(), &tls);
}

/// The handshake fails, and the proxy logs it with the bounded `label` and
/// an `error` that says `detail`.
fn refused(f: &mut Fixture, client: Option<&CertFiles>, label: &str, detail: &str) {
    let (status, body) = curl(f.inbound, "/", client, &["--http1.1"]);
    assert_eq!(status, 0, "no HTTP answer expected: {body}");
    f.proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "handshake failed"
            && v["reason"] == label
            && v["error"].as_str().is_some_and(|e| e.contains(detail))
    });
    // The same listener still serves a good client: the refusal was about this certificate.
    assert_eq!(curl(f.inbound, "/", Some(&f.client), &["--http1.1"]).0, 200);
}

#[test]
fn inbound_refuses_client_without_certificate() {
    let mut f = fixture("", "");
    refused(&mut f, None, "no_client_cert", "");
}

#[test]
fn inbound_refuses_certificate_from_another_ca() {
    let mut f = fixture("", "");
    let forged = foreign_cert(f.ca.dir.path(), CLIENT_ID, "forged");
    refused(&mut f, Some(&forged), "unknown_ca", "UnknownIssuer");
}

#[test]
fn inbound_refuses_expired_certificate() {
    let mut f = fixture("", "");
    let expired = issue(&f.ca, CLIENT_ID, "1s", "expired");
    std::thread::sleep(Duration::from_millis(2100));
    refused(&mut f, Some(&expired), "expired", "expired");
}

#[test]
fn inbound_refuses_peer_outside_allow_peers() {
    let mut f = fixture("", "");
    let stranger = issue(
        &f.ca,
        "spiffe://example.org/ns/dev/sa/web",
        "1h",
        "stranger",
    );
    refused(
        &mut f,
        Some(&stranger),
        "wrong_identity",
        "not in allow_peers",
    );
}

#[test]
fn inbound_refuses_ca_signed_certificate_without_spiffe_id() {
    let mut f = fixture_with_allow("", "", "");
    let dns_only = ca_signed(
        &f.ca,
        vec![rcgen::SanType::DnsName(
            "web.example.org".try_into().unwrap(),
        )],
        "dns",
    );
    refused(
        &mut f,
        Some(&dns_only),
        "wrong_identity",
        "no usable SPIFFE ID",
    );
    let two_ids = ca_signed(
        &f.ca,
        vec![
            uri_san(CLIENT_ID),
            uri_san("spiffe://example.org/ns/prod/sa/admin"),
        ],
        "two",
    );
    refused(&mut f, Some(&two_ids), "wrong_identity", "found 2");
}

#[test]
fn inbound_refuses_ca_signed_certificate_from_another_trust_domain() {
    let mut f = fixture_with_allow("", "", "");
    let foreign_td = ca_signed(
        &f.ca,
        vec![uri_san("spiffe://other.org/ns/prod/sa/web")],
        "othertd",
    );
    refused(
        &mut f,
        Some(&foreign_td),
        "wrong_identity",
        "not in trust domain example.org",
    );
    // Without allow_peers, any ID of the trust domain is admitted.
    let anyone = issue(&f.ca, "spiffe://example.org/vm/db", "1h", "anyone");
    assert_eq!(curl(f.inbound, "/", Some(&anyone), &["--http1.1"]).0, 200);
}

#[test]
fn inbound_answers_502_when_local_service_is_down() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let server = issue(&ca, SERVER_ID, "1h", "server");
    let client = issue(&ca, CLIENT_ID, "1h", "client");
    // A port nobody listens on: bind, note, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{dead}\"\n",
        file_identity(&server, &ca.bundle_file())
    );
    let path = write(ca.dir.path(), "proxy.toml", &config);
    let (_proxy, addrs) = start_proxy(&path, &["api"]);
    let (status, body) = curl(addrs[0], "/", Some(&client), &["--http1.1"]);
    assert_eq!(status, 502);
    assert!(body.contains("local service"), "{body}");
}

#[test]
fn inbound_answers_431_to_oversized_headers() {
    let f = fixture("", "[limits]\nmax_header_bytes = 8192\n");
    let big = format!("x-big: {}", "a".repeat(20_000));
    let (status, _) = curl(f.inbound, "/", Some(&f.client), &["--http1.1", "-H", &big]);
    assert_eq!(status, 431);
    let (status, _) = curl(f.inbound, "/", Some(&f.client), &["--http2", "-H", &big]);
    assert!(
        status == 431 || status == 0,
        "h2 oversized headers: {status}"
    );
    assert_eq!(curl(f.inbound, "/", Some(&f.client), &["--http1.1"]).0, 200);
}

#[test]
fn inbound_closes_slow_handshake() {
    let f = fixture("", "[limits]\nhandshake_timeout = \"300ms\"\n");
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(f.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the proxy closes a connection that never says hello");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn admin_reports_live_ready_and_identity() {
    let mut f = fixture("", "");
    let admin = f.proxy.listening_addr("admin");
    assert_eq!(curl_http(admin, "/live", &[]).0, 200);
    assert_eq!(curl_http(admin, "/ready", &[]).0, 200);
    let (status, body) = curl_http(admin, "/identity", &[]);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], SERVER_ID);
    assert!(v["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(v["expires_in_seconds"].as_u64().unwrap() > 3000);
    let _ = path_str;
}

#[test]
fn inbound_speaks_tls13_only_unless_tls12_is_allowed() {
    let f = fixture("", "");
    let tls12 = ["--http1.1", "--tls-max", "1.2"];
    assert_eq!(
        curl(f.inbound, "/", Some(&f.client), &tls12).0,
        0,
        "TLS 1.2 refused by default"
    );
    assert_eq!(curl(f.inbound, "/", Some(&f.client), &["--http1.1"]).0, 200);
    let g = fixture("", "[tls]\nallow_tls12 = true\n");
    assert_eq!(
        curl(g.inbound, "/", Some(&g.client), &tls12).0,
        200,
        "TLS 1.2 when opted in"
    );
}
