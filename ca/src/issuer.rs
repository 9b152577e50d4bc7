//! Turning a verified identity and a CSR into an X.509-SVID.
//!
//! The CSR contributes its public key and nothing else: the identity comes
//! from the credential, and every other field is the CA's choice. Only
//! ECDSA P-256/P-384 and Ed25519 keys are accepted, and the CSR's signature
//! must verify (proof that the requester holds the private key).

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::FromDer;

use crate::identity::{SpiffeId, TrustDomain};

/// The longest lifetime a workload certificate may have.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// The shortest lifetime a root may be made with (`--root-ttl`): twice the
/// longest certificate lifetime. A root must outlive the certificates it
/// signs, or their lifetimes are cut to its end; and a rotation needs one
/// certificate lifetime between `--activate` and `--retire`, with the old
/// root still valid throughout.
pub const MIN_ROOT_TTL: Duration = Duration::from_secs(2 * 24 * 3600);
/// The lifetime a workload certificate gets when none is asked for.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// How far not-before is backdated, for clocks a little behind ours.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// The largest CSR accepted, in bytes (PEM or DER).
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// A root CA: its certificate and signing key. `Debug` hides the key.
pub struct RootCa {
    cert_der: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

/// A parsed CSR whose signature verified and whose key type is allowed.
pub struct ValidatedCsr {
    spki: rcgen::SubjectPublicKeyInfo,
}

/// A certificate the CA just signed.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf, DER.
    pub cert_der: CertificateDer<'static>,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// Start of validity (backdated by [`BACKDATE`]).
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// True when the lifetime asked for was cut short to end with the
    /// root's own validity (a root near its end); callers log it, since the
    /// holder renews sooner than it expects.
    pub cut_to_root: bool,
}

/// Why a CSR was refused (HTTP 400).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Larger than [`MAX_CSR_LEN`].
    #[error("the CSR is larger than {MAX_CSR_LEN} bytes")]
    TooLarge,
    /// Not PEM or DER PKCS#10.
    #[error("the body is not a PKCS#10 CSR (PEM or DER)")]
    Malformed,
    /// The CSR's self-signature does not verify.
    #[error("the CSR's signature does not verify")]
    BadSignature,
    /// The key type is not ECDSA P-256/P-384 or Ed25519.
    #[error("only ECDSA P-256, P-384 and Ed25519 keys are accepted")]
    UnsupportedKey,
}

/// Errors while signing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The requested lifetime is over [`MAX_SVID_TTL`] or zero.
    #[error(
        "certificate lifetime {} is not allowed: it must be more than 0 and at most {}",
        crate::format_duration(*.0),
        crate::format_duration(MAX_SVID_TTL)
    )]
    BadTtl(Duration),
    /// The SPIFFE ID is outside the CA's trust domain.
    #[error("{id} is outside trust domain {trust_domain}")]
    WrongTrustDomain {
        /// The requested identity.
        id: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// rcgen failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    /// A root certificate or key on disk is unusable.
    #[error("root CA material is unusable: {0}")]
    BadRoot(String),
    /// The signing root has expired: whatever it signed would not verify.
    #[error(
        "the signing root expired at {}: nothing it signs can verify; rotate the CA \
         (moat ca rotate --prepare, then --activate)",
        crate::store::format_time(*.0)
    )]
    RootExpired(SystemTime),
}

impl RootCa {
    /// Generates a new self-signed root for `td`: ECDSA P-256, `CA:TRUE`
    /// with path length 0 (it signs leaves only).
    ///
    /// Its name is `O=moat, CN=moat root <td> #<generation> <key id>`, the
    /// key id being the first 4 bytes of its subject key identifier in hex.
    /// Two CAs made independently for the same trust domain thus never share
    /// a name: a peer holding one's bundle finds no issuer for the other's
    /// certificates (alert `unknown_ca`) instead of trying a signature that
    /// cannot match (alert `decrypt_error`), and an operator can tell the
    /// roots of a bundle apart. Leaves name the root by that subject and by
    /// its key identifier (authority key identifier = the root's SKI).
    pub fn generate(td: &TrustDomain, generation: i64, ttl: Duration) -> Result<Self, IssueError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let key_id = params.key_identifier(&key);
        let short_id = hex(&key_id[..key_id.len().min(4)]);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "moat");
        dn.push(
            DnType::CommonName,
            format!("moat root {td} #{generation} {short_id}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        params.subject_alt_names =
            vec![SanType::URI(td.id_string().try_into().map_err(
                |e: rcgen::Error| IssueError::BadRoot(e.to_string()),
            )?)];
        let cert = params.self_signed(&key)?;
        Self::from_der(cert.der().clone(), key)
    }

    /// Loads a root from its PEM certificate and PEM PKCS#8 key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IssueError> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| IssueError::BadRoot(format!("key: {e}")))?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| IssueError::BadRoot(format!("certificate: {e}")))?;
        Self::from_der(der, key)
    }

    fn from_der(cert_der: CertificateDer<'static>, key: KeyPair) -> Result<Self, IssueError> {
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&cert_der)
            .map_err(|e| IssueError::BadRoot(e.to_string()))?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        let issuer = rcgen::Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| IssueError::BadRoot(e.to_string()))?;
        Ok(Self {
            cert_der,
            issuer,
            not_after,
        })
    }

    /// The root certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The root certificate, PEM.
    pub fn cert_pem(&self) -> String {
        crate::identity::der_to_pem("CERTIFICATE", &self.cert_der)
    }

    /// The root's private key, PKCS#8 PEM. Only for writing it to the CA directory.
    pub fn dangerous_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// When the root expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs a workload certificate for `id` over the CSR's public key.
    pub fn sign_svid(
        &self,
        td: &TrustDomain,
        id: &SpiffeId,
        csr: &ValidatedCsr,
        ttl: Duration,
    ) -> Result<Issued, IssueError> {
        if !id.is_in(td) {
            return Err(IssueError::WrongTrustDomain {
                id: id.to_string(),
                trust_domain: td.to_string(),
            });
        }
        let uri = id
            .as_str()
            .to_owned()
            .try_into()
            .map_err(|e: rcgen::Error| IssueError::Sign(e))?;
        let (mut params, cut) = self.leaf_params(ttl)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        self.sign(params, cut, &csr.spki)
    }

    /// Signs a TLS server certificate (DNS names and IP addresses) for the
    /// CA's own HTTPS listener, over `key`.
    pub fn sign_server_cert(
        &self,
        sans: &[String],
        key: &KeyPair,
        ttl: Duration,
    ) -> Result<Issued, IssueError> {
        let (mut params, cut) = self.leaf_params(ttl.min(MAX_SVID_TTL))?;
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "moat CA server");
        params.distinguished_name = dn;
        self.sign(params, cut, key)
    }

    /// A leaf's fields for `ttl`, and whether its end was cut to the root's.
    fn leaf_params(&self, ttl: Duration) -> Result<(CertificateParams, bool), IssueError> {
        if ttl.is_zero() || ttl > MAX_SVID_TTL {
            return Err(IssueError::BadTtl(ttl));
        }
        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(IssueError::RootExpired(self.not_after));
        }
        let cut = now + ttl > self.not_after;
        let not_after = (now + ttl).min(self.not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = true;
        Ok((params, cut))
    }

    fn sign(
        &self,
        params: CertificateParams,
        cut_to_root: bool,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Issued, IssueError> {
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex(&s.to_bytes()))
            .unwrap_or_default();
        let not_before = params.not_before.into();
        let not_after = params.not_after.into();
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            cert_der: cert.der().clone(),
            serial,
            not_before,
            not_after,
            cut_to_root,
        })
    }
}

impl fmt::Debug for RootCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootCa")
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ValidatedCsr {
    /// Parses a PEM or DER PKCS#10 CSR, verifies its signature and checks the key type.
    pub fn parse(body: &[u8]) -> Result<Self, CsrError> {
        if body.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge);
        }
        let der = if body.trim_ascii_start().starts_with(b"-----BEGIN") {
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(body)
                .map_err(|_| CsrError::Malformed)?
                .as_ref()
                .to_vec()
        } else {
            body.to_vec()
        };
        let (rest, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                .map_err(|_| CsrError::Malformed)?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed);
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let spki =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|_| CsrError::UnsupportedKey)?;
        let alg = rcgen::PublicKeyData::algorithm(&spki);
        let allowed = [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ];
        if !allowed.contains(&alg) {
            return Err(CsrError::UnsupportedKey);
        }
        Ok(Self { spki })
    }
}

/// A random positive serial of 128 bits (at least 64 bits of entropy, as the
/// baseline requirements ask), never starting with a zero byte.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Svid, WorkloadKey};

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    #[test]
    fn svid_has_one_uri_san_and_leaf_fields() {
        let root = RootCa::generate(&td(), 1, Duration::from_secs(86400)).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let csr = ValidatedCsr::parse(key.csr_pem().unwrap().as_bytes()).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        let issued = root.sign_svid(&td(), &id, &csr, DEFAULT_SVID_TTL).unwrap();
        let svid = Svid::from_chain(vec![issued.cert_der.clone()]).unwrap();
        assert_eq!(svid.id, id);
        assert_eq!(svid.lifetime(), DEFAULT_SVID_TTL + BACKDATE);
        assert_eq!(issued.serial.len(), 32);

        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(&issued.cert_der).unwrap();
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
    }

    #[test]
    fn ttl_over_a_day_is_refused() {
        let root = RootCa::generate(&td(), 1, Duration::from_secs(86400 * 2)).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let csr = ValidatedCsr::parse(key.csr_pem().unwrap().as_bytes()).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/x").unwrap();
        let err = root
            .sign_svid(&td(), &id, &csr, Duration::from_secs(48 * 3600))
            .unwrap_err();
        assert!(matches!(err, IssueError::BadTtl(_)));
        // The request and the limit in the unit an operator writes them in.
        assert_eq!(
            err.to_string(),
            "certificate lifetime 48h is not allowed: it must be more than 0 and at most 24h"
        );
    }

    #[test]
    fn id_outside_trust_domain_is_refused() {
        let root = RootCa::generate(&td(), 1, Duration::from_secs(86400)).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let csr = ValidatedCsr::parse(key.csr_pem().unwrap().as_bytes()).unwrap();
        let id = SpiffeId::parse("spiffe://evil.org/x").unwrap();
        assert!(matches!(
            root.sign_svid(&td(), &id, &csr, DEFAULT_SVID_TTL),
            Err(IssueError::WrongTrustDomain { .. })
        ));
    }

    #[test]
    fn malformed_and_tampered_csrs_are_refused() {
        assert!(matches!(
            ValidatedCsr::parse(b"hello"),
            Err(CsrError::Malformed)
        ));
        assert!(matches!(
            ValidatedCsr::parse(
                b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            ),
            Err(CsrError::Malformed)
        ));
        assert!(matches!(
            ValidatedCsr::parse(&vec![b'A'; MAX_CSR_LEN + 1]),
            Err(CsrError::TooLarge)
        ));

        let key = WorkloadKey::generate().unwrap();
        let pem = key.csr_pem().unwrap();
        let mut der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let last = der.len() - 5;
        der[last] ^= 0x01; // flip a bit inside the signature
        assert!(ValidatedCsr::parse(&der).is_err());
    }

    #[test]
    fn rsa_keys_are_refused() {
        let rsa = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256);
        // aws-lc-rs can generate RSA keys; if this build cannot, the check is moot.
        if let Ok(rsa) = rsa {
            let csr = CertificateParams::default()
                .serialize_request(&rsa)
                .unwrap();
            assert!(matches!(
                ValidatedCsr::parse(csr.der()),
                Err(CsrError::UnsupportedKey)
            ));
        }
    }

    /// Two CAs made independently for one trust domain have different root
    /// names; each name carries the start of the root's key identifier, and
    /// a leaf's authority key identifier is its root's subject key identifier.
    #[test]
    fn independent_roots_of_one_trust_domain_have_distinct_names_and_matching_key_ids() {
        use x509_parser::extensions::ParsedExtension;
        let ski = |cert: &x509_parser::certificate::X509Certificate<'_>| {
            cert.iter_extensions()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                    _ => None,
                })
        };
        let a = RootCa::generate(&td(), 1, Duration::from_secs(86400)).unwrap();
        let b = RootCa::generate(&td(), 1, Duration::from_secs(86400)).unwrap();
        let (_, ca) = x509_parser::certificate::X509Certificate::from_der(a.cert_der()).unwrap();
        let (_, cb) = x509_parser::certificate::X509Certificate::from_der(b.cert_der()).unwrap();
        assert_ne!(ca.subject().to_string(), cb.subject().to_string());
        let a_ski = ski(&ca).expect("the root has a subject key identifier");
        let cn = ca.subject().iter_common_name().next().unwrap();
        assert_eq!(
            cn.as_str().unwrap(),
            format!("moat root example.org #1 {}", hex(&a_ski[..4]))
        );

        let key = WorkloadKey::generate().unwrap();
        let csr = ValidatedCsr::parse(key.csr_pem().unwrap().as_bytes()).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/x").unwrap();
        let leaf = a.sign_svid(&td(), &id, &csr, DEFAULT_SVID_TTL).unwrap();
        let (_, leaf) =
            x509_parser::certificate::X509Certificate::from_der(&leaf.cert_der).unwrap();
        assert_eq!(leaf.issuer(), ca.subject());
        let aki = leaf
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(k) => {
                    k.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .expect("the leaf has an authority key identifier");
        assert_eq!(aki, a_ski);
    }

    #[test]
    fn root_round_trips_through_pem() {
        let root = RootCa::generate(&td(), 7, Duration::from_secs(86400)).unwrap();
        let again = RootCa::from_pem(&root.cert_pem(), &root.dangerous_key_pem()).unwrap();
        assert_eq!(again.cert_der(), root.cert_der());
        assert!(!format!("{again:?}").contains("BEGIN"));
    }
}
