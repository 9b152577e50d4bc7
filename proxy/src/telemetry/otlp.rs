//! The OTLP trace pipeline: the exporter (gRPC or HTTP/protobuf) behind a
//! batch processor, wrapped to count the spans a failed export loses.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData};
use prometheus_client::metrics::counter::Counter;

use super::{OtlpProtocol, TelemetryError, TraceSettings};

/// A running trace pipeline; flushes and shuts down on drop.
pub struct Tracing {
    provider: SdkTracerProvider,
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
