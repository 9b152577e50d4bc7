//! Request heads that the route policy and a lenient service would read
//! differently, on the inbound and the outbound, over HTTP/1.1 and HTTP/2:
//! a lowercase method, identity headers spelled with `_`, a malformed or
//! missing `Host`, a transfer coding moat would drop, and a malformed
//! chunked body (the caller's fault, not the service's).

use crate::support::hostile as hostile_support;
use crate::support::proxy as proxy_support;
use crate::support::{echo_service, moat, path_str};

use std::time::Duration;

use hostile_support::*;
use proxy_support::*;
use serde_json::Value;

const POLICY: &str = r#"
[[route]]
name = "no-delete"
path = "/public/*"
methods = ["DELETE"]
deny = true

[[route]]
name = "internal-deny"
path = "/internal/*"
host = "internal.svc"
deny = true

[[route]]
name = "internal-any"
path = "/internal/*"
allow = "any-peer"

[[route]]
name = "public"
path = "/public/*"
allow = "any-peer"
"#;

const FORGED: &str = "spiffe://example.org/ns/prod/sa/admin";

/// The inbound sidecar in front of the echo service, under [`POLICY`].
fn policed() -> Sidecar {
    let mut s = sidecar_with("", |ca| {
        let policy = write(ca.dir.path(), "policy.toml", POLICY);
        format!("policy = {:?}\n", policy.to_str().unwrap())
    });
    s.alive_path = "/public/still-up";
    s
}

/// The `reason` of moat's JSON error body in `text`, if there is one.
fn reason(text: &str) -> Option<String> {
    let start = text.find("{\"error\"")?;
    let v: Value = serde_json::Deserializer::from_str(&text[start..])
        .into_iter::<Value>()
        .next()?
        .ok()?;
    Some(v["reason"].as_str()?.to_owned())
}

/// True when the echo service answered (its body has `body_len`).
fn echoed(text: &str) -> bool {
    text.contains("\"body_len\"")
}

/// Sends `request` raw and checks it was answered 400 with `why` and never
/// reached the service (`what` names the case in failures); the answer.
fn refused_raw(s: &Sidecar, request: &str, why: &str, what: &str) -> String {
    let text = raw_http1(s, request.as_bytes(), Duration::from_secs(3));
    assert_eq!(statuses(&text), vec![400], "{what}: {text}");
    assert_eq!(reason(&text).as_deref(), Some(why), "{what}: {text}");
    assert!(!echoed(&text), "{what}: not forwarded: {text}");
    text
}

#[test]
fn a_lowercase_method_is_refused_and_never_reaches_the_service() {
    let mut s = policed();
    for method in ["delete", "Delete", "get"] {
        refused_raw(
            &s,
            &format!("{method} /public/a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
            "method_not_uppercase",
            method,
        );
    }
    // HTTP/2, with curl (which sends the method as given).
    let (status, body) = curl(
        s.inbound,
        "/public/a",
        Some(&s.client),
        &["--http2", "-X", "delete"],
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(reason(&body).as_deref(), Some("method_not_uppercase"));
    // The upper-case method is the policy's to decide: denied by its route.
    let (status, _) = curl(s.inbound, "/public/a", Some(&s.client), &["-X", "DELETE"]);
    assert_eq!(status, 403);
    let metrics = s.scrape();
    let refused = metric(
        &metrics,
        "moat_requests_total",
        &[("listener", "api"), ("status", "4xx")],
    );
    assert!(refused >= 5.0, "the refusals are counted as 4xx: {metrics}");
    s.assert_still_serving();
}

#[test]
fn a_lowercase_method_is_refused_on_the_outbound() {
    let service = echo_service();
    let pair = SidecarPair::spec(
        "spiffe://example.org/ns/prod/sa/web",
        "spiffe://example.org/ns/prod/sa/api",
        service,
    )
    .start();
    for flags in [
        &["-X", "delete"][..],
        &["--http2-prior-knowledge", "-X", "delete"],
    ] {
        let (status, body) = curl_http(pair.a_addr, "/public/a", flags);
        assert_eq!(status, 400, "{flags:?}: {body}");
        assert_eq!(reason(&body).as_deref(), Some("method_not_uppercase"));
    }
    let (status, body) = curl_http(pair.a_addr, "/public/a", &["-X", "DELETE"]);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn policy_explain_says_a_lowercase_method_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "policy.toml", POLICY);
    let explain = |method: &str| {
        let out = moat(&[
            "policy",
            "explain",
            path_str(&file),
            "--peer",
            "spiffe://example.org/ns/prod/sa/web",
            "--method",
            method,
            "--path",
            "/public/a",
        ]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let lower = explain("delete");
    assert_eq!(
        lower.lines().find(|l| l.starts_with("decision:")),
        Some(
            "decision: refused 400 (method_not_uppercase): methods are case-sensitive, and the proxy refuses \"delete\" before any route is tried; as DELETE:"
        ),
        "{lower}"
    );
    let upper = explain("DELETE");
    assert!(
        upper.contains("decision: deny 403 (explicit_deny)"),
        "{upper}"
    );
    assert!(!upper.contains("refused 400"), "{upper}");
}

/// Identity header names as a CGI/WSGI server would merge them.
fn forged_names(headers: &Value) -> Vec<String> {
    headers
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| {
            let dashed = k.replace('_', "-");
            k.contains('_') && (dashed == "x-moat-peer-id" || dashed == "x-forwarded-client-cert")
        })
        .cloned()
        .collect()
}

#[test]
fn identity_headers_spelled_with_underscores_never_reach_the_service() {
    let s = sidecar("", "");
    let forged_id = format!("x_moat_peer_id: {FORGED}");
    let forged_xfcc = format!("x_forwarded_client_cert: URI={FORGED}");
    let mixed = format!("x-moat_peer-id: {FORGED}");
    let headers = [
        "-H",
        forged_id.as_str(),
        "-H",
        forged_xfcc.as_str(),
        "-H",
        mixed.as_str(),
        "-H",
        "x_other_header: kept",
    ];
    for version in ["--http1.1", "--http2"] {
        let mut args = vec![version];
        args.extend(headers);
        let (status, body) = curl(s.inbound, "/", Some(&s.client), &args);
        assert_eq!(status, 200, "{version}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            forged_names(&v["headers"]),
            Vec::<String>::new(),
            "{version}: {body}"
        );
        assert_eq!(v["headers"]["x-moat-peer-id"], CLIENT_ID, "{body}");
        assert_eq!(v["headers"]["x_other_header"], "kept", "{body}");
    }
    // Through a pair: the outbound drops them too, and B sets the real one.
    let pair = SidecarPair::spec(
        "spiffe://example.org/ns/prod/sa/web",
        "spiffe://example.org/ns/prod/sa/api",
        echo_service(),
    )
    .start();
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let mut args = vec![version];
        args.extend(headers);
        let (status, body) = curl_http(pair.a_addr, "/", &args);
        assert_eq!(status, 200, "{version}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            forged_names(&v["headers"]),
            Vec::<String>::new(),
            "{version}: {body}"
        );
        assert_eq!(
            v["headers"]["x-moat-peer-id"], "spiffe://example.org/ns/prod/sa/web",
            "{body}"
        );
    }
}

#[test]
fn a_malformed_host_is_refused_before_a_host_scoped_route() {
    let mut s = policed();
    for host in [
        "internal.svc:abc",
        "user@internal.svc",
        "internal.svc:443:80",
        "internal.svc/x",
        "internal.svc?x",
        "internal.svc#x",
        "internal.svc:-1",
        "internal.svc:",
        "internal%2esvc",
    ] {
        refused_raw(
            &s,
            &format!("GET /internal/a HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"),
            "invalid_host",
            host,
        );
    }
    // HTTP/2 `:authority`, with curl.
    let (status, body) = curl(
        s.inbound,
        "/internal/a",
        Some(&s.client),
        &["--http2", "-H", "host: internal.svc:abc"],
    );
    assert_eq!(status, 400, "{body}");
    // The well-formed host is the policy's: denied by its route.
    let text = raw_http1(
        &s,
        b"GET /internal/a HTTP/1.1\r\nhost: internal.svc:443\r\nconnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    assert_eq!(statuses(&text), vec![403], "{text}");
    s.assert_still_serving();
}

#[test]
fn an_http11_request_without_host_is_refused() {
    let mut s = policed();
    // RFC 9112 §3.2: 400 on HTTP/1.1; HTTP/1.0 without Host is still served.
    let text = raw_http1(
        &s,
        b"GET /public/a HTTP/1.1\r\nconnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    assert_eq!(statuses(&text), vec![400], "{text}");
    assert_eq!(reason(&text).as_deref(), Some("missing_host"), "{text}");
    let text = raw_http1(
        &s,
        b"GET /public/a HTTP/1.0\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
        "{text}"
    );
    s.assert_still_serving();
}

#[test]
fn the_outbound_refuses_an_absolute_target_naming_another_host() {
    let pair = SidecarPair::spec(
        "spiffe://example.org/ns/prod/sa/web",
        "spiffe://example.org/ns/prod/sa/api",
        echo_service(),
    )
    .start();
    let (status, body) = curl_http(
        pair.a_addr,
        "/public/a",
        &["--request-target", "http://a/public/a", "-H", "host: b"],
    );
    assert_eq!(status, 400, "{body}");
    assert!(!echoed(&body), "{body}");
    let (status, body) = curl_http(
        pair.a_addr,
        "/public/a",
        &["--request-target", "http://a/public/a", "-H", "host: a"],
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["host"], "a", "{body}");
}

#[test]
fn a_transfer_coding_other_than_chunked_is_refused() {
    let mut s = sidecar("", "");
    for te in [
        "gzip, chunked",
        "identity, chunked",
        "chunked\r\ntransfer-encoding: chunked",
    ] {
        let text = refused_raw(
            &s,
            &format!(
                "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: {te}\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ),
            "unsupported_transfer_encoding",
            te,
        );
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{te}: nothing after it is read: {text}"
        );
    }
    // `chunked` alone, in any case and with spaces, is fine.
    let text = raw_http1(
        &s,
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding:  Chunked \r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        Duration::from_secs(3),
    );
    assert_eq!(statuses(&text), vec![200], "{text}");
    s.assert_still_serving();
}

#[test]
fn a_malformed_chunked_body_is_the_callers_fault() {
    let mut s = sidecar("", "");
    bad_bodies_are_the_callers(
        &mut s,
        "http1",
        &[
            ("size zz", b"zz\r\nabc\r\n0\r\n\r\n"),
            ("size -3", b"-3\r\nabc\r\n0\r\n\r\n"),
            ("size 0x3", b"0x3\r\nabc\r\n0\r\n\r\n"),
            ("19 hex digits", b"1000000000000000000\r\nabc\r\n0\r\n\r\n"),
        ],
    );
}

/// The same toward a service that speaks h2c, declared (`app_protocol =
/// "http2"`) or found by `auto`: hyper's HTTP/2 client resets the stream
/// when the caller's body fails and reported that as its own failure
/// (502 upstream_failed). Still 400 `bad_request_body`, counted 4xx.
#[test]
fn a_malformed_chunked_body_is_the_callers_fault_toward_an_h2c_service() {
    for app in ["http2", "auto"] {
        let mut s = sidecar_forwarding_to(h2c_echo_service(), "", |_| {
            format!("app_protocol = \"{app}\"\n")
        });
        // A well-formed chunked body gets through (and `auto` finds h2c).
        let good = b"POST /good HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let text = raw_http1(&s, good, Duration::from_secs(3));
        assert_eq!(statuses(&text), vec![200], "{app}: {text}");
        assert!(text.contains("\"body_len\":3"), "{app}: {text}");
        bad_bodies_are_the_callers(
            &mut s,
            app,
            &[
                ("size zz", b"zz\r\nabc\r\n0\r\n\r\n"),
                ("size -3", b"-3\r\nabc\r\n0\r\n\r\n"),
                (
                    "a good chunk, then size 0x3",
                    b"3\r\nabc\r\n0x3\r\nabc\r\n0\r\n\r\n",
                ),
            ],
        );
    }
}

/// Sends each chunked body (`what`, the chunks after the head) and checks
/// that it is answered 400 `bad_request_body`, counted 4xx and never 5xx,
/// logged as the caller's and not as a forwarding failure, and that the
/// sidecar still serves.
fn bad_bodies_are_the_callers(s: &mut Sidecar, app: &str, bodies: &[(&str, &[u8])]) {
    for (what, chunks) in bodies {
        let mut req = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(chunks);
        let text = raw_http1(s, &req, Duration::from_secs(3));
        assert_eq!(statuses(&text), vec![400], "{app}, {what}: {text}");
        assert_eq!(
            reason(&text).as_deref(),
            Some("bad_request_body"),
            "{app}, {what}: {text}"
        );
    }
    let metrics = s.scrape();
    let counted = |class| {
        metric(
            &metrics,
            "moat_requests_total",
            &[("listener", "api"), ("status", class)],
        )
    };
    assert_eq!(counted("5xx"), 0.0, "{app}: not the service's: {metrics}");
    assert!(
        counted("4xx") >= bodies.len() as f64,
        "{app}: the caller's: {metrics}"
    );
    wait_for_logs(
        &s.proxy,
        "request body from the caller failed",
        bodies.len(),
    );
    assert_eq!(
        count_logs(&s.proxy, "forwarding failed"),
        0,
        "{app}: not blamed on the service"
    );
    s.assert_still_serving();
}

/// On a listener with a policy, a request the checks refuse before the
/// policy is a denial like `method_override`: `deny` with the check's
/// reason on the access log line, in `moat_authz_decisions_total` and in
/// `moat_requests_total` (never `none`, which is for no policy at all).
#[test]
fn request_check_refusals_are_denials_with_their_reason() {
    let mut s = policed();
    let cases = [
        (
            "delete /public/a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            "method_not_uppercase",
        ),
        (
            "GET /public/a HTTP/1.1\r\nhost: user@x\r\nconnection: close\r\n\r\n",
            "invalid_host",
        ),
        (
            "GET /public/a HTTP/1.1\r\nconnection: close\r\n\r\n",
            "missing_host",
        ),
        (
            "POST /public/a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "unsupported_transfer_encoding",
        ),
    ];
    for (request, why) in cases {
        refused_raw(&s, request, why, why);
        let line = s.proxy.wait_for_log(Duration::from_secs(5), |v| {
            v["message"] == "access" && v["reason"] == why
        });
        assert_eq!(
            (&line["decision"], &line["route"], &line["status"]),
            (&Value::from("deny"), &Value::from("-"), &Value::from(400)),
            "{line}"
        );
    }
    let metrics = s.scrape();
    for (_, why) in cases {
        let denied = metric(
            &metrics,
            "moat_authz_decisions_total",
            &[("listener", "api"), ("decision", "deny"), ("reason", why)],
        );
        assert_eq!(denied, 1.0, "{why} counted as a denial: {metrics}");
    }
    let none = metric(
        &metrics,
        "moat_requests_total",
        &[("listener", "api"), ("decision", "none")],
    );
    assert_eq!(
        none, 0.0,
        "a listener with a policy decides every request: {metrics}"
    );
    s.assert_still_serving();
}
