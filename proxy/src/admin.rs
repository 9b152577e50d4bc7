//! The admin listener: `/live`, `/ready`, `/identity`, `/metrics` and
//! `PUT /logging?level=...`, plaintext on its own port (loopback by default).
//!
//! `/ready` is a latch on two facts: a certificate is held, and the proxy is
//! not draining. `/identity` shows the current SPIFFE ID, certificate serial
//! and expiry as JSON; never key material.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::Error;
use arc_swap::ArcSwap;

use crate::policy::{JwksCache, Policy, ReloadStats};
use crate::telemetry::{Observability, ProxyMetrics};
use crate::tls::CredentialStore;

/// The bound admin listener.
pub struct AdminListener {
    listener: TcpListener,
    state: Arc<State>,
}

struct State {
    store: Arc<CredentialStore>,
    policies: Vec<PolicyView>,
    jwks: Option<Arc<JwksCache>>,
    draining: Arc<AtomicBool>,
    obs: Observability,
}

/// One inbound listener's route policy, as the admin shows it.
pub struct PolicyView {
    /// The inbound listener's name.
    pub name: String,
    /// The active policy.
    pub policy: Arc<ArcSwap<Policy>>,
    /// Its reload counters.
    pub stats: Arc<ReloadStats>,
}

impl AdminListener {
    /// Binds the admin address and logs it.
    pub async fn bind(
        addr: SocketAddr,
        store: Arc<CredentialStore>,
        policies: Vec<PolicyView>,
        jwks: Option<Arc<JwksCache>>,
        draining: Arc<AtomicBool>,
        obs: Observability,
    ) -> Result<(Self, SocketAddr), Error> {
        let (listener, bound) = crate::conn::bind("admin", addr).await?;
        if !bound.ip().is_loopback() {
            tracing::info!(addr = %bound, "admin listener is reachable off this host (for probes)");
        }
        tracing::info!(listener = "admin", addr = %bound, "listening");
        Ok((
            Self {
                listener,
                state: Arc::new(State {
                    store,
                    policies,
                    jwks,
                    draining,
                    obs,
                }),
            },
            bound,
        ))
    }

    /// Serves until the process exits: readiness must stay answerable (and
    /// false) while draining.
    pub async fn serve(self) {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let state = self.state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(state.handle(&req)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http1_only()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

impl State {
    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/logging" {
            return self.logging(req);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => {
                if self.draining.load(Ordering::Relaxed) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if !self.store.is_ready() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "no certificate yet\n")
                } else if self
                    .store
                    .current()
                    .is_some_and(|c| c.svid.not_after <= SystemTime::now())
                {
                    text(StatusCode::SERVICE_UNAVAILABLE, "certificate expired\n")
                } else if !self.policies.iter().all(|p| p.policy.load().keys_ready()) {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "route policy keys not fetched yet\n",
                    )
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            "/identity" => self.identity(),
            "/metrics" => self.metrics(),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Brings the metrics kept elsewhere (policy reloads, JWKS fetches,
    /// certificate expiry) up to date, then encodes everything.
    fn metrics(&self) -> Response<Full<Bytes>> {
        let m = &self.obs.metrics;
        if let Some(creds) = self.store.current() {
            m.cert_expiry.set(creds.svid.not_after_unix() as i64);
        }
        let (mut ok, mut failed) = (0, 0);
        for p in &self.policies {
            ok += p.stats.ok.load(Ordering::Relaxed);
            failed += p.stats.failed.load(Ordering::Relaxed);
        }
        ProxyMetrics::catch_up(&m.policy_reloads.get_or_create(&[("result", "ok")]), ok);
        ProxyMetrics::catch_up(
            &m.policy_reloads.get_or_create(&[("result", "failed")]),
            failed,
        );
        let hashes: Vec<(String, Arc<Policy>)> = self
            .policies
            .iter()
            .map(|p| (p.name.clone(), p.policy.load_full()))
            .collect();
        m.set_policies(hashes.iter().map(|(name, p)| (name.as_str(), p.hash())));
        if let Some(jwks) = &self.jwks {
            for stats in jwks.stats() {
                for (result, total) in [("ok", stats.fetches_ok), ("failed", stats.fetches_failed)]
                {
                    let counter = m.jwks_fetches.get_or_create(&[
                        ("issuer", stats.origin.clone()),
                        ("result", result.to_owned()),
                    ]);
                    ProxyMetrics::catch_up(&counter, total);
                }
            }
        }
        let mut r = Response::new(Full::new(Bytes::from(m.encode())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        r
    }

    /// `PUT /logging?level=debug` changes the log filter at runtime.
    fn logging(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::PUT && req.method() != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "PUT /logging?level=<filter>\n",
            );
        }
        let Some(handle) = &self.obs.log_level else {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "the log level is fixed in this process\n",
            );
        };
        let level = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("level="));
        let Some(level) = level.filter(|l| !l.is_empty()) else {
            return text(StatusCode::BAD_REQUEST, "missing ?level=<filter>\n");
        };
        let level = level.replace("%2C", ",").replace("%3D", "=");
        match handle(&level) {
            Ok(()) => {
                tracing::info!(level = %level, "log level changed");
                json(StatusCode::OK, serde_json::json!({ "level": level }))
            }
            Err(e) => json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e })),
        }
    }

    fn identity(&self) -> Response<Full<Bytes>> {
        let Some(creds) = self.store.current() else {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "ready": false }),
            );
        };
        let svid = &creds.svid;
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let expires_in = svid
            .not_after
            .duration_since(SystemTime::now())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json(
            StatusCode::OK,
            serde_json::json!({
                "ready": true,
                "id": svid.id.as_str(),
                "trust_domain": creds.trust_domain.as_str(),
                "serial": svid.serial,
                "not_before": humantime::format_rfc3339_seconds(svid.not_before).to_string(),
                "not_after": humantime::format_rfc3339_seconds(svid.not_after).to_string(),
                "not_after_unix": unix(svid.not_after),
                "expires_in_seconds": expires_in,
                "bundle_roots": creds.bundle.roots().len(),
                "policies": self.policies.iter().map(|p| {
                    let policy = p.policy.load();
                    serde_json::json!({
                        "listener": p.name,
                        "file": policy.source().display().to_string(),
                        "hash": policy.hash(),
                        "routes": policy.route_count(),
                        "mode": format!("{:?}", policy.mode()).to_lowercase(),
                        "reloads_ok": p.stats.ok.load(Ordering::Relaxed),
                        "reloads_failed": p.stats.failed.load(Ordering::Relaxed),
                        "last_reload_error": p.stats.last_error(),
                    })
                }).collect::<Vec<_>>(),
            }),
        )
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}
