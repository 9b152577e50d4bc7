//! One process at a time serves (or migrates) a SQLite CA: `moat ca serve`
//! holds an exclusive `flock` on `DIR/serve.lock` for its lifetime, and
//! `moat ca migrate --from-sqlite DIR` takes the same lock before it copies.
//!
//! Why: SQLite is one writer's database. A second `moat ca serve` on the
//! same directory would answer for the same CA with its own signing state
//! and metrics, and a migration while the CA still serves copies the spent
//! join tokens as they were, so a token redeemed on the old CA after the
//! copy can be redeemed again on PostgreSQL. PostgreSQL replicas share one
//! database by design and take no lock.
//!
//! The lock is advisory and released by the kernel when the process exits
//! (even on SIGKILL), so a crash leaves nothing to clean up; the file stays
//! and holds the pid of the last holder, for the message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::StoreError;

/// The lock file in the CA directory.
pub const SERVE_LOCK_FILE: &str = "serve.lock";

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct ServeLock {
    _file: File,
    path: PathBuf,
}

impl ServeLock {
    /// Takes the lock on the CA in `dir` without waiting. `doing` says what
    /// the caller is about to do, for the message when another process
    /// holds it ([`StoreError::Config`], exit 64: the operator stops the
    /// other process, a retry alone does not).
    pub fn acquire(dir: &Path, doing: &str) -> Result<Self, StoreError> {
        let path = dir.join(SERVE_LOCK_FILE);
        // 0644: the pid is no secret, and a lock file left by another user
        // (a `migrate` run as root) can still be opened to lock, read-only.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::PermissionDenied => File::open(&path),
                _ => Err(e),
            })
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let who = if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                };
                return Err(StoreError::Config(format!(
                    "cannot {doing}: a `moat ca serve`{who} is running on {} (it holds {}); stop it first",
                    dir.display(),
                    path.display()
                )));
            }
            Err(TryLockError::Error(source)) => return Err(StoreError::Io { path, source }),
        }
        // The pid is only for the message above; failing to write it
        // costs nothing but that.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::ServeLock;

    #[test]
    fn a_held_lock_is_refused_naming_the_holder_and_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let held = ServeLock::acquire(dir.path(), "serve this CA").unwrap();
        // flock belongs to the open file, so a second open in this process
        // conflicts as another process's would.
        let e = ServeLock::acquire(dir.path(), "copy it").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("cannot copy it"), "{text}");
        assert!(
            text.contains(&format!("(pid {})", std::process::id())),
            "{text}"
        );
        assert!(e.is_operator_error(), "{text}");
        drop(held);
        ServeLock::acquire(dir.path(), "serve this CA").unwrap();
    }
}
