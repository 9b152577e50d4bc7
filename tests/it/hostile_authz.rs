//! Authorization bypass attempts against an inbound policy, over real mTLS:
//! path tricks, method overrides, forged identity and claim headers, a peer
//! with a valid certificate for another identity, and JWT forgeries. The
//! service only ever sees requests the policy allowed, for the path and
//! identity the policy decided on.

use crate::support::hostile as hostile_support;
use crate::support::proxy as proxy_support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hostile_support::*;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proxy_support::*;
use serde_json::{Value, json};

const ADMIN_ID: &str = "spiffe://example.org/ns/prod/sa/admin";
const ISS: &str = "https://auth.example.org";

const POLICY: &str = r#"
[[issuer]]
name = "corp"
issuer = "https://auth.example.org"
audiences = ["billing"]
jwks_file = "jwks.json"
algorithms = ["ES256"]
leeway = "5s"

[[route]]
name = "admin"
path = "/admin/*"
peers = ["spiffe://example.org/ns/prod/sa/admin"]

[[route]]
name = "public"
path = "/public/*"
methods = ["GET"]
allow = "any-peer"

[[route]]
name = "me"
path = "/me"
methods = ["GET"]
allow = "any-peer"
jwt = { issuer = "corp" }
forward_claims = { sub = "x-user-id" }
"#;

struct Fixture {
    s: Sidecar,
    key: rcgen::KeyPair,
    admin: CertFiles,
}

fn fixture() -> Fixture {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let enc = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let jwks = json!({ "keys": [jwk] }).to_string();
    let mut s = sidecar_with("", |ca| {
        write(ca.dir.path(), "jwks.json", &jwks);
        let policy = write(ca.dir.path(), "policy.toml", POLICY);
        format!("policy = {:?}\n", policy.to_str().unwrap())
    });
    s.alive_path = "/public/still-up";
    let admin = issue(&s.ca, ADMIN_ID, "1h", "admin");
    Fixture { s, key, admin }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Fixture {
    fn get(&self, path: &str, extra: &[&str]) -> (u16, String) {
        let mut args = vec!["--http1.1", "--path-as-is"];
        args.extend(extra);
        curl(self.s.inbound, path, Some(&self.s.client), &args)
    }

    fn token(&self, header: Value, claims: Value) -> String {
        let header: Header = serde_json::from_value(header).unwrap();
        let enc = EncodingKey::from_ec_pem(self.key.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &enc).unwrap()
    }

    fn claims(&self) -> Value {
        json!({"iss": ISS, "aud": "billing", "sub": "alice", "exp": now() + 300, "nbf": now() - 5})
    }

    fn me(&self, token: &str, extra: &[&str]) -> (u16, String) {
        let auth = format!("Authorization: Bearer {token}");
        let mut args = vec!["-H", auth.as_str()];
        args.extend(extra);
        self.get("/me", &args)
    }
}

#[test]
fn path_tricks_never_reach_the_admin_route_as_another_peer() {
    let mut f = fixture();
    // Controls: the admin peer reaches /admin, the client does not.
    let (status, body) = curl(f.s.inbound, "/admin/x", Some(&f.admin), &["--http1.1"]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(f.get("/admin/x", &[]).0, 403);
    assert_eq!(f.get("/public/x", &[]).0, 200);
    for path in [
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
        "/public/%2E%2E/admin/x",
        "/public/..%2fadmin/x",
        "/public/..%2Fadmin/x",
        "/public/%2e%2e%2fadmin/x",
        "/public/..%5cadmin/x",
        "/public/..\\admin/x",
        "/public/..;/admin/x",
        "/public;/../admin/x",
        "//admin/x",
        "/./admin/x",
        "/%61dmin/x",
        "/ADMIN/x",
        "/Admin/x",
        "/admin%2fx",
        "/public/%252e%252e/admin/x",
        "/public/%c0%ae%c0%ae/admin/x",
        "/public/%ef%bc%8e%ef%bc%8e/admin/x",
        "/%EF%BD%81dmin/x",
        "/public/x/../../admin/x",
        "/public/%00/../../admin/x",
        "/admin/../admin/x",
    ] {
        let (status, body) = f.get(path, &[]);
        if status == 200 {
            let echoed: Value = serde_json::from_str(&body).unwrap();
            let seen = echoed["path"].as_str().unwrap().to_ascii_lowercase();
            assert!(
                !seen.starts_with("/admin") && !seen.contains("..") && !seen.contains("%2f"),
                "{path:?} reached the service as {seen:?}"
            );
        } else {
            assert!(
                status == 400 || status == 403 || status == 404,
                "{path:?}: {status} {body}"
            );
        }
    }
    f.s.assert_still_serving();
}

#[test]
fn method_override_headers_cannot_change_the_method_the_policy_decided_on() {
    let f = fixture();
    assert_eq!(f.get("/public/x", &["-X", "DELETE"]).0, 403, "control");
    for header in [
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Method-Override: DELETE",
    ] {
        let (status, body) = f.get("/public/x", &["-H", header]);
        assert!(
            status == 400 || status == 403,
            "{header}: a GET that asks the service to act as DELETE must not be let through: {status} {body}"
        );
    }
}

#[test]
fn forged_identity_and_claim_headers_never_reach_the_service() {
    let f = fixture();
    let (status, body) = f.get(
        "/public/x",
        &[
            "-H",
            &format!("x-moat-peer-id: {ADMIN_ID}"),
            "-H",
            "x-user-id: root",
            "-H",
            "X-Moat-Peer-Id: spiffe://example.org/ns/prod/sa/admin",
            // Merged with the real one by CGI and WSGI servers.
            "-H",
            "x_user_id: root",
        ],
    );
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["headers"]["x-moat-peer-id"], CLIENT_ID);
    assert!(echoed["headers"].get("x-user-id").is_none(), "{body}");
    assert!(echoed["headers"].get("x_user_id").is_none(), "{body}");
    // With a valid token the claim header is the token's, not the client's.
    let token = f.token(json!({"alg": "ES256", "kid": "k1"}), f.claims());
    let (status, body) = f.me(&token, &["-H", "x-user-id: root", "-H", "x_user_id: root"]);
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["headers"]["x-user-id"], "alice");
    assert!(echoed["headers"].get("x_user_id").is_none(), "{body}");
    // A valid certificate for another identity is that identity, no more.
    assert_eq!(
        f.get("/admin/x", &["-H", &format!("x-moat-peer-id: {ADMIN_ID}")])
            .0,
        403
    );
}

#[test]
fn forged_and_out_of_date_jwts_are_401() {
    let f = fixture();
    let good = f.token(json!({"alg": "ES256", "kid": "k1"}), f.claims());
    assert_eq!(f.me(&good, &[]).0, 200, "control: a valid token");
    let mut aud_array = f.claims();
    aud_array["aud"] = json!(["other", "billing"]);
    assert_eq!(
        f.me(
            &f.token(json!({"alg": "ES256", "kid": "k1"}), aud_array),
            &[]
        )
        .0,
        200,
        "aud as an array naming us"
    );
    let parts: Vec<&str> = good.split('.').collect();
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let mut admin_claims = f.claims();
    admin_claims["sub"] = "root".into();
    // HS256 keyed with the public key as the secret (algorithm confusion).
    let public_pem = f.key.public_key_pem();
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &admin_claims,
        &EncodingKey::from_secret(public_pem.as_bytes()),
    )
    .unwrap();
    let mut expired = f.claims();
    expired["exp"] = json!(now() - 60);
    let mut early = f.claims();
    early["nbf"] = json!(now() + 600);
    let mut wrong_aud = f.claims();
    wrong_aud["aud"] = json!(["other", "billing-admin"]);
    let mut aud_string_wrong = f.claims();
    aud_string_wrong["aud"] = json!("billingx");
    let mut wrong_iss = f.claims();
    wrong_iss["iss"] = json!("https://auth.example.org.evil");
    let mut huge = f.claims();
    huge["pad"] = json!("x".repeat(10_000));
    let deep = format!("{}1{}", "[".repeat(3000), "]".repeat(3000));
    let es = |h: Value, c: Value| f.token(h, c);
    let forged: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!("{}.{}.", enc(&json!({"alg": "none"})), enc(&admin_claims)),
        ),
        (
            "alg None with signature",
            format!(
                "{}.{}.{}",
                enc(&json!({"alg": "None", "kid": "k1"})),
                enc(&admin_claims),
                parts[2]
            ),
        ),
        (
            "claims swapped",
            format!("{}.{}.{}", parts[0], enc(&admin_claims), parts[2]),
        ),
        ("HS256 with the public key", hs),
        (
            "kid path injection",
            es(
                json!({"alg": "ES256", "kid": "../../../../etc/passwd"}),
                f.claims(),
            ),
        ),
        (
            "kid SQL",
            es(json!({"alg": "ES256", "kid": "' OR 1=1 --"}), f.claims()),
        ),
        (
            "jwk in header",
            format!(
                "{}.{}.{}",
                enc(&json!({"alg": "ES256", "jwk": {"kty": "EC"}, "kid": "k1"})),
                parts[1],
                parts[2]
            ),
        ),
        ("expired", es(json!({"alg": "ES256", "kid": "k1"}), expired)),
        (
            "not yet valid",
            es(json!({"alg": "ES256", "kid": "k1"}), early),
        ),
        (
            "aud array not naming us",
            es(json!({"alg": "ES256", "kid": "k1"}), wrong_aud),
        ),
        (
            "aud string prefix",
            es(json!({"alg": "ES256", "kid": "k1"}), aud_string_wrong),
        ),
        (
            "iss suffix",
            es(json!({"alg": "ES256", "kid": "k1"}), wrong_iss),
        ),
        ("over 8 KiB", es(json!({"alg": "ES256", "kid": "k1"}), huge)),
        (
            "deeply nested claims",
            format!(
                "{}.{}.{}",
                parts[0],
                URL_SAFE_NO_PAD.encode(&deep),
                parts[2]
            ),
        ),
        ("not base64", "!!!.???.***".into()),
    ];
    for (what, token) in &forged {
        let (status, body) = f.me(token, &[]);
        assert_eq!(status, 401, "{what}: {body}");
    }
    let (status, _) = f.get("/me", &[]);
    assert_eq!(status, 401, "no token");
    let m = f.s.scrape();
    let denied = metric(
        &m,
        "moat_authz_decisions_total",
        &[("route", "me"), ("decision", "deny")],
    );
    assert_eq!(
        denied,
        forged.len() as f64 + 1.0,
        "every refusal counted\n{m}"
    );
}

/// A route that forwards a claim promises the service its header: a claim
/// that cannot be a header value (here a line break and a forged identity
/// header) is a 401 `jwt_claim_unforwardable`, logged with the claim's
/// name and never its value, and counted; not a request without the header.
#[test]
fn a_forwarded_claim_that_cannot_be_a_header_is_refused_not_dropped() {
    let mut f = fixture();
    let mut claims = f.claims();
    claims["sub"] = json!(format!("alice\r\nx-moat-peer-id: {ADMIN_ID}"));
    let token = f.token(json!({"alg": "ES256", "kid": "k1"}), claims);
    let (status, body) = f.me(&token, &[]);
    assert_eq!(status, 401, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["reason"], "jwt_claim_unforwardable", "{body}");
    let line = f.s.proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "request denied" && v["reason"] == "jwt_claim_unforwardable"
    });
    assert_eq!(
        (&line["route"], &line["claim"]),
        (&json!("me"), &json!("sub"))
    );
    assert!(
        !line.to_string().contains("alice"),
        "the name, not the value: {line}"
    );
    let access = f.s.proxy.wait_for_log(Duration::from_secs(5), |v| {
        v["message"] == "access" && v["reason"] == "jwt_claim_unforwardable"
    });
    assert_eq!(
        (&access["decision"], &access["status"]),
        (&json!("deny"), &json!(401))
    );
    let m = f.s.scrape();
    let counted = metric(
        &m,
        "moat_authz_decisions_total",
        &[
            ("route", "me"),
            ("decision", "deny"),
            ("reason", "jwt_claim_unforwardable"),
        ],
    );
    assert_eq!(counted, 1.0, "{m}");
    // A number is forwarded as its JSON text.
    let mut claims = f.claims();
    claims["sub"] = json!(42);
    let token = f.token(json!({"alg": "ES256", "kid": "k1"}), claims);
    let (status, body) = f.me(&token, &[]);
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["headers"]["x-user-id"], "42", "{body}");
}
