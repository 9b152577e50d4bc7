//! The CA's CSR parser never panics on any bytes (PEM or DER), refuses
//! anything over the size cap, and what it accepts can be signed into a
//! workload certificate carrying only the CA's chosen identity.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use moat_ca::identity::{SpiffeId, TrustDomain};
use moat_ca::issuer::{MAX_CSR_LEN, RootCa, ValidatedCsr};

fn root() -> &'static (RootCa, TrustDomain) {
    static ROOT: OnceLock<(RootCa, TrustDomain)> = OnceLock::new();
    ROOT.get_or_init(|| {
        let td = TrustDomain::parse("example.org").unwrap();
        (
            RootCa::generate(&td, 1, Duration::from_secs(3600)).unwrap(),
            td,
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let parsed = ValidatedCsr::parse(data);
    if data.len() > MAX_CSR_LEN {
        assert!(parsed.is_err());
    }
    // Also as PEM, so the fuzzer reaches the DER parser through both doors.
    let pem = moat_ca::identity::der_to_pem("CERTIFICATE REQUEST", data);
    let _ = ValidatedCsr::parse(pem.as_bytes());
    let Ok(csr) = parsed else { return };
    let (root, td) = root();
    let id = SpiffeId::parse("spiffe://example.org/ns/fuzz/sa/one").unwrap();
    let issued = root
        .sign_svid(td, &id, &csr, Duration::from_secs(60))
        .expect("an accepted CSR can be signed");
    assert_eq!(
        SpiffeId::from_cert_der(&issued.cert_der).unwrap().as_str(),
        id.as_str()
    );
});
