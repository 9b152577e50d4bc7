//! What a real app's requests meet through moat, with curl as the client:
//! the version spoken to the service follows the service (never the
//! caller), header limits are the documented ones on both sides and both
//! versions, an over-limit response header fails its own request and no
//! other stream on the shared sidecar-to-sidecar connection, a HEAD
//! answered with a body over h2c is still a HEAD answer, `Expect:
//! 100-continue` is answered by the service, and a refused peer is logged
//! as the identity it presented.

use crate::support;
use crate::support::proxy as proxy_support;

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::http::{HeaderName, HeaderValue};
use hyper::{Request, Response};
use proxy_support::*;
use serde_json::Value;
use support::{echo_service, path_str, tool};

const A: &str = "spiffe://example.org/ns/prod/sa/web";
const B: &str = "spiffe://example.org/ns/prod/sa/api";

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// What a test service speaks.
#[derive(Clone, Copy, PartialEq)]
enum Speaks {
    Http1,
    H2c,
    /// Both, told apart by the first bytes.
    Both,
}

/// A service that speaks `speaks`:
/// - `/headers/N`: N response header fields `x-h-I`;
/// - `/big/N`: one response header of N bytes;
/// - `/sse`: an event every 100 ms for a minute;
/// - `/head`: a body on every method, HEAD included (hyper's HTTP/2 server
///   sends it on HEAD);
/// - `/trailers/N`: `ok`, then a trailer of N bytes;
/// - anything else: JSON with the version, path, number of request header
///   fields and body length it saw.
fn service(speaks: Speaks) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let svc = hyper::service::service_fn(answer);
                    let exec = hyper_util::rt::TokioExecutor::new();
                    let mut b = hyper_util::server::conn::auto::Builder::new(exec);
                    b.http1().max_headers(1000);
                    let b = match speaks {
                        Speaks::Http1 => b.http1_only(),
                        Speaks::H2c => b.http2_only(),
                        Speaks::Both => b,
                    };
                    let _ = b.serve_connection(io, svc).await;
                });
            }
        });
    });
    addr
}

async fn answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let n = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|n| n.parse::<usize>().ok())
    };
    let mut resp = Response::new(full("ok"));
    if let Some(count) = n("/headers/") {
        for i in 0..count {
            resp.headers_mut().insert(
                HeaderName::from_bytes(format!("x-h-{i}").as_bytes()).unwrap(),
                HeaderValue::from_str(&format!("v{i}")).unwrap(),
            );
        }
    } else if let Some(size) = n("/big/") {
        resp.headers_mut()
            .insert("x-big", HeaderValue::from_str(&"a".repeat(size)).unwrap());
    } else if path == "/sse" {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for i in 0..600 {
                if tx
                    .send(Bytes::from(format!("data: tick {i}\n\n")))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        resp = Response::new(BodyExt::boxed(Events(rx)));
        resp.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
    } else if let Some(size) = n("/trailers/") {
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("x-big", HeaderValue::from_str(&"t".repeat(size)).unwrap());
        resp = Response::new(BodyExt::boxed(WithTrailers(
            Some(Bytes::from_static(b"ok")),
            Some(trailers),
        )));
    } else if path == "/head" {
        resp = Response::new(full("hello from a HEAD"));
        resp.headers_mut()
            .insert("content-length", HeaderValue::from_static("17"));
    } else {
        let version = format!("{:?}", req.version());
        let fields = req.headers().len();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::json!({
            "version": version,
            "path": path,
            "fields": fields,
            "body_len": body.len(),
        });
        resp = Response::new(full(json.to_string()));
    }
    Ok(resp)
}

/// Data, then trailers.
struct WithTrailers(Option<Bytes>, Option<hyper::HeaderMap>);

impl hyper::body::Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.0.take() {
            Some(data) => Frame::data(data),
            None => match self.1.take() {
                Some(t) => Frame::trailers(t),
                None => return std::task::Poll::Ready(None),
            },
        };
        std::task::Poll::Ready(Some(Ok(frame)))
    }
}

/// Server-sent events from a channel, as a body.
struct Events(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|e| e.map(|e| Ok(Frame::data(e))))
    }
}

/// B: inbound `api` in front of `service` (`b_extra` in its listener); A:
/// outbound `out` to B, expecting `expect` as the peer.
fn pair_expecting(service: SocketAddr, b_extra: &str, expect: &str) -> SidecarPair {
    SidecarPair::spec(A, B, service)
        .b_extra(b_extra)
        .expect_peer(expect)
        .start()
}

fn pair(service: SocketAddr, b_extra: &str) -> SidecarPair {
    pair_expecting(service, b_extra, B)
}

/// How an app reaches its sidecar: HTTP/1.1 or h2c (plaintext, outbound).
const APP_VERSIONS: [&str; 2] = ["--http1.1", "--http2-prior-knowledge"];

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

#[test]
fn plain_curl_over_tls_reaches_an_http1_only_service_by_default() {
    let p = pair(echo_service(), "");
    let client = p.client();
    // No version flag: curl offers h2 by ALPN and the inbound takes it; the
    // service (a hand-written HTTP/1.1 server) is spoken to in HTTP/1.1.
    let out = curl_raw(
        p.b_addr,
        "/plain",
        Some(&client),
        &["-o", "/dev/null", "-w", "%{http_version} %{http_code}"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
    // An h2c app behind an outbound, through the pair, to the same service.
    let (status, body) = curl_http(p.a_addr, "/via-pair", &["--http2-prior-knowledge"]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["path"], "/via-pair");
}

#[test]
fn a_service_declared_http2_gets_h2c_whatever_the_caller_speaks() {
    let h2c_only = service(Speaks::H2c);
    let p = pair(h2c_only, "app_protocol = \"http2\"");
    for flag in APP_VERSIONS {
        let (status, body) = curl_http(p.a_addr, "/v", &[flag]);
        assert_eq!(status, 200, "{flag}: {body}");
        assert_eq!(json(&body)["version"], "HTTP/2.0", "{flag}");
    }
    let client = p.client();
    let (status, body) = curl(p.b_addr, "/v", Some(&client), &["--http1.1"]);
    assert_eq!(
        (status, json(&body)["version"].clone()),
        (200, "HTTP/2.0".into())
    );
}

#[test]
fn auto_probes_the_service_instead_of_following_the_caller() {
    for (speaks, want) in [(Speaks::H2c, "HTTP/2.0"), (Speaks::Http1, "HTTP/1.1")] {
        let svc = service(speaks);
        let mut p = pair(svc, "app_protocol = \"auto\"");
        for flag in APP_VERSIONS {
            let (status, body) = curl_http(p.a_addr, "/v", &[flag]);
            assert_eq!(status, 200, "{flag}: {body}");
            assert_eq!(json(&body)["version"], want, "{flag}");
        }
        let found = if speaks == Speaks::H2c {
            "h2c"
        } else {
            "HTTP/1.1"
        };
        p.b.wait_for_log(Duration::from_secs(5), |v| {
            v["message"] == "app protocol found by probe" && v["speaks"] == found
        });
    }
}

#[test]
fn forward_http_still_works_with_a_deprecation_warning() {
    let mut p = pair(service(Speaks::H2c), "forward_http = \"http2\"");
    let (status, body) = curl_http(p.a_addr, "/v", &["--http1.1"]);
    assert_eq!(
        (status, json(&body)["version"].clone()),
        (200, "HTTP/2.0".into())
    );
    p.b.wait_for_log(Duration::from_secs(5), |v| {
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("forward_http is deprecated"))
    });
}

/// Response heads of 101, 150 and 200 fields pass, whichever version the
/// app and the service speak to their sidecars; 300 fields are over the
/// count limit (256) and fail that request alone.
#[test]
fn response_header_fields_up_to_the_documented_count_pass() {
    for (speaks, app_protocol) in [
        (Speaks::Both, ""),
        (Speaks::H2c, "app_protocol = \"http2\""),
    ] {
        let p = pair(service(speaks), app_protocol);
        for flag in APP_VERSIONS {
            for n in [101, 150, 200] {
                let out = tool(
                    "curl",
                    &[
                        "-sS",
                        flag,
                        "-D",
                        "-",
                        "-o",
                        "/dev/null",
                        "--max-time",
                        "10",
                        &format!("http://{}/headers/{n}", p.a_addr),
                    ],
                );
                let head = String::from_utf8_lossy(&out.stdout);
                assert!(
                    head.lines().next().is_some_and(|l| l.contains(" 200")),
                    "{n} fields, {flag}, {app_protocol:?}: {head}"
                );
                let got = head.lines().filter(|l| l.starts_with("x-h-")).count();
                assert_eq!(got, n, "{flag} {app_protocol:?}");
            }
            let (status, body) = curl_http(p.a_addr, "/headers/300", &[flag]);
            assert_eq!(status, 502, "{flag} {app_protocol:?}: {body}");
            assert_eq!(json(&body)["reason"], "response_headers_too_large");
        }
    }
}

/// 150 request header fields under 16 KiB pass over both versions (hyper's
/// HTTP/1.1 default refused more than 100); a 20 KiB target is 414, not 431.
#[test]
fn request_header_fields_and_targets_get_the_documented_limits() {
    let p = pair(echo_service(), "");
    let client = p.client();
    let dir = tempfile::tempdir().unwrap();
    let headers: String = (0..150)
        .map(|i| format!("x-field-{i:03}: {}\n", "v".repeat(60)))
        .collect();
    let file = write(dir.path(), "headers.txt", &headers);
    let at_file = format!("@{}", path_str(&file));
    for flag in APP_VERSIONS {
        let (status, body) = curl_http(p.a_addr, "/many", &[flag, "-H", &at_file]);
        assert_eq!(status, 200, "{flag}: {body}");
        let seen = json(&body)["headers"].as_object().unwrap().len();
        assert!(seen > 150, "{flag}: the service saw {seen} fields");
    }
    for flag in ["--http1.1", "--http2"] {
        let (status, body) = curl(p.b_addr, "/many", Some(&client), &[flag, "-H", &at_file]);
        assert_eq!(status, 200, "inbound {flag}: {body}");
    }
    let long = format!("/{}", "u".repeat(20 * 1024));
    for flag in APP_VERSIONS {
        let (status, body) = curl_http(p.a_addr, &long, &[flag]);
        assert_eq!(status, 414, "outbound {flag}: {body}");
        assert_eq!(json(&body)["reason"], "uri_too_long");
    }
    for flag in ["--http1.1", "--http2"] {
        let (status, _) = curl(p.b_addr, &long, Some(&client), &[flag]);
        assert_eq!(status, 414, "inbound {flag}");
    }
}

/// Reads an event stream through curl; each `data:` line on a channel.
struct EventReader {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl EventReader {
    fn start(url: &str) -> Self {
        let mut child = Command::new("curl")
            .args([
                "-sS",
                "-N",
                "--http2-prior-knowledge",
                "--max-time",
                "60",
                url,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("data:") && tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    fn next(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the event stream is still flowing")
    }
}

impl Drop for EventReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The app speaks h2c to its outbound, so every request rides one HTTP/2
/// connection to the peer. An over-limit response header (17 KiB, and 64
/// KiB: a connection error for a parser with a 16 KiB limit) is a 502 for
/// its own request; an event stream on the same connection goes on.
#[test]
fn an_oversized_response_header_fails_its_request_and_no_other_stream() {
    for (speaks, app_protocol) in [
        (Speaks::Http1, ""),
        (Speaks::H2c, "app_protocol = \"http2\""),
    ] {
        let mut p = pair(service(speaks), app_protocol);
        let events = EventReader::start(&format!("http://{}/sse", p.a_addr));
        events.next();
        // The largest first: before the fix it tore the connection down.
        for size in [64 * 1024, 32 * 1024, 17 * 1024] {
            let (status, body) = curl_http(
                p.a_addr,
                &format!("/big/{size}"),
                &["--http2-prior-knowledge"],
            );
            // Still flowing, on the same connection.
            for _ in 0..2 {
                events.next();
            }
            assert_eq!(status, 502, "{size} bytes {app_protocol:?}: {body}");
            assert_eq!(
                json(&body)["reason"],
                "response_headers_too_large",
                "{body}"
            );
        }
        let (status, _) = curl_http(p.a_addr, "/after", &["--http2-prior-knowledge"]);
        assert_eq!(status, 200);
        if speaks == Speaks::H2c {
            // Trailers are held to the same limits: over them, that one
            // stream fails: reset when its status had already reached the
            // caller, a 502 when the reset overtook the head on the way.
            let trailers = |size: usize| {
                let url = format!("http://{}/trailers/{size}", p.a_addr);
                tool(
                    "curl",
                    &["-sS", "--http2-prior-knowledge", "--max-time", "10", &url],
                )
            };
            let small = trailers(100);
            assert!(small.status.success(), "{small:?}");
            assert_eq!(String::from_utf8_lossy(&small.stdout), "ok");
            let big = trailers(64 * 1024);
            let body = String::from_utf8_lossy(&big.stdout);
            assert!(
                !big.status.success() || body.contains("\"upstream_failed\""),
                "the stream with 64 KiB of trailers fails: {big:?}"
            );
            for _ in 0..2 {
                events.next();
            }
        }
        p.b.wait_for_log(Duration::from_secs(5), |v| {
            v["message"] == "forwarding failed"
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("response headers too large"))
        });
    }
}

/// hyper's HTTP/2 server sends a body on HEAD, which HTTP/2 forbids; the
/// sidecar drops it and answers the HEAD.
#[test]
fn head_to_an_h2c_service_that_sends_a_body_is_answered() {
    let p = pair(service(Speaks::H2c), "app_protocol = \"http2\"");
    let client = p.client();
    for flag in ["--http1.1", "--http2"] {
        let out = curl_raw(p.b_addr, "/head", Some(&client), &[flag, "-I"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(" 200"), "{flag}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("content-length: 17"),
            "{flag}: {text}"
        );
    }
    for flag in APP_VERSIONS {
        let (status, body) = curl_http(p.a_addr, "/head", &[flag, "-I"]);
        assert_eq!(status, 200, "{flag}: {body}");
    }
}

/// What `/refuse` saw: body bytes that arrived although it refused them,
/// and how many of its connections are over (closed, or silent for 5 s).
#[derive(Default)]
struct Refused {
    bytes: AtomicUsize,
    done: AtomicUsize,
}

/// A raw HTTP/1.1 service for `Expect: 100-continue`: `/refuse` answers 413
/// without reading the body (counting what arrives anyway), `/accept` sends
/// its own 100 and reads the body.
fn continue_service() -> (SocketAddr, Arc<Refused>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(Refused::default());
    let count = refused.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let count = count.clone();
            std::thread::spawn(move || serve_continue(s, &count));
        }
    });
    (addr, refused)
}

fn serve_continue(s: std::net::TcpStream, refused: &Refused) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(s);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.to_ascii_lowercase());
    }
    let len: usize = head
        .iter()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let expects = head.iter().any(|l| l.starts_with("expect: 100-continue"));
    if head[0].contains("/refuse") {
        let _ = reader.get_mut().write_all(
            b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n",
        );
        // Whatever comes now was sent although the service refused it.
        let mut buf = [0u8; 65536];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => {
                    refused.done.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Ok(n) => {
                    refused.bytes.fetch_add(n, Ordering::SeqCst);
                }
            }
        }
    }
    if expects {
        let _ = reader.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let mut body = vec![0u8; len];
    let ok = reader.read_exact(&mut body).is_ok();
    let answer = format!("got {} expect={expects}", if ok { len } else { 0 });
    let _ = reader.get_mut().write_all(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
            answer.len()
        )
        .as_bytes(),
    );
}

/// curl's upload of `file` with `Expect: 100-continue`: status, bytes it
/// uploaded, body.
fn upload(url: &str, file: &str, extra: &[&str]) -> (u16, u64, String) {
    let mut args = vec![
        "-sS",
        "--max-time",
        "20",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        file,
        "-w",
        "\n%{http_code} %{size_upload}",
    ];
    args.extend(extra);
    args.push(url);
    let out = tool("curl", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    let (code, up) = tail.split_once(' ').unwrap();
    let code: u16 = code.parse().unwrap();
    let body = if code == 0 {
        String::from_utf8_lossy(&out.stderr).into_owned()
    } else {
        body.to_owned()
    };
    (code, up.parse::<f64>().unwrap() as u64, body)
}

/// nghttp's POST of `file` with `expect: 100-continue` (it sends the body
/// at once, as HTTP/2 clients may): status and everything it printed.
fn nghttp_upload(url: &str, file: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec!["-v", "-H", "expect: 100-continue", "-d", file];
    args.extend(extra);
    args.push(url);
    let out = tool("nghttp", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.split(":status: ").nth(1))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// True when nghttp is here (`support::require`).
fn have_nghttp() -> bool {
    support::require("nghttp")
}

/// A service that refuses an upload without reading it gets (almost)
/// nothing, through the pair and straight to the inbound; one that sends
/// its own 100 gets the whole body. HTTP/1.1 callers (curl) are not even
/// invited to send; HTTP/2 callers (nghttp, which sends at once) get the
/// service's answer and the sidecar does not pass their body on.
#[test]
fn expect_100_continue_is_answered_by_the_service_through_the_pair() {
    const SIZE: usize = 5 << 20;
    const ALMOST_NOTHING: usize = 64 * 1024;
    let (svc, refused) = continue_service();
    // Neither sidecar nor curl gives up on the service's answer after their
    // default second (the RFC's fallback, which a loaded machine can reach
    // before the refusal comes back): the test is about who decides.
    let p = SidecarPair::spec(A, B, svc)
        .common("[limits]\nexpect_continue_timeout = \"30s\"\n")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "5mb.bin", &"x".repeat(SIZE));
    let data_arg = format!("@{}", path_str(&data));
    let client = p.client();
    let tls = [
        "--expect100-timeout",
        "30",
        "-k",
        "--http1.1",
        "--cert",
        path_str(&client.cert),
        "--key",
        path_str(&client.key),
    ];
    let through_pair = format!("http://{}", p.a_addr);
    let to_inbound = format!("https://{}", p.b_addr);
    let refusals = std::cell::Cell::new(0);
    let received_after = |what: &str| {
        // The service counts until the sidecar closes the connection.
        refusals.set(refusals.get() + 1);
        eventually(
            Duration::from_secs(30),
            &format!("{what}: the refused connection to end"),
            || refused.done.load(Ordering::SeqCst) >= refusals.get(),
        );
        let got = refused.bytes.swap(0, Ordering::SeqCst);
        assert!(
            got < ALMOST_NOTHING,
            "{what}: the service received {got} bytes it refused"
        );
    };
    let h1: [(&str, &str, &[&str]); 2] = [
        (
            "pair, HTTP/1.1",
            &through_pair,
            &["--expect100-timeout", "30", "--http1.1"],
        ),
        ("inbound, HTTP/1.1", &to_inbound, &tls),
    ];
    for (what, base, flags) in h1 {
        let (status, sent, body) = upload(&format!("{base}/refuse"), &data_arg, flags);
        assert_eq!(status, 413, "{what}: {body}");
        assert!(
            sent < ALMOST_NOTHING as u64,
            "{what}: curl uploaded {sent} bytes of a refused body"
        );
        received_after(what);
        let (status, sent, body) = upload(&format!("{base}/accept"), &data_arg, flags);
        assert_eq!(status, 200, "{what}: {body}");
        assert_eq!(sent, SIZE as u64, "{what}");
        assert_eq!(body, format!("got {SIZE} expect=true"), "{what}");
    }
    if !have_nghttp() {
        return;
    }
    let file = path_str(&data);
    let certs = [
        "--cert",
        path_str(&client.cert),
        "--key",
        path_str(&client.key),
    ];
    let h2: [(&str, &str, &[&str]); 2] = [
        ("pair, h2c", &through_pair, &[]),
        ("inbound, HTTP/2", &to_inbound, &certs),
    ];
    for (what, base, flags) in h2 {
        let (status, out) = nghttp_upload(&format!("{base}/refuse"), file, flags);
        assert_eq!(status, 413, "{what}: {out}");
        received_after(what);
        let (status, out) = nghttp_upload(&format!("{base}/accept"), file, flags);
        assert_eq!(status, 200, "{what}: {out}");
        assert!(
            out.contains(&format!("got {SIZE} expect=true")),
            "{what}: {out}"
        );
    }
}

/// The access log names the identity a refused peer presented as `peer`,
/// and the one the configuration expected as `expected_peer`.
#[test]
fn a_refused_peer_is_logged_as_presented() {
    let expected = "spiffe://example.org/ns/prod/sa/payments";
    let mut p = pair_expecting(echo_service(), "", expected);
    let (status, body) = curl_http(p.a_addr, "/pay", &[]);
    assert_eq!(status, 502, "{body}");
    assert_eq!(json(&body)["reason"], "peer_refused");
    let line =
        p.a.wait_for_log(Duration::from_secs(5), |v| v["message"] == "access");
    assert_eq!(line["peer"], B, "{line}");
    assert_eq!(line["expected_peer"], expected, "{line}");
    // An answered request names the peer it reached.
    let mut q = pair(echo_service(), "");
    assert_eq!(curl_http(q.a_addr, "/ok", &[]).0, 200);
    let line =
        q.a.wait_for_log(Duration::from_secs(5), |v| v["message"] == "access");
    assert_eq!(
        (line["peer"].clone(), line["expected_peer"].clone()),
        (B.into(), B.into())
    );
}

/// A peer that was never reached (nothing listens at the upstream) is not
/// named: `peer` is `-`, `expected_peer` the configured one.
#[test]
fn an_unreached_peer_is_logged_as_none() {
    let mut p = pair(echo_service(), "");
    p.b.signal("KILL");
    p.b.wait_exit(Duration::from_secs(5)).expect("B exits");
    let (status, body) = curl_http(p.a_addr, "/pay", &[]);
    assert_eq!(status, 502, "{body}");
    assert_eq!(json(&body)["reason"], "peer_unavailable");
    let line =
        p.a.wait_for_log(Duration::from_secs(5), |v| v["message"] == "access");
    assert_eq!(
        (line["peer"].clone(), line["expected_peer"].clone()),
        ("-".into(), B.into()),
        "{line}"
    );
}

/// Python's `http.server` (`python3 -m http.server`), which answers in
/// HTTP/1.0 and closes: the most common app anyone puts behind a sidecar
/// first. Killed on drop.
struct PythonHttpServer {
    child: std::process::Child,
    addr: SocketAddr,
    _root: tempfile::TempDir,
}

impl PythonHttpServer {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("hello.txt"), "hello\n").unwrap();
        // `python3 -m http.server` takes a port but cannot say which one it
        // bound for 0; the same server class, made here, can.
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import functools, http.server, sys\n\
                 h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n\
                 s = http.server.HTTPServer(('127.0.0.1', 0), h)\n\
                 print(s.server_address[1], flush=True)\n\
                 s.serve_forever()",
                path_str(root.path()),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("http.server's port");
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _root: root,
        }
    }
}

impl Drop for PythonHttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy sends its own HTTP version (RFC 9110 §6.2): an HTTP/1.1 caller
/// of an HTTP/1.0 service gets HTTP/1.1 answers, and keeps its connection
/// to the sidecar for the next request (an HTTP/1.0 answer would end it).
#[test]
fn an_http10_service_is_answered_to_an_http11_caller_in_http11() {
    if !support::require("python3") {
        return;
    }
    let app = PythonHttpServer::start();
    let p = pair(app.addr, "");
    let client = p.client();
    let url = format!("https://{}/hello.txt", p.b_addr);
    let plain = format!("http://{}/hello.txt", p.a_addr);
    for (what, args) in [
        (
            "the inbound, over mutual TLS",
            vec![
                "-sS",
                "-k",
                "-v",
                "-i",
                "--http1.1",
                "--cert",
                path_str(&client.cert),
                "--key",
                path_str(&client.key),
                &url,
                &url,
            ],
        ),
        (
            "the outbound, through the pair",
            vec!["-sS", "-v", "-i", &plain, &plain],
        ),
    ] {
        let out = tool("curl", &args);
        let text = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            text.matches("HTTP/1.1 200 OK\r\n").count(),
            2,
            "{what}: two HTTP/1.1 answers: {text}\n{stderr}"
        );
        assert_eq!(text.matches("hello\n").count(), 2, "{what}: {text}");
        assert!(
            stderr.contains("Re-using existing connection"),
            "{what}: the second request on the first connection: {stderr}"
        );
    }
}
