//! What request spans carry, as the OpenTelemetry HTTP semantic
//! conventions name it: the method (`_OTHER` for one they do not know,
//! the original in `http.request.method_original`), the span name
//! (`{method} {target}`, or `HTTP {target}` for such a method), and the
//! response status as an integer. Only called when traces are exported.

use http::{Method, Response};

/// `http.request.method`: a method the conventions know, as sent (methods
/// are case-sensitive: `delete` is not `DELETE`), else `_OTHER`.
pub fn otel_method(method: &Method) -> &'static str {
    match *method {
        Method::CONNECT => "CONNECT",
        Method::DELETE => "DELETE",
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// The first word of a span's name: the method, or `HTTP` for one the
/// conventions do not know.
pub fn span_method(method: &Method) -> &'static str {
    match otel_method(method) {
        "_OTHER" => "HTTP",
        known => known,
    }
}

/// Records on `span` what the conventions ask beside `http.request.method`
/// (declared `Empty` on it): `http.request.method_original` for a method
/// they do not know.
pub fn record_method_original(span: &tracing::Span, method: &Method) {
    if otel_method(method) == "_OTHER" {
        span.record("http.request.method_original", method.as_str());
    }
}

/// Records the response status on `span` as the integer the conventions
/// ask for (a `u16` would reach OpenTelemetry as a string).
pub fn record_status(span: &tracing::Span, status: u16) {
    span.record("http.response.status_code", i64::from(status));
}

/// Records on an upstream call's client span the status it was answered
/// with (nothing when it failed, or when the span is disabled).
pub fn record_answer<B, E>(span: &tracing::Span, sent: &Result<Response<B>, E>) {
    if let Ok(resp) = sent {
        record_status(span, resp.status().as_u16());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_are_other_and_their_spans_http() {
        let lower = Method::from_bytes(b"delete").unwrap();
        assert_eq!(otel_method(&lower), "_OTHER");
        assert_eq!(span_method(&lower), "HTTP");
        let custom = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(span_method(&custom), "HTTP");
        assert_eq!(otel_method(&Method::DELETE), "DELETE");
        assert_eq!(span_method(&Method::GET), "GET");
    }
}
