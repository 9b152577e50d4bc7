//! The CA directory: root keys on disk, state in SQLite.
//!
//! ```text
//! DIR/            0700
//!   ca.db         SQLite: trust domain, roots and their rotation state,
//!                 issued certificates, used join-token IDs
//!   roots/N.crt   root certificate N (PEM)
//!   roots/N.key   root key N (PEM, 0600)
//!   token.key     join-token signing key (PEM, 0600)
//! ```
//!
//! A root is in one of four states. `active` signs and is in the bundle;
//! `prepared` is in the bundle but does not sign yet; `retiring` no longer
//! signs but is still in the bundle; `retired` is gone from the bundle.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};

use crate::client::{Svid, WorkloadKey};
use crate::identity::{SpiffeId, TrustBundle, TrustDomain};
use crate::issuer::{IssueError, Issued, RootCa, ValidatedCsr};
use crate::token::{CredentialKind, JoinTokenKey, TokenError};

const DB_FILE: &str = "ca.db";
const TOKEN_KEY_FILE: &str = "token.key";
const ROOTS_DIR: &str = "roots";

/// A root's place in a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootState {
    /// Signs new certificates; in the bundle.
    Active,
    /// In the bundle, not signing yet (after `rotate --prepare`).
    Prepared,
    /// No longer signs; still in the bundle (after `rotate --activate`).
    Retiring,
    /// Gone from the bundle (after `rotate --retire`).
    Retired,
}

/// One root as the store records it.
#[derive(Debug, Clone)]
pub struct RootRecord {
    /// The root's generation number.
    pub id: i64,
    /// Its rotation state.
    pub state: RootState,
    /// When it expires, seconds since the epoch.
    pub not_after: i64,
}

/// An opened CA directory.
pub struct CaDir {
    dir: PathBuf,
    td: TrustDomain,
    db: Mutex<Connection>,
    token_key: JoinTokenKey,
}

/// Errors from the CA directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `init` found an existing CA.
    #[error("{0} already holds a CA; refusing to overwrite it")]
    AlreadyInitialized(PathBuf),
    /// `open` found no CA.
    #[error("{0} holds no CA; create one with `moat ca init --dir {0}`")]
    NotInitialized(PathBuf),
    /// A rotation step is not possible in the current state.
    #[error("cannot {step}: {why}")]
    Rotation {
        /// The step asked for.
        step: &'static str,
        /// Why not.
        why: String,
    },
    /// A requested identity or lifetime is not allowed.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// Token minting failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The SQLite database failed (including a full disk).
    #[error("CA state database {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// A file in the CA directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The directory's contents are inconsistent.
    #[error("CA directory is inconsistent: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// True for mistakes an operator makes (exit 64), as opposed to failures.
    pub fn is_operator_error(&self) -> bool {
        matches!(
            self,
            StoreError::AlreadyInitialized(_)
                | StoreError::NotInitialized(_)
                | StoreError::Rotation { .. }
                | StoreError::Issue(IssueError::BadTtl(_) | IssueError::WrongTrustDomain { .. })
                | StoreError::Token(TokenError::WrongTrustDomain(_) | TokenError::Invalid(_))
        )
    }

    /// True when the database refused a write because the disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            StoreError::Db { source: rusqlite::Error::SqliteFailure(e, _), .. }
                if e.code == rusqlite::ErrorCode::DiskFull
        )
    }
}

impl RootState {
    fn as_str(self) -> &'static str {
        match self {
            RootState::Active => "active",
            RootState::Prepared => "prepared",
            RootState::Retiring => "retiring",
            RootState::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "active" => RootState::Active,
            "prepared" => RootState::Prepared,
            "retiring" => RootState::Retiring,
            "retired" => RootState::Retired,
            other => return Err(StoreError::Corrupt(format!("unknown root state {other:?}"))),
        })
    }

    /// True when roots in this state belong in the trust bundle.
    pub fn in_bundle(self) -> bool {
        !matches!(self, RootState::Retired)
    }
}

impl CaDir {
    /// Creates a new CA in `dir`: a root, a token key and the state store.
    /// Refuses to touch a directory that already holds a CA.
    pub fn init(dir: &Path, td: TrustDomain, root_ttl: Duration) -> Result<Self, StoreError> {
        if dir.join(DB_FILE).exists() || dir.join(TOKEN_KEY_FILE).exists() {
            return Err(StoreError::AlreadyInitialized(dir.to_owned()));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(ROOTS_DIR))
            .map_err(|source| io_err(dir, source))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| io_err(dir, source))?;

        let (token_key, token_pem) = JoinTokenKey::generate()?;
        write_secret(&dir.join(TOKEN_KEY_FILE), token_pem.as_bytes())?;

        let db_path = dir.join(DB_FILE);
        let conn = open_db(&db_path)?;
        conn.execute_batch(SCHEMA)
            .map_err(|source| db_err(&db_path, source))?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('trust_domain', ?1)",
            params![td.as_str()],
        )
        .map_err(|source| db_err(&db_path, source))?;
        fs::set_permissions(&db_path, fs::Permissions::from_mode(0o600))
            .map_err(|source| io_err(&db_path, source))?;

        let ca = Self {
            dir: dir.to_owned(),
            td,
            db: Mutex::new(conn),
            token_key,
        };
        ca.add_root(RootState::Active, root_ttl)?;
        Ok(ca)
    }

    /// Opens an existing CA directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db_path = dir.join(DB_FILE);
        if !db_path.exists() {
            return Err(StoreError::NotInitialized(dir.to_owned()));
        }
        let conn = open_db(&db_path)?;
        let td: String = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'trust_domain'",
                [],
                |r| r.get(0),
            )
            .map_err(|source| db_err(&db_path, source))?;
        let td = TrustDomain::parse(&td)
            .map_err(|e| StoreError::Corrupt(format!("trust domain: {e}")))?;
        let token_path = dir.join(TOKEN_KEY_FILE);
        let token_pem =
            fs::read_to_string(&token_path).map_err(|source| io_err(&token_path, source))?;
        let token_key = JoinTokenKey::from_pem(&token_pem)?;
        Ok(Self {
            dir: dir.to_owned(),
            td,
            db: Mutex::new(conn),
            token_key,
        })
    }

    /// The CA's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The join-token key.
    pub fn token_key(&self) -> &JoinTokenKey {
        &self.token_key
    }

    /// Every root the store knows, oldest first.
    pub fn roots(&self) -> Result<Vec<RootRecord>, StoreError> {
        self.with_db(|db| {
            let mut stmt = db.prepare("SELECT id, state, not_after FROM roots ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        })?
        .into_iter()
        .map(|(id, state, not_after)| {
            Ok(RootRecord {
                id,
                state: RootState::parse(&state)?,
                not_after,
            })
        })
        .collect()
    }

    /// The trust bundle: every root that is not retired.
    pub fn bundle(&self) -> Result<TrustBundle, StoreError> {
        let mut ders = Vec::new();
        for root in self.roots()?.iter().filter(|r| r.state.in_bundle()) {
            let path = self.root_path(root.id, "crt");
            let pem = fs::read(&path).map_err(|source| io_err(&path, source))?;
            let bundle = TrustBundle::from_pem(&pem)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
            ders.extend(bundle.roots().iter().cloned());
        }
        TrustBundle::new(ders).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// The root that signs now.
    pub fn active_root(&self) -> Result<RootCa, StoreError> {
        let roots = self.roots()?;
        let active = roots
            .iter()
            .find(|r| r.state == RootState::Active)
            .ok_or_else(|| StoreError::Corrupt("no active root".into()))?;
        let cert_path = self.root_path(active.id, "crt");
        let key_path = self.root_path(active.id, "key");
        let cert = fs::read_to_string(&cert_path).map_err(|source| io_err(&cert_path, source))?;
        let key = fs::read_to_string(&key_path).map_err(|source| io_err(&key_path, source))?;
        Ok(RootCa::from_pem(&cert, &key)?)
    }

    /// Mints a join token for `id`.
    pub fn mint_join_token(&self, id: &SpiffeId, ttl: Duration) -> Result<String, StoreError> {
        let token = self.token_key.mint(&self.td, id, ttl)?;
        tracing::info!(spiffe_id = %id, ttl_secs = ttl.as_secs(), "join token minted");
        Ok(token)
    }

    /// Records an issuance, and for single-use credentials the token ID, in
    /// one transaction. A token ID seen before fails with
    /// [`TokenError::Replayed`] and nothing is recorded, so of two concurrent
    /// uses of one token exactly one succeeds.
    pub fn record_issuance(
        &self,
        issued: &Issued,
        id: &SpiffeId,
        kind: CredentialKind,
        single_use: Option<&(String, u64)>,
    ) -> Result<(), StoreError> {
        let path = self.dir.join(DB_FILE);
        let mut db = self.db.lock().expect("CA store lock");
        let tx = db.transaction().map_err(|source| db_err(&path, source))?;
        if let Some((jti, expires)) = single_use {
            let inserted = tx
                .execute(
                    "INSERT OR IGNORE INTO used_tokens (jti, expires_at, used_at) VALUES (?1, ?2, ?3)",
                    params![jti, *expires as i64, unix(SystemTime::now())],
                )
                .map_err(|source| db_err(&path, source))?;
            if inserted == 0 {
                return Err(StoreError::Token(TokenError::Replayed));
            }
        }
        tx.execute(
            "INSERT INTO issued (serial, spiffe_id, not_after, kind, issued_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                issued.serial,
                id.as_str(),
                unix(issued.not_after),
                kind.as_str(),
                unix(SystemTime::now())
            ],
        )
        .map_err(|source| db_err(&path, source))?;
        tx.commit().map_err(|source| db_err(&path, source))
    }

    /// True if this join-token ID was already used.
    pub fn token_used(&self, jti: &str) -> Result<bool, StoreError> {
        self.with_db(|db| {
            db.query_row(
                "SELECT 1 FROM used_tokens WHERE jti = ?1",
                params![jti],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
        })
    }

    /// Number of certificates issued, for tests and the admin view.
    pub fn issued_count(&self) -> Result<i64, StoreError> {
        self.with_db(|db| db.query_row("SELECT count(*) FROM issued", [], |r| r.get(0)))
    }

    /// Issues a certificate and key for `id` directly (on the CA host) and
    /// writes them to files, the key with mode 0600.
    pub fn issue_to_files(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        cert_out: &Path,
        key_out: &Path,
    ) -> Result<(Svid, WorkloadKey), StoreError> {
        let key = WorkloadKey::generate().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let csr = ValidatedCsr::parse(
            key.csr_pem()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?
                .as_bytes(),
        )
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let issued = self.active_root()?.sign_svid(&self.td, id, &csr, ttl)?;
        self.record_issuance(&issued, id, CredentialKind::Local, None)?;
        let svid = Svid::from_chain(vec![issued.cert_der.clone()])
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        write_secret(key_out, key.dangerous_private_key_pem().as_bytes())?;
        fs::write(cert_out, svid.to_pem()).map_err(|source| io_err(cert_out, source))?;
        tracing::info!(serial = %svid.serial, spiffe_id = %id, credential = "local", "issued");
        Ok((svid, key))
    }

    /// Rotation step 1: add a new root to the bundle; the current root keeps signing.
    pub fn rotate_prepare(&self, root_ttl: Duration) -> Result<String, StoreError> {
        let roots = self.roots()?;
        if roots.iter().any(|r| r.state == RootState::Prepared) {
            return Err(StoreError::Rotation {
                step: "prepare",
                why: "a prepared root already waits; run --activate".into(),
            });
        }
        if roots.iter().any(|r| r.state == RootState::Retiring) {
            return Err(StoreError::Rotation {
                step: "prepare",
                why: "the previous rotation is not finished; run --retire first".into(),
            });
        }
        let id = self.add_root(RootState::Prepared, root_ttl)?;
        Ok(format!(
            "root #{id} prepared: it is in the bundle now and will sign after --activate. \
             Let every workload refresh its bundle before activating."
        ))
    }

    /// Rotation step 2: the prepared root signs from now on; the old one stays trusted.
    pub fn rotate_activate(&self) -> Result<String, StoreError> {
        let roots = self.roots()?;
        let prepared = roots
            .iter()
            .find(|r| r.state == RootState::Prepared)
            .ok_or_else(|| StoreError::Rotation {
                step: "activate",
                why: "no prepared root; run --prepare first".into(),
            })?;
        let id = prepared.id;
        self.with_db(|db| {
            db.execute_batch("BEGIN IMMEDIATE")?;
            db.execute(
                "UPDATE roots SET state = 'retiring' WHERE state = 'active'",
                [],
            )?;
            db.execute(
                "UPDATE roots SET state = 'active' WHERE id = ?1",
                params![id],
            )?;
            db.execute_batch("COMMIT")
        })?;
        Ok(format!(
            "root #{id} now signs. The old root stays in the bundle; run --retire once every \
             workload has renewed (after one certificate lifetime)."
        ))
    }

    /// Rotation step 3: drop the old root from the bundle.
    pub fn rotate_retire(&self) -> Result<String, StoreError> {
        let retired = self.with_db(|db| {
            db.execute(
                "UPDATE roots SET state = 'retired' WHERE state = 'retiring'",
                [],
            )
        })?;
        if retired == 0 {
            return Err(StoreError::Rotation {
                step: "retire",
                why: "no retiring root; run --prepare and --activate first".into(),
            });
        }
        Ok("the old root is retired: it is no longer in the bundle".into())
    }

    fn add_root(&self, state: RootState, ttl: Duration) -> Result<i64, StoreError> {
        let next: i64 = self.with_db(|db| {
            db.query_row("SELECT coalesce(max(id), 0) + 1 FROM roots", [], |r| {
                r.get(0)
            })
        })?;
        let root = RootCa::generate(&self.td, next, ttl)?;
        write_secret(
            &self.root_path(next, "key"),
            root.dangerous_key_pem().as_bytes(),
        )?;
        let cert_path = self.root_path(next, "crt");
        fs::write(&cert_path, root.cert_pem()).map_err(|source| io_err(&cert_path, source))?;
        self.with_db(|db| {
            db.execute(
                "INSERT INTO roots (id, state, not_after) VALUES (?1, ?2, ?3)",
                params![next, state.as_str(), unix(root.not_after())],
            )
        })?;
        Ok(next)
    }

    fn root_path(&self, id: i64, ext: &str) -> PathBuf {
        self.dir.join(ROOTS_DIR).join(format!("{id}.{ext}"))
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let db = self.db.lock().expect("CA store lock");
        f(&db).map_err(|source| db_err(&self.dir.join(DB_FILE), source))
    }
}

impl fmt::Debug for CaDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaDir")
            .field("dir", &self.dir)
            .field("trust_domain", &self.td)
            .finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE roots (id INTEGER PRIMARY KEY, state TEXT NOT NULL, not_after INTEGER NOT NULL);
CREATE TABLE issued (
    serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_after INTEGER NOT NULL,
    kind TEXT NOT NULL, issued_at INTEGER NOT NULL);
CREATE TABLE used_tokens (jti TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, used_at INTEGER NOT NULL);
";

fn open_db(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|source| db_err(path, source))?;
    // WAL lets `moat ca rotate` write while `moat ca serve` reads; the busy
    // timeout makes the two wait for each other instead of failing.
    conn.busy_timeout(Duration::from_secs(5))
        .and_then(|_| conn.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|_| conn.pragma_update(None, "synchronous", "FULL"))
        .map_err(|source| db_err(path, source))?;
    Ok(conn)
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| io_err(path, source))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|source| io_err(path, source))
}

fn db_err(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Db {
        path: path.to_owned(),
        source,
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Formats a time as RFC 3339 UTC, for messages.
pub fn format_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_ca() -> (tempfile::TempDir, CaDir) {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::init(
            &tmp.path().join("ca"),
            TrustDomain::parse("example.org").unwrap(),
            Duration::from_secs(86400),
        )
        .unwrap();
        (tmp, ca)
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let (tmp, _ca) = new_ca();
        let err = CaDir::init(
            &tmp.path().join("ca"),
            TrustDomain::parse("example.org").unwrap(),
            Duration::from_secs(86400),
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyInitialized(_)));
    }

    #[test]
    fn init_makes_private_files() {
        let (tmp, _ca) = new_ca();
        let mode = |p: &str| {
            fs::metadata(tmp.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca"), 0o700);
        assert_eq!(mode("ca/token.key"), 0o600);
        assert_eq!(mode("ca/roots/1.key"), 0o600);
        assert_eq!(mode("ca/ca.db"), 0o600);
    }

    #[test]
    fn rotation_walks_through_its_states() {
        let (_tmp, ca) = new_ca();
        assert_eq!(ca.bundle().unwrap().roots().len(), 1);
        assert!(ca.rotate_activate().is_err());
        assert!(ca.rotate_retire().is_err());
        ca.rotate_prepare(Duration::from_secs(86400)).unwrap();
        assert!(ca.rotate_prepare(Duration::from_secs(86400)).is_err());
        assert_eq!(ca.bundle().unwrap().roots().len(), 2);
        let old = ca.active_root().unwrap();
        ca.rotate_activate().unwrap();
        let new = ca.active_root().unwrap();
        assert_ne!(old.cert_der(), new.cert_der());
        assert_eq!(ca.bundle().unwrap().roots().len(), 2);
        ca.rotate_retire().unwrap();
        let bundle = ca.bundle().unwrap();
        assert_eq!(bundle.roots(), &[new.cert_der().clone()]);
    }

    #[test]
    fn a_token_id_is_recorded_once() {
        let (_tmp, ca) = new_ca();
        let id = SpiffeId::parse("spiffe://example.org/vm/a").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let csr = ValidatedCsr::parse(key.csr_pem().unwrap().as_bytes()).unwrap();
        let root = ca.active_root().unwrap();
        let first = root
            .sign_svid(ca.trust_domain(), &id, &csr, Duration::from_secs(60))
            .unwrap();
        let second = root
            .sign_svid(ca.trust_domain(), &id, &csr, Duration::from_secs(60))
            .unwrap();
        let jti = ("abc".to_owned(), crate::token::unix_now() + 60);
        ca.record_issuance(&first, &id, CredentialKind::JoinToken, Some(&jti))
            .unwrap();
        let err = ca
            .record_issuance(&second, &id, CredentialKind::JoinToken, Some(&jti))
            .unwrap_err();
        assert!(matches!(err, StoreError::Token(TokenError::Replayed)));
        assert_eq!(ca.issued_count().unwrap(), 1);
        assert!(ca.token_used("abc").unwrap());
    }
}
