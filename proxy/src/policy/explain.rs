//! `moat policy explain`: the decision for one request, with every route
//! tried before the deciding one and why it did not match. A separate pass
//! over the routes, so that the request path carries no tracing.

use std::fmt;
use std::time::SystemTime;

use serde_json::{Map, Value};

use super::engine::{Credential, Mismatch, host_without_port};
use super::path::{self, PathError};
use super::{ClaimValue, Method, Policy, Reason, RequestFacts, Route, Rule};

/// What `moat policy explain` prints: the decision and, for every route
/// before the deciding one, why it did not match.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The policy's status code (200 for allow); when `refused` is set,
    /// the proxy answers 400 before the policy is asked.
    pub status: u16,
    /// The decision's reason code.
    pub reason: Reason,
    /// The deciding route, if any.
    pub route: Option<String>,
    /// The deciding route's line in the file.
    pub route_line: Option<usize>,
    /// The deciding route's path pattern, as written.
    pub route_path: Option<String>,
    /// The normalized path and query (what the service would receive), or
    /// the normalization error.
    pub normalized: Result<String, PathError>,
    /// Short explanation.
    pub detail: &'static str,
    /// For `claim_mismatch`: the unmet condition, as `"scope" must hold "a:read"`.
    pub claim: Option<String>,
    /// True when audit mode would let a denial through.
    pub audited: bool,
    /// One line per route tried before the decision.
    pub trace: Vec<String>,
    /// Headers that would be added.
    pub add_headers: Vec<(String, String)>,
    /// For `jwt_unknown_kid`, when the issuer's last key fetch (or read)
    /// failed: the issuer's name and why, which is then the likelier cause.
    pub keys_error: Option<(String, String)>,
    /// Set when the proxy refuses the request with 400 before the policy is
    /// asked: the refusal's reason code and why; the rest is the policy's
    /// decision for the request as probably meant.
    pub refused: Option<(&'static str, String)>,
}

impl Policy {
    /// Explains the decision for a request: the normalized path, every route
    /// tried and why it did not match, and the deciding route's verdict.
    /// `claims`, when given, stand in for a verified token.
    pub fn explain(
        &self,
        facts: &RequestFacts<'_>,
        claims: Option<&Map<String, Value>>,
        now: SystemTime,
    ) -> Explanation {
        let cred = match claims {
            Some(c) => Credential::Assumed(c),
            None => Credential::Header(facts.authorization),
        };
        // The same decision as `authorize`, but the route is found by a
        // full scan that notes why each earlier route did not match; the
        // hot path's index lookup is not burdened with tracing (a test
        // checks that both find the same route).
        let mut trace = Vec::new();
        let d = match path::normalize(facts.path) {
            Err(_) => self.refused_path(),
            Ok(normalized) => {
                let host = facts.host.map(host_without_port);
                let matched =
                    self.first_match_traced(facts.method, host, &normalized.path, &mut trace);
                self.decide_on(matched, normalized, facts, cred, now)
            }
        };
        let deciding = d
            .route
            .and_then(|n| self.routes.iter().find(|r| r.name == n));
        Explanation {
            status: d.status().as_u16(),
            reason: d.reason,
            route: d.route.map(str::to_owned),
            route_line: deciding.map(|r| r.line),
            route_path: deciding.map(|r| r.path.as_str().to_owned()),
            normalized: path::normalize(facts.path).map(|n| n.path_and_query().into_owned()),
            detail: d.detail,
            claim: d.claim.and_then(|name| {
                if d.reason == Reason::JwtClaimUnforwardable {
                    return Some(format!("{name:?} cannot be a header value"));
                }
                let want = deciding?.claim_condition(name)?;
                Some(format!("{name:?} must hold {}", want.describe()))
            }),
            keys_error: deciding
                .filter(|_| d.reason == Reason::JwtUnknownKid)
                .and_then(|r| self.keys_error(r)),
            audited: d.audited,
            trace,
            add_headers: d
                .add_headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            refused: None,
        }
    }

    /// Every route in file order until the first match, noting why each
    /// earlier one did not match (for `explain`).
    fn first_match_traced(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        trace: &mut Vec<String>,
    ) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| match route.matches(method, host, path) {
                Ok(()) => true,
                Err(why) => {
                    let why = match why {
                        Mismatch::Method => "method does not match".to_owned(),
                        Mismatch::Host => "host does not match".to_owned(),
                        Mismatch::Path => format!("path does not match {:?}", route.path),
                    };
                    trace.push(format!(
                        "route {:?} (line {}): {why}",
                        route.name, route.line
                    ));
                    false
                }
            })
    }
}

impl Policy {
    /// The issuer of `route` and why its last key fetch failed, if it did.
    fn keys_error(&self, route: &Route) -> Option<(String, String)> {
        let Rule::Allow { jwt: Some(jwt), .. } = &route.rule else {
            return None;
        };
        let issuer = &self.issuers[jwt.issuer];
        let error = issuer.keys.stats().last_error?;
        Some((issuer.name.clone(), error))
    }
}

impl Route {
    /// The route's condition on claim `name`, if it has one.
    fn claim_condition(&self, name: &str) -> Option<&ClaimValue> {
        match &self.rule {
            Rule::Allow { jwt: Some(jwt), .. } => {
                jwt.claims.iter().find(|(n, _)| n == name).map(|(_, v)| v)
            }
            _ => None,
        }
    }
}

impl ClaimValue {
    /// As written in the policy file (`"a"`, `3`, `true`, `["a", "b"]`).
    fn describe(&self) -> String {
        match self {
            Self::String(s) => format!("{s:?}"),
            Self::Integer(i) => i.to_string(),
            Self::Bool(b) => b.to_string(),
            Self::All(all) => format!(
                "[{}]",
                all.iter()
                    .map(Self::describe)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((reason, why)) = &self.refused {
            writeln!(f, "decision: refused 400 ({reason}): {why}")?;
        }
        match &self.normalized {
            Ok(p) => writeln!(f, "normalized path: {p}")?,
            Err(e) => writeln!(f, "normalized path: refused ({e})")?,
        }
        for line in &self.trace {
            writeln!(f, "  skipped {line}")?;
        }
        match (&self.route, self.route_line) {
            (Some(r), Some(line)) => {
                write!(f, "deciding route: {r:?} (line {line})")?;
                match &self.route_path {
                    Some(p) => writeln!(f, ": path {p:?}")?,
                    None => writeln!(f)?,
                }
            }
            _ => writeln!(f, "deciding route: none")?,
        }
        let verdict = match self.status {
            200 => "allow".to_owned(),
            s => format!("deny {s}"),
        };
        match (&self.keys_error, &self.claim) {
            // No key at all, or none since a failed refetch: the fetch is
            // what to fix, not the token.
            (Some((issuer, error)), _) => writeln!(
                f,
                "decision: {verdict} ({}): the keys of issuer {issuer:?} could not be fetched: {error}",
                self.reason
            )?,
            (None, Some(claim)) => writeln!(
                f,
                "decision: {verdict} ({}): {}: claim {claim}",
                self.reason, self.detail
            )?,
            (None, None) => writeln!(f, "decision: {verdict} ({}): {}", self.reason, self.detail)?,
        }
        if self.audited {
            writeln!(f, "audit mode: the request would be let through and logged")?;
        }
        for (k, v) in &self.add_headers {
            writeln!(f, "adds header: {k}: {v}")?;
        }
        Ok(())
    }
}
