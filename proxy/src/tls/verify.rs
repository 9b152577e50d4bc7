//! Peer verification by chain to the trust bundle and by SPIFFE ID, never by
//! DNS name.
//!
//! rustls' stock verifiers check DNS names; a workload certificate has none.
//! These verifiers read the current bundle from the [`CredentialStore`] at
//! every handshake, so a bundle refreshed from the CA applies at once.

use std::fmt;
use std::sync::Arc;

use moat_ca::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::FromDer;

use arc_swap::ArcSwap;

use super::store::CredentialStore;
use crate::config::PeerPattern;
use crate::conn_registry::AllowPeers;

/// The handshake-signature half of a verifier: the same for all of ours
/// (checked with the `provider` field's algorithms).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Why a peer's certificate was refused, beyond what webpki says.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerIdError {
    /// No credentials yet, so no bundle to verify against.
    #[error("no trust bundle loaded yet")]
    NotReady,
    /// The certificate does not carry exactly one SPIFFE ID.
    #[error("peer certificate has no usable SPIFFE ID: {0}")]
    NoId(moat_ca::identity::IdError),
    /// The ID is outside our trust domain.
    #[error("peer {id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The peer's ID.
        id: String,
        /// Ours.
        trust_domain: String,
    },
    /// Outbound: the peer is not the one configured.
    #[error("peer presented {got}, expected {want}")]
    WrongId {
        /// What the peer presented.
        got: String,
        /// What the configuration says.
        want: String,
    },
    /// Inbound: the peer is not in `allow_peers`.
    #[error("peer {0} is not in allow_peers")]
    NotAllowed(String),
}

/// Outbound: the server (peer sidecar) must chain to the bundle and present
/// exactly the configured SPIFFE ID (or one under a transparent
/// destination's `/*` pattern).
pub struct PeerServerVerifier {
    store: Arc<CredentialStore>,
    expected: PeerPattern,
    provider: Arc<CryptoProvider>,
}

/// Inbound: the client must chain to the bundle, carry one SPIFFE ID in our
/// trust domain and, if configured, match `allow_peers`.
pub struct PeerClientVerifier {
    store: Arc<CredentialStore>,
    allow: AllowPeers,
    provider: Arc<CryptoProvider>,
}

fn reject(e: PeerIdError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// A chain refused for a bad signature is, to us, a chain from a CA we do
/// not know. webpki tries each root whose name is the certificate's issuer
/// name; a root of that name with another key (two CAs made for one trust
/// domain before root names carried a key identifier) fails on the
/// signature, and rustls would send alert `decrypt_error`. Calling it an
/// unknown issuer sends `unknown_ca`, which is what the handshake-failure
/// metric says too.
fn unknown_issuer(e: rustls::Error) -> rustls::Error {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        }
        other => other,
    }
}

/// Reads the SPIFFE ID of an already chain-verified leaf, checks its trust
/// domain, and refuses it if the deny-list revokes its serial or its
/// identity (one parse of the leaf for both; two hash lookups).
fn peer_id(
    store: &CredentialStore,
    leaf: &CertificateDer<'_>,
    now: UnixTime,
) -> Result<SpiffeId, rustls::Error> {
    let creds = store
        .current()
        .ok_or_else(|| reject(PeerIdError::NotReady))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).map_err(|_| {
        reject(PeerIdError::NoId(
            moat_ca::identity::IdError::BadCertificate,
        ))
    })?;
    let id = SpiffeId::from_x509(&cert).map_err(|e| reject(PeerIdError::NoId(e)))?;
    if !id.is_in(&creds.trust_domain) {
        return Err(reject(PeerIdError::ForeignTrustDomain {
            id: id.as_str().to_owned(),
            trust_domain: creds.trust_domain.as_str().to_owned(),
        }));
    }
    let deny = store.revocations().current();
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    if let Some(revoked) = deny.revoked(cert.raw_serial(), id.as_str(), now) {
        tracing::info!(
            peer = id.as_str(),
            serial = %moat_ca::issuer::hex(cert.raw_serial()),
            reason = %revoked.reason,
            "peer certificate revoked"
        );
        // rustls sends the `certificate_revoked` alert for this one.
        return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
    }
    Ok(id)
}

impl PeerServerVerifier {
    /// A verifier expecting `expected`.
    pub fn new(
        store: Arc<CredentialStore>,
        expected: impl Into<PeerPattern>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            store,
            expected: expected.into(),
            provider,
        }
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let creds = self
            .store
            .current()
            .ok_or_else(|| reject(PeerIdError::NotReady))?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &creds.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(unknown_issuer)?;
        let id = peer_id(&self.store, end_entity, now)?;
        if !self.expected.matches(&id) {
            return Err(reject(PeerIdError::WrongId {
                got: id.as_str().to_owned(),
                want: format!("{:?}", self.expected),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

impl PeerClientVerifier {
    /// A verifier admitting peers of our trust domain that match `allow`
    /// (every such peer when `None`).
    pub fn new(
        store: Arc<CredentialStore>,
        allow: Option<Vec<PeerPattern>>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self::with_allow(store, Arc::new(ArcSwap::from_pointee(allow)), provider)
    }

    /// A verifier reading `allow_peers` from `allow` at each handshake, so
    /// that a reload applies to the next one.
    pub fn with_allow(
        store: Arc<CredentialStore>,
        allow: AllowPeers,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            store,
            allow,
            provider,
        }
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // XXX: no hints; the hint list would have to follow bundle updates,
        // and a workload has exactly one certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let creds = self
            .store
            .current()
            .ok_or_else(|| reject(PeerIdError::NotReady))?;
        creds
            .client_chain_verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(unknown_issuer)?;
        let id = peer_id(&self.store, end_entity, now)?;
        if let Some(allow) = self.allow.load().as_ref()
            && !allow.iter().any(|p| p.matches(&id))
        {
            return Err(reject(PeerIdError::NotAllowed(id.as_str().to_owned())));
        }
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

impl fmt::Debug for PeerServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl fmt::Debug for PeerClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerClientVerifier")
            .field("allow", &self.allow)
            .finish()
    }
}

/// Accepts any server certificate. The proxy never uses it: it is for
/// clients whose point is the *server's* refusal of them — the demo's
/// rogue clients and the hostile-input tests — and which therefore do not
/// care who the server is. Signatures are still checked.
#[derive(Debug)]
pub struct AnyServerCertificate {
    provider: Arc<CryptoProvider>,
}

impl AnyServerCertificate {
    /// Checks handshake signatures with `provider`'s algorithms.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self { provider }
    }
}

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}
