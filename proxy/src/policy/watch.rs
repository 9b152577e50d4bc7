//! Hot reload: keep the current policy in an `ArcSwap`, replace it when the
//! file changes and the new content is valid, keep it when not.
//!
//! The watcher watches the file's *directory* (not the file), so editors
//! that write a temporary file and rename it over the original, and
//! Kubernetes ConfigMap volumes that swap a `..data` symlink, are seen. Every
//! event in the directory triggers a re-read; an unchanged content hash is a
//! no-op, so unrelated files cost one read.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};

use super::{JwksCache, Policy, PolicyError};

/// How long to wait after an event for more (an editor's save is several).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Reload counters, for metrics and the admin view.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Reloads that replaced the policy.
    pub ok: AtomicU64,
    /// Reloads refused because the new content was invalid (or unreadable).
    /// The same invalid content seen again (several events for one save) is
    /// counted once.
    pub failed: AtomicU64,
    /// When the file was last found valid and in force (Unix seconds): the
    /// first load, a reload that applied, or a re-read that found the file
    /// back to the running policy.
    last_success_unix: AtomicU64,
    /// The last refusal's first diagnostic, cleared by the next good load.
    last_error: Mutex<Option<String>>,
    /// Hash of the last refused content, to count and log it once.
    last_refused: Mutex<Option<String>>,
}

impl ReloadStats {
    /// The last refusal's first `file:line:column: message`, if the last
    /// reload attempt was refused.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("reload stats").clone()
    }

    /// True when the last reload attempt was refused (the running policy is
    /// older than the file).
    pub fn failing(&self) -> bool {
        self.last_error.lock().expect("reload stats").is_some()
    }

    /// When the file was last found valid and in force, as Unix seconds.
    pub fn last_success_unix(&self) -> u64 {
        self.last_success_unix.load(Ordering::Relaxed)
    }

    /// The file is valid and in force: forget the last refusal.
    fn succeeded(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_success_unix.store(now, Ordering::Relaxed);
        *self.last_error.lock().expect("reload stats") = None;
        *self.last_refused.lock().expect("reload stats") = None;
    }
}

/// The current policy of a running proxy, reloaded from its file.
pub struct PolicyWatcher {
    /// The listener it authorizes for, named on every reload line (several
    /// listeners may share one file, each with its own watcher).
    listener: Arc<str>,
    path: PathBuf,
    current: Arc<ArcSwap<Policy>>,
    cache: Arc<JwksCache>,
    stats: Arc<ReloadStats>,
    /// Keeps the OS watch alive; `None` until [`PolicyWatcher::watch`].
    _watcher: Option<notify::RecommendedWatcher>,
}

/// What [`PolicyWatcher::reload`] did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The content is unchanged (same hash): nothing to do.
    Unchanged,
    /// The new policy is in place.
    Applied {
        /// Hash of the new policy.
        hash: String,
    },
    /// The new content is invalid; the last good policy stays.
    Refused(PolicyError),
}

impl PolicyWatcher {
    /// Loads the policy at `path` for the listener `listener` (an error
    /// here is a start-up configuration error), binding its issuers to
    /// `cache`. Does not watch yet.
    pub fn load(listener: &str, path: &Path, cache: Arc<JwksCache>) -> Result<Self, PolicyError> {
        let policy = Policy::load_with(path, &cache)?;
        let stats = Arc::new(ReloadStats::default());
        stats.succeeded();
        Ok(Self {
            listener: listener.into(),
            path: path.to_path_buf(),
            current: Arc::new(ArcSwap::from_pointee(policy)),
            cache,
            stats,
            _watcher: None,
        })
    }

    /// The shared handle the request path reads the current policy from
    /// (`handle.load()` per request; never blocks).
    pub fn handle(&self) -> Arc<ArcSwap<Policy>> {
        self.current.clone()
    }

    /// The current policy.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// The reload counters.
    pub fn stats(&self) -> Arc<ReloadStats> {
        self.stats.clone()
    }

    /// The key cache the policy's issuers are bound to.
    pub fn jwks(&self) -> &Arc<JwksCache> {
        &self.cache
    }

    /// Re-reads the file now: swaps in the new policy if it is valid and
    /// different, otherwise logs every diagnostic, counts a failure and keeps
    /// the current one.
    pub fn reload(&self) -> ReloadOutcome {
        reload(
            &self.listener,
            &self.path,
            &self.current,
            &self.cache,
            &self.stats,
        )
    }

    /// Starts watching the file's directory; changes are applied from a
    /// background thread until the watcher is dropped.
    pub fn watch(&mut self) -> Result<(), notify::Error> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        let (listener, path, current, cache, stats) = (
            self.listener.clone(),
            self.path.clone(),
            self.current.clone(),
            self.cache.clone(),
            self.stats.clone(),
        );
        std::thread::Builder::new()
            .name("moat-policy-watch".into())
            .spawn(move || {
                // Ends when the watcher (and so the sender) is dropped.
                while rx.recv().is_ok() {
                    std::thread::sleep(DEBOUNCE);
                    while rx.try_recv().is_ok() {}
                    reload(&listener, &path, &current, &cache, &stats);
                }
            })
            .map_err(notify::Error::io)?;
        self._watcher = Some(watcher);
        Ok(())
    }
}

fn reload(
    listener: &str,
    path: &Path,
    current: &ArcSwap<Policy>,
    cache: &JwksCache,
    stats: &ReloadStats,
) -> ReloadOutcome {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(source) => {
            // A ConfigMap swap can briefly leave no file: refuse, keep the last good.
            let e = PolicyError::Read {
                file: path.to_path_buf(),
                source,
            };
            return refuse(listener, e, "(unreadable)".into(), current, stats);
        }
    };
    let content_hash = super::file::short_hash(text.as_bytes());
    if content_hash == current.load().hash() {
        // The file is back to the running policy (a bad edit undone): the
        // refusal no longer describes the file.
        if stats.failing() {
            stats.succeeded();
            tracing::info!(target: "moat::policy", listener, file = %path.display(), policy_hash = %content_hash, "policy file restored to the running policy");
        }
        return ReloadOutcome::Unchanged;
    }
    match Policy::parse(path, &text, cache) {
        Ok(policy) => {
            let hash = policy.hash().to_owned();
            let old = current.load().hash().to_owned();
            current.store(Arc::new(policy));
            stats.ok.fetch_add(1, Ordering::Relaxed);
            stats.succeeded();
            tracing::info!(target: "moat::policy", listener, file = %path.display(), policy_hash = %hash, previous_hash = %old, "policy reloaded");
            ReloadOutcome::Applied { hash }
        }
        Err(e) => refuse(listener, e, content_hash, current, stats),
    }
}

fn refuse(
    listener: &str,
    e: PolicyError,
    content_hash: String,
    current: &ArcSwap<Policy>,
    stats: &ReloadStats,
) -> ReloadOutcome {
    let mut last = stats.last_refused.lock().expect("reload stats");
    if last.as_deref() == Some(content_hash.as_str()) {
        return ReloadOutcome::Refused(e);
    }
    *last = Some(content_hash);
    drop(last);
    stats.failed.fetch_add(1, Ordering::Relaxed);
    *stats.last_error.lock().expect("reload stats") =
        e.diagnostics().first().map(ToString::to_string);
    for d in e.diagnostics() {
        tracing::error!(
            target: "moat::policy",
            listener,
            error = %d,
            kept_hash = %current.load().hash(),
            "policy reload refused; keeping the last good policy"
        );
    }
    ReloadOutcome::Refused(e)
}

impl std::fmt::Debug for PolicyWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyWatcher")
            .field("listener", &self.listener)
            .field("path", &self.path)
            .field("hash", &self.current.load().hash())
            .finish()
    }
}
