//! Transparent mode end to end, against the real kernel: a client pod and a
//! server pod, each with its app, its sidecar (as UID 65532, so the UID
//! exemption is what keeps the sidecar's own connections out of the rules)
//! and its redirect rules, and an outsider.
//!
//! The client app calls `http://<server-ip>:8080/` with no proxy settings:
//! its sidecar takes the connection (transparent outbound), looks the
//! address up in `[[destination]]`, and opens mutual TLS to the same address,
//! where the server pod's rules hand it to the server sidecar (transparent
//! inbound), which checks the peer and the route policy and forwards to the
//! app. HTTP/1.1, HTTP/2, gRPC and raw TCP go through the pair with only TLS
//! on the wire; the outsider's plaintext and foreign certificates are
//! refused (strict) or its plaintext let through and counted (permissive);
//! an unmatched destination is passed through or denied.
//!
//! Root and network namespaces are required; under `MOAT_TEST_REQUIRE_ALL=1`
//! a test that cannot run fails.

use crate::redirect::{APP, curl_in, moat_ok_in, nft, pods, sidecar_config};
use crate::support;
use crate::support::netns::*;
use crate::support::proxy::{eventually, foreign_cert, issue, wait_for_logs, write};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use support::{Running, TestCa, metric_samples, moat_bin, path_str};

const CLIENT: &str = "spiffe://example.org/ns/shop/sa/web";
const SERVER: &str = "spiffe://example.org/ns/shop/sa/billing";
const IMPOSTOR: &str = "spiffe://example.org/ns/shop/sa/impostor";

/// Only `/api/*`, for the client; `/admin/*` for someone else.
const POLICY: &str = r#"
mode = "enforce"

[[route]]
name = "api"
path = "/api/*"
peers = ["spiffe://example.org/ns/shop/sa/web"]

[[route]]
name = "admin"
path = "/admin/*"
peers = ["spiffe://example.org/ns/ops/sa/admin"]
"#;

/// A sidecar in `ns`, as moat's UID, started and listening.
fn sidecar(ns: &str, config: &str, wait_for: &str) -> Running {
    let mut moat = Running::from_command({
        let mut cmd = netns_command_as(ns, moat_bin(), Some(MOAT_UID));
        cmd.args(["proxy", "--config", config]);
        cmd
    });
    moat.listening_addr(wait_for);
    moat
}

/// The sidecar's metrics, read from its admin port inside `ns`.
fn scrape(ns: &str) -> String {
    let (status, body) = curl_in(ns, &["http://127.0.0.1:9901/metrics"]);
    assert_eq!(status, 200, "{body}");
    body
}

/// Every `moat_transparent_*` family in `metrics` (a scrape) has its row
/// in docs/metrics.md and in the README's table. Checked here, on the
/// scrapes of redirected traffic: a family is exported only once it has a
/// series, so a sidecar without the rules (no root) exports none of them.
fn assert_documented(metrics: &str) -> usize {
    let read =
        |f: &str| std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(f)).unwrap();
    let (docs, readme) = (read("docs/metrics.md"), read("README.md"));
    let mut seen = 0;
    for (family, kind) in metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| name.starts_with("moat_transparent_"))
    {
        // OpenMetrics names a counter family without its `_total`; the
        // Prometheus text format (a plain scrape) with it.
        let series = if kind == "counter" && !family.ends_with("_total") {
            format!("{family}_total")
        } else {
            family.to_owned()
        };
        let row = format!("| `{series}` |");
        assert!(docs.contains(&row), "{series} is not in docs/metrics.md");
        assert!(readme.contains(&row), "{series} is not in README.md");
        seen += 1;
    }
    seen
}

fn count(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_samples(text, name, labels).iter().sum()
}

/// A TCP echo service on `[::]:port` in `ns` (both families).
fn echo_app(ns: &str, port: u16) {
    let listener = in_netns(ns, move || {
        std::net::TcpListener::bind(("::", port)).unwrap_or_else(|e| panic!("bind {port}: {e}"))
    });
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Connects from `ns` (as root), sends `ping` and returns what came back
/// (empty when the connection was closed on it).
fn echo_from(ns: &str, to: SocketAddr) -> Vec<u8> {
    in_netns(ns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(10)) else {
            return Vec::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.write_all(b"ping").is_err() {
            return Vec::new();
        }
        let mut got = vec![0u8; 4];
        match s.read_exact(&mut got) {
            Ok(()) => got,
            Err(_) => Vec::new(),
        }
    })
}

/// One gRPC call (OTLP trace export) from `ns` to `endpoint`, made by
/// tonic on a runtime whose sockets belong to `ns`.
fn grpc_export_from(ns: &str, endpoint: String) -> Result<(), String> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut client = TraceServiceClient::connect(endpoint)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let span = Span {
                trace_id: vec![1; 16],
                span_id: vec![2; 8],
                name: "through-the-transparent-pair".into(),
                ..Default::default()
            };
            let request = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            client
                .export(request)
                .await
                .map(|_| ())
                .map_err(|e| format!("export: {e}"))
        })
    })
}

/// The server pod: the app on `[::]:8080` (HTTP/1.1), a gRPC service on
/// `0.0.0.0:4317` and a TCP echo on `[::]:9000`.
struct ServerApps {
    http: Running,
    grpc: support::otlp::Receiver,
}

fn server_apps(ns: &str) -> ServerApps {
    let mut http = {
        let mut cmd = netns_command(ns, "python3");
        cmd.args(["-u", "-c", APP]);
        Running::from_command(cmd)
    };
    http.wait_for_log(Duration::from_secs(20), |v| v["message"] == "ready");
    let listener = in_netns(ns, || std::net::TcpListener::bind("0.0.0.0:4317").unwrap());
    let grpc = support::otlp::Receiver::start_on(listener);
    echo_app(ns, 9000);
    ServerApps { http, grpc }
}

/// The server sidecar's listeners: the app (with a route policy), the gRPC
/// service, the echo; `redirect` is the `[redirect]` section.
fn server_config(dir: &std::path::Path, ca: &TestCa, name: &str, redirect: &str) -> String {
    let policy = write(dir, "policy.toml", POLICY);
    sidecar_config(
        dir,
        name,
        &issue(ca, SERVER, "1h", name),
        &ca.bundle_file(),
        &format!(
            "[[inbound]]\nname = \"app\"\nlisten = \"0.0.0.0:15443\"\nforward = \"127.0.0.1:8080\"\npolicy = {:?}\n\n\
             [[inbound]]\nname = \"grpc\"\nlisten = \"0.0.0.0:15444\"\nforward = \"127.0.0.1:4317\"\napp_protocol = \"grpc\"\n\n\
             [[inbound]]\nname = \"echo\"\nlisten = \"0.0.0.0:15445\"\nforward = \"127.0.0.1:9000\"\nprotocol = \"tcp\"\n\n\
             [[inbound]]\nname = \"elsewhere\"\nlisten = \"0.0.0.0:15446\"\nforward = \"127.0.0.1:8079\"\n\n\
             [redirect]\n{redirect}\n",
            path_str(&policy)
        ),
    )
}

#[test]
fn transparent_pair_carries_http1_h2_grpc_and_tcp_over_mtls_without_app_changes() {
    let Some(pods) = pods(&[
        ("curl", &["--version"], "curl"),
        ("python3", &["--version"], "python3"),
        ("nft", &["--version"], "nftables"),
    ]) else {
        return;
    };
    let (client, server) = (&pods.client, &pods.server);
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path();
    give_to_moat(dir);
    let apps = server_apps(&server.ns);
    let server_cfg = server_config(dir, &ca, "server.toml", "");
    let client_cfg = sidecar_config(
        dir,
        "client.toml",
        &issue(&ca, CLIENT, "1h", "client"),
        &ca.bundle_file(),
        &format!(
            "[redirect]\ninbound_ports = []\nunmatched = \"deny\"\n\n\
             [[destination]]\nname = \"billing\"\nip = \"{s4}\"\nport = 8080\npeer = \"{SERVER}\"\n\n\
             [[destination]]\nname = \"billing-v6\"\ncidr = \"{s6}/128\"\nport = 8080\npeer = \"{SERVER}\"\nprotocol = \"http2\"\n\n\
             [[destination]]\nname = \"billing-grpc\"\nip = \"{s4}\"\nport = 4317\npeer = \"spiffe://example.org/ns/shop/*\"\nprotocol = \"grpc\"\n\n\
             [[destination]]\nname = \"billing-echo\"\nip = \"{s4}\"\nport = 9000\npeer = \"{SERVER}\"\nprotocol = \"tcp\"\n\n\
             [[destination]]\nname = \"impostor\"\nip = \"{s4}\"\nport = 8079\npeer = \"{IMPOSTOR}\"\n",
            s4 = server.ip4,
            s6 = server.ip6,
        ),
    );
    // The rules, applied twice in each pod: one table each.
    for (ns, cfg) in [(&server.ns, &server_cfg), (&client.ns, &client_cfg)] {
        moat_ok_in(ns, &["redirect", "--config", cfg]);
        moat_ok_in(ns, &["redirect", "--config", cfg]);
        let ruleset = nft(ns, &["list", "ruleset"]);
        assert_eq!(ruleset.matches("table inet moat").count(), 1, "{ruleset}");
    }
    let server_moat = sidecar(&server.ns, &server_cfg, "transparent-inbound");
    let mut client_moat = sidecar(&client.ns, &client_cfg, "transparent-outbound");
    client_moat.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "listening"
            && v["listener"] == "transparent-outbound"
            && v["addr"] == "[::1]:15001"
    });

    let capture = Capture::start(&pods.hub, &client.veth);
    // HTTP/1.1 and HTTP/2 (h2c prior knowledge) from the app, v4 and v6,
    // no proxy settings: the server app sees the client's verified ID.
    let h2 = "--http2-prior-knowledge";
    let calls = [
        (format!("http://{}:8080/api/hello", server.ip4), None),
        (format!("http://[{}]:8080/api/v6", server.ip6), None),
        (format!("http://{}:8080/api/h2", server.ip4), Some(h2)),
        (format!("http://[{}]:8080/api/h2v6", server.ip6), Some(h2)),
    ];
    for (url, flag) in &calls {
        let mut args: Vec<&str> = flag.iter().copied().collect();
        args.push(url);
        let (status, body) = curl_in(&client.ns, &args);
        assert_eq!(status, 200, "{url}: {body}");
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["headers"]["x-moat-peer-id"], CLIENT, "{body}");
        assert!(
            url.ends_with(seen["path"].as_str().unwrap()),
            "{url}: {body}"
        );
    }
    // The route policy still decides, per route.
    let (status, body) = curl_in(
        &client.ns,
        &[&format!("http://{}:8080/admin/users", server.ip4)],
    );
    assert_eq!(status, 403, "{body}");
    // A destination whose peer is not who answers: 502, and the app never
    // sees it.
    let (status, body) = curl_in(&client.ns, &[&format!("http://{}:8079/", server.ip4)]);
    assert_eq!(status, 502, "{body}");
    client_moat.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "request to peer failed"
            && v["error"].as_str().is_some_and(|e| e.contains(IMPOSTOR))
    });
    // gRPC (a real tonic client and server, HTTP/2 with trailers).
    grpc_export_from(&client.ns, format!("http://{}:4317", server.ip4)).unwrap();
    apps.grpc.wait_for(Duration::from_secs(20), |spans| {
        spans
            .iter()
            .any(|s| s.name == "through-the-transparent-pair")
    });
    // Raw TCP.
    assert_eq!(
        echo_from(&client.ns, SocketAddr::new(server.ip4.into(), 9000)),
        b"ping"
    );

    // On the wire between the pods: TLS records only, for every port.
    let frames = capture.stop();
    let streams = tcp_streams(&frames);
    let between: Vec<_> = streams
        .iter()
        .filter(|((src, dst), bytes)| {
            !bytes.is_empty()
                && [src.ip(), dst.ip()].contains(&server.ip4.into())
                    | [src.ip(), dst.ip()].contains(&server.ip6.into())
        })
        .collect();
    for port in [8080, 8079, 4317, 9000] {
        assert!(
            between.iter().any(|((_, dst), _)| dst.port() == port),
            "a connection to port {port} on the wire: {:?}",
            streams.keys()
        );
    }
    for ((src, dst), bytes) in &between {
        let records = tls_records(bytes).unwrap_or_else(|e| panic!("{src} -> {dst}: {e}"));
        assert!(records > 0, "{src} -> {dst}");
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains("/api/") && !text.contains("ping") && !text.contains("HTTP/1.1"),
            "{src} -> {dst} carries plaintext"
        );
    }

    // Counted per destination; the sidecar's own connections were never
    // redirected back to it (each is counted once, as the app's).
    let metrics = scrape(&client.ns);
    let outcome = |dest: &str| {
        count(
            &metrics,
            "moat_transparent_outbound_connections_total",
            &[("destination", dest), ("outcome", "matched")],
        )
    };
    assert_eq!(outcome("billing"), 3.0, "{metrics}");
    assert_eq!(outcome("billing-v6"), 2.0, "{metrics}");
    assert_eq!(outcome("billing-echo"), 1.0, "{metrics}");
    assert_eq!(outcome("impostor"), 1.0, "{metrics}");
    assert!(outcome("billing-grpc") >= 1.0, "{metrics}");
    assert_eq!(
        count(
            &metrics,
            "moat_requests_total",
            &[("listener", "transparent-outbound/billing")]
        ),
        3.0,
        "{metrics}"
    );
    // The admin view: the redirect settings and the destination table.
    let (status, body) = curl_in(&client.ns, &["http://127.0.0.1:9901/transparent"]);
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["redirect"]["unmatched"], "deny");
    assert_eq!(view["redirect"]["mode"], "strict");
    assert_eq!(view["destinations"][0]["name"], "billing");
    assert_eq!(
        view["destinations"][0]["addresses"][0],
        server.ip4.to_string()
    );
    assert_eq!(
        view["destinations"][2]["peer"],
        "spiffe://example.org/ns/shop/*"
    );

    // The app saw only moat, over loopback, and never the denied route.
    // (It logs a request after answering it: wait for the lines.)
    wait_for_logs(&apps.http, "request", 4);
    let requests: Vec<_> = apps
        .http
        .json_logs()
        .into_iter()
        .filter(|v| v["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 4, "{requests:?}");
    drop(server_moat);
    drop(client_moat);

    // --cleanup leaves nothing of moat's behind.
    for ns in [&server.ns, &client.ns] {
        moat_ok_in(ns, &["redirect", "--cleanup"]);
        let ruleset = nft(ns, &["list", "ruleset"]);
        assert!(!ruleset.contains("moat"), "{ruleset}");
    }
}

#[test]
fn transparent_inbound_strict_refuses_outsiders_and_permissive_counts_their_plaintext() {
    let Some(pods) = pods(&[
        ("curl", &["--version"], "curl"),
        ("python3", &["--version"], "python3"),
    ]) else {
        return;
    };
    let (server, outsider) = (&pods.server, &pods.outsider);
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path();
    give_to_moat(dir);
    let apps = server_apps(&server.ns);
    let strict_cfg = server_config(dir, &ca, "strict.toml", "");
    moat_ok_in(&server.ns, &["redirect", "--config", &strict_cfg]);
    let foreign = foreign_cert(dir, CLIENT, "foreign");
    let url = format!("http://{}:8080/api/plain", server.ip4);
    let tls_url = format!("https://{}:8080/api/foreign", server.ip4);
    let foreign_args = [
        "-k",
        "--cert",
        path_str(&foreign.cert),
        "--key",
        path_str(&foreign.key),
        &tls_url,
    ];

    // Strict: plaintext gets no answer, and is counted as a failed
    // handshake on the app's listener; so is another CA's certificate.
    let strict = sidecar(&server.ns, &strict_cfg, "transparent-inbound");
    let (status, _) = curl_in(&outsider.ns, &[&url]);
    assert_eq!(status, 0, "plaintext got an HTTP answer in strict mode");
    let (status, _) = curl_in(&outsider.ns, &foreign_args);
    assert_eq!(status, 0, "another CA's certificate got an answer");
    let metrics = scrape(&server.ns);
    let failures = |reason: &str| {
        count(
            &metrics,
            "moat_tls_handshake_failures_total",
            &[("listener", "app"), ("reason", reason)],
        )
    };
    assert_eq!(failures("protocol"), 1.0, "{metrics}");
    assert_eq!(failures("unknown_ca"), 1.0, "{metrics}");
    drop(strict);

    // Permissive: plaintext reaches the app (without a peer ID), counted
    // and logged with its source; TLS is still verified; a silent client
    // is served as plaintext after the detection timeout; an opaque port
    // is never peeked at, so it stays mutual TLS only.
    let permissive_cfg = server_config(
        dir,
        &ca,
        "permissive.toml",
        "mode = \"permissive\"\ndetection_timeout = \"300ms\"\nopaque_ports = [9000]\n",
    );
    let mut permissive = sidecar(&server.ns, &permissive_cfg, "transparent-inbound");
    let (status, body) = curl_in(&outsider.ns, &[&url]);
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(seen["headers"].get("x-moat-peer-id").is_none(), "{body}");
    permissive.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "permissive: plaintext connection forwarded to the app"
            && v["peer_addr"]
                .as_str()
                .is_some_and(|a| a.contains(&outsider.ip4.to_string()))
    });
    let (status, _) = curl_in(&outsider.ns, &foreign_args);
    assert_eq!(status, 0, "another CA's certificate got an answer");
    let to = SocketAddr::new(server.ip4.into(), 8080);
    let mut silent = in_netns(&outsider.ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap()
    });
    // Nothing sent: the sidecar waits out the detection timeout (the app,
    // a client-first server, then waits for a request).
    eventually(Duration::from_secs(20), "a detection timeout", || {
        count(
            &scrape(&server.ns),
            "moat_transparent_detection_timeouts_total",
            &[("port", "8080")],
        ) == 1.0
    });
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    silent
        .write_all(b"GET /api/late HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = silent.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // (What comes back, if anything, is the TLS alert.)
    assert_ne!(
        echo_from(&outsider.ns, SocketAddr::new(server.ip4.into(), 9000)),
        b"ping",
        "plaintext reached an opaque port"
    );
    let metrics = scrape(&server.ns);
    assert_eq!(
        count(
            &metrics,
            "moat_transparent_inbound_plaintext_connections_total",
            &[("port", "8080")]
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        count(
            &metrics,
            "moat_transparent_detection_timeouts_total",
            &[("port", "8080")]
        ),
        1.0,
        "{metrics}"
    );
    assert!(assert_documented(&metrics) >= 2, "{metrics}");
    assert!(
        count(
            &metrics,
            "moat_tls_handshake_failures_total",
            &[("listener", "echo")]
        ) >= 1.0,
        "{metrics}"
    );
    // The app logs a request after answering it: wait for the lines.
    wait_for_logs(&apps.http, "request", 2);
    let paths: Vec<String> = apps
        .http
        .json_logs()
        .into_iter()
        .filter(|v| v["message"] == "request")
        .map(|v| v["path"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(paths, ["/api/plain", "/api/late"]);
}

/// A DNS server for one name, on UDP port 53: answers every A query with
/// 10.200.0.2 (the server pod).
const DNS: &str = r#"
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
print(json.dumps({"message": "ready"}), file=sys.stderr, flush=True)
while True:
    q, peer = s.recvfrom(512)
    end = 12
    while q[end] != 0:
        end += q[end] + 1
    end += 5
    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([10, 200, 0, 2])
    s.sendto(q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q[12:end] + answer, peer)
"#;

/// A DNS query for `billing.shop` over UDP from `ns`; the answer's last
/// four bytes (the A record).
fn resolve_from(ns: &str, server: SocketAddr) -> Vec<u8> {
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["billing", "shop"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        s.send_to(&q, server).unwrap();
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).expect("a DNS answer");
        assert_eq!(&buf[..2], &[0x12, 0x34]);
        buf[n - 4..n].to_vec()
    })
}

#[test]
fn unmatched_destinations_pass_through_or_are_denied_and_dns_is_untouched() {
    let Some(pods) = pods(&[
        ("curl", &["--version"], "curl"),
        ("python3", &["--version"], "python3"),
    ]) else {
        return;
    };
    let (client, outsider) = (&pods.client, &pods.outsider);
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path();
    give_to_moat(dir);
    // The outsider runs a plain web server (not meshed) and a DNS server.
    let mut web = {
        let mut cmd = netns_command(&outsider.ns, "python3");
        cmd.args(["-u", "-c", APP]);
        Running::from_command(cmd)
    };
    web.wait_for_log(Duration::from_secs(20), |v| v["message"] == "ready");
    let mut dns = {
        let mut cmd = netns_command(&outsider.ns, "python3");
        cmd.args(["-u", "-c", DNS]);
        Running::from_command(cmd)
    };
    dns.wait_for_log(Duration::from_secs(20), |v| v["message"] == "ready");
    let files = issue(&ca, CLIENT, "1h", "client");
    let config = |name: &str, unmatched: &str| {
        sidecar_config(
            dir,
            name,
            &files,
            &ca.bundle_file(),
            &format!(
                "[redirect]\ninbound_ports = []\nunmatched = \"{unmatched}\"\n\n\
                 [[destination]]\nname = \"billing\"\nip = \"10.200.0.2\"\nport = 8080\npeer = \"{SERVER}\"\n"
            ),
        )
    };
    let pass_cfg = config("pass.toml", "passthrough");
    moat_ok_in(&client.ns, &["redirect", "--config", &pass_cfg]);
    let url = format!("http://{}:8080/unmeshed", outsider.ip4);
    let dst = format!("{}:8080", outsider.ip4);

    // Passthrough: plain TCP to where the app was going, counted by
    // destination; the connection to the outsider comes from the sidecar
    // (moat's UID is exempt, so it is not redirected again).
    let pass = sidecar(&client.ns, &pass_cfg, "transparent-outbound");
    let (status, body) = curl_in(&client.ns, &[&url]);
    assert_eq!(status, 200, "{body}");
    let metrics = scrape(&client.ns);
    assert_eq!(
        count(
            &metrics,
            "moat_transparent_outbound_connections_total",
            &[("destination", &dst), ("outcome", "passthrough")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(assert_documented(&metrics), 1, "{metrics}");
    // DNS over UDP is never redirected.
    assert_eq!(
        resolve_from(&client.ns, SocketAddr::new(outsider.ip4.into(), 53)),
        [10, 200, 0, 2]
    );
    drop(pass);

    // Deny: closed, counted.
    let deny_cfg = config("deny.toml", "deny");
    let mut deny = sidecar(&client.ns, &deny_cfg, "transparent-outbound");
    let (status, _) = curl_in(&client.ns, &[&url]);
    assert_eq!(status, 0, "a denied destination answered");
    deny.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "refused: no [[destination]] matches (unmatched = \"deny\")"
            && v["original_dst"] == dst.as_str()
    });
    eventually(Duration::from_secs(10), "the denial is counted", || {
        count(
            &scrape(&client.ns),
            "moat_transparent_outbound_connections_total",
            &[("destination", &dst), ("outcome", "denied")],
        ) == 1.0
    });
    assert_eq!(
        resolve_from(&client.ns, SocketAddr::new(outsider.ip4.into(), 53)),
        [10, 200, 0, 2]
    );
    // The app logs a request after answering it: wait for the line.
    wait_for_logs(&web, "request", 1);
    let seen: Vec<_> = web
        .json_logs()
        .into_iter()
        .filter(|v| v["message"] == "request")
        .collect();
    assert_eq!(seen.len(), 1, "only the passed-through request: {seen:?}");
}

/// A sidecar in `ns` as moat's UID whose `/etc/resolv.conf` is `resolv`
/// (a mount namespace of its own, made before `enter` drops root), so
/// that the test's DNS server answers its `[[destination]] host` lookups.
fn sidecar_resolving_with(ns: &str, config: &str, wait_for: &str, resolv: &Path) -> Running {
    use std::os::unix::process::CommandExt;
    let src = std::ffi::CString::new(path_str(resolv)).unwrap();
    let mut cmd = std::process::Command::new(moat_bin());
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            let private = libc::MS_REC | libc::MS_PRIVATE;
            let null = std::ptr::null();
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(c"none".as_ptr(), c"/".as_ptr(), null, private, null.cast()) != 0
                || libc::mount(
                    src.as_ptr(),
                    c"/etc/resolv.conf".as_ptr(),
                    null,
                    libc::MS_BIND,
                    null.cast(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    moat_testkit::netns::enter(&mut cmd, ns, Some(MOAT_UID));
    cmd.args(["proxy", "--config", config]);
    let mut moat = Running::from_command(cmd);
    moat.listening_addr(wait_for);
    moat
}

/// A DNS server on `127.0.0.1:53` in `ns` answering A queries for the
/// names in `zone` (address, TTL in seconds), which the test may change;
/// other names and types get an empty answer.
type Zone = std::sync::Arc<std::sync::Mutex<Vec<(&'static str, [u8; 4], u32)>>>;

fn dns_server(ns: &str, zone: Zone) {
    let socket = in_netns(ns, || {
        UdpSocket::bind("127.0.0.1:53").expect("bind 127.0.0.1:53")
    });
    std::thread::spawn(move || {
        let mut q = [0u8; 512];
        while let Ok((n, peer)) = socket.recv_from(&mut q) {
            let q = &q[..n];
            let (mut end, mut labels) = (12, Vec::new());
            while end < n && q[end] != 0 {
                let len = q[end] as usize;
                labels.push(String::from_utf8_lossy(&q[end + 1..end + 1 + len]).to_lowercase());
                end += len + 1;
            }
            let qtype = u16::from_be_bytes([q[end + 1], q[end + 2]]);
            end += 5;
            let name = labels.join(".");
            let found = zone
                .lock()
                .unwrap()
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, ip, ttl)| (*ip, *ttl));
            let mut answer = q[..2].to_vec();
            let count = u8::from(qtype == 1 && found.is_some());
            answer.extend_from_slice(&[0x81, 0x80, 0, 1, 0, count, 0, 0, 0, 0]);
            answer.extend_from_slice(&q[12..end]);
            if let (1, Some((ip, ttl))) = (qtype, found) {
                answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
                answer.extend_from_slice(&ttl.to_be_bytes());
                answer.extend_from_slice(&[0, 4]);
                answer.extend_from_slice(&ip);
            }
            let _ = socket.send_to(&answer, peer);
        }
    });
}

/// The addresses the client sidecar's admin view lists for destination `i`.
fn destination_addresses(ns: &str, i: usize) -> Vec<String> {
    let (status, body) = curl_in(ns, &["http://127.0.0.1:9901/transparent"]);
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    view["destinations"][i]["addresses"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn host_and_authority_pick_among_names_on_one_address_which_follow_their_ttl_and_loops_are_refused()
{
    let Some(pods) = pods(&[
        ("curl", &["--version"], "curl"),
        ("python3", &["--version"], "python3"),
        ("nft", &["--version"], "nftables"),
    ]) else {
        return;
    };
    let (client, server) = (&pods.client, &pods.server);
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path();
    give_to_moat(dir);
    let _apps = server_apps(&server.ns);
    let server_cfg = server_config(dir, &ca, "server.toml", "");
    let ip = server.ip4.octets();
    // billing and impostor share the server pod's address; moving moves.
    let zone: Zone = std::sync::Arc::new(std::sync::Mutex::new(vec![
        ("billing.test", ip, 300),
        ("impostor.test", ip, 300),
        ("moving.test", [192, 0, 2, 1], 1),
    ]));
    dns_server(&client.ns, zone.clone());
    let resolv = write(
        dir,
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:2\n",
    );
    give_to_moat(&resolv);
    let client_cfg = sidecar_config(
        dir,
        "client.toml",
        &issue(&ca, CLIENT, "1h", "client"),
        &ca.bundle_file(),
        &format!(
            "[redirect]\ninbound_ports = []\nunmatched = \"deny\"\ndns_refresh = \"1h\"\n\n\
             [[destination]]\nname = \"billing\"\nhost = \"billing.test\"\nport = 8080\npeer = \"{SERVER}\"\n\n\
             [[destination]]\nname = \"impostor\"\nhost = \"impostor.test\"\nport = 8080\npeer = \"{IMPOSTOR}\"\n\n\
             [[destination]]\nname = \"moving\"\nhost = \"moving.test\"\nport = 9\npeer = \"{SERVER}\"\nprotocol = \"tcp\"\n"
        ),
    );
    moat_ok_in(&server.ns, &["redirect", "--config", &server_cfg]);
    moat_ok_in(&client.ns, &["redirect", "--config", &client_cfg]);
    let _server_moat = sidecar(&server.ns, &server_cfg, "transparent-inbound");
    let client_moat =
        sidecar_resolving_with(&client.ns, &client_cfg, "transparent-outbound", &resolv);
    assert_eq!(
        destination_addresses(&client.ns, 0),
        [server.ip4.to_string()]
    );

    // One address, two entries: the first request's Host (HTTP/1.1) or
    // :authority (h2c, one request per connection) picks the entry, and
    // so the peer ID pinned: the impostor entry's peer is not who answers.
    let url = format!("http://{}:8080/api/vhost", server.ip4);
    for (host, h2, want) in [
        ("billing.test", false, 200),
        ("impostor.test", false, 502),
        ("billing.test", true, 200),
        ("impostor.test", true, 502),
    ] {
        let resolve = format!("{host}:8080:{}", server.ip4);
        let by_name = format!("http://{host}:8080/api/vhost");
        let host_header = format!("Host: {host}:8080");
        let args: Vec<&str> = if h2 {
            vec!["--http2-prior-knowledge", "--resolve", &resolve, &by_name]
        } else {
            vec!["-H", &host_header, &url]
        };
        let (status, body) = curl_in(&client.ns, &args);
        assert_eq!(status, want, "{host} (h2c: {h2}): {body}");
        if want == 200 {
            let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(seen["headers"]["x-moat-peer-id"], CLIENT, "{body}");
        }
    }
    let metrics = scrape(&client.ns);
    for name in ["billing", "impostor"] {
        assert_eq!(
            count(
                &metrics,
                "moat_transparent_outbound_connections_total",
                &[("destination", name), ("outcome", "matched")]
            ),
            2.0,
            "{name}: {metrics}"
        );
    }

    // A name is resolved again when its TTL runs out (1 s, kept 5 s), not
    // every dns_refresh (an hour here).
    eventually(Duration::from_secs(20), "moving.test resolved", || {
        destination_addresses(&client.ns, 2) == ["192.0.2.1"]
    });
    zone.lock().unwrap()[2].1 = [192, 0, 2, 2];
    let moved = std::time::Instant::now();
    eventually(
        Duration::from_secs(20),
        "moving.test resolved again",
        || destination_addresses(&client.ns, 2) == ["192.0.2.2"],
    );
    assert!(
        moved.elapsed() < Duration::from_secs(12),
        "{:?}",
        moved.elapsed()
    );
    drop(client_moat);

    // moat as root, not proxy_uid: its own connection to the peer is
    // redirected back to it, recognized and refused, once, instead of
    // looping until the connection limit.
    let loop_cfg = sidecar_config(
        dir,
        "loop.toml",
        &issue(&ca, CLIENT, "1h", "loop"),
        &ca.bundle_file(),
        &format!(
            "[redirect]\ninbound_ports = []\nunmatched = \"passthrough\"\n\n\
             [[destination]]\nname = \"billing\"\nip = \"{}\"\nport = 8080\npeer = \"{SERVER}\"\n",
            server.ip4
        ),
    );
    let mut looping = Running::from_command({
        let mut cmd = netns_command(&client.ns, moat_bin());
        cmd.args(["proxy", "--config", &loop_cfg]);
        cmd
    });
    looping.listening_addr("transparent-outbound");
    // Said once at start, with the IDs as numbers (not `Id(65532)`), the
    // unset proxy_gid left out (not `None`).
    let warning = looping.wait_for_log(Duration::from_secs(10), |v| {
        v["level"] == "WARN" && v["proxy_uid"].is_string()
    });
    assert_eq!(warning["proxy_uid"], MOAT_UID.to_string(), "{warning}");
    assert!(warning.get("proxy_gid").is_none(), "{warning}");
    let (status, body) = curl_in(&client.ns, &[&url]);
    assert_eq!(status, 502, "{body}");
    looping.wait_for_log(Duration::from_secs(20), |v| {
        v["level"] == "ERROR"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("refused: a redirect loop"))
    });
    let dst = format!("{}:8080", server.ip4);
    let metrics = scrape(&client.ns);
    let loops = count(
        &metrics,
        "moat_transparent_outbound_connections_total",
        &[("destination", &dst), ("outcome", "loop")],
    );
    assert!(loops >= 1.0, "{metrics}");
    assert_eq!(
        count(
            &metrics,
            "moat_transparent_outbound_connections_total",
            &[("destination", "billing"), ("outcome", "matched")]
        ),
        1.0,
        "the app's connection only: {metrics}"
    );

    // Passed through (no [[destination]]), moat's own connection loops
    // back: counted once, as the loop, not also as a passthrough.
    let unmatched = SocketAddr::from((server.ip4, 9999));
    let (status, _) = curl_in(&client.ns, &[&format!("http://{unmatched}/")]);
    assert_eq!(status, 0);
    looping.wait_for_log(Duration::from_secs(20), |v| {
        v["level"] == "ERROR" && v["original_dst"] == unmatched.to_string()
    });
    let metrics = scrape(&client.ns);
    let outcome = |outcome: &str| {
        count(
            &metrics,
            "moat_transparent_outbound_connections_total",
            &[
                ("destination", &unmatched.to_string()),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(outcome("loop"), 1.0, "{metrics}");
    assert_eq!(outcome("passthrough"), 0.0, "{metrics}");
}

/// A `[[destination]] peer` in another trust domain (a typo) can never be
/// reached: the sidecar says so at start, as for an outbound `peer`.
#[test]
fn a_destination_peer_in_another_trust_domain_is_warned_about_at_start() {
    let Some(pods) = pods(&[]) else {
        return;
    };
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path();
    give_to_moat(dir);
    let typo = "spiffe://exmaple.org/ns/shop/sa/billing";
    let cfg = sidecar_config(
        dir,
        "typo.toml",
        &issue(&ca, CLIENT, "1h", "typo"),
        &ca.bundle_file(),
        &format!(
            "[redirect]\ninbound_ports = []\n\n\
             [[destination]]\nip = \"10.0.0.1\"\npeer = \"{typo}\"\n\n\
             [[destination]]\nname = \"right\"\nip = \"10.0.0.2\"\npeer = \"{SERVER}\"\n"
        ),
    );
    let mut moat = sidecar(&pods.client.ns, &cfg, "transparent-outbound");
    let warning = moat.wait_for_log(Duration::from_secs(10), |v| {
        v["level"] == "WARN" && v["peer"] == typo
    });
    assert_eq!(warning["destination"], "10.0.0.1", "{warning}");
    assert_eq!(warning["peer_trust_domain"], "exmaple.org", "{warning}");
    assert_eq!(warning["trust_domain"], "example.org", "{warning}");
    let warned: Vec<_> = moat
        .json_logs()
        .into_iter()
        .filter(|v| v["level"] == "WARN" && v["peer_trust_domain"].is_string())
        .collect();
    assert_eq!(warned.len(), 1, "only the typo, once: {warned:?}");
}

/// A `[[destination]] host` that has never resolved matches nothing, so
/// its traffic would follow `unmatched` (plaintext, with passthrough): the
/// sidecar is not ready, says which destination and which nameserver
/// failed, and becomes ready once the name resolves.
#[test]
fn a_destination_host_that_never_resolved_keeps_the_sidecar_unready_until_it_does() {
    let Some(pods) = pods(&[("curl", &["--version"], "curl")]) else {
        return;
    };
    let ns = &pods.client.ns;
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path();
    give_to_moat(dir);
    // Nothing answers on 127.0.0.1:53 yet.
    let resolv = write(
        dir,
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    );
    give_to_moat(&resolv);
    let cfg = sidecar_config(
        dir,
        "unresolved.toml",
        &issue(&ca, CLIENT, "1h", "unresolved"),
        &ca.bundle_file(),
        &format!(
            "[redirect]\ninbound_ports = []\n\n\
             [[destination]]\nname = \"billing\"\nhost = \"billing.test\"\nport = 8080\npeer = \"{SERVER}\"\n"
        ),
    );
    let mut moat = sidecar_resolving_with(ns, &cfg, "transparent-outbound", &resolv);
    let (status, body) = curl_in(ns, &["http://127.0.0.1:9901/ready"]);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("[[destination]] billing") && body.contains("billing.test"),
        "{body}"
    );
    let warning = moat.wait_for_log(Duration::from_secs(10), |v| {
        v["level"] == "WARN" && v["destination"] == "billing"
    });
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains("not enforced")),
        "{warning}"
    );
    assert!(
        warning["error"]
            .as_str()
            .is_some_and(|e| e.contains("nameserver 127.0.0.1")),
        "names the nameserver it asked: {warning}"
    );

    // The name resolves (retried every 5 s): enforced, and ready.
    let zone: Zone = std::sync::Arc::new(std::sync::Mutex::new(vec![(
        "billing.test",
        [192, 0, 2, 1],
        300,
    )]));
    dns_server(ns, zone);
    eventually(Duration::from_secs(20), "ready once resolved", || {
        curl_in(ns, &["http://127.0.0.1:9901/ready"]).0 == 200
    });
    assert_eq!(destination_addresses(ns, 0), ["192.0.2.1"]);
}
