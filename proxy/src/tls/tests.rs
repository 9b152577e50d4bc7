use std::time::SystemTime;

use moat_ca::client::Svid;
use moat_ca::{SpiffeId, TrustBundle};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use super::*;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    bundle: TrustBundle,
}

fn new_ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        bundle: TrustBundle::new(vec![cert.der().clone()]).unwrap(),
        issuer: Issuer::new(params, key),
    }
}

fn leaf(ca: &Ca, uris: &[&str]) -> (Svid, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let chain = vec![cert.der().clone()];
    let svid = match Svid::from_chain(chain.clone()) {
        Ok(s) => s,
        // A leaf without a usable ID cannot be an Svid; tests only need its DER.
        Err(_) => Svid {
            chain,
            id: SpiffeId::parse("spiffe://example.org/placeholder").unwrap(),
            not_before: SystemTime::now(),
            not_after: SystemTime::now(),
            serial: String::new(),
        },
    };
    (svid, der)
}

fn store_with(ca: &Ca, id: &str) -> Arc<CredentialStore> {
    moat_ca::install_crypto_provider();
    let (svid, key) = leaf(ca, &[id]);
    let store = Arc::new(CredentialStore::new());
    store.publish(Credentials::new(svid, key, ca.bundle.clone()).unwrap());
    store
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn chain(svid: &Svid) -> CertificateDer<'static> {
    svid.chain[0].clone()
}

#[test]
fn credentials_refuse_a_key_that_does_not_match() {
    moat_ca::install_crypto_provider();
    let ca = new_ca();
    let (svid, _) = leaf(&ca, &["spiffe://example.org/a"]);
    let (_, other_key) = leaf(&ca, &["spiffe://example.org/a"]);
    let err = Credentials::new(svid, other_key, ca.bundle.clone()).unwrap_err();
    assert!(matches!(err, CredentialError::Key(_)), "{err}");
}

#[test]
fn credentials_refuse_a_certificate_outside_the_bundle() {
    moat_ca::install_crypto_provider();
    let (ours, theirs) = (new_ca(), new_ca());
    let (svid, key) = leaf(&theirs, &["spiffe://example.org/a"]);
    let err = Credentials::new(svid, key, ours.bundle.clone()).unwrap_err();
    assert!(matches!(err, CredentialError::Chain(_)), "{err}");
}

#[test]
fn server_verifier_matches_the_exact_spiffe_id_never_a_dns_name() {
    let ca = new_ca();
    let store = store_with(&ca, "spiffe://example.org/a");
    let want = SpiffeId::parse("spiffe://example.org/billing").unwrap();
    let verifier = PeerServerVerifier::new(store, want, provider());
    let name = ServerName::try_from("billing.example.org").unwrap();
    let now = UnixTime::now();
    let (right, _) = leaf(&ca, &["spiffe://example.org/billing"]);
    assert!(
        verifier
            .verify_server_cert(&chain(&right), &[], &name, &[], now)
            .is_ok()
    );
    let (wrong, _) = leaf(&ca, &["spiffe://example.org/billing-evil"]);
    let err = verifier
        .verify_server_cert(&chain(&wrong), &[], &name, &[], now)
        .unwrap_err();
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            other.0.downcast_ref::<PeerIdError>(),
            Some(PeerIdError::WrongId { .. })
        ),
        "{err}"
    );
    let (foreign, _) = leaf(&new_ca(), &["spiffe://example.org/billing"]);
    assert!(
        verifier
            .verify_server_cert(&chain(&foreign), &[], &name, &[], now)
            .is_err()
    );
}

#[test]
fn client_verifier_checks_trust_domain_and_allow_list() {
    let ca = new_ca();
    let store = store_with(&ca, "spiffe://example.org/a");
    let allow = vec![crate::config::PeerPattern::parse("spiffe://example.org/ns/prod/*").unwrap()];
    let verifier = PeerClientVerifier::new(store.clone(), Some(allow), provider());
    let now = UnixTime::now();
    let ok = |uris: &[&str]| {
        let (svid, _) = leaf(&ca, uris);
        verifier.verify_client_cert(&chain(&svid), &[], now).is_ok()
    };
    assert!(ok(&["spiffe://example.org/ns/prod/web"]));
    assert!(
        !ok(&["spiffe://example.org/ns/dev/web"]),
        "outside allow_peers"
    );
    assert!(
        !ok(&[
            "spiffe://example.org/ns/prod/web",
            "spiffe://example.org/ns/prod/db"
        ]),
        "two IDs"
    );
    assert!(!ok(&[]), "no ID");
    let open = PeerClientVerifier::new(store, None, provider());
    let (other_td, _) = leaf(&ca, &["spiffe://other.org/ns/prod/web"]);
    assert!(
        open.verify_client_cert(&chain(&other_td), &[], now)
            .is_err(),
        "foreign trust domain"
    );
}

/// Two CAs with the same root name (rcgen's default here; two `moat ca
/// init` of one trust domain before root names carried a key id): the
/// other's certificate is an unknown issuer both ways, not a bad
/// signature, so the alert is unknown_ca as the metric says.
#[test]
fn a_foreign_ca_with_our_roots_name_is_an_unknown_issuer() {
    let (ours, theirs) = (new_ca(), new_ca());
    let store = store_with(&ours, "spiffe://example.org/a");
    let (peer, _) = leaf(&theirs, &["spiffe://example.org/b"]);
    let now = UnixTime::now();
    let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
    let inbound = PeerClientVerifier::new(store.clone(), None, provider());
    assert_eq!(
        inbound.verify_client_cert(&chain(&peer), &[], now).err(),
        Some(unknown.clone())
    );
    let want = SpiffeId::parse("spiffe://example.org/b").unwrap();
    let outbound = PeerServerVerifier::new(store, want, provider());
    let name = ServerName::try_from("b").unwrap();
    assert_eq!(
        outbound
            .verify_server_cert(&chain(&peer), &[], &name, &[], now)
            .err(),
        Some(unknown)
    );
}

#[test]
fn verifiers_see_a_new_bundle_at_once() {
    let (old, new) = (new_ca(), new_ca());
    let store = store_with(&old, "spiffe://example.org/a");
    let verifier = PeerClientVerifier::new(store.clone(), None, provider());
    let (peer, _) = leaf(&new, &["spiffe://example.org/b"]);
    let now = UnixTime::now();
    assert!(
        verifier
            .verify_client_cert(&chain(&peer), &[], now)
            .is_err()
    );
    let both = TrustBundle::new(vec![
        old.bundle.roots()[0].clone(),
        new.bundle.roots()[0].clone(),
    ])
    .unwrap();
    let next = store.current().unwrap().with_bundle(both).unwrap();
    store.publish(next);
    assert!(verifier.verify_client_cert(&chain(&peer), &[], now).is_ok());
}
