//! Getting and keeping this workload's credentials.
//!
//! - From the CA ([`CaSource`]): the key is made in memory, the first
//!   certificate is got with the token, renewed over mutual TLS at about half
//!   its lifetime (with jitter, and backoff while the CA is down), and the
//!   trust bundle is fetched again periodically so a CA rotation reaches the
//!   proxy without a restart.
//! - From files ([`FileSource`]): cert, key and bundle are read at start and
//!   again when they change (or on SIGHUP); a broken set is logged and the
//!   old credentials stay.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moat_ca::TrustBundle;
use moat_ca::client::{Backoff, CaClient, Svid, WorkloadKey, renew_at};
use tokio::sync::{Notify, mpsc};

use crate::config::{CaIdentity, FileIdentity};
use crate::telemetry::ProxyMetrics;
use crate::tls::{CredentialStore, Credentials};

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file's contents are unusable.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The set does not fit together.
    #[error(transparent)]
    Credentials(#[from] crate::tls::CredentialError),
    /// The CA client could not be built.
    #[error("CA client: {0}")]
    Client(#[from] moat_ca::client::ClientError),
    /// The file watcher could not be started.
    #[error("cannot watch identity files: {0}")]
    Watch(String),
}

/// Credentials from the moat CA.
pub struct CaSource {
    config: CaIdentity,
    store: Arc<CredentialStore>,
    client: CaClient,
    refresh_now: Arc<Notify>,
    metrics: ProxyMetrics,
}

/// Credentials from files managed elsewhere.
pub struct FileSource {
    config: FileIdentity,
    store: Arc<CredentialStore>,
    reload_now: Arc<Notify>,
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_bundle(path: &Path) -> Result<TrustBundle, IdentityError> {
    TrustBundle::from_pem(&read(path)?).map_err(|e| IdentityError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// When to renew: about half-way through the part of the lifetime still
/// ahead. The CA backdates `not_before` for clock skew, which would
/// otherwise pull a short-lived certificate's renewal into the past.
fn next_renewal(svid: &Svid) -> SystemTime {
    let start = svid.not_before.max(SystemTime::now());
    renew_at(start, svid.not_after.max(start))
}

fn log_credentials(event: &'static str, svid: &Svid) {
    let expires = humantime::format_rfc3339_seconds(svid.not_after);
    tracing::info!(id = %svid.id.as_str(), serial = %svid.serial, not_after = %expires, "{event}");
}

impl CaSource {
    /// Checks the bundle file and builds the CA client (before any port is bound).
    pub fn new(config: CaIdentity, store: Arc<CredentialStore>) -> Result<Self, IdentityError> {
        let bundle = read_bundle(&config.bundle)?;
        let client = CaClient::new(&config.ca_url, bundle)?
            .with_timeout(Duration::from_secs(10))
            .with_ttl(config.ttl);
        Ok(Self {
            config,
            store,
            client,
            refresh_now: Arc::new(Notify::new()),
            metrics: ProxyMetrics::default(),
        })
    }

    /// Counts renewals in `metrics`.
    pub fn with_metrics(mut self, metrics: ProxyMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Notified on SIGHUP: fetch the bundle again at once.
    pub fn refresh_handle(&self) -> Arc<Notify> {
        self.refresh_now.clone()
    }

    /// Runs forever: first certificate, then renewals and bundle refreshes.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.retry_base, self.config.retry_max);
        let mut bundle = self.client.bundle().clone();
        // The first certificate: retry until the CA answers.
        let (mut svid, mut key) = loop {
            if let Ok(fresh) = self.client.fetch_bundle().await {
                bundle = fresh;
                self.client.set_bundle(bundle.clone());
            }
            match self.issue(&bundle).await {
                Ok(pair) => break pair,
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot get a certificate from the CA yet");
                    tokio::time::sleep(wait).await;
                }
            }
        };
        backoff.reset();
        let mut next_refresh = tokio::time::Instant::now() + self.config.bundle_refresh;
        let mut renew_at_time = next_renewal(&svid);
        loop {
            let until_renew = renew_at_time
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(until_renew) => {
                    match self.renew(&svid, &key, &bundle).await {
                        Ok((s, k)) => {
                            self.metrics.renewals.get_or_create(&[("result", "ok")]).inc();
                            svid = s;
                            key = k;
                            backoff.reset();
                            renew_at_time = next_renewal(&svid);
                        }
                        Err(e) => {
                            self.metrics.renewals.get_or_create(&[("result", "failed")]).inc();
                            let wait = backoff.next_delay();
                            tracing::warn!(error = %e, retry_in = ?wait, not_after = %humantime::format_rfc3339_seconds(svid.not_after), "renewal failed; serving with the current certificate");
                            renew_at_time = SystemTime::now() + wait;
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_refresh) => {
                    self.refresh_bundle(&mut bundle).await;
                    next_refresh = tokio::time::Instant::now() + self.config.bundle_refresh;
                }
                _ = self.refresh_now.notified() => {
                    self.refresh_bundle(&mut bundle).await;
                }
            }
        }
    }

    async fn issue(&self, bundle: &TrustBundle) -> Result<(Svid, WorkloadKey), IdentityError> {
        let token = read(&self.config.token_file)?;
        let token = String::from_utf8_lossy(&token).trim().to_owned();
        let key = WorkloadKey::generate()?;
        let svid = self.client.issue(&key, &token).await?;
        let creds = Credentials::new(svid.clone(), key.private_key_der(), bundle.clone())?;
        self.store.publish(creds);
        log_credentials("certificate issued", &svid);
        Ok((svid, key))
    }

    async fn renew(
        &self,
        current: &Svid,
        current_key: &WorkloadKey,
        bundle: &TrustBundle,
    ) -> Result<(Svid, WorkloadKey), IdentityError> {
        if current.not_after <= SystemTime::now() {
            // Too late for mutual TLS with the old certificate: start over
            // with the token (works for Kubernetes tokens, which are reusable).
            tracing::warn!("the certificate has expired; asking for a new one with the token");
            return self.issue(bundle).await;
        }
        let new_key = WorkloadKey::generate()?;
        let svid = self.client.renew(current, current_key, &new_key).await?;
        let creds = Credentials::new(svid.clone(), new_key.private_key_der(), bundle.clone())?;
        self.store.publish(creds);
        log_credentials("certificate renewed", &svid);
        Ok((svid, new_key))
    }

    async fn refresh_bundle(&mut self, bundle: &mut TrustBundle) {
        let fresh = match self.client.fetch_bundle().await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh the trust bundle; keeping the current one");
                return;
            }
        };
        if &fresh == bundle {
            return;
        }
        let Some(current) = self.store.current() else {
            return;
        };
        match current.with_bundle(fresh.clone()) {
            Ok(creds) => {
                self.store.publish(creds);
                self.client.set_bundle(fresh.clone());
                *bundle = fresh;
                tracing::info!(roots = bundle.roots().len(), "trust bundle updated");
            }
            Err(e) => tracing::warn!(error = %e, "refusing the CA's new trust bundle"),
        }
    }
}

impl FileSource {
    /// Loads the files once (an error here stops the start) and publishes them.
    pub fn new(config: FileIdentity, store: Arc<CredentialStore>) -> Result<Self, IdentityError> {
        let creds = load_files(&config)?;
        log_credentials("certificate loaded", &creds.svid);
        store.publish(creds);
        Ok(Self {
            config,
            store,
            reload_now: Arc::new(Notify::new()),
        })
    }

    /// Notified on SIGHUP: read the files again at once.
    pub fn reload_handle(&self) -> Arc<Notify> {
        self.reload_now.clone()
    }

    /// Watches the files' directories and reloads on change (and on
    /// SIGHUP), forever. If the directories cannot be watched, SIGHUP still works.
    pub async fn run(self) {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let _watcher = match self.watch(tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "identity files are not watched; only SIGHUP reloads them");
                None
            }
        };
        let mut loaded = self.fingerprint();
        loop {
            tokio::select! {
                Some(()) = rx.recv() => {
                    // Let a burst of writes (cert, then key) settle.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = self.reload_now.notified() => {}
            }
            let now = self.fingerprint();
            if now == loaded {
                continue;
            }
            match load_files(&self.config) {
                Ok(creds) => {
                    log_credentials("certificate reloaded", &creds.svid);
                    self.store.publish(creds);
                    loaded = now;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "identity files changed but are unusable; keeping the current credentials");
                    // Try again at the next change even if it restores these very bytes.
                    loaded = now;
                }
            }
        }
    }

    fn watch(&self, tx: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher, IdentityError> {
        use notify::Watcher;
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && !matches!(ev.kind, notify::EventKind::Access(_))
            {
                let _ = tx.try_send(());
            }
        })
        .map_err(|e| IdentityError::Watch(e.to_string()))?;
        // Watch directories, not files: Kubernetes swaps a symlink to update
        // a secret, and editors replace files by rename.
        let mut dirs: Vec<PathBuf> = [&self.config.cert, &self.config.key, &self.config.bundle]
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        for dir in &dirs {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .map_err(|e| IdentityError::Watch(format!("{}: {e}", dir.display())))?;
        }
        Ok(watcher)
    }

    /// The files' contents, to tell a real change from a touch.
    fn fingerprint(&self) -> Vec<Vec<u8>> {
        [&self.config.cert, &self.config.key, &self.config.bundle]
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_default())
            .collect()
    }
}

fn load_files(config: &FileIdentity) -> Result<Credentials, IdentityError> {
    let cert = read(&config.cert)?;
    let svid = Svid::from_pem(&cert).map_err(|e| IdentityError::Invalid {
        path: config.cert.clone(),
        message: e.to_string(),
    })?;
    let key_pem = read(&config.key)?;
    let key = WorkloadKey::from_pem(&String::from_utf8_lossy(&key_pem)).map_err(|e| {
        IdentityError::Invalid {
            path: config.key.clone(),
            message: e.to_string(),
        }
    })?;
    let bundle = read_bundle(&config.bundle)?;
    Ok(Credentials::new(svid, key.private_key_der(), bundle)?)
}
