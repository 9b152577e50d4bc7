//! End-to-end tests of `moat ca`: the real binary, real HTTPS on loopback,
//! `curl` and `openssl` as independent clients.

use crate::support;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use moat_ca::client::{CaClient, ClientError, Svid, WorkloadKey};
use moat_ca::{SpiffeId, TrustBundle};
use support::*;

fn rt() -> tokio::runtime::Runtime {
    moat_ca::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client(ca: &TestCa) -> CaClient {
    let bundle = TrustBundle::from_pem(&std::fs::read(ca.bundle_file()).unwrap()).unwrap();
    CaClient::new(&ca.url(), bundle).unwrap()
}

/// POSTs a CSR file with curl; returns (HTTP status, body).
fn curl_post_csr(ca: &TestCa, csr: &Path, token: Option<&str>, path: &str) -> (u16, String) {
    let bundle = ca.bundle_file();
    let url = format!("{}{}", ca.url(), path);
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec![
        "-sS",
        "--cacert",
        path_str(&bundle),
        "-H",
        "Content-Type: application/pkcs10",
        "--data-binary",
    ];
    let at = format!("@{}", path_str(csr));
    args.push(&at);
    if let Some(a) = &auth {
        args.extend(["-H", a]);
    }
    args.extend(["-w", "\n%{http_code}", &url]);
    let out = tool("curl", &args);
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

fn openssl_csr(dir: &Path, name: &str) -> std::path::PathBuf {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let out = tool(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=ignored",
            "-addext",
            "subjectAltName=URI:spiffe://example.org/admin",
            "-keyout",
            path_str(&key),
            "-out",
            path_str(&csr),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    csr
}

#[test]
fn ca_issues_certificate_that_openssl_verifies_from_an_openssl_csr() {
    let ca = TestCa::start();
    let csr = openssl_csr(ca.dir.path(), "web");
    let token = ca.token("spiffe://example.org/ns/prod/sa/web");
    let (status, body) = curl_post_csr(&ca, &csr, Some(&token), "/v1/certs");
    assert_eq!(status, 200, "{body}");
    let cert = ca.dir.path().join("web.crt");
    std::fs::write(&cert, &body).unwrap();

    let verify = tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            path_str(&ca.bundle_file()),
            path_str(&cert),
        ],
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    let text = tool(
        "openssl",
        &["x509", "-in", path_str(&cert), "-noout", "-text"],
    );
    let text = String::from_utf8_lossy(&text.stdout);
    // The identity comes from the token, never from the CSR's own SAN.
    assert!(
        text.contains("URI:spiffe://example.org/ns/prod/sa/web"),
        "{text}"
    );
    assert!(!text.contains("spiffe://example.org/admin"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("Digital Signature"), "{text}");

    let svid = Svid::from_pem(body.as_bytes()).unwrap();
    assert_eq!(svid.lifetime(), Duration::from_secs(3600 + 60));
    assert!(svid.serial.len() >= 16);
}

#[test]
fn library_client_gets_and_renews_a_certificate_over_mtls() {
    let ca = TestCa::start();
    let rt = rt();
    let client = client(&ca);
    let key = WorkloadKey::generate().unwrap();
    let token = ca.token("spiffe://example.org/vm/billing");
    let svid = rt.block_on(client.issue(&key, &token)).unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://example.org/vm/billing");

    let next_key = WorkloadKey::generate().unwrap();
    let renewed = rt.block_on(client.renew(&svid, &key, &next_key)).unwrap();
    assert_eq!(renewed.id, svid.id);
    assert_ne!(renewed.serial, svid.serial);

    // A shorter lifetime can be asked for; more than the maximum cannot.
    let short = rt
        .block_on(
            client
                .clone()
                .with_ttl(Some(Duration::from_secs(120)))
                .renew(&renewed, &next_key, &next_key),
        )
        .unwrap();
    assert_eq!(short.lifetime(), Duration::from_secs(180));
    let err = rt
        .block_on(
            client
                .with_ttl(Some(Duration::from_secs(25 * 3600)))
                .renew(&short, &next_key, &next_key),
        )
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { status, .. } if status == 400),
        "{err}"
    );
}

#[test]
fn renewal_without_a_client_certificate_is_refused() {
    let ca = TestCa::start();
    let csr = openssl_csr(ca.dir.path(), "x");
    let (status, body) = curl_post_csr(&ca, &csr, None, "/v1/renew");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("client_certificate_missing"), "{body}");
}

#[test]
fn join_token_is_single_use_even_after_a_ca_restart() {
    let mut ca = TestCa::start();
    let rt = rt();
    let key = WorkloadKey::generate().unwrap();
    let token = ca.token("spiffe://example.org/vm/a");
    rt.block_on(client(&ca).issue(&key, &token)).unwrap();
    let again = rt.block_on(client(&ca).issue(&key, &token)).unwrap_err();
    assert!(
        matches!(&again, ClientError::Refused { status, reason, .. } if *status == 401 && reason == "token_replayed"),
        "{again}"
    );

    // Restart the CA on a new port: the replay record is on disk.
    ca.server.signal("TERM");
    assert!(ca.server.wait_exit(Duration::from_secs(10)).is_some());
    ca.server = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(&ca.ca_dir()),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    ca.addr = ca.server.listening_addr("ca");
    let after = rt.block_on(client(&ca).issue(&key, &token)).unwrap_err();
    assert!(
        matches!(&after, ClientError::Refused { reason, .. } if reason == "token_replayed"),
        "{after}"
    );

    // The refusal is counted where Prometheus scrapes it.
    let admin = ca.admin_addr();
    let out = tool("curl", &["-sS", &format!("http://{admin}/metrics")]);
    let metrics = String::from_utf8(out.stdout).unwrap();
    assert!(
        metrics.contains("moat_ca_token_replays_total 1"),
        "{metrics}"
    );
    // Under the kind a success of the same token is counted as.
    assert!(
        metrics.contains(
            r#"moat_ca_issuances_total{credential="join_token",result="token_replayed"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("moat_ca_bundle_roots 1"), "{metrics}");
    // Anything else on the admin port: JSON naming what is there.
    let out = tool("curl", &["-sS", "-i", &format!("http://{admin}/metricz")]);
    let answer = String::from_utf8(out.stdout).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 404")
            && answer.contains("application/json")
            && answer.contains(r#""reason":"not_found""#)
            && answer.contains("/metrics"),
        "{answer}"
    );
}

#[test]
fn concurrent_uses_of_one_token_let_exactly_one_win() {
    let ca = TestCa::start();
    let rt = rt();
    let token = ca.token("spiffe://example.org/vm/race");
    let client = client(&ca);
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let client = client.clone();
            let token = token.clone();
            set.spawn(async move {
                let key = WorkloadKey::generate().unwrap();
                client.issue(&key, &token).await
            });
        }
        set.join_all().await
    });
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
}

/// Signs `claims` with the CA's real token key (read from its directory).
fn sign_with_ca_key(ca: &TestCa, claims: &serde_json::Value, alg: Algorithm) -> String {
    let pem = std::fs::read(ca.ca_dir().join("token.key")).unwrap();
    let real = moat_ca::token::JoinTokenKey::from_pem(std::str::from_utf8(&pem).unwrap()).unwrap();
    let mut header = Header::new(alg);
    header.kid = Some(real.kid().to_owned());
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        // HS256 keyed with the public key: the classic algorithm-confusion forgery.
        _ => {
            let public = rcgen::KeyPair::from_pem(std::str::from_utf8(&pem).unwrap())
                .unwrap()
                .public_key_pem();
            EncodingKey::from_secret(public.as_bytes())
        }
    };
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn now() -> u64 {
    moat_ca::token::unix_now()
}

fn issue_with(ca: &TestCa, token: &str) -> Result<Svid, ClientError> {
    let key = WorkloadKey::generate().unwrap();
    rt().block_on(client(ca).issue(&key, token))
}

#[test]
fn expired_forged_and_foreign_tokens_are_refused() {
    let ca = TestCa::start();
    let base = serde_json::json!({
        "iss": "moat-ca", "sub": "spiffe://example.org/vm/a", "aud": "spiffe://example.org",
        "exp": now() + 600, "nbf": now() - 10, "iat": now(), "jti": "j1"
    });
    // Control: the same claims properly signed work.
    issue_with(&ca, &sign_with_ca_key(&ca, &base, Algorithm::ES256)).unwrap();

    let mut expired = base.clone();
    expired["exp"] = (now() - 3600).into();
    expired["jti"] = "j2".into();
    let err = issue_with(&ca, &sign_with_ca_key(&ca, &expired, Algorithm::ES256)).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { status, reason, .. } if *status == 401 && reason == "credential_expired"),
        "{err}"
    );

    let mut hs = base.clone();
    hs["jti"] = "j3".into();
    let err = issue_with(&ca, &sign_with_ca_key(&ca, &hs, Algorithm::HS256)).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { status, .. } if *status == 401),
        "{err}"
    );

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut none_claims = base.clone();
    none_claims["jti"] = "j4".into();
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(none_claims.to_string())
    );
    let err = issue_with(&ca, &none).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { status, .. } if *status == 401),
        "{err}"
    );

    // A token from another CA's key.
    let other = tempfile::tempdir().unwrap();
    ca_init(&other.path().join("ca"));
    let foreign = moat_ok(&[
        "ca",
        "token",
        "--dir",
        path_str(&other.path().join("ca")),
        "--id",
        "spiffe://example.org/vm/a",
    ]);
    let err = issue_with(&ca, foreign.trim()).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { status, .. } if *status == 401),
        "{err}"
    );

    // No credential at all, with curl: 401 and a WWW-Authenticate challenge.
    let csr = openssl_csr(ca.dir.path(), "anon");
    let (status, body) = curl_post_csr(&ca, &csr, None, "/v1/certs");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("credential_missing"), "{body}");
}

#[test]
fn malformed_csr_gets_400_and_does_not_burn_the_token() {
    let ca = TestCa::start();
    let token = ca.token("spiffe://example.org/vm/a");
    let bad = ca.dir.path().join("bad.csr");
    std::fs::write(&bad, "-----BEGIN CERTIFICATE REQUEST-----\nnot base64 at all\n-----END CERTIFICATE REQUEST-----\n").unwrap();
    let (status, body) = curl_post_csr(&ca, &bad, Some(&token), "/v1/certs");
    assert_eq!(status, 400, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["reason"], "csr_malformed");
    let good = openssl_csr(ca.dir.path(), "good");
    let (status, body) = curl_post_csr(&ca, &good, Some(&token), "/v1/certs");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn kubernetes_service_account_token_maps_to_namespace_and_account() {
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = signing.public_key_raw(); // 0x04 || X || Y
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "cluster-1", "use": "sig", "alg": "ES256",
        "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65])
    }]});
    let ca = TestCa::start_with(|dir| {
        std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
        std::fs::write(
            dir.join("ca.toml"),
            format!(
                "[kubernetes]\naudience = \"moat-ca\"\nissuer = \"https://kubernetes.default.svc\"\njwks_file = \"{}\"\n",
                dir.join("jwks.json").display()
            ),
        )
        .unwrap();
    });
    let sign = |aud: &str, sub: &str| {
        let claims = serde_json::json!({
            "iss": "https://kubernetes.default.svc", "aud": [aud], "sub": sub,
            "exp": now() + 600, "nbf": now() - 5, "iat": now()
        });
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("cluster-1".into());
        let key = EncodingKey::from_ec_pem(signing.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let svid = issue_with(&ca, &sign("moat-ca", "system:serviceaccount:prod:web")).unwrap();
    assert_eq!(
        svid.id,
        SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap()
    );
    // Kubernetes tokens are reusable for their lifetime (kubelet rotates them).
    issue_with(&ca, &sign("moat-ca", "system:serviceaccount:prod:web")).unwrap();

    let err = issue_with(&ca, &sign("someone-else", "system:serviceaccount:prod:web")).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { status, .. } if *status == 401),
        "{err}"
    );
    let err = issue_with(&ca, &sign("moat-ca", "system:serviceaccount:prod/x:web")).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { status, .. } if *status == 401),
        "{err}"
    );
}

#[test]
fn rotation_keeps_old_and_new_certificates_valid_until_retire() {
    let ca = TestCa::start();
    let rt = rt();
    let dir = ca.ca_dir();
    let old = issue_with(&ca, &ca.token("spiffe://example.org/vm/old")).unwrap();
    let write = |name: &str, svid: &Svid| {
        let p = ca.dir.path().join(name);
        std::fs::write(&p, svid.to_pem()).unwrap();
        p
    };
    let old_pem = write("old.pem", &old);
    let bundle_has = |n: usize| {
        // The server re-reads the roots every second (30 s allowed: a
        // busy machine delays it). The client trusts the store's bundle,
        // which after --retire is ahead of the server until it reloads (it
        // still serves from the retired root): refused until then.
        for _ in 0..300 {
            if let Ok(b) = rt.block_on(client(&ca).fetch_bundle())
                && b.roots().len() == n
            {
                return b;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("bundle never had {n} roots");
    };
    let verifies = |bundle: &TrustBundle, cert: &Path| {
        let b = ca.dir.path().join("check-bundle.pem");
        std::fs::write(&b, bundle.to_pem()).unwrap();
        tool(
            "openssl",
            &["verify", "-CAfile", path_str(&b), path_str(cert)],
        )
        .status
        .success()
    };

    moat_ok(&["ca", "rotate", "--dir", path_str(&dir), "--prepare"]);
    let two = bundle_has(2);
    assert!(verifies(&two, &old_pem));

    moat_ok(&["ca", "rotate", "--dir", path_str(&dir), "--activate"]);
    // The server sees the step at its next poll of the store (every
    // second), which a busy machine can delay.
    proxy::eventually(
        Duration::from_secs(30),
        "the server to reload its signing state after --activate",
        || {
            ca.server.json_logs().iter().any(|v| {
                v["message"] == "signing state reloaded"
                    && v["roots"].as_str().is_some_and(|r| r.contains("Retiring"))
            })
        },
    );
    let new = issue_with(&ca, &ca.token("spiffe://example.org/vm/new")).unwrap();
    let new_pem = write("new.pem", &new);
    let issuer = |p: &Path| {
        String::from_utf8(
            tool(
                "openssl",
                &["x509", "-in", path_str(p), "-noout", "-issuer"],
            )
            .stdout,
        )
        .unwrap()
    };
    assert!(issuer(&old_pem).contains("#1"), "{}", issuer(&old_pem));
    assert!(issuer(&new_pem).contains("#2"), "{}", issuer(&new_pem));
    let two = bundle_has(2);
    assert!(verifies(&two, &old_pem) && verifies(&two, &new_pem));

    // --force: the old root's certificate is still valid (--retire alone
    // refuses that; see retire_refuses_while_the_old_roots_certificates_are_valid).
    moat_ok(&[
        "ca",
        "rotate",
        "--dir",
        path_str(&dir),
        "--retire",
        "--force",
    ]);
    let one = bundle_has(1);
    assert!(verifies(&one, &new_pem));
    assert!(
        !verifies(&one, &old_pem),
        "a retired root must no longer verify"
    );
    // The CA's own serving certificate moved to the new root: a client
    // trusting only the new bundle still reaches it.
    let fresh = CaClient::new(&ca.url(), one).unwrap();
    rt.block_on(fresh.fetch_bundle()).unwrap();

    // Out-of-order steps are refused with exit 64.
    let out = moat(&["ca", "rotate", "--dir", path_str(&dir), "--retire"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn operator_mistakes_exit_64_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let missing = tmp.path().join("none");
    ca_init(&dir);
    // A CA directory that cannot be made (under a file; root could write
    // in a read-only directory): a restart would not fix it.
    let a_file = tmp.path().join("a-file");
    std::fs::write(&a_file, "").unwrap();
    let under_a_file = a_file.join("ca");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "ca",
                "init",
                "--dir",
                path_str(&under_a_file),
                "--trust-domain",
                "example.org",
            ],
            "cannot create the CA directory",
        ),
        (
            vec![
                "ca",
                "init",
                "--dir",
                path_str(&dir),
                "--trust-domain",
                "example.org",
            ],
            "refusing to overwrite",
        ),
        (
            vec![
                "ca",
                "init",
                "--dir",
                "/nonexistent/x",
                "--trust-domain",
                "Bad_Domain!",
            ],
            "trust domain",
        ),
        (
            vec![
                "ca",
                "token",
                "--dir",
                path_str(&dir),
                "--id",
                "spiffe://other.org/x",
            ],
            "outside",
        ),
        (
            vec![
                "ca",
                "token",
                "--dir",
                path_str(&dir),
                "--id",
                "spiffe://example.org/a/../b",
            ],
            "--id",
        ),
        (
            vec![
                "ca",
                "token",
                "--dir",
                path_str(&missing),
                "--id",
                "spiffe://example.org/a",
            ],
            "moat ca init",
        ),
        (
            vec![
                "ca",
                "issue",
                "--dir",
                path_str(&dir),
                "--id",
                "spiffe://example.org/a",
                "--ttl",
                "25h",
                "--cert-out",
                "/tmp/x.crt",
                "--key-out",
                "/tmp/x.key",
            ],
            "at most 24h",
        ),
    ];
    for (args, want) in cases {
        let out = moat(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn issue_writes_a_private_key_and_a_chain() {
    use std::os::unix::fs::PermissionsExt;
    let ca = TestCa::start();
    let (cert, key) = ca.issue_files("spiffe://example.org/vm/files", "10m", "files");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let svid = Svid::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://example.org/vm/files");
    assert_eq!(svid.lifetime(), Duration::from_secs(660));
    let out = tool(
        "openssl",
        &[
            "verify",
            "-CAfile",
            path_str(&ca.bundle_file()),
            path_str(&cert),
        ],
    );
    assert!(out.status.success());
    // The bundle endpoint serves the same roots as `moat ca bundle`, to curl.
    let out = tool(
        "curl",
        &[
            "-sS",
            "--cacert",
            path_str(&ca.bundle_file()),
            &format!("{}/v1/bundle", ca.url()),
        ],
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        std::fs::read_to_string(ca.bundle_file()).unwrap()
    );
}

/// A client that asks for HTTP/1.0 by ALPN (`curl --http1.0`) gets the
/// bundle in HTTP/1.0, not `no_application_protocol` in the handshake.
#[test]
fn bundle_endpoint_serves_http10_client_that_offers_alpn_http10() {
    let ca = TestCa::start();
    let out = tool(
        "curl",
        &[
            "-sS",
            "--http1.0",
            "-i",
            "--cacert",
            path_str(&ca.bundle_file()),
            &format!("{}/v1/bundle", ca.url()),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let bundle = std::fs::read_to_string(ca.bundle_file()).unwrap();
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}\n{stderr}");
    assert!(text.ends_with(&format!("\r\n\r\n{bundle}")), "{text}");
}

/// Serves `body` over HTTPS on 127.0.0.1:0 to callers presenting
/// `Authorization: Bearer <token>`; others get 401. Returns the address and
/// the PEM of the server's (self-signed) certificate.
fn https_jwks_server(body: String, token: &'static str) -> (std::net::SocketAddr, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    moat_ca::install_crypto_provider();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        rt().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = vec![0u8; 8192];
                let n = tls.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let reply = if request.contains(&format!("authorization: bearer {token}")) {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
    });
    (addr, pem)
}

#[test]
fn kubernetes_jwks_is_fetched_over_https_with_the_cas_own_token() {
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = signing.public_key_raw();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "c1", "alg": "ES256",
        "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65])
    }]});
    let (addr, server_pem) = https_jwks_server(jwks.to_string(), "ca-sa-token");
    let ca = TestCa::start_with(|dir| {
        std::fs::write(dir.join("api-ca.pem"), &server_pem).unwrap();
        std::fs::write(dir.join("sa-token"), "ca-sa-token\n").unwrap();
        std::fs::write(
            dir.join("ca.toml"),
            format!(
                "[kubernetes]\naudience = \"moat-ca\"\njwks_url = \"https://{addr}/openid/v1/jwks\"\njwks_ca = \"{}\"\njwks_token_file = \"{}\"\n",
                dir.join("api-ca.pem").display(),
                dir.join("sa-token").display()
            ),
        )
        .unwrap();
    });
    let claims = serde_json::json!({
        "aud": "moat-ca", "sub": "system:serviceaccount:prod:api", "exp": now() + 600, "iat": now()
    });
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("c1".into());
    let key = EncodingKey::from_ec_pem(signing.serialize_pem().as_bytes()).unwrap();
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let svid = issue_with(&ca, &token).unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://example.org/ns/prod/sa/api");
}

#[test]
fn ca_refuses_to_start_when_the_kubernetes_jwks_cannot_be_fetched() {
    let (addr, server_pem) = https_jwks_server("{}".into(), "right-token");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    ca_init(&dir);
    std::fs::write(dir.join("api-ca.pem"), &server_pem).unwrap();
    std::fs::write(dir.join("sa-token"), "wrong-token").unwrap();
    std::fs::write(
        dir.join("ca.toml"),
        format!(
            "[kubernetes]\naudience = \"moat-ca\"\njwks_url = \"https://{addr}/jwks\"\njwks_ca = \"{}\"\njwks_token_file = \"{}\"\n",
            dir.join("api-ca.pem").display(),
            dir.join("sa-token").display()
        ),
    )
    .unwrap();
    let out = moat(&[
        "ca",
        "serve",
        "--dir",
        path_str(&dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");
}

/// Retiring while a certificate of the old root is still valid would cut
/// its holder off: refused with exit 64, the count and the exact time the
/// last one expires; `--force` does it anyway.
#[test]
fn retire_refuses_while_the_old_roots_certificates_are_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    ca_init(&dir);
    let d = path_str(&dir);
    let out = moat_ok(&[
        "ca",
        "issue",
        "--dir",
        d,
        "--id",
        "spiffe://example.org/vm/old",
        "--ttl",
        "2h",
        "--out",
        path_str(&tmp.path().join("old.pem")),
    ]);
    // "issued ID serial S valid until TIME (...)"
    let until = out
        .split("valid until ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    moat_ok(&["ca", "rotate", "--dir", d, "--prepare"]);
    moat_ok(&["ca", "rotate", "--dir", d, "--activate"]);
    let out = moat(&["ca", "rotate", "--dir", d, "--retire"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("1 certificate(s) issued under the retiring root")
            && stderr.contains(&format!("the last expires at {until}"))
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        moat_ok(&["ca", "bundle", "--dir", d])
            .matches("BEGIN CERTIFICATE")
            .count(),
        2,
        "nothing was retired"
    );
    let out = moat_ok(&["ca", "rotate", "--dir", d, "--retire", "--force"]);
    assert!(out.contains("retired"), "{out}");
    assert_eq!(
        moat_ok(&["ca", "bundle", "--dir", d])
            .matches("BEGIN CERTIFICATE")
            .count(),
        1
    );
    // --force means nothing to the other steps.
    let out = moat(&["ca", "rotate", "--dir", d, "--prepare", "--force"]);
    assert_eq!(out.status.code(), Some(64));
}

/// A root shorter than twice the longest certificate lifetime is refused
/// at `init` and at `rotate --prepare`, naming the flag and the floor.
#[test]
fn root_ttl_below_the_floor_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let d = path_str(&dir);
    let out = moat(&[
        "ca",
        "init",
        "--dir",
        d,
        "--trust-domain",
        "example.org",
        "--root-ttl",
        "1s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--root-ttl 1s is not allowed") && stderr.contains("at least 48h"),
        "{stderr}"
    );
    assert!(!dir.exists(), "nothing was made");
    ca_init(&dir);
    let out = moat(&["ca", "rotate", "--dir", d, "--prepare", "--root-ttl", "47h"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--root-ttl 47h is not allowed"), "{stderr}");
    moat_ok(&["ca", "rotate", "--dir", d, "--prepare", "--root-ttl", "48h"]);
}

/// A CA whose signing root is `root_ttl` long (made through the library:
/// the CLI refuses roots that short), the old root #1 still serving.
fn ca_with_short_active_root(dir: &Path, root_ttl: Duration) -> std::time::SystemTime {
    use moat_ca::store::{CaDir, config::Engine};
    let rt = rt();
    rt.block_on(async {
        let ca = CaDir::init(
            dir,
            &Engine::Sqlite,
            moat_ca::TrustDomain::parse("example.org").unwrap(),
            Duration::from_secs(365 * 86400),
        )
        .await
        .unwrap();
        ca.rotate_prepare(root_ttl).await.unwrap();
        ca.rotate_activate().await.unwrap();
        ca.active_root().await.unwrap().not_after()
    })
}

fn serve_ca(dir: &Path) -> (Running, String) {
    let mut server = Running::start(&[
        "ca",
        "serve",
        "--dir",
        path_str(dir),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
    ]);
    let addr = server.listening_addr("ca");
    (server, format!("https://{addr}"))
}

/// An expired root signs nothing: `moat ca issue` exits 1 saying when it
/// expired and to rotate; the server answers 503 `root_expired`.
#[test]
fn an_expired_root_does_not_sign() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let expiry = ca_with_short_active_root(&dir, Duration::from_secs(2));
    proxy::eventually(Duration::from_secs(10), "the root to expire", || {
        std::time::SystemTime::now() > expiry + Duration::from_secs(1)
    });
    let d = path_str(&dir);
    let out = moat(&[
        "ca",
        "issue",
        "--dir",
        d,
        "--id",
        "spiffe://example.org/x",
        "--out",
        path_str(&tmp.path().join("x.pem")),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the signing root expired at {}",
            moat_ca::store::format_time(expiry)
        )) && stderr.contains("rotate"),
        "{stderr}"
    );
    assert!(!tmp.path().join("x.pem").exists());

    // The serving certificate comes from root #1, still valid: the refusal
    // is an answer, not a failed handshake.
    let (_server, url) = serve_ca(&dir);
    let bundle = TrustBundle::from_pem(moat_ok(&["ca", "bundle", "--dir", d]).as_bytes()).unwrap();
    let token = moat_ok(&["ca", "token", "--dir", d, "--id", "spiffe://example.org/x"]);
    let err = rt()
        .block_on(
            CaClient::new(&url, bundle)
                .unwrap()
                .issue(&WorkloadKey::generate().unwrap(), token.trim()),
        )
        .unwrap_err();
    match err {
        ClientError::Refused {
            status,
            reason,
            error,
        } => {
            assert_eq!(status.as_u16(), 503);
            assert_eq!(reason, "root_expired");
            assert!(error.contains("expired at"), "{error}");
        }
        other => panic!("{other}"),
    }
}

/// A lifetime cut short to the root's end is said: printed by `moat ca
/// issue`, logged at WARN by the server.
#[test]
fn a_lifetime_cut_to_the_roots_end_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    ca_with_short_active_root(&dir, Duration::from_secs(2 * 3600));
    let d = path_str(&dir);
    let out = moat_ok(&[
        "ca",
        "issue",
        "--dir",
        d,
        "--id",
        "spiffe://example.org/x",
        "--ttl",
        "24h",
        "--out",
        path_str(&tmp.path().join("x.pem")),
    ]);
    assert!(
        out.contains("--ttl 24h was cut to end with the signing root"),
        "{out}"
    );
    let out = moat_ok(&[
        "ca",
        "issue",
        "--dir",
        d,
        "--id",
        "spiffe://example.org/y",
        "--ttl",
        "1h",
        "--out",
        path_str(&tmp.path().join("y.pem")),
    ]);
    assert!(!out.contains("cut"), "{out}");

    let (mut server, url) = serve_ca(&dir);
    let bundle = TrustBundle::from_pem(moat_ok(&["ca", "bundle", "--dir", d]).as_bytes()).unwrap();
    let token = moat_ok(&["ca", "token", "--dir", d, "--id", "spiffe://example.org/z"]);
    rt().block_on(
        CaClient::new(&url, bundle)
            .unwrap()
            .with_ttl(Some(Duration::from_secs(24 * 3600)))
            .issue(&WorkloadKey::generate().unwrap(), token.trim()),
    )
    .unwrap();
    server.wait_for_log(Duration::from_secs(10), |v| {
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("cut to the signing root's expiry"))
    });
}
