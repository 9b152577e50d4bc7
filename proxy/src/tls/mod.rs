//! TLS: the credential store, SPIFFE peer verifiers, and the rustls server
//! and client configurations built on them.
//!
//! Configurations are built once per listener; the certificate they present
//! and the bundle they verify against are read from the [`CredentialStore`]
//! at each handshake, so a renewal or a bundle refresh needs no rebuild and
//! drops no open connection.

mod store;
pub mod verify;

use std::fmt;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme, SupportedProtocolVersion};

pub use store::{CredentialError, CredentialStore, Credentials, TrustRoot};
pub use verify::{PeerClientVerifier, PeerIdError, PeerServerVerifier};

use crate::config::PeerPattern;

/// ALPN an HTTP listener offers, most preferred first: HTTP/2, then
/// HTTP/1.1, and `http/1.0` for the clients that ask for it by name
/// (`curl --http1.0`); without it they would be refused in the handshake
/// (alert `no_application_protocol`). Anything but `h2` is served by the
/// HTTP/1 server, which answers a 1.0 request as 1.0. The server side only:
/// an outbound offers exactly the version its caller spoke.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1", b"http/1.0"];

/// Presents the current certificate, as server and as client.
pub struct CurrentCert {
    store: Arc<CredentialStore>,
}

/// Builds TLS configurations for listeners and upstreams.
#[derive(Clone)]
pub struct TlsFactory {
    store: Arc<CredentialStore>,
    connections: Arc<crate::conn_registry::ConnRegistry>,
    provider: Arc<CryptoProvider>,
    versions: &'static [&'static SupportedProtocolVersion],
}

/// A configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build a TLS configuration: {0}")]
pub struct TlsConfigError(#[from] rustls::Error);

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS13_AND_12: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

impl TlsFactory {
    /// A factory reading credentials from `store`.
    pub fn new(store: Arc<CredentialStore>, allow_tls12: bool) -> Self {
        let provider = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        Self {
            connections: crate::conn_registry::ConnRegistry::new(store.clone()),
            store,
            provider,
            versions: if allow_tls12 {
                TLS13_AND_12
            } else {
                TLS13_ONLY
            },
        }
    }

    /// The registry of open peer connections made with these configurations.
    pub fn connections(&self) -> &Arc<crate::conn_registry::ConnRegistry> {
        &self.connections
    }

    /// An inbound server configuration: client certificate required.
    pub fn server(
        &self,
        allow: Option<Vec<PeerPattern>>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, TlsConfigError> {
        self.server_with_allow(Arc::new(arc_swap::ArcSwap::from_pointee(allow)), alpn)
    }

    /// [`TlsFactory::server`] with `allow_peers` read from `allow` at each
    /// handshake (replaced on reload).
    pub fn server_with_allow(
        &self,
        allow: crate::conn_registry::AllowPeers,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, TlsConfigError> {
        let verifier =
            PeerClientVerifier::with_allow(self.store.clone(), allow, self.provider.clone());
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(self.versions)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(CurrentCert {
                store: self.store.clone(),
            }));
        // Every connection verifies the peer's current certificate in full:
        // resumption would carry an old identity past a bundle change.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// An outbound client configuration expecting the peer `expected` (an
    /// ID, or a `/*` pattern for a transparent destination).
    pub fn client(
        &self,
        expected: impl Into<PeerPattern>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let verifier =
            PeerServerVerifier::new(self.store.clone(), expected.into(), self.provider.clone());
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(self.versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(CurrentCert {
                store: self.store.clone(),
            }));
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.current().map(|c| c.certified_key.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.current().map(|c| c.certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        self.store.is_ready()
    }
}

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

/// A short, bounded label for why a handshake failed, for logs and metrics:
/// `no_client_cert`, `unknown_ca`, `expired`, `not_yet_valid`,
/// `wrong_usage`, `not_a_leaf`, `revoked`, `wrong_identity`, `protocol` or
/// `other` (`timeout` is the caller's to say).
pub fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error as E};
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "other";
    };
    match err {
        E::NoCertificatesPresented => "no_client_cert",
        E::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            "unknown_ca"
        }
        E::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        // rustls alerts `certificate_expired` for this too; the metric
        // says which side of the validity period the peer's clock is on.
        E::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not_yet_valid",
        // No clientAuth in the extended key usage (a server certificate).
        E::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        ) => "wrong_usage",
        // Only our verifier says this: the deny-list has the peer.
        E::InvalidCertificate(CertificateError::Revoked) => "revoked",
        // webpki reports some chain failures as `Other` too: only our own
        // verifier's refusals are about identity.
        E::InvalidCertificate(CertificateError::Other(o)) if o.0.is::<PeerIdError>() => {
            "wrong_identity"
        }
        // A CA certificate (`CA:TRUE`, the root itself) presented as the
        // client's own.
        E::InvalidCertificate(CertificateError::Other(o))
            if matches!(
                o.0.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::CaUsedAsEndEntity)
            ) =>
        {
            "not_a_leaf"
        }
        E::InvalidCertificate(_) => "other",
        _ => "protocol",
    }
}

/// A readable reason for a failed handshake: our own verifier's words when
/// it refused the peer, rustls' otherwise.
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    else {
        return e.to_string();
    };
    match other.0.downcast_ref::<PeerIdError>() {
        Some(reason) => format!("peer certificate refused: {reason}"),
        None => format!("peer certificate refused: {}", other.0),
    }
}

#[cfg(test)]
mod tests;
