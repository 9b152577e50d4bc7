//! Hostile requests to the CA's issuance API: CSRs that ask for more than a
//! workload gets, bodies too large, forged and replayed tokens, and a flood.
//! The CA decides identity from the credential alone, refuses cleanly with
//! a reason that is counted, never burns a token on a refused CSR, and keeps
//! issuing to legitimate callers.

use crate::support;
use crate::support::hostile as hostile_support;
use crate::support::proxy as proxy_support;

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hostile_support::metric;
use moat_ca::TrustBundle;
use moat_ca::client::{CaClient, WorkloadKey};
use support::{TestCa, path_str, tool};
use x509_parser::prelude::*;

fn post(ca: &TestCa, body: &Path, token: &str) -> (u16, String) {
    let bundle = ca.bundle_file();
    let url = format!("{}/v1/certs", ca.url());
    let auth = format!("Authorization: Bearer {token}");
    let data = format!("@{}", path_str(body));
    let out = tool(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            path_str(&bundle),
            "-H",
            "Content-Type: application/pkcs10",
            "-H",
            &auth,
            "--data-binary",
            &data,
            "-w",
            "\n%{http_code}",
            &url,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// An openssl CSR with `ext` (`-addext` values) and key options.
fn csr(dir: &Path, name: &str, key_opts: &[&str], ext: &[&str]) -> PathBuf {
    let out_path = dir.join(format!("{name}.csr"));
    let key = dir.join(format!("{name}.key"));
    let mut args = vec!["req", "-new", "-nodes", "-subj", "/CN=root-of-everything"];
    args.extend(key_opts);
    for e in ext {
        args.extend(["-addext", e]);
    }
    args.extend(["-keyout", path_str(&key), "-out", path_str(&out_path)]);
    let out = tool("openssl", &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out_path
}

const P256: &[&str] = &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];

fn ca_metrics(ca: &mut TestCa) -> String {
    let admin = ca.admin_addr();
    proxy_support::curl_http(admin, "/metrics", &[]).1
}

#[test]
fn a_greedy_csr_gets_only_the_token_identity_as_a_leaf() {
    let ca = TestCa::start();
    let dir = ca.dir.path();
    let greedy = csr(
        dir,
        "greedy",
        P256,
        &[
            "subjectAltName=URI:spiffe://example.org/ns/kube-system/sa/admin,URI:spiffe://other.org/x,DNS:ca.example.org,IP:10.0.0.1,email:root@example.org",
            "basicConstraints=critical,CA:TRUE,pathlen:3",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "extendedKeyUsage=codeSigning,OCSPSigning",
        ],
    );
    let id = "spiffe://example.org/vm/plain";
    let (status, body) = post(&ca, &greedy, &ca.token(id));
    assert_eq!(status, 200, "{body}");
    let der = rustls::pki_types::CertificateDer::from_pem_slice(body.as_bytes()).unwrap();
    use rustls::pki_types::pem::PemObject;
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(sans, [format!("URI({id:?})")], "exactly the token's ID");
    assert!(!cert.is_ca(), "CA:FALSE");
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.code_signing && !eku.ocsp_signing);
    assert!(!cert.subject().to_string().contains("root-of-everything"));
}

#[test]
fn malformed_unsupported_and_oversized_csrs_are_refused_without_burning_the_token() {
    let mut ca = TestCa::start();
    let dir = ca.dir.path().to_owned();
    let token = ca.token("spiffe://example.org/vm/patient");
    let rsa = csr(&dir, "rsa", &["-newkey", "rsa:2048"], &[]);
    let good = csr(&dir, "good", P256, &[]);
    // A valid CSR with one byte of its signature flipped.
    let mut der = tool(
        "openssl",
        &["req", "-in", path_str(&good), "-outform", "DER"],
    )
    .stdout;
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let bad_sig = dir.join("badsig.der");
    std::fs::write(&bad_sig, &der).unwrap();
    let garbage = dir.join("garbage.bin");
    std::fs::write(
        &garbage,
        b"-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
    )
    .unwrap();
    let huge = dir.join("huge.bin");
    std::fs::write(&huge, vec![b'A'; 1024 * 1024]).unwrap();
    for (what, file, status, reason) in [
        ("RSA key", &rsa, 400, "csr_unsupported_key"),
        ("flipped signature", &bad_sig, 400, "csr_bad_signature"),
        ("garbage PEM", &garbage, 400, "csr_malformed"),
        ("1 MiB body", &huge, 413, "body_too_large"),
    ] {
        let (got, body) = post(&ca, file, &token);
        // XXX: the CA answers 413 and closes while curl may still be
        // sending, so curl can see a reset instead; the metric below still
        // proves the refusal.
        if !(status == 413 && got == 0) {
            assert_eq!(got, status, "{what}: {body}");
            assert!(body.contains(reason), "{what}: {body}");
        }
        let m = ca_metrics(&mut ca);
        assert!(
            metric(&m, "moat_ca_issuances_total", &[("result", reason)]) >= 1.0,
            "{what}: counted as {reason}"
        );
    }
    let (got, body) = post(&ca, &good, &token);
    assert_eq!(got, 200, "the token still works after refused CSRs: {body}");
    let (got, body) = post(&ca, &good, &token);
    assert_eq!(got, 401, "and then it is spent: {body}");
    let m = ca_metrics(&mut ca);
    assert_eq!(metric(&m, "moat_ca_token_replays_total", &[]), 1.0, "{m}");
}

#[test]
fn forged_tokens_are_refused() {
    let ca = TestCa::start();
    let dir = ca.dir.path();
    let good = csr(dir, "good", P256, &[]);
    let real = ca.token("spiffe://example.org/vm/real");
    let parts: Vec<&str> = real.split('.').collect();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let enc = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let mut admin = claims.clone();
    admin["sub"] = "spiffe://example.org/ns/kube-system/sa/admin".into();
    let mut none = header.clone();
    none["alg"] = "none".into();
    let mut kid_path = header.clone();
    kid_path["kid"] = "../../token.key".into();
    let mut aud_array = claims.clone();
    aud_array["aud"] = serde_json::json!(["spiffe://other.org", claims["aud"].clone()]);
    aud_array["sub"] = admin["sub"].clone();
    let forged = [
        (
            "claims changed, signature kept",
            format!("{}.{}.{}", parts[0], enc(&admin), parts[2]),
        ),
        ("alg none", format!("{}.{}.", enc(&none), enc(&admin))),
        (
            "alg none with the real signature",
            format!("{}.{}.{}", enc(&none), parts[1], parts[2]),
        ),
        (
            "kid path injection",
            format!("{}.{}.{}", enc(&kid_path), enc(&admin), parts[2]),
        ),
        (
            "aud array",
            format!("{}.{}.{}", parts[0], enc(&aud_array), parts[2]),
        ),
        ("two dots only", "..".to_owned()),
        ("huge", "a".repeat(64 * 1024)),
    ];
    for (what, token) in &forged {
        let (status, body) = post(&ca, &good, token);
        assert!(
            status == 401 || status == 400 || status == 431,
            "{what}: refused, got {status}: {body}"
        );
    }
    let (status, body) = post(&ca, &good, &real);
    assert_eq!(status, 200, "the real token was never burned: {body}");
}

#[test]
fn a_flood_of_bad_requests_does_not_stop_issuance() {
    moat_ca::install_crypto_provider();
    let mut ca = TestCa::start();
    let bundle = TrustBundle::from_pem(&std::fs::read(ca.bundle_file()).unwrap()).unwrap();
    let client = CaClient::new(&ca.url(), bundle).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = std::sync::Arc::new(WorkloadKey::generate().unwrap());
    let refused = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..300 {
            let client = client.clone();
            let key = key.clone();
            set.spawn(async move { client.issue(&key, &format!("forged.{i}.token")).await });
        }
        set.join_all().await
    });
    assert!(
        refused.iter().all(std::result::Result::is_err),
        "every forged token refused"
    );
    let token = ca.token("spiffe://example.org/vm/after-flood");
    let svid = rt
        .block_on(client.issue(&WorkloadKey::generate().unwrap(), &token))
        .expect("a legitimate caller is still served");
    assert_eq!(svid.id.as_str(), "spiffe://example.org/vm/after-flood");
    let m = ca_metrics(&mut ca);
    let counted = metric(&m, "moat_ca_issuances_total", &[]);
    assert!(counted >= 301.0, "every request counted: {counted}\n{m}");
}
