//! One HTTPS request, sent with hyper-util's client over hyper-rustls: the
//! transport of the CA client and of JWKS fetches.
//!
//! The caller brings the whole rustls [`ClientConfig`] (its roots, its client
//! certificate for mutual TLS, resumption turned off), and the connector is
//! built from it for that one request. The client keeps no pool: every
//! exchange opens a connection, verifies the server's current certificate in
//! full and closes it. These calls are rare (issuance, renewal, JWKS
//! refreshes), and a pooled connection would go on trusting a server the
//! current bundle no longer trusts, and go on presenting the client
//! certificate it was opened with after a renewal replaced it.

use std::error::Error as StdError;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{FixedServerNameResolver, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use crate::client::ClientError;

/// The largest response body [`https_request`] reads (chains, bundles and
/// key sets are small).
pub(crate) const MAX_RESPONSE: usize = 1 << 20;

/// One HTTPS request over a fresh connection, for infrequent calls (the CA,
/// JWKS endpoints). The server's certificate is verified for `server_name`
/// (the callers pass the URL's host). The body is read up to 1 MiB; the
/// whole exchange is bounded by `timeout`.
pub async fn https_request(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ClientError> {
    tokio::time::timeout(timeout, request(&config, server_name, req, MAX_RESPONSE))
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

/// [`https_request`] without the time limit, reading up to `max_body` bytes.
pub(crate) async fn request(
    config: &ClientConfig,
    server_name: ServerName<'static>,
    req: Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(StatusCode, Bytes), ClientError> {
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| ClientError::BadUrl(req.uri().to_string()))?;
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(443)
    );
    let mut config = config.clone();
    // hyper-rustls sets ALPN from the versions enabled below (HTTP/1.1 only,
    // which offers none, as the hand-written client did) and refuses a
    // config that already has some.
    config.alpn_protocols.clear();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .with_server_name_resolver(FixedServerNameResolver::new(server_name))
        .enable_http1()
        .wrap_connector(tcp);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let resp = client.request(req).await.map_err(|e| classify(&e, addr))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| ClientError::Http(causes(&*e)))?
        .to_bytes();
    Ok((status, body))
}

/// Says which side failed: the TCP connection, the TLS handshake, or the
/// HTTP exchange after it.
fn classify(err: &hyper_util::client::legacy::Error, addr: String) -> ClientError {
    if !err.is_connect() {
        return ClientError::Http(causes(err));
    }
    // hyper-rustls reports a failed handshake as an `io::Error` wrapping
    // tokio-rustls' own `io::Error` (which carries the `rustls::Error`);
    // hyper-util's TCP connector reports its own error type, around the
    // socket's `io::Error`.
    let handshake = err
        .source()
        .and_then(|e| e.downcast_ref::<io::Error>())
        .and_then(io::Error::get_ref)
        .and_then(|e| e.downcast_ref::<io::Error>());
    if let Some(tls) = handshake {
        let kind = tls.kind();
        return ClientError::Tls(
            match tls
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
            {
                Some(e) => io::Error::new(kind, e.clone()),
                None => io::Error::new(kind, tls.to_string()),
            },
        );
    }
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return ClientError::Connect {
                addr,
                source: io::Error::new(io.kind(), io.to_string()),
            };
        }
        source = e.source();
    }
    ClientError::Connect {
        addr,
        source: io::Error::other(causes(err)),
    }
}

/// An error and its causes on one line, each said once.
fn causes(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let msg = e.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = e.source();
    }
    out
}
