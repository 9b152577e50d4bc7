//! Files replaced atomically: the CA's `ca issue` outputs and the sidecar's
//! `state_dir` both write through [`AtomicFile`], so a reader (or a restart
//! after a crash) sees the old file or the new one, never a part.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A file that replaces `path` atomically: created as a new file beside it
/// (with its mode from the start), written, synced, then renamed over
/// `path` and the directory synced. Dropped before [`AtomicFile::commit`],
/// it removes itself.
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: fs::File,
}

impl AtomicFile {
    /// Creates the temporary file `.NAME.tmp-PID` beside `path` with
    /// `mode`, proving that `path` can be written: its directory exists and
    /// is writable, and `path` is not a directory. The process id keeps two
    /// processes writing one path apart; a file of the same name is one a
    /// crash left (in a container every restart has the same id) and is
    /// removed first, as it may have other permissions.
    pub fn create(path: &Path, mode: u32) -> std::io::Result<Self> {
        if path.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "it is a directory",
            ));
        }
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("not a file name"))?;
        let tmp = parent(path).join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        Ok(Self {
            path: path.to_owned(),
            tmp,
            file,
        })
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)
    }

    /// Syncs the file, renames it over the path and syncs the directory
    /// (the rename is durable once the directory is).
    pub fn commit(self) -> std::io::Result<()> {
        self.file.sync_all()?;
        fs::rename(&self.tmp, &self.path)?;
        fs::File::open(parent(&self.path))?.sync_all()
    }

    /// Replaces `path` with `bytes` (mode `mode`) in one call.
    pub fn replace(path: &Path, mode: u32, bytes: &[u8]) -> std::io::Result<()> {
        let mut file = Self::create(path, mode)?;
        file.write(bytes)?;
        file.commit()
    }

    /// The path this file replaces.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // After a commit the temporary name is gone and this finds nothing.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// The directory `path` is in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_files_with_the_mode_asked_for() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("key.pem");
        // A leftover temporary file with loose permissions is not reused.
        let leftover = tmp
            .path()
            .join(format!(".key.pem.tmp-{}", std::process::id()));
        fs::write(&leftover, "junk").unwrap();
        fs::set_permissions(&leftover, fs::Permissions::from_mode(0o644)).unwrap();
        AtomicFile::replace(&path, 0o600, b"one").unwrap();
        AtomicFile::replace(&path, 0o600, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn dropped_before_commit_leaves_the_old_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("cert.pem");
        fs::write(&path, "old").unwrap();
        let mut file = AtomicFile::create(&path, 0o644).unwrap();
        file.write(b"new").unwrap();
        drop(file);
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn refuses_a_directory_and_a_missing_one() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            AtomicFile::create(tmp.path(), 0o600).unwrap_err().kind(),
            std::io::ErrorKind::IsADirectory
        );
        assert_eq!(
            AtomicFile::create(&tmp.path().join("no/such/file"), 0o600)
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::NotFound
        );
    }
}
