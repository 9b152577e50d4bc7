//! The credential store: this workload's certificate, key and trust bundle,
//! published as one unit so that every new handshake sees a consistent set.
//!
//! Readers (certificate resolvers, verifiers, the admin view) load the
//! current [`Credentials`] lock-free through `ArcSwap`; writers (the CA
//! renewal task, the file watcher) replace it whole. Open connections keep
//! the `Arc` they were built with, so a swap never drops them.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use moat_ca::client::Svid;
use moat_ca::{TrustBundle, TrustDomain};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;
use tokio::sync::watch;

use crate::revocation::RevocationState;

/// One consistent set of credentials.
pub struct Credentials {
    /// The workload certificate, parsed.
    pub svid: Svid,
    /// Chain and signing key, ready for rustls.
    pub certified_key: Arc<CertifiedKey>,
    /// The trust bundle.
    pub bundle: TrustBundle,
    /// The bundle's roots, for verifying peers.
    pub roots: Arc<RootCertStore>,
    /// Chain verification for client certificates, built once per bundle.
    pub(crate) client_chain_verifier: Arc<dyn ClientCertVerifier>,
    /// The trust domain peers must belong to: our own.
    pub trust_domain: TrustDomain,
    /// The bundle's roots as the metrics show them, read once per set
    /// rather than at each scrape.
    pub trust_roots: Arc<[TrustRoot]>,
}

/// One root of the trust bundle, as `moat_trust_bundle_root_expiry_timestamp_seconds`
/// shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRoot {
    /// The first 8 bytes of the SHA-256 of the root's DER, in lower-case hex
    /// (16 digits): what `openssl x509 -noout -fingerprint -sha256` prints,
    /// cut short, without colons. Enough to tell apart the one or two roots
    /// a bundle holds.
    pub fingerprint: String,
    /// When the root expires, in Unix seconds (`0` if it cannot be parsed:
    /// rustls took it as a trust anchor, so it should always parse).
    pub not_after: i64,
}

/// Why a set of credentials cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The private key cannot be loaded or does not match the certificate.
    #[error("the private key does not fit the certificate: {0}")]
    Key(String),
    /// The bundle cannot be used to verify peers.
    #[error("the trust bundle is unusable: {0}")]
    Bundle(String),
    /// Our own certificate does not chain to the bundle, or has expired.
    #[error("the certificate does not verify against the trust bundle: {0}")]
    Chain(String),
}

/// Where the current credentials live.
///
/// Why an `ArcSwapOption` beside the `watch` channel and not the channel
/// alone: every TLS handshake (the certificate resolver, the client config)
/// reads the current credentials, and `watch::Receiver::borrow` takes the
/// channel's `RwLock` for that read, shared by every connection task on
/// every worker, where an `ArcSwap` load is a lock-free pointer read. The
/// channel carries only a generation number, for the few that wait for a
/// change (the connection registry, which closes connections whose peer's
/// credential lapsed, and [`CredentialStore::ready`]).
pub struct CredentialStore {
    current: ArcSwapOption<Credentials>,
    changed: watch::Sender<u64>,
    revocations: Arc<RevocationState>,
}

impl Credentials {
    /// Builds a set from a certificate, its key and a bundle, checking that
    /// they fit together (key matches, certificate chains to the bundle).
    pub fn new(
        svid: Svid,
        key: PrivateKeyDer<'static>,
        bundle: TrustBundle,
    ) -> Result<Self, CredentialError> {
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let certified_key = CertifiedKey::from_der(svid.chain.clone(), key, &provider)
            .map_err(|e| CredentialError::Key(key_failure(&e)))?;
        let roots = Arc::new(
            bundle
                .root_store()
                .map_err(|e| CredentialError::Bundle(e.to_string()))?,
        );
        let client_chain_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| CredentialError::Bundle(e.to_string()))?;
        // Our own certificate must verify as a peer's would: otherwise every
        // peer would refuse us, and we had better keep the old set.
        let leaf = rustls::server::ParsedCertificate::try_from(&svid.chain[0])
            .map_err(|e| CredentialError::Chain(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &roots,
            &svid.chain[1..],
            rustls_pki_types::UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| CredentialError::Chain(chain_failure(&e, &svid, &bundle)))?;
        let trust_domain = TrustDomain::parse(svid.id.trust_domain_name())
            .map_err(|e| CredentialError::Chain(e.to_string()))?;
        Ok(Self {
            svid,
            certified_key: Arc::new(certified_key),
            trust_roots: trust_roots(&bundle),
            bundle,
            roots,
            client_chain_verifier,
            trust_domain,
        })
    }

    /// The same certificate and key with another bundle (after a CA rotation).
    pub fn with_bundle(&self, bundle: TrustBundle) -> Result<Self, CredentialError> {
        let roots = Arc::new(
            bundle
                .root_store()
                .map_err(|e| CredentialError::Bundle(e.to_string()))?,
        );
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let client_chain_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| CredentialError::Bundle(e.to_string()))?;
        Ok(Self {
            svid: self.svid.clone(),
            certified_key: self.certified_key.clone(),
            trust_roots: trust_roots(&bundle),
            bundle,
            roots,
            client_chain_verifier,
            trust_domain: self.trust_domain.clone(),
        })
    }
}

/// The roots of `bundle`, for the metrics.
fn trust_roots(bundle: &TrustBundle) -> Arc<[TrustRoot]> {
    bundle
        .roots()
        .iter()
        .map(|der| {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
            let fingerprint = digest.as_ref()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let not_after = x509_parser::parse_x509_certificate(der)
                .map(|(_, c)| c.validity().not_after.timestamp())
                .unwrap_or(0);
            TrustRoot {
                fingerprint,
                not_after,
            }
        })
        .collect()
}

/// Why a key was refused, in words: rustls's own text for a mismatch is
/// `keys may not be consistent: KeyMismatch`.
fn key_failure(e: &rustls::Error) -> String {
    use rustls::InconsistentKeys;
    match e {
        rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
            "it is the key of another certificate".to_owned()
        }
        rustls::Error::InconsistentKeys(InconsistentKeys::Unknown) => {
            "its public key cannot be compared with the certificate's".to_owned()
        }
        e => e.to_string(),
    }
}

/// Why our own chain does not verify. When it leads to none of the
/// bundle's roots (the usual cause: a bundle from another CA, or from before
/// a rotation), says who issued the certificate and which roots were tried.
fn chain_failure(e: &rustls::Error, svid: &Svid, bundle: &TrustBundle) -> String {
    use rustls::CertificateError;
    let leads_nowhere = matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::BadSignature | CertificateError::UnknownIssuer
        )
    );
    if !leads_nowhere {
        return e.to_string();
    }
    let name = |der: &[u8], issuer: bool| {
        x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| {
                if issuer {
                    c.issuer().to_string()
                } else {
                    c.subject().to_string()
                }
            })
            .unwrap_or_else(|_| "an unparsable certificate".to_owned())
    };
    let issuer = name(&svid.chain[0], true);
    let tried: Vec<String> = bundle
        .roots()
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{}. {}", i + 1, name(r, false)))
        .collect();
    format!(
        "{e}: the chain (certificate issued by \"{issuer}\") does not lead to any root of the bundle; tried {} root(s): {}",
        tried.len(),
        tried.join("; ")
    )
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("svid", &self.svid)
            .field("roots", &self.bundle.roots().len())
            .finish_non_exhaustive()
    }
}

impl Default for CredentialStore {
    fn default() -> Self {
        Self::new()
    }
}

impl CredentialStore {
    /// An empty store: not ready until the first credentials are published.
    pub fn new() -> Self {
        Self::with_revocations(Arc::default())
    }

    /// An empty store enforcing the deny-list `revocations`.
    pub fn with_revocations(revocations: Arc<RevocationState>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            changed: watch::Sender::new(0),
            revocations,
        }
    }

    /// The deny-list the verifiers check peers against.
    pub fn revocations(&self) -> &Arc<RevocationState> {
        &self.revocations
    }

    /// The current credentials, if any.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Publishes new credentials; new handshakes use them at once.
    pub fn publish(&self, creds: Credentials) {
        self.current.store(Some(Arc::new(creds)));
        self.changed.send_modify(|v| *v += 1);
    }

    /// True once credentials are held.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Notified at each publish.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Resolves once credentials are held (at once if they are already).
    pub async fn ready(&self) {
        let mut changed = self.changed.subscribe();
        while !self.is_ready() {
            // The sender lives as long as `self`: this cannot fail while we wait.
            if changed.changed().await.is_err() {
                return;
            }
        }
    }
}
