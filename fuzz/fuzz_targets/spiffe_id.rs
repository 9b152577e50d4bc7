//! SPIFFE ID and trust domain parsing never panics, and whatever it accepts
//! is canonical: `spiffe://`, a valid trust domain, no empty or dot path
//! segments, no query or fragment, and parsing the result again gives the
//! same ID. Certificate parsing for the ID never panics on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_ca::identity::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let _ = SpiffeId::from_cert_der(data);
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(td) = TrustDomain::parse(raw) {
        assert_eq!(
            TrustDomain::parse(td.as_str()).unwrap().as_str(),
            td.as_str()
        );
    }
    let Ok(id) = SpiffeId::parse(raw) else { return };
    let s = id.as_str();
    assert!(s.starts_with("spiffe://"), "{raw:?} -> {s:?}");
    assert!(!s.contains(['?', '#']), "{raw:?} -> {s:?}");
    let td = TrustDomain::parse(id.trust_domain_name()).expect("its trust domain parses");
    assert!(id.is_in(&td));
    let path = id.path();
    assert!(
        path.is_empty() || path.starts_with('/'),
        "{raw:?} -> path {path:?}"
    );
    assert!(
        path.split('/')
            .skip(1)
            .all(|seg| !seg.is_empty() && seg != "." && seg != ".."),
        "{raw:?} -> path {path:?}"
    );
    let again = SpiffeId::parse(s).expect("an accepted ID parses again");
    assert_eq!(again.as_str(), s);
});
