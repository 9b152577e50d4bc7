//! Shared by the hostile and fault tests: one inbound sidecar in front of
//! the echo service, a raw TLS client that can say things curl will not
//! (garbage certificates, smuggled requests, raw HTTP/2 frames), and the
//! Prometheus scrape of the admin listener.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use rustls::{ClientConnection, SignatureScheme, StreamOwned};

use crate::support::proxy::*;
use crate::support::{Running, TestCa, echo_service};
use moat_proxy::tls::verify::AnyServerCertificate;

pub(crate) const SERVER_ID: &str = "spiffe://example.org/ns/prod/sa/api";
pub(crate) const CLIENT_ID: &str = "spiffe://example.org/ns/prod/sa/web";

/// A CA, the echo service, and a file-mode sidecar with one inbound
/// listener `api` (admitting `spiffe://example.org/ns/prod/*`) and admin.
pub(crate) struct Sidecar {
    pub ca: TestCa,
    pub proxy: Running,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub client: CertFiles,
    pub echo: SocketAddr,
    /// A path the legitimate client may always GET.
    pub alive_path: &'static str,
}

/// `extra` goes at the top level (`[limits]`, `[tls]`), `inbound_extra`
/// into the `[[inbound]]` table (`policy = ...`).
pub(crate) fn sidecar(extra: &str, inbound_extra: &str) -> Sidecar {
    sidecar_with(extra, |_| inbound_extra.to_owned())
}

/// Like [`sidecar`], with `inbound_extra` computed from the CA (to write
/// policy files into its directory).
pub(crate) fn sidecar_with(extra: &str, inbound_extra: impl FnOnce(&TestCa) -> String) -> Sidecar {
    sidecar_forwarding_to(echo_service(), extra, inbound_extra)
}

/// Like [`sidecar_with`], forwarding to the service at `echo`.
pub(crate) fn sidecar_forwarding_to(
    echo: SocketAddr,
    extra: &str,
    inbound_extra: impl FnOnce(&TestCa) -> String,
) -> Sidecar {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let server = issue(&ca, SERVER_ID, "1h", "server");
    let client = issue(&ca, CLIENT_ID, "1h", "client");
    let inbound_extra = inbound_extra(&ca);
    let config = format!(
        "{identity}{ADMIN}{extra}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{echo}\"\nallow_peers = [\"spiffe://example.org/ns/prod/*\"]\n{inbound_extra}\n",
        identity = file_identity(&server, &ca.bundle_file()),
    );
    let path = write(ca.dir.path(), "proxy.toml", &config);
    let (proxy, addrs) = start_proxy(&path, &["api", "admin"]);
    Sidecar {
        ca,
        proxy,
        inbound: addrs[0],
        admin: addrs[1],
        client,
        echo,
        alive_path: "/still-up",
    }
}

impl Sidecar {
    /// A request from the legitimate client still gets through: the proxy
    /// is alive and serving others.
    pub(crate) fn assert_still_serving(&mut self) {
        assert!(
            self.proxy.child.try_wait().unwrap().is_none(),
            "the proxy is still running"
        );
        let (status, body) = curl(
            self.inbound,
            self.alive_path,
            Some(&self.client),
            &["--http1.1"],
        );
        assert_eq!(status, 200, "a legitimate client is still served: {body}");
    }

    /// The current `/metrics` text.
    pub(crate) fn scrape(&self) -> String {
        scrape(self.admin)
    }

    /// A raw TLS connection as the legitimate client.
    pub(crate) fn raw(&self, alpn: &[&[u8]]) -> Tls {
        tls_connect(self.inbound, Some(client_auth(&self.client)), alpn).expect("handshake")
    }
}

/// `/metrics` from an admin listener.
pub(crate) fn scrape(admin: SocketAddr) -> String {
    let (status, body) = curl_http(admin, "/metrics", &[]);
    assert_eq!(status, 200);
    body
}

/// A sample's value (0 when absent: a counter that never moved).
pub(crate) fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    crate::support::metric_samples(text, name, labels)
        .into_iter()
        .filter(|v| !v.is_nan())
        .sum()
}

/// A client certificate chain and key, as rustls wants them.
pub(crate) type ClientAuth = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Reads `files` into a [`ClientAuth`].
pub(crate) fn client_auth(files: &CertFiles) -> ClientAuth {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    (certs, key)
}

/// A TLS stream over a blocking socket.
pub(crate) type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes a TLS 1.3 handshake, presenting `auth` as is
/// (even bytes that are no certificate at all). The server's certificate is
/// not checked: these tests are about what the server accepts.
pub(crate) fn tls_connect(
    addr: SocketAddr,
    auth: Option<ClientAuth>,
    alpn: &[&[u8]],
) -> Result<Tls, std::io::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCertificate::new(provider.clone())));
    let mut config = match auth {
        Some((certs, key)) => {
            let signer = provider.key_provider.load_private_key(key).unwrap();
            let ck = Arc::new(rustls::sign::CertifiedKey::new(certs, signer));
            builder.with_client_cert_resolver(Arc::new(Fixed(ck)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("moat").unwrap())
        .map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = StreamOwned::new(conn, tcp);
    // TLS 1.3: the server's verdict on our certificate arrives after our
    // Finished, so a write-then-read round trip is where a refusal shows.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// Reads until the server closes (or `within` passes); returns what came.
pub(crate) fn read_until_close(tls: &mut Tls, within: Duration) -> (Vec<u8>, bool) {
    tls.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while Instant::now() < deadline {
        match tls.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

/// Sends `bytes` over a fresh raw HTTP/1.1 connection as the legitimate
/// client and returns everything the proxy answered before closing or
/// going quiet for `within`.
pub(crate) fn raw_http1(s: &Sidecar, bytes: &[u8], within: Duration) -> String {
    let mut tls = s.raw(&[b"http/1.1"]);
    let _ = tls.write_all(bytes);
    let _ = tls.flush();
    String::from_utf8_lossy(&read_until_close(&mut tls, within).0).into_owned()
}

/// The status codes of every HTTP/1.1 response in `text`, in order.
pub(crate) fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `openssl s_client` against `addr` with `args`; true if a TLS session
/// was established (the server sent its Finished).
pub(crate) fn openssl_connects(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let target = addr.to_string();
    let mut all = vec!["s_client", "-connect", target.as_str(), "-brief"];
    all.extend(args);
    let out = std::process::Command::new("openssl")
        .args(&all)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text.contains("CONNECTION ESTABLISHED"), text)
}

/// An h2c-only service (HTTP/2 with prior knowledge, on 127.0.0.1:0) that
/// reads each request's whole body, then answers 200 with the echo
/// service's `{"path", "body_len"}` (or 400 if the body failed).
pub(crate) fn h2c_echo_service() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    crate::support::serve_each_connection(|stream| async move {
        let svc =
            hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let path = req.uri().path().to_owned();
                let (status, body) = match req.into_body().collect().await {
                    Ok(b) => (
                        200,
                        serde_json::json!({"path": path, "body_len": b.to_bytes().len()}),
                    ),
                    Err(e) => (400, serde_json::json!({"service_saw": e.to_string()})),
                };
                let mut resp =
                    hyper::Response::new(Full::new(bytes::Bytes::from(body.to_string())));
                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                Ok::<_, std::convert::Infallible>(resp)
            });
        let io = hyper_util::rt::TokioIo::new(stream);
        let b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        let _ = b.http2_only().serve_connection(io, svc).await;
    })
}
