//! `pgo-train`: drives a moat binary through a sidecar's everyday work, so
//! that `scripts/pgo-build.sh` can build moat with profile-guided
//! optimization from what that work exercised.
//!
//!   pgo-train --moat PATH --dir DIR [--scale N]
//!
//! From PATH it runs `moat ca` (a CA, a certificate for the load generator, a
//! CA server), a local service (HTTP/1.1 and h2c, in this process), and one
//! inbound and one outbound sidecar that bootstrap their identities from the
//! CA with join tokens. Then it sends, in turn: HTTP/1.1 keep-alive and
//! HTTP/2 over mutual TLS to the inbound, with a route policy (allowed,
//! denied and malformed requests, routes behind an ES256 JWT: valid, missing,
//! wrong scope) and without one; a new TLS connection per request; a paced
//! trickle (the idle-and-wake path); plain HTTP/1.1 and h2c through the
//! outbound (the sidecar pair); TCP mode; a few 1 MiB uploads. Last it stops
//! the sidecars and the CA with SIGTERM, which is when an instrumented binary
//! writes its profile. `--scale` multiplies the request counts (10: about
//! 115,000 requests).
//!
//! Every answer is counted by status; the run fails (exit 1) if a request
//! fails outright, gets a status its workload does not expect, or a process
//! does not exit cleanly: a training run that silently exercised only error
//! paths would build a binary optimized for the wrong thing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_testkit::{Ca, Moat, Process};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

const TRUST_DOMAIN: &str = "example.org";

/// `pgo-train --moat PATH --dir DIR [--scale N]`.
#[derive(clap::Parser)]
#[command(
    name = "pgo-train",
    about = "Drives a moat binary through a sidecar's everyday work (the PGO training run)"
)]
struct Args {
    /// The moat binary to train (an instrumented build).
    #[arg(long, value_name = "PATH")]
    moat: PathBuf,
    /// Where the PKI, configurations and logs of the run go.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Multiplies the request counts (10: about 115,000 requests).
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    scale: u64,
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(train(args))
}

async fn train(args: Args) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.canonicalize()?;
    let moat = Moat::new(&args.moat).env("RUST_LOG", "info");
    let pki = Pki::make(&moat, &dir)?;
    let mut ca = pki.ca.serve("ca", JSON_LOG, Some(&dir.join("ca.log")))?;
    let ca_url = format!("https://{}", ca.listening_async("ca").await?);
    let backend = backend().await?;
    let tokens = idp(&dir.join("jwks.json"))?;
    let mixed = mixed(&tokens);
    let policy = write(&dir, "policy.toml", &policy_text())?;

    let inbound_config = write(
        &dir,
        "inbound.toml",
        &format!(
            r#"{identity}
[[inbound]]
name = "open"
listen = "127.0.0.1:0"
forward = "{backend}"
app_protocol = "http1"

[[inbound]]
name = "routes"
listen = "127.0.0.1:0"
forward = "{backend}"
policy = "{policy}"

[[inbound]]
name = "tcp"
listen = "127.0.0.1:0"
forward = "{backend}"
protocol = "tcp"
"#,
            identity = pki.identity(&ca_url, "server")?,
            policy = policy.display(),
        ),
    )?;
    let mut inbound = sidecar(&moat, &dir, "inbound", &inbound_config)?;
    let open = inbound.listening_async("open").await?;
    let routes = inbound.listening_async("routes").await?;
    let tcp = inbound.listening_async("tcp").await?;

    let peer = format!("spiffe://{TRUST_DOMAIN}/server");
    let outbound_config = write(
        &dir,
        "outbound.toml",
        &format!(
            r#"{identity}
[[outbound]]
name = "open"
listen = "127.0.0.1:0"
upstream = "{open}"
peer = "{peer}"

[[outbound]]
name = "routes"
listen = "127.0.0.1:0"
upstream = "{routes}"
peer = "{peer}"

[[outbound]]
name = "tcp"
listen = "127.0.0.1:0"
upstream = "{tcp}"
peer = "{peer}"
protocol = "tcp"
"#,
            identity = pki.identity(&ca_url, "client")?,
        ),
    )?;
    let mut outbound = sidecar(&moat, &dir, "outbound", &outbound_config)?;
    let out_open = outbound.listening_async("open").await?;
    let out_routes = outbound.listening_async("routes").await?;
    let out_tcp = outbound.listening_async("tcp").await?;
    // Load only once both sidecars hold a certificate from the CA: before
    // that, they refuse handshakes, and the run would train the refusal.
    for sidecar in [&mut inbound, &mut outbound] {
        sidecar
            .wait_for_log_async(Duration::from_secs(60), |v| {
                v["message"] == "certificate issued"
            })
            .await?;
    }

    let h1_tls = Arc::new(pki.client_tls(b"http/1.1")?);
    let h2_tls = Arc::new(pki.client_tls(b"h2")?);
    let n = usize::try_from(args.scale)?.saturating_mul(1000);
    let mut report = Report::default();
    let (reuse, fresh) = (Conn::Reuse, Conn::Fresh);
    let paced = Conn::Paced(Duration::from_micros(500));

    let t = Target::tls(open, &h1_tls);
    report.add(
        "h1 mTLS, no policy",
        h1(&t, 32, n * 2, reuse, get("/")).await,
    );
    report.add(
        "new TLS connection per request",
        h1(&t, 32, n / 10, fresh, get("/")).await,
    );
    let t = Target::tls(open, &h2_tls);
    report.add("h2 mTLS, no policy", h2(&t, 4, 8, n * 2, get("/")).await);
    let t = Target::tls(routes, &h1_tls);
    report.add("h1 mTLS, routes", h1(&t, 32, n, reuse, mixed.clone()).await);
    report.add(
        "paced, one connection",
        h1(&t, 1, n / 5, paced, mixed.clone()).await,
    );
    let t = Target::tls(routes, &h2_tls);
    report.add("h2 mTLS, routes", h2(&t, 4, 8, n, mixed.clone()).await);
    let t = Target::plain(out_open);
    report.add("h1 via outbound", h1(&t, 32, n * 2, reuse, get("/")).await);
    report.add("h2c via outbound", h2(&t, 4, 8, n, get("/")).await);
    let t = Target::plain(out_routes);
    report.add(
        "h1 via outbound, routes",
        h1(&t, 32, n, reuse, mixed.clone()).await,
    );
    report.add(
        "paced via outbound",
        h1(&t, 1, n / 5, paced, mixed.clone()).await,
    );
    report.add(
        "1 MiB uploads via both",
        h1(&t, 4, 40, reuse, upload(1 << 20)).await,
    );
    let t = Target::plain(out_tcp);
    report.add("tcp via both", h1(&t, 32, n, reuse, get("/")).await);

    report.print(started.elapsed());
    // The outbound first: its pooled connections to the inbound close, and
    // the inbound has nothing left to drain.
    stop(&mut outbound).await?;
    stop(&mut inbound).await?;
    stop(&mut ca).await?;
    report.verdict()
}

// ---------------------------------------------------------------- requests

/// One request of a workload and the statuses it may get.
#[derive(Clone)]
struct Req {
    method: &'static str,
    path: &'static str,
    bearer: Option<Arc<str>>,
    body: Bytes,
    expect: &'static [u16],
}

fn get(path: &'static str) -> impl Fn(usize) -> Req + Clone {
    move |_| Req {
        method: "GET",
        path,
        bearer: None,
        body: Bytes::new(),
        expect: &[200],
    }
}

fn upload(size: usize) -> impl Fn(usize) -> Req + Clone {
    let body = Bytes::from(vec![b'x'; size]);
    move |_| Req {
        method: "POST",
        path: "/api/upload",
        bearer: None,
        body: body.clone(),
        expect: &[200],
    }
}

/// What a routed service sees: mostly allowed reads, some writes, reports
/// behind a JWT (valid, missing, wrong scope), some denials and some
/// requests refused before any route is tried.
fn mixed(tokens: &Tokens) -> impl Fn(usize) -> Req + Clone + Send + Sync + 'static {
    let Tokens { good, weak } = tokens.clone();
    move |i| {
        let (method, path, bearer, expect): (_, _, _, &'static [u16]) = match i % 20 {
            0 => ("GET", "/admin/users", None, &[403]),
            1 => ("GET", "/nowhere", None, &[403]),
            2 => ("GET", "/api/%2e%2e/admin", None, &[400, 403]),
            3 => ("GET", "/api/a%2Fb", None, &[400]),
            4 | 5 => ("POST", "/api/orders", None, &[200]),
            6 => ("GET", "/healthz", None, &[200]),
            7 => ("HEAD", "/static/app.js", None, &[200]),
            8 | 9 => ("GET", "/reports/q3", Some(good.clone()), &[200]),
            10 => ("GET", "/reports/q3", None, &[401]),
            11 => ("GET", "/reports/q3", Some(weak.clone()), &[403]),
            _ => ("GET", "/api/orders/42?expand=items", None, &[200]),
        };
        let body = if method == "POST" {
            Bytes::from_static(b"{\"item\":42,\"count\":1}")
        } else {
            Bytes::new()
        };
        Req {
            method,
            path,
            bearer,
            body,
            expect,
        }
    }
}

/// Bearer tokens from the training identity provider: one with the scope
/// the reports route asks for, one without.
#[derive(Clone)]
struct Tokens {
    good: Arc<str>,
    weak: Arc<str>,
}

const IDP: &str = "https://idp.example.org";

/// An ES256 identity provider: writes its JWKS to `jwks` and signs tokens.
fn idp(jwks: &Path) -> Result<Tokens> {
    use base64::Engine;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let raw = key.public_key_raw();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let set = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "train-1", "use": "sig", "alg": "ES256",
        "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65])
    }]});
    std::fs::write(jwks, set.to_string())?;
    let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let sign = |scope: &str| -> Result<Arc<str>> {
        let claims = serde_json::json!({
            "iss": IDP, "aud": "service", "sub": "alice", "scope": scope,
            "iat": now, "nbf": now - 5, "exp": now + 3600
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("train-1".into());
        Ok(jsonwebtoken::encode(&header, &claims, &encoding)?.into())
    };
    Ok(Tokens {
        good: sign("reports:read orders:read")?,
        weak: sign("orders:read")?,
    })
}

// ---------------------------------------------------------------- load

/// Where requests go: a sidecar's listener, over mutual TLS or plaintext.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Target {
    fn tls(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Self {
        Self {
            addr,
            tls: Some(tokio_rustls::TlsConnector::from(config.clone())),
        }
    }

    fn plain(addr: SocketAddr) -> Self {
        Self { addr, tls: None }
    }

    async fn connect(&self) -> Result<Box<dyn Io>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = ServerName::try_from("server").expect("static name");
        Ok(Box::new(tls.connect(name, tcp).await?))
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

#[derive(Default)]
struct Tally {
    by_status: std::collections::BTreeMap<u16, usize>,
    unexpected: usize,
    errors: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (status, count) in other.by_status {
            *self.by_status.entry(status).or_default() += count;
        }
        self.unexpected += other.unexpected;
        self.errors.extend(other.errors);
    }

    fn record(&mut self, req: &Req, outcome: Result<u16>) {
        match outcome {
            Ok(status) => {
                *self.by_status.entry(status).or_default() += 1;
                if !req.expect.contains(&status) {
                    self.unexpected += 1;
                }
            }
            Err(e) => self
                .errors
                .push(format!("{} {}: {e:#}", req.method, req.path)),
        }
    }
}

/// The tallies of a set of tasks; a task that panicked counts as an error.
async fn collect(mut tasks: tokio::task::JoinSet<Tally>) -> Tally {
    let mut tally = Tally::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(t) => tally.merge(t),
            Err(e) => tally.errors.push(format!("task: {e}")),
        }
    }
    tally
}

/// HTTP/1.1 sends the path and a Host header; HTTP/2 the whole URI (its
/// `:scheme` and `:authority`).
fn request(req: &Req, h2_scheme: Option<&str>) -> hyper::Request<Full<Bytes>> {
    let builder = match h2_scheme {
        Some(scheme) => {
            hyper::Request::builder().uri(format!("{scheme}://service.example.org{}", req.path))
        }
        None => hyper::Request::builder()
            .uri(req.path)
            .header("host", "service.example.org"),
    };
    let builder = builder
        .method(req.method)
        .header("user-agent", "pgo-train")
        .header("accept", "*/*");
    let builder = match &req.bearer {
        Some(token) => builder.header("authorization", format!("Bearer {token}")),
        None => builder,
    };
    builder
        .body(Full::new(req.body.clone()))
        .expect("static request parts")
}

async fn read_status(resp: hyper::Response<Incoming>) -> Result<u16> {
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// How an HTTP/1.1 workload uses its connections.
#[derive(Clone, Copy)]
enum Conn {
    /// Keep-alive: each connection sends its share one after another.
    Reuse,
    /// A new connection (and TLS handshake) per request.
    Fresh,
    /// Keep-alive with this pause before each request: with one connection,
    /// the path a sidecar takes when traffic is light (park, wake, serve).
    Paced(Duration),
}

/// `conns` HTTP/1.1 connections at a time sending `total` requests, each
/// connection its share one after another.
async fn h1<F>(target: &Target, conns: usize, total: usize, how: Conn, make: F) -> Tally
where
    F: Fn(usize) -> Req + Clone + Send + Sync + 'static,
{
    let per_conn = total.div_ceil(conns);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let target = target.clone();
        let make = make.clone();
        tasks.spawn(async move {
            let mut tally = Tally::default();
            let mut i = c * per_conn;
            while i < (c + 1) * per_conn {
                // A fresh connection; it serves requests until it fails.
                let (end, pause) = match how {
                    Conn::Reuse => ((c + 1) * per_conn, None),
                    Conn::Fresh => (i + 1, None),
                    Conn::Paced(pause) => ((c + 1) * per_conn, Some(pause)),
                };
                let sent = h1_connection(&target, &make, &mut i, end, pause, &mut tally).await;
                if let Err(e) = sent {
                    tally.errors.push(format!("connection: {e:#}"));
                    break;
                }
            }
            tally
        });
    }
    collect(tasks).await
}

async fn h1_connection<F>(
    target: &Target,
    make: &F,
    i: &mut usize,
    end: usize,
    pause: Option<Duration>,
    tally: &mut Tally,
) -> Result<()>
where
    F: Fn(usize) -> Req,
{
    let io = target.connect().await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let driver = tokio::spawn(conn);
    while *i < end {
        let req = make(*i);
        *i += 1;
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
        send.ready().await?;
        // A failed send ends the connection; so does `Connection: close`.
        let (outcome, close) = match send.send_request(request(&req, None)).await {
            Ok(resp) => {
                let close = resp
                    .headers()
                    .get("connection")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                (read_status(resp).await, close)
            }
            Err(e) => (Err(e.into()), true),
        };
        tally.record(&req, outcome);
        if close {
            break;
        }
    }
    drop(send);
    let _ = driver.await;
    Ok(())
}

/// `conns` HTTP/2 connections with `streams` requests in flight on each.
async fn h2<F>(target: &Target, conns: usize, streams: usize, total: usize, make: F) -> Tally
where
    F: Fn(usize) -> Req + Clone + Send + Sync + 'static,
{
    let per_stream = total.div_ceil(conns * streams);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let target = target.clone();
        let make = make.clone();
        tasks.spawn(async move {
            let mut tally = Tally::default();
            let io = match target.connect().await {
                Ok(io) => io,
                Err(e) => {
                    tally.errors.push(format!("connect: {e:#}"));
                    return tally;
                }
            };
            let (send, conn) =
                match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                {
                    Ok(pair) => pair,
                    Err(e) => {
                        tally.errors.push(format!("h2 handshake: {e}"));
                        return tally;
                    }
                };
            let driver = tokio::spawn(conn);
            let scheme = if target.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let mut streams_set = tokio::task::JoinSet::new();
            for s in 0..streams {
                let mut send = send.clone();
                let make = make.clone();
                streams_set.spawn(async move {
                    let mut tally = Tally::default();
                    let first = (c * streams + s) * per_stream;
                    for i in first..first + per_stream {
                        let req = make(i);
                        let outcome = match send.send_request(request(&req, Some(scheme))).await {
                            Ok(resp) => read_status(resp).await,
                            Err(e) => Err(e.into()),
                        };
                        tally.record(&req, outcome);
                    }
                    tally
                });
            }
            drop(send);
            tally.merge(collect(streams_set).await);
            driver.abort();
            tally
        });
    }
    collect(tasks).await
}

#[derive(Default)]
struct Report {
    rows: Vec<(String, Tally)>,
}

impl Report {
    fn add(&mut self, name: &str, tally: Tally) {
        self.rows.push((name.to_owned(), tally));
    }

    fn print(&self, took: Duration) {
        for (name, t) in &self.rows {
            let statuses: Vec<String> = t
                .by_status
                .iter()
                .map(|(s, n)| format!("{s}×{n}"))
                .collect();
            println!(
                "{name:32} {:<36} unexpected {} errors {}",
                statuses.join(" "),
                t.unexpected,
                t.errors.len()
            );
            for e in t.errors.iter().take(3) {
                println!("    {e}");
            }
        }
        println!("trained in {:.1} s", took.as_secs_f64());
    }

    fn verdict(&self) -> Result<()> {
        let bad: Vec<&str> = self
            .rows
            .iter()
            .filter(|(_, t)| t.unexpected > 0 || !t.errors.is_empty() || t.by_status.is_empty())
            .map(|(name, _)| name.as_str())
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            bail!("workloads that did not run as expected: {}", bad.join(", "))
        }
    }
}

// ---------------------------------------------------------------- parts

/// The local service: HTTP/1.1 or h2c, a fixed small answer, or the size
/// of what was uploaded.
async fn backend() -> Result<SocketAddr> {
    let addr = moat_testkit::http::serve(|req: hyper::Request<Incoming>| async move {
        // No body for HEAD: over HTTP/2 a client resets the stream otherwise.
        let reply = if req.method() == hyper::Method::HEAD {
            String::new()
        } else if req.method() == hyper::Method::POST {
            let n = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            format!("{{\"received\":{n}}}\n")
        } else {
            "hello from the service\n".to_owned()
        };
        hyper::Response::builder()
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(reply)))
            .expect("static response")
    })
    .await?;
    Ok(addr)
}

fn policy_text() -> String {
    format!(
        r#"[[issuer]]
name = "idp"
issuer = "{IDP}"
audiences = ["service"]
jwks_file = "jwks.json"
algorithms = ["ES256"]

[[route]]
name = "reports"
path = "/reports/*"
methods = ["GET"]
allow = "any-peer"
jwt = {{ issuer = "idp", claims = {{ scope = "reports:read" }} }}

[[route]]
name = "health"
path = "/healthz"
methods = ["GET"]
allow = "any-peer"

[[route]]
name = "admin"
path = "/admin/*"
deny = true

[[route]]
name = "static"
path = "/static/*"
methods = ["GET", "HEAD"]
allow = "any-peer"

[[route]]
name = "api"
path = "/api/*"
methods = ["GET", "POST"]
peers = ["spiffe://{TRUST_DOMAIN}/loadgen", "spiffe://{TRUST_DOMAIN}/client"]
"#
    )
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// A CA made by `moat ca`, and the identities the run needs.
struct Pki {
    dir: PathBuf,
    ca: Ca,
}

impl Pki {
    fn make(moat: &Moat, dir: &Path) -> Result<Self> {
        let pki = dir.join("pki");
        let _ = std::fs::remove_dir_all(&pki);
        std::fs::create_dir_all(&pki)?;
        let ca = Ca::init(moat, &pki.join("ca"), TRUST_DOMAIN)?;
        // The load generator's certificate, issued offline; the sidecars get
        // theirs from `moat ca serve` with a join token (Pki::identity).
        let loadgen = format!("spiffe://{TRUST_DOMAIN}/loadgen");
        let (cert, key) = (pki.join("loadgen.crt"), pki.join("loadgen.key"));
        ca.issue(&loadgen, "24h", &cert, &key)?;
        std::fs::write(pki.join("bundle.pem"), ca.bundle()?)?;
        Ok(Self { dir: pki, ca })
    }

    /// A sidecar's `[identity]`: a certificate for `spiffe://…/{id}` from
    /// the CA at `ca_url`, bootstrapped with a join token; and one worker
    /// thread, as a pod sidecar on a small CPU limit runs.
    fn identity(&self, ca_url: &str, id: &str) -> Result<String> {
        let spiffe = format!("spiffe://{TRUST_DOMAIN}/{id}");
        let token_file = self.dir.join(format!("{id}.token"));
        self.ca.token_file(&spiffe, &token_file)?;
        Ok(format!(
            r#"[runtime]
worker_threads = 1
[identity]
ca_url = "{ca_url}"
bundle = "{bundle}"
token_file = "{token}"
[admin]
listen = "127.0.0.1:0"
"#,
            bundle = self.dir.join("bundle.pem").display(),
            token = token_file.display(),
        ))
    }
    /// The load generator's client: presents `loadgen`'s certificate;
    /// does not check the server's name (its certificate has a SPIFFE URI
    /// only), as `oha --insecure` does in the load bench.
    fn client_tls(&self, alpn: &[u8]) -> Result<rustls::ClientConfig> {
        let chain: Vec<CertificateDer<'static>> =
            rustls_pki_types::pem::PemObject::pem_file_iter(self.dir.join("loadgen.crt"))?
                .collect::<Result<_, _>>()?;
        let key = <PrivateKeyDer<'static> as rustls_pki_types::pem::PemObject>::from_pem_file(
            self.dir.join("loadgen.key"),
        )?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                moat_proxy::tls::verify::AnyServerCertificate::new(provider),
            ))
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

/// JSON logs: `listening` lines are read from them.
const JSON_LOG: &[&str] = &["--log-format", "json"];

/// A sidecar with `config`, its log in `DIR/NAME.log`.
fn sidecar(moat: &Moat, dir: &Path, name: &str, config: &Path) -> Result<Process> {
    let config = config.to_str().context("utf-8 path")?;
    let args = [JSON_LOG, &["proxy", "--config", config]].concat();
    moat.spawn(name, &args, Some(&dir.join(format!("{name}.log"))))
}

/// SIGTERM, then a clean exit within 30 s (an instrumented binary writes
/// its profile on the way out).
async fn stop(proc: &mut Process) -> Result<()> {
    let status = proc.stop(Duration::from_secs(30)).await?;
    if !status.success() {
        bail!("{} exited with {status}; see its log", proc.name());
    }
    Ok(())
}
