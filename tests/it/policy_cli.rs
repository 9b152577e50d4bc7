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
        format!("{m}:1:1: cannot read"),
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
    let (code, stdout, _) = text(&moat(&[
        "policy",
        "test",
        path_str(&policy),
        path_str(&cases),
    ]));
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("FAIL wrong ({}:8)", cases.display())),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");

    std::fs::write(&cases, "[[case]]\npeer = \"spiffe://example.org/a\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"maybe\"\n").unwrap();
    let (code, _, stderr) = text(&moat(&[
        "policy",
        "test",
        path_str(&policy),
        path_str(&cases),
    ]));
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
