//! Hostile TLS: whatever a client presents that is not a valid workload
//! certificate of an admitted peer is refused in the handshake, counted in
//! `moat_tls_handshake_failures_total`, logged, and the proxy keeps serving
//! the legitimate client. Checked with our own raw client, curl, openssl and
//! an independent scanner (sslscan).

use crate::support;
use crate::support::hostile as hostile_support;
use crate::support::proxy as proxy_support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hostile_support::*;
use proxy_support::*;
use rustls::pki_types::CertificateDer;
use support::{TestCa, path_str, tool};

/// A leaf signed by the test CA's own root, shaped by `edit` (the CA itself
/// would never sign it).
fn ca_leaf(ca: &TestCa, name: &str, edit: impl FnOnce(&mut rcgen::CertificateParams)) -> CertFiles {
    let issuer = moat_testkit::pki::ca_dir_issuer(&ca.ca_dir()).unwrap();
    let pem = moat_testkit::pki::leaf(&issuer, "", |p| {
        p.subject_alt_names = vec![uri_san(CLIENT_ID)];
        edit(p);
    });
    cert_files(ca.dir.path(), name, &pem.unwrap())
}

fn failures(s: &Sidecar, reason: Option<&str>) -> f64 {
    let mut labels = vec![("listener", "api")];
    if let Some(r) = reason {
        labels.push(("reason", r));
    }
    metric(&s.scrape(), "moat_tls_handshake_failures_total", &labels)
}

/// `files` is refused at the handshake (curl gets no HTTP answer), the
/// refusal is counted under `reason` and logged.
fn refused_in_handshake(s: &mut Sidecar, files: &CertFiles, reason: &str, what: &str) {
    let before = failures(s, Some(reason));
    let logged = count_logs(&s.proxy, "handshake failed");
    let (status, body) = curl(s.inbound, "/", Some(files), &["--http1.1"]);
    assert_eq!(status, 0, "{what}: no HTTP answer expected, got {body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while failures(s, Some(reason)) != before + 1.0 {
        assert!(
            Instant::now() < deadline,
            "{what}: not counted as {reason}; logs: {:?}\n{}",
            s.proxy.logs().last(),
            s.scrape()
                .lines()
                .filter(|l| l.starts_with("moat_tls_handshake_failures_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The line is written after the count: give the log reader a moment.
    eventually(Duration::from_secs(5), &format!("{what}: logged"), || {
        count_logs(&s.proxy, "handshake failed") == logged + 1
    });
}

#[test]
fn certificates_the_ca_would_never_issue_are_refused() {
    let mut s = sidecar("", "");
    let ca_leaf_true = ca_leaf(&s.ca, "ca-true", |p| {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    });
    refused_in_handshake(&mut s, &ca_leaf_true, "not_a_leaf", "CA:TRUE leaf");
    // The trust bundle's root itself, with its key, as the client's certificate.
    let roots = s.ca.ca_dir().join("roots");
    let root = CertFiles {
        cert: roots.join("1.crt"),
        key: roots.join("1.key"),
    };
    refused_in_handshake(&mut s, &root, "not_a_leaf", "the root as a leaf");
    let server_only = ca_leaf(&s.ca, "server-eku", |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    });
    refused_in_handshake(&mut s, &server_only, "wrong_usage", "serverAuth-only EKU");
    let two_ids = ca_leaf(&s.ca, "two-ids", |p| {
        p.subject_alt_names = vec![
            uri_san(CLIENT_ID),
            uri_san("spiffe://example.org/ns/prod/sa/admin"),
        ];
    });
    refused_in_handshake(&mut s, &two_ids, "wrong_identity", "two URI SANs");
    let future = ca_leaf(&s.ca, "future", |p| {
        p.not_before = rcgen::date_time_ymd(2099, 1, 1);
        p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    });
    refused_in_handshake(&mut s, &future, "not_yet_valid", "not yet valid");
    let expired = ca_leaf(&s.ca, "expired", |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 1, 2);
    });
    refused_in_handshake(&mut s, &expired, "expired", "expired");
    let foreign = foreign_cert(s.ca.dir.path(), CLIENT_ID, "foreign");
    refused_in_handshake(&mut s, &foreign, "unknown_ca", "another CA");
    // A self-signed certificate carrying our client's SPIFFE ID.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![uri_san(CLIENT_ID)];
    let selfsigned = p.self_signed(&key).unwrap();
    let files = CertFiles {
        cert: write(s.ca.dir.path(), "self.crt", &selfsigned.pem()),
        key: write(s.ca.dir.path(), "self.key", &key.serialize_pem()),
    };
    refused_in_handshake(&mut s, &files, "unknown_ca", "self-signed");
    s.assert_still_serving();
}

#[test]
fn garbage_certificate_bytes_are_refused() {
    let mut s = sidecar("", "");
    let before = failures(&s, None);
    let (_, key) = client_auth(&s.client);
    for garbage in [
        b"not a certificate at all".to_vec(),
        vec![0x30, 0x82, 0xff, 0xff, 0x30, 0x00],
        vec![0u8; 3000],
    ] {
        let auth = (vec![CertificateDer::from(garbage)], key.clone_key());
        let answered = match tls_connect(s.inbound, Some(auth), &[b"http/1.1"]) {
            Err(_) => String::new(),
            Ok(mut tls) => {
                let _ = tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
                let (bytes, _) = read_until_close(&mut tls, Duration::from_secs(5));
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
        assert!(answered.is_empty(), "no HTTP answer: {answered}");
    }
    eventually(Duration::from_secs(5), "three failures counted", || {
        failures(&s, None) == before + 3.0
    });
    s.assert_still_serving();
}

#[test]
fn plaintext_http_on_the_tls_port_is_refused_as_a_protocol_failure() {
    let mut s = sidecar("", "");
    let before = failures(&s, Some("protocol"));
    let mut tcp = std::net::TcpStream::connect(s.inbound).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
        "no plaintext answer: {got:?}"
    );
    eventually(Duration::from_secs(5), "counted as protocol", || {
        failures(&s, Some("protocol")) == before + 1.0
    });
    s.assert_still_serving();
}

#[test]
fn old_protocol_versions_and_weak_suites_are_refused() {
    if !support::require("openssl") {
        return;
    }
    let s = sidecar("", "");
    let (cert, key) = (path_str(&s.client.cert), path_str(&s.client.key));
    let auth = ["-cert", cert, "-key", key];
    let (ok, text) = openssl_connects(s.inbound, &[&auth[..], &["-tls1_3"]].concat());
    assert!(
        ok,
        "the control: TLS 1.3 with our certificate works:\n{text}"
    );
    for version in ["-tls1", "-tls1_1", "-tls1_2"] {
        let (ok, text) = openssl_connects(
            s.inbound,
            &[&auth[..], &[version, "-cipher", "ALL:@SECLEVEL=0"]].concat(),
        );
        assert!(!ok, "{version} must be refused by default:\n{text}");
    }
    // With TLS 1.2 allowed: still no 1.0/1.1, no static-RSA or CBC suites.
    let t = sidecar("[tls]\nallow_tls12 = true\n", "");
    let (cert, key) = (path_str(&t.client.cert), path_str(&t.client.key));
    let auth = ["-cert", cert, "-key", key];
    let (ok, text) = openssl_connects(t.inbound, &[&auth[..], &["-tls1_2"]].concat());
    assert!(ok, "the control: TLS 1.2 when allowed:\n{text}");
    for version in ["-tls1", "-tls1_1"] {
        let (ok, text) = openssl_connects(
            t.inbound,
            &[&auth[..], &[version, "-cipher", "ALL:@SECLEVEL=0"]].concat(),
        );
        assert!(!ok, "{version} refused even with TLS 1.2 allowed:\n{text}");
    }
    for weak in [
        "AES128-SHA:AES256-SHA:AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384",
        "DES-CBC3-SHA:RC4-SHA:NULL-SHA:@SECLEVEL=0",
    ] {
        let (ok, text) = openssl_connects(
            t.inbound,
            &[&auth[..], &["-tls1_2", "-cipher", weak]].concat(),
        );
        assert!(!ok, "weak suites {weak} refused:\n{text}");
    }
}

#[test]
fn independent_scanner_sees_tls13_only_and_a_required_client_certificate() {
    if !support::require("sslscan") {
        return;
    }
    let s = sidecar("", "");
    let target = s.inbound.to_string();
    let out = tool(
        "sslscan",
        &["--no-colour", "--no-heartbleed", "--no-groups", &target],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let enabled = |v: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(v))
            .unwrap_or_else(|| panic!("sslscan reports {v}:\n{text}"))
            .contains("enabled")
    };
    assert!(enabled("TLSv1.3"), "TLS 1.3 is on:\n{text}");
    for v in ["SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2"] {
        assert!(!enabled(v), "{v} must be disabled:\n{text}");
    }
    // Without a client certificate no scan gets an application byte: the
    // TLS 1.3 handshake completes on the scanner's side, then the proxy
    // refuses it; so the proxy counted scanner handshakes as no_client_cert.
    let refused = metric(
        &s.scrape(),
        "moat_tls_handshake_failures_total",
        &[("listener", "api"), ("reason", "no_client_cert")],
    );
    assert!(
        refused >= 1.0,
        "scanner handshakes refused for no client cert"
    );
    let (status, _) = curl(s.inbound, "/", None, &["--http1.1"]);
    assert_eq!(status, 0, "and curl without a certificate gets nothing");
}

#[test]
fn stalled_handshakes_are_cut_and_free_their_slot() {
    let mut s = sidecar(
        "[limits]\nmax_connections = 2\nhandshake_timeout = \"400ms\"\n",
        "",
    );
    let before = failures(&s, Some("timeout"));
    // Two clients take both slots: one sends nothing, one half a ClientHello.
    let mut silent = std::net::TcpStream::connect(s.inbound).unwrap();
    let mut half = std::net::TcpStream::connect(s.inbound).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    let start = Instant::now();
    let (status, body) = curl(s.inbound, "/", Some(&s.client), &["--http1.1"]);
    assert_eq!(status, 200, "served once a stalled slot was freed: {body}");
    assert!(start.elapsed() < Duration::from_secs(5));
    for stalled in [&mut silent, &mut half] {
        stalled
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(
            matches!(stalled.read(&mut buf), Ok(0) | Err(_)),
            "the stalled connection was closed"
        );
    }
    eventually(Duration::from_secs(5), "timeouts counted", || {
        failures(&s, Some("timeout")) == before + 2.0
    });
    s.assert_still_serving();
}

/// rustls ignores an IP address sent as SNI (as it must: RFC 6066 §3) and
/// said so in a WARN on every such connection, without the peer. Held at
/// `error` by the default log filter: the connection is served, nothing
/// is logged at WARN for it.
#[test]
fn an_ip_address_as_sni_is_served_without_a_warning() {
    let mut s = sidecar("", "");
    let (cert, key) = (path_str(&s.client.cert), path_str(&s.client.key));
    let (ok, out) = openssl_connects(
        s.inbound,
        &["-servername", "127.0.0.1", "-cert", cert, "-key", key],
    );
    assert!(ok, "{out}");
    // A later request's log line shows the proxy has moved past it.
    s.assert_still_serving();
    eventually(Duration::from_secs(5), "the access line", || {
        count_logs(&s.proxy, "access") >= 1
    });
    let warned: Vec<String> = s
        .proxy
        .logs()
        .into_iter()
        .filter(|l| l.contains("SNI"))
        .collect();
    assert!(warned.is_empty(), "{warned:?}");
}
