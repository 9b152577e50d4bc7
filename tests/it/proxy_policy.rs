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
    let f = fixture();
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
    std::fs::write(
        &f.policy,
        "mode = \"enforce\"\n[[route]]\nname = \"broken\"\npath = \"/x\"\nunknown = 1\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        get(&f, &f.batch, "/orders/1").0,
        200,
        "a broken edit leaves the last good policy in place"
    );
    assert_eq!(get(&f, &f.web, "/public/y").0, 200);
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
