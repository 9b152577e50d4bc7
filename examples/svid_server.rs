//! A service that gets its own X.509-SVID from `moat ca` and serves mutual
//! TLS itself, without the sidecar: what to copy when a program should hold
//! its identity in-process.
//!
//! It makes a P-256 key in memory, redeems a join token for a certificate
//! (`CaClient::issue`), serves HTTPS with rustls requiring a client
//! certificate from the same trust bundle, answers each request with the
//! caller's SPIFFE ID, and renews over mutual TLS with a fresh key at the
//! time `Svid::renew_at` gives (half-way through the lifetime still ahead),
//! publishing each new certificate to the accept loop through a `watch`
//! channel: connections made after a renewal get the new certificate,
//! connections already open keep theirs.
//!
//! ```sh
//! moat ca init --dir ca --trust-domain example.org
//! moat ca serve --dir ca --listen 127.0.0.1:8443 &
//! moat ca bundle --dir ca > bundle.pem
//! moat ca token --dir ca --id spiffe://example.org/svid-server > server.token
//! cargo run --example svid-server -- --ca-url https://127.0.0.1:8443 \
//!     --bundle bundle.pem --token-file server.token --listen 127.0.0.1:9443
//!
//! # A client with an SVID of its own:
//! moat ca issue --dir ca --id spiffe://example.org/client --ttl 1h \
//!     --cert-out client.crt --key-out client.key
//! openssl s_client -connect 127.0.0.1:9443 -CAfile bundle.pem \
//!     -cert client.crt -key client.key -verify_return_error -brief </dev/null
//! curl -k --cert client.crt --key client.key https://127.0.0.1:9443/
//! ```
//!
//! (`curl -k`: an SVID names a SPIFFE ID, not a DNS name, so curl's host
//! name check cannot pass; `openssl s_client` above checks the chain
//! against the bundle. A SPIFFE-aware client, such as a moat sidecar's
//! `[[outbound]]` with `peer = "spiffe://example.org/svid-server"`, checks
//! the ID itself.)
//!
//! The join token works once: if the certificate expires before a renewal
//! succeeds (the CA down for half the lifetime), the program exits and
//! needs a new token.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use moat_ca::client::{Backoff, CaClient, Svid, WorkloadKey};
use moat_ca::{SpiffeId, TrustBundle};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serve mutual TLS with a certificate from `moat ca`.
#[derive(Parser, Debug, Clone)]
pub(crate) struct Args {
    /// The CA, `https://host:port`.
    #[arg(long)]
    pub ca_url: String,
    /// The trust bundle (`moat ca bundle`): verifies the CA, and the clients.
    #[arg(long)]
    pub bundle: PathBuf,
    /// A join token (`moat ca token --id ...`), used once.
    #[arg(long)]
    pub token_file: PathBuf,
    /// Where to serve HTTPS.
    #[arg(long, default_value = "127.0.0.1:9443")]
    pub listen: SocketAddr,
    /// The certificate lifetime to ask for (the CA's default if absent).
    #[arg(long, value_parser = moat_ca::parse_duration)]
    pub ttl: Option<Duration>,
    /// Only these callers get an answer (others 403); absent: any workload
    /// of the trust bundle. Repeat for several.
    #[arg(long = "allow-peer")]
    pub allow_peers: Vec<SpiffeId>,
}

/// What the accept loop serves with, replaced at each renewal.
struct Serving {
    tls: Arc<ServerConfig>,
    svid: Svid,
}

fn main() -> Result<()> {
    let args = Args::parse();
    moat_ca::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("bind {}", args.listen))?;
        eprintln!("listening on {}", listener.local_addr()?);
        run(args, listener).await
    })
}

/// Gets a certificate, then serves on `listener` and renews, until a
/// renewal fails for good or the certificate expires.
pub(crate) async fn run(args: Args, listener: TcpListener) -> Result<()> {
    let bundle_pem =
        std::fs::read(&args.bundle).with_context(|| format!("read {}", args.bundle.display()))?;
    let bundle = TrustBundle::from_pem(&bundle_pem)
        .with_context(|| format!("{}: not a trust bundle", args.bundle.display()))?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("read {}", args.token_file.display()))?;
    let mut client = CaClient::new(&args.ca_url, bundle)?.with_ttl(args.ttl);

    // The CA's current bundle, verified against the one on disk: it may
    // hold a root added since that file was written.
    let bundle = client.fetch_bundle().await?;
    client.set_bundle(bundle.clone());
    let key = WorkloadKey::generate()?;
    let svid = client.issue(&key, token.trim()).await?;

    let (publish, serving) = watch::channel(Arc::new(Serving {
        tls: server_config(&svid, &key, &bundle)?,
        svid: svid.clone(),
    }));
    let allowed = Arc::new(args.allow_peers);
    let accept = tokio::spawn(accept_loop(listener, serving, allowed));
    let renewals = keep_renewing(client, svid, key, publish);
    tokio::select! {
        done = accept => done?,
        done = renewals => done,
    }
}

/// Renews at `Svid::renew_at`, with a fresh key each time; retries with
/// backoff while the CA cannot answer, and gives up once the certificate
/// has expired (mutual TLS with the CA needs a valid one).
async fn keep_renewing(
    mut client: CaClient,
    mut svid: Svid,
    mut key: WorkloadKey,
    publish: watch::Sender<Arc<Serving>>,
) -> Result<()> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut next = svid.renew_at();
    log_svid("certificate issued", &svid, next);
    loop {
        tokio::time::sleep(next.duration_since(SystemTime::now()).unwrap_or_default()).await;
        if svid.not_after <= SystemTime::now() {
            bail!("the certificate expired before it could be renewed; a new join token is needed");
        }
        let new_key = WorkloadKey::generate()?;
        match client.renew(&svid, &key, &new_key).await {
            Ok(renewed) => {
                if let Ok(bundle) = client.fetch_bundle().await {
                    client.set_bundle(bundle);
                }
                let tls = server_config(&renewed, &new_key, client.bundle())?;
                svid = renewed;
                key = new_key;
                publish.send_replace(Arc::new(Serving {
                    tls,
                    svid: svid.clone(),
                }));
                backoff.reset();
                next = svid.renew_at();
                log_svid("certificate renewed", &svid, next);
            }
            Err(e) => {
                let wait = backoff.next_delay();
                eprintln!("renewal failed ({e}); trying again in {wait:?}");
                next = SystemTime::now() + wait;
            }
        }
    }
}

/// Accepts connections, each served with the certificate current when it
/// was accepted.
async fn accept_loop(
    listener: TcpListener,
    serving: watch::Receiver<Arc<Serving>>,
    allowed: Arc<Vec<SpiffeId>>,
) -> Result<()> {
    loop {
        let (tcp, peer_addr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let current = serving.borrow().clone();
        let allowed = allowed.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(tcp, current, allowed).await {
                eprintln!("{peer_addr}: {e:#}");
            }
        });
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    serving: Arc<Serving>,
    allowed: Arc<Vec<SpiffeId>>,
) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(serving.tls.clone());
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    // The verifier checked the chain against the bundle; the identity is
    // the leaf's one URI SAN.
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .context("no client certificate")?;
    let peer = SpiffeId::from_cert_der(leaf).context("the client certificate has no SPIFFE ID")?;
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let response = answer(&req, &peer, &serving.svid, &allowed);
        async move { Ok::<_, Infallible>(response) }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await
        .context("HTTP")
}

/// Who called, who answered, and with which certificate; 403 for a caller
/// not in `--allow-peer`.
fn answer(
    req: &Request<hyper::body::Incoming>,
    peer: &SpiffeId,
    svid: &Svid,
    allowed: &[SpiffeId],
) -> Response<Full<Bytes>> {
    if !allowed.is_empty() && !allowed.contains(peer) {
        let mut resp = Response::new(Full::new(Bytes::from(format!(
            "{} may not call this service\n",
            peer.as_str()
        ))));
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return resp;
    }
    Response::new(Full::new(Bytes::from(format!(
        "hello {}: {} {} answered by {} (certificate serial {})\n",
        peer.as_str(),
        req.method(),
        req.uri().path(),
        svid.id.as_str(),
        svid.serial
    ))))
}

/// TLS 1.3 only, a client certificate from the bundle required.
fn server_config(
    svid: &Svid,
    key: &WorkloadKey,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder(Arc::new(bundle.root_store()?)).build()?;
    let mut config = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain.clone(), key.private_key_der())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn log_svid(event: &str, svid: &Svid, renewal: SystemTime) {
    let ahead = |t: SystemTime| {
        let left = t.duration_since(SystemTime::now()).unwrap_or_default();
        Duration::from_secs(left.as_secs())
    };
    eprintln!(
        "{event}: {} serial {}, expires in {:?}, renewal in {:?}",
        svid.id.as_str(),
        svid.serial,
        ahead(svid.not_after),
        ahead(renewal)
    );
}
