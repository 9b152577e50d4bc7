//! Traces, metrics and access logs.
//!
//! - **Traces** (`otlp`, `propagation`): OpenTelemetry over OTLP (gRPC
//!   or HTTP/protobuf), configured by `[telemetry]` or the standard `OTEL_*`
//!   variables. W3C trace context is continued from peers and passed on to
//!   the service and to peers. Export is batched on a background thread and
//!   never blocks a request; spans that cannot be exported are dropped and
//!   counted.
//! - **Metrics** (`metrics`): [`ProxyMetrics`], Prometheus text at the
//!   admin `/metrics`.
//! - **Access log** (`access_log`): [`request_done`], one JSON line per
//!   request.
//! - **Log filter** (`logging`): [`log_filter`], changeable at runtime
//!   through the admin listener, except that the audit trail
//!   ([`AUDIT_TARGETS`]) never gets quieter than it started.
//!
//! This file holds the `[telemetry]` configuration, what the listeners are
//! handed ([`Observability`]) and the set-up error; every public item of the
//! submodules is re-exported here, so callers name `telemetry::X`.

use std::collections::HashMap;

use serde::Deserialize;

mod access_log;
mod logging;
mod metrics;
mod otlp;
mod propagation;
mod spans;

pub use access_log::{AccessEntry, RequestId, millis, request_done};
pub use logging::{
    AUDIT_TARGETS, LOG_LEVELS, LogFilterError, LogLevelHandle, check_log_filter, is_audit_target,
    log_filter,
};
pub use metrics::{ListenerMetrics, OpenConnection, ProxyMetrics, method_class, status_class};
pub use otlp::Tracing;
pub use propagation::{continue_trace, propagate, trace_id};
pub use spans::{otel_method, record_answer, record_method_original, record_status, span_method};

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
                None | Some("grpc" | "") => OtlpProtocol::Grpc,
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

impl std::fmt::Debug for Observability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observability")
            .field("tracing", &self.tracing)
            .finish()
    }
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
}
