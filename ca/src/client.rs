//! The CA client: what a workload (the proxy) uses to get and keep its
//! certificate.
//!
//! Start with [`WorkloadKey::generate`] (the private key is made here and
//! never leaves memory), then [`CaClient::issue`] with a credential, and
//! [`CaClient::renew`] over mutual TLS at the time [`Svid::renew_at`] gives.
//! [`CaEndpoints`] does the same against several CA replicas, trying them
//! in turn.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::Full;
use rand::Rng;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use x509_parser::prelude::FromDer;

use crate::identity::{BundleError, IdError, SpiffeId, TrustBundle, der_to_pem};
use crate::revocation::RevocationList;

pub use crate::https::https_request;

/// A workload's private key, made in memory. `Debug` never shows the key.
pub struct WorkloadKey {
    pair: rcgen::KeyPair,
}

/// An X.509-SVID: a workload certificate chain with its parsed identity.
#[derive(Clone)]
pub struct Svid {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The SPIFFE ID in the leaf's URI SAN.
    pub id: SpiffeId,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The leaf's serial number, lowercase hex.
    pub serial: String,
}

/// A client for one CA server, verifying it against a trust bundle.
#[derive(Clone)]
pub struct CaClient {
    base: Uri,
    server_name: ServerName<'static>,
    bundle: TrustBundle,
    timeout: Duration,
    ttl: Option<Duration>,
}

/// Several CA replicas, tried in turn: the first URL whose backoff has run
/// out is asked; one that fails to answer (unreachable, timed out, 5xx) is
/// backed off and the next is asked at once, so a replica lost in the
/// middle of a request costs one retry. A refusal (4xx) is the answer of
/// every replica, and is returned as it is.
#[derive(Clone)]
pub struct CaEndpoints {
    endpoints: Vec<Endpoint>,
}

#[derive(Clone)]
struct Endpoint {
    client: CaClient,
    url: String,
    backoff: Backoff,
    retry_after: Option<std::time::Instant>,
}

/// Exponential backoff with full jitter, for retrying an unreachable CA.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

/// Errors from talking to the CA, saying which side failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The CA URL is not an `https://host:port` URL.
    #[error("CA URL {0:?} must be https://host[:port]")]
    BadUrl(String),
    /// Could not connect to the CA (network side).
    #[error("cannot reach the CA at {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake with the CA failed (for example, the CA is not in the bundle).
    #[error("TLS with the CA failed: {0}")]
    Tls(std::io::Error),
    /// The HTTP exchange failed.
    #[error("HTTP exchange with the CA failed: {0}")]
    Http(String),
    /// The request took longer than the client's timeout.
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    /// The CA refused the request.
    #[error("the CA refused the request with {status}: {error} ({reason})")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// The CA's error summary.
        error: String,
        /// The CA's reason code.
        reason: String,
    },
    /// The CA answered with something that is not a usable certificate or bundle.
    #[error("the CA's answer is not usable: {0}")]
    BadResponse(String),
    /// The bundle is unusable.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Key generation or CSR encoding failed (our side).
    #[error("cannot make a key or CSR: {0}")]
    Key(String),
}

impl WorkloadKey {
    /// Generates a fresh ECDSA P-256 key in memory.
    pub fn generate() -> Result<Self, ClientError> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| ClientError::Key(e.to_string()))?;
        Ok(Self { pair })
    }

    /// Reads a PKCS#8 PEM private key (file-managed identities).
    pub fn from_pem(pem: &str) -> Result<Self, ClientError> {
        let pair = rcgen::KeyPair::from_pem(pem).map_err(|e| ClientError::Key(e.to_string()))?;
        Ok(Self { pair })
    }

    /// A PEM certificate signing request for this key. It carries no names:
    /// the CA decides the identity from the credential.
    pub fn csr_pem(&self) -> Result<String, ClientError> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .serialize_request(&self.pair)
            .and_then(|csr| csr.pem())
            .map_err(|e| ClientError::Key(e.to_string()))
    }

    /// The private key for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pair.serialize_der()))
    }

    /// The private key as PKCS#8 PEM, for `moat ca issue --key-out`.
    /// Handle with care: this is the secret.
    pub fn dangerous_private_key_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    /// The public key, DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.pair)
    }
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkloadKey(ECDSA P-256, <redacted>)")
    }
}

impl Svid {
    /// Reads a PEM chain (leaf first) and parses the leaf.
    pub fn from_pem(pem: &[u8]) -> Result<Self, ClientError> {
        let chain = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::BadResponse(format!("certificate PEM: {e}")))?;
        Self::from_chain(chain)
    }

    /// Parses a DER chain, leaf first.
    pub fn from_chain(chain: Vec<CertificateDer<'static>>) -> Result<Self, ClientError> {
        let leaf = chain
            .first()
            .ok_or_else(|| ClientError::BadResponse("empty certificate chain".into()))?;
        let id = SpiffeId::from_cert_der(leaf)
            .map_err(|e: IdError| ClientError::BadResponse(e.to_string()))?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        let validity = cert.validity();
        Ok(Self {
            id,
            not_before: asn1_to_system(validity.not_before),
            not_after: asn1_to_system(validity.not_after),
            serial: cert.raw_serial_as_string().replace(':', ""),
            chain,
        })
    }

    /// The chain as PEM text, leaf first.
    pub fn to_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| der_to_pem("CERTIFICATE", c))
            .collect()
    }

    /// The lifetime the CA gave this certificate.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// When to renew this certificate: about half-way (±10% jitter, so a
    /// fleet issued at once does not renew at once) through the part of its
    /// lifetime still ahead. Counting from `not_before` would be wrong for
    /// short certificates: the CA backdates `not_before` for clock skew, so
    /// half the nominal lifetime can already be behind us at issuance, and
    /// a loop sleeping until then would renew at once, again and again.
    pub fn renew_at(&self) -> SystemTime {
        self.renew_at_from(SystemTime::now())
    }

    fn renew_at_from(&self, now: SystemTime) -> SystemTime {
        let start = self.not_before.max(now);
        let end = self.not_after.max(start);
        let fraction = rand::rng().random_range(0.4..0.6);
        start
            + end
                .duration_since(start)
                .unwrap_or_default()
                .mul_f64(fraction)
    }

    /// Seconds since the Unix epoch at which the certificate expires.
    pub fn not_after_unix(&self) -> u64 {
        self.not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl CaClient {
    /// A client for the CA at `url` (`https://host[:port]`), trusting `bundle`.
    pub fn new(url: &str, bundle: TrustBundle) -> Result<Self, ClientError> {
        let base: Uri = url.parse().map_err(|_| ClientError::BadUrl(url.into()))?;
        if base.scheme_str() != Some("https") {
            return Err(ClientError::BadUrl(url.into()));
        }
        let host = base
            .host()
            .ok_or_else(|| ClientError::BadUrl(url.into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name =
            ServerName::try_from(host).map_err(|_| ClientError::BadUrl(url.into()))?;
        Ok(Self {
            base,
            server_name,
            bundle,
            timeout: Duration::from_secs(10),
            ttl: None,
        })
    }

    /// Sets the time limit for one request (connect, TLS and HTTP).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Asks the CA for certificates of this lifetime (the CA caps it);
    /// `None` takes the CA's default.
    pub fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }

    /// Replaces the bundle used to verify the CA (after a rotation).
    pub fn set_bundle(&mut self, bundle: TrustBundle) {
        self.bundle = bundle;
    }

    /// The bundle this client trusts.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Fetches the CA's current trust bundle.
    pub async fn fetch_bundle(&self) -> Result<TrustBundle, ClientError> {
        let config = self.tls_config(None)?;
        let body = self
            .exchange(config, Method::GET, "/v1/bundle", None, Bytes::new())
            .await?;
        Ok(TrustBundle::from_pem(&body)?)
    }

    /// Asks for a first certificate, with a join token or a Kubernetes
    /// service-account token as the credential.
    pub async fn issue(&self, key: &WorkloadKey, credential: &str) -> Result<Svid, ClientError> {
        let config = self.tls_config(None)?;
        let csr = key.csr_pem()?;
        let body = self
            .exchange(
                config,
                Method::POST,
                "/v1/certs",
                Some(credential),
                Bytes::from(csr),
            )
            .await?;
        Svid::from_pem(&body)
    }

    /// Renews over mutual TLS, authenticating with the current certificate.
    /// `new_key` may be the same key or a fresh one.
    pub async fn renew(
        &self,
        current: &Svid,
        current_key: &WorkloadKey,
        new_key: &WorkloadKey,
    ) -> Result<Svid, ClientError> {
        let config = self.tls_config(Some((current, current_key)))?;
        let csr = new_key.csr_pem()?;
        let body = self
            .exchange(config, Method::POST, "/v1/renew", None, Bytes::from(csr))
            .await?;
        Svid::from_pem(&body)
    }

    /// The CA's deny-list over mutual TLS, if its version is not `since`
    /// (`None`: unchanged).
    pub async fn fetch_revocations(
        &self,
        current: &Svid,
        current_key: &WorkloadKey,
        since: Option<i64>,
    ) -> Result<Option<RevocationList>, ClientError> {
        let config = self.tls_config(Some((current, current_key)))?;
        let query = since.map(|v| format!("?since={v}")).unwrap_or_default();
        let authority = self
            .base
            .authority()
            .map(http::uri::Authority::as_str)
            .unwrap_or_default();
        let uri = format!("https://{authority}/v1/revocations{query}");
        let uri: Uri = uri.parse().map_err(|_| ClientError::BadUrl(uri))?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let (status, body) = tokio::time::timeout(
            self.timeout,
            crate::https::request(
                &config,
                self.server_name.clone(),
                req,
                crate::revocation::MAX_BODY,
            ),
        )
        .await
        .map_err(|_| ClientError::Timeout(self.timeout))??;
        match status {
            StatusCode::NOT_MODIFIED => Ok(None),
            s if s.is_success() => {
                let list: RevocationList = serde_json::from_slice(&body)
                    .map_err(|e| ClientError::BadResponse(format!("revocation list: {e}")))?;
                if list.entries.len() > crate::revocation::MAX_ENTRIES {
                    return Err(ClientError::BadResponse(format!(
                        "revocation list has {} entries, more than the {} a sidecar takes",
                        list.entries.len(),
                        crate::revocation::MAX_ENTRIES
                    )));
                }
                Ok(Some(list))
            }
            _ => {
                let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let field = |k: &str| parsed[k].as_str().unwrap_or("").to_owned();
                Err(ClientError::Refused {
                    status,
                    error: field("error"),
                    reason: field("reason"),
                })
            }
        }
    }

    /// The rustls config of one exchange, handed whole to hyper-rustls'
    /// connector (`https_request`). Built per exchange rather than once per
    /// client: the bundle changes with a CA rotation and the client
    /// certificate with every renewal, and hyper-rustls takes both from the
    /// config it is built with.
    fn tls_config(
        &self,
        client_auth: Option<(&Svid, &WorkloadKey)>,
    ) -> Result<Arc<ClientConfig>, ClientError> {
        let builder = ClientConfig::builder().with_root_certificates(self.bundle.root_store()?);
        let mut config = match client_auth {
            None => builder.with_no_client_auth(),
            Some((svid, key)) => builder
                .with_client_auth_cert(svid.chain.clone(), key.private_key_der())
                .map_err(|e| ClientError::Key(e.to_string()))?,
        };
        // Every exchange verifies the CA's current certificate against the
        // current bundle: a resumed session would skip that.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    async fn exchange(
        &self,
        config: Arc<ClientConfig>,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Bytes,
    ) -> Result<Bytes, ClientError> {
        let query = match (self.ttl, method == Method::POST) {
            (Some(ttl), true) => format!("?ttl={}s", ttl.as_secs().max(1)),
            _ => String::new(),
        };
        let uri = format!(
            "https://{}{}{}",
            self.base
                .authority()
                .map(http::uri::Authority::as_str)
                .unwrap_or_default(),
            path,
            query
        );
        let uri: Uri = uri.parse().map_err(|_| ClientError::BadUrl(uri))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/pkcs10");
        if let Some(token) = bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let (status, body) =
            https_request(config, self.server_name.clone(), req, self.timeout).await?;
        if status.is_success() {
            return Ok(body);
        }
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let field = |k: &str| parsed[k].as_str().unwrap_or("").to_owned();
        Err(ClientError::Refused {
            status,
            error: field("error"),
            reason: field("reason"),
        })
    }
}

impl ClientError {
    /// True when another try (or another replica) may answer differently:
    /// the CA could not be reached or did not answer properly, as opposed
    /// to refusing the request.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Tls(_)
            | ClientError::Http(_)
            | ClientError::Timeout(_)
            | ClientError::BadResponse(_) => true,
            ClientError::Refused { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

impl CaEndpoints {
    /// Clients for `urls`, in order of preference, trusting `bundle`. Each
    /// URL's backoff after a failure starts at `retry_base` and doubles up
    /// to `retry_max`.
    pub fn new(
        urls: &[String],
        bundle: TrustBundle,
        retry_base: Duration,
        retry_max: Duration,
    ) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::BadUrl(String::new()));
        }
        let endpoints = urls
            .iter()
            .map(|url| {
                Ok(Endpoint {
                    client: CaClient::new(url, bundle.clone())?,
                    url: url.clone(),
                    backoff: Backoff::new(retry_base, retry_max),
                    retry_after: None,
                })
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(Self { endpoints })
    }

    /// Sets each request's time limit.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        for e in &mut self.endpoints {
            e.client = e.client.clone().with_timeout(timeout);
        }
        self
    }

    /// Sets the lifetime asked for.
    pub fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        for e in &mut self.endpoints {
            e.client = e.client.clone().with_ttl(ttl);
        }
        self
    }

    /// Replaces the bundle used to verify the CA.
    pub fn set_bundle(&mut self, bundle: TrustBundle) {
        for e in &mut self.endpoints {
            e.client.set_bundle(bundle.clone());
        }
    }

    /// The bundle these clients trust.
    pub fn bundle(&self) -> &TrustBundle {
        self.endpoints[0].client.bundle()
    }

    /// Fetches the trust bundle from the first replica that answers.
    pub async fn fetch_bundle(&mut self) -> Result<TrustBundle, ClientError> {
        self.each(|c| async move { c.fetch_bundle().await }).await
    }

    /// [`CaClient::issue`] at the first replica that answers.
    pub async fn issue(
        &mut self,
        key: &WorkloadKey,
        credential: &str,
    ) -> Result<Svid, ClientError> {
        self.each(|c| async move { c.issue(key, credential).await })
            .await
    }

    /// [`CaClient::fetch_revocations`] at the first replica that answers.
    pub async fn fetch_revocations(
        &mut self,
        current: &Svid,
        current_key: &WorkloadKey,
        since: Option<i64>,
    ) -> Result<Option<RevocationList>, ClientError> {
        self.each(|c| async move { c.fetch_revocations(current, current_key, since).await })
            .await
    }

    /// [`CaClient::renew`] at the first replica that answers.
    pub async fn renew(
        &mut self,
        current: &Svid,
        current_key: &WorkloadKey,
        new_key: &WorkloadKey,
    ) -> Result<Svid, ClientError> {
        self.each(|c| async move { c.renew(current, current_key, new_key).await })
            .await
    }

    async fn each<T, F, Fut>(&mut self, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut(CaClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let now = std::time::Instant::now();
        // Replicas out of backoff first, in the configured order; then the
        // rest, soonest out of backoff first.
        let mut order: Vec<usize> = (0..self.endpoints.len()).collect();
        order.sort_by_key(|&i| match self.endpoints[i].retry_after {
            Some(at) if at > now => (1, Some(at), i),
            _ => (0, None, i),
        });
        let mut last = None;
        for (n, i) in order.iter().copied().enumerate() {
            let client = self.endpoints[i].client.clone();
            match op(client).await {
                Ok(v) => {
                    let e = &mut self.endpoints[i];
                    e.backoff.reset();
                    e.retry_after = None;
                    return Ok(v);
                }
                Err(err) if err.is_retryable() => {
                    let e = &mut self.endpoints[i];
                    let wait = e.backoff.next_delay();
                    e.retry_after = Some(std::time::Instant::now() + wait);
                    if n + 1 < order.len() {
                        tracing::warn!(ca_url = %e.url, error = %err, backoff = ?wait, "CA replica failed; trying the next");
                    }
                    last = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last.expect("at least one endpoint"))
    }
}

impl fmt::Debug for CaEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.endpoints.iter().map(|e| &e.url))
            .finish()
    }
}

impl fmt::Debug for CaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaClient").field("url", &self.base).finish()
    }
}

impl Backoff {
    /// Backoff starting at `base`, never waiting more than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The wait before the next attempt: uniform in `[0, min(max, base·2^n)]`,
    /// with a floor of `base / 2` so retries never spin.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let floor = self.base / 2;
        let upper = cap.max(floor);
        floor
            + upper
                .saturating_sub(floor)
                .mul_f64(rand::rng().random::<f64>())
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

fn asn1_to_system(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SVID valid from `not_before` to `not_after` (only the times matter here).
    fn svid_between(not_before: SystemTime, not_after: SystemTime) -> Svid {
        Svid {
            chain: Vec::new(),
            id: SpiffeId::parse("spiffe://example.org/w").unwrap(),
            not_before,
            not_after,
            serial: "01".into(),
        }
    }

    #[test]
    fn renewal_lands_near_half_life() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let svid = svid_between(start, start + Duration::from_secs(3600));
        for _ in 0..100 {
            let at = svid.renew_at_from(start).duration_since(start).unwrap();
            assert!(
                at >= Duration::from_secs(1440) && at <= Duration::from_secs(2160),
                "{at:?}"
            );
        }
    }

    #[test]
    fn a_short_backdated_certificate_is_not_renewed_at_once() {
        // The CA backdates not_before by 60 s: a 20 s certificate issued
        // now runs from now - 60 s to now + 20 s. Half of that nominal
        // lifetime is already past; the renewal must still lie ahead.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let svid = svid_between(now - Duration::from_secs(60), now + Duration::from_secs(20));
        for _ in 0..100 {
            let ahead = svid.renew_at_from(now).duration_since(now).unwrap();
            assert!(
                ahead >= Duration::from_secs(8) && ahead <= Duration::from_secs(12),
                "{ahead:?}"
            );
        }
    }

    #[test]
    fn an_expired_certificate_is_due_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let svid = svid_between(now - Duration::from_secs(60), now - Duration::from_secs(1));
        assert_eq!(svid.renew_at_from(now), now);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(50)));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(5)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn only_failures_to_answer_are_retried_elsewhere() {
        let refused = |status: u16| ClientError::Refused {
            status: StatusCode::from_u16(status).unwrap(),
            error: String::new(),
            reason: String::new(),
        };
        assert!(refused(503).is_retryable());
        assert!(refused(500).is_retryable());
        assert!(refused(429).is_retryable());
        assert!(
            !refused(401).is_retryable(),
            "a spent token is spent everywhere"
        );
        assert!(!refused(403).is_retryable());
        assert!(!refused(400).is_retryable());
        assert!(ClientError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(
            ClientError::Connect {
                addr: "x".into(),
                source: std::io::ErrorKind::ConnectionRefused.into()
            }
            .is_retryable()
        );
        assert!(!ClientError::BadUrl("x".into()).is_retryable());
    }

    #[test]
    fn key_debug_hides_the_key() {
        let key = WorkloadKey::generate().unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains("BEGIN"));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn csr_has_no_names_and_a_valid_signature() {
        let key = WorkloadKey::generate().unwrap();
        let pem = key.csr_pem().unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert!(parsed.params.subject_alt_names.is_empty());
    }
}
