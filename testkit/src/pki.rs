//! Certificates made with rcgen at test time: what the CA would never
//! issue (a leaf from another CA, SANs of the caller's choosing).

use std::path::Path;

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// A certificate in PEM (the chain, if the leaf is followed by its CA)
/// and its private key in PEM.
#[derive(Clone, Debug)]
pub struct Pem {
    /// The certificate, then any chain.
    pub cert: String,
    /// The PKCS#8 private key.
    pub key: String,
    /// The certificate alone, DER.
    pub der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

/// A self-signed CA that is not the moat CA, named `common_name`; its
/// issuer and its certificate in PEM.
pub fn foreign_ca(common_name: &str) -> Result<(Issuer<'static, KeyPair>, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let cert = params.self_signed(&key)?;
    Ok((Issuer::new(params, key), cert.pem()))
}

/// The issuer of a CA directory made by `moat ca init` (its first root).
pub fn ca_dir_issuer(ca_dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let root = std::fs::read_to_string(ca_dir.join("roots/1.crt"))?;
    let key = KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("roots/1.key"))?)?;
    Ok(Issuer::from_ca_cert_pem(&root, key)?)
}

/// A URI SAN (a SPIFFE ID).
pub fn uri_san(id: &str) -> Result<SanType> {
    Ok(SanType::URI(id.try_into()?))
}

/// A leaf with the workload EKUs (server and client auth) and no SAN,
/// shaped by `edit` (SANs, validity, anything the CA would refuse), signed
/// by `issuer`; `chain` (PEM) is appended to its certificate.
pub fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    chain: &str,
    edit: impl FnOnce(&mut CertificateParams),
) -> Result<Pem> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    edit(&mut params);
    let cert = params.signed_by(&key, issuer)?;
    Ok(Pem {
        cert: format!("{}{chain}", cert.pem()),
        key: key.serialize_pem(),
        der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    })
}
