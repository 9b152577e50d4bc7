//! The token file, watched: a token the CA refused for good (spent,
//! expired, forged) is not sent again. The proxy says once, at error
//! level, what to do, and tries again as soon as the file holds something
//! else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_ca::client::ClientError;
use tokio::sync::mpsc;

use super::IdentityError;

/// How often the file is read again when no change was announced (a
/// watch can miss changes: network file systems, a replaced directory).
const POLL: Duration = Duration::from_secs(2);

/// The token file and what the CA said about its last contents.
pub(crate) struct TokenFile {
    path: PathBuf,
    refused: Option<String>,
    events: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl TokenFile {
    /// Watches `path`'s directory (a failure to watch leaves polling).
    pub(crate) fn new(path: &Path) -> Self {
        let (tx, events) = mpsc::channel(1);
        let watcher = watch(path, tx)
            .inspect_err(|e| {
                tracing::debug!(path = %path.display(), error = %e, "token file not watched; polling it");
            })
            .ok();
        Self {
            path: path.to_owned(),
            refused: None,
            events,
            _watcher: watcher,
        }
    }

    /// The token, trimmed.
    pub(crate) fn read(&self) -> Result<String, IdentityError> {
        let bytes = std::fs::read(&self.path).map_err(|source| IdentityError::Read {
            path: self.path.clone(),
            source,
        })?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
    }

    /// True when the CA already refused exactly this token.
    pub(crate) fn is_refused(&self, token: &str) -> bool {
        self.refused.as_deref() == Some(token)
    }

    /// Remembers that the CA refused `token` for good, and says so once,
    /// with what to do.
    pub(crate) fn refuse(&mut self, token: String, err: &ClientError) {
        let file = self.path.display();
        let (status, reason, detail) = match err {
            ClientError::Refused {
                status,
                reason,
                error,
            } => (status.as_u16(), reason.clone(), error.clone()),
            other => (0, String::new(), other.to_string()),
        };
        let what = match reason.as_str() {
            "token_replayed" => format!("the join token in {file} was already used"),
            "credential_expired" => format!("the token in {file} has expired"),
            _ => format!("the CA refused the token in {file}: {detail} ({reason})"),
        };
        let subject = moat_ca::token::unverified_subject(&token);
        let todo = match subject.as_deref() {
            Some(id) if id.starts_with("spiffe://") => format!(
                "mint a new one on the CA host with `moat ca token --dir <CA directory> --id {id}` and write it to {file} \
                 (with systemd's LoadCredential=, restart the service after); the proxy picks it up as soon as it is written"
            ),
            _ => format!("waiting for {file} to change"),
        };
        tracing::error!(token_file = %file, status, reason = %reason, "{what}; {todo}. The token is not sent again.");
        self.refused = Some(token);
    }

    /// Returns when the file may have changed (an announced change, or
    /// the next poll).
    pub(crate) async fn changed(&mut self) {
        tokio::select! {
            _ = self.events.recv() => {
                // Let a burst of writes (truncate, then write) settle.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while self.events.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

fn watch(path: &Path, tx: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher, String> {
    use notify::Watcher;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let name = path.file_name().map(std::borrow::ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
            // Kubernetes swaps a symlinked directory; editors rename: any
            // change in the directory might be ours.
            && (name.is_none()
                || ev.paths.is_empty()
                || ev.paths.iter().any(|p| p.file_name() == name.as_deref())
                || ev.paths.iter().any(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("..")))
            )
        {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| e.to_string())?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(watcher)
}
