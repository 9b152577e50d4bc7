//! The PostgreSQL engine: several `moat ca serve` replicas on one database.
//!
//! A pool of connections per replica (deadpool), statements prepared once
//! per connection, TLS through rustls on aws-lc-rs. Each issuance is one
//! statement: the revocation check, and for a join token the `used_tokens`
//! insert, and the `issued` insert are one `WITH ... INSERT` (nothing is
//! written when a revocation covers the request), and the primary key on
//! `used_tokens.jti` makes the second of two concurrent uses (on any
//! replica) wait for the first to commit and then insert nothing. The
//! issuances that arrive together are sent pipelined in one transaction
//! and committed once (`group`). Every operation is bounded by
//! `[store] timeout`; past it, or with the database down, the caller gets
//! an error it answers with 503.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_postgres::Transaction;

use super::config::{PgSettings, PgTls};
use super::migrations::{self, Migration};
use super::{
    BeforeActivation, IssuanceRecord, NO_END, NewRevocation, Recorded, RevocationRecord,
    RevocationTarget, RootChange, RootRecord, RootState, StateVersions, Store, StoreError,
    StoreFuture, unix,
};

mod group;

/// Serializes schema migrations between replicas that start together
/// (`pg_advisory_xact_lock`); the bytes of "moat".
const MIGRATION_LOCK: i64 = 0x6d6f_6174;

/// The PostgreSQL engine. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    location: Arc<str>,
    timeout: Duration,
    /// Issuances waiting for the next group commit.
    queue: Arc<super::commit_queue::Queue>,
}

impl PgStore {
    /// Builds the pool, connects once, and brings the schema up to date.
    pub async fn connect(settings: &PgSettings) -> Result<Self, StoreError> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &settings.tls {
            PgTls::Disable => Manager::from_config(
                settings.config.clone(),
                tokio_postgres::NoTls,
                manager_config,
            ),
            PgTls::VerifyFull { ca_file } => {
                let tls = tls_config(ca_file).map_err(StoreError::Config)?;
                Manager::from_config(
                    settings.config.clone(),
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                    manager_config,
                )
            }
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .build()
            .map_err(|e| StoreError::Config(format!("store: {e}")))?;
        let store = Self {
            pool,
            location: settings.display.as_str().into(),
            timeout: settings.timeout,
            queue: Arc::default(),
        };
        store.bounded(store.migrate()).await?;
        Ok(store)
    }

    /// A pooled connection.
    pub(super) async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_err(e))
    }

    /// Runs `op` within the operation time limit.
    pub(super) async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, op)
            .await
            .map_err(|_| StoreError::Timeout {
                location: self.location.to_string(),
                timeout: self.timeout,
            })?
    }

    pub(super) fn err(&self, e: tokio_postgres::Error) -> StoreError {
        self.described(&e)
    }

    /// `e` as a [`StoreError`]: [`StoreError::PostgresRefused`] when the
    /// server answered that we may not in (a wrong password or user, a
    /// database that does not exist), which no retry changes;
    /// [`StoreError::Postgres`] for anything else.
    fn described(&self, e: &tokio_postgres::Error) -> StoreError {
        let location = self.location.to_string();
        let message = describe(e);
        if is_refusal(e) {
            StoreError::PostgresRefused { location, message }
        } else {
            StoreError::Postgres { location, message }
        }
    }

    fn pool_err(&self, e: deadpool_postgres::PoolError) -> StoreError {
        use deadpool_postgres::PoolError;
        let message = match e {
            PoolError::Backend(e) => return self.described(&e),
            PoolError::Timeout(_) => {
                return StoreError::Timeout {
                    location: self.location.to_string(),
                    timeout: self.timeout,
                };
            }
            other => other.to_string(),
        };
        StoreError::Postgres {
            location: self.location.to_string(),
            message,
        }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| self.err(e))?;
        // Only DDL when there is something to change: a role that may read
        // and write the tables but not create any (migrated by `moat ca
        // migrate` as the owner) starts as long as the schema is current.
        let exists: bool = tx
            .query_one("SELECT to_regclass('moat_schema') IS NOT NULL", &[])
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        if !exists {
            tx.batch_execute(migrations::SCHEMA_TABLE)
                .await
                .map_err(|e| self.err(e))?;
        }
        let current = current_version(&tx).await.map_err(|e| self.err(e))?;
        if current > migrations::LATEST {
            return Err(StoreError::SchemaTooNew {
                location: self.location.to_string(),
                found: current,
                known: migrations::LATEST,
            });
        }
        let mut applied = Vec::new();
        for Migration { version, name, sql } in migrations::POSTGRES {
            if *version <= current {
                continue;
            }
            tx.batch_execute(sql).await.map_err(|e| self.err(e))?;
            tx.execute(
                "INSERT INTO moat_schema (version, name, applied_at) VALUES ($1, $2, $3)",
                &[version, name, &unix(SystemTime::now())],
            )
            .await
            .map_err(|e| self.err(e))?;
            applied.push((*version, *name));
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        for (version, name) in applied {
            tracing::info!(
                engine = "postgres",
                version,
                name,
                "schema migration applied"
            );
        }
        Ok(())
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.location)
            .finish()
    }
}

impl Store for PgStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    fn location(&self) -> &str {
        &self.location
    }

    fn schema_version(&self) -> StoreFuture<'_, i64> {
        Box::pin(self.bounded(async move {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT coalesce(max(version), 0) FROM moat_schema", &[])
                .await
                .map_err(|e| self.err(e))?;
            Ok(row.get(0))
        }))
    }

    fn trust_domain(&self) -> StoreFuture<'_, Option<String>> {
        Box::pin(self.bounded(async move {
            let client = self.client().await?;
            let row = client
                .query_opt("SELECT value FROM meta WHERE key = 'trust_domain'", &[])
                .await
                .map_err(|e| self.err(e))?;
            Ok(row.map(|r| r.get(0)))
        }))
    }

    fn initialize<'a>(
        &'a self,
        trust_domain: &'a str,
        first: &'a RootRecord,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.bounded(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| self.err(e))?;
            let inserted = tx
                .execute(
                    "INSERT INTO meta (key, value) VALUES ('trust_domain', $1) ON CONFLICT (key) DO NOTHING",
                    &[&trust_domain],
                )
                .await
                .map_err(|e| self.err(e))?;
            if inserted == 0 {
                return Err(StoreError::AlreadyInitialized(format!(
                    "the database {}",
                    self.location
                )));
            }
            insert_root(&tx, first).await.map_err(|e| self.err(e))?;
            tx.commit().await.map_err(|e| self.err(e))
        }))
    }

    fn roots(&self) -> StoreFuture<'_, Vec<RootRecord>> {
        Box::pin(self.bounded(async move {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT id, state, not_after, cert_pem FROM roots ORDER BY id")
                .await
                .map_err(|e| self.err(e))?;
            let rows = client.query(&stmt, &[]).await.map_err(|e| self.err(e))?;
            rows.iter()
                .map(|r| {
                    let id: i64 = r.get(0);
                    Ok(RootRecord {
                        id,
                        state: RootState::parse(r.get(1))?,
                        not_after: r.get(2),
                        cert_pem: r.get::<_, Option<String>>(3).ok_or_else(|| {
                            StoreError::Corrupt(format!("root #{id} has no certificate"))
                        })?,
                    })
                })
                .collect()
        }))
    }

    fn versions(&self) -> StoreFuture<'_, StateVersions> {
        Box::pin(self.bounded(async move {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT name, version FROM versions")
                .await
                .map_err(|e| self.err(e))?;
            let rows = client.query(&stmt, &[]).await.map_err(|e| self.err(e))?;
            let mut out = StateVersions::default();
            for r in rows {
                match r.get::<_, &str>(0) {
                    "roots" => out.roots = r.get(1),
                    "revocations" => out.revocations = r.get(1),
                    _ => {}
                }
            }
            Ok(out)
        }))
    }

    fn change_roots<'a>(
        &'a self,
        expected_version: i64,
        change: &'a RootChange,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.bounded(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| self.err(e))?;
            // The row lock taken here also serializes concurrent rotation steps.
            let bumped = tx
                .execute(
                    "UPDATE versions SET version = version + 1 WHERE name = 'roots' AND version = $1",
                    &[&expected_version],
                )
                .await
                .map_err(|e| self.err(e))?;
            if bumped == 0 {
                return Err(StoreError::Conflict);
            }
            match change {
                RootChange::Add(root) => insert_root(&tx, root).await,
                RootChange::Activate { id, at } => {
                    match tx
                        .execute(
                            "UPDATE roots SET state = 'retiring' WHERE state = 'active'",
                            &[],
                        )
                        .await
                    {
                        Ok(_) => {
                            match tx
                                .execute("UPDATE roots SET state = 'active' WHERE id = $1", &[id])
                                .await
                            {
                                Ok(_) => {
                                    tx.execute(
                                        "INSERT INTO meta (key, value) VALUES ($1, $2) \
                                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                        &[&super::ACTIVATED_AT_KEY, &at.to_string()],
                                    )
                                    .await
                                }
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e),
                    }
                }
                RootChange::Retire => {
                    tx.execute(
                        "UPDATE roots SET state = 'retired' WHERE state = 'retiring'",
                        &[],
                    )
                    .await
                }
            }
            .map_err(|e| self.err(e))?;
            tx.commit().await.map_err(|e| self.err(e))
        }))
    }

    fn record_issuance<'a>(&'a self, record: &'a IssuanceRecord) -> StoreFuture<'a, Recorded> {
        // With the issuances that arrive meanwhile: one commit for them all.
        Box::pin(self.bounded(group::record(self, record.clone())))
    }

    fn token_used<'a>(&'a self, jti: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(self.bounded(async move {
            let client = self.client().await?;
            let row = client
                .query_opt("SELECT 1 FROM used_tokens WHERE jti = $1", &[&jti])
                .await
                .map_err(|e| self.err(e))?;
            Ok(row.is_some())
        }))
    }

    fn issued_count(&self) -> StoreFuture<'_, i64> {
        Box::pin(self.bounded(async move {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT count(*) FROM issued", &[])
                .await
                .map_err(|e| self.err(e))?;
            Ok(row.get(0))
        }))
    }

    fn issued_before_activation(&self, now: i64, grace: i64) -> StoreFuture<'_, BeforeActivation> {
        Box::pin(self.bounded(async move {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT value FROM meta WHERE key = $1",
                    &[&super::ACTIVATED_AT_KEY],
                )
                .await
                .map_err(|e| self.err(e))?;
            let Some(activated_at) = row.and_then(|r| r.get::<_, String>(0).parse::<i64>().ok())
            else {
                return Ok(BeforeActivation::default());
            };
            let row = client
                .query_one(
                    "SELECT count(*), max(not_after) FROM issued WHERE issued_at <= $1 AND not_after > $2",
                    &[&(activated_at + grace), &now],
                )
                .await
                .map_err(|e| self.err(e))?;
            Ok(BeforeActivation {
                activated_at: Some(activated_at),
                valid: row.get(0),
                last_not_after: row.get(1),
            })
        }))
    }

    fn revoke<'a>(&'a self, revocation: &'a NewRevocation) -> StoreFuture<'a, RevocationRecord> {
        Box::pin(self.bounded(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| self.err(e))?;
            match revoke(&tx, revocation).await.map_err(|e| self.err(e))? {
                Ok(record) => {
                    tx.commit().await.map_err(|e| self.err(e))?;
                    Ok(record)
                }
                // Dropping the transaction rolls the version bump back.
                Err(why) => Err(StoreError::Revocation(why)),
            }
        }))
    }

    fn unrevoke<'a>(&'a self, target: &'a RevocationTarget) -> StoreFuture<'a, u64> {
        Box::pin(self.bounded(async move {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| self.err(e))?;
            let removed = match target {
                RevocationTarget::Serial(serial) => {
                    tx.execute("DELETE FROM revocations WHERE serial = $1", &[serial])
                        .await
                }
                RevocationTarget::Id(id) => {
                    tx.execute(
                        "DELETE FROM revocations WHERE serial IS NULL AND spiffe_id = $1",
                        &[id],
                    )
                    .await
                }
            }
            .map_err(|e| self.err(e))?;
            if removed > 0 {
                tx.execute(
                    "UPDATE versions SET version = version + 1 WHERE name = 'revocations'",
                    &[],
                )
                .await
                .map_err(|e| self.err(e))?;
            }
            tx.commit().await.map_err(|e| self.err(e))?;
            Ok(removed)
        }))
    }

    fn revocations(&self, now: i64) -> StoreFuture<'_, Vec<RevocationRecord>> {
        Box::pin(self.bounded(async move {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {REVOCATION_COLUMNS} FROM revocations r WHERE r.until > $1 ORDER BY r.id"
                ))
                .await
                .map_err(|e| self.err(e))?;
            let rows = client.query(&stmt, &[&now]).await.map_err(|e| self.err(e))?;
            Ok(rows.iter().map(revocation_row).collect())
        }))
    }

    fn revocation_for<'a>(
        &'a self,
        serial: Option<&'a str>,
        spiffe_id: &'a str,
        now: i64,
    ) -> StoreFuture<'a, Option<RevocationRecord>> {
        Box::pin(self.bounded(async move {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {REVOCATION_COLUMNS} {COVERING_REVOCATION}"
                ))
                .await
                .map_err(|e| self.err(e))?;
            let row = client
                .query_opt(&stmt, &[&now, &spiffe_id, &serial])
                .await
                .map_err(|e| self.err(e))?;
            Ok(row.as_ref().map(revocation_row))
        }))
    }
}

/// [`Store::record_issuance`] without a token: `$1` now, `$2` the identity,
/// `$3` the presented serial, `$4..$6` serial, `not_after`, kind. One row:
/// the revocation's columns (all NULL when none) and how many issuances
/// were inserted.
static RECORD_ISSUANCE: LazyLock<String> = LazyLock::new(|| record_issuance_sql(false));

/// [`RECORD_ISSUANCE`] spending a join token: `$7` its ID, `$8` its expiry.
/// The primary key on `used_tokens.jti` makes the second of two concurrent
/// uses wait for the first to commit and then insert nothing.
static RECORD_ISSUANCE_SPENDING_TOKEN: LazyLock<String> =
    LazyLock::new(|| record_issuance_sql(true));

/// The statement behind [`RECORD_ISSUANCE`] and
/// [`RECORD_ISSUANCE_SPENDING_TOKEN`]: the covering revocation (as
/// [`Store::revocation_for`] asks it), then the token's use and the
/// issuance, each written only where no revocation was found.
fn record_issuance_sql(spending_token: bool) -> String {
    let (spent, issued_from) = if spending_token {
        (
            "spent AS ( \
               INSERT INTO used_tokens (jti, expires_at, used_at) \
               SELECT $7::text, $8::bigint, $1::bigint WHERE NOT EXISTS (SELECT 1 FROM rev) \
               ON CONFLICT (jti) DO NOTHING RETURNING jti), ",
            "FROM spent",
        )
    } else {
        ("", "WHERE NOT EXISTS (SELECT 1 FROM rev)")
    };
    format!(
        "WITH rev AS (SELECT {REVOCATION_COLUMNS} AS last {COVERING_REVOCATION}), \
         {spent}\
         ins AS ( \
           INSERT INTO issued (serial, spiffe_id, not_after, kind, issued_at) \
           SELECT $4::text, $2::text, $5::bigint, $6::text, $1::bigint {issued_from} \
           RETURNING 1) \
         SELECT rev.serial, rev.spiffe_id, rev.reason, rev.revoked_at, rev.until, rev.last, \
           (SELECT count(*) FROM ins) \
         FROM (SELECT 1) one LEFT JOIN rev ON true"
    )
}

/// The first revocation in force at `$1` that covers identity `$2` (one
/// of the identity's, with no serial) or the certificate with serial `$3`.
const COVERING_REVOCATION: &str = "FROM revocations r WHERE r.until > $1::bigint \
     AND ((r.serial IS NULL AND r.spiffe_id = $2::text) OR r.serial = $3::text) \
     ORDER BY r.id LIMIT 1";

/// The columns [`revocation_row`] reads (as SQLite's).
const REVOCATION_COLUMNS: &str = "r.serial, r.spiffe_id, r.reason, r.revoked_at, r.until, \
     CASE WHEN r.serial IS NULL THEN \
       (SELECT max(i.not_after) FROM issued i WHERE i.spiffe_id = r.spiffe_id) END";

fn revocation_row(r: &tokio_postgres::Row) -> RevocationRecord {
    let serial: Option<String> = r.get(0);
    let until: i64 = r.get(4);
    let last: Option<i64> = r.get(5);
    RevocationRecord {
        expires: RevocationRecord::effective_expiry(serial.as_deref(), until, last),
        serial,
        spiffe_id: r.get(1),
        reason: r.get(2),
        revoked_at: r.get(3),
        until,
    }
}

/// The revocation's writes, in `tx`; `Ok(Err(why))` for a refusal.
async fn revoke(
    tx: &Transaction<'_>,
    new: &NewRevocation,
) -> Result<Result<RevocationRecord, String>, tokio_postgres::Error> {
    // The version row's lock serializes revocations (and their reads of
    // `issued`) across replicas and CLIs.
    let version: i64 = tx
        .query_one(
            "UPDATE versions SET version = version + 1 WHERE name = 'revocations' RETURNING version",
            &[],
        )
        .await?
        .get(0);
    tx.execute("DELETE FROM revocations WHERE until <= $1", &[&new.now])
        .await?;
    let (serial, spiffe_id, until) = match &new.target {
        RevocationTarget::Serial(serial) => {
            let issued = tx
                .query_opt(
                    "SELECT spiffe_id, not_after FROM issued WHERE serial = $1",
                    &[serial],
                )
                .await?;
            let Some(row) = issued else {
                return Ok(Err(format!(
                    "no certificate with serial {serial} was issued by this CA (see the `issued` log lines of `moat ca serve`)"
                )));
            };
            let (id, not_after): (String, i64) = (row.get(0), row.get(1));
            tx.execute("DELETE FROM revocations WHERE serial = $1", &[serial])
                .await?;
            let until = new.until.map_or(not_after, |u| u.min(not_after));
            (Some(serial.clone()), id, until)
        }
        RevocationTarget::Id(id) => {
            tx.execute(
                "DELETE FROM revocations WHERE serial IS NULL AND spiffe_id = $1",
                &[id],
            )
            .await?;
            (None, id.clone(), new.until.unwrap_or(NO_END))
        }
    };
    let row = tx
        .query_one(
            "INSERT INTO revocations (serial, spiffe_id, reason, revoked_at, until, version) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            &[&serial, &spiffe_id, &new.reason, &new.now, &until, &version],
        )
        .await?;
    let id: i64 = row.get(0);
    let row = tx
        .query_one(
            &format!("SELECT {REVOCATION_COLUMNS} FROM revocations r WHERE r.id = $1"),
            &[&id],
        )
        .await?;
    Ok(Ok(revocation_row(&row)))
}

async fn insert_root(
    tx: &Transaction<'_>,
    root: &RootRecord,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO roots (id, state, not_after, cert_pem) VALUES ($1, $2, $3, $4)",
        &[
            &root.id,
            &root.state.as_str(),
            &root.not_after,
            &root.cert_pem,
        ],
    )
    .await
}

async fn current_version(tx: &Transaction<'_>) -> Result<i64, tokio_postgres::Error> {
    tx.query_one("SELECT coalesce(max(version), 0) FROM moat_schema", &[])
        .await
        .map(|r| r.get(0))
}

/// rustls for the database connection: the roots in `ca_file`, nothing else.
fn tls_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, String> {
    let bad = |e: &dyn std::fmt::Display| format!("store.ca_file {}: {e}", ca_file.display());
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no certificate in the file"));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| bad(&e))?;
    }
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The driver's error with its cause, on one line (the server's message
/// for database errors; the I/O error for connection failures).
/// True when the server refused the connection for who we are or what we
/// asked for: SQLSTATE class 28 (invalid authorization: a wrong password,
/// an unknown role, no `pg_hba.conf` entry) or 3D000 (no such database).
/// An unreachable server (refused, timed out, restarting: 57P03) is not.
fn is_refusal(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.as_db_error().is_some_and(|db| {
        db.code().code().starts_with("28") || *db.code() == SqlState::INVALID_CATALOG_NAME
    })
}

fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
