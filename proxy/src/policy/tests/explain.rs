//! `explain`, and its full scan against the indexed lookup of `authorize`.

use super::*;

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
