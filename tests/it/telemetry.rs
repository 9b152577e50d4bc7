//! Telemetry end to end: traces to a real OTLP receiver across a sidecar
//! pair, requests unaffected by a collector that is down, and Prometheus
//! metrics that move with allowed, denied and refused traffic.

use crate::support;
use crate::support::otlp;
use crate::support::proxy as proxy_support;

use std::net::SocketAddr;
use std::time::Duration;

use proxy_support::*;
use serde_json::Value;
use support::{Running, TestCa, echo_service, path_str, tool};

const CLIENT: &str = "spiffe://example.org/ns/shop/sa/frontend";
const SERVER: &str = "spiffe://example.org/ns/shop/sa/billing";

const POLICY: &str = r#"
[[route]]
name = "invoices"
path = "/invoices/*"
methods = ["GET"]
peers = ["spiffe://example.org/ns/shop/sa/frontend"]
"#;

/// client → outbound sidecar → mTLS → inbound sidecar (with policy, on the
/// single-threaded runtime) → echo.
struct Pair {
    _ca: TestCa,
    server: Running,
    client: Running,
    outbound: SocketAddr,
    inbound: SocketAddr,
    server_admin: SocketAddr,
}

fn pair(telemetry: &str) -> Pair {
    let ca = TestCa::start();
    let service = echo_service();
    let dir = ca.dir.path();
    let policy = write(dir, "policy.toml", POLICY);
    let server_cfg = write(
        dir,
        "server.toml",
        &format!(
            "{}{ADMIN}[runtime]\nworker_threads = 1\n[telemetry]\nservice_name = \"billing-sidecar\"\n{telemetry}\n\
             [[inbound]]\nname = \"in\"\nlisten = \"127.0.0.1:0\"\nforward = \"{service}\"\npolicy = {:?}\n",
            ca_identity(&ca, SERVER, "server", ""),
            path_str(&policy)
        ),
    );
    let (server, addrs) = start_proxy(&server_cfg, &["in", "admin"]);
    let (inbound, server_admin) = (addrs[0], addrs[1]);
    let client_cfg = write(
        dir,
        "client.toml",
        &format!(
            "{}{ADMIN}[telemetry]\nservice_name = \"frontend-sidecar\"\n{telemetry}\n\
             [[outbound]]\nname = \"out\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{inbound}\"\npeer = \"{SERVER}\"\n",
            ca_identity(&ca, CLIENT, "client", ""),
        ),
    );
    let (client, addrs) = start_proxy(&client_cfg, &["out", "admin"]);
    let outbound = addrs[0];
    for admin in [server_admin, addrs[1]] {
        eventually(Duration::from_secs(20), "sidecar ready", || {
            curl_http(admin, "/ready", &[]).0 == 200
        });
    }
    Pair {
        _ca: ca,
        server,
        client,
        outbound,
        inbound,
        server_admin,
    }
}

/// A peer that does not answer: the outbound's server span names no peer
/// (`moat.peer.id` `-`, as the access log's `peer`), not the configured one.
#[test]
fn an_unreached_peer_is_not_named_on_the_outbound_span() {
    let receiver = otlp::Receiver::start();
    let mut p = pair(&format!("otlp_endpoint = \"{}\"", receiver.endpoint()));
    p.server.signal("KILL");
    p.server
        .wait_exit(Duration::from_secs(5))
        .expect("the peer sidecar exits");
    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let (status, body) = curl_http(
        p.outbound,
        "/invoices/7",
        &[
            "-H",
            &format!("traceparent: 00-{trace}-00f067aa0ba902b7-01"),
        ],
    );
    assert_eq!(status, 502, "{body}");
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter()
            .any(|s| s.trace_id == trace && s.name.starts_with("GET out"))
    });
    let out_server = spans
        .iter()
        .find(|s| s.trace_id == trace && s.name.starts_with("GET out"))
        .unwrap();
    assert_eq!(
        out_server.attr("moat.peer.id"),
        Some("-"),
        "{out_server:#?}"
    );
    assert_eq!(out_server.attr("http.response.status_code"), Some("502"));
}

#[test]
fn one_trace_spans_client_both_sidecars_and_the_service() {
    let receiver = otlp::Receiver::start();
    let p = pair(&format!("otlp_endpoint = \"{}\"", receiver.endpoint()));
    // The "client service" started a trace and calls through its sidecar.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let (status, body) = curl_http(
        p.outbound,
        "/invoices/7",
        &["-H", &format!("traceparent: 00-{trace}-{client_span}-01")],
    );
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    let seen = echoed["headers"]["traceparent"]
        .as_str()
        .expect("the service got a traceparent");
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(
        parts[1], trace,
        "the service's traceparent belongs to the caller's trace"
    );
    // Only traceparent is added: no empty tracestate the caller never sent.
    assert!(
        echoed["headers"].get("tracestate").is_none(),
        "{}",
        echoed["headers"]
    );
    // A tracestate the caller sent goes on.
    let (status, body) = curl_http(
        p.outbound,
        "/invoices/8",
        &[
            "-H",
            &format!("traceparent: 00-{trace}-{client_span}-01"),
            "-H",
            "tracestate: congo=t61rcWkgMzE",
        ],
    );
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        echoed["headers"]["tracestate"], "congo=t61rcWkgMzE",
        "{body}"
    );

    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter().filter(|s| s.trace_id == trace).count() >= 5
    });
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.trace_id == trace && s.service == service && s.name.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} span from {service}: {spans:#?}"))
            .clone()
    };
    let out_server = find("frontend-sidecar", "GET out");
    let out_client = find("frontend-sidecar", "GET 127.0.0.1");
    let in_server = find("billing-sidecar", "GET in");
    let in_client = find("billing-sidecar", "GET local service");
    // Parent/child links: caller → outbound → its upstream call → inbound →
    // its call to the service, whose traceparent names that last span.
    assert_eq!(out_server.parent_span_id, client_span);
    assert_eq!(out_client.parent_span_id, out_server.span_id);
    assert_eq!(in_server.parent_span_id, out_client.span_id);
    assert_eq!(in_client.parent_span_id, in_server.span_id);
    assert_eq!(parts[2], in_client.span_id);
    // Attributes operators search by.
    assert_eq!(in_server.attr("http.request.method"), Some("GET"));
    assert_eq!(in_server.attr("url.path"), Some("/invoices/7"));
    assert_eq!(in_server.attr("http.response.status_code"), Some("200"));
    assert_eq!(in_server.attr("moat.peer.id"), Some(CLIENT));
    assert_eq!(in_server.attr("moat.route"), Some("invoices"));
    assert_eq!(in_server.attr("moat.decision"), Some("allow"));
    assert!(in_server.attr("server.address").is_some());
    assert_eq!(in_server.attr("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(out_client.attr("moat.peer.id"), Some(SERVER));
    // Status codes are integers, as the semantic conventions have them, on
    // the server spans and on the client spans of the upstream calls.
    for span in [&out_server, &out_client, &in_server, &in_client] {
        assert_eq!(
            span.int_attr("http.response.status_code"),
            Some(200),
            "{span:#?}"
        );
    }
    // Each sidecar's server span names its caller: the outbound's, the
    // local service.
    assert_eq!(out_server.attr("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(out_server.attr("moat.peer.id"), Some(SERVER));
    // The first request opened the connection to the peer: its handshake has a span.
    assert!(
        spans
            .iter()
            .any(|s| s.service == "frontend-sidecar" && s.name == "tls_handshake"),
        "{spans:#?}"
    );

    // A denied request carries the decision and reason on its span.
    let (status, _) = curl_http(p.outbound, "/admin", &[]);
    assert_eq!(status, 403);
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter()
            .any(|s| s.service == "billing-sidecar" && s.attr("moat.decision") == Some("deny"))
    });
    let denied = spans
        .iter()
        .find(|s| s.service == "billing-sidecar" && s.attr("moat.decision") == Some("deny"))
        .unwrap();
    assert_eq!(denied.attr("moat.deny.reason"), Some("no_route"));
    assert_eq!(denied.attr("http.response.status_code"), Some("403"));

    // A method the conventions do not know (methods are case-sensitive):
    // `_OTHER`, the method as sent beside it, and a span named `HTTP`.
    let (status, _) = curl_http(p.outbound, "/invoices/9", &["-X", "delete"]);
    assert_eq!(status, 400);
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter()
            .any(|s| s.attr("http.request.method_original") == Some("delete"))
    });
    let other = spans
        .iter()
        .find(|s| s.attr("http.request.method_original") == Some("delete"))
        .unwrap();
    assert_eq!(
        (other.service.as_str(), other.name.as_str()),
        ("frontend-sidecar", "HTTP out"),
        "{other:#?}"
    );
    assert_eq!(other.attr("http.request.method"), Some("_OTHER"));
    assert_eq!(other.int_attr("http.response.status_code"), Some(400));

    // The access log carries the same trace id.
    let access = p
        .server
        .json_logs()
        .into_iter()
        .find(|l| l["message"] == "access" && l["path"] == "/invoices/7")
        .expect("an access-log line");
    assert_eq!(access["trace_id"], trace);
    assert_eq!(access["route"], "invoices");
    assert_eq!(access["peer"], CLIENT);
    drop(p.client);
}

#[test]
fn requests_succeed_when_the_collector_is_down_and_lost_spans_are_counted() {
    // A port with nothing behind it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let p = pair(&format!("otlp_endpoint = \"{endpoint}\""));
    for i in 0..20 {
        let (status, body) = curl_http(p.outbound, &format!("/invoices/{i}"), &[]);
        assert_eq!(status, 200, "{body}");
    }
    // The batch exporter gives up on the dead collector and counts the loss.
    eventually(Duration::from_secs(30), "spans counted as dropped", || {
        let (_, metrics) = curl_http(p.server_admin, "/metrics", &[]);
        metric(&metrics, "moat_spans_dropped_total", &[]).is_some_and(|v| v > 0.0)
    });
}

#[test]
fn metrics_move_with_allowed_denied_and_refused_traffic() {
    let p = pair("");
    let before = scrape(p.server_admin);
    assert_eq!(
        metric(&before, "moat_requests_total", &[("route", "invoices")]),
        None
    );

    for _ in 0..3 {
        assert_eq!(curl_http(p.outbound, "/invoices/1", &[]).0, 200);
    }
    assert_eq!(curl_http(p.outbound, "/invoices/1", &["-X", "POST"]).0, 403);
    // A client without a certificate straight at the inbound listener.
    let (status, _) = curl(p.inbound, "/invoices/1", None, &[]);
    assert_eq!(status, 0, "refused in the handshake");

    let after = scrape(p.server_admin);
    let allowed = [
        ("listener", "in"),
        ("route", "invoices"),
        ("decision", "allow"),
        ("status", "2xx"),
    ];
    assert_eq!(
        metric(&after, "moat_requests_total", &allowed),
        Some(3.0),
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "moat_authz_decisions_total",
            &[
                ("route", "invoices"),
                ("decision", "deny"),
                ("reason", "no_route")
            ]
        ),
        None,
        "POST matches no route, it is not a denial of the invoices route"
    );
    assert_eq!(
        metric(
            &after,
            "moat_authz_decisions_total",
            &[("decision", "deny"), ("reason", "no_route")]
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "moat_tls_handshake_failures_total",
            &[("listener", "in"), ("reason", "no_client_cert")]
        ),
        Some(1.0),
        "{after}"
    );
    assert!(metric(&after, "moat_certificate_expiry_timestamp_seconds", &[]).unwrap() > 1.7e9);
    assert_eq!(
        metric(&after, "moat_policy_info", &[("listener", "in")]),
        Some(1.0),
        "{after}"
    );
    assert!(
        metric(
            &after,
            "moat_request_duration_seconds_count",
            &[("listener", "in")]
        )
        .unwrap()
            >= 4.0
    );
    // The outbound side counted the same requests.
    let _ = &p.client;
}

#[test]
fn log_level_changes_at_runtime_through_the_admin_listener() {
    let mut p = pair("");
    assert_eq!(curl_http(p.outbound, "/invoices/1", &[]).0, 200);
    let debug_lines = |logs: &[String]| logs.iter().filter(|l| l.contains("\"DEBUG\"")).count();
    assert_eq!(debug_lines(&p.server.logs()), 0, "no debug lines at info");
    let (status, body) = curl_http(p.server_admin, "/logging?level=debug", &["-X", "PUT"]);
    assert_eq!(status, 200, "{body}");
    let louder_from = p.server.logs().len();
    assert_eq!(curl_http(p.outbound, "/invoices/2", &[]).0, 200);
    eventually(
        Duration::from_secs(10),
        "debug lines after level=debug",
        || debug_lines(&p.server.logs()[louder_from..]) > 0,
    );
    let (status, body) = curl_http(p.server_admin, "/logging?level=warn", &["-X", "PUT"]);
    assert_eq!(status, 200, "{body}");
    // Debug lines written before the change can still be on their way
    // through the log reader: count from the change's own line.
    p.server.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "log level changed" && v["filter"] == "warn"
    });
    let quiet_from = p.server.logs().len();
    assert_eq!(curl_http(p.outbound, "/invoices/3", &[]).0, 200);
    eventually(
        Duration::from_secs(10),
        "the access line at level warn",
        || {
            p.server.logs()[quiet_from..]
                .iter()
                .any(|l| l.contains("\"access\"") && l.contains("/invoices/3"))
        },
    );
    assert_eq!(
        debug_lines(&p.server.logs()[quiet_from..]),
        0,
        "no debug lines at warn"
    );
    let (status, _) = curl_http(
        p.server_admin,
        "/logging?level=moat_proxy%3Dloud",
        &["-X", "PUT"],
    );
    assert_eq!(status, 400);
    // A 404 lists what this sidecar serves: no /transparent without
    // transparent mode, and asking for it says why.
    let (status, body) = curl_http(p.server_admin, "/", &[]);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("/identity") && !body.contains("/transparent"),
        "{body}"
    );
    let (status, body) = curl_http(p.server_admin, "/transparent", &[]);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("transparent mode only"), "{body}");
}

#[test]
fn a_failed_forward_warns_with_the_request_id_of_its_access_line() {
    let ca = TestCa::start();
    let dir = ca.dir.path();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = closed.local_addr().unwrap();
    drop(closed);
    // billing's sidecar forwards to a service that is not there (502
    // local_unavailable); frontend's has one outbound to it and one to a
    // peer that is not there (502 peer_unavailable).
    let server_cfg = write(
        dir,
        "server.toml",
        &format!(
            "{}{ADMIN}[[inbound]]\nname = \"in\"\nlisten = \"127.0.0.1:0\"\nforward = \"{down}\"\n",
            ca_identity(&ca, SERVER, "server", ""),
        ),
    );
    let (server, addrs) = start_proxy(&server_cfg, &["in", "admin"]);
    let (inbound, server_admin) = (addrs[0], addrs[1]);
    let client_cfg = write(
        dir,
        "client.toml",
        &format!(
            "{}{ADMIN}[[outbound]]\nname = \"out\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{inbound}\"\npeer = \"{SERVER}\"\n\
             [[outbound]]\nname = \"dead\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{down}\"\npeer = \"{SERVER}\"\n",
            ca_identity(&ca, CLIENT, "client", ""),
        ),
    );
    let (client, addrs) = start_proxy(&client_cfg, &["out", "dead", "admin"]);
    for admin in [server_admin, addrs[2]] {
        eventually(Duration::from_secs(20), "sidecar ready", || {
            curl_http(admin, "/ready", &[]).0 == 200
        });
    }
    assert_eq!(curl_http(addrs[0], "/invoices/1", &[]).0, 502);
    assert_eq!(curl_http(addrs[1], "/invoices/1", &[]).0, 502);
    // The warning that says why, and the access line that says what: one id.
    let joined = |proxy: &Running, listener: &str, warning: &str| {
        let mut found = None;
        eventually(Duration::from_secs(10), warning, || {
            let logs = proxy.json_logs();
            let warn = logs.iter().find(|l| l["message"] == warning);
            let access = logs
                .iter()
                .find(|l| l["message"] == "access" && l["listener"] == listener);
            found = warn.zip(access).map(|(w, a)| (w.clone(), a.clone()));
            found.is_some()
        });
        let (warn, access) = found.unwrap();
        assert!(warn["request_id"].is_string(), "{warn}");
        assert_eq!(warn["request_id"], access["request_id"], "{warn}\n{access}");
    };
    joined(&server, "in", "forwarding failed");
    joined(&client, "dead", "request to peer failed");
}

fn scrape(admin: SocketAddr) -> String {
    let out = tool("curl", &["-sS", &format!("http://{admin}/metrics")]);
    String::from_utf8(out.stdout).unwrap()
}

/// The value of the first sample of `name` whose labels include `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    support::metric_samples(text, name, labels).first().copied()
}
