//! Identity: certificates from the CA (first issue, readiness, renewal under
//! load) and from files (reload on change, broken files keep the old set).

use crate::support;
use crate::support::proxy as proxy_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proxy_support::*;
use serde_json::Value;
use support::{Running, TestCa, echo_service, path_str};

const A: &str = "spiffe://example.org/ns/prod/sa/web";
const B: &str = "spiffe://example.org/ns/prod/sa/billing";

fn identity_json(admin: SocketAddr) -> Value {
    let (status, body) = curl_http(admin, "/identity", &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn ca_identity_is_not_ready_until_the_first_certificate() {
    moat_ca::install_crypto_provider();
    // The CA's address is known before it runs: take a free port, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    support::ca_init(&ca_dir);
    let bundle = write(
        dir.path(),
        "bundle.pem",
        &support::moat_ok(&["ca", "bundle", "--dir", path_str(&ca_dir)]),
    );
    let token = support::moat_ok(&["ca", "token", "--dir", path_str(&ca_dir), "--id", A]);
    let token = write(dir.path(), "token", token.trim());
    let config = format!(
        "[identity]\nca_url = \"https://127.0.0.1:{port}\"\nbundle = {:?}\ntoken_file = {:?}\nretry_base = \"100ms\"\nretry_max = \"300ms\"\n{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\n",
        path_str(&bundle),
        path_str(&token),
        echo_service()
    );
    let (mut proxy, addrs) = start_proxy(&write(dir.path(), "proxy.toml", &config), &["admin"]);
    let admin = addrs[0];
    proxy.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "cannot get a certificate from the CA yet"
    });
    assert_eq!(curl_http(admin, "/live", &[]).0, 200);
    assert_eq!(
        curl_http(admin, "/ready", &[]).0,
        503,
        "no certificate while the CA is down"
    );
    let mut ca = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(&ca_dir),
        "--listen",
        &format!("127.0.0.1:{port}"),
        // Not the default 127.0.0.1:9902, which any CA on this host holds.
        "--admin",
        "off",
    ]);
    // Up, on that port (if another test took the port meanwhile, this
    // fails showing the CA's log rather than as a readiness timeout).
    ca.listening_addr("ca");
    eventually(
        Duration::from_secs(30),
        "readiness after the CA came up",
        || curl_http(admin, "/ready", &[]).0 == 200,
    );
    assert_eq!(identity_json(admin)["id"], A);
}

#[test]
fn renewal_under_load_fails_no_request() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let client = issue(&ca, A, "1h", "client");
    // B: inbound in front of the echo service; A: outbound to B. Both renew every ~2s.
    let (b, b_api, b_admin) = ca_inbound(&ca, B, "ttl = \"4s\"");
    let a_config = format!(
        "{}{ADMIN}\n[[outbound]]\nname = \"billing\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\npeer = \"{B}\"\n",
        ca_identity(&ca, A, "a", "ttl = \"4s\""),
        b_api
    );
    let (mut a, a_addrs) = start_proxy(&write(ca.dir.path(), "a.toml", &a_config), &["billing"]);
    a.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "certificate issued"
    });
    let first_serial = identity_json(b_admin)["serial"].clone();

    let mut kept = KeepAlive::connect(a_addrs[0]);
    let mut failures = Vec::new();
    let mut requests = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(12)
        && (count_logs(&a, "certificate renewed") < 2 || count_logs(&b, "certificate renewed") < 2)
    {
        // An old connection through both sidecars, a fresh one through A,
        // and a fresh handshake straight to B.
        let kept_status = kept.get("/kept");
        let via_a = curl_http(a_addrs[0], "/fresh", &[]).0;
        let to_b = curl(b_api, "/direct", Some(&client), &["--http1.1"]).0;
        requests += 3;
        for (what, status) in [
            ("kept-alive via A", kept_status),
            ("new via A", via_a),
            ("new to B", to_b),
        ] {
            if status != 200 {
                failures.push(format!("{what}: {status} at {:?}", start.elapsed()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {failures:?}",
        failures.len()
    );
    assert!(
        count_logs(&a, "certificate renewed") >= 2,
        "A renewed twice"
    );
    assert!(
        count_logs(&b, "certificate renewed") >= 2,
        "B renewed twice"
    );
    assert_ne!(
        identity_json(b_admin)["serial"],
        first_serial,
        "B serves a new certificate"
    );
    // The kept-alive connection survived both renewals.
    assert_eq!(kept.get("/after"), 200);
}

/// File mode: B serves `b.crt`/`b.key`, which the test rewrites.
fn file_mode_b(ca: &TestCa) -> (Running, SocketAddr, SocketAddr, CertFiles) {
    let files = issue(ca, B, "1h", "b");
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\n",
        file_identity(&files, &ca.bundle_file()),
        echo_service()
    );
    let (proc, addrs) = start_proxy(&write(ca.dir.path(), "b.toml", &config), &["api", "admin"]);
    (proc, addrs[0], addrs[1], files)
}

#[test]
fn file_identity_reloads_a_valid_change() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let client = issue(&ca, A, "1h", "client");
    let (_b, api, admin, files) = file_mode_b(&ca);
    let before = identity_json(admin)["serial"].clone();
    // New files over the very same paths, as an external cert manager would.
    let renewed = issue(&ca, B, "2h", "b2");
    std::fs::copy(&renewed.cert, &files.cert).unwrap();
    std::fs::copy(&renewed.key, &files.key).unwrap();
    eventually(
        Duration::from_secs(10),
        "the new certificate to be served",
        || identity_json(admin)["serial"] != before,
    );
    assert_eq!(curl(api, "/", Some(&client), &["--http1.1"]).0, 200);
}

#[test]
fn file_identity_keeps_old_certificate_when_reload_is_broken() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let client = issue(&ca, A, "1h", "client");
    let (mut b, api, admin, files) = file_mode_b(&ca);
    let before = identity_json(admin)["serial"].clone();
    std::fs::write(
        &files.cert,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    b.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "identity files changed but are unusable; keeping the current credentials"
    });
    assert_eq!(
        identity_json(admin)["serial"],
        before,
        "still the old certificate"
    );
    assert_eq!(
        curl(api, "/", Some(&client), &["--http1.1"]).0,
        200,
        "still serving"
    );
    // A key that does not match the certificate is refused too.
    let other = issue(&ca, B, "1h", "other");
    // Seen as half a rotation (waiting for the other file) or as unusable.
    let refusals = |b: &Running| {
        count_logs(
            b,
            "identity files changed but certificate and key do not fit yet; waiting for the other file",
        ) + count_logs(
            b,
            "identity files changed but are unusable; keeping the current credentials",
        )
    };
    let before_refusals = refusals(&b);
    std::fs::copy(&other.cert, &files.cert).unwrap();
    std::fs::write(
        &files.key,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    eventually(Duration::from_secs(30), "the mismatched key seen", || {
        refusals(&b) > before_refusals
    });
    assert_eq!(
        identity_json(admin)["serial"],
        before,
        "a mismatched key is refused"
    );
    assert_eq!(curl(api, "/", Some(&client), &["--http1.1"]).0, 200);
    // Then a good pair is taken.
    std::fs::copy(&other.key, &files.key).unwrap();
    eventually(
        Duration::from_secs(10),
        "the repaired files to be taken",
        || identity_json(admin)["serial"] != before,
    );
    assert_eq!(curl(api, "/", Some(&client), &["--http1.1"]).0, 200);
}

#[test]
fn ca_rotation_reaches_the_proxy_without_restart() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (mut b, api, admin) = ca_inbound(&ca, B, "bundle_refresh = \"300ms\"");
    assert_eq!(identity_json(admin)["bundle_roots"], 1);
    let ca_dir = ca.ca_dir();
    support::moat_ok(&["ca", "rotate", "--dir", path_str(&ca_dir), "--prepare"]);
    b.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "trust bundle updated"
    });
    assert_eq!(identity_json(admin)["bundle_roots"], 2);
    // A client certificate from the new root is accepted by the running proxy.
    support::moat_ok(&["ca", "rotate", "--dir", path_str(&ca_dir), "--activate"]);
    let client = issue(&ca, A, "1h", "client-new-root");
    let old_root = ca_dir.join("roots/1.crt");
    let verify = support::tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            path_str(&old_root),
            path_str(&client.cert),
        ],
    );
    assert!(
        !verify.status.success(),
        "the client certificate comes from the new root"
    );
    assert_eq!(curl(api, "/", Some(&client), &["--http1.1"]).0, 200);
}

/// The sidecar's own view of its trust bundle on `/metrics`: how many
/// roots, and when each expires under its short SHA-256 fingerprint (as
/// `openssl x509 -fingerprint -sha256` prints it, cut to 8 bytes), the same
/// time the CA exports for that root. A rotation's second root shows once
/// the sidecar has fetched it.
#[test]
fn trust_bundle_metrics_follow_a_rotation() {
    moat_ca::install_crypto_provider();
    let mut ca = TestCa::start();
    let ca_admin = ca.admin_addr();
    let (mut b, _api, admin) = ca_inbound(&ca, B, "bundle_refresh = \"300ms\"");
    let ca_dir = ca.ca_dir();
    let fingerprint = |root: &str| {
        let out = support::tool(
            "openssl",
            &[
                "x509",
                "-noout",
                "-fingerprint",
                "-sha256",
                "-in",
                path_str(&ca_dir.join(root)),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let hex: String = text.trim().rsplit('=').next().unwrap().replace(':', "");
        hex[..16].to_ascii_lowercase()
    };
    let scrape = |addr: SocketAddr| {
        let (status, body) = curl_http(addr, "/metrics", &[]);
        assert_eq!(status, 200, "{body}");
        body
    };
    let ca_expiry = |root: &str| {
        support::metric_samples(
            &scrape(ca_admin),
            "moat_ca_root_expiry_timestamp_seconds",
            &[("root", root)],
        )
    };
    let expiry = |metrics: &str, fp: &str| {
        support::metric_samples(
            metrics,
            "moat_trust_bundle_root_expiry_timestamp_seconds",
            &[("fingerprint", fp)],
        )
    };
    let first = fingerprint("roots/1.crt");
    let metrics = scrape(admin);
    assert_eq!(
        support::metric_samples(&metrics, "moat_trust_bundle_roots", &[]),
        [1.0],
        "{metrics}"
    );
    let one = expiry(&metrics, &first);
    assert_eq!(
        one,
        ca_expiry("1"),
        "root 1 expires when the CA says: {metrics}"
    );
    assert_eq!(
        support::metric_samples(
            &metrics,
            "moat_trust_bundle_root_expiry_timestamp_seconds",
            &[]
        )
        .len(),
        1,
        "one series per root: {metrics}"
    );
    support::moat_ok(&["ca", "rotate", "--dir", path_str(&ca_dir), "--prepare"]);
    b.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "trust bundle updated"
    });
    let second = fingerprint("roots/2.crt");
    let metrics = scrape(admin);
    assert_eq!(
        support::metric_samples(&metrics, "moat_trust_bundle_roots", &[]),
        [2.0],
        "{metrics}"
    );
    assert_eq!(
        expiry(&metrics, &first),
        one,
        "root 1 is still there: {metrics}"
    );
    let two = expiry(&metrics, &second);
    assert_eq!(two.len(), 1, "root 2 shows: {metrics}");
    eventually(Duration::from_secs(10), "the CA to show root 2", || {
        !ca_expiry("2").is_empty()
    });
    assert_eq!(two, ca_expiry("2"), "{metrics}");
}

/// `--activate` right after `--prepare`, before the sidecar fetched the
/// two-root bundle: the CA's serving certificate still comes from the old
/// root, which the sidecar trusts, so its next refresh gets the new root
/// and it accepts certificates from it, with nothing done on its side.
#[test]
fn sidecar_that_missed_prepare_follows_an_activated_rotation() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (mut b, api, admin) = ca_inbound(&ca, B, "bundle_refresh = \"300ms\"");
    assert_eq!(identity_json(admin)["bundle_roots"], 1);
    let ca_dir = ca.ca_dir();
    // Frozen, the CA cannot serve the prepared-only bundle between the two
    // steps: the sidecar misses --prepare whatever the timing.
    ca.server.signal("STOP");
    let prepare = support::moat(&["ca", "rotate", "--dir", path_str(&ca_dir), "--prepare"]);
    let activate = support::moat(&["ca", "rotate", "--dir", path_str(&ca_dir), "--activate"]);
    ca.server.signal("CONT");
    assert!(prepare.status.success(), "{prepare:?}");
    assert!(activate.status.success(), "{activate:?}");
    b.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "trust bundle updated" && v["roots"] == 2
    });
    assert_eq!(identity_json(admin)["bundle_roots"], 2);
    let client = issue(&ca, A, "1h", "client-new-root");
    let verify = support::tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            path_str(&ca_dir.join("roots/1.crt")),
            path_str(&client.cert),
        ],
    );
    assert!(
        !verify.status.success(),
        "the client certificate comes from the new root"
    );
    assert_eq!(curl(api, "/", Some(&client), &["--http1.1"]).0, 200);
}
