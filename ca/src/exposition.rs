//! Which text format a `/metrics` scrape gets, and the conversion to it.
//!
//! The metrics are encoded in the OpenMetrics text format
//! (`prometheus-client`). Prometheus asks for OpenMetrics first and gets
//! it; anything else (curl, `promtool check metrics`, older scrapers, an
//! `Accept: text/plain;version=0.0.4`) gets the Prometheus text format
//! 0.0.4, as the Prometheus client libraries negotiate: counters' `HELP`
//! and `TYPE` on the `_total` name their samples carry, no `# UNIT` and no
//! `# EOF` lines, no `_created` samples, and the OpenMetrics-only types
//! named as 0.0.4 knows them. The conversion is one pass over the encoded
//! text, once per scrape.

use http::HeaderValue;

/// The OpenMetrics media type, as answered.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's media type, as answered.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A `/metrics` answer's text format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text, as encoded.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Prometheus,
}

impl Format {
    /// The format a request's `Accept` header asks for: OpenMetrics when it
    /// names `application/openmetrics-text` with a weight (`q`) above 0 and
    /// at least that of every `text/plain` it names; otherwise (no header,
    /// `*/*`, `text/plain`) the Prometheus text format.
    pub fn negotiate(accept: Option<&HeaderValue>) -> Self {
        let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
            return Format::Prometheus;
        };
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut params = range.split(';');
            let media = params.next().unwrap_or("").trim();
            let q = params
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if media.eq_ignore_ascii_case("application/openmetrics-text") {
                openmetrics = openmetrics.max(q);
            } else if media.eq_ignore_ascii_case("text/plain") {
                text = text.max(q);
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS,
            Format::Prometheus => PROMETHEUS_TEXT,
        }
    }

    /// `openmetrics` (as `prometheus-client` encodes it) in this format.
    pub fn render(self, openmetrics: String) -> String {
        match self {
            Format::OpenMetrics => openmetrics,
            Format::Prometheus => to_prometheus_text(&openmetrics),
        }
    }
}

/// OpenMetrics text to the Prometheus text format 0.0.4.
///
/// `prometheus-client` writes each family as `# HELP`, `# TYPE`, an
/// optional `# UNIT`, then its samples; a counter family is named without
/// the `_total` its samples carry. So: the `TYPE` line that follows a
/// `HELP` line says whether both are renamed; `UNIT` and `EOF` lines and a
/// counter's `_created` samples are dropped; exemplars (` # {...}` after a
/// sample) are cut.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + openmetrics.len() / 16);
    let mut lines = openmetrics.lines().peekable();
    // The counter family being written, for its `_created` samples.
    let mut counter: Option<&str> = None;
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = lines
                .peek()
                .copied()
                .and_then(|next| next.strip_prefix("# TYPE "))
                .and_then(|t| t.split_once(' '))
                .filter(|(n, _)| *n == name)
                .map(|(_, kind)| kind);
            counter = (kind == Some("counter")).then_some(name);
            out.push_str("# HELP ");
            push_name(&mut out, name, kind);
            out.push(' ');
            out.push_str(help);
            out.push('\n');
            if let Some(kind) = kind {
                lines.next();
                out.push_str("# TYPE ");
                push_name(&mut out, name, Some(kind));
                out.push(' ');
                out.push_str(match kind {
                    "unknown" => "untyped",
                    "info" | "stateset" => "gauge",
                    "gaugehistogram" => "histogram",
                    other => other,
                });
                out.push('\n');
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            // A TYPE line without a HELP before it: renamed the same way.
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            counter = (kind == "counter").then_some(name);
            out.push_str("# TYPE ");
            push_name(&mut out, name, Some(kind));
            out.push(' ');
            out.push_str(if kind == "unknown" { "untyped" } else { kind });
            out.push('\n');
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            // OpenMetrics only.
        } else if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
        } else {
            if let Some(family) = counter
                && line
                    .strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with("_created"))
            {
                continue;
            }
            out.push_str(without_exemplar(line));
            out.push('\n');
        }
    }
    out
}

/// A sample line without its exemplar: what follows the first ` # `
/// outside a quoted label value.
fn without_exemplar(line: &str) -> &str {
    if !line.contains(" # ") {
        return line;
    }
    let bytes = line.as_bytes();
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in bytes.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'#' if !quoted && i > 0 && bytes[i - 1] == b' ' => return &line[..i - 1],
            _ => {}
        }
    }
    line
}

/// A family's name as the Prometheus text format has it: a counter's with
/// `_total`, an info's with `_info`.
fn push_name(out: &mut String, name: &str, kind: Option<&str>) {
    out.push_str(name);
    match kind {
        Some("counter") if !name.ends_with("_total") => out.push_str("_total"),
        Some("info") if !name.ends_with("_info") => out.push_str("_info"),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENMETRICS_TEXT: &str = "\
# HELP moat_requests HTTP requests.
# TYPE moat_requests counter
moat_requests_total{listener=\"api\",route=\"a \\\" # b\"} 3
moat_requests_created{listener=\"api\"} 1700000000.0
# HELP moat_request_duration_seconds Latency.
# TYPE moat_request_duration_seconds histogram
# UNIT moat_request_duration_seconds seconds
moat_request_duration_seconds_bucket{le=\"+Inf\"} 1 # {trace_id=\"abc\"} 0.5
moat_request_duration_seconds_sum 0.5
moat_request_duration_seconds_count 1
# HELP moat_build_info Build.
# TYPE moat_build_info gauge
moat_build_info{version=\"0.1.0\"} 1
# HELP moat_build Build, as an info.
# TYPE moat_build info
moat_build_info{version=\"0.1.0\"} 1
# EOF
";

    #[test]
    fn counters_are_named_with_total_and_openmetrics_lines_go() {
        let text = to_prometheus_text(OPENMETRICS_TEXT);
        assert_eq!(
            text,
            "\
# HELP moat_requests_total HTTP requests.
# TYPE moat_requests_total counter
moat_requests_total{listener=\"api\",route=\"a \\\" # b\"} 3
# HELP moat_request_duration_seconds Latency.
# TYPE moat_request_duration_seconds histogram
moat_request_duration_seconds_bucket{le=\"+Inf\"} 1
moat_request_duration_seconds_sum 0.5
moat_request_duration_seconds_count 1
# HELP moat_build_info Build.
# TYPE moat_build_info gauge
moat_build_info{version=\"0.1.0\"} 1
# HELP moat_build_info Build, as an info.
# TYPE moat_build_info gauge
moat_build_info{version=\"0.1.0\"} 1
"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for_first() {
        let ask = |accept: &str| Format::negotiate(Some(&HeaderValue::from_str(accept).unwrap()));
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(ask("*/*"), Format::Prometheus);
        assert_eq!(ask("text/plain;version=0.0.4"), Format::Prometheus);
        // What Prometheus 2.x and 3.x send.
        assert_eq!(
            ask(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            ),
            Format::OpenMetrics
        );
        assert_eq!(
            ask(
                "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            ),
            Format::OpenMetrics
        );
        assert_eq!(
            ask("text/plain;q=1, application/openmetrics-text;q=0.5"),
            Format::Prometheus
        );
        assert_eq!(ask("application/openmetrics-text;q=0"), Format::Prometheus);
    }
}
