//! Getting and keeping this workload's credentials.
//!
//! - From the CA ([`CaSource`]): the key is made in memory, the first
//!   certificate is got with the token, renewed over mutual TLS at about half
//!   its lifetime (with jitter, and backoff while the CA is down; several CA
//!   URLs are tried in turn), and the trust bundle is fetched again
//!   periodically so a CA rotation reaches the proxy without a restart. With
//!   `state_dir` the certificate and key also go to disk (`state`), and a
//!   restart renews from them. A token the CA refused for good is not sent
//!   again until the file changes (`token`). Over the same mutual TLS it
//!   polls the CA's deny-list every few seconds ([`crate::revocation`]).
//! - From files ([`FileSource`]): cert, key and bundle are read at start and
//!   again when they change (or on SIGHUP); a broken set is logged and the
//!   old credentials stay. An optional `deny_list` file (the CA's deny-list
//!   JSON, copied by whatever copies the certificates) is enforced the same
//!   way as the CA's; a broken one is logged and the last good one stays.

mod state;
mod token;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moat_ca::TrustBundle;
use moat_ca::client::{Backoff, CaEndpoints, ClientError, Svid, WorkloadKey};
use tokio::sync::{Notify, mpsc};

use self::state::StateDir;
use self::token::TokenFile;

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
    /// `[identity] state_dir` is not writable (found before any token is spent).
    #[error("{path}: cannot write in the state directory: {source}")]
    StateDir {
        /// The directory.
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
    client: CaEndpoints,
    refresh_now: Arc<Notify>,
    metrics: ProxyMetrics,
    state: Option<StateDir>,
    /// The last deny-list poll failed (logged once per outage).
    revocations_failing: bool,
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

/// The bundle to start with, of the configured file and the one a previous
/// run stored in `state_dir`: the newer by modification time. The stored
/// one has followed the CA's rotations since the file was installed; a file
/// written since (an operator repairing a sidecar by hand) is newer and
/// wins. Logged either way, since the other one is silently not used.
fn choose_bundle(
    configured_path: &Path,
    configured: TrustBundle,
    configured_at: Option<SystemTime>,
    stored: Option<(TrustBundle, SystemTime, PathBuf)>,
) -> TrustBundle {
    let Some((stored, stored_at, stored_path)) = stored else {
        tracing::info!(path = %configured_path.display(), roots = configured.roots().len(), "trust bundle: the configured file (none stored in state_dir)");
        return configured;
    };
    let at = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if configured_at.is_some_and(|c| c > stored_at) {
        tracing::info!(
            path = %configured_path.display(),
            roots = configured.roots().len(),
            modified = %configured_at.map(at).unwrap_or_default(),
            not_used = %stored_path.display(),
            not_used_modified = %at(stored_at),
            "trust bundle: the configured file, newer than the one stored in state_dir"
        );
        configured
    } else {
        tracing::info!(
            path = %stored_path.display(),
            roots = stored.roots().len(),
            modified = %at(stored_at),
            not_used = %configured_path.display(),
            not_used_modified = %configured_at.map(at).unwrap_or_default(),
            "trust bundle: the one stored in state_dir (the CA's last), not older than the configured file"
        );
        stored
    }
}

fn log_credentials(event: &'static str, svid: &Svid) {
    let expires = humantime::format_rfc3339_seconds(svid.not_after);
    tracing::info!(id = %svid.id.as_str(), serial = %svid.serial, not_after = %expires, "{event}");
}

impl CaSource {
    /// Checks the bundle file and the state directory and builds the CA
    /// clients (before any port is bound).
    pub fn new(config: CaIdentity, store: Arc<CredentialStore>) -> Result<Self, IdentityError> {
        let configured = read_bundle(&config.bundle)?;
        let state = config
            .state_dir
            .as_deref()
            .map(StateDir::open)
            .transpose()?;
        let configured_at = std::fs::metadata(&config.bundle)
            .and_then(|m| m.modified())
            .ok();
        let stored = state
            .as_ref()
            .and_then(|s| s.load_bundle().map(|(b, at)| (b, at, s.bundle_path())));
        let bundle = choose_bundle(&config.bundle, configured, configured_at, stored);
        let client =
            CaEndpoints::new(&config.ca_urls, bundle, config.retry_base, config.retry_max)?
                .with_timeout(Duration::from_secs(10))
                .with_ttl(config.ttl);
        Ok(Self {
            config,
            store,
            client,
            refresh_now: Arc::new(Notify::new()),
            metrics: ProxyMetrics::default(),
            state,
            revocations_failing: false,
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

    /// Runs forever: a first certificate (from the state directory, else
    /// with the token), then renewals and bundle refreshes; a certificate
    /// that expires before it could be renewed sends it back to the token.
    pub async fn run(mut self) {
        let mut token = TokenFile::new(&self.config.token_file);
        let mut bundle = self.client.bundle().clone();
        let mut restored = self.restore(&bundle);
        self.restore_revocations();
        loop {
            let (mut svid, mut key) = match restored.take() {
                Some(pair) => pair,
                None => self.acquire(&mut token, &mut bundle).await,
            };
            let mut backoff = Backoff::new(self.config.retry_base, self.config.retry_max);
            let mut next_refresh = tokio::time::Instant::now() + self.config.bundle_refresh;
            let mut renew_at_time = svid.renew_at();
            let mut next_revocations = tokio::time::Instant::now();
            loop {
                let until_renew = renew_at_time
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::select! {
                    () = tokio::time::sleep(until_renew) => {
                        if svid.not_after <= SystemTime::now() {
                            // Too late for mutual TLS with the old certificate:
                            // start over with the token (Kubernetes tokens are
                            // reusable; a spent join token is reported once).
                            tracing::warn!("the certificate has expired; asking for a new one with the token");
                            break;
                        }
                        match self.renew(&svid, &key, &bundle).await {
                            Ok((s, k)) => {
                                self.metrics.renewals.get_or_create(&[("result", "ok")]).inc();
                                svid = s;
                                key = k;
                                backoff.reset();
                                renew_at_time = svid.renew_at();
                            }
                            Err(e) => {
                                self.metrics.renewals.get_or_create(&[("result", "failed")]).inc();
                                let wait = backoff.next_delay();
                                tracing::warn!(error = %e, retry_in = ?wait, not_after = %humantime::format_rfc3339_seconds(svid.not_after), "renewal failed; serving with the current certificate");
                                renew_at_time = SystemTime::now() + wait;
                            }
                        }
                    }
                    () = tokio::time::sleep_until(next_refresh) => {
                        self.refresh_bundle(&mut bundle).await;
                        next_refresh = tokio::time::Instant::now() + self.config.bundle_refresh;
                    }
                    () = self.refresh_now.notified() => {
                        self.refresh_bundle(&mut bundle).await;
                    }
                    () = tokio::time::sleep_until(next_revocations) => {
                        self.refresh_revocations(&svid, &key).await;
                        next_revocations = tokio::time::Instant::now() + crate::revocation::POLL_INTERVAL;
                    }
                }
            }
        }
    }

    /// The certificate and key a previous run stored, if still valid and
    /// usable with `bundle`; published at once.
    fn restore(&self, bundle: &TrustBundle) -> Option<(Svid, WorkloadKey)> {
        let state = self.state.as_ref()?;
        let (svid, key) = state.load()?;
        match Credentials::new(svid.clone(), key.private_key_der(), bundle.clone()) {
            Ok(creds) => {
                self.store.publish(creds);
                log_credentials("certificate restored from the state directory", &svid);
                Some((svid, key))
            }
            Err(e) => {
                tracing::warn!(state_dir = %state.path().display(), error = %e, "the stored certificate is unusable; using the token");
                None
            }
        }
    }

    /// A first certificate with the token: retried with backoff while the
    /// CA cannot answer; a token it refuses is not sent again, and the next
    /// try waits for the file to change.
    async fn acquire(
        &mut self,
        token_file: &mut TokenFile,
        bundle: &mut TrustBundle,
    ) -> (Svid, WorkloadKey) {
        let mut backoff = Backoff::new(self.config.retry_base, self.config.retry_max);
        loop {
            let token = match token_file.read() {
                // Not written yet, or not all of it: wait as for a missing
                // file, without sending what would be refused.
                Ok(None) => {
                    token_file.changed().await;
                    continue;
                }
                Ok(Some(token)) if token_file.is_refused(&token) => {
                    token_file.changed().await;
                    continue;
                }
                Ok(Some(token)) => token,
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot read the token");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = token_file.changed() => {}
                    }
                    continue;
                }
            };
            if let Ok(fresh) = self.client.fetch_bundle().await {
                *bundle = fresh;
                self.client.set_bundle(bundle.clone());
                self.save_bundle(bundle);
            }
            match self.issue(&token, bundle).await {
                Ok(pair) => return pair,
                Err(IdentityError::Client(e @ ClientError::Refused { .. }))
                    if !e.is_retryable() =>
                {
                    token_file.refuse(token, &e);
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot get a certificate from the CA yet");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn issue(
        &mut self,
        token: &str,
        bundle: &TrustBundle,
    ) -> Result<(Svid, WorkloadKey), IdentityError> {
        let key = WorkloadKey::generate()?;
        let svid = self.client.issue(&key, token).await?;
        let creds = Credentials::new(svid.clone(), key.private_key_der(), bundle.clone())?;
        self.store.publish(creds);
        log_credentials("certificate issued", &svid);
        self.save(&svid, &key);
        Ok((svid, key))
    }

    async fn renew(
        &mut self,
        current: &Svid,
        current_key: &WorkloadKey,
        bundle: &TrustBundle,
    ) -> Result<(Svid, WorkloadKey), IdentityError> {
        let new_key = WorkloadKey::generate()?;
        let svid = self.client.renew(current, current_key, &new_key).await?;
        let creds = Credentials::new(svid.clone(), new_key.private_key_der(), bundle.clone())?;
        self.store.publish(creds);
        log_credentials("certificate renewed", &svid);
        self.save(&svid, &new_key);
        Ok((svid, new_key))
    }

    fn save(&self, svid: &Svid, key: &WorkloadKey) {
        if let Some(state) = &self.state
            && let Err(e) = state.save(svid, key)
        {
            tracing::warn!(state_dir = %state.path().display(), error = %e, "cannot store the certificate; a restart will need a new token");
        }
    }

    fn save_bundle(&self, bundle: &TrustBundle) {
        if let Some(state) = &self.state
            && let Err(e) = state.save_bundle(bundle)
        {
            tracing::warn!(state_dir = %state.path().display(), error = %e, "cannot store the trust bundle");
        }
    }

    /// The deny-list a previous run stored: in force until the CA answers
    /// (its age counts from when it was stored).
    fn restore_revocations(&self) {
        let Some((list, written)) = self.state.as_ref().and_then(StateDir::load_revocations) else {
            return;
        };
        let state = self.store.revocations();
        state.publish(&list);
        let at = written
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        state.checked(at);
        state.update_age();
        tracing::info!(
            version = list.version,
            "deny-list restored from the state directory"
        );
    }

    /// Asks the CA whether the deny-list changed; publishes a new one. A
    /// failure keeps the current list (its age grows) and is logged once
    /// until the CA answers again.
    async fn refresh_revocations(&mut self, svid: &Svid, key: &WorkloadKey) {
        let state = self.store.revocations().clone();
        let since = state.current().version();
        match self.client.fetch_revocations(svid, key, since).await {
            Ok(fetched) => {
                match fetched {
                    Some(list) => {
                        state.publish(&list);
                        if let Some(dir) = &self.state
                            && let Err(e) = dir.save_revocations(&list)
                        {
                            tracing::warn!(state_dir = %dir.path().display(), error = %e, "cannot store the deny-list");
                        }
                    }
                    None => state.checked(crate::revocation::unix_now()),
                }
                if std::mem::take(&mut self.revocations_failing) {
                    tracing::info!("the CA answers again: the deny-list is current");
                }
            }
            Err(e) => {
                state.check_failed();
                if !self.revocations_failing {
                    self.revocations_failing = true;
                    // `version` is left out before the first list (None).
                    tracing::warn!(error = %e, version = since, "cannot fetch the deny-list from the CA; enforcing the last one until it answers (see moat_revocation_list_age_seconds)");
                }
            }
        }
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
                self.save_bundle(bundle);
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
        if let Some(path) = &config.deny_list {
            publish_deny_list(&store, path)?;
        }
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
        let mut loaded_deny = self.deny_list_fingerprint();
        let mut again = false;
        loop {
            if !std::mem::take(&mut again) {
                tokio::select! {
                    Some(()) = rx.recv() => settle(&mut rx).await,
                    () = self.reload_now.notified() => {}
                }
            }
            if let Some(path) = &self.config.deny_list {
                let now = self.deny_list_fingerprint();
                if now != loaded_deny {
                    loaded_deny = now;
                    if let Err(e) = publish_deny_list(&self.store, path) {
                        tracing::warn!(error = %e, "deny-list file changed but is unusable; enforcing the last good one");
                    }
                }
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
                // Half a rotation: a new certificate beside the old key, or
                // the reverse, as when `moat ca issue --force` or a timer
                // replaces the two files one after the other. Wait for the
                // other file; only if it does not come is this a problem.
                Err(IdentityError::Credentials(crate::tls::CredentialError::Key(_)))
                    if {
                        tracing::info!(
                            wait = ?PAIR_SETTLE,
                            "identity files changed but certificate and key do not fit yet; waiting for the other file"
                        );
                        matches!(
                            tokio::time::timeout(PAIR_SETTLE, rx.recv()).await,
                            Ok(Some(()))
                        )
                    } =>
                {
                    settle(&mut rx).await;
                    again = true;
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
            .into_iter()
            .chain(&self.config.deny_list)
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

    /// The deny-list file's contents (kept apart from the credentials':
    /// a new list alone must not reload the certificate).
    fn deny_list_fingerprint(&self) -> Vec<u8> {
        self.config
            .deny_list
            .as_ref()
            .map(|p| std::fs::read(p).unwrap_or_default())
            .unwrap_or_default()
    }
}

/// Reads the deny-list file at `path` and enforces it. Its age (in
/// `/identity` and `moat_revocation_list_age_seconds`) counts from the
/// file's modification time: how stale the copy is.
fn publish_deny_list(store: &CredentialStore, path: &Path) -> Result<(), IdentityError> {
    use moat_ca::revocation::{MAX_BODY, MAX_ENTRIES, RevocationList};
    let invalid = |message: String| IdentityError::Invalid {
        path: path.to_owned(),
        message,
    };
    let bytes = read(path)?;
    if bytes.len() > MAX_BODY {
        return Err(invalid(format!("deny-list larger than {MAX_BODY} bytes")));
    }
    let list: RevocationList = serde_json::from_slice(&bytes).map_err(|e| {
        invalid(format!(
            "not a deny-list (the JSON of `moat ca revoke --list --json`): {e}"
        ))
    })?;
    if list.entries.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "{} entries, more than the {MAX_ENTRIES} a sidecar accepts",
            list.entries.len()
        )));
    }
    let state = store.revocations();
    state.publish(&list);
    if let Some(at) = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
    {
        state.checked(at.as_secs() as i64);
        state.update_age();
    }
    Ok(())
}

/// How long a certificate and a key that do not fit may wait for the other
/// file of a rotation to be replaced before the pair is reported unusable.
const PAIR_SETTLE: Duration = Duration::from_secs(5);

/// Lets a burst of writes (a certificate, then its key) settle.
async fn settle(rx: &mut mpsc::Receiver<()>) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    while rx.try_recv().is_ok() {}
}

fn load_files(config: &FileIdentity) -> Result<Credentials, IdentityError> {
    let cert = read(&config.cert)?;
    let svid = Svid::from_pem(&cert).map_err(|e| IdentityError::Invalid {
        path: config.cert.clone(),
        message: e.to_string(),
    })?;
    // The first private key in the file (PKCS#8, PKCS#1 or SEC1), so that
    // `key` may name the same file as `cert` (`moat ca issue --out`).
    use rustls_pki_types::pem::PemObject;
    let key_pem = read(&config.key)?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        IdentityError::Invalid {
            path: config.key.clone(),
            message: match e {
                rustls_pki_types::pem::Error::NoItemsFound => {
                    "no private key (PEM) in the file".to_owned()
                }
                e => format!("not a PEM private key: {e}"),
            },
        }
    })?;
    let bundle = read_bundle(&config.bundle)?;
    Credentials::new(svid, key, bundle).map_err(|e| match e {
        // Name the files: which of the two is stale is for the operator to see.
        crate::tls::CredentialError::Key(why) => {
            IdentityError::Credentials(crate::tls::CredentialError::Key(format!(
                "key {}, certificate {}: {why}",
                config.key.display(),
                config.cert.display()
            )))
        }
        e => e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(roots: usize) -> TrustBundle {
        let td = moat_ca::TrustDomain::parse("example.org").unwrap();
        let ders = (0..roots)
            .map(|i| {
                moat_ca::issuer::RootCa::generate(&td, i as i64 + 1, Duration::from_secs(3600))
                    .unwrap()
                    .cert_der()
                    .clone()
            })
            .collect();
        TrustBundle::new(ders).unwrap()
    }

    /// The operator who just wrote a fixed bundle file wins over the stale
    /// stored one; otherwise the CA's last fetch (stored) wins.
    #[test]
    fn the_newer_of_the_configured_and_stored_bundles_is_used() {
        moat_ca::install_crypto_provider();
        let (file, stored) = (bundle(2), bundle(1));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = t0 + Duration::from_secs(60);
        let path = Path::new("/etc/moat/bundle.pem");
        let stored_at = |t| Some((stored.clone(), t, PathBuf::from("/var/lib/moat/bundle.pem")));
        assert_eq!(
            choose_bundle(path, file.clone(), Some(later), stored_at(t0)),
            file,
            "a file written after the last fetch wins"
        );
        assert_eq!(
            choose_bundle(path, file.clone(), Some(t0), stored_at(later)),
            stored,
            "a fetch after the file was installed wins"
        );
        assert_eq!(
            choose_bundle(path, file.clone(), Some(t0), stored_at(t0)),
            stored
        );
        assert_eq!(choose_bundle(path, file.clone(), Some(t0), None), file);
    }
}
