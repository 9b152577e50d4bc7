//! JWKS served over HTTPS by a test server (tokio + rustls on 127.0.0.1:0,
//! certificates from rcgen): first fetch and readiness, key rotation picked
//! up through an unknown-`kid` refetch, rate limiting, and fetch failures
//! that keep the last good keys (and say which server failed), `explain`
//! saying why keys are missing, and a rotated `jwks_file` re-read on an
//! unknown `kid`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use moat_ca::SpiffeId;
use moat_proxy::policy::{JwksCache, Method, Policy, Reason, RequestFacts};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support;

const ISS: &str = "https://idp.test";

/// What the test JWKS server answers, changed by the test as it goes.
#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
}

struct JwksServer {
    addr: SocketAddr,
    reply: Arc<Mutex<Reply>>,
    hits: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
    ca_pem: String,
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn server_tls() -> (String, rustls::ServerConfig) {
    let (issuer, ca_pem) = moat_testkit::pki::foreign_ca("jwks test CA").unwrap();
    let localhost = rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let cert = moat_testkit::pki::leaf(&issuer, "", |p| p.subject_alt_names = vec![localhost]);
    let cert = cert.unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der)],
            PrivateKeyDer::from_pem_slice(cert.key.as_bytes()).unwrap(),
        )
        .unwrap();
    (ca_pem, config)
}

impl JwksServer {
    async fn start(body: String) -> Self {
        let (ca_pem, config) = server_tls();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reply = Arc::new(Mutex::new(Reply { status: 200, body }));
        let hits = Arc::new(Mutex::new(0));
        let (r, h) = (reply.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, r, h) = (acceptor.clone(), r.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    *h.lock().unwrap() += 1;
                    let reply = r.lock().unwrap().clone();
                    let resp = format!(
                        "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                        reply.status,
                        reply.body.len(),
                        reply.body
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self {
            addr,
            reply,
            hits,
            task,
            ca_pem,
        }
    }

    fn serve(&self, status: u16, body: String) {
        *self.reply.lock().unwrap() = Reply { status, body };
    }

    fn hits(&self) -> usize {
        *self.hits.lock().unwrap()
    }
}

struct SigningKey {
    kid: &'static str,
    pair: rcgen::KeyPair,
}

impl SigningKey {
    fn new(kid: &'static str) -> Self {
        Self {
            kid,
            pair: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    fn enc(&self) -> EncodingKey {
        EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap()
    }

    fn jwk(&self) -> serde_json::Value {
        let mut jwk = Jwk::from_encoding_key(&self.enc(), Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(self.kid.into());
        serde_json::to_value(jwk).unwrap()
    }

    fn token(&self) -> String {
        self.token_with_kid(self.kid)
    }

    fn token_with_kid(&self, kid: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 300;
        let claims = json!({"iss": ISS, "aud": "svc", "sub": "alice", "exp": exp});
        jsonwebtoken::encode(&header, &claims, &self.enc()).unwrap()
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

/// The issuer's `min_refetch` in the test policy. The rotation test needs
/// two things to happen within it (a decision right after a fetch; a burst
/// of twenty decisions): long enough that a busy machine stalling the test
/// for a second or two does not let a second fetch in.
const MIN_REFETCH: Duration = Duration::from_secs(3);

fn write_policy(dir: &Path, server: &JwksServer, ca_pem: &str) -> PathBuf {
    std::fs::write(dir.join("jwks-ca.pem"), ca_pem).unwrap();
    let text = format!(
        r#"
[[issuer]]
name        = "idp"
issuer      = "{ISS}"
audiences   = ["svc"]
jwks_url    = "https://{}/.well-known/jwks.json"
jwks_ca     = "jwks-ca.pem"
algorithms  = ["ES256"]
refresh     = "1h"
min_refetch = "{}s"

[[route]]
name  = "api"
path  = "/api/*"
allow = "any-peer"
jwt   = {{ issuer = "idp" }}
"#,
        server.addr,
        MIN_REFETCH.as_secs()
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn decide(policy: &Policy, token: &str) -> Reason {
    let peer = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
    let auth = format!("Bearer {token}");
    let facts = RequestFacts {
        method: &Method::GET,
        host: None,
        path: "/api/x",
        peer: &peer,
        authorization: Some(&auth),
    };
    policy
        .authorize_async(&facts, SystemTime::now())
        .await
        .reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_is_fetched_and_a_rotated_key_is_picked_up_by_unknown_kid_refetch() {
    moat_ca::install_crypto_provider();
    let old = SigningKey::new("old");
    let new = SigningKey::new("new");
    let server = JwksServer::start(jwks(&[&old])).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(dir.path(), &server, &server.ca_pem);
    let cache = JwksCache::new();
    let policy = Policy::load_with(&path, &cache).unwrap();

    assert!(!policy.keys_ready(), "nothing fetched yet");
    assert_eq!(policy.issuers_without_keys(), vec!["idp"]);
    cache.fetch_all().await;
    assert!(policy.keys_ready());
    assert_eq!(server.hits(), 1);
    assert_eq!(decide(&policy, &old.token()).await, Reason::Allowed);

    // The issuer rotates: the new key is published, tokens use its kid.
    server.serve(200, jwks(&[&old, &new]));
    let sync_reason = {
        let peer = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
        let auth = format!("Bearer {}", new.token());
        let facts = RequestFacts {
            method: &Method::GET,
            host: None,
            path: "/api/x",
            peer: &peer,
            authorization: Some(&auth),
        };
        policy.authorize(&facts, SystemTime::now()).reason
    };
    assert_eq!(
        sync_reason,
        Reason::JwtUnknownKid,
        "authorize never does I/O"
    );
    // Within min_refetch of the last fetch, no refetch happens.
    assert_eq!(decide(&policy, &new.token()).await, Reason::JwtUnknownKid);
    assert_eq!(server.hits(), 1);
    tokio::time::sleep(MIN_REFETCH + Duration::from_millis(100)).await;
    assert_eq!(
        decide(&policy, &new.token()).await,
        Reason::Allowed,
        "refetched on unknown kid"
    );
    assert_eq!(server.hits(), 2);
    assert_eq!(decide(&policy, &old.token()).await, Reason::Allowed);

    // A burst of unknown kids makes at most one fetch per min_refetch.
    tokio::time::sleep(MIN_REFETCH + Duration::from_millis(100)).await;
    let policy = Arc::new(policy);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let policy = policy.clone();
        let token = new.token_with_kid(&format!("bogus-{i}"));
        tasks.push(tokio::spawn(async move { decide(&policy, &token).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Reason::JwtUnknownKid);
    }
    assert_eq!(server.hits(), 3, "twenty unknown kids, one fetch");
    server.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_jwks_fetch_keeps_the_last_good_keys() {
    moat_ca::install_crypto_provider();
    let key = SigningKey::new("k1");
    let server = JwksServer::start(jwks(&[&key])).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(dir.path(), &server, &server.ca_pem);
    let cache = JwksCache::new();
    let policy = Policy::load_with(&path, &cache).unwrap();
    cache.fetch_all().await;
    assert_eq!(decide(&policy, &key.token()).await, Reason::Allowed);
    let (_, keys) = policy.issuer_keys().next().unwrap();

    server.serve(500, "oops".into());
    assert!(keys.refresh_now().await.is_err());
    assert_eq!(
        decide(&policy, &key.token()).await,
        Reason::Allowed,
        "kept after a 500"
    );

    server.serve(200, r#"{"keys": []}"#.into());
    assert!(keys.refresh_now().await.is_err());
    assert_eq!(
        decide(&policy, &key.token()).await,
        Reason::Allowed,
        "kept after an empty set"
    );

    server.serve(200, "not json".into());
    assert!(keys.refresh_now().await.is_err());

    server.task.abort();
    let _ = server.task.await;
    assert!(keys.refresh_now().await.is_err());
    assert_eq!(
        decide(&policy, &key.token()).await,
        Reason::Allowed,
        "kept while the server is down"
    );

    let stats = keys.stats();
    assert_eq!(stats.keys, 1);
    assert_eq!(stats.fetches_ok, 1);
    assert_eq!(stats.fetches_failed, 4);
    assert!(stats.last_error.is_some());
    assert!(policy.keys_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_loop_fetches_missing_keys_and_a_wrong_ca_is_refused() {
    moat_ca::install_crypto_provider();
    let key = SigningKey::new("k1");
    let server = JwksServer::start(jwks(&[&key])).await;

    // Signed by a CA that is not the one configured: TLS fails, never ready.
    let dir = tempfile::tempdir().unwrap();
    let (other_ca, _) = server_tls();
    let path = write_policy(dir.path(), &server, &other_ca);
    let cache = JwksCache::new();
    let policy = Policy::load_with(&path, &cache).unwrap();
    cache.fetch_all().await;
    assert!(!policy.keys_ready());
    let stats = cache.stats();
    assert!(
        stats[0].last_error.as_deref().unwrap().contains("TLS"),
        "{stats:?}"
    );
    assert_eq!(server.hits(), 0);

    // The right CA: the background loop fetches keys without being asked.
    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(dir.path(), &server, &server.ca_pem);
    let cache = JwksCache::new();
    let policy = Policy::load_with(&path, &cache).unwrap();
    let refresher = tokio::spawn(cache.clone().run_refresh());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !policy.keys_ready() {
        assert!(tokio::time::Instant::now() < deadline, "keys never fetched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(decide(&policy, &key.token()).await, Reason::Allowed);

    // A reload of the same policy through the same cache keeps the keys.
    let reloaded = Policy::load_with(&path, &cache).unwrap();
    assert!(reloaded.keys_ready());
    refresher.abort();
    server.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_explain_fetches_a_jwks_url_to_verify_a_token() {
    moat_ca::install_crypto_provider();
    let key = SigningKey::new("k1");
    let server = JwksServer::start(jwks(&[&key])).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(dir.path(), &server, &server.ca_pem);
    let token = key.token();
    let out = explain_get_api_x(path, token).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("decision: allow (allowed)"), "{stdout}");
    assert_eq!(server.hits(), 1);
    server.task.abort();
}

/// An issuer's routes behind the sidecar of [`crate::support::hostile`],
/// with `issuer` (its `[[issuer]]` lines after `name`, `issuer`,
/// `audiences` and `algorithms`) and one route `api` on `/api/*`.
fn jwt_sidecar(issuer: impl FnOnce(&support::TestCa) -> String) -> support::hostile::Sidecar {
    support::hostile::sidecar_with("", |ca| {
        let policy = format!(
            "[[issuer]]\nname = \"idp\"\nissuer = \"{ISS}\"\naudiences = [\"svc\"]\nalgorithms = [\"ES256\"]\n{}\n\
             [[route]]\nname = \"api\"\npath = \"/api/*\"\nallow = \"any-peer\"\njwt = {{ issuer = \"idp\" }}\n",
            issuer(ca)
        );
        let policy = support::proxy::write(ca.dir.path(), "policy.toml", &policy);
        format!("policy = {:?}\n", support::path_str(&policy))
    })
}

/// `GET /api/x` with `token` as the legitimate client; the status.
fn get_api(s: &support::hostile::Sidecar, token: &str) -> u16 {
    let auth = format!("Authorization: Bearer {token}");
    support::proxy::curl(
        s.inbound,
        "/api/x",
        Some(&s.client),
        &["--http1.1", "-H", &auth],
    )
    .0
}

/// A `jwks_url` nobody answers at is the JWKS server's failure, not the
/// CA's; and at start, with no keys yet, no keys are said to be kept: the
/// issuer's routes deny until its keys are fetched.
#[test]
fn an_unreachable_jwks_url_is_named_and_no_keys_are_said_to_be_kept() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut s = jwt_sidecar(|ca| {
        format!(
            "jwks_url = \"https://127.0.0.1:{port}/.well-known/jwks.json\"\njwks_ca = {:?}\n",
            support::path_str(&ca.bundle_file())
        )
    });
    let line = s.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["jwks"]
            .as_str()
            .is_some_and(|j| j.contains(&format!(":{port}/")))
            && v["error"].is_string()
    });
    let error = line["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("cannot reach the JWKS server at 127.0.0.1:{port}")),
        "{line}"
    );
    assert!(!error.contains("the CA"), "{line}");
    let message = line["message"].as_str().unwrap();
    assert!(
        !message.contains("keeping the last good keys")
            && message.contains("until its keys are fetched"),
        "{line}"
    );
    assert_eq!(
        get_api(&s, "a.b.c"),
        401,
        "the issuer's routes deny meanwhile"
    );
}

/// `explain --jwt` with keys that could not be fetched says so, and why,
/// instead of blaming the token's `kid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_explain_says_why_the_keys_could_not_be_fetched() {
    moat_ca::install_crypto_provider();
    let key = SigningKey::new("k1");
    let server = JwksServer::start(jwks(&[&key])).await;
    let dir = tempfile::tempdir().unwrap();
    let (other_ca, _) = server_tls();
    let path = write_policy(dir.path(), &server, &other_ca);
    let token = key.token();
    let out = explain_get_api_x(path, token).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = format!(
        "decision: deny 401 (jwt_unknown_kid): the keys of issuer \"idp\" could not be fetched: fetching JWKS from https://{}/.well-known/jwks.json failed: TLS with the JWKS server failed",
        server.addr
    );
    assert!(
        stdout.contains(&want),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("no key of the issuer has the token's kid"),
        "{stdout}"
    );
    server.task.abort();
}

/// A `jwks_file` rotated in place is re-read on a token naming a `kid` it
/// did not hold (at most once per `min_refetch`), as a `jwks_url` is
/// refetched: not only on the `refresh` schedule (an hour here) or SIGHUP.
#[test]
fn a_rotated_jwks_file_is_re_read_on_an_unknown_kid() {
    let old = SigningKey::new("old");
    let new = SigningKey::new("new");
    let mut jwks_path = PathBuf::new();
    let s = jwt_sidecar(|ca| {
        jwks_path = support::proxy::write(ca.dir.path(), "jwks.json", &jwks(&[&old]));
        "jwks_file = \"jwks.json\"\nrefresh = \"1h\"\nmin_refetch = \"1s\"\n".into()
    });
    assert_eq!(get_api(&s, &old.token()), 200);
    assert_eq!(get_api(&s, &new.token()), 401, "not published yet");
    // Rotated as a deployment would: written aside, renamed over.
    let next = jwks_path.with_extension("next");
    std::fs::write(&next, jwks(&[&old, &new])).unwrap();
    std::fs::rename(&next, &jwks_path).unwrap();
    support::proxy::eventually(
        Duration::from_secs(10),
        "a token with the new kid accepted",
        || get_api(&s, &new.token()) == 200,
    );
    assert_eq!(get_api(&s, &old.token()), 200);
}

/// `moat policy explain POLICY` of `GET /api/x` from
/// `spiffe://example.org/ns/a/sa/b` with `--jwt TOKEN` (off the runtime's
/// threads: it fetches the JWKS from a server on this runtime).
async fn explain_get_api_x(path: PathBuf, token: String) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        support::moat(&[
            "policy",
            "explain",
            support::path_str(&path),
            "--peer",
            "spiffe://example.org/ns/a/sa/b",
            "--method",
            "GET",
            "--path",
            "/api/x",
            "--jwt",
            &token,
        ])
    })
    .await
    .unwrap()
}
