//! `moat demo`: the whole product on loopback, in one process tree.
//!
//! It runs the real binary as a user would: `moat ca init`, `moat ca serve`,
//! and one `moat proxy` per service, as child processes with their logs in
//! the demo directory. The two services, `frontend` and `billing`, are small
//! HTTP servers inside this process. Then it drives requests through
//! frontend → frontend's sidecar → mutual TLS → billing's sidecar → billing,
//! and prints what happened to each: the route that decided, the decision and
//! the status, taken from billing's sidecar (its deny bodies and access log).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_proxy::tls::verify::AnyServerCertificate;
use serde_json::Value;

const TRUST_DOMAIN: &str = "demo.local";
const FRONTEND_ID: &str = "spiffe://demo.local/ns/shop/sa/frontend";
const BILLING_ID: &str = "spiffe://demo.local/ns/shop/sa/billing";
/// Short enough that a renewal happens while the demo runs.
const CERT_TTL: &str = "20s";

/// What `moat demo` was asked to do.
pub struct DemoOptions {
    /// Leave everything running for the user to curl.
    pub keep_running: bool,
    /// Where to put the CA, configs and logs (a temporary directory if absent).
    pub dir: Option<PathBuf>,
}

/// A child `moat` process whose JSON log lines are copied to a file and
/// scanned for `listening` addresses. Terminated on drop.
struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

/// What every sidecar of the demo shares: the CA and where files go.
struct Sidecar<'a> {
    dir: &'a Path,
    ca_dir: &'a Path,
    ca_addr: SocketAddr,
    bundle: &'a Path,
    logs: &'a Path,
}

impl Sidecar<'_> {
    /// Mints a join token for `id`, writes `NAME-proxy.toml` (identity from
    /// the CA, admin on port 0, then `listeners`), and starts the sidecar.
    fn start(&self, name: &str, id: &str, listeners: &str) -> Result<Proc> {
        let token = self.dir.join(format!("{name}.token"));
        std::fs::write(
            &token,
            moat(&["ca", "token", "--dir", p(self.ca_dir), "--id", id])?.trim(),
        )?;
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
        Proc::spawn(
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
pub fn run(opts: DemoOptions) -> Result<()> {
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
    runtime.block_on(demo(&dir, opts.keep_running))
}

async fn demo(dir: &Path, keep_running: bool) -> Result<()> {
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
    if !ca_dir.join("ca.db").exists() {
        moat(&[
            "ca",
            "init",
            "--dir",
            p(&ca_dir),
            "--trust-domain",
            TRUST_DOMAIN,
        ])?;
    }
    std::fs::write(ca_dir.join("ca.toml"), "[issuance]\ndefault_ttl = \"1h\"\n")?;
    let mut ca = Proc::spawn(
        "ca",
        &[
            "ca",
            "serve",
            "--dir",
            p(&ca_dir),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &logs,
    )?;
    let ca_addr = ca.listening("ca").await?;
    let ca_admin = ca.listening("admin").await?;
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, moat(&["ca", "bundle", "--dir", p(&ca_dir)])?)?;
    println!(
        "   trust domain {TRUST_DOMAIN}; `moat ca serve` on https://{ca_addr} (metrics http://{ca_admin}/metrics)"
    );

    // 2. The services, then their sidecars.
    heading("2. Services and their sidecars");
    let billing = serve(billing_service).await?;
    let (idp_key, jwks) = demo_idp()?;
    std::fs::write(dir.join("idp-jwks.json"), jwks.to_string())?;
    std::fs::write(dir.join("billing-policy.toml"), BILLING_POLICY)?;
    let sidecar = Sidecar {
        dir,
        ca_dir: &ca_dir,
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
    let billing_inbound = billing_proxy.listening("billing").await?;
    let billing_admin = billing_proxy.listening("admin").await?;
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
    let frontend_outbound = frontend_proxy.listening("billing").await?;
    let frontend_admin = frontend_proxy.listening("admin").await?;
    let frontend = serve(move |req| frontend_service(req, frontend_outbound)).await?;

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
    println!(
        "   identity   curl http://{frontend_admin}/identity   (and http://{billing_admin}/identity)"
    );
    println!(
        "   metrics    curl http://{billing_admin}/metrics     (CA: http://{ca_admin}/metrics)"
    );
    println!(
        "   logs       {}/*.log: JSON, one access-log line per request",
        logs.display()
    );
    println!(
        "   traces     set OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 before `moat demo` to export spans"
    );
    println!(
        "   policy     moat policy explain {} --peer {FRONTEND_ID} --method POST --path /invoices/42",
        dir.join("billing-policy.toml").display()
    );

    if keep_running {
        println!();
        println!(
            "Everything keeps running; try: curl -s http://{frontend}/invoices/7   (Ctrl-C to stop)"
        );
        tokio::signal::ctrl_c().await?;
    }
    for proc in [&mut frontend_proxy, &mut billing_proxy, &mut ca] {
        proc.stop();
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

/// Runs `moat ARGS` to completion (this same binary) and returns stdout.
fn moat(args: &[&str]) -> Result<String> {
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?;
    if !out.status.success() {
        bail!(
            "moat {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

impl Proc {
    fn spawn(name: &str, args: &[&str], logs: &Path) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--log-format", "json"])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {name}"))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let mut file = std::fs::File::create(logs.join(format!("{name}.log")))?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().expect("log lines").push(v);
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
        })
    }

    /// The address a listener of this process reported.
    async fn listening(&mut self, listener: &str) -> Result<SocketAddr> {
        let line = self
            .wait_for(Duration::from_secs(30), |v| {
                v["message"] == "listening" && v["listener"] == listener
            })
            .await?;
        Ok(line["addr"].as_str().unwrap_or_default().parse()?)
    }

    async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self
                .lines
                .lock()
                .expect("log lines")
                .iter()
                .find(|v| pred(v))
            {
                return Ok(v.clone());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{} exited ({status}); see its log", self.name);
            }
            if Instant::now() > deadline {
                bail!("{} did not report in time; see its log", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Log lines so far.
    fn count(&self) -> usize {
        self.lines.lock().expect("log lines").len()
    }

    /// Lines logged after the first `from`.
    fn since(&self, from: usize) -> Vec<Value> {
        self.lines.lock().expect("log lines")[from..].to_vec()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Reply = hyper::Response<Full<Bytes>>;

/// Serves `handler` over plain HTTP/1.1 on 127.0.0.1:0.
async fn serve<F, Fut>(handler: F) -> Result<SocketAddr>
where
    F: Fn(hyper::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(addr)
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

/// frontend: forwards `/…` to billing through its sidecar's outbound
/// listener, passing the user's Authorization header along.
async fn frontend_service(req: hyper::Request<Incoming>, outbound: SocketAddr) -> Reply {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut builder = hyper::Request::builder()
        .method(parts.method)
        .uri(format!("http://{outbound}{}", parts.uri.path()))
        .header("host", "billing");
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
                .map(|b| b.to_bytes())
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
    billing_proxy: &Proc,
) -> Result<Outcome> {
    let mark = billing_proxy.count();
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
    // The sidecar logs the request as it finishes; give it a moment.
    let mut line = Value::Null;
    for _ in 0..50 {
        if let Some(found) = billing_proxy
            .since(mark)
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
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![rcgen::SanType::URI(FRONTEND_ID.try_into()?)];
    let cert = params.signed_by(&key, &issuer)?;
    let _ = ca_cert;
    Ok((
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
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
