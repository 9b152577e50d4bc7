//! Revocation (issue 20): `moat ca revoke` reaches every sidecar within
//! seconds, revoked peers are refused at the handshake, and no open
//! connection outlives the credential it was authenticated with (revoked,
//! expired, or under a retired root). Real `moat` processes, real TLS,
//! real HTTP/1.1 and HTTP/2 clients (hyper over rustls, curl).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

use crate::support::proxy::{
    ADMIN, CertFiles, ca_identity, ca_inbound, curl, curl_http, eventually, file_identity, issue,
    start_proxy, write,
};
use crate::support::{Running, TestCa, metric_samples, moat, moat_ok, path_str, tool};

const FRONTEND: &str = "spiffe://example.org/frontend";
const BILLING: &str = "spiffe://example.org/billing";

/// The revocations become visible to a sidecar within this long of
/// `moat ca revoke` returning, and its connections close (the issue's bound).
const WITHIN: Duration = Duration::from_secs(10);

fn identity_json(admin: SocketAddr) -> Value {
    let (status, body) = curl_http(admin, "/identity", &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = curl_http(admin, "/metrics", &[]);
    metric_samples(&text, name, labels).into_iter().sum::<f64>()
}

/// `moat ca ARGS --dir CA`, asserting success.
fn ca_cmd(ca: &TestCa, args: &[&str]) -> String {
    let dir = ca.ca_dir();
    let mut all = vec!["ca"];
    all.extend_from_slice(args);
    all.extend(["--dir", path_str(&dir)]);
    moat_ok(&all)
}

/// The serial of a certificate file, as `openssl x509 -serial` prints it.
fn serial_of(files: &CertFiles) -> String {
    let out = tool(
        "openssl",
        &["x509", "-noout", "-serial", "-in", path_str(&files.cert)],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("serial=")
        .expect("openssl prints serial=")
        .to_owned()
}

/// Log lines of `proc` closing a connection for `reason`.
fn closed_for(proc: &Running, reason: &str) -> Vec<Value> {
    proc.json_logs()
        .into_iter()
        .filter(|v| {
            v["message"]
                == "closing connection: the credential it was authenticated with no longer holds"
                && v["reason"] == reason
        })
        .collect()
}

/// An HTTP connection held open to a sidecar's inbound listener with a
/// client certificate: `closed` fires when the sidecar closes it.
struct Held {
    closed: tokio::sync::oneshot::Receiver<()>,
    _sender: Box<dyn std::any::Any + Send>,
}

fn tls_client(files: &CertFiles, alpn: &[u8]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            moat_proxy::tls::verify::AnyServerCertificate::new(provider),
        ))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// Connects (HTTP/2 or HTTP/1.1 by ALPN), gets `/` once (200), and keeps
/// the connection open.
async fn hold(addr: SocketAddr, files: &CertFiles, h2: bool) -> Held {
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client(files, alpn)));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let io = TokioIo::new(tls);
    let (done, closed) = tokio::sync::oneshot::channel();
    let req = || {
        let builder = hyper::Request::builder();
        let builder = if h2 {
            builder.uri(format!("https://{addr}/held"))
        } else {
            builder.uri("/held").header("host", addr.to_string())
        };
        builder.body(Empty::<Bytes>::new()).unwrap()
    };
    let sender: Box<dyn std::any::Any + Send> = if h2 {
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
            let _ = done.send(());
        });
        let resp = tx.send_request(req()).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{body:?}");
        Box::new(tx)
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
            let _ = done.send(());
        });
        let resp = tx.send_request(req()).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{body:?}");
        Box::new(tx)
    };
    Held {
        closed,
        _sender: sender,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until the sidecar at `admin` enforces deny-list version `at_least`.
fn wait_for_list(admin: SocketAddr, at_least: i64) {
    eventually(WITHIN, "the sidecar to fetch the deny-list", || {
        let (status, body) = curl_http(admin, "/identity", &[]);
        status == 200
            && serde_json::from_str::<Value>(&body).unwrap()["revocations"]["version"]
                .as_i64()
                .is_some_and(|v| v >= at_least)
    });
}

#[test]
fn revoking_an_identity_closes_its_connections_and_refuses_it_until_unrevoked() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let frontend = issue(&ca, FRONTEND, "1h", "frontend");
    let other = issue(&ca, "spiffe://example.org/reports", "1h", "reports");
    let (mut billing, api, admin) = ca_inbound(&ca, BILLING, "");
    wait_for_list(admin, 0);
    let rt = runtime();
    let (mut h1, mut h2, mut bystander) = rt.block_on(async {
        (
            hold(api, &frontend, false).await,
            hold(api, &frontend, true).await,
            hold(api, &other, true).await,
        )
    });

    // Minted before the revocation: `moat ca token` refuses a revoked
    // identity, and the CA must refuse a token already out there.
    let token = ca.token(FRONTEND);
    ca_cmd(
        &ca,
        &["revoke", "--id", FRONTEND, "--reason", "key compromise"],
    );
    let revoked_at = Instant::now();
    rt.block_on(async {
        tokio::time::timeout(WITHIN, async {
            (&mut h1.closed).await.unwrap();
            (&mut h2.closed).await.unwrap();
        })
        .await
        .expect("billing closes frontend's HTTP/1.1 and HTTP/2 connections within 10 s");
    });
    assert!(revoked_at.elapsed() < WITHIN);
    // The client sees the close before the sidecar's log line is read back.
    eventually(WITHIN, "the close log lines", || {
        closed_for(&billing, "revoked").len() >= 2
    });
    let lines = closed_for(&billing, "revoked");
    assert_eq!(lines.len(), 2, "one log line per connection: {lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l["peer"] == FRONTEND && l["serial"].is_string())
    );
    assert_eq!(
        metric(
            admin,
            "moat_connections_closed_total",
            &[("reason", "revoked")]
        ),
        2.0
    );
    // Another identity's connection is untouched.
    assert!(
        bystander.closed.try_recv().is_err(),
        "reports' connection stays open"
    );

    // New handshakes are refused, with the reason counted.
    assert_eq!(curl(api, "/", Some(&frontend), &["--http1.1"]).0, 0);
    assert!(
        metric(
            admin,
            "moat_tls_handshake_failures_total",
            &[("reason", "revoked")]
        ) >= 1.0
    );
    billing.wait_for_log(WITHIN, |v| v["message"] == "peer certificate revoked");
    assert_eq!(curl(api, "/", Some(&other), &["--http1.1"]).0, 200);

    // The CA refuses to renew it, or to redeem a token minted for it
    // before: 403 revoked.
    let bundle = ca.bundle_file();
    let csr = ca.dir.path().join("frontend.csr");
    let out = tool(
        "openssl",
        &[
            "req",
            "-new",
            "-key",
            path_str(&frontend.key),
            "-subj",
            "/CN=frontend",
            "-out",
            path_str(&csr),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let renew = tool(
        "curl",
        &[
            "-sS",
            "-w",
            "\n%{http_code}",
            "--cacert",
            path_str(&bundle),
            "--cert",
            path_str(&frontend.cert),
            "--key",
            path_str(&frontend.key),
            "--data-binary",
            &format!("@{}", path_str(&csr)),
            &format!("{}/v1/renew", ca.url()),
        ],
    );
    let text = String::from_utf8_lossy(&renew.stdout);
    assert!(text.ends_with("\n403"), "{text}");
    assert!(text.contains("\"reason\":\"revoked\""), "{text}");
    let redeem = tool(
        "curl",
        &[
            "-sS",
            "-w",
            "\n%{http_code}",
            "--cacert",
            path_str(&bundle),
            "-H",
            &format!("authorization: Bearer {token}"),
            "--data-binary",
            &format!("@{}", path_str(&csr)),
            &format!("{}/v1/certs", ca.url()),
        ],
    );
    let text = String::from_utf8_lossy(&redeem.stdout);
    assert!(
        text.ends_with("\n403") && text.contains("revoked"),
        "{text}"
    );

    // It is listed; un-revoking restores service with nothing restarted.
    let list = ca_cmd(&ca, &["revoke", "--list"]);
    assert!(
        list.contains(FRONTEND) && list.contains("key compromise"),
        "{list}"
    );
    ca_cmd(&ca, &["unrevoke", "--id", FRONTEND]);
    eventually(WITHIN, "frontend to be let in again", || {
        curl(api, "/", Some(&frontend), &["--http1.1"]).0 == 200
    });
    assert!(ca_cmd(&ca, &["revoke", "--list"]).contains("nothing is revoked"));
}

#[test]
fn revoking_a_serial_refuses_that_certificate_only() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let old = issue(&ca, FRONTEND, "1h", "old");
    let renewed = issue(&ca, FRONTEND, "1h", "renewed");
    let (_billing, api, admin) = ca_inbound(&ca, BILLING, "");
    let rt = runtime();
    let mut held = rt.block_on(hold(api, &old, true));
    let mut kept = rt.block_on(hold(api, &renewed, true));

    let out = ca_cmd(&ca, &["revoke", "--serial", &serial_of(&old)]);
    assert!(out.contains("revoked certificate serial"), "{out}");
    rt.block_on(async {
        tokio::time::timeout(WITHIN, &mut held.closed)
            .await
            .expect("the revoked certificate's connection closes")
            .unwrap();
    });
    assert!(
        kept.closed.try_recv().is_err(),
        "the renewed certificate's stays"
    );
    assert_eq!(curl(api, "/", Some(&old), &["--http1.1"]).0, 0);
    assert_eq!(curl(api, "/", Some(&renewed), &["--http1.1"]).0, 200);
    assert_eq!(identity_json(admin)["revocations"]["entries"], 1);

    // A serial the CA never issued is an operator error (exit 64).
    let dir = ca.ca_dir();
    let bad = moat(&[
        "ca",
        "revoke",
        "--serial",
        "abcdef",
        "--dir",
        path_str(&dir),
    ]);
    assert_eq!(bad.status.code(), Some(64), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no certificate with serial abcdef"));
}

#[test]
fn a_ca_outage_keeps_the_last_deny_list_in_force_and_its_age_grows() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let frontend = issue(&ca, FRONTEND, "1h", "frontend");
    let (_billing, api, admin) = ca_inbound(&ca, BILLING, "");
    ca_cmd(&ca, &["revoke", "--id", FRONTEND]);
    wait_for_list(admin, 1);
    assert_eq!(curl(api, "/", Some(&frontend), &["--http1.1"]).0, 0);

    ca.server.signal("KILL");
    eventually(
        Duration::from_secs(30),
        "the deny-list's age to grow",
        || metric(admin, "moat_revocation_list_age_seconds", &[]) >= 5.0,
    );
    let view = identity_json(admin);
    assert!(
        view["revocations"]["age_seconds"].as_u64().unwrap() >= 5,
        "{view}"
    );
    assert_eq!(view["revocations"]["entries"], 1);
    assert!(metric(admin, "moat_revocation_list_fetch_failures_total", &[]) >= 1.0);
    assert_eq!(
        curl(api, "/", Some(&frontend), &["--http1.1"]).0,
        0,
        "still refused with the CA down"
    );
}

#[test]
fn a_connection_is_closed_when_the_peer_certificate_expires_and_no_request_fails() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (billing, api, _) = ca_inbound(&ca, BILLING, "");
    // frontend: 5 s certificates, an outbound to billing; its one HTTP/2
    // connection to billing carries every request.
    let config = format!(
        "{}{ADMIN}\n[[outbound]]\nname = \"billing\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{api}\"\npeer = \"{BILLING}\"\n",
        ca_identity(&ca, FRONTEND, "frontend", "ttl = \"5s\"")
    );
    let (mut frontend, addrs) = start_proxy(&write(ca.dir.path(), "f.toml", &config), &["billing"]);
    frontend.wait_for_log(WITHIN, |v| v["message"] == "certificate issued");
    let mut failures = Vec::new();
    let mut requests = 0;
    let start = Instant::now();
    while closed_for(&billing, "peer_cert_expired").len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "billing closed {} connections at expiry in 40 s",
            closed_for(&billing, "peer_cert_expired").len()
        );
        let (status, body) = curl_http(addrs[0], "/steady", &["--http2-prior-knowledge"]);
        requests += 1;
        if status != 200 {
            failures.push(format!("{status} at {:?}: {body}", start.elapsed()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {requests} failed: {failures:?}",
        failures.len()
    );
    assert!(
        closed_for(&billing, "peer_cert_expired")
            .iter()
            .all(|l| l["peer"] == FRONTEND)
    );
}

#[test]
fn retiring_a_root_closes_the_connections_authenticated_under_it() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let old = issue(&ca, FRONTEND, "1h", "old-root");
    let (mut billing, api, admin) = ca_inbound(&ca, BILLING, "bundle_refresh = \"1s\"");
    let rt = runtime();
    let mut under_old = rt.block_on(hold(api, &old, true));

    ca_cmd(&ca, &["rotate", "--prepare"]);
    eventually(WITHIN, "billing to trust both roots", || {
        identity_json(admin)["bundle_roots"] == 2
    });
    ca_cmd(&ca, &["rotate", "--activate"]);
    billing.wait_for_log(WITHIN, |v| v["message"] == "trust bundle updated");
    let new = issue(&ca, FRONTEND, "1h", "new-root");
    let mut under_new = rt.block_on(hold(api, &new, true));
    assert!(
        under_old.closed.try_recv().is_err(),
        "adding a root closes nothing"
    );

    // --force: cutting off the certificates of the old root is the point.
    ca_cmd(&ca, &["rotate", "--retire", "--force"]);
    rt.block_on(async {
        tokio::time::timeout(WITHIN, &mut under_old.closed)
            .await
            .expect("the connection under the retired root closes")
            .unwrap();
    });
    // The client sees the close before the sidecar's log line is read back.
    eventually(WITHIN, "the close log lines", || {
        !closed_for(&billing, "root_retired").is_empty()
    });
    let lines = closed_for(&billing, "root_retired");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["peer"], FRONTEND);
    assert!(
        under_new.closed.try_recv().is_err(),
        "the connection under the new root stays"
    );
    assert_eq!(curl(api, "/", Some(&new), &["--http1.1"]).0, 200);
}

/// A TCP service that echoes every read at once, on each connection.
fn tcp_echo() -> SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A mutual-TLS byte stream to a TCP inbound listener.
async fn tcp_session(
    addr: SocketAddr,
    files: &CertFiles,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client(files, b"x")));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Writes `msg` and reads it back; false if the stream ended instead.
async fn echoes(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    msg: &[u8],
) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(WITHIN, s.read_exact(&mut got)).await,
        Ok(Ok(_))
    ) && got == msg
}

#[test]
fn a_tcp_listener_closes_a_peer_its_reloaded_allow_peers_no_longer_lists() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let frontend = issue(&ca, FRONTEND, "1h", "frontend");
    let reports_id = "spiffe://example.org/reports";
    let reports = issue(&ca, reports_id, "1h", "reports");
    let service = tcp_echo();
    let config = |allow: &str| {
        format!(
            "{}{ADMIN}\n[[inbound]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\nforward = \"{service}\"\nprotocol = \"tcp\"\nallow_peers = [{allow}]\n",
            ca_identity(&ca, BILLING, "billing", "")
        )
    };
    let path = write(
        ca.dir.path(),
        "billing.toml",
        &config(&format!("\"{FRONTEND}\", \"{reports_id}\"")),
    );
    let (mut billing, addrs) = start_proxy(&path, &["db", "admin"]);
    billing.wait_for_log(WITHIN, |v| v["message"] == "certificate issued");
    let (db, admin) = (addrs[0], addrs[1]);
    let rt = runtime();
    rt.block_on(async {
        let mut from_frontend = tcp_session(db, &frontend).await;
        let mut from_reports = tcp_session(db, &reports).await;
        assert!(echoes(&mut from_frontend, b"hello").await);
        assert!(echoes(&mut from_reports, b"hello").await);

        // The port's `listen` is 0: the reload keeps the bound listeners.
        std::fs::write(&path, config(&format!("\"{reports_id}\""))).unwrap();
        billing.signal("HUP");
        billing.wait_for_log(WITHIN, |v| v["reason"] == "policy");
        let reloaded = billing.wait_for_log(WITHIN, |v| v["message"] == "allow_peers reloaded");
        assert_eq!(reloaded["listener"], "db", "{reloaded}");
        assert_eq!(
            reloaded["allow_peers"], reports_id,
            "as written in the file: {reloaded}"
        );
        assert!(
            !echoes(&mut from_frontend, b"after").await,
            "frontend's stream is closed"
        );
        assert!(echoes(&mut from_reports, b"after").await, "reports' stays");
    });
    let lines = closed_for(&billing, "policy");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["peer"], FRONTEND);
    assert_eq!(
        metric(
            admin,
            "moat_connections_closed_total",
            &[("reason", "policy")]
        ),
        1.0
    );
    // And a new handshake from frontend is refused.
    let refused = rt.block_on(async {
        let mut s = tcp_session(db, &frontend).await;
        !echoes(&mut s, b"again").await
    });
    assert!(refused);
}

#[test]
fn an_outbound_sidecar_drops_pooled_connections_to_a_revoked_peer_and_answers_502_revoked() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let (_billing, api, _) = ca_inbound(&ca, BILLING, "");
    let config = format!(
        "{}{ADMIN}\n[[outbound]]\nname = \"billing\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{api}\"\npeer = \"{BILLING}\"\n",
        ca_identity(&ca, FRONTEND, "frontend", "")
    );
    let (mut frontend, addrs) = start_proxy(
        &write(ca.dir.path(), "f.toml", &config),
        &["billing", "admin"],
    );
    frontend.wait_for_log(WITHIN, |v| v["message"] == "certificate issued");
    let (out, admin) = (addrs[0], addrs[1]);
    // One pooled HTTP/1.1 and one HTTP/2 connection to billing.
    assert_eq!(curl_http(out, "/", &[]).0, 200);
    assert_eq!(curl_http(out, "/", &["--http2-prior-knowledge"]).0, 200);

    ca_cmd(
        &ca,
        &["revoke", "--id", BILLING, "--reason", "decommissioned"],
    );
    eventually(WITHIN, "frontend to close both pooled connections", || {
        closed_for(&frontend, "revoked").len() == 2
    });
    assert!(
        closed_for(&frontend, "revoked")
            .iter()
            .all(|l| l["peer"] == BILLING && l["listener"] == "billing")
    );
    let (status, body) = curl_http(out, "/", &[]);
    assert_eq!(status, 502, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["reason"], "revoked", "{body}");
    assert_eq!(
        metric(
            admin,
            "moat_tls_handshake_failures_total",
            &[("reason", "revoked")]
        ),
        1.0
    );
}

#[test]
fn a_sidecar_restarted_while_the_ca_is_down_enforces_the_stored_deny_list() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let frontend = issue(&ca, FRONTEND, "1h", "frontend");
    let reports = issue(&ca, "spiffe://example.org/reports", "1h", "reports");
    let state = ca.dir.path().join("billing-state");
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\n",
        ca_identity(
            &ca,
            BILLING,
            "billing",
            &format!("state_dir = {:?}", path_str(&state))
        ),
        crate::support::echo_service()
    );
    let path = write(ca.dir.path(), "billing.toml", &config);
    let (billing, addrs) = start_proxy(&path, &["api", "admin"]);
    ca_cmd(&ca, &["revoke", "--id", FRONTEND]);
    wait_for_list(addrs[1], 1);
    drop(billing);
    ca.server.signal("KILL");

    let (mut billing, addrs) = start_proxy(&path, &["api", "admin"]);
    billing.wait_for_log(WITHIN, |v| {
        v["message"] == "deny-list restored from the state directory"
    });
    let (api, admin) = (addrs[0], addrs[1]);
    eventually(WITHIN, "the restored certificate to serve", || {
        curl(api, "/", Some(&reports), &["--http1.1"]).0 == 200
    });
    assert_eq!(curl(api, "/", Some(&frontend), &["--http1.1"]).0, 0);
    assert_eq!(identity_json(admin)["revocations"]["entries"], 1);
}

/// The deny-list version `moat ca revoke --list --json` reports.
fn list_version(ca: &TestCa) -> i64 {
    let list: Value = serde_json::from_str(&ca_cmd(ca, &["revoke", "--list", "--json"])).unwrap();
    list["version"].as_i64().expect("a version")
}

#[test]
fn revoking_twice_or_unrevoking_what_is_not_revoked_changes_nothing_and_exits_0() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let cert = issue(&ca, FRONTEND, "1h", "frontend");
    let canonical = serial_of(&cert).to_ascii_lowercase();
    // As another tool might print it: a leading zero byte, colons, uppercase.
    let upper = serial_of(&cert);
    let pairs: Vec<&str> = upper
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let typed = format!("00:{}", pairs.join(":"));
    assert_ne!(typed, canonical);

    let first = ca_cmd(
        &ca,
        &["revoke", "--serial", &typed, "--reason", "lost laptop"],
    );
    assert!(
        first.starts_with(&format!("revoked certificate serial {canonical} (until ")),
        "the CA's spelling, not the one typed: {first}"
    );
    let list = ca_cmd(&ca, &["revoke", "--list"]);
    assert!(list.contains(&canonical), "{list}");
    let version = list_version(&ca);

    // Again, as typed or as listed, with no --reason: nothing changes, and
    // the message says what is in force.
    for spelling in [&typed, &canonical] {
        let dir = ca.ca_dir();
        let out = moat(&[
            "ca",
            "revoke",
            "--serial",
            spelling,
            "--dir",
            path_str(&dir),
        ]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with(&format!(
                "certificate serial {canonical} is already revoked (at "
            )) && stdout.contains("reason \"lost laptop\"")
                && stdout.contains("nothing changed"),
            "{stdout}"
        );
        // No second `revoked` event in the CLI's log.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("revoked"), "{stderr}");
    }
    assert_eq!(
        ca_cmd(&ca, &["revoke", "--list"]),
        list,
        "the entry is as it was"
    );
    assert_eq!(list_version(&ca), version, "sidecars have nothing to fetch");

    // An explicit new reason replaces the entry; it stays revoked.
    let out = ca_cmd(
        &ca,
        &["revoke", "--serial", &typed, "--reason", "key compromise"],
    );
    assert!(
        out.contains(&format!(
            "certificate serial {canonical} stays revoked; updated"
        )) && out.contains("key compromise"),
        "{out}"
    );
    assert!(ca_cmd(&ca, &["revoke", "--list"]).contains("key compromise"));
    assert_eq!(list_version(&ca), version + 1);

    // Unrevoking twice: the second changes nothing and exits 0.
    let out = ca_cmd(&ca, &["unrevoke", "--serial", &typed]);
    assert_eq!(
        out.trim(),
        format!("certificate serial {canonical} is no longer revoked")
    );
    let out = ca_cmd(&ca, &["unrevoke", "--serial", &typed]);
    assert!(
        out.starts_with(&format!(
            "certificate serial {canonical} is not revoked; nothing changed"
        )),
        "{out}"
    );
    let out = ca_cmd(&ca, &["unrevoke", "--id", FRONTEND]);
    assert!(
        out.starts_with(&format!(
            "identity {FRONTEND} is not revoked; nothing changed"
        )),
        "{out}"
    );
    assert_eq!(list_version(&ca), version + 2);
}

#[test]
fn a_file_identity_sidecar_enforces_its_deny_list_file_and_keeps_the_last_good_one() {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let billing_files = issue(&ca, BILLING, "1h", "billing");
    let frontend = issue(&ca, FRONTEND, "1h", "frontend");
    let reports = issue(&ca, "spiffe://example.org/reports", "1h", "reports");
    let lists = ca.dir.path().join("lists");
    std::fs::create_dir(&lists).unwrap();
    let deny = lists.join("deny.json");
    // Replaced by rename, as a copy job would.
    let publish = |text: &str| {
        let tmp = lists.join(".deny.json.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &deny).unwrap();
    };
    publish(&ca_cmd(&ca, &["revoke", "--list", "--json"]));
    let config = format!(
        "{}deny_list = {:?}\n{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\n",
        file_identity(&billing_files, &ca.bundle_file()),
        path_str(&deny),
        crate::support::echo_service()
    );
    let (mut billing, addrs) =
        start_proxy(&write(ca.dir.path(), "b.toml", &config), &["api", "admin"]);
    let (api, admin) = (addrs[0], addrs[1]);
    assert_eq!(identity_json(admin)["revocations"]["entries"], 0);
    let rt = runtime();
    let mut held = rt.block_on(hold(api, &frontend, true));

    ca_cmd(&ca, &["revoke", "--id", FRONTEND, "--reason", "stolen"]);
    publish(&ca_cmd(&ca, &["revoke", "--list", "--json"]));
    rt.block_on(async {
        tokio::time::timeout(WITHIN, &mut held.closed)
            .await
            .expect("billing closes frontend's connection once the file says so")
            .unwrap();
    });
    eventually(WITHIN, "the close to be logged", || {
        closed_for(&billing, "revoked").len() == 1
    });
    assert_eq!(curl(api, "/", Some(&frontend), &["--http1.1"]).0, 0);
    assert_eq!(curl(api, "/", Some(&reports), &["--http1.1"]).0, 200);
    let view = identity_json(admin)["revocations"].clone();
    assert_eq!(view["entries"], 1, "{view}");
    assert!(view["age_seconds"].is_u64(), "the file's age: {view}");

    // A broken copy is logged; the last good list stays in force.
    publish("{\"version\": 7, \"entries\": [");
    billing.wait_for_log(WITHIN, |v| {
        v["message"] == "deny-list file changed but is unusable; enforcing the last good one"
    });
    assert_eq!(curl(api, "/", Some(&frontend), &["--http1.1"]).0, 0);

    // Un-revoked and copied again: frontend is let in, nothing restarted.
    ca_cmd(&ca, &["unrevoke", "--id", FRONTEND]);
    publish(&ca_cmd(&ca, &["revoke", "--list", "--json"]));
    eventually(WITHIN, "frontend to be let in again", || {
        curl(api, "/", Some(&frontend), &["--http1.1"]).0 == 200
    });

    // With a CA identity the CA's list is the one in force: refused.
    let bad = write(
        ca.dir.path(),
        "bad.toml",
        &format!(
            "{}deny_list = {:?}\n",
            ca_identity(&ca, BILLING, "bad", ""),
            path_str(&deny)
        ),
    );
    let out = moat(&["proxy", "--config", path_str(&bad)]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("deny_list applies to cert + key only"));
}

#[test]
fn the_deny_list_without_a_client_certificate_is_refused_naming_the_endpoint() {
    if !crate::support::require("curl") {
        return;
    }
    let ca = TestCa::start();
    let bundle = ca.bundle_file();
    let out = tool(
        "curl",
        &[
            "-sS",
            "-w",
            "\n%{http_code}",
            "--cacert",
            path_str(&bundle),
            &format!("{}/v1/revocations", ca.url()),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n401"), "{text}");
    assert!(
        text.contains("GET /v1/revocations needs a client certificate"),
        "{text}"
    );
    assert!(!text.contains("renewal"), "{text}");
}
