//! What a decision does to the HTTP exchange: the status and response of
//! a denial, the headers of a forwarded request (claim headers in,
//! client-sent claim headers and consumed tokens out), the path it is
//! forwarded with, and the decision log line.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use super::{Decision, NormalizedPath, Reason, RequestFacts, Verdict};

impl Decision<'_> {
    /// True when the request goes to the service (allowed, or audited).
    pub fn forwards(&self) -> bool {
        self.verdict == Verdict::Allow || (self.audited && self.verdict != Verdict::BadRequest)
    }

    /// The status enforcement gives: 200 for allow, else 403, 401 or 400.
    pub fn status(&self) -> StatusCode {
        match self.verdict {
            Verdict::Allow => StatusCode::OK,
            Verdict::Forbidden => StatusCode::FORBIDDEN,
            Verdict::Unauthenticated => StatusCode::UNAUTHORIZED,
            Verdict::BadRequest => StatusCode::BAD_REQUEST,
        }
    }

    /// The path and query to forward: the normalized path, never the raw one.
    pub fn forward_path(&self) -> Option<Cow<'_, str>> {
        self.path.as_ref().map(NormalizedPath::path_and_query)
    }

    /// Rewrites the headers of a request that [`forwards`](Self::forwards):
    /// removes every claim header of the policy the client sent (also
    /// spelled with `_` for `-`), removes `Authorization` when the route
    /// consumed it, and adds verified claims.
    pub fn apply_to_headers(&self, headers: &mut HeaderMap) {
        for name in self.strip_headers {
            headers.remove(name);
        }
        crate::headers::remove_underscore_spellings(headers, self.strip_headers);
        if self.strip_authorization {
            headers.remove(http::header::AUTHORIZATION);
        }
        for (name, value) in &self.add_headers {
            headers.append(name.clone(), value.clone());
        }
    }

    /// The response for a request that does not go through, or `None` when
    /// it [`forwards`](Self::forwards). 401s carry `WWW-Authenticate: Bearer`
    /// (with `error="invalid_token"` when a token was presented, per RFC
    /// 6750); the JSON body names the route and reason, never the token.
    pub fn deny_response(&self) -> Option<Response<Full<Bytes>>> {
        if self.forwards() {
            return None;
        }
        let status = self.status();
        let error = match self.verdict {
            Verdict::Unauthenticated => "unauthenticated",
            Verdict::BadRequest => "bad_request",
            _ => "forbidden",
        };
        let body = serde_json::json!({
            "error": error,
            "reason": self.reason.as_str(),
            "route": self.route,
        })
        .to_string();
        let mut resp = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CACHE_CONTROL, "no-store");
        match self.reason {
            Reason::JwtMissing => {
                resp = resp.header(http::header::WWW_AUTHENTICATE, "Bearer realm=\"moat\"");
            }
            _ if self.verdict == Verdict::Unauthenticated => {
                let v = format!(
                    "Bearer realm=\"moat\", error=\"invalid_token\", error_description=\"{}\"",
                    self.reason.as_str()
                );
                resp = resp.header(http::header::WWW_AUTHENTICATE, v);
            }
            Reason::ClaimMismatch => {
                resp = resp.header(
                    http::header::WWW_AUTHENTICATE,
                    "Bearer realm=\"moat\", error=\"insufficient_scope\"",
                );
            }
            _ => {}
        }
        Some(
            resp.body(Full::new(Bytes::from(body)))
                .expect("static response parts"),
        )
    }

    /// Emits the decision log line for a denial or an audited would-be
    /// denial (nothing for an allow): request id (the access log line's),
    /// decision (`deny`, or `audit_allow` as in the access log and metrics),
    /// status (for `audit_allow`: 200, the request went on, with
    /// `would_be_status` the status enforcement would have answered), route
    /// (`-` for none, as in the access log), policy hash, peer, JWT `iss` and
    /// `sub`, method, path, reason and, for a claim reason, the claim's name,
    /// as structured fields.
    pub fn log(&self, facts: &RequestFacts<'_>, policy_hash: &str, request_id: impl fmt::Display) {
        if self.verdict == Verdict::Allow {
            return;
        }
        let path = self.path.as_ref().map_or(facts.path, |p| &p.path);
        // The decision and status as the access log and metrics have them:
        // an audited denial is `audit_allow`, answered by the service (200
        // here stands for "forwarded"); `would_be_status` is enforcement's.
        let (message, decision, status, would_be_status) = if self.forwards() {
            (
                "request would be denied (audit mode)",
                "audit_allow",
                StatusCode::OK.as_u16(),
                Some(self.status().as_u16()),
            )
        } else {
            ("request denied", "deny", self.status().as_u16(), None)
        };
        tracing::warn!(
            target: "moat::policy",
            request_id = %request_id,
            decision,
            status,
            would_be_status,
            route = self.route.unwrap_or("-"),
            policy_hash,
            peer = %facts.peer,
            jwt_iss = self.jwt_iss.as_deref().unwrap_or(""),
            jwt_sub = self.jwt_sub.as_deref().unwrap_or(""),
            method = %facts.method,
            path,
            reason = self.reason.as_str(),
            claim = self.claim,
            "{message}"
        );
    }
}

/// A claim as a header value: strings as is, numbers and booleans as JSON,
/// arrays of strings joined with `,`. `None` (the request is refused) for a
/// value that is not a valid header value (CR, LF, NUL or another control
/// character; UTF-8 text is sent as its bytes), `null`, an object, or an array holding anything
/// but strings, or a string with a `,` (which the service could not tell
/// from two items).
pub(super) fn claim_header_value(v: &Value) -> Option<HeaderValue> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => {
            let parts: Option<Vec<&str>> = items
                .iter()
                .map(|i| i.as_str().filter(|s| !s.contains(',')))
                .collect();
            parts?.join(",")
        }
        Value::Null | Value::Object(_) => return None,
    };
    HeaderValue::from_str(&text).ok()
}
