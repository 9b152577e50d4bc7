//! The SQLite engine: `DIR/ca.db`, one connection, WAL, `synchronous=FULL`
//! (every issuance is on disk before the certificate leaves the CA). Calls
//! run on Tokio's blocking pool: a commit may wait for an fsync. Issuances
//! that arrive while a commit waits are recorded together in the next
//! transaction, one fsync for them all (`group`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::migrations::{self, Migration};
use super::{
    BeforeActivation, IssuanceRecord, NO_END, NewRevocation, Recorded, RevocationRecord,
    RevocationTarget, RootChange, RootRecord, RootState, StateVersions, Store, StoreError,
    StoreFuture, unix,
};

mod group;

/// The SQLite engine. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    location: String,
    conn: Mutex<Connection>,
    /// Issuances waiting for the next group commit.
    queue: Arc<super::commit_queue::Queue>,
}

/// One exported row of `issued`, for `moat ca migrate --from-sqlite`.
#[derive(Debug, Clone)]
pub struct IssuedRow {
    /// Serial, hex.
    pub serial: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// End of validity.
    pub not_after: i64,
    /// Credential kind.
    pub kind: String,
    /// When issued.
    pub issued_at: i64,
}

/// One exported row of `used_tokens`.
#[derive(Debug, Clone)]
pub struct UsedTokenRow {
    /// Token ID.
    pub jti: String,
    /// Token expiry.
    pub expires_at: i64,
    /// When it was spent.
    pub used_at: i64,
}

/// One exported row of `revocations`.
#[derive(Debug, Clone)]
pub struct RevocationRow {
    /// Row ID.
    pub id: i64,
    /// Revoked serial.
    pub serial: Option<String>,
    /// Revoked identity.
    pub spiffe_id: Option<String>,
    /// Why.
    pub reason: String,
    /// When.
    pub revoked_at: i64,
    /// Until when.
    pub until: i64,
    /// The revocations version that set it.
    pub version: i64,
}

impl SqliteStore {
    /// Opens (or creates) the database at `path` and brings its schema up
    /// to date. Roots recorded before certificates moved into the store get
    /// their certificate from `roots_dir/N.crt`.
    pub fn open(path: &Path, roots_dir: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|source| db_err(path, source))?;
        // WAL lets `moat ca rotate` write while `moat ca serve` reads; the busy
        // timeout makes the two wait for each other instead of failing.
        conn.busy_timeout(Duration::from_secs(5))
            .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
            .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
            .map_err(|source| db_err(path, source))?;
        migrate(&conn, path)?;
        backfill_certs(&conn, path, roots_dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                location: path.display().to_string(),
                conn: Mutex::new(conn),
                queue: Arc::default(),
            }),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = inner.conn.lock().expect("CA store lock");
                f(&mut conn)
            })
            .await
            .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?
        })
    }

    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// The trust domain, synchronously (for the migration copy).
    pub fn export_trust_domain(&self) -> Result<Option<String>, StoreError> {
        let conn = self.inner.conn.lock().expect("CA store lock");
        trust_domain(&conn).map_err(|source| db_err(&self.inner.path, source))
    }

    /// The time of the last `rotate --activate` as recorded, synchronously.
    pub fn export_activated_at(&self) -> Result<Option<String>, StoreError> {
        let conn = self.inner.conn.lock().expect("CA store lock");
        conn.query_row(
            "SELECT value FROM meta WHERE key = ?1",
            params![super::ACTIVATED_AT_KEY],
            |r| r.get(0),
        )
        .optional()
        .map_err(|source| db_err(&self.inner.path, source))
    }

    /// Every root, synchronously.
    pub fn export_roots(&self) -> Result<Vec<RootRecord>, StoreError> {
        let conn = self.inner.conn.lock().expect("CA store lock");
        roots(&conn, &self.inner.path)
    }

    /// The version counters, synchronously.
    pub fn export_versions(&self) -> Result<StateVersions, StoreError> {
        let conn = self.inner.conn.lock().expect("CA store lock");
        versions(&conn).map_err(|source| db_err(&self.inner.path, source))
    }

    /// Up to `limit` rows of `issued` after `rowid`, with the last rowid.
    pub fn export_issued(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<(Vec<IssuedRow>, i64), StoreError> {
        self.export_page(
            "SELECT rowid, serial, spiffe_id, not_after, kind, issued_at FROM issued \
             WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
            after,
            limit,
            |r| {
                Ok(IssuedRow {
                    serial: r.get(1)?,
                    spiffe_id: r.get(2)?,
                    not_after: r.get(3)?,
                    kind: r.get(4)?,
                    issued_at: r.get(5)?,
                })
            },
        )
    }

    /// Up to `limit` rows of `used_tokens` after `rowid`, with the last rowid.
    pub fn export_used_tokens(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<(Vec<UsedTokenRow>, i64), StoreError> {
        self.export_page(
            "SELECT rowid, jti, expires_at, used_at FROM used_tokens \
             WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
            after,
            limit,
            |r| {
                Ok(UsedTokenRow {
                    jti: r.get(1)?,
                    expires_at: r.get(2)?,
                    used_at: r.get(3)?,
                })
            },
        )
    }

    /// One page of an export: `sql` selects `rowid` first and takes the
    /// rowid to start after (`?1`) and the page size (`?2`); `read` reads
    /// the rest of each row. Returns the rows and the last rowid (`after`
    /// when there are none).
    fn export_page<T>(
        &self,
        sql: &str,
        after: i64,
        limit: i64,
        read: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<(Vec<T>, i64), StoreError> {
        let conn = self.inner.conn.lock().expect("CA store lock");
        let path = &self.inner.path;
        let mut stmt = conn
            .prepare_cached(sql)
            .map_err(|source| db_err(path, source))?;
        let rows = stmt
            .query_map(params![after, limit], |r| {
                Ok((r.get::<_, i64>(0)?, read(r)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|source| db_err(path, source))?;
        let last = rows.last().map_or(after, |(rowid, _)| *rowid);
        Ok((rows.into_iter().map(|(_, row)| row).collect(), last))
    }

    /// Every revocation.
    pub fn export_revocations(&self) -> Result<Vec<RevocationRow>, StoreError> {
        let conn = self.inner.conn.lock().expect("CA store lock");
        let mut stmt = conn
            .prepare(
                "SELECT id, serial, spiffe_id, reason, revoked_at, until, version \
                 FROM revocations ORDER BY id",
            )
            .map_err(|source| db_err(&self.inner.path, source))?;
        stmt.query_map([], |r| {
            Ok(RevocationRow {
                id: r.get(0)?,
                serial: r.get(1)?,
                spiffe_id: r.get(2)?,
                reason: r.get(3)?,
                revoked_at: r.get(4)?,
                until: r.get(5)?,
                version: r.get(6)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(|source| db_err(&self.inner.path, source))
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Store for SqliteStore {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    fn location(&self) -> &str {
        &self.inner.location
    }

    fn schema_version(&self) -> StoreFuture<'_, i64> {
        let path = self.path();
        self.call(move |conn| current_version(conn).map_err(|source| db_err(&path, source)))
    }

    fn trust_domain(&self) -> StoreFuture<'_, Option<String>> {
        let path = self.path();
        self.call(move |conn| trust_domain(conn).map_err(|source| db_err(&path, source)))
    }

    fn initialize<'a>(
        &'a self,
        trust_domain: &'a str,
        first: &'a RootRecord,
    ) -> StoreFuture<'a, ()> {
        let path = self.path();
        let td = trust_domain.to_owned();
        let first = first.clone();
        self.call(move |conn| {
            let tx = conn.transaction().map_err(|source| db_err(&path, source))?;
            let inserted = tx
                .execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('trust_domain', ?1)",
                    params![td],
                )
                .map_err(|source| db_err(&path, source))?;
            if inserted == 0 {
                return Err(StoreError::AlreadyInitialized(path.display().to_string()));
            }
            insert_root(&tx, &first).map_err(|source| db_err(&path, source))?;
            tx.commit().map_err(|source| db_err(&path, source))
        })
    }

    fn roots(&self) -> StoreFuture<'_, Vec<RootRecord>> {
        let path = self.path();
        self.call(move |conn| roots(conn, &path))
    }

    fn versions(&self) -> StoreFuture<'_, StateVersions> {
        let path = self.path();
        self.call(move |conn| versions(conn).map_err(|source| db_err(&path, source)))
    }

    fn change_roots<'a>(
        &'a self,
        expected_version: i64,
        change: &'a RootChange,
    ) -> StoreFuture<'a, ()> {
        let path = self.path();
        let change = change.clone();
        self.call(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|source| db_err(&path, source))?;
            let bumped = tx
                .execute(
                    "UPDATE versions SET version = version + 1 WHERE name = 'roots' AND version = ?1",
                    params![expected_version],
                )
                .map_err(|source| db_err(&path, source))?;
            if bumped == 0 {
                return Err(StoreError::Conflict);
            }
            let applied = match &change {
                RootChange::Add(root) => insert_root(&tx, root),
                RootChange::Activate { id, at } => tx
                    .execute(
                        "UPDATE roots SET state = 'retiring' WHERE state = 'active'",
                        [],
                    )
                    .and_then(|_| {
                        tx.execute(
                            "UPDATE roots SET state = 'active' WHERE id = ?1",
                            params![id],
                        )
                    })
                    .and_then(|_| {
                        tx.execute(
                            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                            params![super::ACTIVATED_AT_KEY, at.to_string()],
                        )
                    }),
                RootChange::Retire => tx.execute(
                    "UPDATE roots SET state = 'retired' WHERE state = 'retiring'",
                    [],
                ),
            };
            applied.map_err(|source| db_err(&path, source))?;
            tx.commit().map_err(|source| db_err(&path, source))
        })
    }

    fn record_issuance<'a>(&'a self, record: &'a IssuanceRecord) -> StoreFuture<'a, Recorded> {
        let inner = self.inner.clone();
        let record = record.clone();
        // With the issuances that arrive meanwhile: one fsync for them all.
        Box::pin(async move { group::record(&inner, record).await })
    }

    fn token_used<'a>(&'a self, jti: &'a str) -> StoreFuture<'a, bool> {
        let path = self.path();
        let jti = jti.to_owned();
        self.call(move |conn| {
            conn.query_row(
                "SELECT 1 FROM used_tokens WHERE jti = ?1",
                params![jti],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(|source| db_err(&path, source))
        })
    }

    fn issued_count(&self) -> StoreFuture<'_, i64> {
        let path = self.path();
        self.call(move |conn| {
            conn.query_row("SELECT count(*) FROM issued", [], |r| r.get(0))
                .map_err(|source| db_err(&path, source))
        })
    }

    fn issued_before_activation(&self, now: i64, grace: i64) -> StoreFuture<'_, BeforeActivation> {
        let path = self.path();
        self.call(move |conn| {
            let activated_at: Option<String> = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = ?1",
                    params![super::ACTIVATED_AT_KEY],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|source| db_err(&path, source))?;
            let Some(activated_at) = activated_at.and_then(|v| v.parse::<i64>().ok()) else {
                return Ok(BeforeActivation::default());
            };
            let (valid, last_not_after) = conn
                .query_row(
                    "SELECT count(*), max(not_after) FROM issued WHERE issued_at <= ?1 AND not_after > ?2",
                    params![activated_at + grace, now],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(|source| db_err(&path, source))?;
            Ok(BeforeActivation {
                activated_at: Some(activated_at),
                valid,
                last_not_after,
            })
        })
    }

    fn revoke<'a>(&'a self, revocation: &'a NewRevocation) -> StoreFuture<'a, RevocationRecord> {
        let path = self.path();
        let revocation = revocation.clone();
        self.call(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|source| db_err(&path, source))?;
            // A refusal (unknown serial) rolls back with the transaction.
            let record = revoke(&tx, &revocation).map_err(StoreError::Revocation)?;
            tx.commit().map_err(|source| db_err(&path, source))?;
            Ok(record)
        })
    }

    fn unrevoke<'a>(&'a self, target: &'a RevocationTarget) -> StoreFuture<'a, u64> {
        let path = self.path();
        let target = target.clone();
        self.call(move |conn| {
            let err = |source| db_err(&path, source);
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(err)?;
            let removed = match &target {
                RevocationTarget::Serial(serial) => {
                    tx.execute("DELETE FROM revocations WHERE serial = ?1", params![serial])
                }
                RevocationTarget::Id(id) => tx.execute(
                    "DELETE FROM revocations WHERE serial IS NULL AND spiffe_id = ?1",
                    params![id],
                ),
            }
            .map_err(err)?;
            if removed > 0 {
                tx.execute(
                    "UPDATE versions SET version = version + 1 WHERE name = 'revocations'",
                    [],
                )
                .map_err(err)?;
            }
            tx.commit().map_err(err)?;
            Ok(removed as u64)
        })
    }

    fn revocations(&self, now: i64) -> StoreFuture<'_, Vec<RevocationRecord>> {
        let path = self.path();
        self.call(move |conn| {
            let err = |source| db_err(&path, source);
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {REVOCATION_COLUMNS} FROM revocations r WHERE r.until > ?1 ORDER BY r.id"
                ))
                .map_err(err)?;
            stmt.query_map(params![now], revocation_row)
                .and_then(std::iter::Iterator::collect)
                .map_err(err)
        })
    }

    fn revocation_for<'a>(
        &'a self,
        serial: Option<&'a str>,
        spiffe_id: &'a str,
        now: i64,
    ) -> StoreFuture<'a, Option<RevocationRecord>> {
        let path = self.path();
        let serial = serial.map(str::to_owned);
        let id = spiffe_id.to_owned();
        self.call(move |conn| {
            revocation_for(conn, serial.as_deref(), &id, now)
                .map_err(|source| db_err(&path, source))
        })
    }
}

/// The revocation in force at `now` covering this identity or serial.
fn revocation_for(
    conn: &Connection,
    serial: Option<&str>,
    spiffe_id: &str,
    now: i64,
) -> rusqlite::Result<Option<RevocationRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {REVOCATION_COLUMNS} FROM revocations r WHERE r.until > ?1 \
         AND ((r.serial IS NULL AND r.spiffe_id = ?2) OR r.serial = ?3) \
         ORDER BY r.id LIMIT 1"
    ))?
    .query_row(params![now, spiffe_id, serial], revocation_row)
    .optional()
}

/// The columns [`revocation_row`] reads: the row, and for an identity's
/// revocation the end of its last certificate.
const REVOCATION_COLUMNS: &str = "r.serial, r.spiffe_id, r.reason, r.revoked_at, r.until, \
     CASE WHEN r.serial IS NULL THEN \
       (SELECT max(i.not_after) FROM issued i WHERE i.spiffe_id = r.spiffe_id) END";

fn revocation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RevocationRecord> {
    let serial: Option<String> = r.get(0)?;
    let until: i64 = r.get(4)?;
    let last: Option<i64> = r.get(5)?;
    Ok(RevocationRecord {
        expires: RevocationRecord::effective_expiry(serial.as_deref(), until, last),
        serial,
        spiffe_id: r.get(1)?,
        reason: r.get(2)?,
        revoked_at: r.get(3)?,
        until,
    })
}

fn revoke(tx: &rusqlite::Transaction<'_>, new: &NewRevocation) -> Result<RevocationRecord, String> {
    let e = |e: rusqlite::Error| e.to_string();
    tx.execute(
        "DELETE FROM revocations WHERE until <= ?1",
        params![new.now],
    )
    .map_err(e)?;
    let (serial, spiffe_id, until) = match &new.target {
        RevocationTarget::Serial(serial) => {
            let issued: Option<(String, i64)> = tx
                .query_row(
                    "SELECT spiffe_id, not_after FROM issued WHERE serial = ?1",
                    params![serial],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(e)?;
            let Some((id, not_after)) = issued else {
                return Err(format!(
                    "no certificate with serial {serial} was issued by this CA (see the `issued` log lines of `moat ca serve`)"
                ));
            };
            tx.execute("DELETE FROM revocations WHERE serial = ?1", params![serial])
                .map_err(e)?;
            let until = new.until.map_or(not_after, |u| u.min(not_after));
            (Some(serial.clone()), id, until)
        }
        RevocationTarget::Id(id) => {
            tx.execute(
                "DELETE FROM revocations WHERE serial IS NULL AND spiffe_id = ?1",
                params![id],
            )
            .map_err(e)?;
            (None, id.clone(), new.until.unwrap_or(NO_END))
        }
    };
    tx.execute(
        "UPDATE versions SET version = version + 1 WHERE name = 'revocations'",
        [],
    )
    .map_err(e)?;
    tx.execute(
        "INSERT INTO revocations (serial, spiffe_id, reason, revoked_at, until, version) \
         VALUES (?1, ?2, ?3, ?4, ?5, (SELECT version FROM versions WHERE name = 'revocations'))",
        params![serial, spiffe_id, new.reason, new.now, until],
    )
    .map_err(e)?;
    let id = tx.last_insert_rowid();
    tx.query_row(
        &format!("SELECT {REVOCATION_COLUMNS} FROM revocations r WHERE r.id = ?1"),
        params![id],
        revocation_row,
    )
    .map_err(e)
}

fn trust_domain(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT value FROM meta WHERE key = 'trust_domain'",
        [],
        |r| r.get(0),
    )
    .optional()
}

fn roots(conn: &Connection, path: &Path) -> Result<Vec<RootRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT id, state, not_after, cert_pem FROM roots ORDER BY id")
        .map_err(|source| db_err(path, source))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|source| db_err(path, source))?;
    rows.into_iter()
        .map(|(id, state, not_after, cert_pem)| {
            Ok(RootRecord {
                id,
                state: RootState::parse(&state)?,
                not_after,
                cert_pem: cert_pem.ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "root #{id} has no certificate in {}",
                        path.display()
                    ))
                })?,
            })
        })
        .collect()
}

fn versions(conn: &Connection) -> rusqlite::Result<StateVersions> {
    let mut out = StateVersions::default();
    let mut stmt = conn.prepare_cached("SELECT name, version FROM versions")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        match row? {
            (name, v) if name == "roots" => out.roots = v,
            (name, v) if name == "revocations" => out.revocations = v,
            _ => {}
        }
    }
    Ok(out)
}

fn insert_root(conn: &Connection, root: &RootRecord) -> rusqlite::Result<usize> {
    conn.execute(
        "INSERT INTO roots (id, state, not_after, cert_pem) VALUES (?1, ?2, ?3, ?4)",
        params![root.id, root.state.as_str(), root.not_after, root.cert_pem],
    )
}

fn current_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT coalesce(max(version), 0) FROM moat_schema",
        [],
        |r| r.get(0),
    )
}

/// Applies the migrations not yet recorded, each in its own transaction.
fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let err = |source| db_err(path, source);
    conn.execute_batch(migrations::SCHEMA_TABLE).map_err(err)?;
    let current = current_version(conn).map_err(err)?;
    if current > migrations::LATEST {
        return Err(StoreError::SchemaTooNew {
            location: path.display().to_string(),
            found: current,
            known: migrations::LATEST,
        });
    }
    for Migration { version, name, sql } in migrations::SQLITE {
        if *version <= current {
            continue;
        }
        conn.execute_batch("BEGIN IMMEDIATE").map_err(err)?;
        let applied = conn.execute_batch(sql).and_then(|()| {
            conn.execute(
                "INSERT INTO moat_schema (version, name, applied_at) VALUES (?1, ?2, ?3)",
                params![version, name, unix(std::time::SystemTime::now())],
            )
        });
        match applied {
            Ok(_) => conn.execute_batch("COMMIT").map_err(err)?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(db_err(path, e));
            }
        }
        tracing::info!(engine = "sqlite", version, name, "schema migration applied");
    }
    Ok(())
}

/// Fills `roots.cert_pem` from `roots_dir/N.crt` for roots recorded before
/// migration 2.
fn backfill_certs(conn: &Connection, path: &Path, roots_dir: &Path) -> Result<(), StoreError> {
    let missing: Vec<i64> = conn
        .prepare("SELECT id FROM roots WHERE cert_pem IS NULL")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|source| db_err(path, source))?;
    for id in missing {
        let file = roots_dir.join(format!("{id}.crt"));
        let pem = std::fs::read_to_string(&file).map_err(|source| StoreError::Io {
            path: file.clone(),
            source,
        })?;
        conn.execute(
            "UPDATE roots SET cert_pem = ?1 WHERE id = ?2",
            params![pem, id],
        )
        .map_err(|source| db_err(path, source))?;
    }
    Ok(())
}

pub(super) fn db_err(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Db {
        path: path.to_owned(),
        source,
    }
}
