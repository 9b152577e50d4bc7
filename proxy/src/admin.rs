//! The admin listener: `/live`, `/ready`, `/identity`, `/metrics` and
//! `PUT /logging?level=...`, plaintext on its own port (loopback by default).
//!
//! Other modules may add read-only JSON views ([`AdminListener::add_view`]:
//! `/transparent`).
//!
//! `/ready` is a latch on two facts: a certificate is held, and the proxy is
//! not draining; other modules may add conditions of their own
//! ([`AdminListener::add_readiness`]: every `[[destination]] host` resolved
//! once). `/identity` shows the current SPIFFE ID, certificate serial
//! and expiry as JSON; never key material.
//!
//! Reads (`GET`, `HEAD`) answer anyone who can reach the port: in Kubernetes
//! that is the kubelet's probes and a Prometheus scraper, so the port is
//! bound on the pod IP. Everything else (today `PUT /logging`) changes the
//! proxy and answers only to a peer on loopback (the pod itself, `kubectl
//! exec`, `kubectl port-forward`); others get 403, counted in
//! `moat_admin_refusals_total{reason="not_loopback"}` and logged. The check
//! is on the connection's source address rather than on a second,
//! loopback-only listener: one port for the kubelet and the operator, no
//! setting to get wrong, and a TCP peer off this host cannot have a
//! loopback source address (the kernel drops such packets on any other
//! interface).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use moat_ca::listen::{ADMIN_MAX_CONNECTIONS, Acceptor};
use tokio::net::TcpListener;

use crate::Error;
use arc_swap::ArcSwap;

use crate::policy::{JwksCache, Policy, ReloadStats};
use crate::probe::AppProbes;
use crate::telemetry::{LOG_LEVELS, Observability, ProxyMetrics};
use crate::tls::CredentialStore;

/// The bound admin listener.
pub(crate) struct AdminListener {
    listener: TcpListener,
    state: Arc<State>,
    app_probes: Arc<AppProbes>,
}

struct State {
    store: Arc<CredentialStore>,
    policies: Vec<PolicyView>,
    jwks: Option<Arc<JwksCache>>,
    draining: Arc<AtomicBool>,
    obs: Observability,
    views: Vec<(&'static str, View)>,
    readiness: Vec<Readiness>,
}

/// A read-only JSON view another module adds (e.g. `/transparent`).
pub(crate) type View = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// A readiness condition another module adds: why the proxy is not ready
/// (the `/ready` body, one line), or `None` when the condition holds.
pub(crate) type Readiness = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// One inbound listener's route policy, as the admin shows it.
pub(crate) struct PolicyView {
    /// The inbound listener's name.
    pub name: String,
    /// The active policy.
    pub policy: Arc<ArcSwap<Policy>>,
    /// Its reload counters.
    pub stats: Arc<ReloadStats>,
}

impl AdminListener {
    /// Binds the admin address and logs it.
    pub(crate) async fn bind(
        addr: SocketAddr,
        store: Arc<CredentialStore>,
        policies: Vec<PolicyView>,
        jwks: Option<Arc<JwksCache>>,
        draining: Arc<AtomicBool>,
        obs: Observability,
    ) -> Result<(Self, SocketAddr), Error> {
        let (listener, bound) = crate::conn::bind("admin", addr).await?;
        if !bound.ip().is_loopback() {
            tracing::info!(addr = %bound, "admin listener is reachable off this host (for probes); changes are taken only from loopback");
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
                    views: Vec::new(),
                    readiness: Vec::new(),
                }),
                app_probes: Arc::default(),
            },
            bound,
        ))
    }

    /// Adds a read-only JSON view at `path` (before serving).
    pub(crate) fn add_view(&mut self, path: &'static str, view: View) {
        let state = Arc::get_mut(&mut self.state).expect("views are added before serving");
        state.views.push((path, view));
    }

    /// Adds a condition `/ready` must meet (before serving).
    pub(crate) fn add_readiness(&mut self, check: Readiness) {
        let state = Arc::get_mut(&mut self.state).expect("conditions are added before serving");
        state.readiness.push(check);
    }

    /// Serves until the process exits: readiness must stay answerable (and
    /// false) while draining. At most [`ADMIN_MAX_CONNECTIONS`] at once; a
    /// connection that sends no request for 10 s is closed.
    pub(crate) async fn serve(self) {
        let state = self.state;
        let app_probes = self.app_probes;
        Acceptor::new(self.listener, "admin", ADMIN_MAX_CONNECTIONS)
            .run(std::future::pending(), move |stream, peer| {
                let state = state.clone();
                let app_probes = app_probes.clone();
                async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        let app_probes = app_probes.clone();
                        async move {
                            if let Some(r) = app_probe(&app_probes, &req).await {
                                return Ok::<_, Infallible>(r);
                            }
                            Ok::<_, Infallible>(state.handle(&req, peer))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                }
            })
            .await;
    }
}

impl AdminListener {
    /// Also answers the app's rewritten kubelet probes (see
    /// [`crate::probe`]) at their `/app-health/...` paths.
    pub(crate) fn with_app_probes(mut self, probes: AppProbes) -> Self {
        self.app_probes = Arc::new(probes);
        self
    }
}

/// A `GET` (or `HEAD`) of a registered `/app-health/...` path: the app's
/// probe, run now. `None` for anything else, which [`State::handle`]
/// answers (404 for an unregistered probe path).
async fn app_probe(probes: &AppProbes, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let path = req.uri().path();
    if !path.starts_with(crate::probe::PATH_PREFIX)
        || !(req.method() == Method::GET || req.method() == Method::HEAD)
    {
        return None;
    }
    probes.check(path).await
}

/// True when `peer` is this host over loopback (`127.0.0.0/8`, `::1`, or
/// an IPv4 loopback address mapped into IPv6 by a dual-stack socket).
pub(crate) fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

impl State {
    fn handle(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let reads = req.method() == Method::GET || req.method() == Method::HEAD;
        if !reads && !is_loopback(peer) {
            return self.refuse_remote(req, peer);
        }
        if req.uri().path() == "/logging" {
            return self.logging(req, peer);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "GET or HEAD only (PUT /logging?level=... to change the log filter)",
            );
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            // Every refusal reads alike, `not ready: <why>`, as the CA's do.
            "/ready" => match self.not_ready() {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            "/identity" => self.identity(),
            "/metrics" => self.metrics(req.headers().get(header::ACCEPT)),
            path => match self.views.iter().find(|(p, _)| *p == path) {
                Some((_, view)) => json(StatusCode::OK, view()),
                None => self.not_found(path),
            },
        }
    }

    /// Why the sidecar is not ready, if it is not.
    fn not_ready(&self) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            Some("draining".into())
        } else if !self.store.is_ready() {
            Some("no certificate yet".into())
        } else if self
            .store
            .current()
            .is_some_and(|c| c.svid.not_after <= SystemTime::now())
        {
            Some("certificate expired".into())
        } else if !self.policies.iter().all(|p| p.policy.load().keys_ready()) {
            Some("route policy keys not fetched yet".into())
        } else {
            self.readiness.iter().find_map(|check| check())
        }
    }

    /// 404, listing what this process does serve: views (`/transparent`)
    /// are named only where they exist, so the list never sends an
    /// operator to another 404.
    fn not_found(&self, path: &str) -> Response<Full<Bytes>> {
        let mut paths = vec!["/live", "/ready", "/identity", "/metrics"];
        paths.extend(self.views.iter().map(|(p, _)| *p));
        let hint = if path == "/transparent" {
            " (/transparent is served in transparent mode only: a [redirect] section in the configuration)"
        } else {
            ""
        };
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("not found{hint}: {}, PUT /logging", paths.join(", ")),
        )
    }

    /// Brings the metrics kept elsewhere (policy reloads, JWKS fetches,
    /// certificate expiry, the trust bundle's roots) up to date, then encodes everything.
    fn metrics(&self, accept: Option<&header::HeaderValue>) -> Response<Full<Bytes>> {
        let m = &self.obs.metrics;
        if let Some(creds) = self.store.current() {
            m.cert_expiry.set(creds.svid.not_after_unix() as i64);
            m.set_trust_bundle(&creds.trust_roots);
        }
        self.store.revocations().update_age();
        let (mut ok, mut failed) = (0, 0);
        for p in &self.policies {
            ok += p.stats.ok.load(Ordering::Relaxed);
            failed += p.stats.failed.load(Ordering::Relaxed);
            let listener = [("listener", p.name.clone())];
            m.policy_reload_failed
                .get_or_create(&listener)
                .set(i64::from(p.stats.failing()));
            m.policy_reload_success
                .get_or_create(&listener)
                .set(p.stats.last_success_unix() as i64);
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
        // OpenMetrics for Prometheus, which asks for it; the Prometheus
        // text format for everyone else (curl, promtool).
        let format = moat_ca::exposition::Format::negotiate(accept);
        let mut r = Response::new(Full::new(Bytes::from(format.render(m.encode()))));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(format.content_type()),
        );
        r.headers_mut()
            .insert(header::VARY, header::HeaderValue::from_static("accept"));
        r
    }

    /// A change asked for from off this host: 403, counted and logged.
    fn refuse_remote(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        self.obs
            .metrics
            .admin_refusals
            .get_or_create(&[("reason", "not_loopback")])
            .inc();
        tracing::warn!(
            target: "moat::admin",
            peer_addr = %peer,
            method = %req.method(),
            path = req.uri().path(),
            reason = "not_loopback",
            "admin request refused: changes are taken only from loopback"
        );
        json(
            StatusCode::FORBIDDEN,
            serde_json::json!({
                "error": format!(
                    "{} {} is taken only from loopback (127.0.0.1 or ::1), not from {}",
                    req.method(),
                    req.uri().path(),
                    peer.ip()
                ),
                "reason": "not_loopback",
            }),
        )
    }

    /// `PUT /logging?level=debug` changes the log filter at runtime (see
    /// [`crate::telemetry::log_filter`]: the audit trail stays on).
    fn logging(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if req.method() != Method::PUT && req.method() != Method::POST {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "PUT /logging?level=<filter>",
            );
        }
        let Some(handle) = &self.obs.log_level else {
            return error(
                StatusCode::NOT_IMPLEMENTED,
                "log_level_fixed",
                "the log level is fixed in this process",
            );
        };
        let level = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("level="))
            .map(percent_decode)
            .unwrap_or_default();
        let refuse = |error: String| {
            json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": error, "reason": "bad_log_level", "valid_levels": LOG_LEVELS }),
            )
        };
        if let Err(e) = crate::telemetry::check_log_filter(&level) {
            return refuse(e.to_string());
        }
        match handle(&level) {
            Ok(()) => {
                tracing::warn!(target: "moat::admin", filter = %level, peer_addr = %peer, "log level changed");
                json(StatusCode::OK, serde_json::json!({ "level": level }))
            }
            Err(e) => refuse(e),
        }
    }

    /// The deny-list this sidecar enforces: its version, size, and how long
    /// ago the CA last confirmed it, or in file mode how old the
    /// `deny_list` file is (`null` before the first list, and in file mode
    /// without one).
    fn revocations_view(&self) -> serde_json::Value {
        let state = self.store.revocations();
        let list = state.current();
        serde_json::json!({
            "version": list.version(),
            "entries": list.len(),
            "age_seconds": state.age().map(|a| a.as_secs()),
        })
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
                "revocations": self.revocations_view(),
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

/// Decodes `%XX` escapes and `+` (a query value); bad escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// An error answer, shaped like the proxy's own (`reason` is the stable code).
fn error(status: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({ "error": message, "reason": reason }),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_peers_include_mapped_ipv4_and_nothing_else() {
        for local in [
            "127.0.0.1:1",
            "127.0.0.2:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "192.0.2.7:1",
            "[::ffff:192.0.2.7]:1",
            "0.0.0.0:1",
            "[2001:db8::1]:1",
        ] {
            assert!(!is_loopback(remote.parse().unwrap()), "{remote}");
        }
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            percent_decode("moat_proxy%3Ddebug%2Cinfo"),
            "moat_proxy=debug,info"
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
