//! `moat doctor`: a healthy configuration passes (exit 0); each thing that
//! would stop or break the proxy is found before it serves, with a fix
//! (exit 1); a configuration that does not parse is exit 64.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;
use support::{TestCa, free_port, path_str};

/// A service that speaks only h2c (HTTP/2 with prior knowledge), as a gRPC
/// server does.
fn h2c_only_service() -> SocketAddr {
    support::serve_each_connection(|stream| async move {
        let io = hyper_util::rt::TokioIo::new(stream);
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, Infallible>(hyper::Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        });
        let exec = hyper_util::rt::TokioExecutor::new();
        let _ = hyper_util::server::conn::auto::Builder::new(exec)
            .http2_only()
            .serve_connection(io, svc)
            .await;
    })
}

/// `moat doctor --config CONFIG --json`: exit code and the report.
fn doctor(config: &Path) -> (Option<i32>, Value) {
    let out = support::moat(&["doctor", "--config", path_str(config), "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

/// The finding of `check` (by prefix), panicking with the report if none.
fn finding<'a>(report: &'a Value, check: &str, status: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"].as_str().unwrap().starts_with(check) && c["status"] == status)
        .unwrap_or_else(|| panic!("no {status} for {check}: {report:#}"))
}

#[test]
fn a_healthy_ca_configuration_passes() {
    let ca = TestCa::start();
    let dir = tempfile::tempdir().unwrap();
    let bundle = ca.bundle_file();
    let token = dir.path().join("token");
    std::fs::write(&token, ca.token("spiffe://example.org/vm/billing")).unwrap();
    let app = support::echo_service();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "mode = \"enforce\"\n\n[[route]]\nname = \"all\"\npath = \"/*\"\nallow = \"any-peer\"\n",
    )
    .unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"[identity]
ca_url = "{}"
bundle = "{}"
token_file = "{}"

[admin]
listen = "127.0.0.1:0"

[[inbound]]
name = "api"
listen = "127.0.0.1:0"
forward = "{app}"
policy = "{}"
"#,
            ca.url(),
            bundle.display(),
            token.display(),
            policy.display()
        ),
    )
    .unwrap();
    let (code, report) = doctor(&config);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["healthy"], true);
    finding(&report, "ca https://", "ok");
    finding(&report, "identity.token", "ok");
    let forward = finding(&report, "inbound api forward", "ok");
    assert!(
        forward["message"].as_str().unwrap().contains("HTTP/1.1"),
        "{forward}"
    );
    // And the text form says so.
    let out = support::moat(&["doctor", "--config", path_str(&config)]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("all well"));
}

#[test]
fn each_problem_is_found_with_a_fix() {
    let ca = TestCa::start();
    let dir = tempfile::tempdir().unwrap();
    // A certificate with the key of another one.
    let (cert, _) = ca.issue_files("spiffe://example.org/vm/db", "1h", "db");
    let (_, other_key) = ca.issue_files("spiffe://example.org/vm/other", "1h", "other");
    let bundle = ca.bundle_file();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let h2c = h2c_only_service();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody_listens = closed.local_addr().unwrap();
    drop(closed);
    // A policy whose issuer's JWKS file is missing.
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
mode = "enforce"

[[issuer]]
name = "corp"
issuer = "https://id.example.org"
audiences = ["billing"]
jwks_file = "missing-jwks.json"
algorithms = ["ES256"]

[[route]]
name = "invoices"
path = "/invoices/*"
methods = ["GET"]
peers = ["spiffe://example.org/ns/prod/*"]
jwt = { issuer = "corp" }
"#,
    )
    .unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"[identity]
cert = "{}"
key = "{}"
bundle = "{}"

[admin]
listen = "{}"

[[inbound]]
name = "grpc"
listen = "127.0.0.1:0"
forward = "{h2c}"

[[inbound]]
name = "down"
listen = "127.0.0.1:0"
forward = "{nobody_listens}"
policy = "{}"
"#,
            cert.display(),
            other_key.display(),
            bundle.display(),
            taken.local_addr().unwrap(),
            policy.display(),
        ),
    )
    .unwrap();
    let (code, report) = doctor(&config);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["healthy"], false);
    let key = finding(&report, "identity", "problem");
    assert!(
        key["message"].as_str().unwrap().contains("does not fit"),
        "{key}"
    );
    let port = finding(&report, "listen admin", "problem");
    assert!(
        port["message"].as_str().unwrap().contains("in use"),
        "{port}"
    );
    let grpc = finding(&report, "inbound grpc forward", "problem");
    assert!(grpc["message"].as_str().unwrap().contains("h2c"), "{grpc}");
    assert!(
        grpc["fix"]
            .as_str()
            .unwrap()
            .contains("app_protocol = \"http2\""),
        "{grpc}"
    );
    finding(&report, "inbound down forward", "warning");
    // (What the policy engine says about the missing key file is its own.)
    finding(&report, "inbound down policy", "problem");
    // Every finding says how to fix it.
    for f in report["findings"].as_array().unwrap() {
        assert!(f["fix"].as_str().is_some_and(|s| !s.is_empty()), "{f}");
    }
    // As an operator runs it (no RUST_LOG): the findings alone, no log line
    // repeating one (the JWKS loader's own warning about the missing file).
    let out = std::process::Command::new(support::moat_bin())
        .args(["doctor", "--config", path_str(&config)])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "no log lines: {stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("missing-jwks.json"));
    drop(taken);
}

#[test]
fn a_ca_url_whose_host_does_not_resolve_is_told_from_a_ca_that_is_down() {
    let ca = TestCa::start();
    let dir = tempfile::tempdir().unwrap();
    let bundle = ca.bundle_file();
    let token = dir.path().join("token");
    std::fs::write(&token, ca.token("spiffe://example.org/vm/billing")).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = closed.local_addr().unwrap();
    drop(closed);
    let config = dir.path().join("proxy.toml");
    // `.invalid` never resolves (RFC 6761).
    std::fs::write(
        &config,
        format!(
            r#"[identity]
ca_url = ["https://moat-ca.invalid:8443", "https://{down}"]
bundle = "{}"
token_file = "{}"

[admin]
listen = "127.0.0.1:0"

[[outbound]]
name = "out"
listen = "127.0.0.1:0"
upstream = "localhost:8443"
peer = "spiffe://example.org/peer"
"#,
            bundle.display(),
            token.display()
        ),
    )
    .unwrap();
    let (code, report) = doctor(&config);
    assert_eq!(code, Some(1), "{report:#}");
    let name = finding(&report, "ca https://moat-ca.invalid", "problem");
    assert!(
        name["fix"].as_str().unwrap().contains("does not resolve"),
        "{name}"
    );
    let refused = finding(&report, &format!("ca https://{down}"), "problem");
    assert!(
        refused["fix"].as_str().unwrap().contains("start the CA"),
        "{refused}"
    );
}

#[test]
fn a_ca_that_does_not_name_the_url_host_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::ca_init(&dir.path().join("ca"));
    // On every address, so that 127.0.0.2 reaches it too; its certificate
    // names localhost and 127.0.0.1, not 127.0.0.2.
    let mut server = support::Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(ca.dir()),
        "--listen",
        "0.0.0.0:0",
        "--admin",
        "off",
    ]);
    let port = server.listening_addr("ca").port();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, ca.bundle().unwrap()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, ca.token("spiffe://example.org/vm/billing").unwrap()).unwrap();
    let url = format!("https://127.0.0.2:{port}");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"[identity]
ca_url = "{url}"
bundle = "{}"
token_file = "{}"

[admin]
listen = "127.0.0.1:0"

[[outbound]]
name = "out"
listen = "127.0.0.1:0"
upstream = "localhost:8443"
peer = "spiffe://example.org/peer"
"#,
            bundle.display(),
            token.display()
        ),
    )
    .unwrap();
    let (code, report) = doctor(&config);
    assert_eq!(code, Some(1), "{report:#}");
    let name = finding(&report, "ca https://127.0.0.2", "problem");
    assert!(name["fix"].as_str().unwrap().contains("--san"), "{name}");
}

#[test]
fn peers_outside_the_trust_domain_are_found() {
    let ca = TestCa::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue_files("spiffe://example.org/vm/db", "1h", "db");
    let bundle = ca.bundle_file();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"[identity]
cert = "{}"
key = "{}"
bundle = "{}"

[admin]
listen = "127.0.0.1:0"

[[inbound]]
name = "api"
listen = "127.0.0.1:0"
forward = "{}"
protocol = "tcp"
allow_peers = ["spiffe://example.org/vm/billing", "spiffe://exmaple.org/ns/prod/*"]

[[outbound]]
name = "ledger"
listen = "127.0.0.1:0"
upstream = "localhost:8443"
peer = "spiffe://exmaple.org/vm/ledger"
"#,
            cert.display(),
            key.display(),
            bundle.display(),
            support::echo_service(),
        ),
    )
    .unwrap();
    let (code, report) = doctor(&config);
    assert_eq!(code, Some(1), "{report:#}");
    let inbound = finding(&report, "inbound api allow_peers", "warning");
    let message = inbound["message"].as_str().unwrap();
    assert!(
        message.contains("spiffe://exmaple.org/ns/prod/*") && message.contains("not example.org"),
        "{inbound}"
    );
    let outbound = finding(&report, "outbound ledger peer", "warning");
    assert!(
        outbound["message"]
            .as_str()
            .unwrap()
            .contains("exmaple.org"),
        "{outbound}"
    );
    // The entry in the right trust domain is not reported.
    let reported = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == "inbound api allow_peers")
        .count();
    assert_eq!(reported, 1, "{report:#}");
}

/// A transparent-mode configuration with identity files for
/// `spiffe://example.org/vm/db`: `[redirect]` on the given listener ports
/// and one `[[destination]]` expecting `peer`.
fn transparent_config(
    dir: &Path,
    ca: &TestCa,
    ports: (u16, u16),
    peer: &str,
) -> std::path::PathBuf {
    let (cert, key) = ca.issue_files("spiffe://example.org/vm/db", "1h", "db");
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"[identity]
cert = "{}"
key = "{}"
bundle = "{}"

[admin]
listen = "127.0.0.1:0"

[redirect]
inbound_listener_port = {}
outbound_listener_port = {}

[[destination]]
ip = "10.0.0.1"
peer = "{peer}"
"#,
            cert.display(),
            key.display(),
            ca.bundle_file().display(),
            ports.0,
            ports.1,
        ),
    )
    .unwrap();
    config
}

#[test]
fn a_destination_peer_outside_the_trust_domain_is_found() {
    let ca = TestCa::start();
    let dir = tempfile::tempdir().unwrap();
    let config = transparent_config(
        dir.path(),
        &ca,
        (free_port(), free_port()),
        "spiffe://exmaple.org/vm/x",
    );
    let (code, report) = doctor(&config);
    assert_eq!(code, Some(1), "{report:#}");
    let found = finding(&report, "destination 10.0.0.1 peer", "warning");
    let message = found["message"].as_str().unwrap();
    assert!(
        message.contains("spiffe://exmaple.org/vm/x") && message.contains("not example.org"),
        "{found}"
    );
}

/// The transparent listeners are checked where `moat proxy` binds them:
/// inbound on `[::]` (both families), outbound on `127.0.0.1` and `[::1]`.
#[test]
fn transparent_listeners_are_checked_at_the_addresses_the_proxy_binds() {
    let ca = TestCa::start();
    let dir = tempfile::tempdir().unwrap();
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let (inbound, outbound) = (free_port(), free_port());
    let config = transparent_config(
        dir.path(),
        &ca,
        (inbound, outbound),
        "spiffe://example.org/vm/x",
    );
    let (code, report) = doctor(&config);
    assert_eq!(code, Some(0), "{report:#}");
    let any = if ipv6 { "[::]" } else { "0.0.0.0" };
    let message = |check: &str| {
        finding(&report, check, "ok")["message"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        message("listen transparent inbound"),
        format!("{any}:{inbound} is free")
    );
    assert_eq!(
        message("listen transparent outbound"),
        format!("127.0.0.1:{outbound} is free")
    );
    if ipv6 {
        assert_eq!(
            message("listen transparent outbound (IPv6)"),
            format!("[::1]:{outbound} is free")
        );
    }

    // Something on the outbound port: found before the proxy fails to bind.
    let _held = std::net::TcpListener::bind(("127.0.0.1", outbound)).unwrap();
    let (code, report) = doctor(&config);
    assert_eq!(code, Some(1), "{report:#}");
    let taken = finding(&report, "listen transparent outbound", "problem");
    assert_eq!(
        taken["message"],
        format!("127.0.0.1:{outbound} is in use"),
        "{taken}"
    );
}

#[test]
fn a_configuration_that_does_not_parse_is_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[identity]\ncert = 1\n").unwrap();
    let out = support::moat(&["doctor", "--config", path_str(&config)]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.toml:"));
}
