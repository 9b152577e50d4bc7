//! The policy file: diagnostics, shadowing, hashing, key files, and mutated input.

use super::*;

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
        (String::new(), "1:1: the policy file is empty (a write in progress?)"),
        (" \n\t\n".into(), "1:1: the policy file is empty (a write in progress?)"),
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

/// CGI and WSGI servers read `_` as `-` (`x_moat_peer_id` is
/// `HTTP_X_MOAT_PEER_ID`, merged with the real identity header), so a
/// reserved header is reserved in every spelling.
#[test]
fn a_claim_header_that_spells_a_reserved_one_with_underscores_is_refused() {
    let issuer = "[[issuer]]\nname = \"corp\"\nissuer = \"https://a\"\naudiences = [\"x\"]\njwks_file = \"jwks.json\"\nalgorithms = [\"ES256\"]\n";
    let route = |fc: &str| {
        format!(
            "{issuer}[[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"any-peer\"\njwt = {{ issuer = \"corp\" }}\nforward_claims = {{ {fc} }}\n"
        )
    };
    for (header, real) in [
        ("x_moat_peer_id", "x-moat-peer-id"),
        ("x-moat_peer-id", "x-moat-peer-id"),
        ("x_moat_anything", "x-moat-anything"),
        ("x_forwarded_client_cert", "x-forwarded-client-cert"),
        ("x_forwarded_for", "x-forwarded-for"),
        ("trace_parent", "traceparent"),
        ("trace-parent", "traceparent"),
        ("content_length", "content-length"),
        ("transfer_encoding", "transfer-encoding"),
    ] {
        let errors = errors_of(&route(&format!("sub = \"{header}\"")));
        let want = format!(
            "12:26: header {header} is reserved and cannot carry a claim: it is another spelling of {real}, which a service may read as the same header (CGI and WSGI servers read `_` as `-`)"
        );
        assert!(errors.contains(&want), "{header}: {errors:#?}");
    }
    // Two claims in headers a WSGI app reads as one.
    let errors = errors_of(&route("email = \"x-user\", sub = \"x_user\""));
    assert!(
        errors
            .iter()
            .any(|e| e.ends_with("header x_user is used for two claims")),
        "{errors:#?}"
    );
    assert!(errors_of(&route("sub = \"x_user_id\"")).is_empty());
}

/// Bounds are said as operators write durations, with the value given.
#[test]
fn duration_bounds_are_printed_as_durations() {
    let issuer = "[[issuer]]\nname = \"corp\"\nissuer = \"https://a\"\naudiences = [\"x\"]\njwks_file = \"jwks.json\"\nalgorithms = [\"ES256\"]\n";
    for (field, want) in [
        (
            "refresh = \"8d\"",
            "7:11: refresh must be between 10s and 168h, not 8d",
        ),
        (
            "refresh = \"5s\"",
            "7:11: refresh must be between 10s and 168h, not 5s",
        ),
        (
            "min_refetch = \"2d\"",
            "7:15: min_refetch must be between 1s and 24h, not 2d",
        ),
        (
            "leeway = \"1h\"",
            "7:10: leeway must be between 0s and 5m, not 1h",
        ),
    ] {
        let errors = errors_of(&format!("{issuer}{field}\n"));
        assert_eq!(errors, vec![want.to_owned()], "{field}");
    }
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

/// An in-place write (truncate, then write) leaves the file empty for a
/// moment: a reload that reads it then is refused and the last good policy
/// stays; a policy that denies everything on purpose says so and applies.
#[test]
fn an_emptied_file_is_refused_on_reload_and_a_deliberate_deny_all_applies() {
    let f = fixture();
    let path = f.dir.path().join("policy.toml");
    let cache = Arc::new(JwksCache::default());
    let watcher = PolicyWatcher::load("api", &path, cache).unwrap_or_else(|e| panic!("{e}"));
    let routes = watcher.current().route_count();
    assert!(routes > 0);

    std::fs::write(&path, "").unwrap();
    let outcome = watcher.reload();
    assert!(
        matches!(&outcome, watch::ReloadOutcome::Refused(e) if e.to_string().contains("the policy file is empty")),
        "{outcome:?}"
    );
    assert_eq!(watcher.current().route_count(), routes);
    assert_eq!(
        watcher
            .stats()
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    std::fs::write(
        &path,
        "# every request is denied until the incident is over\n",
    )
    .unwrap();
    assert!(matches!(
        watcher.reload(),
        watch::ReloadOutcome::Applied { .. }
    ));
    assert_eq!(watcher.current().route_count(), 0);
}
