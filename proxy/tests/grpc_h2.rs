//! gRPC-shaped traffic (HTTP/2, `te: trailers`, response trailers) through a
//! sidecar pair, in process: h2c client → outbound sidecar → mutual TLS h2 →
//! inbound sidecar → h2c service. Real sockets and real TLS; certificates
//! from rcgen at test time. (The end-to-end tests of the `moat` binary live
//! in the workspace's `tests/`; this one needs an HTTP/2 server and client
//! for the service side, which hyper gives here.)

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_proxy::Proxy;
use moat_proxy::config::Config;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};

const A: &str = "spiffe://example.org/ns/prod/sa/web";
const B: &str = "spiffe://example.org/ns/prod/sa/ledger";

/// Data then trailers, as a gRPC server answers.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// Writes a root, and leaves for A and B, to `dir`.
fn certificates(dir: &Path) {
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root_cert = root.self_signed(&root_key).unwrap();
    std::fs::write(dir.join("bundle.pem"), root_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::new(root, root_key);
    for (name, id) in [("a", A), ("b", B)] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// An h2c service: echoes the request body, reports the peer ID it was
/// given and whether `te: trailers` survived, and ends with gRPC trailers.
async fn grpc_like_service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let peer = req.headers().get("x-moat-peer-id").cloned();
                    let te = req.headers().get("te").cloned();
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    trailers.insert("grpc-message", HeaderValue::from_static("fine"));
                    let mut resp = Response::new(WithTrailers {
                        data: Some(body),
                        trailers: Some(trailers),
                    });
                    resp.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/grpc"));
                    if let Some(p) = peer {
                        resp.headers_mut().insert("x-seen-peer", p);
                    }
                    if let Some(t) = te {
                        resp.headers_mut().insert("x-seen-te", t);
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn start(dir: &Path, name: &str, text: String) -> Proxy {
    let path = dir.join(format!("{name}.toml"));
    let config = Config::parse(&path, &text).unwrap();
    Proxy::bind(config, Default::default()).await.unwrap()
}

fn identity(name: &str) -> String {
    format!(
        "[identity]\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\nbundle = \"bundle.pem\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    )
}

/// Sidecar B (inbound `in` in front of `service`, `inbound_extra` in its
/// listener) and sidecar A (outbound `out` to B), serving; A's address.
async fn pair(dir: &Path, service: SocketAddr, inbound_extra: &str) -> SocketAddr {
    let b = start(
        dir,
        "b",
        format!(
            "{}[[inbound]]\nname = \"in\"\nlisten = \"127.0.0.1:0\"\nforward = \"{service}\"\n{inbound_extra}\n",
            identity("b")
        ),
    )
    .await;
    let b_addr = b.local_addr("in").unwrap();
    tokio::spawn(b.serve(std::future::pending()));
    let a = start(
        dir,
        "a",
        format!(
            "{}[[outbound]]\nname = \"out\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{b_addr}\"\npeer = \"{B}\"\n",
            identity("a")
        ),
    )
    .await;
    let a_addr = a.local_addr("out").unwrap();
    tokio::spawn(a.serve(std::future::pending()));
    a_addr
}

/// One h2c connection from the "application" to A.
async fn h2c(a_addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(a_addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn grpc_call(a_addr: SocketAddr, payload: Bytes) -> Request<Full<Bytes>> {
    Request::post(format!("http://{a_addr}/ledger.Ledger/Post"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(payload))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2_passes_trailers_through_a_sidecar_pair() {
    moat_ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let service = grpc_like_service().await;
    let a_addr = pair(dir.path(), service, "app_protocol = \"grpc\"").await;

    // One h2c connection from the "application", many concurrent streams.
    let sender = h2c(a_addr).await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut sender = sender.clone();
        calls.push(tokio::spawn(async move {
            let payload = Bytes::from(format!("message {i}"));
            let req = grpc_call(a_addr, payload.clone());
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert_eq!(
                resp.headers()["x-seen-peer"],
                A,
                "the service saw A's verified ID"
            );
            assert_eq!(
                resp.headers()["x-seen-te"],
                "trailers",
                "te: trailers reached the service"
            );
            let collected = resp.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().expect("trailers came back");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["grpc-message"], "fine");
            assert_eq!(collected.to_bytes(), payload);
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
}

/// `app_protocol = "auto"` finds out that the service speaks h2c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_service_is_found_by_the_auto_probe() {
    moat_ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let service = grpc_like_service().await;
    let a_addr = pair(dir.path(), service, "app_protocol = \"auto\"").await;
    let mut sender = h2c(a_addr).await;
    for i in 0..3 {
        let payload = Bytes::from(format!("auto {i}"));
        let resp = sender
            .send_request(grpc_call(a_addr, payload.clone()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), payload);
    }
}

/// Without `app_protocol`, the service is spoken to in HTTP/1.1, and a gRPC
/// call gets a 502 that names the setting instead of a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_to_a_service_declared_http1_names_the_setting() {
    moat_ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let service = grpc_like_service().await;
    let a_addr = pair(dir.path(), service, "").await;
    let mut sender = h2c(a_addr).await;
    let resp = sender
        .send_request(grpc_call(a_addr, Bytes::from_static(b"x")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.headers()["grpc-status"],
        "14",
        "UNAVAILABLE, for gRPC clients"
    );
    assert!(
        resp.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .contains("app_protocol")
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["reason"], "app_protocol_mismatch", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("app_protocol = \"grpc\""),
        "{body}"
    );
}
