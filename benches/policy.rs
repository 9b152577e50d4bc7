//! Authorization decisions per second, and time per decision, for policies of
//! 10, 100 and 1,000 routes: a request matching the last route of the file,
//! the same after path normalization, and a request no route matches (routes
//! are indexed by first path segment, so these stay flat as routes grow).
//! One more bench adds ES256 JWT verification.
//!
//! Run: `cargo bench --bench policy`. Criterion writes its results under
//! `target/criterion/` (HTML and JSON); throughput is shown as elements/s.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use moat_ca::SpiffeId;
use moat_proxy::policy::{Method, Policy, RequestFacts, Verdict};

/// A policy of `n` routes, each `/svcI/*` for one client plus a namespace
/// pattern, and a last route requiring a JWT; jwks.json beside it.
fn policy(dir: &std::path::Path, n: usize, enc: &EncodingKey) -> Policy {
    let mut jwk = Jwk::from_encoding_key(enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    std::fs::write(
        dir.join("jwks.json"),
        serde_json::json!({ "keys": [jwk] }).to_string(),
    )
    .unwrap();
    let mut text = String::from(
        "[[issuer]]\nname = \"corp\"\nissuer = \"https://auth.example.org\"\naudiences = [\"svc\"]\n\
         jwks_file = \"jwks.json\"\nalgorithms = [\"ES256\"]\n\n",
    );
    for i in 0..n - 1 {
        write!(
            text,
            "[[route]]\nname = \"r{i}\"\npath = \"/svc{i}/*\"\nmethods = [\"GET\", \"HEAD\"]\n\
             peers = [\"spiffe://example.org/ns/prod/sa/client{i}\", \"spiffe://example.org/ns/batch/*\"]\n\n"
        )
        .unwrap();
    }
    text.push_str(
        "[[route]]\nname = \"jwt\"\npath = \"/api/*\"\nmethods = [\"GET\"]\n\
         peers = [\"spiffe://example.org/ns/prod/sa/frontend\"]\n\
         jwt = { issuer = \"corp\", claims = { scope = \"read\" } }\nforward_claims = { sub = \"x-user-id\" }\n",
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    let policy = Policy::load(&path).unwrap();
    assert_eq!(policy.route_count(), n);
    policy
}

fn decisions(c: &mut Criterion) {
    moat_ca::install_crypto_provider();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let enc = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let batch = SpiffeId::parse("spiffe://example.org/ns/batch/sa/nightly").unwrap();
    let now = SystemTime::now();
    let mut group = c.benchmark_group("policy");
    group.throughput(Throughput::Elements(1));
    for n in [10usize, 100, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy(dir.path(), n, &enc);
        let last = format!("/svc{}/items/42?x=1", n - 2);
        let facts = RequestFacts {
            method: &Method::GET,
            host: None,
            path: &last,
            peer: &batch,
            authorization: None,
        };
        assert_eq!(policy.authorize(&facts, now).verdict, Verdict::Allow);
        group.bench_with_input(BenchmarkId::new("last_route", n), &facts, |b, facts| {
            b.iter(|| policy.authorize(facts, now).verdict);
        });
        let unnormal = format!("/svc{}/a/../items//%34%32", n - 2);
        let facts = RequestFacts {
            path: &unnormal,
            ..facts
        };
        assert_eq!(policy.authorize(&facts, now).verdict, Verdict::Allow);
        group.bench_with_input(
            BenchmarkId::new("last_route_normalized", n),
            &facts,
            |b, facts| b.iter(|| policy.authorize(facts, now).verdict),
        );
        let facts = RequestFacts {
            path: "/nowhere",
            ..facts
        };
        assert_eq!(policy.authorize(&facts, now).verdict, Verdict::Forbidden);
        group.bench_with_input(BenchmarkId::new("no_route", n), &facts, |b, facts| {
            b.iter(|| policy.authorize(facts, now).verdict);
        });
    }

    let dir = tempfile::tempdir().unwrap();
    let policy = policy(dir.path(), 100, &enc);
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let exp = now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims = serde_json::json!({"iss": "https://auth.example.org", "aud": "svc", "sub": "alice", "scope": "read write", "exp": exp});
    let auth = format!(
        "Bearer {}",
        jsonwebtoken::encode(&header, &claims, &enc).unwrap()
    );
    let frontend = SpiffeId::parse("spiffe://example.org/ns/prod/sa/frontend").unwrap();
    let facts = RequestFacts {
        method: &Method::GET,
        host: None,
        path: "/api/invoices",
        peer: &frontend,
        authorization: Some(&auth),
    };
    assert_eq!(policy.authorize(&facts, now).verdict, Verdict::Allow);
    group.bench_with_input(
        BenchmarkId::new("jwt_es256_last_route", 100),
        &facts,
        |b, facts| b.iter(|| policy.authorize(facts, now).verdict),
    );
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
