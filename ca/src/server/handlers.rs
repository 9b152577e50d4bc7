//! Request routing and each endpoint of the CA's API: `/v1/bundle`,
//! `/v1/certs`, `/v1/renew`, `/v1/revocations` (see [`super`] for what they
//! do). Every refusal is a [`Refusal`]: a status, a short error and a
//! stable reason code, answered as JSON and counted in the issuance metrics.
//! The mapping from credential, CSR, issuance and store errors to refusals
//! lives here and nowhere else.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rustls_pki_types::{CertificateDer, UnixTime};
use tracing::Instrument;
use x509_parser::prelude::FromDer;

use super::{ServerState, SigningSnapshot};
use crate::identity::{SpiffeId, TrustDomain};
use crate::issuer::{CsrError, IssueError, ValidatedCsr};
use crate::store::{Recorded, RevocationRecord, StoreError};
use crate::token::{CredentialKind, MAX_TOKEN_LEN, TokenError, VerifiedCredential};

/// A refused request: status, short error text and a stable reason code.
struct Refusal {
    status: StatusCode,
    error: String,
    reason: &'static str,
}

/// The certificate chain a connection's client presented, and the signing
/// snapshot whose verifier already checked it, during this connection's
/// own full handshake: `/v1/renew` need not verify the chain's signatures
/// again while that snapshot is still the current one. `None` when the
/// handshake did not verify it here (no chain, or a resumed session, which
/// this server does not offer but which is not assumed away).
pub(super) struct PeerChain {
    pub(super) certs: Vec<CertificateDer<'static>>,
    pub(super) verified_by: Option<Arc<SigningSnapshot>>,
}

impl PeerChain {
    /// Whether `snapshot`'s verifier accepted this chain in the handshake.
    fn verified_by(&self, snapshot: &Arc<SigningSnapshot>) -> bool {
        self.verified_by
            .as_ref()
            .is_some_and(|v| Arc::ptr_eq(v, snapshot))
    }
}

/// Answers one request within the request timeout (408 `timeout` after
/// it), in a `ca_request` span.
pub(super) async fn serve_request(
    state: &Arc<ServerState>,
    req: Request<Incoming>,
    client_chain: &PeerChain,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    let timeout = state.config.limits.request_timeout;
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
    let handled =
        tokio::time::timeout(timeout, handle(state, req, client_chain)).instrument(span.clone());
    let response = match handled.await {
        Ok(response) => response,
        Err(_) => refusal_response(Refusal {
            status: StatusCode::REQUEST_TIMEOUT,
            error: "request timed out".into(),
            reason: "timeout",
        }),
    };
    // An integer, as the conventions ask: a u16 reaches OpenTelemetry as a string.
    span.record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    response
}

async fn handle(
    state: &Arc<ServerState>,
    req: Request<Incoming>,
    client_chain: &PeerChain,
) -> Response<Full<Bytes>> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/bundle") => Ok(pem_response(state.snapshot.load().bundle_pem.clone())),
        (&Method::GET, "/healthz") => Ok(Response::new(Full::new(Bytes::from_static(b"ok\n")))),
        (&Method::POST, "/v1/certs") => issue(state, req).await,
        (&Method::POST, "/v1/renew") => renew(state, req, client_chain).await.inspect_err(|r| {
            state.metrics.issuance("renewal", r.reason);
            tracing::info!(reason = r.reason, error = %r.error, "renewal refused");
        }),
        (&Method::GET, "/v1/revocations") => revocation_list(state, &req, client_chain),
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
    state: &Arc<ServerState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Refusal> {
    // Refusals are counted under the credential's kind once the token has
    // verified (a replayed or revoked join token is `join_token`, as its
    // success would be), under `token` before that: the kind is not known.
    let counted = |kind: &'static str| {
        move |r: Refusal| {
            state.metrics.issuance(kind, r.reason);
            r
        }
    };
    let ttl = requested_ttl(state, &req).map_err(counted("token"))?;
    let token = bearer(&req)
        .map_err(token_refusal)
        .map_err(counted("token"))?;
    let td = state.ca.trust_domain();
    // Route by key ID: join tokens carry the CA's own kid; anything else is
    // a Kubernetes token, when Kubernetes is configured.
    let kid = jsonwebtoken::decode_header(&token).ok().and_then(|h| h.kid);
    let credential = if kid.as_deref() == Some(state.ca.token_key().kid()) {
        state.ca.token_key().verify(td, &token)
    } else if let Some(k8s) = &state.kubernetes {
        k8s.verify(td, &token).await
    } else {
        Err(TokenError::Invalid("not a join token of this CA".into()))
    }
    .map_err(token_refusal)
    .map_err(counted("token"))?;
    let kind = credential.kind.as_str();
    let body = match read_body(state, req).await {
        Ok(body) => body,
        Err(refusal) => {
            let refusal = prefer_revoked(state, None, &credential.id, refusal).await;
            return Err(counted(kind)(refusal));
        }
    };
    sign_and_record(state, credential, None, &body, ttl)
        .await
        .map_err(counted(kind))
}

/// 403 `revoked`: `r` covers this identity or the certificate the request
/// presented (`serial`). The store says so in the transaction that would
/// have recorded the issuance (asked each time: renewals are rare, and a
/// replica's cached list may be a second behind).
fn revoked_refusal(id: &SpiffeId, serial: Option<&str>, r: &RevocationRecord) -> Refusal {
    let what = match &r.serial {
        Some(serial) => format!("certificate {serial} of {id} is revoked"),
        None => format!("{id} is revoked"),
    };
    tracing::warn!(spiffe_id = %id, serial = serial.unwrap_or("-"), reason = %r.reason, "issuance refused: revoked");
    Refusal {
        status: StatusCode::FORBIDDEN,
        error: format!("{what}: {}", r.reason),
        reason: "revoked",
    }
}

/// `GET /v1/revocations[?since=V]`: the deny-list for sidecars, to holders
/// of a current certificate of ours only (a revoked one may read it too:
/// it names nothing secret to them).
fn revocation_list(
    state: &Arc<ServerState>,
    req: &Request<Incoming>,
    client_chain: &PeerChain,
) -> Result<Response<Full<Bytes>>, Refusal> {
    renewal_identity(
        &state.snapshot.load(),
        state.ca.trust_domain(),
        client_chain,
        SystemTime::now(),
    )
    .map_err(|mut r| {
        // Named for this endpoint: "renewal needs..." sent people looking
        // at /v1/renew.
        if r.reason == "client_certificate_missing" {
            r.error = "GET /v1/revocations needs a client certificate (a current one of this CA's)"
                .into();
        }
        r
    })?;
    let list = state.revocations.load();
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

async fn renew(
    state: &Arc<ServerState>,
    req: Request<Incoming>,
    client_chain: &PeerChain,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let ttl = requested_ttl(state, &req)?;
    let (id, serial) = renewal_identity(
        &state.snapshot.load(),
        state.ca.trust_domain(),
        client_chain,
        SystemTime::now(),
    )?;
    let serial = Some(serial);
    let body = match read_body(state, req).await {
        Ok(body) => body,
        Err(refusal) => return Err(prefer_revoked(state, serial.as_deref(), &id, refusal).await),
    };
    let credential = VerifiedCredential {
        id,
        kind: CredentialKind::Renewal,
        single_use: None,
    };
    sign_and_record(state, credential, serial.as_deref(), &body, ttl).await
}

/// Who may renew on this connection: the identity of the client
/// certificate it presented, checked here whatever the TLS layer did (a
/// resumed session carries the certificate of an earlier handshake, which
/// may have lapsed since). The certificate must be valid now, chain to a
/// root in the current bundle, and carry one SPIFFE ID in our trust domain.
/// Each check is one step below; the chain's signatures are verified again
/// unless the current snapshot's verifier already did in this connection's
/// handshake (at most the handshake and request timeouts ago; the validity
/// period is checked here against now either way). Whether it is revoked is the caller's to
/// ask (the store, when it records the issuance: this is pure). Returns the
/// identity and the certificate's serial (lowercase hex), read from the one
/// parse of the leaf.
fn renewal_identity(
    snapshot: &Arc<SigningSnapshot>,
    trust_domain: &TrustDomain,
    chain: &PeerChain,
    now: SystemTime,
) -> Result<(SpiffeId, String), Refusal> {
    let refused = |reason: &'static str, error: String| Refusal {
        status: StatusCode::UNAUTHORIZED,
        error,
        reason,
    };
    let Some((leaf, intermediates)) = chain.certs.split_first() else {
        return Err(refused(
            "client_certificate_missing",
            "POST /v1/renew needs a client certificate (the one to renew)".into(),
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
    if !chain.verified_by(snapshot) {
        snapshot
            .client_verifier
            .verify_client_cert(leaf, intermediates, UnixTime::since_unix_epoch(unix))
            .map_err(|e| {
                refused(
                    "client_certificate_untrusted",
                    format!("the client certificate does not verify against the trust bundle: {e}"),
                )
            })?;
    }
    let id = SpiffeId::from_x509(&parsed)
        .map_err(|e| refused("bad_client_certificate", format!("client certificate: {e}")))?;
    if !id.is_in(trust_domain) {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            error: format!("{id} is outside this CA's trust domain"),
            reason: "wrong_trust_domain",
        });
    }
    Ok((id, crate::issuer::hex(parsed.raw_serial())))
}

/// Signs the CSR in `body` for `credential` and records the issuance,
/// unless a revocation covers the identity or the certificate the request
/// presented (`presented_serial`, a renewal's): the store checks that in
/// the transaction that records, so a revoked identity gets nothing and
/// spends no token.
async fn sign_and_record(
    state: &Arc<ServerState>,
    credential: VerifiedCredential,
    presented_serial: Option<&str>,
    body: &[u8],
    ttl: Duration,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let issued = match sign(state, &credential, body, ttl) {
        Ok(issued) => issued,
        Err(refusal) => {
            return Err(prefer_revoked(state, presented_serial, &credential.id, refusal).await);
        }
    };
    // Nothing leaves the CA unrecorded: a store that cannot record answers
    // 503, and a token whose use was not recorded is not spent.
    let recorded = state
        .ca
        .record_issuance(
            &issued,
            &credential.id,
            credential.kind,
            credential.single_use.as_ref(),
            presented_serial,
        )
        .await;
    match recorded {
        Ok(Recorded::Issued) => {}
        Ok(Recorded::Revoked(r)) => {
            return Err(revoked_refusal(&credential.id, presented_serial, &r));
        }
        Err(StoreError::Token(TokenError::Replayed)) => {
            tracing::warn!(spiffe_id = %credential.id, reason = "token_replayed", "issuance refused");
            return Err(token_refusal(TokenError::Replayed));
        }
        Err(e) => {
            let error = if e.is_disk_full() {
                "the CA cannot record issuance: its disk is full"
            } else if e.is_unavailable() {
                "the CA cannot record issuance: its state database is unreachable; retry later"
            } else {
                "the CA cannot record issuance right now"
            };
            if e.is_unavailable() && !e.is_disk_full() {
                // One ERROR when the store goes away (here or in the
                // poll, whichever notices first; the poll says INFO when it
                // is back), not one per refused request.
                if state
                    .metrics
                    .health()
                    .set_store(Some(super::refresh::STORE_UNREACHABLE))
                {
                    super::refresh::log_store_unreachable(&state.ca, &e);
                }
                tracing::debug!(error = %e, "issuance refused: {error}");
            } else {
                tracing::error!(error = %e, "issuance refused: {error}");
                state.metrics.set_store_up(false, Some(error));
            }
            return Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: error.into(),
                reason: "store_unavailable",
            });
        }
    }
    state.metrics.issuance(credential.kind.as_str(), "ok");
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

/// The CSR checked and signed for `credential` (nothing recorded yet).
fn sign(
    state: &Arc<ServerState>,
    credential: &VerifiedCredential,
    body: &[u8],
    ttl: Duration,
) -> Result<crate::issuer::Issued, Refusal> {
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
    if let Some(problem) = state.metrics.health().signing_problem() {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: problem.to_string(),
            reason: "signing_key_missing",
        });
    }
    let snapshot = state.snapshot.load_full();
    let issued = snapshot
        .signer
        .sign_svid(state.ca.trust_domain(), &credential.id, &csr, ttl)
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
            IssueError::RootExpired(_) => {
                tracing::error!(error = %e, "cannot issue: the signing root has expired");
                Refusal {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    error: e.to_string(),
                    reason: "root_expired",
                }
            }
            other => internal(other),
        })?;
    if issued.cut_to_root {
        tracing::warn!(
            spiffe_id = %credential.id,
            requested = %crate::format_duration(ttl),
            not_after = %crate::store::format_time(issued.not_after),
            "certificate lifetime cut to the signing root's expiry; rotate the CA"
        );
    }
    Ok(issued)
}

/// `refusal`, unless a revocation covers `id` or the presented
/// certificate: then 403 `revoked`, as a revoked client was told before
/// its body was looked at. Asked on these error paths only; on the path
/// that issues, the store checks in the transaction that records.
async fn prefer_revoked(
    state: &Arc<ServerState>,
    serial: Option<&str>,
    id: &SpiffeId,
    refusal: Refusal,
) -> Refusal {
    match state.ca.revocation_for(serial, id).await {
        Ok(Some(r)) => revoked_refusal(id, serial, &r),
        _ => refusal,
    }
}

fn requested_ttl(state: &ServerState, req: &Request<Incoming>) -> Result<Duration, Refusal> {
    ttl_from_query(&state.config.issuance, req.uri().query())
}

/// The lifetime `?ttl=` asks for, else the configured default.
fn ttl_from_query(
    issuance: &super::config::IssuanceConfig,
    query: Option<&str>,
) -> Result<Duration, Refusal> {
    let Some(query) = query else {
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
                "ttl {} is not allowed: it must be more than 0 and at most {}",
                crate::format_duration(ttl),
                crate::format_duration(issuance.max_ttl)
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

async fn read_body(state: &ServerState, req: Request<Incoming>) -> Result<Bytes, Refusal> {
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
    Limited::new(req.into_body(), state.config.limits.max_body)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|_| Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            error: format!(
                "the body is larger than {} bytes",
                state.config.limits.max_body
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issuer::RootCa;
    use crate::server::signing::build_snapshot;
    use crate::store::CaDir;

    /// A refused `?ttl=` names the request and the limit in one unit, as
    /// an operator writes them (`48h`, `24h`), not `2days` against `1day`.
    #[test]
    fn a_refused_ttl_names_request_and_limit_as_the_config_writes_them() {
        let issuance = super::super::config::IssuanceConfig {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
        };
        assert_eq!(
            ttl_from_query(&issuance, None).ok(),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            ttl_from_query(&issuance, Some("ttl=90m")).ok(),
            Some(Duration::from_secs(90 * 60))
        );
        let refused = ttl_from_query(&issuance, Some("ttl=48h")).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert_eq!(refused.reason, "bad_ttl");
        assert_eq!(
            refused.error,
            "ttl 48h is not allowed: it must be more than 0 and at most 24h"
        );
        let short = super::super::config::IssuanceConfig {
            max_ttl: Duration::from_secs(90 * 60),
            ..issuance
        };
        let refused = ttl_from_query(&short, Some("ttl=2h")).unwrap_err();
        assert_eq!(
            refused.error,
            "ttl 2h is not allowed: it must be more than 0 and at most 90m"
        );
    }

    /// `/v1/renew` judges the certificate itself: expired, not yet valid,
    /// from another CA, or missing is refused whatever the TLS layer let
    /// through; a current one of ours gives its SPIFFE ID. What the
    /// handshake verified is taken only from the snapshot that is current,
    /// and never instead of the validity period.
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
        let snapshot = Arc::new(
            build_snapshot(ca.signing_state().await.unwrap(), &["localhost".to_owned()]).unwrap(),
        );
        // The same state built again: what a refresh after a rotation installs.
        let earlier = Arc::new(
            build_snapshot(ca.signing_state().await.unwrap(), &["localhost".to_owned()]).unwrap(),
        );
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
        let chain =
            |certs: &[CertificateDer<'static>], by: Option<&Arc<SigningSnapshot>>| PeerChain {
                certs: certs.to_vec(),
                verified_by: by.cloned(),
            };
        let ours = [issued.cert_der.clone()];
        let during = issued.not_before + Duration::from_secs(30);
        for by in [None, Some(&snapshot)] {
            assert_eq!(
                renewal_identity(&snapshot, &td, &chain(&ours, by), during).ok(),
                Some((id.clone(), issued.serial.clone()))
            );
        }

        let reason = |chain: &PeerChain, at| {
            renewal_identity(&snapshot, &td, chain, at)
                .err()
                .map(|r| r.reason)
        };
        let after = issued.not_after + Duration::from_secs(2);
        let before = issued.not_before - Duration::from_secs(2);
        for by in [None, Some(&snapshot)] {
            assert_eq!(
                reason(&chain(&ours, by), after),
                Some("client_certificate_expired")
            );
            assert_eq!(
                reason(&chain(&ours, by), before),
                Some("client_certificate_not_yet_valid")
            );
        }
        assert_eq!(
            reason(&chain(&[], None), during),
            Some("client_certificate_missing")
        );

        let other = RootCa::generate(&td, 1, Duration::from_secs(86400)).unwrap();
        let foreign = other
            .sign_svid(
                &td,
                &SpiffeId::parse("spiffe://example.org/web").unwrap(),
                &csr,
                ttl,
            )
            .unwrap();
        let foreign_during = foreign.not_before + Duration::from_secs(30);
        for by in [None, Some(&earlier)] {
            assert_eq!(
                reason(
                    &chain(std::slice::from_ref(&foreign.cert_der), by),
                    foreign_during
                ),
                Some("client_certificate_untrusted")
            );
        }
    }
}
