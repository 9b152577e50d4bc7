//! Group commit for SQLite's issuance records: the issuances that arrive
//! while one commit waits for its fsync are recorded together in the next
//! transaction, so one fsync covers them all.
//!
//! `synchronous=FULL` makes every commit wait for an fsync of the WAL, and
//! the one connection serializes the commits: with one transaction per
//! issuance, the fsync sets the ceiling on issuances per second, and each
//! waiting issuance held a blocking-pool thread parked on the connection's
//! lock. Here an issuance joins a queue; the first to find no writer at
//! work starts one on the blocking pool, which takes everything queued,
//! records each in its own savepoint of one `BEGIN IMMEDIATE` transaction,
//! commits, answers each, and goes round again until the queue is empty.
//!
//! Nothing about what is recorded changes: each issuance is checked and
//! written exactly as alone (the revocation asked in the transaction that
//! writes, the token spent only with its issuance), and none is answered
//! before the commit that holds it is on disk. An issuance whose own writes
//! fail is rolled back to its savepoint and answered with the error; a
//! failed commit answers every issuance of the batch with the error (a
//! token refused as replayed within the batch included: nothing was
//! spent), except those a revocation refused, which wrote nothing.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, params};

use super::{Inner, db_err, revocation_for};
use crate::store::commit_queue::{Turn, answer};
use crate::store::{IssuanceRecord, Recorded, StoreError};
use crate::token::TokenError;

/// Queues `record` for the next group commit, starting a writer if none
/// is at work; resolves once the commit that holds it is on disk.
pub(super) async fn record(
    inner: &Arc<Inner>,
    record: IssuanceRecord,
) -> Result<Recorded, StoreError> {
    let (outcome, start) = inner.queue.join(record);
    if start {
        let writer = Writer {
            inner: inner.clone(),
            turn: Turn::new(inner.queue.clone()),
        };
        tokio::task::spawn_blocking(move || writer.run());
    }
    outcome.wait().await
}

/// The writer at work: everything queued, batch after batch, until the
/// queue is empty (its [`Turn`] says what happens if it stops early).
struct Writer {
    inner: Arc<Inner>,
    turn: Turn,
}

impl Writer {
    fn run(mut self) {
        while let Some(batch) = self.turn.next(usize::MAX) {
            let outcomes = {
                let mut conn = self.inner.conn.lock().expect("CA store lock");
                record_batch(&mut conn, &self.inner.path, batch.iter().map(|p| &p.record))
            };
            answer(batch, outcomes);
        }
    }
}

/// Records each issuance of a batch in one transaction, each in its own
/// savepoint; one outcome per record, in order.
fn record_batch<'a>(
    conn: &mut Connection,
    path: &Path,
    records: impl ExactSizeIterator<Item = &'a IssuanceRecord>,
) -> Vec<Result<Recorded, StoreError>> {
    let n = records.len();
    // Immediate: the write lock first, so the revocation read cannot go
    // stale under a concurrent `moat ca revoke` (a deferred transaction
    // upgrading to write would fail with BUSY_SNAPSHOT instead of waiting).
    let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return (0..n).map(|_| Err(db_err(path, copy_err(&e)))).collect(),
    };
    let mut outcomes = Vec::with_capacity(n);
    let mut failed = None;
    for record in records {
        if let Some(e) = &failed {
            outcomes.push(Err(db_err(path, copy_err(e))));
            continue;
        }
        let outcome = tx
            .savepoint()
            .map_err(|source| db_err(path, source))
            .and_then(|sp| {
                let outcome = record_one(&sp, path, record)?;
                // Released only when it wrote; otherwise dropping it rolls
                // back (nothing was written).
                if outcome == Recorded::Issued {
                    sp.commit().map_err(|source| db_err(path, source))?;
                }
                Ok(outcome)
            });
        // SQLite may roll the whole transaction back on some errors (a full
        // disk, I/O): the rest of the batch must not run outside it.
        if outcome.is_err() && tx.is_autocommit() {
            failed = Some(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("the transaction was rolled back".into()),
            ));
        }
        outcomes.push(outcome);
    }
    let committed = match failed {
        Some(e) => Err(e),
        None => tx.commit(),
    };
    if let Err(e) = committed {
        for outcome in &mut outcomes {
            if !matches!(outcome, Ok(Recorded::Revoked(_))) {
                *outcome = Err(db_err(path, copy_err(&e)));
            }
        }
    }
    outcomes
}

/// One issuance in the current transaction: the revocation check, the
/// token's use, the issuance (see [`crate::store::Store::record_issuance`]).
fn record_one(
    conn: &Connection,
    path: &Path,
    record: &IssuanceRecord,
) -> Result<Recorded, StoreError> {
    let revoked = revocation_for(
        conn,
        record.presented_serial.as_deref(),
        &record.spiffe_id,
        record.issued_at,
    )
    .map_err(|source| db_err(path, source))?;
    if let Some(revocation) = revoked {
        return Ok(Recorded::Revoked(revocation));
    }
    if let Some((jti, expires)) = &record.single_use {
        let inserted = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO used_tokens (jti, expires_at, used_at) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut stmt| stmt.execute(params![jti, expires, record.issued_at]))
            .map_err(|source| db_err(path, source))?;
        if inserted == 0 {
            return Err(StoreError::Token(TokenError::Replayed));
        }
    }
    conn.prepare_cached(
        "INSERT INTO issued (serial, spiffe_id, not_after, kind, issued_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            record.serial,
            record.spiffe_id,
            record.not_after,
            record.kind,
            record.issued_at
        ])
    })
    .map_err(|source| db_err(path, source))?;
    Ok(Recorded::Issued)
}

/// The same error again, for each issuance a failed commit answers
/// (`rusqlite::Error` is not `Clone`): SQLite's codes are kept, so a full
/// disk is still reported as one.
fn copy_err(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn record(serial: &str, id: &str, token: Option<&str>) -> IssuanceRecord {
        IssuanceRecord {
            serial: serial.to_owned(),
            spiffe_id: id.to_owned(),
            not_after: 2_000_000_000,
            kind: if token.is_some() {
                "join_token"
            } else {
                "renewal"
            },
            issued_at: 1_000_000_000,
            single_use: token.map(|jti| (jti.to_owned(), 2_000_000_000)),
            presented_serial: None,
        }
    }

    /// One batch answers each issuance as if it had been recorded alone: a
    /// token's second use is a replay, a revoked identity writes nothing,
    /// and an issuance whose own insert fails is rolled back to its
    /// savepoint (its token not spent) while the rest commit.
    #[test]
    fn each_issuance_of_a_batch_is_answered_as_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("ca.db"), dir.path()).unwrap();
        let mut conn = store.inner.conn.lock().unwrap();
        conn.execute(
            "INSERT INTO revocations (serial, spiffe_id, reason, revoked_at, until, version) \
             VALUES (NULL, 'spiffe://example.org/revoked', 'test', 0, 3000000000, 1)",
            [],
        )
        .unwrap();
        let batch = [
            record("01", "spiffe://example.org/a", Some("token-1")),
            record("02", "spiffe://example.org/a", Some("token-1")),
            record("03", "spiffe://example.org/revoked", Some("token-2")),
            record("04", "spiffe://example.org/b", None),
            // The same serial again: its insert fails after its token's.
            record("04", "spiffe://example.org/c", Some("token-3")),
            record("05", "spiffe://example.org/c", None),
        ];
        let outcomes = record_batch(&mut conn, dir.path(), batch.iter());
        assert!(matches!(outcomes[0], Ok(Recorded::Issued)), "{outcomes:?}");
        assert!(
            matches!(outcomes[1], Err(StoreError::Token(TokenError::Replayed))),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[2], Ok(Recorded::Revoked(_))),
            "{outcomes:?}"
        );
        assert!(matches!(outcomes[3], Ok(Recorded::Issued)), "{outcomes:?}");
        assert!(
            matches!(outcomes[4], Err(StoreError::Db { .. })),
            "{outcomes:?}"
        );
        assert!(matches!(outcomes[5], Ok(Recorded::Issued)), "{outcomes:?}");
        let column = |sql: &str| -> Vec<String> {
            conn.prepare(sql)
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert_eq!(
            column("SELECT serial FROM issued ORDER BY serial"),
            ["01", "04", "05"]
        );
        assert_eq!(
            column("SELECT jti FROM used_tokens ORDER BY jti"),
            ["token-1"]
        );
    }

    /// Concurrent issuances through the queue: each answered, every one
    /// recorded once, a token spent by exactly one of its uses.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_issuances_are_each_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("ca.db"), dir.path()).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64 {
            let inner = store.inner.clone();
            let token = (i % 8 == 0).then_some("shared");
            let r = record(&format!("{i:02x}"), "spiffe://example.org/a", token);
            tasks.spawn(async move { super::record(&inner, r).await });
        }
        let (mut issued, mut replayed) = (0, 0);
        while let Some(outcome) = tasks.join_next().await {
            match outcome.unwrap() {
                Ok(Recorded::Issued) => issued += 1,
                Err(StoreError::Token(TokenError::Replayed)) => replayed += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((issued, replayed), (57, 7));
        let count: i64 = store
            .inner
            .conn
            .lock()
            .unwrap()
            .query_row("SELECT count(*) FROM issued", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 57);
    }
}
