//! `moat ca migrate --from-sqlite`: a SQLite CA's whole state copied into
//! an empty PostgreSQL store, in one transaction: the trust domain, every
//! root with its rotation state, the version counters, every issuance,
//! every spent join-token ID and every revocation. Either all of it lands or
//! none does; a store that already holds a CA is refused.

use super::{PgStore, SqliteStore, Store, StoreError};

/// Rows per statement when copying the large tables.
const BATCH: i64 = 5000;

/// What was copied.
#[derive(Debug, Clone, Default)]
pub struct CopyReport {
    /// The trust domain.
    pub trust_domain: String,
    /// Roots.
    pub roots: usize,
    /// Issuance records.
    pub issued: u64,
    /// Spent join-token IDs.
    pub used_tokens: u64,
    /// Revocations.
    pub revocations: usize,
}

/// Copies everything `src` holds into `dst`, which must hold no CA.
///
/// Reads from SQLite block the calling thread: this runs in the `moat ca
/// migrate` command, not in a server.
pub async fn copy_sqlite_to_postgres(
    src: &SqliteStore,
    dst: &PgStore,
) -> Result<CopyReport, StoreError> {
    let trust_domain = src.export_trust_domain()?.ok_or_else(|| {
        StoreError::NotInitialized(format!("{} holds no CA to copy", src.location()))
    })?;
    let roots = src.export_roots()?;
    let activated_at = src.export_activated_at()?;
    let versions = src.export_versions()?;
    let revocations = src.export_revocations()?;
    let mut report = CopyReport {
        trust_domain: trust_domain.clone(),
        roots: roots.len(),
        revocations: revocations.len(),
        ..Default::default()
    };

    let mut client = dst.client().await?;
    let tx = client.transaction().await.map_err(|e| dst.err(e))?;
    let fresh = tx
        .execute(
            "INSERT INTO meta (key, value) VALUES ('trust_domain', $1) ON CONFLICT (key) DO NOTHING",
            &[&trust_domain],
        )
        .await
        .map_err(|e| dst.err(e))?;
    if fresh == 0 {
        return Err(StoreError::AlreadyInitialized(format!(
            "the database {}",
            dst.location()
        )));
    }
    // What `rotate --retire` checks a rotation under way against.
    if let Some(at) = &activated_at {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2)",
            &[&super::ACTIVATED_AT_KEY, at],
        )
        .await
        .map_err(|e| dst.err(e))?;
    }
    for root in &roots {
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
        .map_err(|e| dst.err(e))?;
    }
    for (name, version) in [
        ("roots", versions.roots),
        ("revocations", versions.revocations),
    ] {
        tx.execute(
            "UPDATE versions SET version = $2 WHERE name = $1",
            &[&name, &version],
        )
        .await
        .map_err(|e| dst.err(e))?;
    }

    let issued = tx
        .prepare(
            "INSERT INTO issued (serial, spiffe_id, not_after, kind, issued_at) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[])",
        )
        .await
        .map_err(|e| dst.err(e))?;
    let mut after = 0;
    loop {
        let (rows, last) = src.export_issued(after, BATCH)?;
        if rows.is_empty() {
            break;
        }
        after = last;
        let serials: Vec<&str> = rows.iter().map(|r| r.serial.as_str()).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.spiffe_id.as_str()).collect();
        let not_after: Vec<i64> = rows.iter().map(|r| r.not_after).collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
        let issued_at: Vec<i64> = rows.iter().map(|r| r.issued_at).collect();
        report.issued += tx
            .execute(&issued, &[&serials, &ids, &not_after, &kinds, &issued_at])
            .await
            .map_err(|e| dst.err(e))?;
    }

    let used = tx
        .prepare(
            "INSERT INTO used_tokens (jti, expires_at, used_at) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])",
        )
        .await
        .map_err(|e| dst.err(e))?;
    let mut after = 0;
    loop {
        let (rows, last) = src.export_used_tokens(after, BATCH)?;
        if rows.is_empty() {
            break;
        }
        after = last;
        let jtis: Vec<&str> = rows.iter().map(|r| r.jti.as_str()).collect();
        let expires: Vec<i64> = rows.iter().map(|r| r.expires_at).collect();
        let used_at: Vec<i64> = rows.iter().map(|r| r.used_at).collect();
        report.used_tokens += tx
            .execute(&used, &[&jtis, &expires, &used_at])
            .await
            .map_err(|e| dst.err(e))?;
    }

    for r in &revocations {
        tx.execute(
            "INSERT INTO revocations (id, serial, spiffe_id, reason, revoked_at, until, version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &r.id,
                &r.serial,
                &r.spiffe_id,
                &r.reason,
                &r.revoked_at,
                &r.until,
                &r.version,
            ],
        )
        .await
        .map_err(|e| dst.err(e))?;
    }
    if !revocations.is_empty() {
        tx.execute(
            "SELECT setval(pg_get_serial_sequence('revocations', 'id'), (SELECT max(id) FROM revocations))",
            &[],
        )
        .await
        .map_err(|e| dst.err(e))?;
    }
    tx.commit().await.map_err(|e| dst.err(e))?;
    Ok(report)
}
