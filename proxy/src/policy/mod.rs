//! Per-route authorization policy: the file operators write, and the
//! decision the proxy makes for every inbound HTTP request.
//!
//! Matching semantics (the README's five lines):
//! 1. The path is normalized first (query split off, unreserved `%XX` decoded, `//` and `.`/`..` resolved); `%2F`, `\`, `;`, control characters, bad escapes and `..` above `/` get 400.
//! 2. Routes are tried in file order; a route matches when the method is in `methods` (absent: any; HEAD is not implied by GET), `host` (if set) equals the Host header without port, case-insensitively, and the path matches.
//! 3. `path = "/a/b"` matches exactly `/a/b` (case-sensitive; `/a/b/` is another path); `path = "/a/*"` matches `/a` and everything under `/a/`; `"/*"` matches every path; `*` as an inner segment, or `{name}` as any segment, matches one non-empty segment (`/v1/orders/{id}/refund`). When two routes can match the same request, the more specific (the one matching a subset of the other's paths: a literal segment beats a wildcard, a longer pattern the prefix it extends) must come first, and two overlapping routes neither of which is more specific are refused (see [`pattern`]).
//! 4. The first matching route decides: `deny = true` → 403; peer not in `peers` → 403; JWT missing or invalid → 401; claim conditions unmet → 403; otherwise allow. No route matches → 403.
//! 5. `mode = "audit"` (file or route) logs what would be denied and lets it through; a 400 for a bad path is never audited away.
//!
//! Where to start: [`Policy::load`] (or [`Policy::load_with`] in the proxy,
//! sharing a [`JwksCache`]), then [`Policy::authorize`] and [`Decision`]. A
//! running proxy keeps the current policy in a [`PolicyWatcher`]. The modules:
//! [`path`] (normalization), `pattern` (route paths: templates,
//! specificity), `file` (format), `hint` ("did you mean"), [`jwt`] (token checks), [`jwks`]
//! (keys), [`watch`] (hot reload), [`cases`] (`moat policy test`), [`cli`]
//! (what the `moat policy` commands do).
//!
//! Wiring it into the proxy:
//!
//! ```ignore
//! let cache = JwksCache::new();
//! let mut watcher = PolicyWatcher::load(&path, cache.clone())?; // error: exit 64
//! watcher.watch()?;                                 // hot reload from now on
//! tokio::spawn(cache.clone().run_refresh());        // scheduled JWKS refresh
//! cache.fetch_all().await;                          // first fetch of jwks_url keys
//! let policy = watcher.handle();                    // Arc<ArcSwap<Policy>>
//! // readiness: policy.load().keys_ready()
//! // per request:
//! let p = policy.load_full();                       // an Arc: fine across .await
//! let facts = RequestFacts { method, host, path, peer, authorization };
//! let d = p.authorize_async(&facts, SystemTime::now()).await;
//! d.log(&facts, p.hash(), request_id);              // denials and audited denials only
//! if let Some(resp) = d.deny_response() { return resp; }
//! d.apply_to_headers(req.headers_mut());            // strip claim headers / token, add claims
//! // forward with d.forward_path() as the request's path and query
//! ```
//!
//! Choices worth knowing: HMAC algorithms are refused (moat verifies only
//! asymmetric signatures, so HS/RS confusion cannot arise); `jwks_url` needs
//! `jwks_ca` (moat ships no public web roots); `moat policy check` reads
//! `jwks_file`s but does not fetch `jwks_url`s; a route that an earlier route
//! always shadows, a broader route before a more specific one it overlaps,
//! and two ambiguous routes are errors, in `check` and on reload alike.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, Validation};
use moat_ca::SpiffeId;
use serde_json::{Map, Value};

use pattern::PathPattern;

pub mod cases;
pub mod cli;
mod file;
mod hint;
mod index;
pub mod jwks;
pub mod jwt;
pub mod path;
mod pattern;
pub mod watch;

/// Re-exported so callers can build [`RequestFacts`] without naming `http`.
pub use http::Method;
pub use jwks::{IssuerKeys, JwksCache, JwksError, JwksSource, JwksStats};
pub use path::{NormalizedPath, PathError};
pub use watch::{PolicyWatcher, ReloadStats};

/// A compiled, validated policy. Immutable; a reload builds a new one.
pub struct Policy {
    source: PathBuf,
    hash: String,
    mode: Mode,
    issuers: Vec<Arc<Issuer>>,
    routes: Vec<Route>,
    /// Routes by first path segment (the hot path's lookup).
    index: index::RouteIndex,
    /// Every header any route forwards a claim in; stripped from every request.
    claim_headers: Vec<HeaderName>,
}

/// Whether denials are enforced or only logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Denials are answered with 401/403.
    Enforce,
    /// Would-be denials are logged and counted, and the request goes through.
    Audit,
}

/// What the proxy knows about a request when it authorizes it.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The Host header or `:authority`, possibly with a port.
    pub host: Option<&'a str>,
    /// The request target's path and query (`uri.path_and_query()`), raw.
    pub path: &'a str,
    /// The peer's SPIFFE ID from its verified client certificate.
    pub peer: &'a SpiffeId,
    /// The raw `Authorization` header value, if any; build it with
    /// [`authorization_value`] so that duplicate headers are refused.
    pub authorization: Option<&'a str>,
}

/// Stands for a request with several (or non-UTF-8) `Authorization` headers:
/// such a token is refused (401 `jwt_invalid`), so the service can never be
/// handed a second, unverified header.
const AMBIGUOUS_AUTHORIZATION: &str = "\0ambiguous";

/// The `Authorization` value to put in [`RequestFacts`]: `None` when absent,
/// the value when there is exactly one, and a value that is always refused
/// when there are several or it is not UTF-8.
pub fn authorization_value(headers: &HeaderMap) -> Option<&str> {
    let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return Some(AMBIGUOUS_AUTHORIZATION);
    }
    Some(first.to_str().unwrap_or(AMBIGUOUS_AUTHORIZATION))
}

/// The outcome class of a decision, i.e. the status a denial is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the request.
    Allow,
    /// 403: the caller is known but not allowed (or no route matched).
    Forbidden,
    /// 401: the route needs a valid JWT and the request has none.
    Unauthenticated,
    /// 400: the path was refused by normalization.
    BadRequest,
}

/// Why a decision was made; `as_str` is the stable code for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Every check of the deciding route passed.
    Allowed,
    /// No route matched (default deny).
    NoRoute,
    /// The path was refused by normalization.
    BadPath,
    /// The route says `deny = true`.
    ExplicitDeny,
    /// The peer's SPIFFE ID is not in the route's `peers`.
    PeerNotAllowed,
    /// The route needs a JWT and the request has no Bearer token.
    JwtMissing,
    /// The token is malformed, oversized, badly signed or uses a refused algorithm.
    JwtInvalid,
    /// The token's `exp` has passed (beyond the leeway).
    JwtExpired,
    /// The token's `nbf` is in the future (beyond the leeway).
    JwtNotYetValid,
    /// The token's `kid` is not among the issuer's keys (a refetch may follow).
    JwtUnknownKid,
    /// The token's `iss` is not the route's issuer.
    JwtWrongIssuer,
    /// The token's `aud` does not name an audience of the route.
    JwtWrongAudience,
    /// The token is valid but a `claims` condition of the route is unmet.
    ClaimMismatch,
}

/// The authorization decision for one request. Borrows from the policy and
/// from the request; build the response with [`Decision::deny_response`] and
/// rewrite the forwarded request with [`Decision::apply_to_headers`] and
/// [`Decision::forward_path`].
#[derive(Debug, Clone)]
pub struct Decision<'a> {
    /// What enforcement would do.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// The route that decided; `None` for no route or a bad path.
    pub route: Option<&'a str>,
    /// True when the verdict is a denial that audit mode lets through.
    pub audited: bool,
    /// The normalized path (and untouched query) to forward; `None` for a bad path.
    pub path: Option<NormalizedPath<'a>>,
    /// A short, secret-free explanation (for `explain` and debug logs).
    pub detail: &'static str,
    /// For `claim_mismatch`: the claim whose condition is unmet.
    pub claim: Option<&'a str>,
    /// Verified token's `iss`, for the decision log.
    pub jwt_iss: Option<String>,
    /// Verified token's `sub`, for the decision log.
    pub jwt_sub: Option<String>,
    /// Headers to add from verified claims (after stripping `strip_headers`).
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers to remove from the client's request: every claim header of the policy.
    pub strip_headers: &'a [HeaderName],
    /// True when the route consumed the Bearer token and does not forward it.
    pub strip_authorization: bool,
}

/// A problem in a policy file, at `file:line:column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (characters).
    pub column: usize,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

/// Errors from loading a policy (or a cases file).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{}:1:1: cannot read: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is not valid: one diagnostic per line.
    #[error("{}", display_diagnostics(.0))]
    Invalid(Vec<Diagnostic>),
}

/// One `[[issuer]]`: who signs tokens, for which audiences, with which keys.
pub(crate) struct Issuer {
    pub(crate) name: String,
    pub(crate) issuer: String,
    pub(crate) audiences: Vec<String>,
    /// One prepared validation per pinned algorithm (no per-request allocation).
    pub(crate) validations: Vec<(Algorithm, Validation)>,
    pub(crate) leeway: Duration,
    pub(crate) keys: Arc<IssuerKeys>,
}

/// One `[[route]]`.
pub(crate) struct Route {
    pub(crate) name: String,
    pub(crate) line: usize,
    pub(crate) methods: Option<Vec<Method>>,
    pub(crate) host: Option<String>,
    pub(crate) path: PathPattern,
    pub(crate) rule: Rule,
    pub(crate) forward_claims: Vec<(String, HeaderName)>,
    pub(crate) forward_token: bool,
    pub(crate) mode: Option<Mode>,
}

pub(crate) enum Rule {
    Deny,
    Allow {
        peers: PeerRule,
        jwt: Option<JwtRule>,
    },
}

pub(crate) enum PeerRule {
    Any,
    List(Vec<PeerPattern>),
}

pub(crate) enum PeerPattern {
    Exact(SpiffeId),
    /// `spiffe://td/a/` from `spiffe://td/a/*`: IDs strictly under it.
    Prefix(String),
}

pub(crate) struct JwtRule {
    /// Index into `Policy::issuers`.
    pub(crate) issuer: usize,
    pub(crate) audiences: Vec<String>,
    pub(crate) claims: Vec<(String, ClaimValue)>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClaimValue {
    String(String),
    Integer(i64),
    Bool(bool),
    /// Every value must hold.
    All(Vec<ClaimValue>),
}

/// Why a route did not match a request (for `explain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mismatch {
    Method,
    Host,
    Path,
}

/// The credential a decision is made with.
#[derive(Clone, Copy)]
enum Credential<'a> {
    /// The raw `Authorization` header (the proxy's case).
    Header(Option<&'a str>),
    /// Claims standing in for a verified token (`explain --claims`, cases).
    Assumed(&'a Map<String, Value>),
}

/// What `moat policy explain` prints: the decision and, for every route
/// before the deciding one, why it did not match.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The decision's status code (200 for allow).
    pub status: u16,
    /// The decision's reason code.
    pub reason: &'static str,
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
}

fn display_diagnostics(list: &[Diagnostic]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl PolicyError {
    /// The diagnostics, one per problem (a read error is one diagnostic at 1:1).
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        match self {
            Self::Read { file, source } => vec![Diagnostic {
                file: file.clone(),
                line: 1,
                column: 1,
                message: format!("cannot read: {source}"),
            }],
            Self::Invalid(list) => list.clone(),
        }
    }
}

impl Policy {
    /// Reads and validates a policy file, reading `jwks_file` keys now.
    /// `jwks_url` keys are not fetched: use [`Policy::load_with`] and the
    /// cache's fetch functions for that.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        Self::load_with(path, &JwksCache::default())
    }

    /// Reads and validates a policy file, binding its issuers to key sources
    /// in `cache` (shared across reloads, so keys survive them).
    pub fn load_with(path: &Path, cache: &JwksCache) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text, cache)
    }

    /// Validates a policy text as if read from `path` (relative key and CA
    /// files are resolved against `path`'s directory).
    pub fn parse(path: &Path, text: &str, cache: &JwksCache) -> Result<Policy, PolicyError> {
        file::compile(path, text, cache)
    }

    /// Short hex of the SHA-256 of the file's content (16 digits), for the
    /// admin view, metrics and the decision log.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The file the policy was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The file-wide mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Number of routes.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// Route names, in file order.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }

    /// True when every issuer holds at least one key (readiness).
    pub fn keys_ready(&self) -> bool {
        self.issuers.iter().all(|i| i.keys.is_ready())
    }

    /// Names of issuers that hold no key yet.
    pub fn issuers_without_keys(&self) -> Vec<&str> {
        self.issuers
            .iter()
            .filter(|i| !i.keys.is_ready())
            .map(|i| i.name.as_str())
            .collect()
    }

    /// The key stores of every issuer.
    pub fn issuer_keys(&self) -> impl Iterator<Item = (&str, &Arc<IssuerKeys>)> {
        self.issuers.iter().map(|i| (i.name.as_str(), &i.keys))
    }

    /// Decides a request at time `now` (the JWT clock). Never blocks and
    /// does no I/O; on an unknown `kid` it answers 401 `jwt_unknown_kid`, see
    /// [`Policy::authorize_async`] for the variant that refetches keys first.
    pub fn authorize<'a>(&'a self, facts: &RequestFacts<'a>, now: SystemTime) -> Decision<'a> {
        self.decide(facts, Credential::Header(facts.authorization), now, None)
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
        let decision = self.authorize(facts, now);
        if decision.reason != Reason::JwtUnknownKid {
            return decision;
        }
        let Some(keys) = decision
            .route
            .and_then(|name| self.routes.iter().find(|r| r.name == name))
            .and_then(|r| match &r.rule {
                Rule::Allow { jwt: Some(jwt), .. } => Some(self.issuers[jwt.issuer].keys.clone()),
                _ => None,
            })
        else {
            return decision;
        };
        // Boxed: the fetch is rare and its state is kilobytes, which would
        // otherwise size every request's future (and be copied with it).
        if Box::pin(keys.refetch_for_unknown_kid()).await {
            self.authorize(facts, now)
        } else {
            decision
        }
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
        self.decide(facts, Credential::Assumed(claims), now, None)
    }

    /// Explains the decision for a request: the normalized path, every route
    /// tried and why it did not match, and the deciding route's verdict.
    /// `claims`, when given, stand in for a verified token.
    pub fn explain(
        &self,
        facts: &RequestFacts<'_>,
        claims: Option<&Map<String, Value>>,
        now: SystemTime,
    ) -> Explanation {
        let mut trace = Vec::new();
        let cred = match claims {
            Some(c) => Credential::Assumed(c),
            None => Credential::Header(facts.authorization),
        };
        let d = self.decide(facts, cred, now, Some(&mut trace));
        let deciding = d
            .route
            .and_then(|n| self.routes.iter().find(|r| r.name == n));
        Explanation {
            status: d.status().as_u16(),
            reason: d.reason.as_str(),
            route: d.route.map(str::to_owned),
            route_line: deciding.map(|r| r.line),
            route_path: deciding.map(|r| r.path.as_str().to_owned()),
            normalized: path::normalize(facts.path).map(|n| n.path_and_query().into_owned()),
            detail: d.detail,
            claim: d.claim.and_then(|name| {
                let want = deciding?.claim_condition(name)?;
                Some(format!("{name:?} must hold {}", want.describe()))
            }),
            audited: d.audited,
            trace,
            add_headers: d
                .add_headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
        }
    }

    fn decide<'a>(
        &'a self,
        facts: &RequestFacts<'a>,
        cred: Credential<'a>,
        now: SystemTime,
        trace: Option<&mut Vec<String>>,
    ) -> Decision<'a> {
        let mut d = Decision {
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
        };
        let normalized = match path::normalize(facts.path) {
            Ok(n) => n,
            Err(_) => {
                d.verdict = Verdict::BadRequest;
                d.reason = Reason::BadPath;
                d.detail = "the path was refused by normalization";
                return d;
            }
        };
        let host = facts.host.map(host_without_port);
        let mut mode = self.mode;
        let matched = match trace {
            // The hot path: only the routes that can match, in file order.
            None => self
                .index
                .candidates(&normalized.path)
                .map(|i| &self.routes[i])
                .find(|route| route.matches(facts.method, host, &normalized.path).is_ok()),
            Some(trace) => self.first_match_traced(facts.method, host, &normalized.path, trace),
        };
        d.path = Some(normalized);
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
            for (claim, header) in &route.forward_claims {
                if let Some(value) = claims.get(claim).and_then(claim_header_value) {
                    d.add_headers.push((header.clone(), value));
                }
            }
        }
        d.verdict = Verdict::Allow;
        d.reason = Reason::Allowed;
        d.detail = "every check of the route passed";
    }
}

impl Route {
    fn matches(&self, method: &Method, host: Option<&str>, path: &str) -> Result<(), Mismatch> {
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

    /// The route's condition on claim `name`, if it has one.
    fn claim_condition(&self, name: &str) -> Option<&ClaimValue> {
        match &self.rule {
            Rule::Allow { jwt: Some(jwt), .. } => {
                jwt.claims.iter().find(|(n, _)| n == name).map(|(_, v)| v)
            }
            _ => None,
        }
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
fn host_without_port(host: &str) -> &str {
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

/// A claim as a header value: strings as is, numbers and booleans as JSON;
/// arrays of strings joined with `,`. Objects and values that are not valid
/// header values are not forwarded.
fn claim_header_value(v: &Value) -> Option<HeaderValue> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => {
            let parts: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
            parts?.join(",")
        }
        _ => return None,
    };
    HeaderValue::from_str(&text).ok()
}

impl Reason {
    /// The stable reason code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::NoRoute => "no_route",
            Self::BadPath => "bad_path",
            Self::ExplicitDeny => "explicit_deny",
            Self::PeerNotAllowed => "peer_not_allowed",
            Self::JwtMissing => "jwt_missing",
            Self::JwtInvalid => "jwt_invalid",
            Self::JwtExpired => "jwt_expired",
            Self::JwtNotYetValid => "jwt_not_yet_valid",
            Self::JwtUnknownKid => "jwt_unknown_kid",
            Self::JwtWrongIssuer => "jwt_wrong_issuer",
            Self::JwtWrongAudience => "jwt_wrong_audience",
            Self::ClaimMismatch => "claim_mismatch",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    /// removes every claim header of the policy the client sent, removes
    /// `Authorization` when the route consumed it, and adds verified claims.
    pub fn apply_to_headers(&self, headers: &mut HeaderMap) {
        for name in self.strip_headers {
            headers.remove(name);
        }
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
    /// route (`-` for none, as in the access log), policy hash, peer, JWT
    /// `iss` and `sub`, method, path and reason, as structured fields.
    pub fn log(&self, facts: &RequestFacts<'_>, policy_hash: &str, request_id: impl fmt::Display) {
        if self.verdict == Verdict::Allow {
            return;
        }
        let path = self.path.as_ref().map_or(facts.path, |p| &p.path);
        let message = if self.forwards() {
            "request would be denied (audit mode)"
        } else {
            "request denied"
        };
        tracing::warn!(
            target: "moat::policy",
            request_id = %request_id,
            decision = if self.forwards() { "audit" } else { "deny" },
            status = self.status().as_u16(),
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

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        match &self.claim {
            Some(claim) => writeln!(
                f,
                "decision: {verdict} ({}): {}: claim {claim}",
                self.reason, self.detail
            )?,
            None => writeln!(f, "decision: {verdict} ({}): {}", self.reason, self.detail)?,
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

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("source", &self.source)
            .field("hash", &self.hash)
            .field("mode", &self.mode)
            .field("routes", &self.routes.len())
            .field("issuers", &self.issuers.len())
            .finish()
    }
}

#[cfg(test)]
mod tests;
