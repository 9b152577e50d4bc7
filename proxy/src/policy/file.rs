//! The policy file format (TOML) and its compilation into a [`Policy`].
//!
//! Parsing is strict: unknown fields are refused, every reference is checked,
//! and routes must be in an order that agrees with their specificity: a
//! route that an earlier route always shadows, a broader route before a more
//! specific one it overlaps, and two overlapping routes neither of which is
//! more specific are errors. Every error
//! names the file, line and column of the offending value.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use jsonwebtoken::{Algorithm, Validation};
use moat_ca::SpiffeId;
use moat_ca::toml_error::{TomlError, line_col};
use serde::Deserialize;
use toml::Spanned;

use super::jwks::{JwksCache, JwksSource};
use super::{
    ClaimValue, Diagnostic, Issuer, JwtRule, Mode, PathPattern, PeerPattern, PeerRule, Policy,
    PolicyError, Route, Rule,
};

/// Default clock-skew allowance for `exp` and `nbf`.
const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Largest accepted `leeway`.
const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Default interval between scheduled JWKS refreshes.
const DEFAULT_REFRESH: Duration = Duration::from_secs(600);
/// Default minimum interval between two JWKS fetches triggered by unknown `kid`s.
const DEFAULT_MIN_REFETCH: Duration = Duration::from_secs(30);

/// Headers a claim may never be forwarded as: they carry framing, routing,
/// tracing, credentials or the verified peer identity, which the proxy itself
/// is responsible for (every `x-moat-*` header is reserved too). Compared
/// in every spelling (see `reserved_as`).
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "cookie",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "traceparent",
    "tracestate",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-client-cert",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    mode: Option<Spanned<Mode>>,
    #[serde(default, rename = "issuer")]
    issuers: Vec<Spanned<RawIssuer>>,
    #[serde(default, rename = "route")]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    name: Spanned<String>,
    issuer: Spanned<String>,
    audiences: Spanned<Vec<String>>,
    jwks_file: Option<Spanned<String>>,
    jwks_url: Option<Spanned<String>>,
    jwks_ca: Option<Spanned<String>>,
    algorithms: Spanned<Vec<Spanned<String>>>,
    leeway: Option<Spanned<String>>,
    refresh: Option<Spanned<String>>,
    min_refetch: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    path: Spanned<String>,
    methods: Option<Spanned<Vec<Spanned<String>>>>,
    host: Option<Spanned<String>>,
    allow: Option<Spanned<AllowKeyword>>,
    peers: Option<Spanned<Vec<Spanned<String>>>>,
    jwt: Option<Spanned<RawJwt>>,
    forward_claims: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    forward_token: Option<Spanned<bool>>,
    deny: Option<Spanned<bool>>,
    mode: Option<Spanned<Mode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    issuer: Spanned<String>,
    audiences: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    claims: BTreeMap<String, Spanned<toml::Value>>,
}

#[derive(Deserialize)]
enum AllowKeyword {
    #[serde(rename = "any-peer")]
    AnyPeer,
}

/// Collects diagnostics against one file's text.
pub(super) struct Diags<'t> {
    file: &'t Path,
    text: &'t str,
    list: Vec<Diagnostic>,
}

impl<'t> Diags<'t> {
    pub(super) fn new(file: &'t Path, text: &'t str) -> Self {
        Self {
            file,
            text,
            list: Vec::new(),
        }
    }

    pub(super) fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.list.push(Diagnostic {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        });
    }

    pub(super) fn toml(&mut self, e: &toml::de::Error) {
        let located = TomlError::new(self.file, self.text, e);
        self.list.push(Diagnostic {
            file: located.file,
            line: located.line,
            column: located.column,
            message: located.message,
        });
    }

    pub(super) fn finish(mut self) -> Result<(), PolicyError> {
        self.list.sort_by_key(|d| (d.line, d.column));
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(PolicyError::Invalid(self.list))
        }
    }
}

/// Parses and validates a policy text read from `file`. Relative JWKS and CA
/// paths are resolved against the file's directory; `jwks_file` sources are
/// read now (through `cache`, so a running proxy shares them across reloads).
pub(super) fn compile(file: &Path, text: &str, cache: &JwksCache) -> Result<Policy, PolicyError> {
    let mut diags = Diags::new(file, text);
    // An empty file is what an in-place write (truncate, then write) leaves
    // for a moment; a reload that read it would deny every request. A policy
    // that is meant to deny everything says so (a comment, or `mode`).
    if text.trim().is_empty() {
        diags.at(
            0..0,
            "the policy file is empty (a write in progress?): to deny every request, write a policy with no routes and a comment saying so",
        );
        return Err(diags.finish().unwrap_err());
    }
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            diags.toml(&e);
            return Err(diags.finish().unwrap_err());
        }
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let mode = raw.mode.map_or(Mode::Enforce, toml::Spanned::into_inner);

    let mut issuers: Vec<Arc<Issuer>> = Vec::new();
    // Every issuer name the file defines, usable or not: a route naming an
    // issuer whose JWKS file is missing gets no second, misleading error.
    let defined: Vec<&str> = raw
        .issuers
        .iter()
        .map(|i| i.get_ref().name.get_ref().as_str())
        .collect();
    for spanned in &raw.issuers {
        if let Some(issuer) = compile_issuer(spanned.get_ref(), base, cache, &mut diags) {
            if issuers.iter().any(|i| i.name == issuer.name) {
                let raw = spanned.get_ref();
                diags.at(
                    raw.name.span(),
                    format!("issuer {:?} is defined twice", issuer.name),
                );
                continue;
            }
            issuers.push(Arc::new(issuer));
        }
    }

    let mut routes: Vec<Route> = Vec::new();
    let mut names = HashSet::new();
    for spanned in &raw.routes {
        let raw = spanned.get_ref();
        if !names.insert(raw.name.get_ref().clone()) {
            diags.at(
                raw.name.span(),
                format!("route {:?} is defined twice", raw.name.get_ref()),
            );
        }
        let line = line_col(text, spanned.span().start).0;
        if let Some(route) = compile_route(raw, line, &issuers, &defined, &mut diags) {
            if let Some(problem) = routes.iter().find_map(|r| ordering_problem(r, &route)) {
                diags.at(raw.path.span(), problem);
            }
            routes.push(route);
        }
    }
    diags.finish()?;

    let mut claim_headers: Vec<HeaderName> = Vec::new();
    for route in &routes {
        for (_, header) in &route.forward_claims {
            if !claim_headers.contains(header) {
                claim_headers.push(header.clone());
            }
        }
    }
    Ok(Policy {
        source: file.to_path_buf(),
        hash: short_hash(text.as_bytes()),
        mode,
        issuers,
        index: super::index::RouteIndex::build(&routes),
        routes,
        claim_headers,
    })
}

/// Short lowercase hex of the SHA-256 of the policy text (16 digits).
pub(super) fn short_hash(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn duration_field(
    field: Option<&Spanned<String>>,
    default: Duration,
    min: Duration,
    max: Duration,
    name: &str,
    diags: &mut Diags<'_>,
) -> Duration {
    let Some(field) = field else { return default };
    match moat_ca::parse_duration(field.get_ref()) {
        Ok(d) if d < min || d > max => {
            diags.at(
                field.span(),
                format!(
                    "{name} must be between {} and {}, not {}",
                    moat_ca::format_duration(min),
                    moat_ca::format_duration(max),
                    field.get_ref()
                ),
            );
            default
        }
        Ok(d) => d,
        Err(e) => {
            diags.at(field.span(), format!("{name}: {e}"));
            default
        }
    }
}

fn compile_issuer(
    raw: &RawIssuer,
    base: &Path,
    cache: &JwksCache,
    diags: &mut Diags<'_>,
) -> Option<Issuer> {
    let before = diags.list.len();
    let name = raw.name.get_ref().clone();
    if name.is_empty() {
        diags.at(raw.name.span(), "issuer name is empty");
    }
    if raw.issuer.get_ref().is_empty() {
        diags.at(raw.issuer.span(), "issuer (the tokens' `iss`) is empty");
    }
    if raw.audiences.get_ref().is_empty() || raw.audiences.get_ref().iter().any(String::is_empty) {
        diags.at(
            raw.audiences.span(),
            "audiences must list at least one non-empty audience (tokens for other services must not be accepted)",
        );
    }
    let mut algorithms = Vec::new();
    if raw.algorithms.get_ref().is_empty() {
        diags.at(
            raw.algorithms.span(),
            "algorithms must list at least one algorithm, e.g. [\"ES256\"]",
        );
    }
    for alg in raw.algorithms.get_ref() {
        match parse_algorithm(alg.get_ref()) {
            Ok(a) if !algorithms.contains(&a) => algorithms.push(a),
            Ok(_) => diags.at(
                alg.span(),
                format!("algorithm {} is listed twice", alg.get_ref()),
            ),
            Err(msg) => diags.at(alg.span(), msg),
        }
    }
    let leeway = duration_field(
        raw.leeway.as_ref(),
        DEFAULT_LEEWAY,
        Duration::ZERO,
        MAX_LEEWAY,
        "leeway",
        diags,
    );
    let refresh = duration_field(
        raw.refresh.as_ref(),
        DEFAULT_REFRESH,
        Duration::from_secs(10),
        Duration::from_secs(7 * 86400),
        "refresh",
        diags,
    );
    let min_refetch = duration_field(
        raw.min_refetch.as_ref(),
        DEFAULT_MIN_REFETCH,
        Duration::from_secs(1),
        Duration::from_secs(86400),
        "min_refetch",
        diags,
    );
    let resolve = |p: &str| -> PathBuf { base.join(p) };
    let source = match (&raw.jwks_file, &raw.jwks_url) {
        (Some(file), None) => {
            if let Some(ca) = &raw.jwks_ca {
                diags.at(ca.span(), "jwks_ca applies only to jwks_url");
            }
            Some((JwksSource::File(resolve(file.get_ref())), file.span()))
        }
        (None, Some(url)) => match &raw.jwks_ca {
            Some(ca) => match JwksSource::url(url.get_ref(), &resolve(ca.get_ref())) {
                Ok(source) => Some((source, url.span())),
                Err(e) => {
                    let span = if e.is_about_ca() {
                        ca.span()
                    } else {
                        url.span()
                    };
                    diags.at(span, e.to_string());
                    None
                }
            },
            None => {
                diags.at(
                    url.span(),
                    "jwks_url needs jwks_ca = \"FILE.pem\", the roots trusted for that HTTPS server \
                     (moat ships no public roots; a system bundle such as /etc/ssl/certs/ca-certificates.crt works)",
                );
                None
            }
        },
        (Some(file), Some(_)) => {
            diags.at(file.span(), "set jwks_file or jwks_url, not both");
            None
        }
        (None, None) => {
            diags.at(raw.name.span(), "issuer needs jwks_file or jwks_url");
            None
        }
    };
    let (source, source_span) = source?;
    let keys = match cache.bind(source, refresh, min_refetch) {
        Ok(keys) => keys,
        Err(e) => {
            diags.at(source_span, e.to_string());
            return None;
        }
    };
    if diags.list.len() > before {
        return None;
    }
    let validations = algorithms
        .iter()
        .map(|&alg| {
            // Time, issuer and audience are checked by moat with the caller's
            // clock (see jwt.rs), so the library only checks the signature.
            let mut v = Validation::new(alg);
            v.required_spec_claims.clear();
            v.validate_exp = false;
            v.validate_nbf = false;
            v.validate_aud = false;
            v.leeway = 0;
            (alg, v)
        })
        .collect();
    Some(Issuer {
        name,
        issuer: raw.issuer.get_ref().clone(),
        audiences: raw.audiences.get_ref().clone(),
        validations,
        leeway,
        keys,
    })
}

/// Parses a JWS algorithm name, refusing `none` and the HMAC family: moat only
/// verifies signatures made with a private key it never sees, so a public key
/// can never be turned into an HMAC secret.
fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    match name {
        "none" | "None" | "NONE" => {
            Err("algorithm \"none\" (unsigned tokens) is never accepted".into())
        }
        "HS256" | "HS384" | "HS512" => Err(format!(
            "algorithm {name} (a shared HMAC secret) is not supported: use an asymmetric algorithm such as ES256 or RS256"
        )),
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(format!(
            "unknown algorithm {other:?}: expected one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
        )),
    }
}

fn compile_route(
    raw: &RawRoute,
    line: usize,
    issuers: &[Arc<Issuer>],
    defined: &[&str],
    diags: &mut Diags<'_>,
) -> Option<Route> {
    let before = diags.list.len();
    // Set when the route needs an issuer that failed on its own account.
    let mut broken_issuer = false;
    let name = raw.name.get_ref().clone();
    if name.is_empty() {
        diags.at(raw.name.span(), "route name is empty");
    }
    let path = compile_path(&raw.path, diags);
    let methods = raw.methods.as_ref().map(|methods| {
        if methods.get_ref().is_empty() {
            diags.at(methods.span(), "methods is empty, so the route matches nothing; leave it out to match every method");
        }
        let mut out: Vec<Method> = Vec::new();
        for m in methods.get_ref() {
            let s = m.get_ref();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
                diags.at(m.span(), format!("method {s:?} must be an upper-case HTTP method such as GET"));
            } else if let Ok(method) = Method::from_bytes(s.as_bytes()) {
                if out.contains(&method) {
                    diags.at(m.span(), format!("method {s} is listed twice"));
                }
                out.push(method);
            }
        }
        out
    });
    let host = raw.host.as_ref().map(|h| {
        let s = h.get_ref();
        let valid = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !valid {
            diags.at(
                h.span(),
                format!("host {s:?} must be a lower-case DNS name without port (letters, digits, '.', '-')"),
            );
        }
        s.clone()
    });
    let deny = raw.deny.as_ref().is_some_and(|d| *d.get_ref());
    let forward_token = raw.forward_token.as_ref().is_some_and(|f| *f.get_ref());

    let rule = if deny {
        let deny_span = raw.deny.as_ref().map(Spanned::span).unwrap_or_default();
        let mut extra = |present: bool, field: &str| {
            if present {
                diags.at(
                    deny_span.clone(),
                    format!("a deny route cannot also set {field}"),
                );
            }
        };
        extra(raw.allow.is_some(), "allow");
        extra(raw.peers.is_some(), "peers");
        extra(raw.jwt.is_some(), "jwt");
        extra(raw.forward_claims.is_some(), "forward_claims");
        extra(raw.forward_token.is_some(), "forward_token");
        Rule::Deny
    } else {
        let peers = match (&raw.allow, &raw.peers) {
            (Some(_), None) => PeerRule::Any,
            (None, Some(list)) => {
                if list.get_ref().is_empty() {
                    diags.at(
                        list.span(),
                        "peers is empty, so no peer is allowed; use deny = true to deny",
                    );
                }
                PeerRule::List(
                    list.get_ref()
                        .iter()
                        .filter_map(|p| compile_peer(p, diags))
                        .collect(),
                )
            }
            (Some(a), Some(_)) => {
                diags.at(
                    a.span(),
                    "set allow = \"any-peer\" or peers = [...], not both",
                );
                PeerRule::Any
            }
            (None, None) => {
                diags.at(
                    raw.name.span(),
                    "route needs allow = \"any-peer\", peers = [...], or deny = true",
                );
                PeerRule::Any
            }
        };
        let jwt = raw.jwt.as_ref().and_then(|jwt| {
            let rule = compile_jwt(jwt.get_ref(), issuers, defined, diags);
            broken_issuer |= rule.is_none();
            rule
        });
        if jwt.is_none() && raw.jwt.is_none() {
            if let Some(fc) = &raw.forward_claims {
                diags.at(
                    fc.span(),
                    "forward_claims needs jwt = { issuer = ... } on the route",
                );
            }
            if let Some(ft) = &raw.forward_token {
                diags.at(
                    ft.span(),
                    "forward_token needs jwt = { issuer = ... } on the route",
                );
            }
        }
        Rule::Allow { peers, jwt }
    };

    let mut forward_claims: Vec<(String, HeaderName)> = Vec::new();
    if let Some(fc) = &raw.forward_claims {
        for (claim, header) in fc.get_ref() {
            match HeaderName::from_bytes(header.get_ref().as_bytes()) {
                Ok(h) if h.as_str() != header.get_ref() => diags.at(
                    header.span(),
                    format!("header name {:?} must be lower case", header.get_ref()),
                ),
                Ok(h) => match reserved_as(&h) {
                    Some(real) if real == h.as_str() => diags.at(
                        header.span(),
                        format!("header {h} is reserved and cannot carry a claim"),
                    ),
                    Some(real) => diags.at(
                        header.span(),
                        format!(
                            "header {h} is reserved and cannot carry a claim: it is another spelling of {real}, which a service may read as the same header (CGI and WSGI servers read `_` as `-`)"
                        ),
                    ),
                    // `x-user-id` and `x_user_id` are one variable to a WSGI app.
                    None if forward_claims
                        .iter()
                        .any(|(_, o)| dashed(o.as_str()) == dashed(h.as_str())) =>
                    {
                        diags.at(header.span(), format!("header {h} is used for two claims"));
                    }
                    None => forward_claims.push((claim.clone(), h)),
                },
                Err(_) => diags.at(
                    header.span(),
                    format!("{:?} is not a valid header name", header.get_ref()),
                ),
            }
        }
    }
    let mode = raw.mode.as_ref().map(|m| *m.get_ref());
    if diags.list.len() > before || broken_issuer {
        return None;
    }
    Some(Route {
        name,
        line,
        methods,
        host,
        path: path?,
        rule,
        forward_claims,
        forward_token,
        mode,
    })
}

/// `name` with every `_` read as `-`, as CGI and WSGI servers read it
/// (`x_moat_peer_id` and `x-moat-peer-id` are both `HTTP_X_MOAT_PEER_ID`).
fn dashed(name: &str) -> String {
    name.replace('_', "-")
}

/// `name` without its separators (`trace_parent`, `trace-parent` and
/// `traceparent` are all `traceparent`).
fn bare(name: &str) -> String {
    name.replace(['-', '_'], "")
}

/// The reserved header `name` is a spelling of, if any: the same name with
/// `_` for `-`, or with separators added or left out; `None` when it is
/// free to carry a claim. A claim header is added after the client's
/// underscore spellings of the identity headers are removed, so a reserved
/// name in any spelling would reach the service beside (and, merged by a
/// WSGI server, before) the real one.
fn reserved_as(name: &HeaderName) -> Option<String> {
    let dashed = dashed(name.as_str());
    let bare = bare(name.as_str());
    if dashed.starts_with("x-moat-") || bare.starts_with("xmoat") {
        return Some(dashed);
    }
    RESERVED_HEADERS
        .iter()
        .find(|r| **r == dashed || self::bare(r) == bare)
        .map(|r| (*r).to_owned())
}

fn compile_path(raw: &Spanned<String>, diags: &mut Diags<'_>) -> Option<PathPattern> {
    let s = raw.get_ref();
    match PathPattern::parse(s) {
        Ok(p) => Some(p),
        Err(e) => {
            diags.at(raw.span(), format!("path {s:?} {e}"));
            None
        }
    }
}

/// Why `later` cannot come after `earlier`, if it cannot: `earlier` always
/// shadows it, or the two can match the same request and `later` is the
/// more specific one (file order decides, so the more specific route must
/// come first), or neither is more specific (ambiguous).
fn ordering_problem(earlier: &Route, later: &Route) -> Option<String> {
    if earlier.shadows(later) {
        return Some(format!(
            "route {:?} can never match: route {:?} (line {}) comes first and matches every request it would",
            later.name, earlier.name, earlier.line
        ));
    }
    let example = earlier.overlap(later)?;
    if later.path.covers(&earlier.path) {
        // The earlier route is the more specific (or the same path with
        // other methods or host): file order and specificity agree.
        return None;
    }
    if earlier.path.covers(&later.path) {
        return Some(format!(
            "route {:?} ({:?}) is more specific than route {:?} ({:?}, line {}), which comes first and so decides {example}: put the more specific route first",
            later.name,
            later.path.as_str(),
            earlier.name,
            earlier.path.as_str(),
            earlier.line
        ));
    }
    Some(format!(
        "route {:?} ({:?}) and route {:?} ({:?}, line {}) are ambiguous: both match {example} and neither is more specific; make them disjoint, or make one cover the other and put the more specific first",
        later.name,
        later.path.as_str(),
        earlier.name,
        earlier.path.as_str(),
        earlier.line
    ))
}

fn compile_peer(raw: &Spanned<String>, diags: &mut Diags<'_>) -> Option<PeerPattern> {
    let s = raw.get_ref();
    if let Some(base) = s.strip_suffix("/*") {
        // `spiffe://td/*` (any workload of td) or `spiffe://td/a/b/*`.
        let valid = match base.strip_prefix("spiffe://") {
            Some(td) if !td.contains('/') => moat_ca::TrustDomain::parse(td).is_ok(),
            _ => SpiffeId::parse(base).is_ok(),
        };
        if !valid || base.contains('*') {
            diags.at(
                raw.span(),
                format!("peer pattern {s:?} must be a SPIFFE ID followed by \"/*\""),
            );
            return None;
        }
        return Some(PeerPattern::Prefix(format!("{base}/")));
    }
    match SpiffeId::parse(s) {
        Ok(id) => Some(PeerPattern::Exact(id)),
        Err(e) => {
            diags.at(
                raw.span(),
                format!("peer {s:?}: {e} (a trailing \"/*\" makes a pattern)"),
            );
            None
        }
    }
}

fn compile_jwt(
    raw: &RawJwt,
    issuers: &[Arc<Issuer>],
    defined: &[&str],
    diags: &mut Diags<'_>,
) -> Option<JwtRule> {
    let name = raw.issuer.get_ref();
    let Some(issuer) = issuers.iter().position(|i| i.name == *name) else {
        if defined.contains(&name.as_str()) {
            // Defined, but refused (its own diagnostic says why).
            return None;
        }
        let message = match super::hint::nearest(name, defined.iter().copied()) {
            Some(near) => format!("unknown issuer {name:?}: did you mean {near:?}?"),
            None => format!("unknown issuer {name:?}: define it with [[issuer]] name = {name:?}"),
        };
        diags.at(raw.issuer.span(), message);
        return None;
    };
    let audiences = match &raw.audiences {
        Some(a) if a.get_ref().is_empty() => {
            diags.at(
                a.span(),
                "audiences is empty; leave it out to use the issuer's",
            );
            return None;
        }
        Some(a) => a.get_ref().clone(),
        None => issuers[issuer].audiences.clone(),
    };
    let mut claims = Vec::new();
    for (name, value) in &raw.claims {
        match claim_value(value.get_ref()) {
            Some(v) => claims.push((name.clone(), v)),
            None => diags.at(
                value.span(),
                format!("claim {name:?} must be a string, integer, boolean, or an array of them"),
            ),
        }
    }
    Some(JwtRule {
        issuer,
        audiences,
        claims,
    })
}

fn claim_value(v: &toml::Value) -> Option<ClaimValue> {
    match v {
        toml::Value::String(s) => Some(ClaimValue::String(s.clone())),
        toml::Value::Integer(i) => Some(ClaimValue::Integer(*i)),
        toml::Value::Boolean(b) => Some(ClaimValue::Bool(*b)),
        toml::Value::Array(items) if !items.is_empty() => {
            let all: Option<Vec<_>> = items
                .iter()
                .map(|i| match i {
                    toml::Value::Array(_) => None,
                    other => claim_value(other),
                })
                .collect();
            all.map(ClaimValue::All)
        }
        _ => None,
    }
}
