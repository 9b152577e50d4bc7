//! The decision engine: which route a request matches and what that
//! route decides (peers, JWT, claim conditions). Everything here runs on
//! every inbound request; the explanation for `moat policy explain` is a
//! separate pass in `explain.rs`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use moat_ca::SpiffeId;
use serde_json::{Map, Value};

use super::effects::claim_header_value;
use super::path::{self, NormalizedPath};
use super::{
    ClaimValue, Decision, IssuerKeys, Method, Mode, PeerPattern, PeerRule, Policy, Reason,
    RequestFacts, Route, Rule, Verdict, jwt,
};

/// Why a route did not match a request (for `explain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mismatch {
    Method,
    Host,
    Path,
}

/// The credential a decision is made with.
#[derive(Clone, Copy)]
pub(super) enum Credential<'a> {
    /// The raw `Authorization` header (the proxy's case).
    Header(Option<&'a str>),
    /// Claims standing in for a verified token (`explain --claims`, cases).
    Assumed(&'a Map<String, Value>),
}

impl Policy {
    /// Decides a request at time `now` (the JWT clock). Never blocks and
    /// does no I/O; on an unknown `kid` it answers 401 `jwt_unknown_kid`, see
    /// [`Policy::authorize_async`] for the variant that refetches keys first.
    pub fn authorize<'a>(&'a self, facts: &RequestFacts<'a>, now: SystemTime) -> Decision<'a> {
        self.decide(facts, Credential::Header(facts.authorization), now)
    }

    /// Like [`Policy::authorize`], but when the token names a `kid` the issuer
    /// does not hold, refetches the issuer's keys (at most once per
    /// `min_refetch`, shared by concurrent requests) and decides again. Use
    /// this on the proxy's request path: a key rotation then costs one fetch,
    /// not a burst of 401s.
    pub async fn authorize_async<'a>(
        &'a self,
        facts: &RequestFacts<'a>,
        now: SystemTime,
    ) -> Decision<'a> {
        // Only the keys are kept across the fetch, not the first decision:
        // this future is part of every request's state, and the decision
        // after a fetch is made again either way (the same one when the
        // fetch brought no new key).
        let keys = {
            let decision = self.authorize(facts, now);
            match self.unknown_kid_keys(&decision) {
                Some(keys) => keys,
                None => return decision,
            }
        };
        // Boxed: the fetch is rare and its state is kilobytes, which would
        // otherwise size every request's future (and be copied with it).
        Box::pin(keys.refetch_for_unknown_kid()).await;
        self.authorize(facts, now)
    }

    /// The keys of the issuer to ask again when `decision` refused a token
    /// whose `kid` that issuer does not hold.
    fn unknown_kid_keys(&self, decision: &Decision<'_>) -> Option<Arc<IssuerKeys>> {
        if decision.reason != Reason::JwtUnknownKid {
            return None;
        }
        decision
            .route
            .and_then(|name| self.routes.iter().find(|r| r.name == name))
            .and_then(|r| match &r.rule {
                Rule::Allow { jwt: Some(jwt), .. } => Some(self.issuers[jwt.issuer].keys.clone()),
                _ => None,
            })
    }

    /// Decides a request as if it carried a verified token with `claims`
    /// (signature, `iss`, `aud` and time are not checked; route claim
    /// conditions are). For `moat policy explain --claims` and policy tests.
    pub fn authorize_assuming_claims<'a>(
        &'a self,
        facts: &RequestFacts<'a>,
        claims: &'a Map<String, Value>,
        now: SystemTime,
    ) -> Decision<'a> {
        self.decide(facts, Credential::Assumed(claims), now)
    }

    /// The decision on the hot path: normalizes the path, looks the route
    /// up in the index, and applies it.
    fn decide<'a>(
        &'a self,
        facts: &RequestFacts<'a>,
        cred: Credential<'a>,
        now: SystemTime,
    ) -> Decision<'a> {
        let Ok(normalized) = path::normalize(facts.path) else {
            return self.refused_path();
        };
        let host = facts.host.map(host_without_port);
        // Only the routes that can match, in file order.
        let matched = self
            .index
            .candidates(&normalized.path)
            .map(|i| &self.routes[i])
            .find(|route| route.matches(facts.method, host, &normalized.path).is_ok());
        self.decide_on(matched, normalized, facts, cred, now)
    }

    /// The decision for a path that normalization refused (400).
    pub(super) fn refused_path(&self) -> Decision<'_> {
        Decision {
            verdict: Verdict::BadRequest,
            reason: Reason::BadPath,
            detail: "the path was refused by normalization",
            ..self.undecided()
        }
    }

    /// The decision once the first matching route (if any) is known; shared
    /// by `decide` and `explain`, which find that route differently.
    pub(super) fn decide_on<'a>(
        &'a self,
        matched: Option<&'a Route>,
        normalized: NormalizedPath<'a>,
        facts: &RequestFacts<'a>,
        cred: Credential<'a>,
        now: SystemTime,
    ) -> Decision<'a> {
        let mut d = self.undecided();
        d.path = Some(normalized);
        let mut mode = self.mode;
        if let Some(route) = matched {
            d.route = Some(&route.name);
            mode = route.mode.unwrap_or(mode);
            self.apply_route(route, facts, cred, now, &mut d);
        }
        if d.verdict != Verdict::Allow && mode == Mode::Audit {
            d.audited = true;
        }
        d
    }

    /// Default deny: what stands when no route matches.
    fn undecided(&self) -> Decision<'_> {
        Decision {
            verdict: Verdict::Forbidden,
            reason: Reason::NoRoute,
            route: None,
            audited: false,
            path: None,
            detail: "no route matches the request",
            claim: None,
            jwt_iss: None,
            jwt_sub: None,
            add_headers: Vec::new(),
            strip_headers: &self.claim_headers,
            strip_authorization: false,
        }
    }

    fn apply_route<'a>(
        &'a self,
        route: &'a Route,
        facts: &RequestFacts<'a>,
        cred: Credential<'a>,
        now: SystemTime,
        d: &mut Decision<'a>,
    ) {
        let (peers, jwt) = match &route.rule {
            Rule::Deny => {
                d.reason = Reason::ExplicitDeny;
                d.detail = "the route denies every request";
                return;
            }
            Rule::Allow { peers, jwt } => (peers, jwt),
        };
        if !peers.allows(facts.peer) {
            d.reason = Reason::PeerNotAllowed;
            d.detail = "the peer's SPIFFE ID is not in the route's peers";
            return;
        }
        if let Some(rule) = jwt {
            // Decided before verification, so that a route with
            // `forward_token = false` never hands a token to the service,
            // not even an invalid one let through by audit mode.
            d.strip_authorization = !route.forward_token;
            let issuer = &self.issuers[rule.issuer];
            let verified = match cred {
                Credential::Assumed(claims) => Ok(Cow::Borrowed(claims)),
                Credential::Header(header) => jwt::bearer(header)
                    .and_then(|token| jwt::verify(issuer, rule, token, now))
                    .map(|v| Cow::Owned(v.claims)),
            };
            let claims = match verified {
                Ok(claims) => claims,
                Err(refused) => {
                    d.verdict = Verdict::Unauthenticated;
                    d.reason = refused.reason;
                    d.detail = refused.detail;
                    return;
                }
            };
            d.jwt_iss = claims.get("iss").and_then(Value::as_str).map(str::to_owned);
            d.jwt_sub = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
            if let Some((name, _)) = rule
                .claims
                .iter()
                .find(|(name, want)| !claim_holds(claims.get(name), name, want))
            {
                d.reason = Reason::ClaimMismatch;
                d.detail = "a claim condition of the route is not met";
                d.claim = Some(name);
                return;
            }
            // A route that forwards a claim promises the service its
            // header: a claim that cannot be one refuses the request rather
            // than reach the service without it (an absent or `null` claim
            // sends none: the client's copies are removed all the same).
            for (claim, header) in &route.forward_claims {
                let Some(value) = claims.get(claim).filter(|v| !v.is_null()) else {
                    continue;
                };
                match claim_header_value(value) {
                    Some(value) => d.add_headers.push((header.clone(), value)),
                    None => {
                        d.add_headers.clear();
                        d.verdict = Verdict::Unauthenticated;
                        d.reason = Reason::JwtClaimUnforwardable;
                        d.detail = "a claim the route forwards cannot be sent as a header value";
                        d.claim = Some(claim);
                        // The log names the claim, never its value.
                        match claim.as_str() {
                            "sub" => d.jwt_sub = None,
                            "iss" => d.jwt_iss = None,
                            _ => {}
                        }
                        return;
                    }
                }
            }
        }
        d.verdict = Verdict::Allow;
        d.reason = Reason::Allowed;
        d.detail = "every check of the route passed";
    }
}

impl Route {
    /// Whether the route matches, and if not, the first reason it does not.
    pub(super) fn matches(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
    ) -> Result<(), Mismatch> {
        if let Some(methods) = &self.methods
            && !methods.contains(method)
        {
            return Err(Mismatch::Method);
        }
        if let Some(want) = &self.host
            && !host.is_some_and(|h| h.eq_ignore_ascii_case(want))
        {
            return Err(Mismatch::Host);
        }
        if !self.path.matches(path) {
            return Err(Mismatch::Path);
        }
        Ok(())
    }

    /// True when this (earlier) route matches every request `later` would.
    pub(crate) fn shadows(&self, later: &Route) -> bool {
        let methods = match (&self.methods, &later.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => b.iter().all(|m| a.contains(m)),
        };
        let host = match (&self.host, &later.host) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        methods && host && self.path.covers(&later.path)
    }

    /// A request both this (earlier) route and `later` match, as
    /// `METHOD /path`, if there is one.
    pub(crate) fn overlap(&self, later: &Route) -> Option<String> {
        let method = match (&self.methods, &later.methods) {
            (None, None) => Method::GET,
            (Some(a), None) => a.first()?.clone(),
            (None, Some(b)) => b.first()?.clone(),
            (Some(a), Some(b)) => a.iter().find(|m| b.contains(m))?.clone(),
        };
        if let (Some(a), Some(b)) = (&self.host, &later.host)
            && a != b
        {
            return None;
        }
        let path = self.path.overlap(&later.path)?;
        Some(format!("{method} {path}"))
    }
}

impl PeerRule {
    fn allows(&self, peer: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::List(list) => list.iter().any(|p| match p {
                PeerPattern::Exact(id) => id == peer,
                PeerPattern::Prefix(prefix) => peer.as_str().starts_with(prefix.as_str()),
            }),
        }
    }
}

/// `host[:port]` or `[v6]:port` → host, with a trailing dot removed.
pub(super) fn host_without_port(host: &str) -> &str {
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// Does the token's claim satisfy the route's condition? Strings equal, or
/// are contained in an array claim, or (for `scope`/`scp`) in a
/// space-separated string; numbers and booleans compare by value.
fn claim_holds(actual: Option<&Value>, name: &str, want: &ClaimValue) -> bool {
    let Some(actual) = actual else { return false };
    let one = |v: &Value, want: &ClaimValue| -> bool {
        match (v, want) {
            (Value::String(s), ClaimValue::String(w)) => s == w,
            (Value::Number(n), ClaimValue::Integer(w)) => n.as_i64() == Some(*w),
            (Value::Bool(b), ClaimValue::Bool(w)) => b == w,
            _ => false,
        }
    };
    match want {
        ClaimValue::All(all) => all.iter().all(|w| claim_holds(Some(actual), name, w)),
        want => match actual {
            Value::Array(items) => items.iter().any(|v| one(v, want)),
            Value::String(s) if matches!(name, "scope" | "scp") => match want {
                ClaimValue::String(w) => s.split(' ').any(|part| part == w),
                _ => false,
            },
            v => one(v, want),
        },
    }
}
