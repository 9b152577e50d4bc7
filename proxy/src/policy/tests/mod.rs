//! Unit tests of the policy: shared fixtures here, one module per concern.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

mod effects;
mod explain;
mod file;
mod matching;
mod tokens;

const ISS: &str = "https://auth.example.org";
const FRONTEND: &str = "spiffe://example.org/ns/prod/sa/frontend";

const POLICY: &str = r#"
mode = "enforce"

[[issuer]]
name       = "corp"
issuer     = "https://auth.example.org"
audiences  = ["billing"]
jwks_file  = "jwks.json"
algorithms = ["ES256", "RS256"]
leeway     = "30s"

[[route]]
name    = "health"
path    = "/healthz"
methods = ["GET"]
allow   = "any-peer"

[[route]]
name    = "read-invoices"
path    = "/invoices/*"
methods = ["GET", "HEAD"]
peers   = ["spiffe://example.org/ns/prod/sa/frontend", "spiffe://example.org/ns/batch/*"]
jwt     = { issuer = "corp", claims = { scope = "invoices:read" } }
forward_claims = { sub = "x-user-id" }

[[route]]
name = "admin"
path = "/admin/*"
deny = true

[[route]]
name  = "api-v1"
host  = "api.example.org"
path  = "/v1/*"
allow = "any-peer"

[[route]]
name  = "exact"
path  = "/exact/b"
allow = "any-peer"

[[route]]
name  = "tokens-kept"
path  = "/kept"
allow = "any-peer"
jwt   = { issuer = "corp", audiences = ["other"] }
forward_token = true
"#;

struct Keys {
    ec: rcgen::KeyPair,
    rsa: rcgen::KeyPair,
}

struct Fixture {
    dir: tempfile::TempDir,
    keys: Keys,
    policy: Policy,
}

fn keys() -> Keys {
    moat_ca::install_crypto_provider();
    Keys {
        ec: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        rsa: rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap(),
    }
}

fn ec_enc(k: &rcgen::KeyPair) -> EncodingKey {
    EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap()
}

fn rsa_enc(k: &rcgen::KeyPair) -> EncodingKey {
    EncodingKey::from_rsa_pem(k.serialize_pem().as_bytes()).unwrap()
}

fn jwk(enc: &EncodingKey, alg: Algorithm, kid: &str) -> serde_json::Value {
    let mut jwk = Jwk::from_encoding_key(enc, alg).unwrap();
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).unwrap()
}

impl Keys {
    fn jwks(&self) -> String {
        json!({ "keys": [
            jwk(&ec_enc(&self.ec), Algorithm::ES256, "ec1"),
            jwk(&rsa_enc(&self.rsa), Algorithm::RS256, "rsa1"),
        ]})
        .to_string()
    }
}

impl Fixture {
    /// A token the fixture's issuer signed and its routes accept: ES256
    /// with the key `ec1`, [`good_claims`].
    fn good_token(&self) -> String {
        sign(
            &ec_enc(&self.keys.ec),
            Algorithm::ES256,
            Some("ec1"),
            &good_claims(),
        )
    }
}

fn fixture_with(policy: &str) -> Fixture {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), keys.jwks()).unwrap();
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    let policy = Policy::load(&dir.path().join("policy.toml")).unwrap_or_else(|e| panic!("{e}"));
    Fixture { dir, keys, policy }
}

fn fixture() -> Fixture {
    fixture_with(POLICY)
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn good_claims() -> serde_json::Value {
    json!({
        "iss": ISS,
        "aud": "billing",
        "sub": "alice",
        "scope": "invoices:read invoices:write",
        "exp": unix(now()) + 300,
        "nbf": unix(now()) - 10,
    })
}

fn sign(
    enc: &EncodingKey,
    alg: Algorithm,
    kid: Option<&str>,
    claims: &serde_json::Value,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, enc).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn peer(id: &str) -> SpiffeId {
    SpiffeId::parse(id).unwrap()
}

/// Decides `method path` from `peer` with an optional bearer token.
fn decide(
    policy: &Policy,
    method: &str,
    host: Option<&str>,
    path: &str,
    peer_id: &str,
    token: Option<&str>,
) -> (Verdict, Reason, Option<String>) {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let peer = peer(peer_id);
    let auth = token.map(|t| format!("Bearer {t}"));
    let facts = RequestFacts {
        method: &method,
        host,
        path,
        peer: &peer,
        authorization: auth.as_deref(),
    };
    let d = policy.authorize(&facts, now());
    (d.verdict, d.reason, d.route.map(str::to_owned))
}

/// method, host, path, peer, token => verdict, reason, route
type Row<'a> = (
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a str,
    Option<&'a str>,
    Verdict,
    Reason,
    Option<&'a str>,
);

/// The diagnostics of a policy text, as `line:column: message`.
fn errors_of(text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    std::fs::write(dir.path().join("jwks.json"), k.jwks()).unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    match Policy::load(&path) {
        Ok(_) => Vec::new(),
        Err(e) => e
            .diagnostics()
            .into_iter()
            .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
            .collect(),
    }
}
