//! `moat demo`: the whole product on loopback, in one process tree.
//!
//! It runs the real binary as a user would: `moat ca init`, `moat ca serve`,
//! and one `moat proxy` per service, as child processes with their logs in
//! the demo directory. The two services, `frontend` and `billing`, are small
//! HTTP servers inside this process. Then it drives requests through
//! frontend → frontend's sidecar → mutual TLS → billing's sidecar → billing,
//! and prints what happened to each: the route that decided, the decision and
//! the status, taken from billing's sidecar (its deny bodies and access log).
//!
//! `moat demo --transparent` ([`transparent`]) runs the same services in
//! network namespaces with transparent interception instead (root only).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use moat_proxy::tls::verify::AnyServerCertificate;
use moat_testkit::http::Reply;
use moat_testkit::{Ca, Moat, Process, pki};
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};

mod transparent;

const TRUST_DOMAIN: &str = "demo.local";
const FRONTEND_ID: &str = "spiffe://demo.local/ns/shop/sa/frontend";
const BILLING_ID: &str = "spiffe://demo.local/ns/shop/sa/billing";
/// Short enough that a renewal happens while the demo runs.
const CERT_TTL: &str = "20s";

/// What `moat demo` was asked to do.
pub(crate) struct DemoOptions {
    /// Leave everything running for the user to curl.
    pub keep_running: bool,
    /// Where to put the CA, configs and logs (a temporary directory if absent).
    pub dir: Option<PathBuf>,
    /// Network namespaces and transparent interception instead of loopback
    /// and explicit listeners (root only).
    pub transparent: bool,
}

/// How "Where to look" names the demo's files: they outlive the run only
/// with `--dir`; without it they are in a temporary directory, removed
/// when the demo returns (with `--keep-running`, when it is stopped).
struct FilesShown {
    /// The directory as the commands name it: the real one, or `DIR`.
    dir: String,
    /// What to say first, when the files go with the run.
    note: Option<String>,
}

impl FilesShown {
    fn new(dir: &Path, dir_given: bool, keep_running: bool, flags: &str) -> Self {
        match (dir_given, keep_running) {
            (true, _) => Self {
                dir: dir.display().to_string(),
                note: None,
            },
            (false, true) => Self {
                dir: dir.display().to_string(),
                note: Some(format!(
                    "(the files below are removed when the demo stops; `moat demo{flags} --dir DIR` keeps them in DIR)"
                )),
            },
            (false, false) => Self {
                dir: "DIR".to_owned(),
                note: Some(format!(
                    "(its files, in {}, are removed as it ends: below, DIR is a directory kept with `moat demo{flags} --dir DIR`)",
                    dir.display()
                )),
            },
        }
    }
}

/// What every sidecar of the demo shares: the CA and where files go.
struct Sidecar<'a> {
    dir: &'a Path,
    ca: &'a Ca,
    ca_addr: SocketAddr,
    bundle: &'a Path,
    logs: &'a Path,
}

impl Sidecar<'_> {
    /// Mints a join token for `id`, writes `NAME-proxy.toml` (identity from
    /// the CA, admin on port 0, then `listeners`), and starts the sidecar.
    fn start(&self, name: &str, id: &str, listeners: &str) -> Result<Process> {
        let token = self.dir.join(format!("{name}.token"));
        self.ca.token_file(id, &token)?;
        let config = self.dir.join(format!("{name}-proxy.toml"));
        std::fs::write(
            &config,
            format!(
                r#"# {name}'s sidecar.
[identity]
ca_url     = "https://{ca}"
bundle     = "{bundle}"
token_file = "{token}"
ttl        = "{CERT_TTL}"

[admin]
listen = "127.0.0.1:0"

{listeners}"#,
                ca = self.ca_addr,
                bundle = self.bundle.display(),
                token = token.display(),
            ),
        )?;
        spawn(
            &format!("{name}-sidecar"),
            &["proxy", "--config", p(&config)],
            self.logs,
        )
    }
}

/// A row of the request table.
struct Outcome {
    status: u16,
    route: String,
    decision: String,
    reason: String,
    body: Value,
}

/// Runs the demo; returns when it is done (or on Ctrl-C with `keep_running`).
pub(crate) fn run(opts: DemoOptions) -> Result<()> {
    let dir_given = opts.dir.is_some();
    let tmp;
    let dir = match opts.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            dir
        }
        None => {
            tmp = tempfile::Builder::new().prefix("moat-demo-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if opts.transparent {
        return runtime.block_on(transparent::run(&dir, dir_given, opts.keep_running));
    }
    runtime.block_on(async {
        // SIGTERM (`kill PID`, `timeout`) reaches the demo alone, not its
        // sidecars and CA as a terminal's Ctrl-C does: dropping the demo
        // stops them, which the default action (exit at once) would not.
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            r = demo(&dir, dir_given, opts.keep_running) => r,
            _ = terminate.recv() => {
                println!("\nterminated");
                Ok(())
            }
        }
    })
}

async fn demo(dir: &Path, dir_given: bool, keep_running: bool) -> Result<()> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    println!(
        "moat demo: a CA, two services with sidecars, mutual TLS and per-route authorization, on loopback."
    );
    println!(
        "working directory: {} (logs in {})",
        dir.display(),
        logs.display()
    );

    // 1. The CA.
    heading("1. Certificate authority");
    let ca_dir = dir.join("ca");
    let ca = if ca_dir.join("ca.db").exists() {
        Ca::open(&moat()?, &ca_dir)
    } else {
        Ca::init(&moat()?, &ca_dir, TRUST_DOMAIN)?
    };
    std::fs::write(ca_dir.join("ca.toml"), "[issuance]\ndefault_ttl = \"1h\"\n")?;
    let mut ca_server = ca.serve("ca", JSON_LOG, Some(&logs.join("ca.log")))?;
    let ca_addr = ca_server.listening_async("ca").await?;
    let ca_admin = ca_server.listening_async("admin").await?;
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, ca.bundle()?)?;
    println!(
        "   trust domain {TRUST_DOMAIN}; `moat ca serve` on https://{ca_addr} (metrics http://{ca_admin}/metrics)"
    );

    // 2. The services, then their sidecars.
    heading("2. Services and their sidecars");
    let billing = moat_testkit::http::serve(billing_service).await?;
    let (idp_key, jwks) = demo_idp()?;
    std::fs::write(dir.join("idp-jwks.json"), jwks.to_string())?;
    std::fs::write(dir.join("billing-policy.toml"), BILLING_POLICY)?;
    let sidecar = Sidecar {
        dir,
        ca: &ca,
        ca_addr,
        bundle: &bundle,
        logs: &logs,
    };
    let mut billing_proxy = sidecar.start(
        "billing",
        BILLING_ID,
        &format!(
            r#"# Peers reach billing only through this listener.
[[inbound]]
name     = "billing"
listen   = "127.0.0.1:0"
forward  = "{billing}"
protocol = "http"
policy   = "billing-policy.toml"
"#
        ),
    )?;
    let billing_inbound = billing_proxy.listening_async("billing").await?;
    let billing_admin = billing_proxy.listening_async("admin").await?;
    let mut frontend_proxy = sidecar.start(
        "frontend",
        FRONTEND_ID,
        &format!(
            r#"# frontend calls billing through this listener.
[[outbound]]
name     = "billing"
listen   = "127.0.0.1:0"
upstream = "{billing_inbound}"
peer     = "{BILLING_ID}"
protocol = "http"
"#
        ),
    )?;
    let frontend_outbound = frontend_proxy.listening_async("billing").await?;
    let frontend_admin = frontend_proxy.listening_async("admin").await?;
    let billing_url: Arc<str> = format!("http://{frontend_outbound}").into();
    let frontend = moat_testkit::http::serve(move |req| {
        frontend_service(req, billing_url.clone(), Some("billing"))
    })
    .await?;

    println!(
        "   billing   service http://{billing}   sidecar inbound  https://{billing_inbound} (mutual TLS) -> billing"
    );
    println!(
        "   frontend  service http://{frontend}   sidecar outbound http://{frontend_outbound} -> billing's sidecar, which must be {BILLING_ID}"
    );
    println!(
        "   billing's route policy: {}",
        dir.join("billing-policy.toml").display()
    );

    // 3. Identities.
    heading(
        "3. Identities issued with single-use join tokens (certificates live 20 s here, 1 h by default)",
    );
    let frontend_identity = wait_ready(frontend_admin).await?;
    let billing_identity = wait_ready(billing_admin).await?;
    for (name, identity) in [
        ("frontend", &frontend_identity),
        ("billing", &billing_identity),
    ] {
        println!(
            "   {name:<9} {}  serial {}…  expires {}",
            identity["id"].as_str().unwrap_or("?"),
            &identity["serial"].as_str().unwrap_or("?")
                [..12.min(identity["serial"].as_str().unwrap_or("?").len())],
            identity["not_after"].as_str().unwrap_or("?")
        );
    }

    // 4. Requests.
    heading("4. Requests: frontend -> its sidecar -> mutual TLS -> billing's sidecar -> billing");
    let alice = idp_token(&idp_key, "alice", "invoices:export")?;
    let requests: Vec<(&str, &str, Option<&str>, &str)> = vec![
        ("GET", "/invoices/42", None, ""),
        ("POST", "/invoices/42", None, ""),
        ("GET", "/export", None, ""),
        ("GET", "/export", Some(alice.as_str()), "with alice's JWT"),
        ("GET", "/invoices/../admin/keys", None, ""),
    ];
    for (method, path, jwt, note) in &requests {
        let outcome = request(frontend, method, path, *jwt, &billing_proxy).await?;
        print_outcome(method, path, note, &outcome);
    }
    println!("   direct to billing's sidecar, bypassing frontend's:");
    for (label, result) in [
        (
            "a client with no certificate",
            rogue_handshake(billing_inbound, None).await,
        ),
        (
            "a client with a certificate from another CA",
            rogue_handshake(billing_inbound, Some(foreign_identity()?)).await,
        ),
    ] {
        println!("     {label:<48} {result}");
    }

    // 5. Renewal.
    heading("5. Renewal: the sidecars renew at about half the lifetime; connections keep working");
    let before = frontend_identity["serial"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let renewed = wait_renewal(frontend_admin, &before, Duration::from_secs(30)).await?;
    println!(
        "   frontend renewed over mutual TLS: serial {}… -> {}…, now expires {}",
        &before[..12.min(before.len())],
        &renewed["serial"].as_str().unwrap_or("?")[..12],
        renewed["not_after"].as_str().unwrap_or("?")
    );
    let outcome = request(frontend, "GET", "/invoices/42", None, &billing_proxy).await?;
    print_outcome("GET", "/invoices/42", "after renewal", &outcome);

    heading("Where to look");
    if !keep_running {
        // The addresses below stop when this run ends: say how to keep them.
        println!("   (the demo stops now; run `moat demo --keep-running` to try these)");
    }
    let files = FilesShown::new(dir, dir_given, keep_running, "");
    if let Some(note) = &files.note {
        println!("   {note}");
    }
    println!(
        "   identity   curl http://{frontend_admin}/identity   (and http://{billing_admin}/identity)"
    );
    println!(
        "   metrics    curl http://{billing_admin}/metrics     (CA: http://{ca_admin}/metrics)"
    );
    println!(
        "   logs       {}/logs/*.log: JSON, one access-log line per request",
        files.dir
    );
    println!(
        "   traces     set OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 before `moat demo` to export spans"
    );
    println!(
        "   policy     moat policy explain {}/billing-policy.toml --peer {FRONTEND_ID} --method POST --path /invoices/42",
        files.dir
    );

    if keep_running {
        println!();
        println!(
            "Everything keeps running; try: curl -s http://{frontend}/invoices/7   (Ctrl-C to stop)"
        );
        tokio::signal::ctrl_c().await?;
    }
    for proc in [&mut frontend_proxy, &mut billing_proxy, &mut ca_server] {
        let _ = proc.stop(Duration::from_secs(5)).await;
    }
    println!();
    println!(
        "demo finished: every request above went over mutual TLS and was authorized by billing's sidecar."
    );
    Ok(())
}

const BILLING_POLICY: &str = r#"# billing's route policy: frontend may read invoices, not write them;
# the export needs a user's JWT with the invoices:export scope.
mode = "enforce"

[[issuer]]
name       = "demo-idp"
issuer     = "https://idp.demo.local"
audiences  = ["billing"]
jwks_file  = "idp-jwks.json"
algorithms = ["ES256"]

[[route]]
name    = "health"
path    = "/healthz"
methods = ["GET"]
allow   = "any-peer"

[[route]]
name    = "read-invoices"
path    = "/invoices/*"
methods = ["GET", "HEAD"]
peers   = ["spiffe://demo.local/ns/shop/sa/frontend"]

[[route]]
name    = "write-invoices"
path    = "/invoices/*"
methods = ["POST", "PUT", "DELETE"]
peers   = ["spiffe://demo.local/ns/shop/sa/billing-admin"]

[[route]]
name    = "export-invoices"
path    = "/export"
methods = ["GET"]
peers   = ["spiffe://demo.local/ns/shop/*"]
jwt     = { issuer = "demo-idp", claims = { scope = "invoices:export" } }
forward_claims = { sub = "x-user-id" }
"#;

fn heading(text: &str) {
    println!();
    println!("{text}");
}

fn p(path: &Path) -> &str {
    path.to_str().expect("demo paths are UTF-8")
}

/// This same binary, as the demo runs it: the log filter from `RUST_LOG`,
/// `info` if unset.
fn moat() -> Result<Moat> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    Ok(Moat::current_exe()?.env("RUST_LOG", &filter))
}

/// JSON logs, whatever `--log-format` the demo was given.
const JSON_LOG: &[&str] = &["--log-format", "json"];

/// Starts `moat ARGS` as `name`, its log in `logs/NAME.log`.
fn spawn(name: &str, args: &[&str], logs: &Path) -> Result<Process> {
    let log = logs.join(format!("{name}.log"));
    moat()?.spawn(name, &[JSON_LOG, args].concat(), Some(&log))
}

fn json_reply(status: u16, body: Value) -> Reply {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

/// billing: invoices, and an export that names the user its sidecar verified.
async fn billing_service(req: hyper::Request<Incoming>) -> Reply {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let caller = header("x-moat-peer-id");
    let user = header("x-user-id");
    let path = req.uri().path().to_owned();
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/healthz") => json_reply(200, serde_json::json!({"ok": true})),
        ("GET", "/export") => json_reply(
            200,
            serde_json::json!({"exported": 3, "for_user": user, "caller": caller}),
        ),
        ("GET", p) if p.starts_with("/invoices/") => json_reply(
            200,
            serde_json::json!({"invoice": &p["/invoices/".len()..], "amount_eur": 120, "caller": caller}),
        ),
        (_, p) if p.starts_with("/invoices/") => {
            json_reply(201, serde_json::json!({"created": true}))
        }
        _ => json_reply(404, serde_json::json!({"error": "not found"})),
    }
}

/// frontend: forwards `/…` to billing at `billing_url` (its sidecar's
/// outbound listener, or billing's own address in transparent mode),
/// passing the user's Authorization header along.
async fn frontend_service(
    req: hyper::Request<Incoming>,
    billing_url: Arc<str>,
    host: Option<&'static str>,
) -> Reply {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let mut builder = hyper::Request::builder()
        .method(parts.method)
        .uri(format!("{billing_url}{}", parts.uri.path()));
    if let Some(host) = host {
        builder = builder.header("host", host);
    }
    if let Some(auth) = parts.headers.get("authorization") {
        builder = builder.header("authorization", auth);
    }
    let upstream = builder.body(Full::new(body)).expect("valid request");
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    match client.request(upstream).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            let mut reply = hyper::Response::new(Full::new(body));
            *reply.status_mut() = parts.status;
            *reply.headers_mut() = parts.headers;
            reply
        }
        Err(e) => json_reply(
            502,
            serde_json::json!({"error": format!("frontend cannot reach its sidecar: {e}")}),
        ),
    }
}

/// Sends one request to frontend and reads the decision from billing's
/// sidecar: its deny body when it refused, its access log when it allowed.
async fn request(
    frontend: SocketAddr,
    method: &str,
    path: &str,
    jwt: Option<&str>,
    billing_proxy: &Process,
) -> Result<Outcome> {
    let mark = billing_proxy.count();
    let (status, body) = send(frontend, method, path, jwt).await?;
    outcome(status, body, billing_proxy, mark).await
}

/// Sends one request to `frontend`: the status and the JSON body.
async fn send(
    frontend: SocketAddr,
    method: &str,
    path: &str,
    jwt: Option<&str>,
) -> Result<(u16, Value)> {
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{frontend}{path}"));
    if let Some(token) = jwt {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = client
        .request(builder.body(Full::new(Bytes::new()))?)
        .await?;
    let status = resp.status().as_u16();
    let body: Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())
        .unwrap_or(Value::Null);
    Ok((status, body))
}

/// What billing's sidecar decided about the request that got `status` and
/// `body`: its deny body, else its log lines after `mark`.
async fn outcome(
    status: u16,
    body: Value,
    billing_proxy: &Process,
    mark: usize,
) -> Result<Outcome> {
    // The sidecar logs the request as it finishes; give it a moment.
    let mut line = Value::Null;
    for _ in 0..50 {
        if let Some(found) = billing_proxy
            .json_since(mark)
            .into_iter()
            .find(|v| v["message"] == "access" || v["message"] == "request denied")
        {
            line = found;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let field = |v: &Value, k: &str| v[k].as_str().map(str::to_owned);
    let route = field(&body, "route")
        .or_else(|| field(&line, "route"))
        .filter(|r| !r.is_empty() && r != "-")
        .unwrap_or_else(|| "(none matched: deny by default)".into());
    let decision = field(&line, "decision").unwrap_or_else(|| {
        if status < 400 {
            "allow".into()
        } else {
            "deny".into()
        }
    });
    let reason = field(&body, "reason")
        .or_else(|| field(&line, "reason"))
        .unwrap_or_default();
    Ok(Outcome {
        status,
        route,
        decision,
        reason,
        body,
    })
}

fn print_outcome(method: &str, path: &str, note: &str, o: &Outcome) {
    let what = format!("{method} {path} {note}");
    let mut line = format!(
        "   {what:<42} {}  {:<6} route {}",
        o.status, o.decision, o.route
    );
    if !o.reason.is_empty() {
        line.push_str(&format!(" ({})", o.reason));
    }
    if o.status < 400 {
        if let Some(user) = o.body["for_user"].as_str().filter(|u| !u.is_empty()) {
            line.push_str(&format!("; billing saw verified user {user}"));
        } else if let Some(caller) = o.body["caller"].as_str() {
            line.push_str(&format!("; billing saw caller {caller}"));
        }
    }
    println!("{line}");
}

async fn get_json(addr: SocketAddr, path: &str) -> Result<(u16, Value)> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = client
        .request(hyper::Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new()))?)
        .await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

async fn wait_ready(admin: SocketAddr) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, identity)) = get_json(admin, "/identity").await {
            return Ok(identity);
        }
        if Instant::now() > deadline {
            bail!("the sidecar at {admin} never got a certificate; see its log");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_renewal(admin: SocketAddr, serial: &str, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((200, identity)) = get_json(admin, "/identity").await
            && identity["serial"].as_str().is_some_and(|s| s != serial)
        {
            return Ok(identity);
        }
        if Instant::now() > deadline {
            bail!("no renewal within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The demo's identity provider: an ES256 key and its JWKS.
fn demo_idp() -> Result<(rcgen::KeyPair, Value)> {
    use base64::Engine;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let raw = key.public_key_raw();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "demo-1", "use": "sig", "alg": "ES256",
        "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65])
    }]});
    Ok((key, jwks))
}

fn idp_token(key: &rcgen::KeyPair, sub: &str, scope: &str) -> Result<String> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://idp.demo.local", "aud": "billing", "sub": sub, "scope": scope,
        "iat": now, "nbf": now - 5, "exp": now + 600
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("demo-1".into());
    let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?;
    Ok(jsonwebtoken::encode(&header, &claims, &encoding)?)
}

/// A certificate for frontend's SPIFFE ID, but from a CA nobody trusts.
fn foreign_identity() -> Result<(
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
)> {
    let (issuer, _) = pki::foreign_ca("not the demo CA")?;
    let san = pki::uri_san(FRONTEND_ID)?;
    let cert = pki::leaf(&issuer, "", |p| p.subject_alt_names = vec![san])?;
    Ok((
        vec![cert.der.into()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(cert.key_der.into()),
    ))
}

/// Connects straight to billing's sidecar and reports how it refused us.
async fn rogue_handshake(
    addr: SocketAddr,
    identity: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let builder = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCertificate::new(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))));
    let config = match identity {
        Some((chain, key)) => match builder.with_client_auth_cert(chain, key) {
            Ok(c) => c,
            Err(e) => return format!("could not build the client: {e}"),
        },
        None => builder.with_no_client_auth(),
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("billing").expect("static name");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        // In TLS 1.3 the server judges the client's certificate after the
        // client thinks the handshake is done: the refusal arrives on read.
        tls.write_all(b"GET /invoices/42 HTTP/1.1\r\nhost: billing\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await?;
        Ok::<_, std::io::Error>(n)
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(0)) => "refused: connection closed".into(),
        Ok(Ok(_)) => "ANSWERED (this would be a bug)".into(),
        Ok(Err(e)) => format!("refused in the TLS handshake: {}", short_tls_error(&e)),
        Err(_) => "no answer within 5 s".into(),
    }
}

fn short_tls_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.as_str() {
        t if t.contains("CertificateRequired") => "alert certificate_required".into(),
        t if t.contains("UnknownCA") => "alert unknown_ca".into(),
        t if t.contains("BadCertificate") => "alert bad_certificate".into(),
        t => t.to_owned(),
    }
}
