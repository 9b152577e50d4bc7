use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

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

#[test]
fn route_matching_table() {
    let f = fixture();
    let tok = sign(
        &ec_enc(&f.keys.ec),
        Algorithm::ES256,
        Some("ec1"),
        &good_claims(),
    );
    let any = "spiffe://example.org/ns/dev/sa/other";
    use Reason::*;
    use Verdict::*;
    #[rustfmt::skip]
    let cases: &[Row] = &[
        // method, host, path, peer, token => verdict, reason, route
        ("GET", None, "/healthz", any, None, Allow, Allowed, Some("health")),
        ("POST", None, "/healthz", any, None, Forbidden, NoRoute, None),
        ("HEAD", None, "/healthz", any, None, Forbidden, NoRoute, None),
        ("GET", None, "/healthz/", any, None, Forbidden, NoRoute, None),
        ("GET", None, "/HEALTHZ", any, None, Forbidden, NoRoute, None),
        ("GET", None, "//healthz", any, None, Allow, Allowed, Some("health")),
        ("GET", None, "/x/../healthz", any, None, Allow, Allowed, Some("health")),
        ("GET", None, "/%68ealthz", any, None, Allow, Allowed, Some("health")),
        ("GET", None, "/healthz?probe=1", any, None, Allow, Allowed, Some("health")),
        ("GET", None, "/invoices", FRONTEND, Some(&tok), Allow, Allowed, Some("read-invoices")),
        ("GET", None, "/invoices/", FRONTEND, Some(&tok), Allow, Allowed, Some("read-invoices")),
        ("GET", None, "/invoices/42", FRONTEND, Some(&tok), Allow, Allowed, Some("read-invoices")),
        ("HEAD", None, "/invoices/42", FRONTEND, Some(&tok), Allow, Allowed, Some("read-invoices")),
        ("GET", None, "/invoicesX", FRONTEND, Some(&tok), Forbidden, NoRoute, None),
        ("GET", None, "/Invoices/42", FRONTEND, Some(&tok), Forbidden, NoRoute, None),
        ("DELETE", None, "/invoices/42", FRONTEND, Some(&tok), Forbidden, NoRoute, None),
        ("GET", None, "/invoices/42", "spiffe://example.org/ns/batch/sa/nightly", Some(&tok), Allow, Allowed, Some("read-invoices")),
        ("GET", None, "/invoices/42", "spiffe://example.org/ns/batchx/sa/x", Some(&tok), Forbidden, PeerNotAllowed, Some("read-invoices")),
        ("GET", None, "/invoices/42", "spiffe://evil.org/ns/prod/sa/frontend", Some(&tok), Forbidden, PeerNotAllowed, Some("read-invoices")),
        ("GET", None, "/invoices/42", any, Some(&tok), Forbidden, PeerNotAllowed, Some("read-invoices")),
        ("GET", None, "/invoices/42", FRONTEND, None, Unauthenticated, JwtMissing, Some("read-invoices")),
        // Escapes out of a route are resolved before matching, never after.
        ("GET", None, "/invoices/../admin/users", FRONTEND, Some(&tok), Forbidden, ExplicitDeny, Some("admin")),
        ("GET", None, "/invoices/%2e%2e/admin/users", FRONTEND, Some(&tok), Forbidden, ExplicitDeny, Some("admin")),
        ("GET", None, "/invoices/%2E%2E/%2E%2E/admin", FRONTEND, Some(&tok), BadRequest, BadPath, None),
        ("GET", None, "/invoices%2F..%2Fadmin", FRONTEND, Some(&tok), BadRequest, BadPath, None),
        ("GET", None, "/invoices/..%2fadmin", FRONTEND, Some(&tok), BadRequest, BadPath, None),
        ("GET", None, "/invoices\\..\\admin", FRONTEND, Some(&tok), BadRequest, BadPath, None),
        ("GET", None, "/invoices/..;/admin", FRONTEND, Some(&tok), BadRequest, BadPath, None),
        ("GET", None, "/admin;x/users", FRONTEND, Some(&tok), BadRequest, BadPath, None),
        ("GET", None, "/admin", any, None, Forbidden, ExplicitDeny, Some("admin")),
        ("GET", None, "//admin//users", any, None, Forbidden, ExplicitDeny, Some("admin")),
        ("GET", None, "/%61dmin/users", any, None, Forbidden, ExplicitDeny, Some("admin")),
        // Host matching: case-insensitive, port and trailing dot ignored; required when set.
        ("GET", Some("api.example.org"), "/v1/x", any, None, Allow, Allowed, Some("api-v1")),
        ("GET", Some("API.Example.org:8443"), "/v1/x", any, None, Allow, Allowed, Some("api-v1")),
        ("GET", Some("api.example.org."), "/v1/x", any, None, Allow, Allowed, Some("api-v1")),
        ("GET", Some("other.example.org"), "/v1/x", any, None, Forbidden, NoRoute, None),
        ("GET", None, "/v1/x", any, None, Forbidden, NoRoute, None),
        // Exact paths: trailing slash and case matter.
        ("GET", None, "/exact/b", any, None, Allow, Allowed, Some("exact")),
        ("GET", None, "/exact/b/", any, None, Forbidden, NoRoute, None),
        ("GET", None, "/exact/b/c", any, None, Forbidden, NoRoute, None),
        ("GET", None, "/exact/./b", any, None, Allow, Allowed, Some("exact")),
        ("GET", None, "/exact", any, None, Forbidden, NoRoute, None),
    ];
    for (method, host, path, peer, token, verdict, reason, route) in cases {
        let got = decide(&f.policy, method, *host, path, peer, *token);
        assert_eq!(
            got,
            (*verdict, *reason, route.map(str::to_owned)),
            "{method} {host:?} {path} as {peer}"
        );
    }
}

#[test]
fn forwarded_request_carries_the_authorized_path_and_verified_claims() {
    let f = fixture();
    let tok = sign(
        &ec_enc(&f.keys.ec),
        Algorithm::ES256,
        Some("ec1"),
        &good_claims(),
    );
    let method = Method::GET;
    let peer = peer(FRONTEND);
    let auth = format!("Bearer {tok}");
    let facts = RequestFacts {
        method: &method,
        host: None,
        path: "/invoices/a/../42?x=1",
        peer: &peer,
        authorization: Some(&auth),
    };
    let d = f.policy.authorize(&facts, now());
    assert!(d.forwards());
    assert!(d.deny_response().is_none());
    assert_eq!(d.forward_path().unwrap(), "/invoices/42?x=1");
    assert_eq!(d.jwt_sub.as_deref(), Some("alice"));
    assert_eq!(d.jwt_iss.as_deref(), Some(ISS));
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", HeaderValue::from_static("mallory"));
    headers.insert("authorization", HeaderValue::from_str(&auth).unwrap());
    headers.insert("accept", HeaderValue::from_static("*/*"));
    d.apply_to_headers(&mut headers);
    assert_eq!(
        headers.get_all("x-user-id").iter().collect::<Vec<_>>(),
        vec!["alice"]
    );
    assert!(
        headers.get("authorization").is_none(),
        "token is stripped by default"
    );
    assert_eq!(headers.get("accept").unwrap(), "*/*");
}

#[test]
fn client_claim_headers_are_stripped_on_every_route() {
    let f = fixture();
    let method = Method::GET;
    let peer = peer(FRONTEND);
    let facts = RequestFacts {
        method: &method,
        host: None,
        path: "/healthz",
        peer: &peer,
        authorization: Some("Basic abc"),
    };
    let d = f.policy.authorize(&facts, now());
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", HeaderValue::from_static("mallory"));
    headers.insert("authorization", HeaderValue::from_static("Basic abc"));
    d.apply_to_headers(&mut headers);
    assert!(headers.get("x-user-id").is_none());
    assert_eq!(
        headers.get("authorization").unwrap(),
        "Basic abc",
        "a route without jwt leaves Authorization alone"
    );
}

#[test]
fn forward_token_keeps_authorization_and_route_audiences_override() {
    let f = fixture();
    let enc = ec_enc(&f.keys.ec);
    let mut claims = good_claims();
    let billing = sign(&enc, Algorithm::ES256, Some("ec1"), &claims);
    let (v, r, _) = decide(&f.policy, "GET", None, "/kept", FRONTEND, Some(&billing));
    assert_eq!((v, r), (Verdict::Unauthenticated, Reason::JwtWrongAudience));
    claims["aud"] = json!(["x", "other"]);
    let other = sign(&enc, Algorithm::ES256, Some("ec1"), &claims);
    let method = Method::GET;
    let p = peer(FRONTEND);
    let auth = format!("Bearer {other}");
    let facts = RequestFacts {
        method: &method,
        host: None,
        path: "/kept",
        peer: &p,
        authorization: Some(&auth),
    };
    let d = f.policy.authorize(&facts, now());
    assert_eq!(d.verdict, Verdict::Allow);
    assert!(!d.strip_authorization);
}

#[test]
fn jwt_attacks_are_refused() {
    let f = fixture();
    let ec = ec_enc(&f.keys.ec);
    let rsa = rsa_enc(&f.keys.rsa);
    let good = good_claims();
    let at = |claims: serde_json::Value| claims;
    let t = unix(now());
    let mut cases: Vec<(&str, String, Reason)> = Vec::new();

    cases.push((
        "valid ES256",
        sign(&ec, Algorithm::ES256, Some("ec1"), &good),
        Reason::Allowed,
    ));
    cases.push((
        "valid RS256",
        sign(&rsa, Algorithm::RS256, Some("rsa1"), &good),
        Reason::Allowed,
    ));

    // alg none: an unsigned token naming a real kid.
    let none_header = b64(br#"{"alg":"none","typ":"JWT","kid":"ec1"}"#);
    let payload = b64(good.to_string().as_bytes());
    cases.push((
        "alg none",
        format!("{none_header}.{payload}."),
        Reason::JwtInvalid,
    ));
    cases.push((
        "alg none with sig",
        format!("{none_header}.{payload}.AAAA"),
        Reason::JwtInvalid,
    ));

    // HS/RS confusion: HMAC keyed with the issuer's public key (PEM and DER).
    for (name, secret) in [
        (
            "HS256 keyed with RSA public PEM",
            f.keys.rsa.public_key_pem().into_bytes(),
        ),
        (
            "HS256 keyed with RSA public DER",
            rcgen::PublicKeyData::der_bytes(&f.keys.rsa).to_vec(),
        ),
        (
            "HS256 keyed with EC public PEM",
            f.keys.ec.public_key_pem().into_bytes(),
        ),
    ] {
        let hs = EncodingKey::from_secret(&secret);
        cases.push((
            name,
            sign(&hs, Algorithm::HS256, Some("rsa1"), &good),
            Reason::JwtInvalid,
        ));
    }
    // An RSA-signed token claiming the EC key, and the other way round.
    cases.push((
        "RS256 with the EC kid",
        sign(&rsa, Algorithm::RS256, Some("ec1"), &good),
        Reason::JwtInvalid,
    ));
    cases.push((
        "ES256 with the RSA kid",
        sign(&ec, Algorithm::ES256, Some("rsa1"), &good),
        Reason::JwtInvalid,
    ));
    // An algorithm of the right family but not pinned.
    cases.push((
        "PS256 not pinned",
        sign(&rsa, Algorithm::PS256, Some("rsa1"), &good),
        Reason::JwtInvalid,
    ));

    cases.push((
        "expired",
        sign(
            &ec,
            Algorithm::ES256,
            Some("ec1"),
            &at(json!({"iss": ISS, "aud": "billing", "exp": t - 31, "scope": "invoices:read"})),
        ),
        Reason::JwtExpired,
    ));
    cases.push((
        "expired within leeway",
        sign(
            &ec,
            Algorithm::ES256,
            Some("ec1"),
            &at(json!({"iss": ISS, "aud": "billing", "exp": t - 20, "scope": "invoices:read"})),
        ),
        Reason::Allowed,
    ));
    cases.push((
        "no exp",
        sign(
            &ec,
            Algorithm::ES256,
            Some("ec1"),
            &at(json!({"iss": ISS, "aud": "billing", "scope": "invoices:read"})),
        ),
        Reason::JwtInvalid,
    ));
    cases.push(("not yet valid", sign(&ec, Algorithm::ES256, Some("ec1"), &at(json!({"iss": ISS, "aud": "billing", "exp": t + 600, "nbf": t + 60, "scope": "invoices:read"}))), Reason::JwtNotYetValid));
    cases.push(("nbf within leeway", sign(&ec, Algorithm::ES256, Some("ec1"), &at(json!({"iss": ISS, "aud": "billing", "exp": t + 600, "nbf": t + 20, "scope": "invoices:read"}))), Reason::Allowed));
    cases.push((
        "wrong aud",
        sign(
            &ec,
            Algorithm::ES256,
            Some("ec1"),
            &at(json!({"iss": ISS, "aud": "shipping", "exp": t + 60, "scope": "invoices:read"})),
        ),
        Reason::JwtWrongAudience,
    ));
    cases.push(("aud array with ours", sign(&ec, Algorithm::ES256, Some("ec1"), &at(json!({"iss": ISS, "aud": ["shipping", "billing"], "exp": t + 60, "scope": "invoices:read"}))), Reason::Allowed));
    cases.push((
        "no aud",
        sign(
            &ec,
            Algorithm::ES256,
            Some("ec1"),
            &at(json!({"iss": ISS, "exp": t + 60, "scope": "invoices:read"})),
        ),
        Reason::JwtWrongAudience,
    ));
    cases.push(("wrong iss", sign(&ec, Algorithm::ES256, Some("ec1"), &at(json!({"iss": "https://evil.example", "aud": "billing", "exp": t + 60, "scope": "invoices:read"}))), Reason::JwtWrongIssuer));
    cases.push((
        "unknown kid",
        sign(&ec, Algorithm::ES256, Some("ec9"), &good),
        Reason::JwtUnknownKid,
    ));
    cases.push((
        "no kid, two keys of different families",
        sign(&ec, Algorithm::ES256, None, &good),
        Reason::Allowed,
    ));
    cases.push((
        "claim mismatch",
        sign(
            &ec,
            Algorithm::ES256,
            Some("ec1"),
            &at(json!({"iss": ISS, "aud": "billing", "exp": t + 60, "scope": "invoices:readx"})),
        ),
        Reason::ClaimMismatch,
    ));

    // Tampered payload: a valid signature over other claims.
    let valid = sign(&ec, Algorithm::ES256, Some("ec1"), &good);
    let mut parts: Vec<&str> = valid.split('.').collect();
    let mut evil = good.clone();
    evil["sub"] = json!("root");
    let evil_payload = b64(evil.to_string().as_bytes());
    parts[1] = &evil_payload;
    cases.push(("tampered payload", parts.join("."), Reason::JwtInvalid));
    // Signature bytes flipped.
    let mut sig_flipped = valid.clone();
    let last = sig_flipped.pop().unwrap();
    sig_flipped.push(if last == 'A' { 'B' } else { 'A' });
    cases.push(("tampered signature", sig_flipped, Reason::JwtInvalid));

    // Oversized: a validly signed token over 8 KiB.
    let mut big = good.clone();
    big["pad"] = json!("x".repeat(jwt::MAX_TOKEN_LEN));
    cases.push((
        "oversized",
        sign(&ec, Algorithm::ES256, Some("ec1"), &big),
        Reason::JwtInvalid,
    ));
    // Critical header extensions are refused.
    let mut crit = Header::new(Algorithm::ES256);
    crit.kid = Some("ec1".into());
    crit.crit = Some(vec!["exp".into()]);
    cases.push((
        "crit header",
        jsonwebtoken::encode(&crit, &good, &ec).unwrap(),
        Reason::JwtInvalid,
    ));
    // A key embedded in the header is never trusted.
    let attacker = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let attacker_enc = ec_enc(&attacker);
    let mut embedded = Header::new(Algorithm::ES256);
    embedded.kid = Some("ec1".into());
    embedded.jwk = Some(Jwk::from_encoding_key(&attacker_enc, Algorithm::ES256).unwrap());
    cases.push((
        "embedded jwk",
        jsonwebtoken::encode(&embedded, &good, &attacker_enc).unwrap(),
        Reason::JwtInvalid,
    ));
    cases.push(("garbage", "not.a.jwt".into(), Reason::JwtInvalid));
    cases.push(("two parts", "abc.def".into(), Reason::JwtInvalid));

    for (name, token, want) in cases {
        let (verdict, reason, route) = decide(
            &f.policy,
            "GET",
            None,
            "/invoices/1",
            FRONTEND,
            Some(&token),
        );
        assert_eq!(reason, want, "{name}");
        assert_eq!(route.as_deref(), Some("read-invoices"), "{name}");
        let want_verdict = match want {
            Reason::Allowed => Verdict::Allow,
            Reason::ClaimMismatch => Verdict::Forbidden,
            _ => Verdict::Unauthenticated,
        };
        assert_eq!(verdict, want_verdict, "{name}");
    }
}

#[test]
fn bearer_header_forms() {
    let f = fixture();
    let tok = sign(
        &ec_enc(&f.keys.ec),
        Algorithm::ES256,
        Some("ec1"),
        &good_claims(),
    );
    let method = Method::GET;
    let p = peer(FRONTEND);
    for (header, want) in [
        (format!("Bearer {tok}"), Reason::Allowed),
        (format!("bearer {tok}"), Reason::Allowed),
        (format!("Basic {tok}"), Reason::JwtMissing),
        ("Bearer ".to_owned(), Reason::JwtMissing),
        ("Bearer".to_owned(), Reason::JwtMissing),
        (tok.clone(), Reason::JwtMissing),
    ] {
        let facts = RequestFacts {
            method: &method,
            host: None,
            path: "/invoices/1",
            peer: &p,
            authorization: Some(&header),
        };
        assert_eq!(
            f.policy.authorize(&facts, now()).reason,
            want,
            "{header:.20}"
        );
    }
}

#[test]
fn deny_responses_name_the_route_and_never_the_token() {
    let f = fixture();
    let method = Method::GET;
    let p = peer(FRONTEND);
    let expired = sign(
        &ec_enc(&f.keys.ec),
        Algorithm::ES256,
        Some("ec1"),
        &json!({"iss": ISS, "aud": "billing", "exp": 1}),
    );
    let auth = format!("Bearer {expired}");
    let cases = [
        ("/invoices/1", None, 401, Some("Bearer realm=\"moat\"")),
        (
            "/invoices/1",
            Some(auth.as_str()),
            401,
            Some(
                "Bearer realm=\"moat\", error=\"invalid_token\", error_description=\"jwt_expired\"",
            ),
        ),
        ("/admin/x", None, 403, None),
        ("/nowhere", None, 403, None),
        ("/a%2fb", None, 400, None),
    ];
    for (path, authorization, status, www) in cases {
        let facts = RequestFacts {
            method: &method,
            host: None,
            path,
            peer: &p,
            authorization,
        };
        let d = f.policy.authorize(&facts, now());
        let resp = d.deny_response().expect("denied");
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            www,
            "{path}"
        );
        let body = resp.body();
        let body = format!("{body:?}");
        assert!(!body.contains(&expired[..20]), "{body}");
        let want_route = d
            .route
            .map_or("null".to_owned(), |r| format!("\\\"{r}\\\""));
        assert!(
            body.contains(&format!("\\\"route\\\":{want_route}")),
            "{body}"
        );
    }
}

#[test]
fn audit_mode_lets_would_be_denials_through_but_not_bad_paths() {
    let f = fixture_with(&POLICY.replace("mode = \"enforce\"", "mode = \"audit\""));
    let method = Method::GET;
    let p = peer("spiffe://example.org/ns/dev/sa/x");
    for (path, forwards) in [
        ("/admin/x", true),
        ("/nowhere", true),
        ("/invoices/1", true),
        ("/a%2Fb", false),
    ] {
        let facts = RequestFacts {
            method: &method,
            host: None,
            path,
            peer: &p,
            authorization: None,
        };
        let d = f.policy.authorize(&facts, now());
        assert_ne!(d.verdict, Verdict::Allow, "{path}");
        assert_eq!(d.forwards(), forwards, "{path}");
        assert_eq!(d.deny_response().is_none(), forwards, "{path}");
        d.log(&facts, f.policy.hash(), "0123456789abcdef");
    }
}

#[test]
fn route_level_audit_mode() {
    let text = POLICY.replace(
        "name = \"admin\"\npath = \"/admin/*\"",
        "name = \"admin\"\npath = \"/admin/*\"\nmode = \"audit\"",
    );
    let f = fixture_with(&text);
    let (v, r, _) = decide(&f.policy, "GET", None, "/admin/x", FRONTEND, None);
    assert_eq!((v, r), (Verdict::Forbidden, Reason::ExplicitDeny));
    let method = Method::GET;
    let p = peer(FRONTEND);
    let facts = RequestFacts {
        method: &method,
        host: None,
        path: "/admin/x",
        peer: &p,
        authorization: None,
    };
    assert!(f.policy.authorize(&facts, now()).forwards());
    let facts = RequestFacts {
        method: &method,
        host: None,
        path: "/nowhere",
        peer: &p,
        authorization: None,
    };
    assert!(!f.policy.authorize(&facts, now()).forwards());
}

#[test]
fn claim_conditions() {
    let text = r#"
[[issuer]]
name = "corp"
issuer = "https://auth.example.org"
audiences = ["billing"]
jwks_file = "jwks.json"
algorithms = ["ES256"]

[[route]]
name = "r"
path = "/*"
allow = "any-peer"
jwt = { issuer = "corp", claims = { groups = "admins", scope = ["a", "b"], level = 3, staff = true } }
forward_claims = { sub = "x-sub", groups = "x-groups", level = "x-level" }
"#;
    let f = fixture_with(text);
    let method = Method::GET;
    let p = peer(FRONTEND);
    let base = json!({"iss": ISS, "aud": "billing", "exp": unix(now()) + 60, "sub": "bob",
        "groups": ["users", "admins"], "scope": "b c a", "level": 3, "staff": true});
    let check = |claims: &serde_json::Value| {
        let facts = RequestFacts {
            method: &method,
            host: None,
            path: "/x",
            peer: &p,
            authorization: None,
        };
        let map = claims.as_object().unwrap().clone();
        let d = f.policy.authorize_assuming_claims(&facts, &map, now());
        (
            d.reason,
            d.add_headers
                .iter()
                .map(|(k, v)| format!("{k}={}", v.to_str().unwrap()))
                .collect::<Vec<_>>(),
        )
    };
    let (reason, headers) = check(&base);
    assert_eq!(reason, Reason::Allowed);
    assert_eq!(
        headers,
        vec!["x-groups=users,admins", "x-level=3", "x-sub=bob"]
    );
    for (field, value) in [
        ("groups", json!(["users"])),
        ("groups", json!("admins2")),
        ("scope", json!("a bc")),
        ("scope", json!("ab")),
        ("level", json!(4)),
        ("level", json!("3")),
        ("staff", json!("true")),
        ("staff", serde_json::Value::Null),
    ] {
        let mut claims = base.clone();
        claims[field] = value.clone();
        assert_eq!(check(&claims).0, Reason::ClaimMismatch, "{field}={value}");
    }
    // A claim that is only a string equal to the value also matches.
    let mut claims = base.clone();
    claims["groups"] = json!("admins");
    assert_eq!(check(&claims).0, Reason::Allowed);
    // `scope` as an array works too.
    claims["scope"] = json!(["a", "b"]);
    assert_eq!(check(&claims).0, Reason::Allowed);
    // A claim header value that is not a valid header value is not forwarded.
    claims["sub"] = json!("bob\r\nx-admin: 1");
    assert_eq!(check(&claims).1, vec!["x-groups=admins", "x-level=3"]);
}

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

#[test]
fn file_errors_name_line_and_column() {
    let issuer = "[[issuer]]\nname = \"corp\"\nissuer = \"https://a\"\naudiences = [\"x\"]\njwks_file = \"jwks.json\"\nalgorithms = [\"ES256\"]\n";
    #[rustfmt::skip]
    let cases: &[(String, &str)] = &[
        ("[[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"any-peer\"\nallwo = 1\n".into(), "5:1: unknown field `allwo`"),
        ("mode = \"enforced\"\n".into(), "1:8: unknown variant `enforced`"),
        ("[[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"everyone\"\n".into(), "4:9: unknown variant `everyone`"),
        ("[[route]]\nname = \"a\"\npath = \"a\"\nallow = \"any-peer\"\n".into(), "3:8: path \"a\" must start with '/'"),
        ("[[route]]\nname = \"a\"\npath = \"/a*/b\"\nallow = \"any-peer\"\n".into(), "3:8: path \"/a*/b\" has a wildcard inside the segment \"a*\""),
        ("[[route]]\nname = \"a\"\npath = \"/orders/order-{id}\"\nallow = \"any-peer\"\n".into(), "3:8: path \"/orders/order-{id}\" has a wildcard inside the segment"),
        ("[[route]]\nname = \"a\"\npath = \"/v1/*/refund\"\nallow = \"any-peer\"\n[[route]]\nname = \"b\"\npath = \"/v1/orders/*\"\nallow = \"any-peer\"\n".into(), "7:8: route \"b\" (\"/v1/orders/*\") and route \"a\" (\"/v1/*/refund\", line 1) are ambiguous: both match GET /v1/orders/refund"),
        ("[[route]]\nname = \"any\"\npath = \"/v1/orders/*/refund\"\nmethods = [\"POST\"]\nallow = \"any-peer\"\n[[route]]\nname = \"one\"\npath = \"/v1/orders/export/refund\"\ndeny = true\n".into(), "8:8: route \"one\" (\"/v1/orders/export/refund\") is more specific than route \"any\" (\"/v1/orders/*/refund\", line 1), which comes first and so decides POST /v1/orders/export/refund"),
        ("[[route]]\nname = \"a\"\npath = \"/a//b\"\nallow = \"any-peer\"\n".into(), "3:8: path \"/a//b\" is not in normal form"),
        ("[[route]]\nname = \"a\"\npath = \"/a%2Fb\"\nallow = \"any-peer\"\n".into(), "3:8: path \"/a%2Fb\" would never match a request"),
        ("[[route]]\nname = \"a\"\npath = \"/a\"\n".into(), "2:8: route needs allow = \"any-peer\", peers = [...], or deny = true"),
        ("[[route]]\nname = \"a\"\npath = \"/a\"\npeers = [\"spiffe://example.org/a/\"]\n".into(), "4:10: peer \"spiffe://example.org/a/\""),
        ("[[route]]\nname = \"a\"\npath = \"/a\"\npeers = [\"spiffe://ex/a*\"]\n".into(), "4:10: peer \"spiffe://ex/a*\""),
        ("[[route]]\nname = \"a\"\npath = \"/a\"\nmethods = [\"get\"]\nallow = \"any-peer\"\n".into(), "4:12: method \"get\" must be an upper-case HTTP method"),
        ("[[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"any-peer\"\njwt = { issuer = \"nope\" }\n".into(), "5:18: unknown issuer \"nope\""),
        ("[[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"any-peer\"\nforward_claims = { sub = \"x-sub\" }\n".into(), "5:18: forward_claims needs jwt"),
        ("[[route]]\nname = \"a\"\npath = \"/a\"\ndeny = true\npeers = [\"spiffe://e/x\"]\n".into(), "4:8: a deny route cannot also set peers"),
        ("[[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"any-peer\"\n[[route]]\nname = \"a\"\npath = \"/b\"\nallow = \"any-peer\"\n".into(), "6:8: route \"a\" is defined twice"),
        ("[[route]]\nname = \"all\"\npath = \"/api/*\"\nallow = \"any-peer\"\n[[route]]\nname = \"one\"\npath = \"/api/v1/x\"\nmethods = [\"GET\"]\ndeny = true\n".into(), "7:8: route \"one\" can never match: route \"all\" (line 1) comes first"),
        (format!("{issuer}[[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"any-peer\"\njwt = {{ issuer = \"corp\" }}\nforward_claims = {{ sub = \"Authorization\" }}\n"), "12:26: header name \"Authorization\" must be lower case"),
        (format!("{issuer}[[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"any-peer\"\njwt = {{ issuer = \"corp\" }}\nforward_claims = {{ sub = \"host\" }}\n"), "12:26: header host is reserved"),
        (format!("{issuer}[[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"any-peer\"\njwt = {{ issuer = \"corp\" }}\nforward_claims = {{ sub = \"x-moat-peer-id\" }}\n"), "12:26: header x-moat-peer-id is reserved"),
        (issuer.replace("[\"ES256\"]", "[\"ES256\", \"HS256\"]"), "6:24: algorithm HS256 (a shared HMAC secret) is not supported"),
        (issuer.replace("[\"ES256\"]", "[\"none\"]"), "6:15: algorithm \"none\" (unsigned tokens) is never accepted"),
        (issuer.replace("[\"ES256\"]", "[]"), "6:14: algorithms must list at least one algorithm"),
        (issuer.replace("[\"x\"]", "[]"), "4:13: audiences must list at least one non-empty audience"),
        (issuer.replace("jwks.json", "missing.json"), "5:13: cannot read JWKS file"),
        (issuer.replace("jwks_file = \"jwks.json\"", "jwks_url = \"https://idp.example/jwks\""), "5:12: jwks_url needs jwks_ca"),
        (issuer.replace("jwks_file = \"jwks.json\"", "jwks_url = \"http://idp.example/jwks\"\njwks_ca = \"jwks.json\""), "5:12: jwks_url \"http://idp.example/jwks\" must be an https"),
        (issuer.replace("jwks_file = \"jwks.json\"", "jwks_url = \"https://idp.example/jwks\"\njwks_ca = \"jwks.json\""), "6:11: jwks_ca"),
        (format!("{issuer}leeway = \"1h\"\n"), "7:10: leeway must be between"),
        (format!("{issuer}{issuer}"), "8:8: issuer \"corp\" is defined twice"),
        ("[[route]\n".into(), "1:9: unclosed array table"),
    ];
    for (text, want) in cases {
        let errors = errors_of(text);
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "want {want:?}\n got {errors:#?}\n for:\n{text}"
        );
    }
    assert!(errors_of(POLICY).is_empty() || errors_of(POLICY).iter().all(|e| e.contains("jwks")));
}

#[test]
fn shadowing_rules() {
    let route = |name: &str, methods: &str, host: &str, path: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\npath = \"{path}\"\nallow = \"any-peer\"\n{methods}{host}"
        )
    };
    let m = |list: &str| format!("methods = [{list}]\n");
    let h = |host: &str| format!("host = \"{host}\"\n");
    let shadowed = [
        (route("a", "", "", "/*"), route("b", "", "", "/x")),
        (route("a", "", "", "/x/*"), route("b", "", "", "/x")),
        (route("a", "", "", "/x/*"), route("b", "", "", "/x/y/*")),
        (
            route("a", &m("\"GET\", \"POST\""), "", "/x"),
            route("b", &m("\"GET\""), &h("a.b"), "/x"),
        ),
    ];
    for (first, second) in shadowed {
        let errors = errors_of(&format!("{first}{second}"));
        assert!(
            errors.iter().any(|e| e.contains("can never match")),
            "{first}{second}: {errors:?}"
        );
    }
    let fine = [
        (route("a", "", "", "/x"), route("b", "", "", "/x/*")),
        (route("a", "", "", "/x/*"), route("b", "", "", "/xy")),
        (
            route("a", &m("\"GET\""), "", "/x"),
            route("b", "", "", "/x"),
        ),
        (route("a", "", &h("a.b"), "/x"), route("b", "", "", "/x")),
        (
            route("a", "", &h("a.b"), "/x"),
            route("b", "", &h("c.d"), "/x"),
        ),
    ];
    for (first, second) in fine {
        let errors = errors_of(&format!("{first}{second}"));
        assert!(errors.is_empty(), "{first}{second}: {errors:?}");
    }
}

#[test]
fn path_templates_match_one_segment_and_the_more_specific_route_decides() {
    let text = r#"
[[route]]
name  = "refund-export"
path  = "/v1/orders/export/refund"
deny  = true

[[route]]
name  = "refund"
path  = "/v1/orders/{id}/refund"
methods = ["POST"]
peers = ["spiffe://example.org/ns/prod/sa/frontend"]

[[route]]
name  = "order"
path  = "/v1/orders/*/*"
methods = ["GET"]
allow = "any-peer"

[[route]]
name  = "tenant-health"
path  = "/*/health"
allow = "any-peer"
"#;
    let f = fixture_with(text);
    let any = "spiffe://example.org/ns/dev/sa/other";
    use Reason::*;
    use Verdict::*;
    #[rustfmt::skip]
    let cases: &[Row] = &[
        ("POST", None, "/v1/orders/42/refund", FRONTEND, None, Allow, Allowed, Some("refund")),
        ("POST", None, "/v1/orders/42/refund", any, None, Forbidden, PeerNotAllowed, Some("refund")),
        ("POST", None, "/v1/orders/export/refund", FRONTEND, None, Forbidden, ExplicitDeny, Some("refund-export")),
        ("POST", None, "/v1/orders//refund", FRONTEND, None, Forbidden, NoRoute, None),
        ("POST", None, "/v1/orders/42/refund/", FRONTEND, None, Forbidden, NoRoute, None),
        ("POST", None, "/v1/orders/4/2/refund", FRONTEND, None, Forbidden, NoRoute, None),
        ("POST", None, "/v1/orders/x/../42/refund", FRONTEND, None, Allow, Allowed, Some("refund")),
        ("GET", None, "/v1/orders/42", any, None, Allow, Allowed, Some("order")),
        ("GET", None, "/v1/orders/42/lines/7", any, None, Allow, Allowed, Some("order")),
        ("GET", None, "/v1/orders", any, None, Forbidden, NoRoute, None),
        ("GET", None, "/acme/health", any, None, Allow, Allowed, Some("tenant-health")),
        ("GET", None, "/health", any, None, Forbidden, NoRoute, None),
    ];
    for (method, host, path, peer, token, verdict, reason, route) in cases {
        let got = decide(&f.policy, method, *host, path, peer, *token);
        assert_eq!(
            got,
            (*verdict, *reason, route.map(str::to_owned)),
            "{method} {path} as {peer}"
        );
    }
    // The same routes in the other order: the broader one first is refused.
    let swapped = text.replacen("refund-export", "tmp", 1);
    let (head, tail) = swapped.split_at(swapped.find("[[route]]\nname  = \"refund\"").unwrap());
    let (refund, rest) = tail.split_at(tail.find("[[route]]\nname  = \"order\"").unwrap());
    let errors = errors_of(&format!("{refund}{head}{rest}"));
    assert!(
        errors.iter().any(|e| e.contains(
            "route \"tmp\" (\"/v1/orders/export/refund\") is more specific than route \"refund\""
        ) && e.contains("POST /v1/orders/export/refund")),
        "{errors:?}"
    );
}

#[test]
fn explain_lists_skipped_routes_and_the_decision() {
    let f = fixture();
    let method = Method::GET;
    let p = peer(FRONTEND);
    let facts = RequestFacts {
        method: &method,
        host: None,
        path: "/v2/../admin/%75sers",
        peer: &p,
        authorization: None,
    };
    let e = f.policy.explain(&facts, None, now());
    let text = e.to_string();
    assert!(text.contains("normalized path: /admin/users"), "{text}");
    assert!(
        text.contains("skipped route \"health\" (line 12): path does not match"),
        "{text}"
    );
    assert!(
        text.contains("deciding route: \"admin\" (line 26)"),
        "{text}"
    );
    assert!(
        text.contains("decision: deny 403 (explicit_deny)"),
        "{text}"
    );
}

#[test]
fn hash_is_stable_and_content_based() {
    let a = fixture();
    let b = fixture_with(&format!("{POLICY}\n# comment\n"));
    assert_eq!(a.policy.hash().len(), 16);
    assert_ne!(a.policy.hash(), b.policy.hash());
    let again = Policy::load(&a.dir.path().join("policy.toml")).unwrap();
    assert_eq!(a.policy.hash(), again.hash());
    assert!(a.policy.keys_ready());
}

#[test]
fn jwks_files_skip_unusable_keys_and_need_one_usable() {
    let k = keys();
    let mut doc: serde_json::Value = serde_json::from_str(&k.jwks()).unwrap();
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hs"}));
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty": "weird", "kid": "w"}));
    let set = jwks::parse_jwks(doc.to_string().as_bytes(), "test").unwrap();
    assert_eq!(set.keys.len(), 2);
    assert!(set.keys.iter().all(|k| k.kid.as_deref() != Some("hs")));
    let only_oct = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hs"}]});
    assert!(jwks::parse_jwks(only_oct.to_string().as_bytes(), "test").is_err());
    assert!(jwks::parse_jwks(b"{}", "test").is_err());
    assert!(jwks::parse_jwks(b"not json", "test").is_err());
}

#[test]
fn a_token_for_an_oct_key_cannot_verify_even_with_hs_pinned_elsewhere() {
    // Even if a JWKS publishes a symmetric key under the kid the attacker
    // names, it is never loaded, so the token's kid is unknown.
    let k = keys();
    let mut doc: serde_json::Value = serde_json::from_str(&k.jwks()).unwrap();
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty": "oct", "k": b64(b"secret"), "kid": "hs"}));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), doc.to_string()).unwrap();
    std::fs::write(dir.path().join("policy.toml"), POLICY).unwrap();
    let policy = Policy::load(&dir.path().join("policy.toml")).unwrap();
    let hs = EncodingKey::from_secret(b"secret");
    let token = sign(&hs, Algorithm::HS256, Some("hs"), &good_claims());
    let (_, reason, _) = decide(&policy, "GET", None, "/invoices/1", FRONTEND, Some(&token));
    assert_eq!(reason, Reason::JwtInvalid);
    let token = sign(&ec_enc(&k.ec), Algorithm::ES256, Some("hs"), &good_claims());
    let (_, reason, _) = decide(&policy, "GET", None, "/invoices/1", FRONTEND, Some(&token));
    assert_eq!(reason, Reason::JwtUnknownKid);
}

#[test]
fn policy_decision_time_is_the_callers_clock() {
    let f = fixture();
    let ec = ec_enc(&f.keys.ec);
    let claims =
        json!({"iss": ISS, "aud": "billing", "exp": 2_000_000_000i64, "scope": "invoices:read"});
    let token = sign(&ec, Algorithm::ES256, Some("ec1"), &claims);
    let method = Method::GET;
    let p = peer(FRONTEND);
    let auth = format!("Bearer {token}");
    let facts = RequestFacts {
        method: &method,
        host: None,
        path: "/invoices/1",
        peer: &p,
        authorization: Some(&auth),
    };
    let before = UNIX_EPOCH + Duration::from_secs(2_000_000_000 - 10);
    let after = UNIX_EPOCH + Duration::from_secs(2_000_000_031);
    assert_eq!(f.policy.authorize(&facts, before).reason, Reason::Allowed);
    assert_eq!(f.policy.authorize(&facts, after).reason, Reason::JwtExpired);
}

/// The parser fuzz target's property (fuzz/fuzz_targets/policy_parse.rs) on
/// random mutations of a valid policy: no panic, and every diagnostic points
/// inside the text.
#[test]
fn mutated_policies_never_panic_and_point_inside_the_file() {
    use rand::Rng;
    const PIECES: &[&str] = &[
        "[[route]]\n",
        "\"",
        "=",
        "[",
        "]",
        "{",
        "}",
        "\n",
        "/*",
        "*",
        "%2e",
        "deny = true\n",
        "x",
        "",
    ];
    let f = fixture();
    let cache = JwksCache::default();
    let path = f.dir.path().join("policy.toml");
    let mut rng = rand::rng();
    for _ in 0..1500 {
        let mut text = POLICY.to_owned();
        for _ in 0..rng.random_range(1..4) {
            let at = text.floor_char_boundary(rng.random_range(0..=text.len()));
            let end = text.floor_char_boundary((at + rng.random_range(0..8)).min(text.len()));
            text.replace_range(at..end, PIECES[rng.random_range(0..PIECES.len())]);
        }
        if let Err(e) = Policy::parse(&path, &text, &cache) {
            let lines = text.split('\n').count();
            for d in e.diagnostics() {
                assert!(
                    d.line >= 1 && d.line <= lines && d.column >= 1,
                    "{d}\n{text}"
                );
            }
        }
    }
}

#[test]
fn duplicate_authorization_headers_are_refused() {
    let f = fixture();
    let tok = sign(
        &ec_enc(&f.keys.ec),
        Algorithm::ES256,
        Some("ec1"),
        &good_claims(),
    );
    let mut headers = HeaderMap::new();
    assert_eq!(authorization_value(&headers), None);
    headers.append(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {tok}")).unwrap(),
    );
    assert_eq!(
        authorization_value(&headers),
        Some(format!("Bearer {tok}").as_str())
    );
    headers.append("authorization", HeaderValue::from_static("Bearer other"));
    let method = Method::GET;
    let p = peer(FRONTEND);
    let facts = RequestFacts {
        method: &method,
        host: None,
        path: "/invoices/1",
        peer: &p,
        authorization: authorization_value(&headers),
    };
    let d = f.policy.authorize(&facts, now());
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Unauthenticated, Reason::JwtInvalid)
    );
}

#[test]
fn audited_requests_on_a_jwt_route_never_forward_the_token() {
    let f = fixture_with(&POLICY.replace("mode = \"enforce\"", "mode = \"audit\""));
    let method = Method::GET;
    let p = peer(FRONTEND);
    let facts = RequestFacts {
        method: &method,
        host: None,
        path: "/invoices/1",
        peer: &p,
        authorization: Some("Bearer not-a-token"),
    };
    let d = f.policy.authorize(&facts, now());
    assert!(d.forwards() && d.audited);
    assert_eq!(d.reason, Reason::JwtInvalid);
    assert!(d.strip_authorization);
}

/// The indexed lookup (authorize) and the full scan (explain) always pick
/// the same route, over random requests against a policy mixing exact,
/// prefix, `/*`, host and method routes.
#[test]
fn indexed_and_linear_route_lookup_agree() {
    use rand::Rng;
    let segs = ["a", "b", "ab", "c"];
    // Routes may also have single-segment wildcards (requests never do);
    // literals are likelier, so that not every route overlaps every other.
    let route_segs = ["a", "b", "ab", "c", "a", "b", "c", "*", "{x}"];
    let mut routes: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut rng = rand::rng();
    let parses = |routes: &[String]| {
        Policy::parse(
            Path::new("/nonexistent/p.toml"),
            &routes.concat(),
            &JwksCache::default(),
        )
        .is_ok()
    };
    for _ in 0..3000 {
        if routes.len() == 40 {
            break;
        }
        let depth = rng.random_range(0..4);
        let mut path = String::new();
        for _ in 0..depth {
            path.push('/');
            path.push_str(route_segs[rng.random_range(0..route_segs.len())]);
        }
        if path.ends_with("/*") && rng.random_range(0..2) == 0 {
            path.push_str("/c");
        }
        let path = match (path.is_empty(), rng.random_range(0..3)) {
            (true, 0) => "/".to_owned(),
            (true, _) => "/*".to_owned(),
            (false, 0) => format!("{path}/*"),
            (false, _) => path,
        };
        let methods = [
            "",
            "methods = [\"GET\"]\n",
            "methods = [\"POST\", \"GET\"]\n",
            "methods = [\"DELETE\"]\n",
        ][rng.random_range(0..4)];
        let host = ["", "host = \"h.example\"\n"][rng.random_range(0..2)];
        if path == "/*" && methods.is_empty() && host.is_empty() {
            continue;
        }
        if !seen.insert((path.clone(), methods, host)) {
            continue;
        }
        let candidate = format!(
            "[[route]]\nname = \"r{}\"\npath = \"{path}\"\n{methods}{host}allow = \"any-peer\"\n",
            routes.len()
        );
        // Keep only routes the parser accepts (not shadowed, in
        // specificity order): last, or else first.
        routes.push(candidate);
        if parses(&routes) {
            continue;
        }
        let candidate = routes.pop().unwrap();
        routes.insert(0, candidate);
        if !parses(&routes) {
            routes.remove(0);
        }
    }
    let n = routes.len();
    let mut text = routes.concat();
    assert!(n >= 8, "only {n} routes:\n{text}");
    // A catch-all last, so that some requests fall through to it.
    text.push_str(
        "[[route]]\nname = \"last\"\npath = \"/*\"\nmethods = [\"PUT\"]\nallow = \"any-peer\"\n",
    );
    let f = fixture_with(&text);
    let p = peer(FRONTEND);
    for _ in 0..3000 {
        let depth = rng.random_range(0..4);
        let mut path = String::new();
        for _ in 0..depth {
            path.push('/');
            path.push_str(segs[rng.random_range(0..segs.len())]);
        }
        if path.is_empty() || rng.random_range(0..4) == 0 {
            path.push('/');
        }
        let method = [Method::GET, Method::POST, Method::PUT][rng.random_range(0..3)].clone();
        let host = [None, Some("h.example"), Some("other.example:8080")][rng.random_range(0..3)];
        let facts = RequestFacts {
            method: &method,
            host,
            path: &path,
            peer: &p,
            authorization: None,
        };
        let fast = f.policy.authorize(&facts, now()).route.map(str::to_owned);
        let slow = f.policy.explain(&facts, None, now()).route;
        assert_eq!(fast, slow, "{method} {host:?} {path}\n{text}");
    }
}
