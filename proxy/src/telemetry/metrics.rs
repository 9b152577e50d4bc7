//! Prometheus metrics: [`ProxyMetrics`] registers every family the admin
//! `/metrics` serves; [`ListenerMetrics`] is one listener's per-request
//! counters, cached so a request builds no labels.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::authz::{AuthzDecision, AuthzReason};

/// Labels of a request counter.
type RequestLabels = [(&'static str, String); 6];
/// Labels with a listener only.
type ListenerLabels = [(&'static str, String); 1];

/// Every metric the proxy exports. Cheap to clone (families are `Arc`s).
#[derive(Clone)]
pub struct ProxyMetrics {
    registry: Arc<std::sync::Mutex<Registry>>,
    /// Requests by listener, direction, route, method class, status class, decision.
    pub requests: Family<RequestLabels, Counter>,
    /// Request duration by listener and direction.
    pub duration: Family<[(&'static str, String); 2], Histogram>,
    /// TLS handshakes that completed, by listener.
    pub handshakes: Family<ListenerLabels, Counter>,
    /// TLS handshake failures by listener and reason.
    pub handshake_failures: Family<[(&'static str, String); 2], Counter>,
    /// Connections open now, by listener.
    pub open_connections: Family<ListenerLabels, Gauge>,
    /// Upgraded connections (WebSocket, ...) open now, by listener and protocol.
    pub upgraded_connections: Family<[(&'static str, String); 2], Gauge>,
    /// Authorization decisions by listener, route, decision and reason.
    pub decisions: Family<[(&'static str, String); 4], Counter>,
    /// Policy reloads by result (`ok`, `failed`).
    pub policy_reloads: Family<[(&'static str, &'static str); 1], Counter>,
    /// 1 for the active policy hash of each listener.
    pub policy_info: Family<[(&'static str, String); 2], Gauge>,
    /// 1 while a listener's policy file holds a refused edit (the running
    /// policy is older than the file), else 0.
    pub policy_reload_failed: Family<ListenerLabels, Gauge>,
    /// When each listener's policy file was last found valid and in force.
    pub policy_reload_success: Family<ListenerLabels, Gauge>,
    /// When the current certificate expires (Unix seconds).
    pub cert_expiry: Gauge,
    /// Roots in the trust bundle in force.
    pub trust_bundle_roots: Gauge,
    /// When each root of the bundle in force expires, by fingerprint.
    pub trust_bundle_root_expiry: Family<[(&'static str, String); 1], Gauge>,
    /// The roots last shown, whose series leave with them.
    shown_roots: Arc<std::sync::Mutex<Arc<[crate::tls::TrustRoot]>>>,
    /// Certificate renewals by result.
    pub renewals: Family<[(&'static str, &'static str); 1], Counter>,
    /// JWKS fetches by issuer and result.
    pub jwks_fetches: Family<[(&'static str, String); 2], Counter>,
    /// Spans dropped because the collector could not take them.
    pub spans_dropped: Counter,
    /// Connections dropped for holding a slot unused, by listener and
    /// reason (`header_timeout`, `close_timeout`).
    pub connections_cut: Family<[(&'static str, String); 2], Counter>,
    /// HTTP/2 connections ended with a GOAWAY for the peer's misbehaviour,
    /// by listener and error code.
    pub http2_goaways: Family<[(&'static str, String); 2], Counter>,
    /// Admin requests refused, by reason (`not_loopback`).
    pub admin_refusals: Family<[(&'static str, &'static str); 1], Counter>,
    /// The deny-list, and connections closed when a credential lapsed.
    pub revocation: crate::revocation::RevocationMetrics,
}

impl ProxyMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration =
            Family::<[(&'static str, String); 2], Histogram>::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
            });
        let handshakes = Family::<ListenerLabels, Counter>::default();
        let handshake_failures = Family::<[(&'static str, String); 2], Counter>::default();
        let open_connections = Family::<ListenerLabels, Gauge>::default();
        let upgraded_connections = Family::<[(&'static str, String); 2], Gauge>::default();
        let decisions = Family::<[(&'static str, String); 4], Counter>::default();
        let policy_reloads = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let policy_info = Family::<[(&'static str, String); 2], Gauge>::default();
        let policy_reload_failed = Family::<ListenerLabels, Gauge>::default();
        let policy_reload_success = Family::<ListenerLabels, Gauge>::default();
        let cert_expiry = Gauge::default();
        let trust_bundle_roots = Gauge::default();
        let trust_bundle_root_expiry = Family::<[(&'static str, String); 1], Gauge>::default();
        let renewals = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let jwks_fetches = Family::<[(&'static str, String); 2], Counter>::default();
        let spans_dropped = Counter::default();
        let admin_refusals = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let connections_cut = Family::<[(&'static str, String); 2], Counter>::default();
        let http2_goaways = Family::<[(&'static str, String); 2], Counter>::default();
        registry.register(
            "moat_requests",
            "HTTP requests by listener, direction, route, method, status class and decision",
            requests.clone(),
        );
        registry.register(
            "moat_request_duration_seconds",
            "Request duration from the first byte in to the response head out",
            duration.clone(),
        );
        registry.register(
            "moat_tls_handshakes",
            "TLS handshakes completed",
            handshakes.clone(),
        );
        registry.register(
            "moat_tls_handshake_failures",
            "TLS handshakes that failed, by reason (no_client_cert, unknown_ca, expired, not_yet_valid, wrong_usage, not_a_leaf, revoked, wrong_identity, timeout, protocol, other)",
            handshake_failures.clone(),
        );
        registry.register(
            "moat_open_connections",
            "Connections open now",
            open_connections.clone(),
        );
        registry.register(
            "moat_upgraded_connections",
            "Upgraded connections (WebSocket and other Upgrade protocols) open now, by listener and protocol",
            upgraded_connections.clone(),
        );
        registry.register(
            "moat_authz_decisions",
            "Authorization decisions by route, decision and reason",
            decisions.clone(),
        );
        registry.register(
            "moat_policy_reloads",
            "Policy file reloads by result",
            policy_reloads.clone(),
        );
        registry.register(
            "moat_policy_info",
            "The active policy of each listener (value 1, hash as label)",
            policy_info.clone(),
        );
        registry.register(
            "moat_policy_reload_failed",
            "1 while the policy file holds an edit that was refused (the last good policy still runs), else 0",
            policy_reload_failed.clone(),
        );
        registry.register(
            "moat_policy_last_reload_success_timestamp_seconds",
            "When the policy file was last found valid and in force (Unix time)",
            policy_reload_success.clone(),
        );
        // A gauge set to 1 rather than an OpenMetrics `info` family: the
        // `_info` gauge is what Prometheus-era parsers and dashboards know.
        let build_info = Family::<[(&'static str, &'static str); 3], Gauge>::default();
        build_info.get_or_create(&build_labels()).set(1);
        registry.register(
            "moat_build_info",
            "The moat build (value 1; version, commit and compiler as labels)",
            build_info,
        );
        registry.register_collector(Box::new(crate::process::ProcessCollector::new()));
        registry.register(
            "moat_certificate_expiry_timestamp_seconds",
            "When the current workload certificate expires (Unix time)",
            cert_expiry.clone(),
        );
        registry.register(
            "moat_trust_bundle_roots",
            "Roots in the trust bundle that verifies peers (0 until the first credentials)",
            trust_bundle_roots.clone(),
        );
        registry.register(
            "moat_trust_bundle_root_expiry_timestamp_seconds",
            "When each root of the trust bundle expires (Unix time), by the first 8 bytes of its SHA-256 fingerprint",
            trust_bundle_root_expiry.clone(),
        );
        registry.register(
            "moat_certificate_renewals",
            "Certificate renewals by result",
            renewals.clone(),
        );
        registry.register(
            "moat_jwks_fetches",
            "JWKS fetches by issuer and result",
            jwks_fetches.clone(),
        );
        registry.register(
            "moat_spans_dropped",
            "Spans dropped because the collector could not take them",
            spans_dropped.clone(),
        );
        registry.register(
            "moat_admin_refusals",
            "Admin listener requests refused, by reason (not_loopback: a change asked from off this host)",
            admin_refusals.clone(),
        );
        registry.register(
            "moat_connections_cut",
            "Connections dropped without a graceful close, by reason (header_timeout: no request within header_read_timeout; close_timeout: an idle close not finished within header_read_timeout)",
            connections_cut.clone(),
        );
        registry.register(
            "moat_http2_goaway",
            "HTTP/2 connections ended with a GOAWAY for the peer's misbehaviour (floods, protocol errors), by error code",
            http2_goaways.clone(),
        );
        let revocation = crate::revocation::RevocationMetrics::register(&mut registry);
        Self {
            registry: Arc::new(std::sync::Mutex::new(registry)),
            requests,
            duration,
            handshakes,
            handshake_failures,
            open_connections,
            upgraded_connections,
            decisions,
            policy_reloads,
            policy_info,
            policy_reload_failed,
            policy_reload_success,
            cert_expiry,
            trust_bundle_roots,
            trust_bundle_root_expiry,
            shown_roots: Arc::new(std::sync::Mutex::new(Arc::new([]))),
            renewals,
            jwks_fetches,
            spans_dropped,
            admin_refusals,
            connections_cut,
            http2_goaways,
            revocation,
        }
    }

    /// The request metrics of one listener, with its duration histogram
    /// resolved once here instead of looked up (and its labels built) on
    /// every request.
    pub fn listener(&self, listener: &str, direction: &'static str) -> ListenerMetrics {
        let duration = self
            .duration
            .get_or_create(&[
                ("listener", listener.to_owned()),
                ("direction", direction.to_owned()),
            ])
            .clone();
        ListenerMetrics {
            requests: self.requests.clone(),
            duration,
            listener: listener.to_owned(),
            direction,
            unrouted: CounterSlots::new(),
            routed: Arc::default(),
        }
    }

    /// Counts one completed TLS handshake.
    pub fn handshake_ok(&self, listener: &str) {
        self.handshakes
            .get_or_create(&[("listener", listener.to_owned())])
            .inc();
    }

    /// Counts an open connection until the returned guard drops.
    pub fn connection_opened(&self, listener: &str) -> OpenConnection {
        let gauge = self
            .open_connections
            .get_or_create(&[("listener", listener.to_owned())])
            .clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// Counts an open upgraded connection until the returned guard drops.
    pub fn upgraded_opened(&self, listener: &str, protocol: &str) -> OpenConnection {
        let gauge = self
            .upgraded_connections
            .get_or_create(&[
                ("listener", listener.to_owned()),
                ("protocol", protocol.to_owned()),
            ])
            .clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// Counts one failed TLS handshake.
    pub fn handshake_failed(&self, listener: &str, reason: &str) {
        self.handshake_failures
            .get_or_create(&[
                ("listener", listener.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// Counts one connection cut off (`reason`: [`crate::conn::Cut`]).
    pub(crate) fn connection_cut(&self, listener: &str, reason: &'static str) {
        self.connections_cut
            .get_or_create(&[
                ("listener", listener.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// Counts one HTTP/2 connection ended by our GOAWAY with error code
    /// `reason` (a name of RFC 9113 §7).
    pub(crate) fn http2_goaway(&self, listener: &str, reason: &'static str) {
        self.http2_goaways
            .get_or_create(&[
                ("listener", listener.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// Counts one authorization decision.
    pub fn decision(
        &self,
        listener: &str,
        route: &str,
        decision: AuthzDecision,
        reason: AuthzReason,
    ) {
        self.decisions
            .get_or_create(&[
                ("listener", listener.to_owned()),
                ("route", route.to_owned()),
                ("decision", decision.as_str().to_owned()),
                ("reason", reason.as_str().to_owned()),
            ])
            .inc();
    }

    /// Records the active policy hash of each listener (only current
    /// hashes stay in the family).
    pub fn set_policies<'a>(&self, active: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.policy_info.clear();
        for (listener, hash) in active {
            self.policy_info
                .get_or_create(&[("listener", listener.to_owned()), ("hash", hash.to_owned())])
                .set(1);
        }
    }

    /// Shows the roots of the bundle in force: one series per root, so a
    /// series leaves with its root (after `moat ca rotate --retire`). A
    /// bundle holds one root, two during a rotation: the label's values
    /// stay as few. Series of roots still there are never removed, not even
    /// for a moment: a scrape running beside this one (two Prometheus
    /// servers) sees every root.
    pub fn set_trust_bundle(&self, roots: &Arc<[crate::tls::TrustRoot]>) {
        let mut shown = self.shown_roots.lock().expect("shown roots");
        if Arc::ptr_eq(&shown, roots) {
            return;
        }
        for gone in shown
            .iter()
            .filter(|s| !roots.iter().any(|r| r.fingerprint == s.fingerprint))
        {
            self.trust_bundle_root_expiry
                .remove(&[("fingerprint", gone.fingerprint.clone())]);
        }
        for root in roots.iter() {
            self.trust_bundle_root_expiry
                .get_or_create(&[("fingerprint", root.fingerprint.clone())])
                .set(root.not_after);
        }
        self.trust_bundle_roots.set(roots.len() as i64);
        *shown = roots.clone();
    }

    /// Registers a metric kept by another module (the transparent
    /// listeners' families).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .expect("metrics registry")
            .register(name, help, metric);
    }

    /// Raises a counter to `total` (for totals kept elsewhere as atomics).
    pub fn catch_up(counter: &Counter, total: u64) {
        let now = counter.get();
        if total > now {
            counter.inc_by(total - now);
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().expect("metrics registry"))
            .expect("writing to a String cannot fail");
        out
    }
}

/// `moat_build_info`'s labels: the crate version, and the commit and
/// compiler when the build recorded them (`MOAT_GIT_COMMIT` at build time;
/// proxy/build.rs), else `unknown`.
fn build_labels() -> [(&'static str, &'static str); 3] {
    [
        ("version", env!("CARGO_PKG_VERSION")),
        (
            "commit",
            option_env!("MOAT_GIT_COMMIT").unwrap_or("unknown"),
        ),
        (
            "rustc",
            option_env!("MOAT_RUSTC_VERSION").unwrap_or("unknown"),
        ),
    ]
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyMetrics")
    }
}

/// One listener's request counter and duration histogram (see
/// [`ProxyMetrics::listener`]).
///
/// The counter handles a listener produces are cached: a request looks its
/// counter up by array index (and, under a policy, its route name) instead
/// of building six owned label strings and hashing them in the family.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    listener: String,
    direction: &'static str,
    unrouted: Arc<CounterSlots>,
    routed: Arc<std::sync::RwLock<HashMap<Box<str>, Arc<CounterSlots>>>>,
}

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
];
const STATUSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const SLOTS: usize = METHODS.len() * STATUSES.len() * AuthzDecision::ALL.len();

/// The request counters of one route, by method × status class × decision.
#[derive(Debug)]
struct CounterSlots([std::sync::OnceLock<Counter>; SLOTS]);

impl CounterSlots {
    fn new() -> Arc<Self> {
        Arc::new(Self(std::array::from_fn(|_| std::sync::OnceLock::new())))
    }
}

impl ListenerMetrics {
    /// Counts one finished request.
    pub fn request(
        &self,
        route: &str,
        method: &http::Method,
        status: u16,
        decision: AuthzDecision,
        elapsed: Duration,
    ) {
        self.duration.observe(elapsed.as_secs_f64());
        let method = method_class(method);
        let status = status_class(status);
        let index = METHODS.iter().position(|m| *m == method).and_then(|m| {
            let s = STATUSES.iter().position(|s| *s == status)?;
            Some((m * STATUSES.len() + s) * AuthzDecision::ALL.len() + decision.index())
        });
        let Some(index) = index else {
            self.counter(route, method, status, decision).inc();
            return;
        };
        let init = || self.counter(route, method, status, decision);
        if route == "-" {
            self.unrouted.0[index].get_or_init(init).inc();
        } else {
            self.route_slots(route).0[index].get_or_init(init).inc();
        }
    }

    fn route_slots(&self, route: &str) -> Arc<CounterSlots> {
        if let Some(slots) = self
            .routed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(route)
        {
            return slots.clone();
        }
        let mut routed = self
            .routed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Routes come and go with policy reloads; a listener sees a bounded
        // set, and a removed route's counters stay exported like any other.
        routed
            .entry(route.into())
            .or_insert_with(CounterSlots::new)
            .clone()
    }

    fn counter(&self, route: &str, method: &str, status: &str, decision: AuthzDecision) -> Counter {
        self.requests
            .get_or_create(&[
                ("listener", self.listener.clone()),
                ("direction", self.direction.to_owned()),
                ("route", route.to_owned()),
                ("method", method.to_owned()),
                ("status", status.to_owned()),
                ("decision", decision.as_str().to_owned()),
            ])
            .clone()
    }
}

/// Decrements the open-connections gauge when dropped.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `GET`, `HEAD`, `POST`, `PUT`, `PATCH`, `DELETE`, `OPTIONS`, or `other`:
/// label values stay few whatever clients send.
pub fn method_class(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `2xx`, `4xx`, ...
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_bounded() {
        assert_eq!(
            method_class(&http::Method::from_bytes(b"BREW").unwrap()),
            "other"
        );
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(503), "5xx");
    }

    #[test]
    fn metrics_encode_as_openmetrics() {
        let m = ProxyMetrics::new();
        m.listener("api", "inbound").request(
            "read",
            &http::Method::GET,
            200,
            crate::authz::AuthzDecision::Allow,
            Duration::from_millis(3),
        );
        m.handshake_failed("api", "unknown_ca");
        let text = m.encode();
        assert!(text.contains(r#"moat_requests_total{listener="api",direction="inbound",route="read",method="GET",status="2xx",decision="allow"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"moat_tls_handshake_failures_total{listener="api",reason="unknown_ca"} 1"#
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
