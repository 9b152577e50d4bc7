//! Policy tests: a TOML file of requests and the decisions they must get,
//! run by `moat policy test POLICY CASES` so operators can keep tests beside
//! their policy and run them in their own CI.
//!
//! ```toml
//! [[case]]
//! name   = "frontend reads invoices"          # optional
//! peer   = "spiffe://example.org/ns/prod/sa/frontend"
//! method = "GET"
//! path   = "/invoices/42"
//! host   = "billing.example.org"              # optional
//! claims = { sub = "alice", scope = "invoices:read" }   # stands for a verified token
//! # jwt  = "eyJ..."                           # or a real token, fully verified
//! expect = "allow"                            # allow | deny (403) | unauthenticated (401) | bad-request (400)
//! route  = "read-invoices"                    # optional: the route that must decide
//! reason = "allowed"                          # optional: the reason code
//! ```
//!
//! Decisions are what enforcement would do (audit mode is ignored), at the
//! current time. `method` is case-sensitive, as on the wire: one with a
//! lower-case letter is refused with the file's other diagnostics (the
//! proxy answers it 400 `method_not_uppercase` before any route is tried).

use std::path::Path;
use std::time::SystemTime;

use http::Method;
use moat_ca::SpiffeId;
use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;

use super::file::Diags;
use super::{Policy, PolicyError, RequestFacts, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCases {
    #[serde(rename = "case")]
    cases: Vec<Spanned<RawCase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: Option<String>,
    peer: Spanned<String>,
    method: Spanned<String>,
    path: String,
    host: Option<String>,
    claims: Option<Spanned<toml::Table>>,
    jwt: Option<String>,
    expect: Spanned<Expect>,
    route: Option<String>,
    reason: Option<String>,
}

/// The decision a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum Expect {
    /// Forwarded (200 from the proxy's point of view).
    #[serde(rename = "allow")]
    Allow,
    /// 403.
    #[serde(rename = "deny", alias = "403")]
    Deny,
    /// 401.
    #[serde(rename = "unauthenticated", alias = "401")]
    Unauthenticated,
    /// 400.
    #[serde(rename = "bad-request", alias = "400")]
    BadRequest,
}

/// One failed case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseFailure {
    /// The case's name (or `METHOD PATH as PEER`).
    pub name: String,
    /// The case's line in the cases file.
    pub line: usize,
    /// What was expected and what happened.
    pub message: String,
}

/// The result of running a cases file.
#[derive(Debug, Clone, Default)]
pub struct CaseReport {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: Vec<CaseFailure>,
}

struct Case {
    name: String,
    line: usize,
    peer: SpiffeId,
    method: Method,
    path: String,
    host: Option<String>,
    claims: Option<Map<String, Value>>,
    jwt: Option<String>,
    expect: Expect,
    route: Option<String>,
    reason: Option<String>,
}

impl Expect {
    /// The spelling a cases file uses for this decision.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
            Expect::Unauthenticated => "unauthenticated",
            Expect::BadRequest => "bad-request",
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads a cases file and runs every case against `policy` at time `now`.
/// A malformed cases file is an error with file:line:column diagnostics.
pub(crate) fn run_cases(
    policy: &Policy,
    cases_file: &Path,
    now: SystemTime,
) -> Result<CaseReport, PolicyError> {
    let text = std::fs::read_to_string(cases_file).map_err(|source| PolicyError::Read {
        file: cases_file.to_path_buf(),
        source,
    })?;
    let cases = parse_cases(cases_file, &text)?;
    let mut report = CaseReport::default();
    for case in &cases {
        match run_one(policy, case, now) {
            Ok(()) => report.passed += 1,
            Err(message) => report.failed.push(CaseFailure {
                name: case.name.clone(),
                line: case.line,
                message,
            }),
        }
    }
    Ok(report)
}

fn parse_cases(file: &Path, text: &str) -> Result<Vec<Case>, PolicyError> {
    let mut diags = Diags::new(file, text);
    let raw: RawCases = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            diags.toml(&e);
            return Err(diags.finish().unwrap_err());
        }
    };
    let mut out = Vec::new();
    for spanned in raw.cases {
        let line = moat_ca::toml_error::line_col(text, spanned.span().start).0;
        let raw = spanned.into_inner();
        let peer = match SpiffeId::parse(raw.peer.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                diags.at(
                    raw.peer.span(),
                    format!("peer {:?}: {e}", raw.peer.get_ref()),
                );
                None
            }
        };
        // Methods are case-sensitive (RFC 9110 §9.1) and the proxy answers
        // one with a lower-case letter 400 (`method_not_uppercase`) before
        // any route is tried, so no case could pass as written: refused, as
        // the policy file's own `methods` refuses `"get"`, rather than run
        // as GET (a test saying `get` is allowed when the proxy refuses it)
        // or as the 400 (a `get` here is a typo for GET, not a test of the
        // proxy's request-head checks).
        let m = raw.method.get_ref();
        let method = if m.bytes().any(|b| b.is_ascii_lowercase()) {
            diags.at(
                raw.method.span(),
                format!(
                    "method {m:?} must be upper case ({:?}): methods are case-sensitive, and the proxy refuses {m:?} with 400 (method_not_uppercase) before any route is tried",
                    m.to_ascii_uppercase()
                ),
            );
            None
        } else if let Ok(m) = Method::from_bytes(m.as_bytes()) {
            Some(m)
        } else {
            diags.at(raw.method.span(), format!("{m:?} is not an HTTP method"));
            None
        };
        let claims = match raw.claims {
            Some(table) => match serde_json::to_value(table.get_ref()) {
                Ok(Value::Object(map)) => Some(map),
                _ => {
                    diags.at(
                        table.span(),
                        "claims must be a table of JSON-compatible values",
                    );
                    None
                }
            },
            None => None,
        };
        if let (Some(peer), Some(method)) = (peer, method) {
            let name = raw
                .name
                .unwrap_or_else(|| format!("{} {} as {}", method, raw.path, peer));
            out.push(Case {
                name,
                line,
                peer,
                method,
                path: raw.path,
                host: raw.host,
                claims,
                jwt: raw.jwt,
                expect: *raw.expect.get_ref(),
                route: raw.route,
                reason: raw.reason,
            });
        }
    }
    diags.finish()?;
    Ok(out)
}

fn run_one(policy: &Policy, case: &Case, now: SystemTime) -> Result<(), String> {
    let authorization = case.jwt.as_ref().map(|t| format!("Bearer {t}"));
    let facts = RequestFacts {
        method: &case.method,
        host: case.host.as_deref(),
        path: &case.path,
        peer: &case.peer,
        authorization: authorization.as_deref(),
    };
    let d = match &case.claims {
        Some(claims) => policy.authorize_assuming_claims(&facts, claims, now),
        None => policy.authorize(&facts, now),
    };
    let got = match d.verdict {
        Verdict::Allow => Expect::Allow,
        Verdict::Forbidden => Expect::Deny,
        Verdict::Unauthenticated => Expect::Unauthenticated,
        Verdict::BadRequest => Expect::BadRequest,
    };
    let route = d.route.unwrap_or("(none)");
    let mut problems = Vec::new();
    if got != case.expect {
        problems.push(format!("expected {}, got {}", case.expect, got));
    }
    if let Some(want) = &case.route
        && want != route
    {
        if policy.route_names().any(|n| n == want) {
            problems.push(format!("expected route {want:?}, got {route:?}"));
        } else {
            let hint = super::hint::nearest(want, policy.route_names())
                .map(|n| format!(": did you mean {n:?}?"))
                .unwrap_or_default();
            problems.push(format!(
                "expected route {want:?}, which the policy does not define{hint} (got {route:?})"
            ));
        }
    }
    if let Some(want) = &case.reason
        && want != d.reason.as_str()
    {
        problems.push(format!("expected reason {want}, got {}", d.reason));
    }
    let claim = d
        .claim
        .map(|c| format!(" (claim {c:?})"))
        .unwrap_or_default();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} (route {route:?}, reason {}: {}{claim})",
            problems.join("; "),
            d.reason,
            d.detail
        ))
    }
}
