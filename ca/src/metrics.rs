//! The CA's Prometheus metrics and its plain-HTTP admin listener
//! (`/metrics`, `/live`, `/ready`), loopback by default.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `moat_ca_issuances_total` | `credential`, `result` | certificates issued (`ok`) or refused (a reason code) |
//! | `moat_ca_token_replays_total` | | join tokens refused because they were already used |
//! | `moat_ca_bundle_roots` | | roots in the trust bundle |
//! | `moat_ca_root_expiry_timestamp_seconds` | `root`, `state` | when each root expires |

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Labels of one issuance outcome.
type IssuanceLabels = [(&'static str, &'static str); 2];
/// Labels of one root.
type RootLabels = [(&'static str, String); 2];

/// Every metric the CA exports.
pub struct CaMetrics {
    registry: Registry,
    issuances: Family<IssuanceLabels, Counter>,
    replays: Counter,
    bundle_roots: Gauge,
    root_expiry: Family<RootLabels, Gauge>,
}

impl CaMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let issuances = Family::<IssuanceLabels, Counter>::default();
        let replays = Counter::default();
        let bundle_roots = Gauge::default();
        let root_expiry = Family::<RootLabels, Gauge>::default();
        registry.register(
            "moat_ca_issuances",
            "Certificates issued (result=ok) or refused (result=reason), by credential kind",
            issuances.clone(),
        );
        registry.register(
            "moat_ca_token_replays",
            "Join tokens refused because they were already used",
            replays.clone(),
        );
        registry.register(
            "moat_ca_bundle_roots",
            "Roots in the trust bundle",
            bundle_roots.clone(),
        );
        registry.register(
            "moat_ca_root_expiry_timestamp_seconds",
            "When each root certificate expires (Unix time)",
            root_expiry.clone(),
        );
        Self {
            registry,
            issuances,
            replays,
            bundle_roots,
            root_expiry,
        }
    }

    /// Counts one issuance outcome.
    pub fn issuance(&self, credential: &'static str, result: &'static str) {
        self.issuances
            .get_or_create(&[("credential", credential), ("result", result)])
            .inc();
        if result == "token_replayed" {
            self.replays.inc();
        }
    }

    /// Records the roots now in the bundle.
    pub fn roots(&self, roots: &[crate::store::RootRecord]) {
        self.root_expiry.clear();
        let mut in_bundle = 0;
        for root in roots.iter().filter(|r| r.state.in_bundle()) {
            in_bundle += 1;
            self.root_expiry
                .get_or_create(&[
                    ("root", root.id.to_string()),
                    ("state", format!("{:?}", root.state).to_lowercase()),
                ])
                .set(root.not_after);
        }
        self.bundle_roots.set(in_bundle);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for CaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaMetrics")
    }
}

/// Serves `/metrics`, `/live` and `/ready` in plain HTTP on `listener`
/// until the task is dropped, at most
/// [`ADMIN_MAX_CONNECTIONS`](crate::listen::ADMIN_MAX_CONNECTIONS) at once.
/// Logs `listening` with `listener=admin`.
pub async fn serve_admin(listener: TcpListener, metrics: Arc<CaMetrics>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listener = "admin", %addr, "listening");
    }
    let acceptor =
        crate::listen::Acceptor::new(listener, "admin", crate::listen::ADMIN_MAX_CONNECTIONS);
    acceptor
        .run(std::future::pending(), move |tcp, _peer| {
            let metrics = metrics.clone();
            async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        async move {
                            let (status, ctype, body) = match req.uri().path() {
                                "/metrics" => (
                                    StatusCode::OK,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    Bytes::from(metrics.encode()),
                                ),
                                "/live" | "/ready" => {
                                    (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
                                }
                                _ => (
                                    StatusCode::NOT_FOUND,
                                    "text/plain",
                                    Bytes::from_static(b"not found\n"),
                                ),
                            };
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header(header::CONTENT_TYPE, ctype)
                                    .body(Full::new(body))
                                    .expect("static response"),
                            )
                        }
                    });
                // The header timeout also closes a connection left idle between
                // requests, so an idle client gives its slot back.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            }
        })
        .await;
}

/// Binds the admin listener.
pub async fn bind_admin(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
