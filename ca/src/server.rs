//! The CA's HTTPS API.
//!
//! - `GET /v1/bundle`: the trust bundle (PEM), every root currently trusted.
//! - `POST /v1/certs`: a PEM or DER CSR with `Authorization: Bearer <token>`
//!   (a join token or a Kubernetes service-account token) → the PEM chain.
//! - `POST /v1/renew`: a CSR over mutual TLS with a current workload
//!   certificate → a new certificate for the same SPIFFE ID.
//!
//! - `GET /v1/revocations?since=V`: over mutual TLS with a current workload
//!   certificate, the deny-list as JSON (`{"version": V, "entries": [...]}`,
//!   each entry a `serial` or an identity with its `expires` time); `304`
//!   when the list is still at version `V`. Sidecars poll it every few
//!   seconds (see `moat_proxy::identity`).
//!
//! Both issuing endpoints take an optional `?ttl=30m` query (capped by the
//! configured maximum). A revoked certificate or identity is refused with
//! 403 and reason `revoked`, whether it renews or redeems a token. Errors are JSON `{"error": "...", "reason": "..."}`.
//! The serving certificate is issued by the active root and re-issued when a
//! rotation changes the active root, so clients that trust only the new
//! bundle keep reaching the CA.
//!
//! No TLS session is ever resumed (no session cache, no tickets): every
//! connection presents its certificate in a full handshake. `/v1/renew`
//! does not rely on that alone: it checks the presented certificate again
//! itself ([`renewal_identity`]), so no TLS setting can let a lapsed
//! certificate renew.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::Instrument;
use x509_parser::prelude::FromDer;

use crate::identity::{SpiffeId, TrustDomain};
use crate::issuer::{CsrError, IssueError, RootCa, ValidatedCsr};
use crate::listen::Acceptor;
use crate::metrics::CaMetrics;
use crate::store::{CaDir, RevocationRecord, RootState, SigningState, StateVersions, StoreError};
use crate::token::{
    CredentialKind, JwksSource, KubernetesVerifier, MAX_TOKEN_LEN, TokenError, VerifiedCredential,
};

/// The CA server's configuration file (`ca.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Certificate lifetimes.
    #[serde(default)]
    pub issuance: IssuanceConfig,
    /// Kubernetes service-account token verification; absent means join tokens only.
    pub kubernetes: Option<KubernetesConfig>,
    /// Timeouts and size limits.
    #[serde(default)]
    pub limits: Limits,
    /// Where the state lives: SQLite in the CA directory (absent) or PostgreSQL.
    #[serde(default)]
    pub store: crate::store::config::StoreConfig,
}

/// `[issuance]`: certificate lifetimes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuanceConfig {
    /// Lifetime when the request asks for none (default 1h).
    #[serde(with = "humantime_serde", default = "default_ttl")]
    pub default_ttl: Duration,
    /// The longest lifetime granted (default and maximum 24h).
    #[serde(with = "humantime_serde", default = "max_ttl")]
    pub max_ttl: Duration,
}

/// `[kubernetes]`: how to verify projected service-account tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The audience the tokens must carry (the CA's), e.g. `moat-ca`.
    pub audience: String,
    /// The cluster's token issuer; checked when set.
    pub issuer: Option<String>,
    /// The cluster's JWKS as a file.
    pub jwks_file: Option<PathBuf>,
    /// The cluster's JWKS as an HTTPS URL.
    pub jwks_url: Option<String>,
    /// PEM roots that verify `jwks_url`'s server.
    pub jwks_ca: Option<PathBuf>,
    /// A bearer token file sent with each `jwks_url` fetch (in a cluster:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`).
    pub jwks_token_file: Option<PathBuf>,
}

/// `[limits]`: timeouts and sizes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// TLS handshake timeout.
    #[serde(with = "humantime_serde", default = "handshake_timeout")]
    pub handshake_timeout: Duration,
    /// Time to read a request's headers and body and answer it.
    #[serde(with = "humantime_serde", default = "request_timeout")]
    pub request_timeout: Duration,
    /// Largest request body, bytes.
    #[serde(default = "max_body")]
    pub max_body: usize,
    /// Most connections served at once.
    #[serde(default = "max_connections")]
    pub max_connections: usize,
}

/// A bound CA server, ready to [`run`](CaServer::run).
pub struct CaServer {
    listener: TcpListener,
    admin: Option<TcpListener>,
    shared: Arc<Shared>,
}

/// Errors that stop the CA server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Bad configuration (exit 64).
    #[error("{0}")]
    Config(String),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Building the TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Everything request handlers share.
struct Shared {
    ca: CaDir,
    config: ServerConfig,
    kubernetes: Option<KubernetesVerifier>,
    sans: Vec<String>,
    snapshot: ArcSwap<Snapshot>,
    revocations: ArcSwap<Revocations>,
    metrics: Arc<CaMetrics>,
}

/// The deny-list as last read from the store.
#[derive(Default)]
struct Revocations {
    /// `versions.revocations` when it was read.
    version: i64,
    entries: Vec<RevocationRecord>,
}

/// The signing state, rebuilt when the roots change.
struct Snapshot {
    /// The store's version counters this state was built from.
    versions: StateVersions,
    roots: Vec<(i64, RootState)>,
    signer: RootCa,
    bundle_pem: Bytes,
    tls: Arc<rustls::ServerConfig>,
    /// Chain verification against this bundle, for `/v1/renew`'s own check.
    client_verifier: Arc<dyn ClientCertVerifier>,
    /// When the serving certificate should be re-issued.
    refresh_at: SystemTime,
}

/// A refused request: status, short error text and a stable reason code.
struct Refusal {
    status: StatusCode,
    error: String,
    reason: &'static str,
}

impl ServerConfig {
    /// Loads `ca.toml`; errors name the file, line and column.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let config: Self = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
        config
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.issuance.max_ttl > crate::issuer::MAX_SVID_TTL || self.issuance.max_ttl.is_zero() {
            return Err("issuance.max_ttl must be more than 0 and at most 24h".into());
        }
        if self.issuance.default_ttl > self.issuance.max_ttl || self.issuance.default_ttl.is_zero()
        {
            return Err(
                "issuance.default_ttl must be more than 0 and at most issuance.max_ttl".into(),
            );
        }
        if let Some(k) = &self.kubernetes {
            match (&k.jwks_file, &k.jwks_url) {
                (Some(_), None) => {}
                (None, Some(_)) if k.jwks_ca.is_some() => {}
                (None, Some(_)) => {
                    return Err("kubernetes.jwks_url needs kubernetes.jwks_ca".into());
                }
                _ => return Err("kubernetes needs exactly one of jwks_file or jwks_url".into()),
            }
        }
        self.store.validate()?;
        Ok(())
    }
}

/// Formats a TOML error as `file:line:column: message`.
pub fn toml_error(path: &Path, text: &str, err: &toml::de::Error) -> String {
    let (line, col) = err
        .span()
        .map(|span| line_col(text, span.start))
        .unwrap_or((1, 1));
    format!("{}:{line}:{col}: {}", path.display(), err.message())
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

impl CaServer {
    /// Loads the signing state, verifies the Kubernetes JWKS if configured,
    /// and binds the listener. Logs `listening` with the bound address.
    pub async fn bind(
        ca: CaDir,
        config: ServerConfig,
        listen: SocketAddr,
        sans: Vec<String>,
    ) -> Result<Self, ServerError> {
        let kubernetes = match &config.kubernetes {
            None => None,
            Some(k) => {
                let source = match (&k.jwks_file, &k.jwks_url, &k.jwks_ca) {
                    (Some(file), _, _) => JwksSource::File(file.clone()),
                    (None, Some(url), Some(ca)) => JwksSource::Url {
                        url: url.clone(),
                        ca_file: ca.clone(),
                        token_file: k.jwks_token_file.clone(),
                    },
                    _ => return Err(ServerError::Config("kubernetes: no JWKS source".into())),
                };
                let verifier =
                    KubernetesVerifier::new(k.audience.clone(), k.issuer.clone(), source)
                        .await
                        .map_err(|e| ServerError::Config(format!("kubernetes: {e}")))?;
                Some(verifier)
            }
        };
        let state = ca.signing_state().await?;
        let records = state.roots.clone();
        let snapshot = build_snapshot(state, &sans)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
        tracing::info!(
            listener = "ca",
            %addr,
            trust_domain = %ca.trust_domain(),
            kubernetes = kubernetes.is_some(),
            "listening"
        );
        let metrics = Arc::new(CaMetrics::new());
        metrics.roots(&records);
        let revocations = load_revocations(&ca).await?;
        Ok(Self {
            listener,
            admin: None,
            shared: Arc::new(Shared {
                metrics,
                ca,
                config,
                kubernetes,
                sans,
                snapshot: ArcSwap::from_pointee(snapshot),
                revocations: ArcSwap::from_pointee(revocations),
            }),
        })
    }

    /// Binds the plain-HTTP admin listener (`/metrics`, `/live`, `/ready`).
    pub async fn bind_admin(&mut self, addr: SocketAddr) -> Result<SocketAddr, ServerError> {
        let listener = crate::metrics::bind_admin(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        self.admin = Some(listener);
        Ok(bound)
    }

    /// The CA's metrics.
    pub fn metrics(&self) -> Arc<CaMetrics> {
        self.shared.metrics.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish
    /// (up to the request timeout). At most `[limits] max_connections` are
    /// served at once; more wait in the listen backlog.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let refresher = tokio::spawn(refresh_loop(self.shared.clone()));
        let admin = self.admin.map(|listener| {
            tokio::spawn(crate::metrics::serve_admin(
                listener,
                self.shared.metrics.clone(),
            ))
        });
        let api = Acceptor::new(
            self.listener,
            "ca",
            self.shared.config.limits.max_connections,
        );
        let open = api.open();
        let shared = self.shared.clone();
        api.run(shutdown, move |tcp, peer| {
            serve_connection(shared.clone(), tcp, peer)
        })
        .await;
        tracing::info!(
            open = open.count(),
            "shutting down; finishing in-flight requests"
        );
        refresher.abort();
        if let Some(admin) = admin {
            admin.abort();
        }
        let grace = self.shared.config.limits.request_timeout;
        let _ = tokio::time::timeout(grace, open.closed()).await;
        Ok(())
    }
}

async fn serve_connection(shared: Arc<Shared>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let limits = shared.config.limits.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.snapshot.load().tls.clone());
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // Kept whole for `/v1/renew`, which checks it again itself.
    let client_chain: Arc<[CertificateDer<'static>]> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let client_chain = client_chain.clone();
        async move {
            let timeout = shared.config.limits.request_timeout;
            // One span per request; exported when the process has an OTLP
            // exporter (see `moat ca serve` and OTEL_EXPORTER_OTLP_ENDPOINT).
            let span = tracing::info_span!(
                "ca_request",
                otel.name = %format_args!("{} {}", req.method(), req.uri().path()),
                otel.kind = "server",
                http.request.method = %req.method(),
                url.path = req.uri().path(),
                network.peer.address = %peer.ip(),
                http.response.status_code = tracing::field::Empty,
            );
            let handled = tokio::time::timeout(timeout, handle(&shared, req, &client_chain))
                .instrument(span.clone());
            let response = match handled.await {
                Ok(response) => response,
                Err(_) => refusal_response(Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    error: "request timed out".into(),
                    reason: "timeout",
                }),
            };
            span.record("http.response.status_code", response.status().as_u16());
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .keep_alive(false)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

async fn handle(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    client_chain: &[CertificateDer<'static>],
) -> Response<Full<Bytes>> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/bundle") => Ok(pem_response(shared.snapshot.load().bundle_pem.clone())),
        (&Method::GET, "/healthz") => Ok(Response::new(Full::new(Bytes::from_static(b"ok\n")))),
        (&Method::POST, "/v1/certs") => issue(shared, req)
            .await
            .inspect_err(|r| shared.metrics.issuance("token", r.reason)),
        (&Method::POST, "/v1/renew") => renew(shared, req, client_chain).await.inspect_err(|r| {
            shared.metrics.issuance("renewal", r.reason);
            tracing::info!(reason = r.reason, error = %r.error, "renewal refused");
        }),
        (&Method::GET, "/v1/revocations") => revocation_list(shared, &req, client_chain),
        (_, "/v1/bundle" | "/v1/certs" | "/v1/renew" | "/v1/revocations") => Err(Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            error: "method not allowed".into(),
            reason: "method_not_allowed",
        }),
        _ => Err(Refusal {
            status: StatusCode::NOT_FOUND,
            error: "no such endpoint".into(),
            reason: "not_found",
        }),
    };
    result.unwrap_or_else(refusal_response)
}

async fn issue(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let ttl = requested_ttl(shared, &req)?;
    let token = bearer(&req).map_err(token_refusal)?;
    let td = shared.ca.trust_domain();
    // Route by key ID: join tokens carry the CA's own kid; anything else is
    // a Kubernetes token, when Kubernetes is configured.
    let kid = jsonwebtoken::decode_header(&token).ok().and_then(|h| h.kid);
    let credential = if kid.as_deref() == Some(shared.ca.token_key().kid()) {
        shared.ca.token_key().verify(td, &token)
    } else if let Some(k8s) = &shared.kubernetes {
        k8s.verify(td, &token).await
    } else {
        Err(TokenError::Invalid("not a join token of this CA".into()))
    }
    .map_err(token_refusal)?;
    refuse_revoked(shared, None, &credential.id).await?;
    let body = read_body(shared, req).await?;
    sign_and_record(shared, credential, &body, ttl).await
}

/// 403 `revoked` when the store says this certificate or identity is
/// revoked (asked each time: renewals are rare, and a replica's cached
/// list may be a second behind); 503 when it cannot say.
async fn refuse_revoked(
    shared: &Arc<Shared>,
    serial: Option<&str>,
    id: &SpiffeId,
) -> Result<(), Refusal> {
    match shared.ca.revocation_for(serial, id).await {
        Ok(None) => Ok(()),
        Ok(Some(r)) => {
            let what = match &r.serial {
                Some(serial) => format!("certificate {serial} of {id} is revoked"),
                None => format!("{id} is revoked"),
            };
            tracing::warn!(spiffe_id = %id, serial = serial.unwrap_or("-"), reason = %r.reason, "issuance refused: revoked");
            Err(Refusal {
                status: StatusCode::FORBIDDEN,
                error: format!("{what}: {}", r.reason),
                reason: "revoked",
            })
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot check revocations");
            Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: "the CA cannot check revocations: its state database is unreachable; retry later".into(),
                reason: "store_unavailable",
            })
        }
    }
}

/// `GET /v1/revocations[?since=V]`: the deny-list for sidecars, to holders
/// of a current certificate of ours only (a revoked one may read it too:
/// it names nothing secret to them).
fn revocation_list(
    shared: &Arc<Shared>,
    req: &Request<Incoming>,
    client_chain: &[CertificateDer<'static>],
) -> Result<Response<Full<Bytes>>, Refusal> {
    renewal_identity(
        &shared.snapshot.load(),
        shared.ca.trust_domain(),
        client_chain,
        SystemTime::now(),
    )?;
    let list = shared.revocations.load();
    let since = req
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|p| p.strip_prefix("since="))
        .and_then(|v| v.parse::<i64>().ok());
    if since == Some(list.version) {
        return Ok(Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .body(Full::new(Bytes::new()))
            .expect("static response"));
    }
    let now = crate::store::unix_now();
    let published = crate::revocation::RevocationList {
        version: list.version,
        entries: list
            .entries
            .iter()
            .filter(|r| r.expires > now)
            .map(|r| crate::revocation::RevocationEntry {
                serial: r.serial.clone(),
                spiffe_id: r.spiffe_id.clone(),
                reason: r.reason.clone(),
                expires: r.expires,
            })
            .collect(),
    };
    let body = serde_json::to_vec(&published).map_err(internal)?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response"))
}

async fn load_revocations(ca: &CaDir) -> Result<Revocations, StoreError> {
    // The version first: a change in between is read again at the next poll.
    let version = ca.versions().await?.revocations;
    let entries = ca.revocations().await?;
    Ok(Revocations { version, entries })
}

async fn renew(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    client_chain: &[CertificateDer<'static>],
) -> Result<Response<Full<Bytes>>, Refusal> {
    let ttl = requested_ttl(shared, &req)?;
    let id = renewal_identity(
        &shared.snapshot.load(),
        shared.ca.trust_domain(),
        client_chain,
        SystemTime::now(),
    )?;
    let serial = client_chain.first().and_then(|leaf| {
        x509_parser::certificate::X509Certificate::from_der(leaf)
            .ok()
            .map(|(_, c)| crate::issuer::hex(c.raw_serial()))
    });
    refuse_revoked(shared, serial.as_deref(), &id).await?;
    let body = read_body(shared, req).await?;
    let credential = VerifiedCredential {
        id,
        kind: CredentialKind::Renewal,
        single_use: None,
    };
    sign_and_record(shared, credential, &body, ttl).await
}

/// Who may renew on this connection: the identity of the client
/// certificate it presented, checked here whatever the TLS layer did (a
/// resumed session carries the certificate of an earlier handshake, which
/// may have lapsed since). The certificate must be valid now, chain to a
/// root in the current bundle, and carry one SPIFFE ID in our trust domain.
/// Each check is one step below. Whether it is revoked is the caller's to
/// ask ([`refuse_revoked`]: a store query, where this is pure).
fn renewal_identity(
    snapshot: &Snapshot,
    trust_domain: &TrustDomain,
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<SpiffeId, Refusal> {
    let refused = |reason: &'static str, error: String| Refusal {
        status: StatusCode::UNAUTHORIZED,
        error,
        reason,
    };
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(refused(
            "client_certificate_missing",
            "renewal needs a client certificate".into(),
        ));
    };
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| refused("bad_client_certificate", format!("client certificate: {e}")))?;
    let unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let now_secs = i64::try_from(unix.as_secs()).unwrap_or(i64::MAX);
    let validity = parsed.validity();
    if now_secs < validity.not_before.timestamp() {
        return Err(refused(
            "client_certificate_not_yet_valid",
            format!(
                "the client certificate is not valid before {}",
                validity.not_before
            ),
        ));
    }
    if now_secs > validity.not_after.timestamp() {
        return Err(refused(
            "client_certificate_expired",
            format!("the client certificate expired at {}", validity.not_after),
        ));
    }
    snapshot
        .client_verifier
        .verify_client_cert(leaf, intermediates, UnixTime::since_unix_epoch(unix))
        .map_err(|e| {
            refused(
                "client_certificate_untrusted",
                format!("the client certificate does not verify against the trust bundle: {e}"),
            )
        })?;
    let id = SpiffeId::from_cert_der(leaf)
        .map_err(|e| refused("bad_client_certificate", format!("client certificate: {e}")))?;
    if !id.is_in(trust_domain) {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            error: format!("{id} is outside this CA's trust domain"),
            reason: "wrong_trust_domain",
        });
    }
    Ok(id)
}

async fn sign_and_record(
    shared: &Arc<Shared>,
    credential: VerifiedCredential,
    body: &[u8],
    ttl: Duration,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let csr = ValidatedCsr::parse(body).map_err(|e| Refusal {
        status: StatusCode::BAD_REQUEST,
        error: e.to_string(),
        reason: match e {
            CsrError::TooLarge => "csr_too_large",
            CsrError::BadSignature => "csr_bad_signature",
            CsrError::UnsupportedKey => "csr_unsupported_key",
            _ => "csr_malformed",
        },
    })?;
    if let Some(problem) = shared.metrics.health().signing_problem() {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: problem.to_string(),
            reason: "signing_key_missing",
        });
    }
    let snapshot = shared.snapshot.load_full();
    let issued = snapshot
        .signer
        .sign_svid(shared.ca.trust_domain(), &credential.id, &csr, ttl)
        .map_err(|e| match e {
            IssueError::WrongTrustDomain { .. } => Refusal {
                status: StatusCode::FORBIDDEN,
                error: e.to_string(),
                reason: "wrong_trust_domain",
            },
            IssueError::BadTtl(_) => Refusal {
                status: StatusCode::BAD_REQUEST,
                error: e.to_string(),
                reason: "bad_ttl",
            },
            other => internal(other),
        })?;
    // Nothing leaves the CA unrecorded: a store that cannot record answers
    // 503, and a token whose use was not recorded is not spent.
    let record = shared
        .ca
        .record_issuance(
            &issued,
            &credential.id,
            credential.kind,
            credential.single_use.as_ref(),
        )
        .await;
    if let Err(e) = record {
        return Err(match e {
            StoreError::Token(TokenError::Replayed) => {
                tracing::warn!(spiffe_id = %credential.id, reason = "token_replayed", "issuance refused");
                token_refusal(TokenError::Replayed)
            }
            e => {
                let error = if e.is_disk_full() {
                    "the CA cannot record issuance: its disk is full"
                } else if e.is_unavailable() {
                    "the CA cannot record issuance: its state database is unreachable; retry later"
                } else {
                    "the CA cannot record issuance right now"
                };
                tracing::error!(error = %e, "issuance refused: {error}");
                shared.metrics.set_store_up(false, Some(error));
                Refusal {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    error: error.into(),
                    reason: "store_unavailable",
                }
            }
        });
    }
    shared.metrics.issuance(credential.kind.as_str(), "ok");
    tracing::info!(
        serial = %issued.serial,
        spiffe_id = %credential.id,
        not_after = %crate::store::format_time(issued.not_after),
        credential = credential.kind.as_str(),
        "issued"
    );
    let pem = crate::identity::der_to_pem("CERTIFICATE", &issued.cert_der);
    Ok(pem_response(Bytes::from(pem)))
}

fn requested_ttl(shared: &Shared, req: &Request<Incoming>) -> Result<Duration, Refusal> {
    let issuance = &shared.config.issuance;
    let Some(query) = req.uri().query() else {
        return Ok(issuance.default_ttl);
    };
    let mut ttl = issuance.default_ttl;
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("ttl=") {
            ttl = humantime::parse_duration(value).map_err(|_| Refusal {
                status: StatusCode::BAD_REQUEST,
                error: format!("ttl {value:?} is not a duration like 30m"),
                reason: "bad_ttl",
            })?;
        }
    }
    if ttl.is_zero() || ttl > issuance.max_ttl {
        return Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            error: format!(
                "ttl must be more than 0 and at most {}",
                humantime::format_duration(issuance.max_ttl)
            ),
            reason: "bad_ttl",
        });
    }
    Ok(ttl)
}

fn bearer(req: &Request<Incoming>) -> Result<String, TokenError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(TokenError::Missing)?;
    if value.len() > MAX_TOKEN_LEN + 7 {
        return Err(TokenError::TooLong);
    }
    let value = value
        .to_str()
        .map_err(|_| TokenError::Invalid("not ASCII".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(TokenError::Missing)?;
    Ok(token.trim().to_owned())
}

async fn read_body(shared: &Shared, req: Request<Incoming>) -> Result<Bytes, Refusal> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !matches!(
            essence,
            "application/pkcs10"
                | "application/x-pem-file"
                | "application/octet-stream"
                | "text/plain"
        ) && !essence.is_empty()
        {
            return Err(Refusal {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                error: format!("content type {essence:?} is not a CSR"),
                reason: "bad_content_type",
            });
        }
    }
    Limited::new(req.into_body(), shared.config.limits.max_body)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            error: format!(
                "the body is larger than {} bytes",
                shared.config.limits.max_body
            ),
            reason: "body_too_large",
        })
}

fn token_refusal(e: TokenError) -> Refusal {
    let status = match e {
        TokenError::WrongTrustDomain(_) => StatusCode::FORBIDDEN,
        TokenError::Jwks(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    };
    tracing::info!(reason = e.reason(), error = %e, "credential refused");
    Refusal {
        status,
        error: e.to_string(),
        reason: e.reason(),
    }
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "internal error");
    Refusal {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        error: "internal error".into(),
        reason: "internal",
    }
}

fn pem_response(body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-pem-file")
        .body(Full::new(body))
        .expect("static response")
}

fn refusal_response(r: Refusal) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": r.error, "reason": r.reason }).to_string();
    let mut builder = Response::builder()
        .status(r.status)
        .header(header::CONTENT_TYPE, "application/json");
    if r.status == StatusCode::UNAUTHORIZED {
        builder = builder.header(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"");
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

/// Polls the store's version counters every second (one small query);
/// rebuilds the signing state when a rotation step, here or on another
/// replica, moved them, or when the serving certificate is half-way
/// through its life. The poll is also the store's health check behind
/// `/ready`: a store that does not answer makes the CA unready until it
/// does again, with nothing to restart.
async fn refresh_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let health = shared.metrics.health();
    loop {
        tick.tick().await;
        let current = shared.snapshot.load();
        let versions = match shared.ca.versions().await {
            Ok(v) => v,
            Err(e) => {
                if health.set_store(Some("the CA's state database is unreachable")) {
                    tracing::error!(error = %e, store = shared.ca.store().location(), "the CA's state store is unreachable: issuance answers 503 and /ready is false until it is back");
                }
                continue;
            }
        };
        if health.set_store(None) {
            tracing::info!(
                store = shared.ca.store().location(),
                "the CA's state store is reachable again"
            );
        }
        if versions.revocations != shared.revocations.load().version {
            match load_revocations(&shared.ca).await {
                Ok(list) => {
                    tracing::info!(
                        version = list.version,
                        entries = list.entries.len(),
                        "revocations reloaded"
                    );
                    shared.revocations.store(Arc::new(list));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload revocations; serving the current list")
                }
            }
        }
        // Only a rotation changes the signing state.
        if versions.roots == current.versions.roots
            && health.signing_problem().is_none()
            && SystemTime::now() < current.refresh_at
        {
            continue;
        }
        let next = match shared.ca.signing_state().await {
            Ok(state) => {
                let records = state.roots.clone();
                build_snapshot(state, &shared.sans).map(|s| (s, records))
            }
            Err(e) => Err(e.into()),
        };
        match next {
            Ok((next, records)) => {
                tracing::info!(roots = ?next.roots, version = next.versions.roots, "signing state reloaded");
                shared.metrics.roots(&records);
                shared.snapshot.store(Arc::new(next));
                if health.set_signing(None) {
                    tracing::info!("signing again");
                }
            }
            Err(ServerError::Store(e @ StoreError::KeyMissing { .. })) => {
                if health.set_signing(Some(e.to_string())) {
                    tracing::error!(error = %e, "cannot sign with the active root: issuance answers 503 and /ready is false until the key is installed");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the signing state; keeping the current one")
            }
        }
    }
}

fn build_snapshot(state: SigningState, sans: &[String]) -> Result<Snapshot, ServerError> {
    let SigningState {
        versions,
        roots,
        signer,
        bundle,
    } = state;
    let roots: Vec<(i64, RootState)> = roots.into_iter().map(|r| (r.id, r.state)).collect();
    let server_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let ttl = Duration::from_secs(24 * 3600);
    let serving = signer
        .sign_server_cert(sans, &server_key, ttl)
        .map_err(|e| ServerError::Config(format!("--san: {e}")))?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(
        bundle
            .root_store()
            .map_err(|e| ServerError::Tls(e.to_string()))?,
    ))
    .allow_unauthenticated()
    .build()
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(vec![serving.cert_der.clone()], key_der)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No resumption: a resumed session would hand `/v1/renew` the client
    // certificate of an earlier handshake without verifying it again (and
    // `renewal_identity` checks it anyway). Issuance is rare; a full
    // handshake each time costs nothing that matters.
    tls.session_storage = Arc::new(NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let lifetime = serving
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Ok(Snapshot {
        versions,
        roots,
        signer,
        bundle_pem: Bytes::from(bundle.to_pem()),
        tls: Arc::new(tls),
        client_verifier: verifier,
        refresh_at: SystemTime::now() + lifetime / 2,
    })
}

fn default_ttl() -> Duration {
    crate::issuer::DEFAULT_SVID_TTL
}
fn max_ttl() -> Duration {
    crate::issuer::MAX_SVID_TTL
}
fn handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn max_body() -> usize {
    64 * 1024
}
fn max_connections() -> usize {
    1024
}

impl Default for IssuanceConfig {
    fn default() -> Self {
        Self {
            default_ttl: default_ttl(),
            max_ttl: max_ttl(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: handshake_timeout(),
            request_timeout: request_timeout(),
            max_body: max_body(),
            max_connections: max_connections(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc\nd", 0), (1, 1));
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("a\nbc\nd", 5), (3, 1));
    }

    /// `/v1/renew` judges the certificate itself: expired, not yet valid,
    /// from another CA, or missing is refused whatever the TLS layer let
    /// through; a current one of ours gives its SPIFFE ID.
    #[tokio::test]
    async fn renewal_checks_the_presented_certificate_itself() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::parse("example.org").unwrap();
        let ca = CaDir::init(
            &dir.path().join("ca"),
            &crate::store::config::Engine::Sqlite,
            td.clone(),
            Duration::from_secs(86400),
        )
        .await
        .unwrap();
        let state = ca.signing_state().await.unwrap();
        let snapshot = build_snapshot(state, &["localhost".to_owned()]).unwrap();
        let key = crate::client::WorkloadKey::generate().unwrap();
        let csr = ValidatedCsr::parse(key.csr_pem().unwrap().as_bytes()).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let ttl = Duration::from_secs(60);
        let issued = ca
            .active_root()
            .await
            .unwrap()
            .sign_svid(&td, &id, &csr, ttl)
            .unwrap();
        let chain = vec![issued.cert_der.clone()];
        let during = issued.not_before + Duration::from_secs(30);
        assert_eq!(
            renewal_identity(&snapshot, &td, &chain, during).ok(),
            Some(id)
        );

        let reason = |chain: &[CertificateDer<'static>], at| {
            renewal_identity(&snapshot, &td, chain, at)
                .err()
                .map(|r| r.reason)
        };
        let after = issued.not_after + Duration::from_secs(2);
        assert_eq!(reason(&chain, after), Some("client_certificate_expired"));
        let before = issued.not_before - Duration::from_secs(2);
        assert_eq!(
            reason(&chain, before),
            Some("client_certificate_not_yet_valid")
        );
        assert_eq!(reason(&[], during), Some("client_certificate_missing"));

        let other = RootCa::generate(&td, 1, Duration::from_secs(86400)).unwrap();
        let foreign = other
            .sign_svid(
                &td,
                &SpiffeId::parse("spiffe://example.org/web").unwrap(),
                &csr,
                ttl,
            )
            .unwrap();
        assert_eq!(
            reason(
                &[foreign.cert_der],
                foreign.not_before + Duration::from_secs(30)
            ),
            Some("client_certificate_untrusted")
        );
    }

    #[test]
    fn config_errors_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.toml");
        std::fs::write(&path, "[issuance]\ndefault_ttl = \"1h\"\nbogus = 1\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err();
        assert!(err.contains("ca.toml:3:1"), "{err}");
        assert!(err.contains("bogus"), "{err}");
        std::fs::write(&path, "[issuance]\nmax_ttl = \"48h\"\n").unwrap();
        assert!(ServerConfig::load(&path).unwrap_err().contains("max_ttl"));
    }
}
