//! The route policy through a running `moat proxy`: JWT-protected routes
//! (401 with `WWW-Authenticate`, verified claims forwarded as headers,
//! client-sent copies and the token stripped), and policy edits on disk
//! while one keep-alive connection carries steady traffic: no request fails
//! because of an edit, valid or not, and the connection is never closed.

use crate::support;
use crate::support::proxy as proxy_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proxy_support::*;
use serde_json::{Value, json};
use support::{Running, TestCa, echo_service, path_str, tool};

const SERVER: &str = "spiffe://example.org/ns/prod/sa/billing";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";

fn policy(steady_peers: &str) -> String {
    format!(
        r#"
mode = "enforce"

[[issuer]]
name       = "corp"
issuer     = "https://auth.example.org"
audiences  = ["billing"]
jwks_file  = "jwks.json"
algorithms = ["ES256"]

[[route]]
name  = "steady"
path  = "/steady"
peers = [{steady_peers}]

[[route]]
name    = "invoices"
path    = "/invoices/*"
methods = ["GET"]
peers   = ["spiffe://example.org/ns/prod/*"]
jwt     = {{ issuer = "corp", claims = {{ scope = "invoices:read" }} }}
forward_claims = {{ sub = "x-user-id" }}

[[route]]
name  = "changing"
path  = "/changing"
allow = "any-peer"
"#
    )
}

struct Fixture {
    _ca: TestCa,
    proxy: Running,
    inbound: SocketAddr,
    dir: PathBuf,
    policy: PathBuf,
    web: CertFiles,
    enc: EncodingKey,
}

fn fixture() -> Fixture {
    moat_ca::install_crypto_provider();
    let ca = TestCa::start();
    let dir = ca.dir.path().to_path_buf();
    let server = issue(&ca, SERVER, "1h", "server");
    let web = issue(&ca, WEB, "1h", "web");
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let enc = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    write(&dir, "jwks.json", &json!({ "keys": [jwk] }).to_string());
    let policy = write(&dir, "policy.toml", &policy(&format!("{WEB:?}")));
    let config = format!(
        "{}{ADMIN}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward = \"{}\"\npolicy = {:?}\n",
        file_identity(&server, &ca.bundle_file()),
        echo_service(),
        path_str(&policy)
    );
    let (proxy, addrs) = start_proxy(&write(&dir, "proxy.toml", &config), &["api"]);
    Fixture {
        _ca: ca,
        proxy,
        inbound: addrs[0],
        dir,
        policy,
        web,
        enc,
    }
}

fn token(enc: &EncodingKey, scope: &str, exp_in: i64) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({"iss": "https://auth.example.org", "aud": "billing", "sub": "alice", "scope": scope, "exp": now + exp_in});
    jsonwebtoken::encode(&header, &claims, enc).unwrap()
}

/// Status, response headers (lower-cased) and body.
fn get(f: &Fixture, path: &str, headers: &[String]) -> (u16, String, String) {
    let dump = f.dir.join("headers.txt");
    let mut extra: Vec<&str> = vec!["--http1.1", "--path-as-is", "-D", path_str(&dump)];
    for h in headers {
        extra.extend(["-H", h.as_str()]);
    }
    let (status, body) = curl(f.inbound, path, Some(&f.web), &extra);
    let head = std::fs::read_to_string(&dump)
        .unwrap_or_default()
        .to_ascii_lowercase();
    (status, head, body)
}

#[test]
fn jwt_routes_answer_401_with_www_authenticate_and_forward_verified_claims() {
    let f = fixture();
    let (status, head, body) = get(&f, "/invoices/1", &[]);
    assert_eq!(status, 401, "{body}");
    assert!(
        head.contains("www-authenticate: bearer realm=\"moat\""),
        "{head}"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["route"].as_str(), v["reason"].as_str()),
        (Some("invoices"), Some("jwt_missing"))
    );

    let expired = token(&f.enc, "invoices:read", -120);
    let (status, head, body) = get(
        &f,
        "/invoices/1",
        &[format!("authorization: Bearer {expired}")],
    );
    assert_eq!(status, 401, "{body}");
    assert!(head.contains("error=\"invalid_token\""), "{head}");
    assert!(
        body.contains("jwt_expired") && !body.contains(&expired),
        "{body}"
    );

    let narrow = token(&f.enc, "profile", 300);
    let (status, _, body) = get(
        &f,
        "/invoices/1",
        &[format!("authorization: Bearer {narrow}")],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("claim_mismatch"), "{body}");

    let good = token(&f.enc, "invoices:read profile", 300);
    let (status, _, body) = get(
        &f,
        "/invoices/a/../42?x=1",
        &[
            format!("authorization: Bearer {good}"),
            "x-user-id: mallory".into(),
        ],
    );
    assert_eq!(status, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        echo["path"], "/invoices/42?x=1",
        "the authorized path is the forwarded one"
    );
    assert_eq!(
        echo["headers"]["x-user-id"], "alice",
        "the verified sub, not the client's"
    );
    assert!(
        echo["headers"].get("authorization").is_none(),
        "the token is not forwarded: {echo}"
    );

    // Every denial was logged once, with route, reason, peer and policy hash.
    let logs = f.proxy.json_logs();
    let denials: Vec<&Value> = logs
        .iter()
        .filter(|v| v["message"] == "request denied")
        .collect();
    assert!(denials.len() >= 3, "{denials:?}");
    let expired_log = denials
        .iter()
        .find(|v| v["reason"] == "jwt_expired")
        .expect("jwt_expired logged");
    assert_eq!(expired_log["route"], "invoices");
    assert_eq!(expired_log["peer"], WEB);
    assert_eq!(expired_log["path"], "/invoices/1");
    assert!(
        expired_log["policy_hash"]
            .as_str()
            .is_some_and(|h| h.len() == 16),
        "{expired_log}"
    );
    let mismatch_log = denials
        .iter()
        .find(|v| v["reason"] == "claim_mismatch")
        .unwrap();
    assert_eq!(mismatch_log["jwt_sub"], "alice");
    assert_eq!(mismatch_log["jwt_iss"], "https://auth.example.org");
}

/// Runs curl over one keep-alive connection: `count` requests to `path` at
/// `rate`, returning each status and the number of connections opened.
fn steady_traffic(
    addr: SocketAddr,
    client: &CertFiles,
    path: &str,
    count: usize,
) -> std::thread::JoinHandle<(Vec<u16>, usize)> {
    let url = format!("https://{addr}{path}");
    let (cert, key) = (client.cert.clone(), client.key.clone());
    std::thread::spawn(move || {
        let mut args: Vec<String> = [
            "-sS",
            "-k",
            "--http1.1",
            "--rate",
            "25/s",
            "--max-time",
            "60",
        ]
        .map(String::from)
        .to_vec();
        args.extend([
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ]);
        for _ in 0..count {
            args.extend([
                "-o".into(),
                "/dev/null".into(),
                "-w".into(),
                "%{http_code} %{num_connects}\n".into(),
                url.clone(),
            ]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tool("curl", &refs);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut statuses = Vec::new();
        let mut connects = 0;
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            statuses.push(parts.next().and_then(|s| s.parse().ok()).unwrap_or(0));
            connects += parts
                .next()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0);
        }
        (statuses, connects)
    })
}

fn write_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn policy_edits_under_live_traffic_fail_no_request_and_close_no_connection() {
    let mut f = fixture();
    let steady = steady_traffic(f.inbound, &f.web, "/steady", 150);
    // The edits come once the steady traffic flows.
    f.proxy.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "access" && v["path"] == "/steady"
    });
    let reloads = |f: &Fixture| count_logs(&f.proxy, "policy reloaded");
    let refusals = |f: &Fixture| {
        count_logs(
            &f.proxy,
            "policy reload refused; keeping the last good policy",
        )
    };

    // Valid edit in place: /changing becomes an explicit deny.
    assert_eq!(get(&f, "/changing", &[]).0, 200);
    let denying = policy(&format!("{WEB:?}")).replace(
        "name  = \"changing\"\npath  = \"/changing\"\nallow = \"any-peer\"",
        "name  = \"changing\"\npath  = \"/changing\"\ndeny  = true",
    );
    std::fs::write(&f.policy, &denying).unwrap();
    eventually(Duration::from_secs(10), "the deny edit to apply", || {
        get(&f, "/changing", &[]).0 == 403
    });
    assert!(reloads(&f) >= 1);

    // Invalid edit: refused, logged with file:line:column, last good kept.
    std::fs::write(&f.policy, denying.replace("deny  = true", "deny  = yes")).unwrap();
    eventually(
        Duration::from_secs(10),
        "the bad edit to be refused",
        || refusals(&f) >= 1,
    );
    let refusal = f
        .proxy
        .json_logs()
        .into_iter()
        .find(|v| v["message"] == "policy reload refused; keeping the last good policy")
        .unwrap();
    let error = refusal["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.starts_with(&format!("{}:", f.policy.display())) && error.contains(":27:"),
        "{refusal}"
    );
    assert_eq!(
        get(&f, "/changing", &[]).0,
        403,
        "the last good policy stays"
    );

    // Editor-style write-rename back to allowing it.
    write_rename(&f.policy, &policy(&format!("{WEB:?}")));
    eventually(Duration::from_secs(10), "the renamed file to apply", || {
        get(&f, "/changing", &[]).0 == 200
    });

    let (statuses, connects) = steady.join().unwrap();
    assert_eq!(statuses.len(), 150);
    let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} steady requests failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
    assert_eq!(
        connects, 1,
        "one connection carried all the steady traffic across the edits"
    );
}
