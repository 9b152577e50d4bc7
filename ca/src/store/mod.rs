//! The CA's state: keys in the CA directory, everything else in a store
//! with two engines behind one interface.
//!
//! ```text
//! DIR/            0700
//!   ca.toml       optional: [store] chooses PostgreSQL (see config.rs)
//!   ca.db         SQLite state (the default engine)
//!   roots/N.crt   root certificate N (PEM; also in the store)
//!   roots/N.key   root key N (PEM, 0600)
//!   token.key     join-token signing key (PEM, 0600)
//!   serve.lock    held by `moat ca serve` on SQLite (serve_lock.rs)
//! ```
//!
//! What is secret stays a file: root keys and the token key, which replicas
//! get from a Kubernetes Secret or the operator's configuration management.
//! What changes at run time is in the [`Store`]: the trust domain, every
//! root's certificate and rotation state, every issuance, every spent
//! join-token ID, and every revocation. With SQLite one
//! `moat ca serve` owns `DIR/ca.db`; with PostgreSQL several replicas share
//! one database and see each other's writes at once.
//!
//! A root is in one of four states. `active` signs and is in the bundle;
//! `prepared` is in the bundle but does not sign yet; `retiring` no longer
//! signs but is still in the bundle; `retired` is gone from the bundle.
//! Every change of root states bumps [`StateVersions::roots`] in the same
//! transaction; replicas poll the versions every second and reload their
//! signing state when one moved.
//!
//! A revocation names one certificate (by serial) or every certificate of
//! an identity, until a time. `revoke` and `unrevoke` bump
//! [`StateVersions::revocations`] in the same transaction; replicas that
//! see it move read the whole list again (it is small: entries leave it
//! once the certificates they name have expired).

mod commit_queue;
pub mod config;
mod copy;
mod dir;
mod migrations;
mod postgres;
mod serve_lock;
mod sqlite;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

pub use copy::{CopyReport, copy_sqlite_to_postgres};
pub use dir::{CaDir, ROTATION_GRACE, SigningState, bundle_of, format_time, format_unix};
pub use postgres::PgStore;
pub use serve_lock::{SERVE_LOCK_FILE, ServeLock};
pub use sqlite::SqliteStore;

use crate::issuer::IssueError;
use crate::token::TokenError;

/// A store operation in flight.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The CA's state, whichever engine holds it. Every method is one
/// transaction; none leaves a partial write behind when it fails.
///
/// Revocations: `revoke` and `unrevoke` change rows and bump
/// [`StateVersions::revocations`] in one transaction; replicas that see
/// the version move read the current list again.
pub trait Store: Send + Sync + fmt::Debug {
    /// `sqlite` or `postgres`.
    fn engine(&self) -> &'static str;

    /// Where the state lives, for messages: a file or a URL (no password).
    fn location(&self) -> &str;

    /// The schema version the store is at after its migrations ran.
    fn schema_version(&self) -> StoreFuture<'_, i64>;

    /// The trust domain recorded by `init`; `None` for an empty store.
    fn trust_domain(&self) -> StoreFuture<'_, Option<String>>;

    /// Records a new CA: its trust domain and first (active) root. Fails
    /// with [`StoreError::AlreadyInitialized`] if the store holds one.
    fn initialize<'a>(
        &'a self,
        trust_domain: &'a str,
        first: &'a RootRecord,
    ) -> StoreFuture<'a, ()>;

    /// Every root, oldest first.
    fn roots(&self) -> StoreFuture<'_, Vec<RootRecord>>;

    /// The version counters replicas poll.
    fn versions(&self) -> StoreFuture<'_, StateVersions>;

    /// Applies one rotation step if the roots are still at
    /// `expected_version` (else [`StoreError::Conflict`]), and bumps the
    /// version, in one transaction.
    fn change_roots<'a>(
        &'a self,
        expected_version: i64,
        change: &'a RootChange,
    ) -> StoreFuture<'a, ()>;

    /// Records an issuance and, for a single-use credential, its token ID,
    /// in one transaction, unless a revocation in force at
    /// [`IssuanceRecord::issued_at`] covers the identity or
    /// [`IssuanceRecord::presented_serial`]: then nothing is written and
    /// the answer is [`Recorded::Revoked`] with that revocation. Asking and
    /// writing in one transaction (one statement on PostgreSQL) halves the
    /// round trips of a renewal. A token ID recorded before (by any
    /// replica) fails with [`TokenError::Replayed`] and nothing is written,
    /// so of several concurrent uses of one token exactly one succeeds.
    fn record_issuance<'a>(&'a self, record: &'a IssuanceRecord) -> StoreFuture<'a, Recorded>;

    /// True if this join-token ID was used.
    fn token_used<'a>(&'a self, jti: &'a str) -> StoreFuture<'a, bool>;

    /// How many certificates were issued.
    fn issued_count(&self) -> StoreFuture<'_, i64>;

    /// When the last `rotate --activate` ran (recorded with it), and the
    /// certificates recorded up to `issued_until` that are still valid at
    /// `now`: their number and the last one's end.
    fn issued_before_activation(&self, now: i64, grace: i64) -> StoreFuture<'_, BeforeActivation>;

    /// Revokes `target` (replacing an earlier revocation of the same
    /// target) and bumps the revocations version, in one transaction.
    /// A serial must be one this CA issued; its revocation lasts until the
    /// certificate expires (or `until`, if sooner). An identity's lasts
    /// until `until`, or until it is un-revoked. Rows whose time has
    /// passed are deleted in the same transaction.
    fn revoke<'a>(&'a self, revocation: &'a NewRevocation) -> StoreFuture<'a, RevocationRecord>;

    /// Removes the revocation of `target` and bumps the version; the
    /// number of rows removed (0: it was not revoked, nothing changed).
    fn unrevoke<'a>(&'a self, target: &'a RevocationTarget) -> StoreFuture<'a, u64>;

    /// Every revocation still in force at `now`, oldest first, each with
    /// the time it stops mattering ([`RevocationRecord::expires`]).
    fn revocations(&self, now: i64) -> StoreFuture<'_, Vec<RevocationRecord>>;

    /// The revocation in force at `now` that covers the certificate with
    /// this serial or this identity, if any.
    fn revocation_for<'a>(
        &'a self,
        serial: Option<&'a str>,
        spiffe_id: &'a str,
        now: i64,
    ) -> StoreFuture<'a, Option<RevocationRecord>>;
}

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationTarget {
    /// One certificate, by serial (lowercase hex, no separators).
    Serial(String),
    /// Every certificate of this SPIFFE ID, now and until un-revoked.
    Id(String),
}

/// A revocation to record.
#[derive(Debug, Clone)]
pub struct NewRevocation {
    /// What it names.
    pub target: RevocationTarget,
    /// Why (free text, for the operator and the logs).
    pub reason: String,
    /// When it ends, seconds since the epoch; `None`: when the certificate
    /// expires (serial) or never, until un-revoked (identity).
    pub until: Option<i64>,
    /// Now, seconds since the epoch.
    pub now: i64,
}

/// A revocation as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    /// The revoked serial, for a certificate's revocation.
    pub serial: Option<String>,
    /// The identity: the revoked one, or the revoked certificate's.
    pub spiffe_id: Option<String>,
    /// Why.
    pub reason: String,
    /// When, seconds since the epoch.
    pub revoked_at: i64,
    /// Until when, as recorded ([`NO_END`] for an identity revoked until
    /// un-revoked).
    pub until: i64,
    /// When it stops mattering to a sidecar: `until`, or sooner when
    /// every certificate it covers has expired (the last certificate
    /// issued to a revoked identity; a revoked identity gets no new one).
    pub expires: i64,
}

/// `until` of a revocation that lasts until it is un-revoked
/// (9999-12-31T23:59:59Z).
pub const NO_END: i64 = 253_402_300_799;

/// The reason recorded when the operator gives none.
pub const DEFAULT_REASON: &str = "unspecified";

/// What [`CaDir::revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The target was not revoked; now it is.
    New {
        /// The target, in the CA's spelling (lowercase hex serial,
        /// parsed SPIFFE ID).
        target: RevocationTarget,
        /// The entry recorded.
        record: RevocationRecord,
    },
    /// The target was already revoked and nothing was asked to change:
    /// the store is untouched.
    Already {
        /// The target, in the CA's spelling.
        target: RevocationTarget,
        /// The entry in force, as it was.
        record: RevocationRecord,
    },
    /// The target was already revoked; its reason or end was replaced.
    Updated {
        /// The target, in the CA's spelling.
        target: RevocationTarget,
        /// The entry that was in force.
        before: RevocationRecord,
        /// The entry that replaced it.
        record: RevocationRecord,
    },
}

/// What [`CaDir::unrevoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrevoked {
    /// The target, in the CA's spelling.
    pub target: RevocationTarget,
    /// False when it was not revoked (nothing changed).
    pub removed: bool,
}

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
    /// The certificate, PEM.
    pub cert_pem: String,
}

/// The counters replicas poll to notice another replica's (or the CLI's)
/// writes: each moves by one with every change it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateVersions {
    /// Root states (rotation).
    pub roots: i64,
    /// Revocations.
    pub revocations: i64,
}

/// What [`Store::issued_before_activation`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BeforeActivation {
    /// When the last `--activate` ran, seconds since the epoch; `None` when
    /// it was run by a moat that did not record it.
    pub activated_at: Option<i64>,
    /// Certificates issued up to then (and the grace after) still valid.
    pub valid: i64,
    /// The end of the last of them, seconds since the epoch.
    pub last_not_after: Option<i64>,
}

/// The `meta` key that holds the time of the last `rotate --activate`
/// (a key of the existing table, so no schema change).
pub(crate) const ACTIVATED_AT_KEY: &str = "root_activated_at";

/// One rotation step, as the store applies it.
#[derive(Debug, Clone)]
pub enum RootChange {
    /// Adds a root (`rotate --prepare`).
    Add(RootRecord),
    /// The active root starts retiring and this one signs (`rotate --activate`).
    Activate {
        /// The root that signs from now on.
        id: i64,
        /// Now, seconds since the epoch: recorded for `--retire`'s check.
        at: i64,
    },
    /// Retiring roots leave the bundle (`rotate --retire`).
    Retire,
}

/// One issuance to record.
#[derive(Debug, Clone)]
pub struct IssuanceRecord {
    /// Certificate serial, lowercase hex.
    pub serial: String,
    /// The identity it carries.
    pub spiffe_id: String,
    /// Its end of validity, seconds since the epoch.
    pub not_after: i64,
    /// The credential kind (`join_token`, `renewal`, ...).
    pub kind: &'static str,
    /// When it was issued, seconds since the epoch.
    pub issued_at: i64,
    /// The join token's ID and expiry, for single-use credentials.
    pub single_use: Option<(String, i64)>,
    /// The serial of the certificate the request authenticated with (a
    /// renewal's), checked against the revocations with the identity.
    pub presented_serial: Option<String>,
}

/// What [`Store::record_issuance`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Recorded {
    /// The issuance (and the token's use) is recorded: the certificate may
    /// leave the CA.
    Issued,
    /// A revocation covers the identity or the presented certificate;
    /// nothing was written.
    Revoked(RevocationRecord),
}

/// Errors from the CA directory and its store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `init` found an existing CA (in the directory or the database).
    #[error("{0} already holds a CA; refusing to overwrite it")]
    AlreadyInitialized(String),
    /// `open` found no CA.
    #[error("{0}")]
    NotInitialized(String),
    /// `[store]` in `ca.toml` is unusable.
    #[error("{0}")]
    Config(String),
    /// A rotation step is not possible in the current state.
    #[error("cannot {step}: {why}")]
    Rotation {
        /// The step asked for.
        step: &'static str,
        /// Why not.
        why: String,
    },
    /// Another rotation step changed the roots first.
    #[error(
        "the roots changed while this step ran (another `moat ca rotate`?); check `moat ca bundle` and run it again"
    )]
    Conflict,
    /// A requested identity or lifetime is not allowed.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// Token minting or checking failed (including a replayed token).
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
    /// PostgreSQL failed or could not be reached.
    #[error("CA state database {location}: {message}")]
    Postgres {
        /// The URL (no password).
        location: String,
        /// What failed.
        message: String,
    },
    /// PostgreSQL refused us: a wrong password or user, or a database that
    /// does not exist. Unlike [`StoreError::Postgres`], a retry will not
    /// pass until the operator changes `[store]` or the server.
    #[error("CA state database {location}: {message}")]
    PostgresRefused {
        /// The URL (no password).
        location: String,
        /// What the server said.
        message: String,
    },
    /// A store operation took longer than `[store] timeout`.
    #[error("CA state database {location}: no answer within {timeout:?}")]
    Timeout {
        /// The URL or file.
        location: String,
        /// The limit.
        timeout: std::time::Duration,
    },
    /// The database's schema is newer than this binary.
    #[error(
        "CA state database {location} is at schema version {found}, newer than this moat knows ({known}); run a newer moat"
    )]
    SchemaTooNew {
        /// The URL or file.
        location: String,
        /// The version found.
        found: i64,
        /// The latest version this binary has.
        known: i64,
    },
    /// The key of a root that must sign is not in this replica's directory.
    #[error(
        "root #{root} signs now but its key is not at {path} on this replica: install it there (from the CA's Secret or the machine that ran `moat ca rotate --prepare`)"
    )]
    KeyMissing {
        /// The root's generation.
        root: i64,
        /// Where its key should be.
        path: PathBuf,
    },
    /// A file in the CA directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An output file (`moat ca issue --cert-out`, `--key-out`, `--out`)
    /// cannot be created: its directory is missing or not writable, or the
    /// path is a directory. Found before anything is issued.
    #[error("{path}: cannot create the file: {source}; nothing was issued")]
    Output {
        /// The file asked for.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The directory's contents are inconsistent.
    #[error("CA state is inconsistent: {0}")]
    Corrupt(String),
    /// A revocation cannot be made or undone as asked (an unknown serial,
    /// nothing to un-revoke).
    #[error("{0}")]
    Revocation(String),
}

impl StoreError {
    /// True for mistakes an operator makes (exit 64), as opposed to failures
    /// that may pass on a retry (exit 1). Files in the CA directory that are
    /// missing, unreadable or not what they should be, a database file that
    /// is not one, and a database server that refuses our credentials are
    /// the operator's: a restart only repeats the failure.
    pub fn is_operator_error(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => {
                return matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound
                        | std::io::ErrorKind::PermissionDenied
                        | std::io::ErrorKind::InvalidData
                        | std::io::ErrorKind::IsADirectory
                );
            }
            StoreError::Db {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => {
                return matches!(
                    e.code,
                    rusqlite::ErrorCode::NotADatabase
                        | rusqlite::ErrorCode::DatabaseCorrupt
                        | rusqlite::ErrorCode::CannotOpen
                        | rusqlite::ErrorCode::PermissionDenied
                        | rusqlite::ErrorCode::ReadOnly
                );
            }
            _ => {}
        }
        matches!(
            self,
            StoreError::AlreadyInitialized(_)
                | StoreError::PostgresRefused { .. }
                | StoreError::Corrupt(_)
                | StoreError::NotInitialized(_)
                | StoreError::Config(_)
                | StoreError::Rotation { .. }
                | StoreError::Revocation(_)
                | StoreError::Output { .. }
                | StoreError::Issue(IssueError::BadTtl(_) | IssueError::WrongTrustDomain { .. })
                | StoreError::Token(
                    TokenError::WrongTrustDomain(_)
                        | TokenError::Invalid(_)
                        | TokenError::BadTtl(_)
                )
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

    /// True when the store could not be reached or did not answer in time
    /// (as opposed to refusing a request).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Postgres { .. }
                | StoreError::PostgresRefused { .. }
                | StoreError::Timeout { .. }
                | StoreError::Db { .. }
        )
    }
}

impl RootState {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RootState::Active => "active",
            RootState::Prepared => "prepared",
            RootState::Retiring => "retiring",
            RootState::Retired => "retired",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
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

/// Now, in seconds since the epoch.
pub(crate) fn unix_now() -> i64 {
    unix(std::time::SystemTime::now())
}

/// Seconds since the epoch.
pub(crate) fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl RevocationTarget {
    /// `serial X` or `identity spiffe://...`, for messages.
    pub fn describe(&self) -> String {
        match self {
            RevocationTarget::Serial(s) => format!("certificate serial {s}"),
            RevocationTarget::Id(id) => format!("identity {id}"),
        }
    }
}

impl RevocationRecord {
    /// The recorded `until` and the certificate's end of validity give the
    /// time a serial's revocation ends; an identity's ends at `until`, or
    /// when its last certificate (`last_not_after`) has expired.
    pub(crate) fn effective_expiry(
        serial: Option<&str>,
        until: i64,
        last_not_after: Option<i64>,
    ) -> i64 {
        match (serial, last_not_after) {
            (Some(_), _) => until,
            (None, Some(last)) => until.min(last),
            (None, None) => until.min(0),
        }
    }
}

#[cfg(test)]
mod tests;
