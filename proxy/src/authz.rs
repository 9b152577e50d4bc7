//! The authorization step on the inbound HTTP path.
//!
//! Right before a request is forwarded to the local service, the inbound
//! listener asks its [`Authorizer`] whether the verified peer may make it.
//! Without a route policy every request from a peer that passed the
//! handshake (and `allow_peers`) goes through; with one, the policy engine
//! ([`crate::policy`]) decides per route, may rewrite the path to its
//! normalized form, and adds headers from verified JWT claims.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Response, StatusCode, header};
use moat_ca::SpiffeId;

use crate::body::ProxyBody;
use crate::policy::{Policy, Reason, RequestFacts, authorization_value};
use crate::telemetry::RequestId;

/// Headers that ask a service to treat a request as another method.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// What the authorization step decided, for forwarding and the access log.
#[derive(Debug)]
pub struct Outcome {
    /// What metrics, spans and the access log keep once forwarding is done.
    pub record: AuthzRecord,
    /// The path and query in normalized form: forwarded with when allowed,
    /// logged beside the raw one either way; `None`: as is (or refused).
    pub forward_path: Option<PathAndQuery>,
    /// Answer the caller with this instead of forwarding (400, 401 or 403).
    /// Boxed: an outcome is held across an `.await` in every request's
    /// future, and a response would make it three times the size.
    pub deny: Option<Box<Response<ProxyBody>>>,
}

/// The authorization of one request as metrics, spans and the access log
/// name it. (Not [`crate::policy::Verdict`], the policy's status class.)
#[derive(Debug)]
pub struct AuthzRecord {
    /// The route that decided (`None`: no policy, or no route matched).
    pub route: Option<String>,
    /// What became of the request.
    pub decision: AuthzDecision,
    /// Why.
    pub reason: AuthzReason,
}

/// The codes of the answers of the request checks that run before the
/// policy ([`AuthzReason::Refused`]).
pub(crate) const REFUSALS: [&str; 8] = [
    "method_not_uppercase",
    "invalid_host",
    "missing_host",
    "unsupported_transfer_encoding",
    "bad_request",
    "request_headers_too_large",
    "uri_too_long",
    "connect_not_supported",
];

/// What the authorization step did with a request; [`AuthzDecision::as_str`]
/// is the `decision` label of the access log, metrics and spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthzDecision {
    /// No authorization step: no policy is configured (and every outbound
    /// request). On a listener with a policy a request refused before the
    /// policy saw it is a [`AuthzDecision::Deny`].
    None,
    /// The policy allowed the request.
    Allow,
    /// The request was refused.
    Deny,
    /// The policy would have refused it, but audit mode let it through.
    AuditAllow,
}

/// Why the authorization step decided as it did; [`AuthzReason::as_str`] is
/// the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthzReason {
    /// No route policy is configured.
    NoPolicy,
    /// The request carried a method override header (refused before the policy).
    MethodOverride,
    /// The request checks refused the request before the policy saw it:
    /// the code of the 400 (or 414, 431, 501) answer, as in its body, by
    /// its place in [`REFUSALS`] (an index, not a `&str`: the record is
    /// held across an `.await` in every request's future).
    Refused(u8),
    /// The policy's own reason code.
    Policy(Reason),
}

/// Decides whether a request from a verified peer goes on to the service.
#[derive(Clone)]
pub enum Authorizer {
    /// No route policy: every request from an admitted peer is forwarded.
    AllowAll,
    /// The per-route policy, swapped in place on reload.
    Policy(Arc<ArcSwap<Policy>>),
}

impl Authorizer {
    /// Authorizes one request, rewriting its head as the policy says
    /// (claim headers in, client-sent claim headers and consumed tokens out).
    /// `request_id` goes on the decision log line, as on the access log's.
    /// A gRPC caller's denial carries `grpc-status` and `grpc-message` (see
    /// [`crate::proxy_error::grpc_denial`]).
    pub async fn authorize(
        &self,
        parts: &mut Parts,
        peer: &SpiffeId,
        request_id: RequestId,
    ) -> Outcome {
        let policy = match self {
            Authorizer::AllowAll => {
                return Outcome {
                    record: AuthzRecord {
                        route: None,
                        decision: AuthzDecision::None,
                        reason: AuthzReason::NoPolicy,
                    },
                    forward_path: None,
                    deny: None,
                };
            }
            Authorizer::Policy(p) => p.load_full(),
        };
        // The policy decides on the request method; a service (or its
        // framework) honouring one of these would act on another.
        if METHOD_OVERRIDES
            .iter()
            .any(|h| parts.headers.contains_key(*h))
        {
            return Outcome {
                record: AuthzRecord {
                    route: None,
                    decision: AuthzDecision::Deny,
                    reason: AuthzReason::MethodOverride,
                },
                forward_path: None,
                deny: Some(Box::new(crate::proxy_error::refusal(
                    StatusCode::BAD_REQUEST,
                    AuthzReason::MethodOverride.as_str(),
                    "moat: method override headers are refused",
                    crate::headers::is_grpc(&parts.headers),
                ))),
            };
        }
        // The facts borrow the URI and copies of two header values, so that
        // the decision can then rewrite the headers.
        let host_header = parts.headers.get(header::HOST).cloned();
        let authorization = authorization_value(&parts.headers).map(str::to_owned);
        let host = host_header
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(http::uri::Authority::as_str));
        let facts = RequestFacts {
            method: &parts.method,
            host,
            path: parts
                .uri
                .path_and_query()
                .map(PathAndQuery::as_str)
                .unwrap_or("/"),
            peer,
            authorization: authorization.as_deref(),
        };
        let decision = policy.authorize_async(&facts, SystemTime::now()).await;
        decision.log(&facts, policy.hash(), request_id);
        let route = decision.route.map(str::to_owned);
        let forward_path = decision
            .forward_path()
            .and_then(|p| PathAndQuery::try_from(p.as_ref()).ok());
        if let Some(mut resp) = decision.deny_response() {
            if crate::headers::is_grpc(&parts.headers) {
                crate::proxy_error::grpc_denial(
                    &mut resp,
                    decision.reason.as_str(),
                    decision.route,
                );
            }
            return Outcome {
                record: AuthzRecord {
                    route,
                    decision: AuthzDecision::Deny,
                    reason: AuthzReason::Policy(decision.reason),
                },
                forward_path,
                deny: Some(Box::new(resp.map(ProxyBody::Short))),
            };
        }
        let label = if decision.audited {
            AuthzDecision::AuditAllow
        } else {
            AuthzDecision::Allow
        };
        decision.apply_to_headers(&mut parts.headers);
        Outcome {
            record: AuthzRecord {
                route,
                decision: label,
                reason: AuthzReason::Policy(decision.reason),
            },
            forward_path,
            deny: None,
        }
    }
}

impl Authorizer {
    /// The record of a request the request checks refused (answered with
    /// `reason`) before the policy was asked: on a listener with a policy,
    /// a `deny` like any other refusal (as `method_override` is); `None`
    /// without one, where no authorization step runs.
    pub(crate) fn refused_before_policy(&self, reason: &str) -> Option<AuthzRecord> {
        match self {
            Authorizer::AllowAll => None,
            Authorizer::Policy(_) => {
                // Every code `check_head` answers with is listed; anything
                // else would be a generic 400.
                let index = REFUSALS.iter().position(|r| *r == reason).unwrap_or(4);
                Some(AuthzRecord {
                    route: None,
                    decision: AuthzDecision::Deny,
                    reason: AuthzReason::Refused(u8::try_from(index).unwrap_or(4)),
                })
            }
        }
    }
}

impl AuthzDecision {
    /// Every decision, in the order of [`AuthzDecision::index`].
    pub const ALL: [AuthzDecision; 4] = [
        AuthzDecision::None,
        AuthzDecision::Allow,
        AuthzDecision::Deny,
        AuthzDecision::AuditAllow,
    ];

    /// The label value: `none`, `allow`, `deny` or `audit_allow`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzDecision::None => "none",
            AuthzDecision::Allow => "allow",
            AuthzDecision::Deny => "deny",
            AuthzDecision::AuditAllow => "audit_allow",
        }
    }

    /// The position in [`AuthzDecision::ALL`] (for per-label counter slots).
    pub fn index(self) -> usize {
        self as usize
    }

    /// True for a decision whose reason the access log keeps: a denial, or
    /// a denial that audit mode let through.
    pub fn is_denial(self) -> bool {
        matches!(self, AuthzDecision::Deny | AuthzDecision::AuditAllow)
    }
}

impl AuthzReason {
    /// The label value: `no_policy`, `method_override`, a request check's
    /// code (`method_not_uppercase`, ...), or the policy's reason code
    /// (`allowed`, `peer_not_allowed`, `no_route`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzReason::NoPolicy => "no_policy",
            AuthzReason::MethodOverride => "method_override",
            AuthzReason::Refused(i) => REFUSALS[usize::from(i) % REFUSALS.len()],
            AuthzReason::Policy(reason) => reason.as_str(),
        }
    }
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authorizer::AllowAll => f.write_str("AllowAll"),
            Authorizer::Policy(p) => write!(f, "Policy({})", p.load().hash()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_index_is_its_place_in_all() {
        for (i, d) in AuthzDecision::ALL.into_iter().enumerate() {
            assert_eq!(d.index(), i, "{d:?}");
        }
    }
}
