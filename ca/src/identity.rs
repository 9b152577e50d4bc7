//! Workload identities: SPIFFE IDs, trust domains and trust bundles.
//!
//! Pure types, no I/O. A [`SpiffeId`] can only be built by parsing, so code
//! that holds one knows it is valid per the SPIFFE ID specification.

use std::fmt;
use std::str::FromStr;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

/// The longest SPIFFE ID accepted, in bytes (the SPIFFE spec's URI limit).
pub const MAX_ID_LEN: usize = 2048;
/// The longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The ID does not start with `spiffe://`.
    #[error("a SPIFFE ID must start with spiffe://")]
    WrongScheme,
    /// The trust domain is empty.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain has a character outside `[a-z0-9.-_]`.
    #[error("the trust domain may only hold lowercase letters, digits, '.', '-' and '_'")]
    BadTrustDomainChar,
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("the path has an empty segment ('//' or a trailing '/')")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("the path has a '.' or '..' segment")]
    DotSegment,
    /// A path segment has a character outside `[A-Za-z0-9.-_]`.
    #[error("the path may only hold letters, digits, '.', '-', '_' and '/'")]
    BadPathChar,
    /// The ID is longer than [`MAX_ID_LEN`].
    #[error("the SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    /// The ID has a query, fragment, port or user info.
    #[error("a SPIFFE ID has no query, fragment, port or user info")]
    ExtraUriParts,
    /// The ID names only a trust domain, with no workload path.
    #[error("a workload SPIFFE ID needs a path after the trust domain")]
    NoPath,
    /// A certificate does not carry exactly one URI SAN that is a SPIFFE ID.
    #[error("the certificate must carry exactly one URI SAN, a SPIFFE ID (found {0})")]
    UriSanCount(usize),
    /// A certificate could not be parsed as X.509.
    #[error("the certificate is not valid X.509")]
    BadCertificate,
}

/// A SPIFFE trust domain, such as `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A workload SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    /// Byte offset of the `/` that starts the path.
    path_at: usize,
}

/// A set of trusted root certificates. Several roots at once let a CA be
/// rotated without an outage.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

/// Errors from reading a trust bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The PEM text holds no certificate.
    #[error("the trust bundle holds no certificate")]
    Empty,
    /// The PEM text could not be read.
    #[error("the trust bundle is not valid PEM: {0}")]
    Pem(String),
    /// A certificate could not be used as a trust anchor.
    #[error("a trust bundle certificate cannot be used as a root: {0}")]
    BadRoot(String),
}

impl TrustDomain {
    /// Parses a trust domain name (lowercase letters, digits, `.`, `-`, `_`).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::EmptyTrustDomain);
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdError::TrustDomainTooLong);
        }
        if s.contains([':', '@', '?', '#']) {
            return Err(IdError::ExtraUriParts);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(IdError::BadTrustDomainChar);
        }
        Ok(Self(s.to_owned()))
    }

    /// The trust domain's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of this trust domain itself (`spiffe://<td>`), as used in
    /// URI name constraints and bundle names.
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }

    /// Builds a workload ID in this trust domain from a path such as `/ns/prod/sa/web`.
    pub fn workload(&self, path: &str) -> Result<SpiffeId, IdError> {
        SpiffeId::parse(&format!("spiffe://{}{}", self.0, path))
    }
}

impl SpiffeId {
    /// Parses and validates a workload SPIFFE ID per the SPIFFE ID specification.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(IdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        TrustDomain::parse(td)?;
        if path.is_empty() {
            return Err(IdError::NoPath);
        }
        for segment in path[1..].split('/') {
            match segment {
                "" => return Err(IdError::EmptySegment),
                "." | ".." => return Err(IdError::DotSegment),
                _ => {}
            }
            if segment.contains(['?', '#']) {
                return Err(IdError::ExtraUriParts);
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(IdError::BadPathChar);
            }
        }
        Ok(Self {
            full: s.to_owned(),
            path_at: "spiffe://".len() + td.len(),
        })
    }

    /// Reads the SPIFFE ID from a DER certificate, which must carry exactly
    /// one URI SAN (the X.509-SVID rule).
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|_| IdError::BadCertificate)?;
        Self::from_x509(&cert)
    }

    /// The SPIFFE ID in an already parsed certificate's one URI SAN.
    pub fn from_x509(
        cert: &x509_parser::certificate::X509Certificate<'_>,
    ) -> Result<Self, IdError> {
        let mut uris = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uris.push(*uri);
                    }
                }
            }
        }
        match uris.as_slice() {
            [one] => Self::parse(one),
            other => Err(IdError::UriSanCount(other.len())),
        }
    }

    /// The whole ID, `spiffe://td/path`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain's name.
    pub fn trust_domain_name(&self) -> &str {
        &self.full["spiffe://".len()..self.path_at]
    }

    /// True when this ID belongs to `td`.
    pub fn is_in(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.path_at..]
    }
}

impl TrustBundle {
    /// Builds a bundle from DER roots.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let bundle = Self { roots };
        // Fail early, at load time, on anything webpki would refuse as an anchor.
        bundle.root_store()?;
        Ok(bundle)
    }

    /// Reads every `CERTIFICATE` block of a PEM text.
    pub fn from_pem(pem: &[u8]) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        Self::new(roots)
    }

    /// The roots, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The bundle as PEM text, one block per root.
    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|c| der_to_pem("CERTIFICATE", c))
            .collect()
    }

    /// A rustls root store holding every root of the bundle.
    pub fn root_store(&self) -> Result<RootCertStore, BundleError> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| BundleError::BadRoot(e.to_string()))?;
        }
        Ok(store)
    }
}

/// Encodes DER bytes as one PEM block with the given label: 64-column
/// base64 lines and `\n` line ends (the `pem` crate's default is `\r\n`),
/// ending in a newline, so blocks concatenate into a bundle.
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new()
        .set_line_ending(pem::LineEnding::LF)
        .set_line_wrap(64);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.roots.len())
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse() {
        for ok in [
            "spiffe://example.org/ns/prod/sa/web",
            "spiffe://example.org/vm/billing",
            "spiffe://a-b_c.d/x.y-z_w",
        ] {
            let id = SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.as_str(), ok);
        }
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/web");
    }

    #[test]
    fn invalid_ids_are_refused_with_the_reason() {
        let cases = [
            ("https://example.org/x", IdError::WrongScheme),
            ("SPIFFE://example.org/x", IdError::WrongScheme),
            ("spiffe:///x", IdError::EmptyTrustDomain),
            ("spiffe://Example.org/x", IdError::BadTrustDomainChar),
            ("spiffe://example.org:443/x", IdError::ExtraUriParts),
            ("spiffe://user@example.org/x", IdError::ExtraUriParts),
            ("spiffe://example.org", IdError::NoPath),
            ("spiffe://example.org/", IdError::EmptySegment),
            ("spiffe://example.org/a//b", IdError::EmptySegment),
            ("spiffe://example.org/a/", IdError::EmptySegment),
            ("spiffe://example.org/a/./b", IdError::DotSegment),
            ("spiffe://example.org/a/..", IdError::DotSegment),
            ("spiffe://example.org/a?x=1", IdError::ExtraUriParts),
            ("spiffe://example.org/a#f", IdError::ExtraUriParts),
            ("spiffe://example.org/a b", IdError::BadPathChar),
            ("spiffe://example.org/a%20b", IdError::BadPathChar),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "{input}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(IdError::TooLong));
    }

    #[test]
    fn trust_domain_membership() {
        let td = TrustDomain::parse("example.org").unwrap();
        assert!(td.workload("/x").unwrap().is_in(&td));
        let other = SpiffeId::parse("spiffe://example.org.evil/x").unwrap();
        assert!(!other.is_in(&td));
    }

    #[test]
    fn der_to_pem_round_trips() {
        let der = CertificateDer::from(vec![1u8; 100]);
        let pem = der_to_pem("CERTIFICATE", &der);
        let back: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, vec![der]);
    }

    /// The exact text the hand-written encoder produced before the `pem`
    /// crate: 64-column lines, `\n` line ends, a newline after the END line.
    #[test]
    fn der_to_pem_layout_is_unchanged() {
        let b64 = format!("{}AQ==", "AQEB".repeat(33));
        let expected = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n{}\n{}\n-----END CERTIFICATE-----\n",
            &b64[..64],
            &b64[64..128],
            &b64[128..]
        );
        assert_eq!(der_to_pem("CERTIFICATE", &[1u8; 100]), expected);
        assert_eq!(der_to_pem("X", &[]), "-----BEGIN X-----\n-----END X-----\n");
    }
}
