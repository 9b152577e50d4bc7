//! What the server keeps current from its state store, polled once a
//! second: the store's health (behind `/ready`), the deny-list served at
//! `/v1/revocations`, and the signing state ([`super::signing`]). Several
//! replicas share one store, so a rotation or a revocation made through
//! another replica reaches this one within the second.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::signing::build_snapshot;
use super::{ServerError, ServerState};
use crate::store::{CaDir, RevocationRecord, StoreError};

/// The deny-list as last read from the store.
#[derive(Default)]
pub(super) struct Revocations {
    /// `versions.revocations` when it was read.
    pub(super) version: i64,
    pub(super) entries: Vec<RevocationRecord>,
}

/// Reads the deny-list and its version.
pub(super) async fn load_revocations(ca: &CaDir) -> Result<Revocations, StoreError> {
    // The version first: a change in between is read again at the next poll.
    let version = ca.versions().await?.revocations;
    let entries = ca.revocations().await?;
    Ok(Revocations { version, entries })
}

/// Why `/ready` is false while the store does not answer; the one text
/// the poll and a refused issuance both set, so neither sees a change
/// (and logs it again) when the other already did.
pub(super) const STORE_UNREACHABLE: &str = "the CA's state database is unreachable";

/// Logs the store going away, once per outage (the caller logs only when
/// it is the one that marked the store down).
pub(super) fn log_store_unreachable(ca: &CaDir, e: &StoreError) {
    tracing::error!(error = %e, store = ca.store().location(), "the CA's state store is unreachable: issuance answers 503 and /ready is false until it is back");
}

/// Polls the store's version counters every second (one small query);
/// rebuilds the signing state when a rotation step, here or on another
/// replica, moved them, or when the serving certificate is half-way
/// through its life. The poll is also the store's health check behind
/// `/ready`: a store that does not answer makes the CA unready until it
/// does again, with nothing to restart.
pub(super) async fn refresh_loop(state: Arc<ServerState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let health = state.metrics.health();
    loop {
        tick.tick().await;
        let current = state.snapshot.load();
        let versions = match state.ca.versions().await {
            Ok(v) => v,
            Err(e) => {
                if health.set_store(Some(STORE_UNREACHABLE)) {
                    log_store_unreachable(&state.ca, &e);
                } else {
                    tracing::debug!(error = %e, "the CA's state store is still unreachable");
                }
                continue;
            }
        };
        if health.set_store(None) {
            tracing::info!(
                store = state.ca.store().location(),
                "the CA's state store is reachable again"
            );
        }
        if versions.revocations != state.revocations.load().version {
            match load_revocations(&state.ca).await {
                Ok(list) => {
                    tracing::info!(
                        version = list.version,
                        entries = list.entries.len(),
                        "revocations reloaded"
                    );
                    state.revocations.store(Arc::new(list));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload revocations; serving the current list");
                }
            }
        }
        // Only a rotation changes the signing state.
        if versions.roots == current.versions.roots
            && health.signing_problem().is_none()
            && SystemTime::now() < current.refresh_at
        {
            continue;
        }
        let next = match state.ca.signing_state().await {
            Ok(signing) => {
                let records = signing.roots.clone();
                build_snapshot(signing, &state.sans).map(|s| (s, records))
            }
            Err(e) => Err(e.into()),
        };
        match next {
            Ok((next, records)) => {
                state.metrics.roots(&records);
                // Logged once in force: a watcher of this line (an operator,
                // a test) then sees the new roots served.
                let next = Arc::new(next);
                state.snapshot.store(next.clone());
                tracing::info!(roots = ?next.roots, version = next.versions.roots, "signing state reloaded");
                if health.set_signing(None) {
                    tracing::info!("signing again");
                }
            }
            Err(ServerError::Store(e @ StoreError::KeyMissing { .. })) => {
                if health.set_signing(Some(e.to_string())) {
                    tracing::error!(error = %e, "cannot sign with the active root: issuance answers 503 and /ready is false until the key is installed");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the signing state; keeping the current one");
            }
        }
    }
}
