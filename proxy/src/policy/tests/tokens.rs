//! JWT routes: token forms, attacks, claim conditions and the clock.

use super::*;

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
    let tok = f.good_token();
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
    // A forwarded claim that is not a valid header value refuses the
    // request (the route promised the service the header).
    claims["sub"] = json!("bob\r\nx-admin: 1");
    assert_eq!(check(&claims), (Reason::JwtClaimUnforwardable, vec![]));
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

#[test]
fn duplicate_authorization_headers_are_refused() {
    let f = fixture();
    let tok = f.good_token();
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
