//! W3C trace context (`traceparent`, `tracestate`): continued from the
//! request that came in, passed on to the next hop, and the trace ID for
//! the access log.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;

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
    // The propagator writes `tracestate` even when the trace has none: an
    // empty header the caller never sent (W3C trace context lets it be
    // left out).
    if headers
        .get("tracestate")
        .is_some_and(http::HeaderValue::is_empty)
    {
        headers.remove("tracestate");
    }
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
