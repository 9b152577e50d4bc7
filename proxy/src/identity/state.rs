//! `[identity] state_dir`: the current certificate, its key and the trust
//! bundle kept on disk, so that a restarted VM sidecar renews over mutual
//! TLS instead of needing a new join token.
//!
//! ```text
//! state_dir/        0700 (systemd StateDirectory=, StateDirectoryMode=0700)
//!   identity.pem    the private key, then the chain (0600)
//!   bundle.pem      the last trust bundle fetched from the CA (0600)
//!   revocations.json the last deny-list fetched from the CA (0600), so a
//!                   sidecar restarted while the CA is down still enforces it
//! ```
//!
//! Each file is written atomically (a temporary file, fsync, rename, fsync
//! of the directory): a crash leaves the old file or the new one, never a
//! key from one certificate beside another. The key and the chain share one
//! file for the same reason. The trade-off: the key rests on disk, readable
//! by the sidecar's user and root, until the certificate expires (an hour
//! by default); without a state directory it lives in memory only, and a
//! restart needs a new join token.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use moat_ca::TrustBundle;
use moat_ca::atomic_file::AtomicFile;
use moat_ca::client::{Svid, WorkloadKey};
use moat_ca::revocation::RevocationList;

use super::IdentityError;

const IDENTITY_FILE: &str = "identity.pem";
const BUNDLE_FILE: &str = "bundle.pem";
const REVOCATIONS_FILE: &str = "revocations.json";
/// A stored certificate this close to expiry is not worth restoring.
const MIN_LEFT: Duration = Duration::from_secs(5);

/// The state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Uses `dir`, creating it (0700) if it does not exist, and makes sure
    /// files can be written in it: a sidecar that could not store what it
    /// is issued would spend its single-use join token for nothing, and
    /// need a new one at its next restart.
    pub(crate) fn open(dir: &Path) -> Result<Self, IdentityError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| IdentityError::Read {
                path: dir.to_owned(),
                source,
            })?;
        sweep_leftovers(dir);
        let probe = dir.join(format!(".write-test-{}", std::process::id()));
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|source| IdentityError::StateDir {
                path: dir.to_owned(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The stored certificate and key, if there are any, they parse, and the
    /// certificate is still valid for a little while.
    pub(crate) fn load(&self) -> Option<(Svid, WorkloadKey)> {
        let path = self.dir.join(IDENTITY_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the stored identity; using the token");
                return None;
            }
        };
        let parsed = key_block(&text)
            .ok_or_else(|| "no private key".to_owned())
            .and_then(|key| WorkloadKey::from_pem(key).map_err(|e| e.to_string()))
            .and_then(|key| {
                Svid::from_pem(text.as_bytes())
                    .map(|svid| (svid, key))
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok((svid, key)) if svid.not_after > SystemTime::now() + MIN_LEFT => Some((svid, key)),
            Ok((svid, _)) => {
                tracing::info!(path = %path.display(), id = %svid.id.as_str(), not_after = %humantime::format_rfc3339_seconds(svid.not_after), "the stored certificate has expired; using the token");
                None
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the stored identity is unusable; using the token");
                None
            }
        }
    }

    /// The stored bundle and when it was written, if any parses.
    pub(crate) fn load_bundle(&self) -> Option<(TrustBundle, SystemTime)> {
        let path = self.bundle_path();
        let bytes = fs::read(&path).ok()?;
        let written = fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        match TrustBundle::from_pem(&bytes) {
            Ok(bundle) => Some((bundle, written)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the stored trust bundle is unusable; using the configured one");
                None
            }
        }
    }

    /// Where the bundle is stored.
    pub(crate) fn bundle_path(&self) -> PathBuf {
        self.dir.join(BUNDLE_FILE)
    }

    /// Stores the certificate and its key.
    pub(crate) fn save(&self, svid: &Svid, key: &WorkloadKey) -> std::io::Result<()> {
        let mut text = key.dangerous_private_key_pem();
        text.push_str(&svid.to_pem());
        write_atomic(&self.dir, IDENTITY_FILE, text.as_bytes())
    }

    /// Stores the bundle.
    pub(crate) fn save_bundle(&self, bundle: &TrustBundle) -> std::io::Result<()> {
        write_atomic(&self.dir, BUNDLE_FILE, bundle.to_pem().as_bytes())
    }

    /// The stored deny-list and when it was written, if any parses.
    pub(crate) fn load_revocations(&self) -> Option<(RevocationList, SystemTime)> {
        let path = self.dir.join(REVOCATIONS_FILE);
        let bytes = fs::read(&path).ok()?;
        let written = fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(list) => Some((list, written)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the stored deny-list is unusable; waiting for the CA's");
                None
            }
        }
    }

    /// Stores the deny-list.
    pub(crate) fn save_revocations(&self, list: &RevocationList) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(list).map_err(std::io::Error::other)?;
        write_atomic(&self.dir, REVOCATIONS_FILE, &bytes)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }
}

/// The PKCS#8 block of a PEM text.
fn key_block(text: &str) -> Option<&str> {
    const END: &str = "-----END PRIVATE KEY-----";
    let start = text.find("-----BEGIN PRIVATE KEY-----")?;
    let end = text[start..].find(END)? + start + END.len();
    Some(&text[start..end])
}

/// Removes what a crash in the middle of a write left: temporary files
/// (one may hold a key) and the write probe. A state directory belongs to
/// one sidecar, and this runs before it writes anything.
fn sweep_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".write-test-") || (name.starts_with('.') && name.contains(".tmp-")) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Replaces `dir/name` whole (0600): a restart after a crash reads the old
/// file or the new one, never a part.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    AtomicFile::replace(&dir.join(name), 0o600, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_are_private_and_replace_whole_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let state = StateDir::open(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(state.load().is_none());
        // What a crash left (another process's temporary file, the write
        // probe) is removed when the directory is opened again.
        for name in [".bundle.pem.tmp-1", ".write-test-1"] {
            fs::write(dir.join(name), "junk").unwrap();
        }
        StateDir::open(&dir).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        // A leftover temporary file with loose permissions is not reused.
        fs::write(
            dir.join(format!(".identity.pem.tmp-{}", std::process::id())),
            "junk",
        )
        .unwrap();
        fs::set_permissions(
            dir.join(format!(".identity.pem.tmp-{}", std::process::id())),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        write_atomic(&dir, IDENTITY_FILE, b"one").unwrap();
        write_atomic(&dir, IDENTITY_FILE, b"two").unwrap();
        assert_eq!(fs::read(dir.join(IDENTITY_FILE)).unwrap(), b"two");
        assert_eq!(
            fs::metadata(dir.join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(
            !dir.join(format!(".identity.pem.tmp-{}", std::process::id()))
                .exists()
        );
        // Garbage is refused, not trusted.
        assert!(state.load().is_none());
    }

    #[test]
    fn key_block_finds_the_key_among_certificates() {
        let text = "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            key_block(text),
            Some("-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----")
        );
        assert_eq!(key_block("nothing"), None);
    }
}
