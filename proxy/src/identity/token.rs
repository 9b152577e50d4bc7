//! The token file, watched: a token the CA refused for good (spent,
//! expired, forged) is not sent again. The proxy says once, at error
//! level, what to do, and tries again as soon as the file holds something
//! else. A file that holds no whole token yet (empty, as `moat ca token >
//! file` leaves it for a moment, or a token still being written) is waited
//! on like a missing one, never sent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_ca::client::ClientError;
use tokio::sync::mpsc;

use super::IdentityError;

/// How often the file is read again when no change was announced (a
/// watch can miss changes: network file systems, a replaced directory).
const POLL: Duration = Duration::from_secs(2);

/// What the token file holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Contents {
    /// A whole token (a JWT: three dot-separated parts, the first a JSON
    /// header), trimmed.
    Token(String),
    /// Nothing yet: empty or whitespace, as a shell's `> file` leaves it
    /// until the command writing the token has run.
    Empty,
    /// Something that is not a whole token: the start of one still being
    /// written, or not a token at all.
    Partial,
}

/// The token file and what the CA said about its last contents.
pub(crate) struct TokenFile {
    path: PathBuf,
    refused: Option<String>,
    /// What the last read found that could not be sent, said once until
    /// the file holds something else.
    waiting: Option<Contents>,
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
            waiting: None,
            events,
            _watcher: watcher,
        }
    }

    /// The token, trimmed, or `None` when the file does not hold a whole
    /// one yet (said once, at info level): it is never sent to the CA
    /// then, where it would be refused and counted as a refusal.
    pub(crate) fn read(&mut self) -> Result<Option<String>, IdentityError> {
        let bytes = std::fs::read(&self.path).map_err(|source| IdentityError::Read {
            path: self.path.clone(),
            source,
        })?;
        let contents = classify(&String::from_utf8_lossy(&bytes));
        if let Contents::Token(token) = contents {
            self.waiting = None;
            return Ok(Some(token));
        }
        if self.waiting.as_ref() != Some(&contents) {
            let file = self.path.display();
            match contents {
                Contents::Empty => tracing::info!(
                    token_file = %file,
                    "the token file is empty; waiting for a token to be written to it"
                ),
                _ => tracing::info!(
                    token_file = %file,
                    bytes = bytes.len(),
                    "the token file does not hold a whole token (a JWT: three dot-separated parts); \
                     waiting for it to change. Write tokens atomically: `moat ca token ... > FILE.tmp && mv FILE.tmp FILE`"
                ),
            }
            self.waiting = Some(contents);
        }
        Ok(None)
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

/// What `text` is: a token worth sending, nothing, or part of one. Join
/// tokens and Kubernetes service-account tokens are both JWTs in compact
/// form; a prefix of one cut inside its header or payload lacks a part,
/// and one cut inside the header does not decode. (A prefix cut inside
/// the signature looks whole: the CA refuses it as invalid. `moat ca
/// token` writes the token and its newline in one `write`, so only a
/// writer that splits its writes can leave one.)
fn classify(text: &str) -> Contents {
    use base64::Engine;
    let token = text.trim();
    if token.is_empty() {
        return Contents::Empty;
    }
    let parts: Vec<&str> = token.split('.').collect();
    let whole = parts.len() == 3
        && parts.iter().all(|p| !p.is_empty())
        && base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[0].trim_end_matches('='))
            .ok()
            .and_then(|h: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&h).ok())
            .is_some_and(|h| h.is_object());
    if whole {
        Contents::Token(token.to_owned())
    } else {
        Contents::Partial
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

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "eyJhbGciOiJFUzI1NiIsImtpZCI6Im1vYXQifQ.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy92bS9hIn0.c2lnbmF0dXJl";

    #[test]
    fn nothing_or_part_of_a_token_is_not_a_token() {
        assert_eq!(classify(""), Contents::Empty);
        assert_eq!(classify(" \n\t"), Contents::Empty);
        for cut in [5, 20, 38, 39, 60] {
            assert_eq!(
                classify(&TOKEN[..cut]),
                Contents::Partial,
                "{}",
                &TOKEN[..cut]
            );
        }
        assert_eq!(
            classify("a.b.c"),
            Contents::Partial,
            "a header that is not JSON"
        );
        assert_eq!(classify("not a token"), Contents::Partial);
    }

    #[test]
    fn a_whole_token_is_trimmed() {
        assert_eq!(
            classify(&format!("{TOKEN}\n")),
            Contents::Token(TOKEN.into())
        );
        assert_eq!(classify(TOKEN), Contents::Token(TOKEN.into()));
    }
}
