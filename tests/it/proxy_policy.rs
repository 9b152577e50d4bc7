//! Route policy on the inbound path: per-route decisions after the
//! handshake, the normalized path forwarded, hot reload, and a broken
//! policy refused at start with exit 64.

use crate::support;
use crate::support::proxy as proxy_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use proxy_support::*;
use serde_json::Value;
use support::{Running, TestCa, echo_service, path_str};

const SERVER: &str = "spiffe://example.org/ns/prod/sa/orders";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const BATCH: &str = "spiffe://example.org/ns/batch/sa/report";

const POLICY: &str = r#"
mode = "enforce"

[[route]]
name = "public"
path = "/public/*"
methods = ["GET"]
allow = "any-peer"

[[route]]
name = "orders"
path = "/orders/*"
peers = ["spiffe://example.org/ns/prod/sa/web"]
"#;

struct Fixture {
    _ca: TestCa,
    proxy: Running,
    inbound: SocketAddr,
    policy: PathBuf,
    web: CertFiles,
    batch: CertFiles,
}

fn fixture() -> Fixture {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let server = issue(&ca, SERVER, "1h", "server");
    let web = issue(&ca, WEB, "1h", "web");
    let batch = issue(&ca, BATCH, "1h", "batch");
    let policy = write(ca.dir.path(), "policy.toml", POLICY);
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\npolicy = {:?}\n",
        file_identity(&server, &ca.bundle_file()),
        echo_service(),
        path_str(&policy)
    );
    let (proxy, addrs) = start_proxy(&write(ca.dir.path(), "proxy.toml", &config), &["api"]);
    Fixture {
        _ca: ca,
        proxy,
        inbound: addrs[0],
        policy,
        web,
        batch,
    }
}

fn get(f: &Fixture, who: &CertFiles, path: &str) -> (u16, String) {
    curl(f.inbound, path, Some(who), &["--http1.1", "--path-as-is"])
}

#[test]
fn inbound_policy_decides_per_route_and_denies_by_default() {
    let f = fixture();
    assert_eq!(
        get(&f, &f.batch, "/public/x").0,
        200,
        "any peer on the public route"
    );
    assert_eq!(get(&f, &f.web, "/orders/1").0, 200, "web on orders");
    let (status, body) = get(&f, &f.batch, "/orders/1");
    assert_eq!(status, 403, "batch is not allowed on orders: {body}");
    assert!(
        body.contains("orders"),
        "the denial names the route: {body}"
    );
    assert_eq!(
        get(&f, &f.web, "/elsewhere").0,
        403,
        "no route matches: deny"
    );
    assert_eq!(
        get(&f, &f.batch, "/public/../orders/1").0,
        403,
        "the path is normalized before matching"
    );
}

#[test]
fn inbound_policy_forwards_the_normalized_path() {
    let f = fixture();
    let (status, body) = get(&f, &f.web, "/orders//a/./b?q=1");
    assert_eq!(status, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/orders/a/b?q=1");
    assert_eq!(echo["headers"]["x-moat-peer-id"], WEB);
    let mut f = f;
    let line = f
        .proxy
        .wait_for_log(Duration::from_secs(5), |v| v["message"] == "access");
    assert_eq!(
        line["path"], "/orders/a/b",
        "the access log shows the path as authorized"
    );
    assert_eq!(line["route"], "orders");
    assert_eq!(line["decision"], "allow");
}

#[test]
fn inbound_policy_edit_takes_effect_without_restart_and_bad_edit_keeps_last_good() {
    let mut f = fixture();
    assert_eq!(get(&f, &f.batch, "/orders/1").0, 403);
    std::fs::write(
        &f.policy,
        POLICY.replace(
            "peers = [\"spiffe://example.org/ns/prod/sa/web\"]",
            "peers = [\"spiffe://example.org/ns/*\"]",
        ),
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the edited policy to allow batch",
        || get(&f, &f.batch, "/orders/1").0 == 200,
    );
    let applied = f.proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "policy reloaded"
    });
    assert_eq!(applied["listener"], "api", "{applied}");
    let good = std::fs::read_to_string(&f.policy).unwrap();
    std::fs::write(
        &f.policy,
        "mode = \"enforce\"\n[[route]]\nname = \"broken\"\npath = \"/x\"\nunknown = 1\n",
    )
    .unwrap();
    let refused = f.proxy.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "policy reload refused; keeping the last good policy"
    });
    assert_eq!(
        refused["listener"], "api",
        "the line says which listener keeps its policy: {refused}"
    );
    assert_eq!(
        get(&f, &f.batch, "/orders/1").0,
        200,
        "a broken edit leaves the last good policy in place"
    );
    assert_eq!(get(&f, &f.web, "/public/y").0, 200);
    // The bad edit undone: that line names the listener too.
    std::fs::write(&f.policy, good).unwrap();
    let restored = f.proxy.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "policy file restored to the running policy"
    });
    assert_eq!(restored["listener"], "api", "{restored}");
}

#[test]
fn broken_policy_at_start_exits_64() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let server = issue(&ca, SERVER, "1h", "server");
    let policy = write(
        ca.dir.path(),
        "policy.toml",
        "[[route]]\nname = \"r\"\npath = \"/x\"\nallow = \"everyone\"\n",
    );
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"127.0.0.1:1\"\npolicy = {:?}\n",
        file_identity(&server, &ca.bundle_file()),
        path_str(&policy)
    );
    let out = support::moat(&[
        "proxy",
        "--config",
        path_str(&write(ca.dir.path(), "proxy.toml", &config)),
    ]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("policy.toml:4"), "{stderr}");
}

/// The value of one sample of `name` with `labels` on the admin `/metrics`.
fn gauge(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, text) = curl_http(admin, "/metrics", &[]);
    support::metric_samples(&text, name, labels)
        .first()
        .copied()
}

fn last_reload_error(admin: SocketAddr) -> Value {
    let (_, body) = curl_http(admin, "/identity", &[]);
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["policies"][0]["last_reload_error"].clone()
}

#[test]
fn a_restored_policy_clears_the_reload_error_and_the_failing_gauge() {
    let mut f = fixture();
    let admin = f.proxy.listening_addr("admin");
    let api = [("listener", "api")];
    assert_eq!(gauge(admin, "moat_policy_reload_failed", &api), Some(0.0));
    let loaded = gauge(
        admin,
        "moat_policy_last_reload_success_timestamp_seconds",
        &api,
    )
    .expect("the first load is a success");
    assert!(loaded > 1.7e9, "{loaded}");
    assert!(last_reload_error(admin).is_null());

    std::fs::write(
        &f.policy,
        "[[route]]\nname = \"broken\"\npath = \"/x\"\nunknown = 1\n",
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the refusal to show", || {
        gauge(admin, "moat_policy_reload_failed", &api) == Some(1.0)
    });
    let error = last_reload_error(admin);
    assert!(
        error.as_str().is_some_and(|e| e.contains("unknown field")),
        "{error}"
    );

    // The previous file back, byte for byte: the running policy again.
    std::fs::write(&f.policy, POLICY).unwrap();
    eventually(Duration::from_secs(10), "the refusal to clear", || {
        gauge(admin, "moat_policy_reload_failed", &api) == Some(0.0)
    });
    assert!(last_reload_error(admin).is_null());

    // And by SIGHUP, with the watch seeing the same files.
    std::fs::write(
        &f.policy,
        "[[route]]\nname = \"broken\"\npath = \"/x\"\nunknown = 2\n",
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the second refusal", || {
        !last_reload_error(admin).is_null()
    });
    std::fs::write(&f.policy, POLICY).unwrap();
    f.proxy.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "the refusal to clear again",
        || last_reload_error(admin).is_null(),
    );
    let (_, text) = curl_http(admin, "/metrics", &[]);
    let build = support::metric_samples(
        &text,
        "moat_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
    );
    assert_eq!(build, [1.0], "{text}");
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_threads",
        "process_start_time_seconds",
    ] {
        let v = support::metric_samples(&text, process, &[]);
        // A fresh, idle process may not have used a clock tick of CPU yet.
        let least = if process == "process_cpu_seconds_total" {
            0.0
        } else {
            1.0
        };
        assert!(v.len() == 1 && v[0] >= least, "{process}: {v:?}");
    }
}

#[test]
fn the_access_and_decision_lines_share_a_request_id_and_say_why() {
    let mut f = fixture();
    let (status, body) = get(&f, &f.batch, "/public/../orders//1?q=secret");
    assert_eq!(status, 403, "{body}");
    let deny = f
        .proxy
        .wait_for_log(Duration::from_secs(5), |v| v["message"] == "request denied");
    let access = f
        .proxy
        .wait_for_log(Duration::from_secs(5), |v| v["message"] == "access");
    let id = access["request_id"].as_str().expect("request_id");
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(deny["request_id"], id, "one id on both lines: {deny}");
    assert_eq!(access["reason"], "peer_not_allowed", "{access}");
    assert_eq!(access["route"], "orders");
    assert_eq!(access["path"], "/orders/1", "the authorized path");
    assert_eq!(
        access["raw_path"], "/public/../orders//1",
        "the path as received"
    );
    assert_eq!(access["status"], 403);
    let ms = access["duration_ms"].as_f64().expect("duration_ms");
    assert_eq!(
        (ms * 1000.0).round() / 1000.0,
        ms,
        "rounded to the microsecond: {ms}"
    );
    assert!(
        !access.to_string().contains("secret"),
        "no query in the log"
    );

    // No route: one spelling on both lines.
    let before = count_logs(&f.proxy, "request denied");
    assert_eq!(get(&f, &f.web, "/elsewhere").0, 403);
    eventually(Duration::from_secs(5), "the second denial", || {
        count_logs(&f.proxy, "request denied") > before
    });
    let logs = f.proxy.json_logs();
    let deny = logs
        .iter()
        .rfind(|v| v["message"] == "request denied")
        .unwrap();
    let id = deny["request_id"].as_str().unwrap();
    let access = logs
        .iter()
        .find(|v| v["message"] == "access" && v["request_id"] == id)
        .expect("the access line of the same request");
    assert_eq!(deny["route"], "-");
    assert_eq!(access["route"], "-");
    assert_eq!(access["reason"], "no_route");
    assert!(
        access.get("raw_path").is_none(),
        "the path was already normal: {access}"
    );

    // An allowed request has no reason and no decision line.
    assert_eq!(get(&f, &f.web, "/orders/2").0, 200);
    let allowed = f.proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "access" && v["path"] == "/orders/2"
    });
    assert_eq!(allowed["decision"], "allow");
    assert!(allowed.get("reason").is_none(), "{allowed}");
}

/// The answers the sidecar makes itself (a policy's 403, a 400 for an
/// encoded slash) log `bytes` as the service's answers do: what the client
/// received.
#[test]
fn the_sidecars_own_answers_log_the_bytes_sent() {
    let mut f = fixture();
    for (path, want) in [("/orders/1", 403), ("/orders/a%2Fb", 400)] {
        let (status, body) = get(&f, &f.batch, path);
        assert_eq!(status, want, "{path}: {body}");
        assert!(!body.is_empty(), "{path}: a body to count");
        let access = f.proxy.wait_for_log(Duration::from_secs(5), |v| {
            v["message"] == "access" && v["status"] == want
        });
        assert_eq!(access["bytes"], body.len(), "{path}: {access}");
    }
}

/// A gRPC call with python's grpcio (grpc-core, as C++, Ruby and PHP
/// clients use) over h2c to `addr`: `code details` of its status.
fn grpc_call(addr: SocketAddr, method: &str) -> String {
    const CLIENT: &str = r#"
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_unary(sys.argv[2], request_serializer=lambda b: b, response_deserializer=lambda b: b)
try:
    call(b"", timeout=10)
    print("0 OK")
except grpc.RpcError as e:
    print(e.code().value[0], e.details())
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", CLIENT, &addr.to_string(), method])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn grpc_callers_see_the_denial_as_a_grpc_status() {
    let have_grpcio = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !support::require_that(
        have_grpcio,
        "python3 with grpcio is not installed",
        "python3 -m pip install grpcio==1.85.1",
    ) {
        return;
    }
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let server = issue(&ca, SERVER, "1h", "server");
    let web = issue(&ca, WEB, "1h", "web");
    let dir = ca.dir.path();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, jsonwebtoken::Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    write(
        dir,
        "jwks.json",
        &serde_json::json!({ "keys": [jwk] }).to_string(),
    );
    let policy = write(
        dir,
        "policy.toml",
        &format!(
            r#"
[[issuer]]
name       = "corp"
issuer     = "https://auth.example.org"
audiences  = ["orders"]
jwks_file  = "jwks.json"
algorithms = ["ES256"]

[[route]]
name  = "orders-admin"
path  = "/orders.Admin/*"
allow = "any-peer"
jwt   = {{ issuer = "corp" }}

[[route]]
name  = "orders"
path  = "/orders.Orders/*"
peers = ["{BATCH}"]
"#
        ),
    );
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\npolicy = {:?}\n",
        file_identity(&server, &ca.bundle_file()),
        echo_service(),
        path_str(&policy)
    );
    let (mut server_proxy, addrs) = start_proxy(&write(dir, "proxy.toml", &config), &["api"]);
    let client_config = format!(
        "{}{ADMIN}\n[[outbound]]\nname = \"out\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\npeer = \"{SERVER}\"\n",
        file_identity(&web, &ca.bundle_file()),
        addrs[0]
    );
    let (_client, out) = start_proxy(&write(dir, "client.toml", &client_config), &["out"]);
    let out = out[0];

    assert_eq!(
        grpc_call(out, "/orders.Orders/Get"),
        "7 moat: denied by route \"orders\": peer_not_allowed",
        "PERMISSION_DENIED"
    );
    assert_eq!(
        grpc_call(out, "/orders.Admin/Purge"),
        "16 moat: denied by route \"orders-admin\": jwt_missing",
        "UNAUTHENTICATED"
    );
    assert_eq!(
        grpc_call(out, "/other.Svc/Call"),
        "7 moat: denied: no_route",
        "no route"
    );
    // On the wire: a trailers-only answer, HTTP 200 as the gRPC spec has it.
    let (status, head) = curl_http(
        out,
        "/orders.Orders/Get",
        &[
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-D",
            "-",
        ],
    );
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("grpc-status: 7"), "{head}");
    assert!(head.contains("content-type: application/grpc"), "{head}");
    // The sidecar's own records keep the denial's status.
    let access = server_proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "access" && v["path"] == "/orders.Admin/Purge"
    });
    assert_eq!(access["status"], 401, "{access}");
    assert_eq!(access["reason"], "jwt_missing");
}

/// Audit mode has one spelling on every line: the decision line of a
/// would-be denial says `audit_allow` and the status the caller got (the
/// request went on: 200), with `would_be_status` the status enforcement
/// would have answered; the access log and metrics say `audit_allow` too.
#[test]
fn an_audited_denial_is_audit_allow_on_every_line() {
    let mut s = crate::support::hostile::sidecar_with("", |ca| {
        let policy = write(
            ca.dir.path(),
            "policy.toml",
            "mode = \"audit\"\n\n[[route]]\nname = \"admin\"\npath = \"/admin/*\"\npeers = [\"spiffe://example.org/ns/prod/sa/admin\"]\n",
        );
        format!("policy = {:?}\n", path_str(&policy))
    });
    let (status, body) = curl(s.inbound, "/admin/x", Some(&s.client), &["--http1.1"]);
    assert_eq!(status, 200, "audit mode lets it through: {body}");
    let decision = s.proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "request would be denied (audit mode)"
    });
    let access = s.proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "access" && v["path"] == "/admin/x"
    });
    assert_eq!(decision["request_id"], access["request_id"]);
    assert_eq!(
        (
            &decision["decision"],
            &decision["status"],
            &decision["would_be_status"],
            &decision["reason"]
        ),
        (
            &Value::from("audit_allow"),
            &Value::from(200),
            &Value::from(403),
            &Value::from("peer_not_allowed")
        ),
        "{decision}"
    );
    assert_eq!(
        (&access["decision"], &access["status"], &access["reason"]),
        (
            &Value::from("audit_allow"),
            &Value::from(200),
            &Value::from("peer_not_allowed")
        ),
        "{access}"
    );
    let metrics = s.scrape();
    let counted = crate::support::hostile::metric(
        &metrics,
        "moat_authz_decisions_total",
        &[
            ("route", "admin"),
            ("decision", "audit_allow"),
            ("reason", "peer_not_allowed"),
        ],
    );
    assert_eq!(counted, 1.0, "{metrics}");
}
