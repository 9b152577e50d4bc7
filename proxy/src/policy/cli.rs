//! What `moat policy check|explain|test` do, as functions returning typed
//! results, so `main.rs` only parses flags, prints and maps exit codes.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use http::Method;
use moat_ca::SpiffeId;
use serde_json::{Map, Value};

use super::cases::{CaseReport, run_cases};
use super::{Diagnostic, Explanation, JwksCache, Policy, PolicyError, RequestFacts};

/// The result of `moat policy check`.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Valid files: path, content hash, number of routes.
    pub valid: Vec<(PathBuf, String, usize)>,
    /// Problems in the other files, one per line as `file:line:column: message`.
    pub diagnostics: Vec<Diagnostic>,
}

/// The request `moat policy explain` is asked about, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct ExplainRequest {
    /// `--peer`: the caller's SPIFFE ID.
    pub peer: String,
    /// `--method`.
    pub method: String,
    /// `--path`: the raw request path, possibly with a query.
    pub path: String,
    /// `--host`.
    pub host: Option<String>,
    /// `--jwt`: a token, verified with the policy's keys (a `jwks_url` is fetched).
    pub jwt: Option<String>,
    /// `--claims`: a JSON object standing in for a verified token.
    pub claims: Option<String>,
}

/// Errors of `moat policy explain` and `moat policy test` (all operator errors: exit 64).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The policy (or cases) file is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// `--peer` is not a SPIFFE ID.
    #[error("--peer {0:?}: {1}")]
    Peer(String, moat_ca::identity::IdError),
    /// `--method` is not an HTTP method.
    #[error("--method {0:?} is not an HTTP method")]
    Method(String),
    /// `--claims` is not a JSON object.
    #[error("--claims must be a JSON object: {0}")]
    Claims(String),
    /// `--jwt` and `--claims` were both given.
    #[error("give --jwt or --claims, not both")]
    JwtAndClaims,
}

/// Validates every file; never stops at the first bad one.
pub fn check(files: &[PathBuf]) -> CheckReport {
    let mut report = CheckReport::default();
    for file in files {
        match Policy::load(file) {
            Ok(p) => report
                .valid
                .push((file.clone(), p.hash().to_owned(), p.route_count())),
            Err(e) => report.diagnostics.extend(e.diagnostics()),
        }
    }
    report
}

/// Explains the decision for one request, at the current time.
pub fn explain(file: &Path, req: &ExplainRequest) -> Result<Explanation, CliError> {
    let peer = SpiffeId::parse(&req.peer).map_err(|e| CliError::Peer(req.peer.clone(), e))?;
    // Methods are case-sensitive on the wire and in policy files, and the
    // proxy refuses one with lowercase letters (400) before the policy is
    // asked: `--method get` says so, then explains GET, probably meant.
    let method = Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| CliError::Method(req.method.clone()))?;
    let lowercase = req.method.bytes().any(|b| b.is_ascii_lowercase());
    let claims: Option<Map<String, Value>> = match &req.claims {
        None => None,
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Some(map),
            Ok(_) => return Err(CliError::Claims("not an object".into())),
            Err(e) => return Err(CliError::Claims(e.to_string())),
        },
    };
    if claims.is_some() && req.jwt.is_some() {
        return Err(CliError::JwtAndClaims);
    }
    let cache = JwksCache::default();
    let policy = Policy::load_with(file, &cache)?;
    if req.jwt.is_some() && !policy.keys_ready() {
        // Only a real token needs the keys of a jwks_url.
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(cache.fetch_all());
        }
    }
    let authorization = req.jwt.as_ref().map(|t| format!("Bearer {t}"));
    let facts = RequestFacts {
        method: &method,
        host: req.host.as_deref(),
        path: &req.path,
        peer: &peer,
        authorization: authorization.as_deref(),
    };
    let mut explanation = policy.explain(&facts, claims.as_ref(), SystemTime::now());
    if lowercase {
        explanation.refused = Some((
            "method_not_uppercase",
            format!(
                "methods are case-sensitive, and the proxy refuses {:?} before any route is tried; as {method}:",
                req.method
            ),
        ));
    }
    Ok(explanation)
}

/// Runs a cases file against a policy, at the current time.
pub fn test(policy_file: &Path, cases_file: &Path) -> Result<CaseReport, CliError> {
    let policy = Policy::load(policy_file)?;
    Ok(run_cases(&policy, cases_file, SystemTime::now())?)
}
