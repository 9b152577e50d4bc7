//! `moat policy check|explain|test` driven through the real binary: exit
//! codes (0, 1, 64) and `file:line:column: message` diagnostics.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::{moat, path_str};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

/// `moat policy test POLICY CASES`: exit code, stdout, stderr.
fn policy_test(policy: &Path, cases: &Path) -> (i32, String, String) {
    text(&moat(&[
        "policy",
        "test",
        path_str(policy),
        path_str(cases),
    ]))
}

fn text(out: &Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_check_accepts_the_example_and_reports_every_problem_with_file_line_column() {
    let (code, stdout, stderr) = text(&moat(&[
        "policy",
        "check",
        path_str(&example("policy.toml")),
    ]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("policy.toml: ok (4 routes, hash "),
        "{stdout}"
    );
    let (code, stdout, stderr) = text(&moat(&[
        "policy",
        "check",
        path_str(&example("policy-reference.toml")),
    ]));
    assert_eq!(code, 0, "the field reference stays valid: {stdout}{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[route]]\nname = \"a\"\npath = \"/a/*\"\nallow = \"any-peer\"\n\n\
         [[route]]\nname = \"b\"\npath = \"/a/b\"\npeers = [\"spiffe://example.org/x\"]\n\n\
         [[route]]\nname = \"c\"\npath = \"/c\"\nallow = \"any-peer\"\njwt = { issuer = \"nobody\" }\n",
    )
    .unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        "mode = \"audit\"\n[[route]]\nname = \"a\"\npath = \"/a\"\nalow = \"any-peer\"\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.toml");
    let good = example("policy.toml");
    let out = moat(&[
        "policy",
        "check",
        path_str(&bad),
        path_str(&good),
        path_str(&unknown),
        path_str(&missing),
    ]);
    let (code, stdout, stderr) = text(&out);
    assert_eq!(code, 64, "{stdout}{stderr}");
    let b = bad.display();
    let u = unknown.display();
    let m = missing.display();
    for want in [
        format!("{b}:8:8: route \"b\" can never match: route \"a\" (line 1) comes first"),
        format!("{b}:15:18: unknown issuer \"nobody\""),
        format!("{u}:5:1: unknown field `alow`"),
        // A file that cannot be read has no line or column to name.
        format!("{m}: cannot read: No such file or directory"),
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(&want)),
            "missing {want:?} in:\n{stderr}"
        );
    }
    assert!(
        stdout.contains("policy.toml: ok"),
        "the good file is still reported: {stdout}"
    );
    assert!(stderr.contains("moat: 4 problem(s) found"), "{stderr}");
}

#[test]
fn policy_check_and_explain_name_an_unreadable_file_without_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let m = missing.display();
    let (code, stdout, stderr) = text(&moat(&["policy", "check", path_str(&missing)]));
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert_eq!(
        stderr.lines().next(),
        Some(format!("{m}: cannot read: No such file or directory (os error 2)").as_str()),
        "{stderr}"
    );
    let (code, stdout, stderr) = text(&moat(&[
        "policy",
        "explain",
        path_str(&missing),
        "--peer",
        "spiffe://example.org/a",
        "--method",
        "GET",
        "--path",
        "/",
    ]));
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(
        stderr.starts_with(&format!("moat: {m}: cannot read: No such file")),
        "{stderr}"
    );
    assert!(!stderr.contains(":1:1"), "{stderr}");
}

#[test]
fn policy_explain_names_the_deciding_route_and_the_normalized_path() {
    let policy = example("policy.toml");
    let out = moat(&[
        "policy",
        "explain",
        path_str(&policy),
        "--peer",
        "spiffe://example.org/ns/prod/sa/frontend",
        "--method",
        "GET",
        "--path",
        "/invoices/%2e%2e/admin//users",
    ]);
    let (code, stdout, stderr) = text(&out);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("normalized path: /admin/users"), "{stdout}");
    assert!(
        stdout.contains("skipped route \"health\" (line 19): path does not match"),
        "{stdout}"
    );
    assert!(
        stdout.contains("deciding route: \"admin\" (line 25)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("decision: deny 403 (explicit_deny)"),
        "{stdout}"
    );

    let out = moat(&[
        "policy",
        "explain",
        path_str(&policy),
        "--peer",
        "spiffe://example.org/ns/prod/sa/frontend",
        "--method",
        "GET",
        "--path",
        "/invoices/42",
        "--claims",
        r#"{"sub": "alice", "scope": "invoices:read"}"#,
    ]);
    let (code, stdout, _) = text(&out);
    assert_eq!(code, 0);
    assert!(stdout.contains("decision: allow (allowed)"), "{stdout}");
    assert!(stdout.contains("adds header: x-user-id: alice"), "{stdout}");

    let out = moat(&[
        "policy",
        "explain",
        path_str(&policy),
        "--peer",
        "nope",
        "--method",
        "GET",
        "--path",
        "/",
    ]);
    let (code, _, stderr) = text(&out);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--peer \"nope\""), "{stderr}");

    let out = moat(&[
        "policy",
        "explain",
        path_str(&policy),
        "--peer",
        "spiffe://e/x",
        "--method",
        "GET",
        "--path",
        "/",
        "--claims",
        "[1]",
    ]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn policy_explain_verifies_a_real_token_against_the_policy_keys() {
    moat_ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let enc = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    std::fs::write(
        dir.path().join("jwks.json"),
        json!({ "keys": [jwk] }).to_string(),
    )
    .unwrap();
    let policy = std::fs::read_to_string(example("policy.toml"))
        .unwrap()
        .replace("policy-jwks.json", "jwks.json");
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy).unwrap();
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let claims = json!({"iss": "https://auth.example.org", "aud": "billing", "sub": "alice", "scope": "invoices:read", "exp": exp});
    let token = jsonwebtoken::encode(&header, &claims, &enc).unwrap();
    let run = |token: &str| {
        text(&moat(&[
            "policy",
            "explain",
            path_str(&policy_path),
            "--peer",
            "spiffe://example.org/ns/prod/sa/frontend",
            "--method",
            "GET",
            "--path",
            "/invoices/1",
            "--jwt",
            token,
        ]))
    };
    let (code, stdout, stderr) = run(&token);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("decision: allow (allowed)"), "{stdout}");
    let (_, stdout, _) = run(&format!("{}x", &token[..token.len() - 1]));
    assert!(
        stdout.contains("decision: deny 401 (jwt_invalid)"),
        "{stdout}"
    );
}

#[test]
fn policy_test_runs_cases_and_fails_with_the_case_line() {
    let policy = example("policy.toml");
    let (code, stdout, stderr) = text(&moat(&[
        "policy",
        "test",
        path_str(&policy),
        path_str(&example("policy-tests.toml")),
    ]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("8 passed, 0 failed"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        "[[case]]\nname = \"ok\"\npeer = \"spiffe://example.org/a\"\nmethod = \"GET\"\npath = \"/healthz\"\nexpect = \"allow\"\n\n\
         [[case]]\nname = \"wrong\"\npeer = \"spiffe://example.org/a\"\nmethod = \"GET\"\npath = \"/admin\"\nexpect = \"allow\"\n",
    )
    .unwrap();
    let (code, stdout, _) = policy_test(&policy, &cases);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("FAIL wrong ({}:8)", cases.display())),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");

    std::fs::write(&cases, "[[case]]\npeer = \"spiffe://example.org/a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"maybe\"\n").unwrap();
    let (code, _, stderr) = policy_test(&policy, &cases);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:5:10: unknown variant `maybe`",
            cases.display()
        )),
        "{stderr}"
    );

    let (code, _, _) = text(&moat(&[
        "policy",
        "test",
        "/nonexistent.toml",
        path_str(&cases),
    ]));
    assert_eq!(code, 64);
}

#[test]
fn policy_check_names_a_missing_jwks_file_once_and_suggests_near_names() {
    let dir = tempfile::tempdir().unwrap();
    let policy = std::fs::read_to_string(example("policy.toml"))
        .unwrap()
        .replace("policy-jwks.json", "missing-jwks.json");
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, &policy).unwrap();
    let (code, stdout, stderr) = text(&moat(&["policy", "check", path_str(&file)]));
    assert_eq!(code, 64, "{stdout}{stderr}");
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(&file.display().to_string()))
        .collect();
    assert_eq!(problems.len(), 1, "one problem, the file:\n{stderr}");
    assert!(
        problems[0].contains("missing-jwks.json"),
        "the missing file is named: {stderr}"
    );
    assert!(!stderr.contains("unknown issuer"), "{stderr}");
    assert!(
        !stderr
            .lines()
            .chain(stdout.lines())
            .any(|l| l.starts_with('{')),
        "no JSON log line in the CLI's output:\n{stdout}{stderr}"
    );

    // A typo in an issuer name: the nearest defined one is suggested.
    let typo = std::fs::read_to_string(example("policy.toml"))
        .unwrap()
        .replacen(
            "issuer = \"corp\", claims = { scope = \"invoices:read\" }",
            "issuer = \"crop\", claims = { scope = \"invoices:read\" }",
            1,
        );
    let jwks = std::fs::read_to_string(example("policy-jwks.json")).unwrap();
    std::fs::write(dir.path().join("policy-jwks.json"), jwks).unwrap();
    std::fs::write(&file, typo).unwrap();
    let (code, _, stderr) = text(&moat(&["policy", "check", path_str(&file)]));
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("unknown issuer \"crop\": did you mean \"corp\"?"),
        "{stderr}"
    );
}

#[test]
fn policy_explain_takes_a_lower_case_method_and_names_the_unmet_claim() {
    let policy = example("policy.toml");
    let explain = |method: &str, claims: &str| {
        text(&moat(&[
            "policy",
            "explain",
            path_str(&policy),
            "--peer",
            "spiffe://example.org/ns/prod/sa/frontend",
            "--method",
            method,
            "--path",
            "/invoices/42",
            "--claims",
            claims,
        ]))
    };
    let (code, stdout, stderr) = explain("get", r#"{"sub": "alice", "scope": "invoices:read"}"#);
    assert_eq!(code, 0, "{stderr}");
    // The proxy refuses `get` (400 method_not_uppercase): explain says so
    // first, then explains GET, probably meant.
    assert!(
        stdout.starts_with("decision: refused 400 (method_not_uppercase)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("decision: allow (allowed)"),
        "--method get is explained as GET: {stdout}"
    );
    assert!(stderr.is_empty(), "no log lines: {stderr}");
    let (_, stdout, _) = explain("GET", r#"{"sub": "alice", "scope": "invoices:write"}"#);
    assert!(
        stdout.contains("(claim_mismatch)")
            && stdout.contains("claim \"scope\" must hold \"invoices:read\""),
        "{stdout}"
    );
}

#[test]
fn policy_test_refuses_a_lower_case_method_naming_file_line_and_field() {
    // The proxy answers `get` 400 (method_not_uppercase) before any route
    // is tried: a case saying it is allowed would pass here and not there.
    let policy = example("policy.toml");
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        "[[case]]\nname = \"ok\"\npeer = \"spiffe://example.org/a\"\nmethod = \"GET\"\npath = \"/healthz\"\nexpect = \"allow\"\n\n\
         [[case]]\nname = \"lower-case method\"\npeer = \"spiffe://example.org/a\"\nmethod = \"get\"\npath = \"/healthz\"\nexpect = \"allow\"\nroute = \"health\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = policy_test(&policy, &cases);
    assert_eq!(
        code, 64,
        "a bad cases file is a configuration error: {stdout}{stderr}"
    );
    let want = format!(
        "{}:11:10: method \"get\" must be upper case (\"GET\")",
        cases.display()
    );
    assert!(stderr.contains(&want), "{want} in: {stderr}");
    assert!(stderr.contains("method_not_uppercase"), "{stderr}");
    assert!(!stdout.contains("passed"), "no case runs: {stdout}");
}

#[test]
fn policy_test_says_decisions_as_the_cases_file_does() {
    let policy = example("policy.toml");
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        "[[case]]\nname = \"health\"\npeer = \"spiffe://example.org/a\"\nmethod = \"GET\"\npath = \"/healthz\"\nexpect = \"allow\"\nroute = \"health\"\n\n\
         [[case]]\nname = \"wrong\"\npeer = \"spiffe://example.org/a\"\nmethod = \"GET\"\npath = \"/admin\"\nexpect = \"bad-request\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = policy_test(&policy, &cases);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");
    assert!(
        stdout.contains("expected bad-request, got deny"),
        "decisions spelled as the cases file spells them, not as Rust enum names: {stdout}"
    );
}

#[test]
fn policy_tools_handle_path_templates() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let refund = "[[route]]\nname = \"refund\"\npath = \"/v1/orders/{id}/refund\"\nmethods = [\"POST\"]\npeers = [\"spiffe://example.org/ns/prod/sa/frontend\"]\n";
    let export = "[[route]]\nname = \"export\"\npath = \"/v1/orders/export/refund\"\ndeny = true\n";
    // The broader route first: refused, naming both and a request they share.
    std::fs::write(&file, format!("{refund}\n{export}")).unwrap();
    let (code, _, stderr) = text(&moat(&["policy", "check", path_str(&file)]));
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:9:8: route \"export\" (\"/v1/orders/export/refund\") is more specific than route \"refund\" (\"/v1/orders/{{id}}/refund\", line 1), which comes first and so decides POST /v1/orders/export/refund",
            file.display()
        )),
        "{stderr}"
    );
    // Ambiguous: neither covers the other.
    let ambiguous = "[[route]]\nname = \"a\"\npath = \"/v1/*/refund\"\nallow = \"any-peer\"\n\n[[route]]\nname = \"b\"\npath = \"/v1/orders/*\"\nallow = \"any-peer\"\n";
    std::fs::write(&file, ambiguous).unwrap();
    let (code, _, stderr) = text(&moat(&["policy", "check", path_str(&file)]));
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("are ambiguous: both match GET /v1/orders/refund"),
        "{stderr}"
    );

    // The more specific first: valid, and explain shows the template.
    std::fs::write(&file, format!("{export}\n{refund}")).unwrap();
    let (code, stdout, stderr) = text(&moat(&["policy", "check", path_str(&file)]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, stdout, stderr) = text(&moat(&[
        "policy",
        "explain",
        path_str(&file),
        "--peer",
        "spiffe://example.org/ns/prod/sa/frontend",
        "--method",
        "post",
        "--path",
        "/v1/orders/42/refund",
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(
            "skipped route \"export\" (line 1): path does not match \"/v1/orders/export/refund\""
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("deciding route: \"refund\" (line 6): path \"/v1/orders/{id}/refund\""),
        "{stdout}"
    );
    assert!(stdout.contains("decision: allow (allowed)"), "{stdout}");

    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        "[[case]]\nname = \"refund\"\npeer = \"spiffe://example.org/ns/prod/sa/frontend\"\nmethod = \"POST\"\npath = \"/v1/orders/7/refund\"\nexpect = \"allow\"\nroute = \"refund\"\n\n\
         [[case]]\nname = \"typo\"\npeer = \"spiffe://example.org/ns/prod/sa/frontend\"\nmethod = \"POST\"\npath = \"/v1/orders/export/refund\"\nexpect = \"deny\"\nroute = \"exprot\"\n",
    )
    .unwrap();
    let (code, stdout, _) = policy_test(&file, &cases);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");
    assert!(
        stdout.contains(
            "expected route \"exprot\", which the policy does not define: did you mean \"export\"?"
        ),
        "{stdout}"
    );
}

/// A claim header that spells a reserved one with `_` (which CGI and WSGI
/// servers read as `-`, merging it with the real header) is refused like
/// the dashed spelling: exit 64, `file:line:column` on the header.
#[test]
fn policy_check_refuses_underscore_spellings_of_reserved_headers() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let enc = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    std::fs::write(&jwks, json!({ "keys": [jwk] }).to_string()).unwrap();
    let headers = [
        ("a", "x_moat_peer_id"),
        ("b", "x-moat_peer-id"),
        ("c", "x_forwarded_client_cert"),
        ("d", "x_forwarded_for"),
        ("e", "trace_parent"),
        ("f", "content_length"),
        ("g", "transfer_encoding"),
    ];
    let forward = headers
        .iter()
        .map(|(claim, h)| format!("{claim} = \"{h}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let claims_line = format!("forward_claims = {{ {forward} }}");
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        format!(
            "[[issuer]]\nname = \"corp\"\nissuer = \"https://a\"\naudiences = [\"x\"]\njwks_file = \"jwks.json\"\nalgorithms = [\"ES256\"]\n\n\
             [[route]]\nname = \"a\"\npath = \"/a\"\nallow = \"any-peer\"\njwt = {{ issuer = \"corp\" }}\n{claims_line}\n"
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = text(&moat(&["policy", "check", path_str(&policy)]));
    assert_eq!(code, 64, "{stdout}{stderr}");
    let p = policy.display();
    for (_, h) in headers {
        let column = claims_line.find(&format!("\"{h}\"")).unwrap() + 1;
        let want = format!("{p}:13:{column}: header {h} is reserved and cannot carry a claim");
        assert!(
            stderr.lines().any(|l| l.starts_with(&want)),
            "missing {want:?} in:\n{stderr}"
        );
    }
}
