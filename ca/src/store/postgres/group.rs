//! Group commit for PostgreSQL's issuance records: the issuances that
//! arrive while one batch is on its way are recorded together in the next
//! transaction, so one commit (one WAL flush) covers them all.
//!
//! With an autocommit statement per issuance, each issuance paid a round
//! trip, a pooled connection's wake-ups and a commit of its own: ~120-190 µs
//! of PostgreSQL's CPU and ~80 µs more of the CA's per renewal, on a box
//! where the renewals are CPU-bound (benches/results/criterion.md). Here an
//! issuance joins a queue; the first to find no writer at work starts one (a
//! task), which takes what is queued (at most [`MAX_BATCH`]), sends each
//! issuance's statement, the same one as alone, pipelined in one
//! transaction on one connection, commits, answers each, and goes round
//! again until the queue is empty.
//!
//! Nothing about what is recorded changes: each issuance is checked and
//! written exactly as alone (the revocation asked in the statement that
//! writes, the token spent only with its issuance, a second use of a token
//! within the batch finding the first's row), and none is answered before
//! the commit that holds it returned. Token-spending issuances go in `jti`
//! order, so two replicas' batches take the token rows' locks in one order.
//! A statement the server refuses (a unique violation, a deadlock) rolls the
//! whole transaction back: the batch's issuances are then recorded again one
//! by one, as without group commit, so each error is its own. A failure to
//! reach the database (the pool, the connection, the time limit) answers
//! every issuance of the batch with that error, as it would have answered
//! each alone.

use deadpool_postgres::Object;
use futures_util::future::try_join_all;

use super::{PgStore, RECORD_ISSUANCE, RECORD_ISSUANCE_SPENDING_TOKEN, describe};
use crate::store::commit_queue::{Turn, answer};
use crate::store::{IssuanceRecord, Recorded, StoreError};
use crate::token::TokenError;

/// The most issuances one transaction records; more wait for the next.
const MAX_BATCH: usize = 128;

/// Queues `record` for the next group commit, starting a writer if none
/// is at work; resolves once the commit that holds it returned.
pub(super) async fn record(
    store: &PgStore,
    record: IssuanceRecord,
) -> Result<Recorded, StoreError> {
    let (outcome, start) = store.queue.join(record);
    if start {
        let writer = Writer {
            store: store.clone(),
            turn: Turn::new(store.queue.clone()),
        };
        tokio::spawn(writer.run());
    }
    outcome.wait().await
}

/// The writer at work: batches of at most [`MAX_BATCH`] until the queue is
/// empty (its [`Turn`] says what happens if it stops early).
struct Writer {
    store: PgStore,
    turn: Turn,
}

impl Writer {
    async fn run(mut self) {
        while let Some(batch) = self.turn.next(MAX_BATCH) {
            let records: Vec<&IssuanceRecord> = batch.iter().map(|p| &p.record).collect();
            let outcomes = record_batch(&self.store, &records).await;
            answer(batch, outcomes);
        }
    }
}

/// One outcome per record, in order: together in one transaction, or one
/// by one when the server refused a statement of the batch.
async fn record_batch(
    store: &PgStore,
    records: &[&IssuanceRecord],
) -> Vec<Result<Recorded, StoreError>> {
    let together = store
        .bounded(async {
            let mut client = store.client().await?;
            Ok(together(&mut client, records).await)
        })
        .await;
    let refused = match together {
        Ok(Ok(outcomes)) => return outcomes,
        Ok(Err(e)) if records.len() > 1 && e.as_db_error().is_some() => e,
        Ok(Err(e)) => return each(store, store.err(e), records.len()),
        Err(e) => return each(store, e, records.len()),
    };
    tracing::debug!(
        error = %describe(&refused),
        issuances = records.len(),
        "a group commit was rolled back; recording its issuances one by one"
    );
    let mut outcomes = Vec::with_capacity(records.len());
    for record in records {
        outcomes.push(store.bounded(alone(store, record)).await);
    }
    outcomes
}

/// The batch in one transaction: every statement sent before the first
/// answer is awaited, then the commit.
async fn together(
    client: &mut Object,
    records: &[&IssuanceRecord],
) -> Result<Vec<Result<Recorded, StoreError>>, tokio_postgres::Error> {
    let plain = client.prepare_cached(&RECORD_ISSUANCE).await?;
    let spending = client
        .prepare_cached(&RECORD_ISSUANCE_SPENDING_TOKEN)
        .await?;
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| records[i].single_use.as_ref().map(|(jti, _)| jti));
    let tx = client.transaction().await?;
    let rows = try_join_all(order.iter().map(|&i| {
        let record = records[i];
        let statement = if record.single_use.is_some() {
            &spending
        } else {
            &plain
        };
        let tx = &tx;
        async move { tx.query_one(statement, &params(record)).await }
    }))
    .await?;
    tx.commit().await?;
    let mut outcomes: Vec<Option<Result<Recorded, StoreError>>> =
        (0..records.len()).map(|_| None).collect();
    for (&i, row) in order.iter().zip(&rows) {
        outcomes[i] = Some(outcome(row));
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("one row per issuance"))
        .collect())
}

/// One issuance in its own transaction (its one statement).
async fn alone(store: &PgStore, record: &IssuanceRecord) -> Result<Recorded, StoreError> {
    let client = store.client().await?;
    let sql = if record.single_use.is_some() {
        &*RECORD_ISSUANCE_SPENDING_TOKEN
    } else {
        &*RECORD_ISSUANCE
    };
    let statement = client.prepare_cached(sql).await.map_err(|e| store.err(e))?;
    let row = client
        .query_one(&statement, &params(record))
        .await
        .map_err(|e| store.err(e))?;
    outcome(&row)
}

/// The statement's parameters for `record` (see [`RECORD_ISSUANCE`]).
fn params(record: &IssuanceRecord) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
        &record.issued_at,
        &record.spiffe_id,
        &record.presented_serial,
        &record.serial,
        &record.not_after,
        &record.kind,
    ];
    if let Some((jti, expires_at)) = &record.single_use {
        params.push(jti);
        params.push(expires_at);
    }
    params
}

/// What the statement's one row says: revoked, the token already spent,
/// or recorded.
fn outcome(row: &tokio_postgres::Row) -> Result<Recorded, StoreError> {
    // A revocation's reason is never NULL: a NULL one is no row.
    if row.get::<_, Option<&str>>(2).is_some() {
        return Ok(Recorded::Revoked(super::revocation_row(row)));
    }
    if row.get::<_, i64>(6) == 0 {
        return Err(StoreError::Token(TokenError::Replayed));
    }
    Ok(Recorded::Issued)
}

/// `e` for each of `n` issuances (the error is not `Clone`; the two kinds
/// a batch can meet are rebuilt, anything else is described).
fn each(store: &PgStore, e: StoreError, n: usize) -> Vec<Result<Recorded, StoreError>> {
    let again = |e: &StoreError| match e {
        StoreError::Postgres { location, message } => StoreError::Postgres {
            location: location.clone(),
            message: message.clone(),
        },
        StoreError::Timeout { location, timeout } => StoreError::Timeout {
            location: location.clone(),
            timeout: *timeout,
        },
        other => StoreError::Postgres {
            location: store.location.to_string(),
            message: other.to_string(),
        },
    };
    let mut outcomes: Vec<_> = (1..n).map(|_| Err(again(&e))).collect();
    outcomes.push(Err(e));
    outcomes
}
