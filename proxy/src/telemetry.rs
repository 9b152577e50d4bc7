//! Traces, metrics and access logs.
//!
//! - **Traces**: OpenTelemetry over OTLP (gRPC or HTTP/protobuf), configured
//!   by `[telemetry]` or the standard `OTEL_*` variables. W3C trace context
//!   is continued from peers and passed on to the service and to peers.
//!   Export is batched on a background thread and never blocks a request;
//!   spans that cannot be exported are dropped and counted.
//! - **Metrics**: [`ProxyMetrics`], Prometheus text at the admin `/metrics`.
//! - **Access log**: [`access_log`], one JSON line per request.
//! - **Log filter**: [`log_filter`], changeable at runtime through the admin
//!   listener, except that the audit trail ([`AUDIT_TARGETS`]) never gets
//!   quieter than it started.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::authz::{AuthzDecision, AuthzReason};

/// `[telemetry]` in the proxy configuration. Every field falls back to the
/// standard OpenTelemetry environment variable, then to a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP endpoint, e.g. `http://127.0.0.1:4317` (gRPC) or
    /// `http://127.0.0.1:4318` (HTTP). Env: `OTEL_EXPORTER_OTLP_ENDPOINT`.
    /// Unset: no traces are exported.
    pub otlp_endpoint: Option<String>,
    /// `grpc` (default) or `http/protobuf`. Env: `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Extra headers for the collector (e.g. an API key). Env:
    /// `OTEL_EXPORTER_OTLP_HEADERS` as `k=v,k2=v2`.
    #[serde(default)]
    pub otlp_headers: HashMap<String, String>,
    /// The `service.name` resource attribute. Env: `OTEL_SERVICE_NAME`.
    /// Default `moat-proxy`.
    pub service_name: Option<String>,
    /// Fraction of new traces sampled (0.0–1.0); a sampled parent is always
    /// followed. Env: `OTEL_TRACES_SAMPLER_ARG`. Default 1.0.
    pub sample_ratio: Option<f64>,
    /// Log filter (`info`, `debug`, `moat_proxy=debug,info`, ...). `RUST_LOG`
    /// overrides it; the admin listener can change it at runtime.
    pub log_level: Option<String>,
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (port 4317 by convention).
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318 by convention).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Resolved trace export settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// Where to send spans.
    pub endpoint: String,
    /// How.
    pub protocol: OtlpProtocol,
    /// Extra headers.
    pub headers: HashMap<String, String>,
    /// `service.name`.
    pub service_name: String,
    /// Sampling ratio for new traces.
    pub sample_ratio: f64,
}

/// A running trace pipeline; flushes and shuts down on drop.
pub struct Tracing {
    provider: SdkTracerProvider,
}

/// What the proxy's listeners and admin need from telemetry: the metrics,
/// whether request spans are exported, and how to change the log level.
#[derive(Clone, Default)]
pub struct Observability {
    /// Every metric.
    pub metrics: ProxyMetrics,
    /// True when an OTLP exporter is installed: request spans are only
    /// built then, so an untraced proxy pays nothing for them.
    pub tracing: bool,
    /// Changes the log filter at runtime (admin `PUT /logging?level=...`).
    pub log_level: Option<LogLevelHandle>,
}

/// Sets the log filter (an `EnvFilter` directive such as `debug` or
/// `moat_proxy=debug,info`); returns an error text for a bad directive.
pub type LogLevelHandle = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The levels a runtime log filter may name, alone or as `target=level`.
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The audit trail: the access log (`moat::access`), authorization
/// decisions and policy reloads (`moat::policy`), and changes made through
/// the admin listener (`moat::admin`). A filter set at runtime can make
/// these louder but never quieter than the filter the process started with.
pub const AUDIT_TARGETS: [&str; 3] = ["moat::access", "moat::policy", "moat::admin"];

/// Why a runtime log filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogFilterError {
    /// Nothing was given.
    #[error("no level given: use one of {}, alone or as target=level (e.g. moat_proxy=debug,info)", LOG_LEVELS.join(", "))]
    Empty,
    /// A level that is not one of [`LOG_LEVELS`].
    #[error("unknown level {0:?}: use one of {levels}, alone or as target=level (e.g. moat_proxy=debug,info)", levels = LOG_LEVELS.join(", "))]
    UnknownLevel(String),
    /// A target that is not a Rust module path.
    #[error("{0:?} is not a log target (letters, digits, _ and ::)")]
    BadTarget(String),
}

/// Errors setting up telemetry (bad configuration: exit 64).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The exporter could not be built.
    #[error("telemetry: cannot build the OTLP exporter for {endpoint}: {reason}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// A setting is out of range.
    #[error("telemetry: {0}")]
    Invalid(String),
}

impl TelemetryConfig {
    /// Resolves config and environment; `None` when no endpoint is set.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<TraceSettings>, TelemetryError> {
        let Some(endpoint) = self
            .otlp_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .filter(|e| !e.is_empty())
        else {
            return Ok(None);
        };
        let protocol = match self.otlp_protocol {
            Some(p) => p,
            None => match env("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
                None | Some("grpc") | Some("") => OtlpProtocol::Grpc,
                Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
                Some(other) => {
                    return Err(TelemetryError::Invalid(format!(
                        "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: use grpc or http/protobuf"
                    )));
                }
            },
        };
        let mut headers = self.otlp_headers.clone();
        if headers.is_empty()
            && let Some(raw) = env("OTEL_EXPORTER_OTLP_HEADERS")
        {
            for pair in raw.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    TelemetryError::Invalid(format!(
                        "OTEL_EXPORTER_OTLP_HEADERS: {pair:?} is not k=v"
                    ))
                })?;
                headers.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        let sample_ratio = match self.sample_ratio {
            Some(r) => r,
            None => env("OTEL_TRACES_SAMPLER_ARG")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1.0),
        };
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(TelemetryError::Invalid(format!(
                "sample_ratio {sample_ratio} must be between 0.0 and 1.0"
            )));
        }
        let service_name = self
            .service_name
            .clone()
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "moat-proxy".into());
        Ok(Some(TraceSettings {
            endpoint,
            protocol,
            headers,
            service_name,
            sample_ratio,
        }))
    }
}

impl Tracing {
    /// Builds the OTLP pipeline. Call inside a Tokio runtime (the gRPC
    /// exporter needs one).
    /// Spans lost to a failed export are counted in `dropped`.
    pub fn start(settings: &TraceSettings, dropped: Counter) -> Result<Self, TelemetryError> {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
        let err = |e: &dyn std::fmt::Display| TelemetryError::Exporter {
            endpoint: settings.endpoint.clone(),
            reason: e.to_string(),
        };
        let timeout = Duration::from_secs(5);
        let exporter = match settings.protocol {
            OtlpProtocol::Grpc => {
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &settings.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                        .map_err(|e| err(&e))?;
                    metadata.insert(key, v.parse().map_err(|e| err(&e))?);
                }
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(settings.endpoint.clone())
                    .with_timeout(timeout)
                    .with_metadata(metadata)
                    .build()
                    .map_err(|e| err(&e))?
            }
            OtlpProtocol::HttpProtobuf => {
                let endpoint = if settings.endpoint.ends_with("/v1/traces") {
                    settings.endpoint.clone()
                } else {
                    format!("{}/v1/traces", settings.endpoint.trim_end_matches('/'))
                };
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(endpoint)
                    .with_timeout(timeout)
                    .with_headers(settings.headers.clone())
                    .build()
                    .map_err(|e| err(&e))?
            }
        };
        let counting = CountingExporter {
            inner: exporter,
            dropped,
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(counting)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans.
    pub fn layer<S>(
        &self,
    ) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("moat"))
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        // Flush what is queued; a collector that is down only costs the
        // exporter's timeout.
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

/// Wraps the OTLP exporter to count spans lost when an export fails.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    dropped: Counter,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for CountingExporter<E>
{
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        if result.is_err() {
            self.dropped.inc_by(n);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Checks a log filter given at runtime: comma-separated directives, each
/// a level from [`LOG_LEVELS`] or `target=level`. Narrower than what
/// `RUST_LOG` takes (no span or field directives), so that a word that is
/// not a level (`verbose`) is refused instead of being read as a target
/// name, which would switch every other line off.
pub fn check_log_filter(filter: &str) -> Result<(), LogFilterError> {
    let mut any = false;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        any = true;
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        if let Some(target) = target {
            let ok = !target.is_empty()
                && target.split("::").all(|part| {
                    !part.is_empty()
                        && part
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                });
            if !ok {
                return Err(LogFilterError::BadTarget(target.to_owned()));
            }
        }
        if !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(LogFilterError::UnknownLevel(level.to_owned()));
        }
    }
    if any {
        Ok(())
    } else {
        Err(LogFilterError::Empty)
    }
}

/// The log filter for the log output: `startup` (an `EnvFilter` directive
/// string: `RUST_LOG` or the configured `log_level`), which the returned
/// handle replaces at runtime, *or* `startup` restricted to the
/// [`AUDIT_TARGETS`]. Whatever is set at runtime, an audit line that the
/// start-up filter let through still gets through: `PUT /logging?level=off`
/// quiets everything else, never the access or decision log. The handle
/// takes only what [`check_log_filter`] accepts.
pub fn log_filter<S>(
    startup: &str,
) -> (
    impl tracing_subscriber::layer::Filter<S> + Send + Sync + 'static,
    LogLevelHandle,
)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::{EnvFilter, FilterExt, FilterFn, LevelFilter};
    use tracing_subscriber::reload;
    let parse = |s: &str| EnvFilter::try_new(s).unwrap_or_else(|_| EnvFilter::new("info"));
    let (runtime, handle) = reload::Layer::new(parse(startup));
    // With a level hint: `filter_fn` alone gives none (FilterFn caches its
    // answer per callsite, so the hint was what was missing), and with it
    // every h2 `trace_span!` became a span in the registry and every h2
    // `trace!` ran the EnvFilter: HTTP/2 cost 219,700 instructions a
    // request instead of 73,800 (benches/load/callgrind.sh, in_h2).
    let audit_targets = FilterFn::new(|meta| is_audit_target(meta.target()))
        .with_max_level_hint(LevelFilter::TRACE);
    let audit = parse(startup).and(audit_targets);
    let set: LogLevelHandle = Arc::new(move |level: &str| {
        check_log_filter(level).map_err(|e| e.to_string())?;
        let next = EnvFilter::try_new(level).map_err(|e| format!("{level:?}: {e}"))?;
        handle.reload(next).map_err(|e| e.to_string())
    });
    (runtime.or(audit), set)
}

/// True for the targets of the audit trail (and their sub-targets).
pub fn is_audit_target(target: &str) -> bool {
    AUDIT_TARGETS.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// Continues the W3C trace context carried by `headers` (if any) as the
/// parent of `span`.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent =
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}

/// Replaces `traceparent`/`tracestate` in `headers` with the context of
/// `span`, so the next hop continues this trace. Without an exporter the
/// headers are left as they came.
pub fn propagate(span: &tracing::Span, headers: &mut http::HeaderMap) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if span.is_none() {
        return;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    headers.remove(&TRACEPARENT);
    headers.remove("tracestate");
    TraceContextPropagator::new()
        .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
}

/// The trace ID of `span`, lowercase hex, or the one in a `traceparent`
/// header, for the access log. Empty when there is none.
pub fn trace_id(span: &tracing::Span, headers: &http::HeaderMap) -> String {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !span.is_none() {
        let cx = span.context();
        let span_ref = cx.span();
        let sc = span_ref.span_context();
        if sc.is_valid() {
            return sc.trace_id().to_string();
        }
    }
    headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| id.len() == 32)
        .unwrap_or_default()
        .to_owned()
}

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
    /// Certificate renewals by result.
    pub renewals: Family<[(&'static str, &'static str); 1], Counter>,
    /// JWKS fetches by issuer and result.
    pub jwks_fetches: Family<[(&'static str, String); 2], Counter>,
    /// Spans dropped because the collector could not take them.
    pub spans_dropped: Counter,
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
        let renewals = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let jwks_fetches = Family::<[(&'static str, String); 2], Counter>::default();
        let spans_dropped = Counter::default();
        let admin_refusals = Family::<[(&'static str, &'static str); 1], Counter>::default();
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
            "TLS handshakes that failed, by reason (no_client_cert, unknown_ca, expired, revoked, wrong_identity, timeout, protocol, other)",
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
            renewals,
            jwks_fetches,
            spans_dropped,
            admin_refusals,
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

impl std::fmt::Debug for Observability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observability")
            .field("tracing", &self.tracing)
            .finish()
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
            .unwrap_or_else(|p| p.into_inner())
            .get(route)
        {
            return slots.clone();
        }
        let mut routed = self.routed.write().unwrap_or_else(|p| p.into_inner());
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

/// A request's id in this proxy's logs: the access-log line and the
/// decision line of one request carry the same `request_id`. A `u64` (a
/// random start per process, then a counter), formatted as 16 hex digits
/// only when a line is written: nothing is allocated for it per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(u64);

impl RequestId {
    /// The next id of this process.
    pub fn next() -> Self {
        use std::sync::LazyLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: LazyLock<AtomicU64> = LazyLock::new(|| AtomicU64::new(rand::random()));
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One access-log entry.
#[derive(Debug)]
pub struct AccessEntry<'a> {
    /// This request's id (also on its decision log line).
    pub request_id: RequestId,
    /// The trace this request belongs to.
    pub trace_id: &'a str,
    /// Listener name.
    pub listener: &'a str,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The peer (inbound: the verified caller; outbound: the server, or
    /// the identity it presented when it was refused; `-` if none).
    pub peer: &'a str,
    /// Outbound: the identity the configuration expects of the peer.
    pub expected_peer: Option<&'a str>,
    /// Method.
    pub method: &'a http::Method,
    /// Path as authorized: normalized by the policy (no query: it may hold
    /// secrets).
    pub path: &'a str,
    /// The path as received, when normalization changed it.
    pub raw_path: Option<&'a str>,
    /// Status sent back.
    pub status: u16,
    /// Route that decided (`-` when none).
    pub route: &'a str,
    /// `allow`, `deny`, `audit_allow`, or `none` (no policy).
    pub decision: AuthzDecision,
    /// For a denial or an audited one: the policy's reason code
    /// (`no_route`, `peer_not_allowed`, `jwt_expired`, ...).
    pub reason: Option<AuthzReason>,
    /// Time to the response head.
    pub duration: Duration,
    /// Response body bytes, when known from `content-length`.
    pub bytes: Option<u64>,
}

/// What a listener does once a request has its answer: the server span's
/// status, the request metrics, and the access-log line.
pub fn request_done(span: &tracing::Span, metrics: &ListenerMetrics, e: &AccessEntry<'_>) {
    span.record("http.response.status_code", e.status);
    if e.status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    metrics.request(e.route, e.method, e.status, e.decision, e.duration);
    access_log(e);
}

/// Milliseconds, rounded to the microsecond (`0.165`, not `0.16532100000000002`).
pub fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// Writes one access-log line (target `moat::access`, message `access`).
/// Tokens and keys never appear: only the fields above.
fn access_log(e: &AccessEntry<'_>) {
    tracing::info!(
        target: "moat::access",
        request_id = %e.request_id,
        trace_id = e.trace_id,
        listener = e.listener,
        direction = e.direction,
        peer = e.peer,
        expected_peer = e.expected_peer,
        method = %e.method,
        path = e.path,
        raw_path = e.raw_path,
        status = e.status,
        route = e.route,
        decision = e.decision.as_str(),
        reason = e.reason.map(AuthzReason::as_str),
        duration_ms = millis(e.duration),
        bytes = e.bytes,
        "access"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn no_endpoint_means_no_traces() {
        assert_eq!(
            TelemetryConfig::default().resolve(env_of(&[])).unwrap(),
            None
        );
    }

    #[test]
    fn environment_fills_what_the_file_leaves_out() {
        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "billing"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s3cret, x=y"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]);
        let s = TelemetryConfig::default().resolve(env).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://collector:4318");
        assert_eq!(s.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(s.service_name, "billing");
        assert_eq!(s.headers["api-key"], "s3cret");
        assert_eq!(s.sample_ratio, 0.25);

        let file = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            service_name: Some("from-file".into()),
            ..Default::default()
        };
        let s = file
            .resolve(env_of(&[("OTEL_SERVICE_NAME", "env")]))
            .unwrap()
            .unwrap();
        assert_eq!(s.service_name, "from-file");
        assert_eq!(s.protocol, OtlpProtocol::Grpc);
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = TelemetryConfig {
            otlp_endpoint: Some("http://x".into()),
            sample_ratio: Some(1.5),
            ..Default::default()
        };
        assert!(bad.resolve(env_of(&[])).is_err());
        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
        ]);
        assert!(TelemetryConfig::default().resolve(env).is_err());
    }

    #[test]
    fn runtime_log_filters_name_known_levels_only() {
        for ok in [
            "debug",
            "WARN",
            "off",
            "moat_proxy=debug,info",
            " moat::access = trace , error ",
            "h2=off,hyper-util=warn,info",
        ] {
            assert_eq!(check_log_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            check_log_filter("verbose"),
            Err(LogFilterError::UnknownLevel("verbose".into()))
        );
        assert_eq!(
            check_log_filter("moat_proxy=loud"),
            Err(LogFilterError::UnknownLevel("loud".into()))
        );
        assert_eq!(check_log_filter(" , "), Err(LogFilterError::Empty));
        assert!(matches!(
            check_log_filter("[span{x=1}]=debug"),
            Err(LogFilterError::BadTarget(_))
        ));
        let message = check_log_filter("verbose").unwrap_err().to_string();
        for level in LOG_LEVELS {
            assert!(message.contains(level), "{message}");
        }
    }

    #[test]
    fn audit_targets_include_their_sub_targets_only() {
        assert!(is_audit_target("moat::access"));
        assert!(is_audit_target("moat::policy::reload"));
        assert!(!is_audit_target("moat::accessory"));
        assert!(!is_audit_target("moat_proxy::inbound"));
    }

    /// Whatever the runtime filter says, an audit line the start-up filter
    /// passed still gets through; other lines follow the runtime filter.
    #[test]
    fn the_runtime_filter_cannot_quiet_the_audit_trail() {
        use tracing_subscriber::prelude::*;
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Lines::default();
        let writer = out.clone();
        let (filter, set) = log_filter("info");
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_filter(filter),
        );
        tracing::subscriber::with_default(subscriber, || {
            let emit = |n: u32| {
                tracing::info!(target: "moat::access", n, "audit_access");
                tracing::warn!(target: "moat::policy", n, "audit_decision");
                tracing::info!(target: "moat_proxy::inbound", n, "other_line");
                tracing::debug!(target: "moat::access", n, "debug_access");
            };
            emit(1);
            set("off").unwrap();
            emit(2);
            assert!(set("verbose").is_err());
            set("moat::access=debug,warn").unwrap();
            emit(3);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let has = |msg: &str, n: u32| text.contains(&format!("{msg} n={n}"));
        for n in [1, 2, 3] {
            assert!(has("audit_access", n), "access line {n}:\n{text}");
            assert!(has("audit_decision", n), "decision line {n}:\n{text}");
        }
        assert!(has("other_line", 1), "{text}");
        assert!(!has("other_line", 2), "off quiets other targets:\n{text}");
        assert!(!has("other_line", 3), "{text}");
        assert!(!has("debug_access", 1) && !has("debug_access", 2), "{text}");
        assert!(has("debug_access", 3), "louder is allowed:\n{text}");
    }

    #[test]
    fn durations_are_logged_in_whole_microseconds() {
        assert_eq!(millis(Duration::from_nanos(165_321)), 0.165);
        assert_eq!(
            millis(Duration::from_nanos(165_321_999)).to_string(),
            "165.321"
        );
        assert_eq!(millis(Duration::from_secs(2)), 2000.0);
    }

    #[test]
    fn request_ids_are_distinct_16_hex_digits() {
        let (a, b) = (RequestId::next(), RequestId::next());
        assert_ne!(a, b);
        for id in [a, b] {
            let s = id.to_string();
            assert!(
                s.len() == 16 && s.bytes().all(|c| c.is_ascii_hexdigit()),
                "{s}"
            );
        }
    }

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
            AuthzDecision::Allow,
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
