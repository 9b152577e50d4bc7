//! The CA's Prometheus metrics and its plain-HTTP admin listener
//! (`/metrics`, `/live`, `/ready`), loopback by default.
//!
//! | metric | labels | what |
//! | --- | --- | --- |
//! | `moat_ca_issuances_total` | `credential`, `result` | certificates issued (`ok`) or refused (a reason code) |
//! | `moat_ca_token_replays_total` | | join tokens refused because they were already used |
//! | `moat_ca_bundle_roots` | | roots in the trust bundle |
//! | `moat_ca_root_expiry_timestamp_seconds` | `root`, `state` | when each root expires |
//! | `moat_ca_store_up` | | 1 while the state store answers, 0 while it does not |
//!
//! `/ready` answers 200 while the store answers and the active root's key
//! is at hand, else 503 with the reason; `/live` answers 200 while the
//! process serves.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;

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
    health: Health,
}

/// What `/ready` reports: problems that stop issuance, each `None` when
/// fine. Set by the server's store poll and by failed issuances.
pub struct Health {
    store: ArcSwapOption<String>,
    signing: ArcSwapOption<String>,
    store_up: Gauge,
}

impl CaMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let issuances = Family::<IssuanceLabels, Counter>::default();
        let replays = Counter::default();
        let bundle_roots = Gauge::default();
        let root_expiry = Family::<RootLabels, Gauge>::default();
        let store_up = Gauge::default();
        store_up.set(1);
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
        registry.register(
            "moat_ca_store_up",
            "1 while the CA's state store answers, 0 while it does not",
            store_up.clone(),
        );
        Self {
            registry,
            issuances,
            replays,
            bundle_roots,
            root_expiry,
            health: Health {
                store: ArcSwapOption::empty(),
                signing: ArcSwapOption::empty(),
                store_up,
            },
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

    /// The readiness state.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Marks the store as answering (`true`) or not, with the reason.
    pub fn set_store_up(&self, up: bool, reason: Option<&str>) {
        self.health.set_store(if up {
            None
        } else {
            reason.or(Some("store failed"))
        });
    }

    /// The metrics in the OpenMetrics text format (a scrape gets the
    /// format it asks for: [`crate::exposition`]).
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

impl Health {
    /// Records the store's state; true when it changed (to log transitions once).
    pub fn set_store(&self, problem: Option<&str>) -> bool {
        self.store_up.set(i64::from(problem.is_none()));
        swap(&self.store, problem.map(str::to_owned))
    }

    /// Records whether the CA can sign; true when it changed.
    pub fn set_signing(&self, problem: Option<String>) -> bool {
        swap(&self.signing, problem)
    }

    /// Why the CA cannot sign now, if it cannot.
    pub fn signing_problem(&self) -> Option<Arc<String>> {
        self.signing.load_full()
    }

    /// Every current problem; empty when ready.
    pub fn problems(&self) -> Vec<String> {
        [self.store.load_full(), self.signing.load_full()]
            .into_iter()
            .flatten()
            .map(|p| p.to_string())
            .collect()
    }
}

fn swap(slot: &ArcSwapOption<String>, next: Option<String>) -> bool {
    let changed = slot.load().as_deref() != next.as_ref();
    if changed {
        slot.store(next.map(Arc::new));
    }
    changed
}

/// Serves `/metrics`, `/live` and `/ready` in plain HTTP on `listener`
/// until the task is dropped, at most
/// [`ADMIN_MAX_CONNECTIONS`](crate::listen::ADMIN_MAX_CONNECTIONS) at once.
/// Logs `listening` with `listener=admin`.
pub(crate) async fn serve_admin(listener: TcpListener, metrics: Arc<CaMetrics>) {
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
                                "/metrics" => {
                                    let format = crate::exposition::Format::negotiate(
                                        req.headers().get(header::ACCEPT),
                                    );
                                    (
                                        StatusCode::OK,
                                        format.content_type(),
                                        Bytes::from(format.render(metrics.encode())),
                                    )
                                }
                                "/live" => {
                                    (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
                                }
                                "/ready" => match metrics.health().problems() {
                                    problems if problems.is_empty() => {
                                        (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
                                    }
                                    problems => (
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        "text/plain",
                                        Bytes::from(format!(
                                            "not ready: {}\n",
                                            problems.join("; ")
                                        )),
                                    ),
                                },
                                // JSON, naming what is served, as the
                                // proxy's admin listener answers.
                                _ => (
                                    StatusCode::NOT_FOUND,
                                    "application/json",
                                    Bytes::from_static(
                                        br#"{"error":"not found: /live, /ready, /metrics","reason":"not_found"}"#,
                                    ),
                                ),
                            };
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header(header::CONTENT_TYPE, ctype)
                                    // `/metrics` answers by `Accept`.
                                    .header(header::VARY, "accept")
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
pub(crate) async fn bind_admin(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
