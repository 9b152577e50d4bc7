//! Resolving `[[destination]] host` names, with the time each answer may
//! be kept: the records' TTL, clamped to [`MIN_REFRESH`]..`dns_refresh`.
//!
//! [`System`] is hickory's stub resolver on the system configuration
//! (`/etc/resolv.conf`, with its `search` and `ndots`, and `/etc/hosts`),
//! because tokio's `lookup_host` (getaddrinfo) gives no TTL. Where the
//! system configuration cannot be read, it falls back to getaddrinfo and
//! keeps each answer for `dns_refresh`, as before TTLs were read.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;

/// The shortest time an answer is kept, whatever its TTL (a TTL of 0 or 1
/// would otherwise have moat query its resolver in a tight loop), unless
/// `dns_refresh` is shorter still.
pub(crate) const MIN_REFRESH: Duration = Duration::from_secs(5);

/// One successful lookup: the addresses, and how long the records say they
/// hold (`None`: the source gives no TTL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The name's addresses (IPv4 and IPv6), not empty.
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL among the records.
    pub ttl: Option<Duration>,
}

/// Something that resolves host names (the system, or a test's script).
pub(crate) trait Lookup {
    /// The addresses of `host`, or why there are none.
    fn lookup(&self, host: &str) -> impl Future<Output = Result<Answer, String>> + Send;
}

/// How long to keep an answer whose records hold for `ttl`, given
/// `dns_refresh` (`max`): the TTL within [`MIN_REFRESH`]..`max`; `max`
/// when there is no TTL.
pub(crate) fn keep_for(ttl: Option<Duration>, max: Duration) -> Duration {
    ttl.map_or(max, |t| t.clamp(MIN_REFRESH.min(max), max))
}

/// How long to wait before asking again after a failed lookup (the last
/// good addresses are kept meanwhile).
pub(crate) fn retry_after(max: Duration) -> Duration {
    MIN_REFRESH.min(max)
}

/// The system's resolver, as configured when it was made.
pub(crate) enum System {
    /// hickory on `/etc/resolv.conf` and `/etc/hosts`, and the nameservers
    /// it asks (named in a failed lookup's error: hickory's own, such as
    /// `no connections available`, does not say whom it could not reach).
    Hickory(Box<TokioResolver>, String),
    /// getaddrinfo (no TTL): the system configuration did not load.
    Getaddrinfo,
}

impl System {
    /// A resolver on the system configuration as it is now (made for each
    /// round of lookups, so that edits to `/etc/resolv.conf` and
    /// `/etc/hosts` are followed, as getaddrinfo follows them).
    pub(crate) fn new() -> Self {
        let built = hickory_resolver::system_conf::read_system_conf().and_then(|(config, opts)| {
            let servers: Vec<String> = config
                .name_servers()
                .iter()
                .map(|ns| ns.ip.to_string())
                .collect();
            let mut builder = TokioResolver::builder_with_config(config, Default::default());
            *builder.options_mut() = opts;
            builder.build().map(|r| (r, servers))
        });
        match built {
            Ok((r, servers)) => {
                let servers = if servers.is_empty() {
                    "no nameserver in /etc/resolv.conf".to_owned()
                } else {
                    format!("nameserver {} of /etc/resolv.conf", servers.join(", "))
                };
                Self::Hickory(Box::new(r), servers)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the system DNS configuration; [[destination]] host names are resolved with getaddrinfo and kept for dns_refresh (no TTL)");
                Self::Getaddrinfo
            }
        }
    }
}

impl Default for System {
    fn default() -> Self {
        Self::new()
    }
}

impl Lookup for System {
    async fn lookup(&self, host: &str) -> Result<Answer, String> {
        let (addrs, ttl) = match self {
            Self::Hickory(r, servers) => {
                let found = r
                    .lookup_ip(host)
                    .await
                    .map_err(|e| format!("{e} (asking {servers})"))?;
                let left = found
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                (found.iter().collect::<Vec<_>>(), Some(left))
            }
            Self::Getaddrinfo => {
                let found = tokio::net::lookup_host((host, 0))
                    .await
                    .map_err(|e| e.to_string())?;
                (found.map(|a| a.ip()).collect(), None)
            }
        };
        let mut addrs: Vec<IpAddr> = addrs.into_iter().map(|a| a.to_canonical()).collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("no addresses".into());
        }
        Ok(Answer { addrs, ttl })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_for_their_ttl_within_the_bounds() {
        let s = Duration::from_secs;
        assert_eq!(keep_for(Some(s(12)), s(30)), s(12));
        assert_eq!(keep_for(Some(s(0)), s(30)), MIN_REFRESH);
        assert_eq!(keep_for(Some(s(3600)), s(30)), s(30));
        assert_eq!(keep_for(None, s(30)), s(30));
        // A dns_refresh below the floor wins over it.
        assert_eq!(keep_for(Some(s(1)), s(2)), s(2));
        assert_eq!(keep_for(Some(s(60)), s(2)), s(2));
        assert_eq!(retry_after(s(30)), MIN_REFRESH);
        assert_eq!(retry_after(s(2)), s(2));
    }
}
