//! Per-route authorization policy: the file operators write, and the
//! decision the proxy makes for every inbound HTTP request.
//!
//! Matching semantics (the README's five lines):
//! 1. The path is normalized first (query split off, unreserved `%XX` decoded, `//` and `.`/`..` resolved); `%2F`, `\`, `;`, control characters, bad escapes and `..` above `/` get 400.
//! 2. Routes are tried in file order; a route matches when the method is in `methods` (absent: any; HEAD is not implied by GET), `host` (if set) equals the Host header without port, case-insensitively, and the path matches.
//! 3. `path = "/a/b"` matches exactly `/a/b` (case-sensitive; `/a/b/` is another path); `path = "/a/*"` matches `/a` and everything under `/a/`; `"/*"` matches every path; `*` as an inner segment, or `{name}` as any segment, matches one non-empty segment (`/v1/orders/{id}/refund`). When two routes can match the same request, the more specific (the one matching a subset of the other's paths: a literal segment beats a wildcard, a longer pattern the prefix it extends) must come first, and two overlapping routes neither of which is more specific are refused (see `pattern`).
//! 4. The first matching route decides: `deny = true` → 403; peer not in `peers` → 403; JWT missing or invalid → 401; claim conditions unmet → 403; otherwise allow. No route matches → 403.
//! 5. `mode = "audit"` (file or route) logs what would be denied and lets it through; a 400 for a bad path is never audited away.
//!
//! Where to start: [`Policy::load`] (or [`Policy::load_with`] in the proxy,
//! sharing a [`JwksCache`]), then [`Policy::authorize`] and [`Decision`]. A
//! running proxy keeps the current policy in a [`PolicyWatcher`]. This file
//! holds the public types and errors; the modules: `engine` (the decision:
//! route lookup, peers, JWT, claim conditions), `effects` (what a decision
//! does to the HTTP exchange: deny responses, forwarded headers, the
//! decision log), `explain` (`moat policy explain`), [`path`]
//! (normalization), `pattern` (route paths: templates, specificity), `file`
//! (format), `hint` ("did you mean"), `jwt` (token checks), `jwks`
//! (keys), [`watch`] (hot reload), `cases` (`moat policy test`), [`cli`]
//! (what the `moat policy` commands do).
//!
//! Wiring it into the proxy:
//!
//! ```ignore
//! let cache = JwksCache::new();
//! let mut watcher = PolicyWatcher::load("api", &path, cache.clone())?; // error: exit 64
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

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, Validation};
use moat_ca::SpiffeId;

use pattern::PathPattern;

mod cases;
pub mod cli;
mod effects;
mod engine;
mod explain;
mod file;
mod hint;
mod index;
mod jwks;
mod jwt;
pub mod path;
mod pattern;
pub mod watch;

pub use explain::Explanation;
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
    /// The token is valid but a claim the route forwards (`forward_claims`)
    /// cannot be a header value: a string with a byte a header value cannot
    /// hold (CR, LF, NUL or another control character), an object, or an
    /// array that is not of strings free of `,`.
    JwtClaimUnforwardable,
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
    /// For `claim_mismatch`: the claim whose condition is unmet; for
    /// `jwt_claim_unforwardable`: the claim that cannot be a header (its
    /// name only, never its value).
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

/// A problem in a policy file, at `file:line:column`, or at `file` alone
/// when it concerns the whole file (one that cannot be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// 1-based line; 0 when the problem has no place in the file.
    pub line: usize,
    /// 1-based column (characters); 0 when the problem has no place in the file.
    pub column: usize,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

/// Errors from loading a policy (or a cases file).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", file.display())]
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

fn display_diagnostics(list: &[Diagnostic]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A file that cannot be read has no line 1 to point at.
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
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
    /// The diagnostics, one per problem (a read error is one diagnostic
    /// without a line or column).
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        match self {
            Self::Read { file, source } => vec![Diagnostic {
                file: file.clone(),
                line: 0,
                column: 0,
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
            Self::JwtClaimUnforwardable => "jwt_claim_unforwardable",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
