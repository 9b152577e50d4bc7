//! The deny-list as the CA publishes it to sidecars (`GET /v1/revocations`)
//! and as they parse it: a version, and entries that each name one
//! certificate (by serial) or every certificate of an identity, with the
//! time after which the entry no longer matters.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The most entries a sidecar accepts in one list. A list past it is
/// refused whole (and the last good one kept): a list that large is a
/// mistake to fix at the CA, not one to half-apply.
pub const MAX_ENTRIES: usize = 100_000;

/// The largest list body a sidecar reads (about 200 bytes an entry).
pub const MAX_BODY: usize = 32 << 20;

/// One version of the deny-list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    /// The CA store's revocations version this list is at.
    pub version: i64,
    /// What is revoked.
    pub entries: Vec<RevocationEntry>,
}

/// One revoked certificate or identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationEntry {
    /// The certificate's serial (lowercase hex); absent when the entry
    /// revokes a whole identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The identity: revoked whole when `serial` is absent, else the
    /// revoked certificate's (for logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Why, as the operator said.
    #[serde(default)]
    pub reason: String,
    /// Seconds since the epoch after which the entry can be dropped (every
    /// certificate it covers has expired, or the revocation ends).
    pub expires: i64,
}

/// `--until`: a duration from `now` (`2h`) or an RFC 3339 time.
pub fn parse_until(s: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now + d);
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|_| format!("{s:?} is neither a duration (2h) nor an RFC 3339 time"))
}
