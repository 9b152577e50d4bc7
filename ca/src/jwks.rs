//! JSON Web Key Sets: where an issuer's verification keys come from, and
//! how they are kept fresh. The one implementation behind both the CA's
//! Kubernetes service-account tokens ([`token`](crate::token)) and the
//! proxy's JWT routes (`moat_proxy::policy`).
//!
//! [`IssuerKeys`] holds the keys of one source (a file, or an HTTPS URL with
//! the CA file trusted for it and, optionally, a bearer token to send).
//! Keys are read on the hot path through an `ArcSwap` and replaced only by a
//! fetch that produced at least one usable key: a failed fetch keeps the
//! last good keys. The rules, the same for every user:
//!
//! - on schedule: `refresh` after the last success; while a source has no
//!   keys or its last attempt failed, every `min_refetch`
//!   ([`IssuerKeys::run_refresh`], [`JwksCache::run_refresh`]);
//! - on a token naming a `kid` the source does not hold, at most once per
//!   `min_refetch`, shared by concurrent callers
//!   ([`IssuerKeys::refetch_for_unknown_kid`]).
//!
//! A [`JwksCache`] holds one [`IssuerKeys`] per source, shared by every
//! policy loaded through it so a reload does not refetch. File sources are
//! read when bound ([`JwksCache::bind`]); URL sources are fetched by
//! [`JwksCache::fetch_all`] (call it at start). Both are then re-read by
//! the refresh loop and on an unknown `kid`, so a file rotated in place is
//! picked up as a URL's new keys are.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use jsonwebtoken::{AlgorithmFamily, jwk::AlgorithmParameters};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

/// How long one JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JWKS document accepted, in bytes.
const MAX_JWKS_LEN: usize = 512 * 1024;
/// How often [`JwksCache::run_refresh`] looks for sources that are due.
const TICK: Duration = Duration::from_millis(500);

/// Where an issuer's keys come from.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum JwksSource {
    /// A JWKS document on disk.
    File(PathBuf),
    /// A JWKS document served over HTTPS, verified against `ca_file`.
    Url {
        /// The `https://` URL.
        url: String,
        /// The PEM file of roots trusted for that server.
        ca_file: PathBuf,
        /// A file holding a bearer token sent with each fetch, re-read every
        /// time (the CA's own service-account token, which the kubelet
        /// rotates: the API server's JWKS endpoint refuses anonymous callers
        /// on most clusters).
        token_file: Option<PathBuf>,
    },
}

/// Errors from reading or fetching a JWKS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The JWKS file could not be read.
    #[error("cannot read JWKS file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The document is not a JWKS with at least one usable key.
    #[error("{origin} is not a usable JWKS: {reason}")]
    Invalid {
        /// The file or URL.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The `jwks_url` is not an `https://host[:port]/path` URL.
    #[error("jwks_url {0:?} must be an https://host[:port]/path URL")]
    BadUrl(String),
    /// The `jwks_ca` file could not be read or holds no usable root.
    #[error("jwks_ca {path}: {reason}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The HTTPS exchange failed (network, TLS, timeout).
    #[error("fetching JWKS from {url} failed: {source}")]
    Fetch {
        /// The URL.
        url: String,
        /// What failed, naming the JWKS server (not the CA).
        source: FetchError,
    },
    /// The bearer token file of a URL source could not be read.
    #[error("cannot read the JWKS bearer token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The JWKS server answered with a non-200 status.
    #[error("fetching JWKS from {url} failed: the server answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: http::StatusCode,
    },
}

/// How the HTTPS exchange with a JWKS server failed, saying which side.
/// The transport is the CA client's ([`crate::client::https_request`]);
/// its errors are reworded here so that a JWKS server is not called the CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Could not connect to the JWKS server (network side).
    #[error("cannot reach the JWKS server at {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake with the JWKS server failed (for example, its
    /// certificate does not verify with `jwks_ca`).
    #[error("TLS with the JWKS server failed: {0}")]
    Tls(std::io::Error),
    /// The HTTP exchange failed after the handshake.
    #[error("HTTP exchange with the JWKS server failed: {0}")]
    Http(String),
    /// The JWKS server did not answer in time.
    #[error("the JWKS server did not answer within {}", crate::format_duration(*.0))]
    Timeout(Duration),
}

impl From<crate::client::ClientError> for FetchError {
    fn from(e: crate::client::ClientError) -> Self {
        use crate::client::ClientError;
        match e {
            ClientError::Connect { addr, source } => Self::Connect { addr, source },
            ClientError::Tls(e) => Self::Tls(e),
            ClientError::Timeout(d) => Self::Timeout(d),
            ClientError::Http(e) => Self::Http(e),
            // Not made by one HTTPS exchange; said as is, just in case.
            other => Self::Http(other.to_string()),
        }
    }
}

/// One usable verification key.
pub struct Key {
    /// The key ID (`kid`), if the JWK has one.
    pub kid: Option<String>,
    /// The algorithm the JWK pins itself to (`alg`), if any.
    pub alg: Option<Algorithm>,
    /// The key's algorithm family (RSA, EC or EdDSA), from its type.
    pub family: AlgorithmFamily,
    /// The key, ready to verify with.
    pub key: DecodingKey,
}

/// The keys of one source at one point in time.
#[derive(Default)]
pub struct KeySet {
    /// The usable keys, in document order.
    pub keys: Vec<Key>,
}

/// The shared, refreshed keys of one source.
pub struct IssuerKeys {
    source: JwksSource,
    /// TLS client config, server name and URL, for URL sources.
    client: Option<(Arc<ClientConfig>, ServerName<'static>, Uri)>,
    keys: ArcSwap<KeySet>,
    state: Mutex<FetchState>,
    /// Serializes fetches so a burst of unknown `kid`s makes one request.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct FetchState {
    refresh: Duration,
    min_refetch: Duration,
    last_attempt: Option<Instant>,
    last_success: Option<Instant>,
    fetches_ok: u64,
    fetches_failed: u64,
    last_error: Option<String>,
}

/// Counters of one key source, for metrics and the admin view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksStats {
    /// The file path or URL.
    pub origin: String,
    /// Keys currently held.
    pub keys: usize,
    /// Successful fetches (or reads) so far.
    pub fetches_ok: u64,
    /// Failed fetches (or reads) so far; the last good keys were kept.
    pub fetches_failed: u64,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

/// Every key source in use, shared across policy reloads.
///
/// XXX: sources dropped from the policy by a reload stay in the cache (and
/// keep being refreshed) until the process restarts; policies name few
/// sources, so this is not worth a reference-counting scheme yet.
#[derive(Default)]
pub struct JwksCache {
    entries: Mutex<HashMap<JwksSource, Arc<IssuerKeys>>>,
}

impl JwksSource {
    /// A URL source without a bearer token, with its URL checked and its CA
    /// file read now so a bad one is a load error.
    pub fn url(url: &str, ca: &Path) -> Result<Self, JwksError> {
        let uri: Uri = url.parse().map_err(|_| JwksError::BadUrl(url.to_owned()))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(JwksError::BadUrl(url.to_owned()));
        }
        // Read the CA now only to report a bad file at load time.
        client_config(ca)?;
        Ok(Self::Url {
            url: url.to_owned(),
            ca_file: ca.to_path_buf(),
            token_file: None,
        })
    }

    /// The file path or URL, for messages.
    pub fn origin(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::Url { url, .. } => url.clone(),
        }
    }
}

impl JwksError {
    /// True when the error is about the `jwks_ca` file rather than the URL.
    pub fn is_about_ca(&self) -> bool {
        matches!(self, Self::BadCa { .. })
    }
}

fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, JwksError> {
    let bad = |reason: String| JwksError::BadCa {
        path: ca.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let bundle = crate::TrustBundle::from_pem(&pem).map_err(|e| bad(e.to_string()))?;
    let roots = bundle.root_store().map_err(|e| bad(e.to_string()))?;
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Each fetch verifies the server's current certificate in full: a
    // resumed session would keep trusting one the `jwks_ca` no longer does.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

impl JwksCache {
    /// An empty cache.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The keys for `source`, created on first use, with the refresh
    /// schedule given (the latest call's schedule wins). A file source is
    /// (re)read now and its error returned; a URL source is fetched later.
    pub fn bind(
        &self,
        source: JwksSource,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Result<Arc<IssuerKeys>, JwksError> {
        let existing = self
            .entries
            .lock()
            .expect("jwks lock")
            .get(&source)
            .cloned();
        let keys = match existing {
            Some(keys) => keys,
            None => {
                let keys = IssuerKeys::new(source.clone(), refresh, min_refetch)?;
                self.entries
                    .lock()
                    .expect("jwks lock")
                    .entry(source.clone())
                    .or_insert(keys)
                    .clone()
            }
        };
        keys.set_schedule(refresh, min_refetch);
        if let JwksSource::File(_) = source {
            // A policy that names an unreadable key file is refused, even if
            // older keys from that file are held.
            keys.read_file_sync()?;
        }
        Ok(keys)
    }

    /// The sources held now, so that fetching runs without the lock.
    fn sources(&self) -> Vec<Arc<IssuerKeys>> {
        self.entries
            .lock()
            .expect("jwks lock")
            .values()
            .cloned()
            .collect()
    }

    /// Fetches every URL source now, concurrently (at start, and by
    /// `moat policy explain`). Failures are logged and kept in the stats.
    pub async fn fetch_all(&self) {
        let all = self.sources();
        let mut tasks = tokio::task::JoinSet::new();
        for keys in all {
            if keys.client.is_some() {
                tasks.spawn(async move {
                    let _ = keys.refresh_now().await;
                });
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Refreshes every source on its schedule until the task is dropped:
    /// after `refresh` since the last success, and, while a source has no
    /// keys or its last attempt failed, every `min_refetch`. Spawn it once.
    pub async fn run_refresh(self: Arc<Self>) {
        loop {
            let all = self.sources();
            // XXX: sources are refreshed one after the other, so one slow
            // server (up to FETCH_TIMEOUT) delays the others' refresh; the hot
            // path never waits on this loop.
            for keys in all {
                keys.refresh_if_due().await;
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Counters of every source.
    pub fn stats(&self) -> Vec<JwksStats> {
        let mut out: Vec<_> = self
            .entries
            .lock()
            .expect("jwks lock")
            .values()
            .map(|k| k.stats())
            .collect();
        out.sort_by(|a, b| a.origin.cmp(&b.origin));
        out
    }
}

impl IssuerKeys {
    /// The keys of `source`, none held yet, refreshed `refresh` after each
    /// success and refetched at most once per `min_refetch` otherwise. A
    /// URL source's URL and CA file are checked now; nothing is read or
    /// fetched (see [`IssuerKeys::refresh_now`]).
    pub fn new(
        source: JwksSource,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Result<Arc<Self>, JwksError> {
        let client = match &source {
            JwksSource::File(_) => None,
            JwksSource::Url { url, ca_file, .. } => {
                let uri: Uri = url.parse().map_err(|_| JwksError::BadUrl(url.clone()))?;
                if uri.scheme_str() != Some("https") {
                    return Err(JwksError::BadUrl(url.clone()));
                }
                let host = uri.host().ok_or_else(|| JwksError::BadUrl(url.clone()))?;
                let host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let name =
                    ServerName::try_from(host).map_err(|_| JwksError::BadUrl(url.clone()))?;
                Some((client_config(ca_file)?, name, uri))
            }
        };
        Ok(Arc::new(Self {
            source,
            client,
            keys: ArcSwap::from_pointee(KeySet::default()),
            state: Mutex::new(FetchState {
                refresh,
                min_refetch,
                ..FetchState::default()
            }),
            fetching: tokio::sync::Mutex::new(()),
        }))
    }

    /// Refreshes this source on its schedule until the task is dropped (see
    /// [`JwksCache::run_refresh`] for many sources). Spawn it once.
    pub async fn run_refresh(self: Arc<Self>) {
        loop {
            self.refresh_if_due().await;
            tokio::time::sleep(TICK).await;
        }
    }

    /// True when at least one usable key is held.
    pub fn is_ready(&self) -> bool {
        !self.keys.load().keys.is_empty()
    }

    /// The source of these keys.
    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    /// Counters for this source.
    pub fn stats(&self) -> JwksStats {
        let state = self.state.lock().expect("jwks state");
        JwksStats {
            origin: self.source.origin(),
            keys: self.keys.load().keys.len(),
            fetches_ok: state.fetches_ok,
            fetches_failed: state.fetches_failed,
            last_error: state.last_error.clone(),
        }
    }

    /// The keys held now. Hold the guard briefly (never across `.await`).
    pub fn current(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    fn set_schedule(&self, refresh: Duration, min_refetch: Duration) {
        let mut state = self.state.lock().expect("jwks state");
        state.refresh = refresh;
        state.min_refetch = min_refetch;
    }

    async fn refresh_if_due(&self) {
        if self.is_due(Instant::now()) {
            let _ = self.refresh_now().await;
        }
    }

    fn is_due(&self, now: Instant) -> bool {
        let state = self.state.lock().expect("jwks state");
        let since =
            |t: Option<Instant>| t.map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        // Healthy: on the refresh schedule. Never fetched, or the last attempt
        // failed: retry every min_refetch (never on every tick).
        let scheduled = state.last_success.is_some() && since(state.last_success) >= state.refresh;
        let failing = state.last_success.is_none() || state.last_success < state.last_attempt;
        scheduled || (failing && since(state.last_attempt) >= state.min_refetch)
    }

    /// Refetches after a token named a `kid` we do not hold, unless a fetch
    /// was tried within `min_refetch`. Returns true when new keys arrived.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let started = Instant::now();
        let _guard = self.fetching.lock().await;
        {
            let state = self.state.lock().expect("jwks state");
            if let Some(last) = state.last_attempt {
                // Someone fetched while we waited for the lock: use their result.
                if last >= started {
                    return state.last_success >= Some(last);
                }
                if started.saturating_duration_since(last) < state.min_refetch {
                    return false;
                }
            }
        }
        self.fetch_locked().await.is_ok()
    }

    /// Fetches (or re-reads) now, whatever the schedule.
    pub async fn refresh_now(&self) -> Result<usize, JwksError> {
        let _guard = self.fetching.lock().await;
        self.fetch_locked().await
    }

    async fn fetch_locked(&self) -> Result<usize, JwksError> {
        self.state.lock().expect("jwks state").last_attempt = Some(Instant::now());
        let body = match &self.source {
            JwksSource::File(path) => {
                tokio::fs::read(path)
                    .await
                    .map(Bytes::from)
                    .map_err(|source| JwksError::Read {
                        path: path.clone(),
                        source,
                    })
            }
            JwksSource::Url { .. } => self.fetch_url().await,
        };
        let result = body.and_then(|body| parse_jwks(&body, &self.source.origin()));
        self.record(result)
    }

    /// Reads a file source now, outside any runtime (policy loading).
    fn read_file_sync(&self) -> Result<usize, JwksError> {
        let JwksSource::File(path) = &self.source else {
            return Ok(0);
        };
        self.state.lock().expect("jwks state").last_attempt = Some(Instant::now());
        let result = std::fs::read(path)
            .map_err(|source| JwksError::Read {
                path: path.clone(),
                source,
            })
            .and_then(|body| parse_jwks(&body, &self.source.origin()));
        self.record(result)
    }

    fn record(&self, result: Result<KeySet, JwksError>) -> Result<usize, JwksError> {
        let mut state = self.state.lock().expect("jwks state");
        match result {
            Ok(set) => {
                let n = set.keys.len();
                self.keys.store(Arc::new(set));
                state.last_success = state.last_attempt;
                state.fetches_ok += 1;
                state.last_error = None;
                tracing::debug!(jwks = %self.source.origin(), keys = n, "JWKS loaded");
                Ok(n)
            }
            Err(e) => {
                state.fetches_failed += 1;
                state.last_error = Some(e.to_string());
                let kept = self.keys.load().keys.len();
                if kept == 0 {
                    // No keys yet (at start, or never fetched): nothing is
                    // kept, and every token of this source is refused.
                    tracing::warn!(
                        jwks = %self.source.origin(),
                        error = %e,
                        "JWKS fetch failed; no keys yet, so tokens of this issuer are refused (its routes deny) until its keys are fetched"
                    );
                } else {
                    tracing::warn!(
                        jwks = %self.source.origin(),
                        error = %e,
                        keys_kept = kept,
                        "JWKS refresh failed; keeping the last good keys"
                    );
                }
                Err(e)
            }
        }
    }

    async fn fetch_url(&self) -> Result<Bytes, JwksError> {
        let (config, name, uri) = self.client.as_ref().expect("url source");
        let url = self.source.origin();
        let mut req = http::Request::get(uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "moat");
        if let JwksSource::Url {
            token_file: Some(path),
            ..
        } = &self.source
        {
            let token =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| JwksError::Token {
                        path: path.clone(),
                        source,
                    })?;
            let value =
                http::HeaderValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
                    JwksError::Token {
                        path: path.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "not a token that fits in an HTTP header",
                        ),
                    }
                })?;
            req = req.header(http::header::AUTHORIZATION, value);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|_| JwksError::BadUrl(url.clone()))?;
        let (status, body) =
            crate::client::https_request(config.clone(), name.clone(), req, FETCH_TIMEOUT)
                .await
                .map_err(|e| JwksError::Fetch {
                    url: url.clone(),
                    source: e.into(),
                })?;
        if status != http::StatusCode::OK {
            return Err(JwksError::Status { url, status });
        }
        Ok(body)
    }
}

/// Parses a JWKS document, keeping the keys moat can verify with (RSA, EC,
/// OKP signature keys) and skipping the others (`use = "enc"`, symmetric
/// `oct` keys, unknown types). At least one usable key is required.
pub fn parse_jwks(body: &[u8], origin: &str) -> Result<KeySet, JwksError> {
    let invalid = |reason: String| JwksError::Invalid {
        origin: origin.to_owned(),
        reason,
    };
    if body.len() > MAX_JWKS_LEN {
        return Err(invalid(format!("larger than {MAX_JWKS_LEN} bytes")));
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    let mut keys = Vec::new();
    for value in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
            // Symmetric keys in a JWKS would let anyone who can read it sign.
            _ => continue,
        };
        let alg = match jwk.common.key_algorithm {
            Some(ka) => match ka.to_string().parse::<Algorithm>() {
                Ok(a) if a.family() == family => Some(a),
                _ => continue,
            },
            None => None,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            family,
            key,
        });
    }
    if keys.is_empty() {
        return Err(invalid("no usable signature key (RSA, EC or OKP)".into()));
    }
    Ok(KeySet { keys })
}

impl KeySet {
    /// The key for a token: by `kid`, or, for a token without `kid`, the only
    /// key of the algorithm's family.
    pub fn find(&self, kid: Option<&str>, family: AlgorithmFamily) -> Option<&Key> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let mut same = self.keys.iter().filter(|k| k.family == family);
                match (same.next(), same.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            }
        }
    }
}

impl fmt::Debug for IssuerKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerKeys")
            .field("source", &self.source.origin())
            .field("keys", &self.keys.load().keys.len())
            .finish()
    }
}

impl fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin())
    }
}

impl fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksCache")
            .field("sources", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, "{}").unwrap();
        let cache = JwksCache::default();
        let refresh = Duration::from_secs(600);
        let min_refetch = Duration::from_secs(30);
        // An unusable file is a bind error, but the entry exists and is failing.
        assert!(
            cache
                .bind(JwksSource::File(path.clone()), refresh, min_refetch)
                .is_err()
        );
        let keys = cache
            .entries
            .lock()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .clone();
        let t0 = keys.state.lock().unwrap().last_attempt.unwrap();
        // Failing: retried every min_refetch.
        assert!(!keys.is_due(t0 + Duration::from_secs(29)));
        assert!(keys.is_due(t0 + Duration::from_secs(31)));
        // Healthy: refreshed every `refresh`.
        {
            let mut s = keys.state.lock().unwrap();
            s.last_success = Some(t0);
        }
        assert!(!keys.is_due(t0 + Duration::from_secs(31)));
        assert!(!keys.is_due(t0 + Duration::from_secs(599)));
        assert!(keys.is_due(t0 + Duration::from_secs(600)));
        // A failure after a success: back to min_refetch retries.
        {
            let mut s = keys.state.lock().unwrap();
            s.last_attempt = Some(t0 + Duration::from_secs(100));
        }
        assert!(keys.is_due(t0 + Duration::from_secs(131)));
        assert!(!keys.is_due(t0 + Duration::from_secs(129)));
    }
}
