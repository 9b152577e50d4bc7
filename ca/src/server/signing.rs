//! The signing state the handlers read: the active root that signs, the
//! trust bundle served at `/v1/bundle`, and the TLS configuration with a
//! serving certificate issued by the oldest root in the bundle (see
//! [`crate::store::CaDir::signing_state`]). Built from the store's
//! [`SigningState`] at start and again whenever a rotation changes the roots
//! or the serving certificate is half-way through its life
//! ([`super::refresh`]); handlers load the current one through an `ArcSwap`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};

use super::ServerError;
use crate::issuer::RootCa;
use crate::store::{RootState, SigningState, StateVersions};

/// The signing state, rebuilt when the roots change.
pub(super) struct SigningSnapshot {
    /// The store's version counters this state was built from.
    pub(super) versions: StateVersions,
    pub(super) roots: Vec<(i64, RootState)>,
    pub(super) signer: RootCa,
    pub(super) bundle_pem: Bytes,
    pub(super) tls: Arc<rustls::ServerConfig>,
    /// Chain verification against this bundle, for `/v1/renew`'s own check.
    pub(super) client_verifier: Arc<dyn ClientCertVerifier>,
    /// When the serving certificate should be re-issued.
    pub(super) refresh_at: SystemTime,
}

/// Issues a serving certificate for `sans` from the oldest root in the
/// bundle (a fresh key, 24 hours) and builds the TLS configuration around it.
pub(super) fn build_snapshot(
    state: SigningState,
    sans: &[String],
) -> Result<SigningSnapshot, ServerError> {
    let SigningState {
        versions,
        roots,
        signer,
        serving_signer,
        bundle,
    } = state;
    let roots: Vec<(i64, RootState)> = roots.into_iter().map(|r| (r.id, r.state)).collect();
    let server_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let ttl = Duration::from_secs(24 * 3600);
    let serving = serving_signer
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
    // TLS 1.3's one mandatory suite (RFC 8446 9.1), AES-128-GCM with
    // SHA-256, first, and this order decides over the client's: clients
    // built on rustls ask for AES-256-GCM with SHA-384 first, which runs the
    // handshake's transcript hash and key schedule on SHA-512's compression
    // function, with no hardware help on common x86 CPUs where SHA-256 has
    // it (SHA-NI). Every default suite is still accepted.
    // The process's provider when one is installed, as every other TLS
    // configuration here starts from.
    let mut provider = rustls::crypto::CryptoProvider::get_default()
        .map(|p| (**p).clone())
        .unwrap_or_else(rustls::crypto::aws_lc_rs::default_provider);
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(vec![serving.cert_der.clone()], key_der)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    // HTTP/1 only (the connection is served by hyper's HTTP/1 server, which
    // answers a 1.0 request as 1.0); `http/1.0` so that a client asking for
    // it by name (`curl --http1.0`) is not refused in the handshake.
    tls.alpn_protocols = vec![b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    tls.ignore_client_order = true;
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
    Ok(SigningSnapshot {
        versions,
        roots,
        signer,
        bundle_pem: Bytes::from(bundle.to_pem()),
        tls: Arc::new(tls),
        client_verifier: verifier,
        refresh_at: SystemTime::now() + lifetime / 2,
    })
}
