//! JWT verifications per second with jsonwebtoken (aws-lc-rs backend): ES256
//! (P-256) and RS256 (RSA-2048), each checking signature, `exp`, `iss` and
//! `aud` — the per-request work of a route that requires a JWT, without the
//! JWKS lookup. Keys come from rcgen; tokens are signed once, outside the loop.
//!
//! Run: `cargo bench --bench jwt`.

use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use rcgen::KeyPair;
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    token: String,
    key: DecodingKey,
    validation: Validation,
}

fn case(name: &'static str, alg: Algorithm, key: &KeyPair) -> Case {
    let pem = key.serialize_pem();
    let (enc, dec) = match alg {
        Algorithm::ES256 => (
            EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).unwrap(),
        ),
        Algorithm::RS256 => (
            EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            DecodingKey::from_rsa_pem(key.public_key_pem().as_bytes()).unwrap(),
        ),
        _ => unreachable!("only ES256 and RS256 are benched"),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "iss": "https://idp.example.org",
        "aud": "billing",
        "sub": "user-42",
        "iat": now,
        "exp": now + 3600,
        "scope": "read write",
        "groups": ["finance", "staff"],
    });
    let mut header = Header::new(alg);
    header.kid = Some("bench-key".into());
    let token = encode(&header, &claims, &enc).unwrap();
    let mut validation = Validation::new(alg);
    validation.set_issuer(&["https://idp.example.org"]);
    validation.set_audience(&["billing"]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    // The token verifies before the loop starts, or the bench would time errors.
    decode::<Value>(&token, &dec, &validation).unwrap();
    Case {
        name,
        token,
        key: dec,
        validation,
    }
}

fn verify(c: &mut Criterion) {
    moat_ca::install_crypto_provider();
    let es = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let rs = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let cases = [
        case("es256_verify", Algorithm::ES256, &es),
        case("rs256_verify_2048", Algorithm::RS256, &rs),
    ];
    let mut group = c.benchmark_group("jwt");
    group.throughput(Throughput::Elements(1));
    for k in &cases {
        group.bench_function(k.name, |b| {
            b.iter(|| decode::<Value>(&k.token, &k.key, &k.validation).unwrap());
        });
    }
    // A token signed by another key: the rejection path costs the same signature check.
    let other = case(
        "es256_other_key",
        Algorithm::ES256,
        &KeyPair::generate().unwrap(),
    );
    group.bench_function("es256_reject_wrong_key", |b| {
        b.iter(|| decode::<Value>(&other.token, &cases[0].key, &cases[0].validation).unwrap_err());
    });
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
