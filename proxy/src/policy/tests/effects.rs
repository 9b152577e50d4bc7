//! What a decision does to the exchange: forwarded path and headers, deny responses.

use super::*;

#[test]
fn forwarded_request_carries_the_authorized_path_and_verified_claims() {
    let f = fixture();
    let tok = f.good_token();
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

/// A route that forwards a claim promises the service its header: a claim
/// that cannot be one is refused (401 `jwt_claim_unforwardable`, the claim
/// named), not dropped; UTF-8 text (sent as its bytes), numbers, booleans
/// and arrays of plain strings have a header form; an absent or `null` claim sends no header.
#[test]
fn a_forwarded_claim_that_cannot_be_a_header_value_is_refused() {
    let f = fixture();
    let peer = peer(FRONTEND);
    let decide_sub = |sub: Option<serde_json::Value>| {
        let mut claims = good_claims();
        match sub {
            Some(sub) => claims["sub"] = sub,
            None => {
                claims.as_object_mut().unwrap().remove("sub");
            }
        }
        // As verified claims: the token library itself refuses some shapes
        // of registered claims (an object `sub`) before moat sees them.
        let claims = claims.as_object().unwrap().clone();
        let facts = RequestFacts {
            method: &Method::GET,
            host: None,
            path: "/invoices/1",
            peer: &peer,
            authorization: None,
        };
        let d = f.policy.authorize_assuming_claims(&facts, &claims, now());
        let added: Vec<String> = d
            .add_headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        (
            d.status().as_u16(),
            d.reason.as_str(),
            d.claim.map(str::to_owned),
            d.jwt_sub.clone(),
            added,
        )
    };
    let refused = |sub: serde_json::Value| {
        let (status, reason, claim, jwt_sub, added) = decide_sub(Some(sub.clone()));
        assert_eq!(
            (status, reason, claim.as_deref()),
            (401, "jwt_claim_unforwardable", Some("sub")),
            "{sub}"
        );
        assert!(
            added.is_empty() && jwt_sub.is_none(),
            "{sub}: {added:?} {jwt_sub:?}"
        );
    };
    refused(json!(
        "alice\r\nx-moat-peer-id: spiffe://example.org/ns/prod/sa/admin"
    ));
    refused(json!("alice\n"));
    refused(json!("alice\0"));
    refused(json!({"name": "alice"}));
    refused(json!(["a", 1]));
    refused(json!(["a,b", "c"]));
    refused(json!([["a"]]));
    let forwarded = |sub: Option<serde_json::Value>, want: &[&str]| {
        let (status, reason, _, _, added) = decide_sub(sub.clone());
        assert_eq!((status, reason), (200, "allowed"), "{sub:?}");
        assert_eq!(added, want, "{sub:?}");
    };
    forwarded(Some(json!("alice")), &["x-user-id: alice"]);
    forwarded(Some(json!("Zoë")), &["x-user-id: Zoë"]);
    forwarded(Some(json!(42)), &["x-user-id: 42"]);
    forwarded(Some(json!(true)), &["x-user-id: true"]);
    forwarded(Some(json!(["a", "b"])), &["x-user-id: a,b"]);
    forwarded(Some(json!(null)), &[]);
    forwarded(None, &[]);
}
