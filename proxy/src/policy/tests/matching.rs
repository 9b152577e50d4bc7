//! Route matching: methods, hosts, paths and templates, and audit mode.

use super::*;

#[test]
fn route_matching_table() {
    let f = fixture();
    let tok = f.good_token();
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
