//! # moat-proxy
//!
//! moat's sidecar proxy. Inbound, it terminates mutual TLS, verifies the
//! peer's SPIFFE ID, authorizes each HTTP request per route and forwards it
//! in plaintext to the local service over loopback. Outbound, it takes the
//! local service's plaintext traffic and originates mutual TLS to the peer's
//! sidecar, checking that the peer is who it should be.
//!
//! Where to start reading: [`config`] (what an operator writes), then
//! [`Proxy::bind`] and [`Proxy::serve`]; the data path is in `inbound.rs` and
//! `outbound.rs` (what every request gets either way is in `request.rs`,
//! errors become statuses in `proxy_error.rs`), identity in [`identity`] and
//! [`tls`].
//!
//! Modules that only this crate uses are private; the public ones are those
//! the `moat` binary, the tests, benches and examples reach into.

mod admin;
pub mod app;
mod authz;
mod body;
pub mod config;
mod conn;
mod conn_registry;
mod drain;
mod expect;
#[cfg(test)]
mod future_size;
mod head_checks;
mod head_limits;
mod headers;
pub mod identity;
mod inbound;
mod outbound;
pub mod policy;
pub mod probe;
mod process;
mod proxy_error;
pub mod redirect;
mod request;
pub mod revocation;
pub mod telemetry;
pub mod tls;
pub mod transparent;
mod upgrade;
mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

// The types in `Proxy`'s own signatures, at the root as rustls does; their
// module paths stay public too.
pub use crate::config::Config;
pub use crate::telemetry::Observability;
pub use crate::tls::CredentialStore;

use crate::config::Identity;
use crate::tls::TlsFactory;

/// Errors that stop the proxy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener could not be bound.
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
    /// The identity could not be set up.
    #[error("identity: {0}")]
    Identity(#[from] identity::IdentityError),
    /// A route policy could not be used.
    #[error("inbound {listener}: policy {path}: {message}")]
    Policy {
        /// The inbound listener.
        listener: String,
        /// The policy file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// An upstream address cannot be used as an HTTP authority.
    #[error("outbound {0}: upstream {1} is not a valid authority")]
    Upstream(String, String),
    /// The app probes `moat inject` put in the environment cannot be used.
    #[error("app probes: {0}")]
    AppProbes(String),
    /// A signal handler could not be installed.
    #[error("cannot install a signal handler: {0}")]
    Signal(std::io::Error),
}

/// A proxy with every listener bound, not yet serving.
pub struct Proxy {
    config: Config,
    store: Arc<CredentialStore>,
    addrs: Vec<(String, SocketAddr)>,
    identity: IdentityTask,
    reloader: Reloader,
    jwks: Option<Arc<policy::JwksCache>>,
    admin: admin::AdminListener,
    inbound: Vec<conn::Listener<inbound::InboundService>>,
    outbound: Vec<conn::Listener<outbound::OutboundService>>,
    transparent: Option<conn::Listener<transparent::TransparentInbound>>,
    transparent_out: Vec<conn::Listener<Arc<transparent::TransparentOutbound>>>,
    destinations: Option<Arc<transparent::DestinationTable>>,
    draining: Arc<AtomicBool>,
    connections: Arc<conn_registry::ConnRegistry>,
}

/// What SIGHUP re-reads: identity files (or the CA's bundle), route
/// policies, and each inbound listener's `allow_peers`.
#[derive(Clone)]
pub struct Reloader {
    identity: Arc<Notify>,
    policies: Vec<Arc<policy::PolicyWatcher>>,
    /// The configuration file, for `allow_peers`.
    config: std::path::PathBuf,
    /// Each inbound listener's replaceable `allow_peers`, by name.
    allow_peers: Vec<(String, conn_registry::AllowPeers)>,
    connections: Arc<conn_registry::ConnRegistry>,
}

enum IdentityTask {
    Ca(Box<identity::CaSource>),
    Files(identity::FileSource),
}

impl Proxy {
    /// Sets up identity and binds every listener (each logs `listening`
    /// with its bound address). Files are read here, so a bad bundle or
    /// certificate stops the start before any traffic is taken.
    pub async fn bind(config: Config, obs: Observability) -> Result<Self, Error> {
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let store = Arc::new(CredentialStore::with_revocations(Arc::new(
            revocation::RevocationState::new(obs.metrics.revocation.clone()),
        )));
        let (identity, reload) = match &config.identity {
            Identity::Ca(ca) => {
                let src = identity::CaSource::new(ca.clone(), store.clone())?
                    .with_metrics(obs.metrics.clone());
                let reload = src.refresh_handle();
                (IdentityTask::Ca(Box::new(src)), reload)
            }
            Identity::Files(files) => {
                let src = identity::FileSource::new(files.clone(), store.clone())?;
                let reload = src.reload_handle();
                (IdentityTask::Files(src), reload)
            }
        };
        let tls = TlsFactory::new(store.clone(), config.tls.allow_tls12);
        let draining = Arc::new(AtomicBool::new(false));
        // The app's rewritten kubelet probes, before any port is bound.
        let app_probes = probe::AppProbes::from_env().map_err(Error::AppProbes)?;
        if !app_probes.is_empty() {
            tracing::info!(
                probes = app_probes.len(),
                "serving the app's kubelet probes on the admin port"
            );
        }
        // Route policies first: a bad one stops the start before any port is bound.
        let mut jwks = None;
        let mut policies = Vec::new();
        let mut authorizers = Vec::new();
        for l in &config.inbound {
            let Some(path) = &l.policy else {
                authorizers.push(authz::Authorizer::AllowAll);
                continue;
            };
            let policy_err = |message: String| Error::Policy {
                listener: l.name.clone(),
                path: path.display().to_string(),
                message,
            };
            let cache = jwks.get_or_insert_with(policy::JwksCache::new).clone();
            let mut watcher = policy::PolicyWatcher::load(&l.name, path, cache)
                .map_err(|e| policy_err(e.to_string()))?;
            watcher
                .watch()
                .map_err(|e| policy_err(format!("cannot watch for changes: {e}")))?;
            let current = watcher.current();
            tracing::info!(listener = %l.name, policy = %path.display(), hash = %current.hash(), routes = current.route_count(), "route policy loaded");
            authorizers.push(authz::Authorizer::Policy(watcher.handle()));
            policies.push(Arc::new(watcher));
        }
        let policy_handles: Vec<_> = authorizers
            .iter()
            .filter_map(|a| match a {
                authz::Authorizer::Policy(p) => Some(p.clone()),
                authz::Authorizer::AllowAll => None,
            })
            .collect();
        let mut addrs = Vec::new();
        let policy_listeners = config
            .inbound
            .iter()
            .filter(|l| l.policy.is_some())
            .map(|l| l.name.clone())
            .zip(policy_handles)
            .zip(
                policies
                    .iter()
                    .map(|w: &Arc<policy::PolicyWatcher>| w.stats()),
            )
            .map(|((name, policy), stats)| admin::PolicyView {
                name,
                policy,
                stats,
            })
            .collect();
        let (admin, addr) = admin::AdminListener::bind(
            config.admin.listen,
            store.clone(),
            policy_listeners,
            jwks.clone(),
            draining.clone(),
            obs.clone(),
        )
        .await?;
        let mut admin = admin.with_app_probes(app_probes);
        addrs.push(("admin".to_owned(), addr));
        let mut inbound = Vec::new();
        for (l, authz) in config.inbound.iter().zip(authorizers) {
            let (listener, addr) =
                inbound::InboundService::bind(l, &config.limits, &tls, authz, &obs).await?;
            addrs.push((l.name.clone(), addr));
            inbound.push(listener);
        }
        let transparent_metrics = config
            .redirect
            .as_ref()
            .map(|_| transparent::TransparentMetrics::register(&obs.metrics));
        let transparent = match (&config.redirect, &transparent_metrics) {
            (Some(r), Some(metrics))
                if r.inbound_ports != redirect::InboundPorts::Listed(Vec::new()) =>
            {
                // Each redirected connection goes to the inbound listener
                // that forwards to its original port on loopback.
                let by_port = config
                    .inbound
                    .iter()
                    .zip(&inbound)
                    .filter(|(l, _)| l.forward.ip().is_loopback())
                    .map(|(l, listener)| {
                        let target = transparent::inbound::PortTarget {
                            service: listener.shared(),
                            forward: l.forward,
                        };
                        (l.forward.port(), target)
                    })
                    .collect();
                let settings = transparent::inbound::InboundSettings {
                    mode: r.mode,
                    opaque_ports: r.opaque_ports.clone(),
                    detection_timeout: r.detection_timeout,
                };
                let (listener, addr) = transparent::TransparentInbound::bind(
                    r.inbound_listener_port,
                    by_port,
                    settings,
                    &config.limits,
                    metrics.clone(),
                )
                .await?;
                addrs.push((transparent::INBOUND_NAME.to_owned(), addr));
                Some(listener)
            }
            _ => None,
        };
        let mut transparent_out = Vec::new();
        let mut destinations = None;
        if let (Some(r), Some(metrics)) = (&config.redirect, &transparent_metrics)
            && r.outbound
        {
            let table = Arc::new(transparent::DestinationTable::new(
                &config.destination,
                r.dns_refresh,
            ));
            table.resolve_all().await;
            let bound =
                transparent::TransparentOutbound::bind(transparent::outbound::OutboundParts {
                    redirect: r,
                    table: table.clone(),
                    limits: &config.limits,
                    tls: &tls,
                    store: store.clone(),
                    obs: &obs,
                    metrics: metrics.clone(),
                })
                .await?;
            for (listener, addr) in bound {
                let name = match addr.ip() {
                    std::net::IpAddr::V4(_) => transparent::OUTBOUND_NAME.to_owned(),
                    std::net::IpAddr::V6(_) => format!("{}-v6", transparent::OUTBOUND_NAME),
                };
                addrs.push((name, addr));
                transparent_out.push(listener);
            }
            destinations = Some(table);
        }
        if let (Some(r), Some(table)) = (&config.redirect, &destinations)
            && r.unmatched == transparent::Unmatched::Passthrough
        {
            // A host that has never resolved matches nothing: its traffic
            // follows `unmatched`, here plaintext instead of mutual TLS, so
            // the proxy is not ready until it resolves. (With `deny` that
            // traffic is refused, not exposed: logged, and ready.)
            let (unmatched, table) = (r.unmatched, table.clone());
            admin.add_readiness(Arc::new(move || {
                let e = table.unresolved().next()?;
                Some(format!(
                    "[[destination]] {}: host {} has not resolved yet; until it does, its traffic is not enforced (unmatched = {})",
                    e.name,
                    e.config.host.as_deref().unwrap_or_default(),
                    unmatched.as_str(),
                ))
            }));
        }
        if let Some(r) = &config.redirect {
            let (r, table) = (r.clone(), destinations.clone());
            admin.add_view(
                "/transparent",
                Arc::new(move || transparent::admin_view(&r, table.as_deref())),
            );
        }
        let mut outbound = Vec::new();
        for l in &config.outbound {
            let (listener, addr) =
                outbound::OutboundService::bind(l, &config.limits, &tls, store.clone(), &obs)
                    .await?;
            addrs.push((l.name.clone(), addr));
            outbound.push(listener);
        }
        let reloader = Reloader {
            identity: reload,
            policies,
            config: config.source.clone(),
            allow_peers: config
                .inbound
                .iter()
                .zip(&inbound)
                .map(|(l, listener)| (l.name.clone(), listener.shared().allow_peers()))
                .collect(),
            connections: tls.connections().clone(),
        };
        Ok(Self {
            config,
            store,
            addrs,
            identity,
            reloader,
            jwks,
            admin,
            inbound,
            outbound,
            transparent,
            transparent_out,
            destinations,
            draining,
            connections: tls.connections().clone(),
        })
    }

    /// The bound address of the listener `name` (`admin` or a listener name).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }

    /// The credential store (for the current identity).
    pub fn credentials(&self) -> Arc<CredentialStore> {
        self.store.clone()
    }

    /// What SIGHUP does: re-read identity files (file mode) or refresh the
    /// bundle from the CA (CA mode), and re-read route policies.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, lets
    /// in-flight requests finish within `[limits] shutdown_grace`, returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let (signal, watch) = drain::channel();
        let mut background = Vec::new();
        background.push(tokio::spawn(self.admin.serve()));
        background.push(tokio::spawn(self.connections.clone().run()));
        match self.identity {
            IdentityTask::Ca(src) => background.push(tokio::spawn(src.run())),
            IdentityTask::Files(src) => background.push(tokio::spawn(src.run())),
        }
        // The sidecar's own trust domain is known once its identity is:
        // from the files at once, from the CA after the first issuance.
        if !self.config.outbound.is_empty() || !self.config.destination.is_empty() {
            let store = self.store.clone();
            let (outbound, destinations) = (
                self.config.outbound.clone(),
                self.config.destination.clone(),
            );
            background.push(tokio::spawn(async move {
                store.ready().await;
                if let Some(own) = store.current() {
                    outbound::warn_foreign_peers(&outbound, &destinations, &own.trust_domain);
                }
            }));
        }
        if let Some(cache) = self.jwks {
            background.push(tokio::spawn(async move {
                cache.fetch_all().await;
                cache.run_refresh().await;
            }));
        }
        // Inbound listeners were bound in `bind` (so a taken port stops the
        // start) but accept only once an identity is held: before that every
        // handshake would fail, and be counted against the peer. Until then
        // connections wait in the listen backlog and are served once the
        // first certificate arrives.
        let accepts_peers = !self.inbound.is_empty() || self.transparent.is_some();
        if !self.store.is_ready() && accepts_peers {
            tracing::info!("inbound listeners accept once the first certificate is held");
        }
        let once_ready = |serve: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
            let store = self.store.clone();
            let watch = watch.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = store.ready() => serve.await,
                    () = watch.signaled() => {}
                }
            });
        };
        for l in self.inbound {
            once_ready(Box::pin(l.serve(watch.clone())));
        }
        if let Some(l) = self.transparent {
            once_ready(Box::pin(l.serve(watch.clone())));
        }
        for l in self.outbound {
            tokio::spawn(l.serve(watch.clone()));
        }
        for l in self.transparent_out {
            tokio::spawn(l.serve(watch.clone()));
        }
        if let Some(table) = self.destinations {
            background.push(tokio::spawn(table.run_refresh()));
        }
        drop(watch);
        shutdown.await;
        self.draining.store(true, Ordering::Relaxed);
        let grace = self.config.limits.shutdown_grace;
        // Each listener holds a watch too: naming the count `open` read as
        // open connections where there were none.
        tracing::info!(grace = ?grace, listeners_and_connections = signal.watchers(), "draining");
        match tokio::time::timeout(grace, signal.drain()).await {
            Ok(()) => tracing::info!("drained"),
            Err(_) => tracing::warn!("shutdown grace expired; closing what is still open"),
        }
        for task in background {
            task.abort();
        }
        // The policy watchers stop with the reloader's last reference.
        drop(self.reloader);
        Ok(())
    }
}

impl Reloader {
    /// Re-reads everything that can change without a restart.
    pub fn reload(&self) {
        self.identity.notify_one();
        for p in &self.policies {
            // The watcher logs and counts a refused reload itself.
            let _outcome = p.reload();
        }
        self.reload_allow_peers();
    }

    /// Applies the configuration file's `allow_peers` to the listeners of
    /// the same name: new handshakes at once, and open connections of peers
    /// it no longer lists are closed (reason `policy`). Other changes to
    /// the file need a restart; an unreadable file changes nothing.
    fn reload_allow_peers(&self) {
        if self.allow_peers.is_empty() || self.config.as_os_str().is_empty() {
            return;
        }
        let fresh = match config::Config::load(&self.config) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "configuration reload refused; allow_peers unchanged");
                return;
            }
        };
        let mut changed = false;
        for l in &fresh.inbound {
            let Some((_, allow)) = self.allow_peers.iter().find(|(n, _)| *n == l.name) else {
                continue;
            };
            if **allow.load() != l.allow_peers {
                tracing::info!(listener = %l.name, allow_peers = %l.allow_peers_text(), "allow_peers reloaded");
                allow.store(Arc::new(l.allow_peers.clone()));
                changed = true;
            }
        }
        if changed {
            self.connections.policy_changed();
        }
    }
}

/// Runs the proxy until SIGTERM/SIGINT, reloading identity files on SIGHUP,
/// with metrics but no trace export (see [`run_with`]).
pub async fn run(config: Config) -> Result<(), Error> {
    run_with(config, Observability::default()).await
}

/// Runs the proxy with the given telemetry (metrics, whether spans are
/// exported, the log-level handle).
pub async fn run_with(config: Config, obs: Observability) -> Result<(), Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(Error::Signal)?;
    let proxy = Proxy::bind(config, obs).await?;
    let reloader = proxy.reloader();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading identity and route policies");
            reloader.reload();
        }
    });
    proxy
        .serve(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        })
        .await
}
