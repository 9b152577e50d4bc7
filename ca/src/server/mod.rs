//! The CA's HTTPS API.
//!
//! - `GET /v1/bundle`: the trust bundle (PEM), every root currently trusted.
//! - `POST /v1/certs`: a PEM or DER CSR with `Authorization: Bearer <token>`
//!   (a join token or a Kubernetes service-account token) → the PEM chain.
//! - `POST /v1/renew`: a CSR over mutual TLS with a current workload
//!   certificate → a new certificate for the same SPIFFE ID.
//!
//! - `GET /v1/revocations?since=V`: over mutual TLS with a current workload
//!   certificate, the deny-list as JSON (`{"version": V, "entries": [...]}`,
//!   each entry a `serial` or an identity with its `expires` time); `304`
//!   when the list is still at version `V`. Sidecars poll it every few
//!   seconds (see `moat_proxy::identity`).
//!
//! Both issuing endpoints take an optional `?ttl=30m` query (capped by the
//! configured maximum). A revoked certificate or identity is refused with
//! 403 and reason `revoked`, whether it renews or redeems a token. Errors are JSON `{"error": "...", "reason": "..."}`.
//! The serving certificate is issued by the oldest root in the bundle (the
//! retiring one during a rotation, which every client still trusts, even
//! one that missed `--prepare`) and re-issued when a rotation step changes
//! the roots: after `--retire` it comes from the new root, so clients that
//! trust only the new bundle keep reaching the CA.
//!
//! No TLS session is ever resumed (no session cache, no tickets): every
//! connection presents its certificate in a full handshake. `/v1/renew`
//! does not rely on that alone: it checks the presented certificate again
//! itself (`handlers::renewal_identity`), so no TLS setting can let a lapsed
//! certificate renew.
//!
//! Where things are: [`config`](ServerConfig) is `ca.toml`; `handlers`
//! routes each request and maps refusals to status codes and reason codes;
//! `signing` builds the signing state (active root, bundle, serving
//! certificate); `refresh` polls the store to keep it and the deny-list
//! current; this file binds, serves connections and shuts down.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::HandshakeKind;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;

use crate::listen::Acceptor;
use crate::metrics::CaMetrics;
use crate::store::{CaDir, StoreError};
use crate::token::{JwksSource, KubernetesVerifier};

mod config;
mod handlers;
mod refresh;
mod signing;

pub use config::{IssuanceConfig, KubernetesConfig, Limits, ServerConfig};

use refresh::{Revocations, load_revocations, refresh_loop};
use signing::{SigningSnapshot, build_snapshot};

/// A bound CA server, ready to [`run`](CaServer::run).
pub struct CaServer {
    listener: TcpListener,
    admin: Option<TcpListener>,
    state: Arc<ServerState>,
}

/// Errors that stop the CA server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Bad configuration (exit 64).
    #[error("{0}")]
    Config(String),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Building the TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// What every connection, request handler and the refresh loop share: one
/// per server, behind an `Arc`. What changes at run time (signing state,
/// deny-list) is swapped whole, so a request reads one consistent version.
struct ServerState {
    ca: CaDir,
    config: ServerConfig,
    /// Verifies Kubernetes service-account tokens; `None` without `[kubernetes]`.
    kubernetes: Option<KubernetesVerifier>,
    /// The names the serving certificate is issued for (`--san`).
    sans: Vec<String>,
    snapshot: ArcSwap<SigningSnapshot>,
    revocations: ArcSwap<Revocations>,
    metrics: Arc<CaMetrics>,
}

impl CaServer {
    /// Loads the signing state, verifies the Kubernetes JWKS if configured,
    /// and binds the listener. Logs `listening` with the bound address.
    pub async fn bind(
        ca: CaDir,
        config: ServerConfig,
        listen: SocketAddr,
        sans: Vec<String>,
    ) -> Result<Self, ServerError> {
        let kubernetes = match &config.kubernetes {
            None => None,
            Some(k) => {
                let source = match (&k.jwks_file, &k.jwks_url, &k.jwks_ca) {
                    (Some(file), _, _) => JwksSource::File(file.clone()),
                    (None, Some(url), Some(ca)) => JwksSource::Url {
                        url: url.clone(),
                        ca_file: ca.clone(),
                        token_file: k.jwks_token_file.clone(),
                    },
                    _ => return Err(ServerError::Config("kubernetes: no JWKS source".into())),
                };
                let verifier =
                    KubernetesVerifier::new(k.audience.clone(), k.issuer.clone(), source)
                        .await
                        .map_err(|e| ServerError::Config(format!("kubernetes: {e}")))?;
                Some(verifier)
            }
        };
        let state = ca.signing_state().await?;
        let records = state.roots.clone();
        let snapshot = build_snapshot(state, &sans)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
        tracing::info!(
            listener = "ca",
            %addr,
            trust_domain = %ca.trust_domain(),
            kubernetes = kubernetes.is_some(),
            "listening"
        );
        let metrics = Arc::new(CaMetrics::new());
        metrics.roots(&records);
        let revocations = load_revocations(&ca).await?;
        Ok(Self {
            listener,
            admin: None,
            state: Arc::new(ServerState {
                metrics,
                ca,
                config,
                kubernetes,
                sans,
                snapshot: ArcSwap::from_pointee(snapshot),
                revocations: ArcSwap::from_pointee(revocations),
            }),
        })
    }

    /// Binds the plain-HTTP admin listener (`/metrics`, `/live`, `/ready`).
    pub async fn bind_admin(&mut self, addr: SocketAddr) -> Result<SocketAddr, ServerError> {
        let listener = crate::metrics::bind_admin(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        self.admin = Some(listener);
        Ok(bound)
    }

    /// The CA's metrics.
    pub fn metrics(&self) -> Arc<CaMetrics> {
        self.state.metrics.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish
    /// (up to the request timeout). At most `[limits] max_connections` are
    /// served at once; more wait in the listen backlog.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let refresher = tokio::spawn(refresh_loop(self.state.clone()));
        let admin = self.admin.map(|listener| {
            tokio::spawn(crate::metrics::serve_admin(
                listener,
                self.state.metrics.clone(),
            ))
        });
        let api = Acceptor::new(
            self.listener,
            "ca",
            self.state.config.limits.max_connections,
        );
        let open = api.open();
        let state = self.state.clone();
        // The accept loop runs as a task on a worker thread, not in the
        // caller's future (`moat ca serve` runs this in `block_on`, on a
        // thread of its own): a connection spawned from a worker waits in
        // that worker's queue and is usually served by it, where one spawned
        // from outside goes through the shared queue and wakes a parked
        // worker, and the accepting thread itself had to be woken by the
        // worker that polled the listener. Measured on a PostgreSQL replica
        // under the renewals bench: context switches per renewal 1.4-1.6 ->
        // 0.9-1.4, futex calls 0.85-0.95 -> 0.35-0.55
        // (benches/results/criterion.md).
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut accepting = tokio::spawn(api.run(
            async move {
                let _ = stopped.await;
            },
            move |tcp, peer| serve_connection(state.clone(), tcp, peer),
        ));
        tokio::select! {
            () = shutdown => {
                let _ = stop.send(());
                let _ = accepting.await;
            }
            _ = &mut accepting => {}
        }
        tracing::info!(
            open = open.count(),
            "shutting down; finishing in-flight requests"
        );
        refresher.abort();
        if let Some(admin) = admin {
            admin.abort();
        }
        let grace = self.state.config.limits.request_timeout;
        let _ = tokio::time::timeout(grace, open.closed()).await;
        Ok(())
    }
}

/// One connection: the TLS handshake (within the handshake timeout), then
/// HTTP/1.1 without keep-alive, each request within the request timeout.
async fn serve_connection(state: Arc<ServerState>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let limits = state.config.limits.clone();
    let snapshot = state.snapshot.load_full();
    let acceptor = tokio_rustls::TlsAcceptor::from(snapshot.tls.clone());
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // Kept whole for `/v1/renew`, which checks it itself, with what this
    // full handshake verified (the chain, by `snapshot`'s verifier).
    let session = tls.get_ref().1;
    let certs: Vec<CertificateDer<'static>> = session
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let full = matches!(
        session.handshake_kind(),
        Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest)
    );
    let client_chain = Arc::new(handlers::PeerChain {
        verified_by: (full && !certs.is_empty()).then_some(snapshot),
        certs,
    });
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let client_chain = client_chain.clone();
        async move {
            let response = handlers::serve_request(&state, req, &client_chain, peer).await;
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .keep_alive(false)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
