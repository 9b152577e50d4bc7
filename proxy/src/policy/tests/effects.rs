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
