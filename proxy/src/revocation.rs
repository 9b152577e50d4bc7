//! The deny-list: what the CA says is revoked, as this sidecar enforces it.
//!
//! The CA task ([`crate::identity::CaSource`]) polls the CA's
//! `GET /v1/revocations?since=V` over the mutual TLS it renews with, every
//! [`POLL_INTERVAL`], and publishes each new version here. A short poll
//! rather than a long-poll: it goes through any load balancer to any CA
//! replica, holds no connection open against the CA's `max_connections`,
//! and costs one small request (`304` when nothing changed). With the CA
//! replicas reading their store every second, a revocation reaches every
//! sidecar within about five seconds.
//!
//! The peer verifiers ([`crate::tls::verify`]) look each handshake's leaf
//! up here: two hash lookups (serial, identity), no allocation. When the CA
//! cannot be reached the last good list stays in force however old it is
//! (its age is in `/identity` and `moat_revocation_list_age_seconds`):
//! failing open on a CA outage would undo revocations, and failing closed
//! would turn one into an outage of every service.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use moat_ca::revocation::{RevocationEntry, RevocationList};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// How often a sidecar asks the CA whether the deny-list changed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(3);

/// One version of the deny-list, indexed for the handshake path.
#[derive(Debug, Default)]
pub struct DenyList {
    /// The CA's version; `None` before the first fetch.
    version: Option<i64>,
    /// Raw serial bytes → entry.
    serials: HashMap<Vec<u8>, Revoked>,
    /// Revoked identity → entry.
    ids: HashMap<String, Revoked>,
}

/// Why and until when something is revoked.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The operator's reason.
    pub reason: String,
    /// Seconds since the epoch after which the entry no longer applies.
    pub expires: i64,
    /// The serial, hex, for a certificate's revocation.
    pub serial: Option<String>,
}

/// The current deny-list, when it was last confirmed by the CA, and a
/// notification for each change.
#[derive(Debug)]
pub struct RevocationState {
    list: ArcSwap<DenyList>,
    /// Unix seconds of the last answer from the CA (a new list or `304`);
    /// 0 before the first.
    checked_at: AtomicI64,
    changed: watch::Sender<u64>,
    metrics: RevocationMetrics,
}

/// The deny-list's and the connection registry's metrics.
#[derive(Debug, Clone, Default)]
pub struct RevocationMetrics {
    /// The deny-list's version (-1 before the first fetch).
    pub version: Gauge,
    /// Seconds since the CA last confirmed the list.
    pub age: Gauge,
    /// Entries in force.
    pub entries: Gauge,
    /// Failed polls of the CA.
    pub fetch_failures: Counter,
    /// Open connections closed because their credential lapsed, by reason.
    pub closed: Family<[(&'static str, &'static str); 1], Counter>,
}

impl DenyList {
    /// Indexes `list`, leaving out entries that expired before `now` and
    /// entries whose serial is not hex.
    pub fn new(list: &RevocationList, now: i64) -> Self {
        let mut out = Self {
            version: Some(list.version),
            ..Self::default()
        };
        for RevocationEntry {
            serial,
            spiffe_id,
            reason,
            expires,
        } in &list.entries
        {
            if *expires <= now {
                continue;
            }
            let revoked = Revoked {
                reason: reason.clone(),
                expires: *expires,
                serial: serial.clone(),
            };
            match (serial, spiffe_id) {
                (Some(serial), _) => match decode_hex(serial) {
                    Some(raw) => {
                        out.serials.insert(raw, revoked);
                    }
                    None => tracing::warn!(serial, "revocation list: not a hex serial; ignored"),
                },
                (None, Some(id)) => {
                    out.ids.insert(id.clone(), revoked);
                }
                (None, None) => {}
            }
        }
        out
    }

    /// The entry revoking a certificate with this raw serial or this
    /// identity at `now` (Unix seconds), if any.
    pub fn revoked(&self, serial: &[u8], id: &str, now: i64) -> Option<&Revoked> {
        if self.is_empty() {
            return None;
        }
        self.serials
            .get(serial)
            .or_else(|| self.ids.get(id))
            .filter(|r| r.expires > now)
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty() && self.ids.is_empty()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.serials.len() + self.ids.len()
    }

    /// The CA's version, once fetched.
    pub fn version(&self) -> Option<i64> {
        self.version
    }
}

impl Default for RevocationState {
    fn default() -> Self {
        Self::new(RevocationMetrics::default())
    }
}

impl RevocationState {
    /// An empty list (nothing revoked, never fetched), reporting to `metrics`.
    pub fn new(metrics: RevocationMetrics) -> Self {
        metrics.version.set(-1);
        Self {
            list: ArcSwap::from_pointee(DenyList::default()),
            checked_at: AtomicI64::new(0),
            changed: watch::Sender::new(0),
            metrics,
        }
    }

    /// The current list (lock-free).
    pub fn current(&self) -> arc_swap::Guard<Arc<DenyList>> {
        self.list.load()
    }

    /// Publishes a new version: new handshakes see it at once, and the
    /// connection registry closes what it revokes.
    pub fn publish(&self, list: &RevocationList) {
        let now = unix_now();
        let indexed = DenyList::new(list, now);
        self.metrics.version.set(list.version);
        self.metrics.entries.set(indexed.len() as i64);
        tracing::info!(
            version = list.version,
            entries = indexed.len(),
            "revocation list updated"
        );
        self.list.store(Arc::new(indexed));
        self.checked(now);
        self.changed.send_modify(|v| *v += 1);
    }

    /// The CA confirmed the list (or sent a new one) at `now`.
    pub fn checked(&self, now: i64) {
        self.checked_at.store(now, Ordering::Relaxed);
        self.metrics.age.set(0);
    }

    /// A poll failed: the list stays; its age grows.
    pub fn check_failed(&self) {
        self.metrics.fetch_failures.inc();
        self.update_age();
    }

    /// Sets the age gauge from the last confirmation.
    pub fn update_age(&self) {
        if let Some(age) = self.age() {
            self.metrics.age.set(age.as_secs() as i64);
        }
    }

    /// How long ago the CA last confirmed the list; `None` before the first time.
    pub fn age(&self) -> Option<Duration> {
        match self.checked_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_secs((unix_now() - at).max(0) as u64)),
        }
    }

    /// Notified at each new version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Counts one connection closed for `reason`.
    pub fn count_closed(&self, reason: &'static str) {
        self.metrics
            .closed
            .get_or_create(&[("reason", reason)])
            .inc();
    }
}

impl RevocationMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "moat_revocation_list_version",
            "Version of the deny-list this sidecar enforces (-1: none fetched yet)",
            m.version.clone(),
        );
        registry.register(
            "moat_revocation_list_age_seconds",
            "Seconds since the CA last confirmed the deny-list (grows while the CA is unreachable)",
            m.age.clone(),
        );
        registry.register(
            "moat_revocation_list_entries",
            "Revoked certificates and identities in the deny-list",
            m.entries.clone(),
        );
        registry.register(
            "moat_revocation_list_fetch_failures",
            "Polls of the CA for the deny-list that failed",
            m.fetch_failures.clone(),
        );
        registry.register(
            "moat_connections_closed",
            "Open connections closed because the peer's credential lapsed, by reason (revoked, peer_cert_expired, root_retired, policy)",
            m.closed.clone(),
        );
        m
    }
}

/// Now, in seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(serial: Option<&str>, id: Option<&str>, expires: i64) -> RevocationEntry {
        RevocationEntry {
            serial: serial.map(str::to_owned),
            spiffe_id: id.map(str::to_owned),
            reason: "test".into(),
            expires,
        }
    }

    #[test]
    fn serials_and_identities_are_revoked_until_they_expire() {
        let list = RevocationList {
            version: 3,
            entries: vec![
                entry(Some("40ab"), Some("spiffe://td/a"), 200),
                entry(None, Some("spiffe://td/b"), 200),
                entry(None, Some("spiffe://td/gone"), 50),
                entry(Some("zz"), None, 200),
            ],
        };
        let deny = DenyList::new(&list, 100);
        assert_eq!(deny.version(), Some(3));
        assert_eq!(
            deny.len(),
            2,
            "the expired and the malformed entries are left out"
        );
        // A serial revokes that certificate only, not its identity.
        assert!(deny.revoked(&[0x40, 0xab], "spiffe://td/a", 100).is_some());
        assert!(deny.revoked(&[0x40, 0xac], "spiffe://td/a", 100).is_none());
        // An identity revokes every certificate of it.
        assert!(deny.revoked(&[1], "spiffe://td/b", 100).is_some());
        // Past its expiry an entry no longer applies.
        assert!(deny.revoked(&[1], "spiffe://td/b", 200).is_none());
        assert!(deny.revoked(&[1], "spiffe://td/gone", 100).is_none());
    }

    #[test]
    fn ten_thousand_entries_are_two_hash_lookups() {
        let entries = (0..10_000u32)
            .map(|i| entry(Some(&format!("{i:08x}")), None, i64::MAX))
            .collect();
        let deny = DenyList::new(
            &RevocationList {
                version: 1,
                entries,
            },
            0,
        );
        assert_eq!(deny.len(), 10_000);
        assert!(
            deny.revoked(&[0, 0, 0x27, 0x0f], "spiffe://td/x", 1)
                .is_some()
        );
        assert!(deny.revoked(&[0xff; 16], "spiffe://td/x", 1).is_none());
    }
}
