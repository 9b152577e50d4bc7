//! Join-token verification never panics and never accepts a token the CA
//! did not sign: the input becomes either the whole token, or a header and
//! claims (split at the first NUL) spliced onto a real token's signature,
//! so `alg: none`, `kid` games, HS/RS confusion and odd claims are all
//! reachable. Nothing here can carry a valid ES256 signature over its own
//! header and claims, so every token must be refused.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use moat_ca::identity::{SpiffeId, TrustDomain};
use moat_ca::token::JoinTokenKey;

struct Fixture {
    key: JoinTokenKey,
    td: TrustDomain,
    real: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (key, _) = JoinTokenKey::generate().unwrap();
        let td = TrustDomain::parse("example.org").unwrap();
        let id = SpiffeId::parse("spiffe://example.org/vm/one").unwrap();
        let real = key.mint(&td, &id, Duration::from_secs(600)).unwrap();
        assert!(key.verify(&td, &real).is_ok());
        Fixture { key, td, real }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    if let Ok(raw) = std::str::from_utf8(data) {
        assert!(
            f.key.verify(&f.td, raw).is_err() || raw == f.real,
            "{raw:?} accepted"
        );
    }
    let (header, claims) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"{}"[..]),
    };
    let real_parts: Vec<&str> = f.real.split('.').collect();
    let signature = real_parts[2];
    let token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims),
        signature
    );
    if token != f.real {
        assert!(f.key.verify(&f.td, &token).is_err(), "{token:?} accepted");
    }
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    assert!(
        f.key.verify(&f.td, &unsigned).is_err(),
        "{unsigned:?} accepted"
    );
});
