//! The `[[destination]]` table: which original destinations (what the app
//! dialed) go over mutual TLS, to which peer identity, speaking what.
//!
//! An entry matches an address by DNS name (`host`, resolved at start and
//! again when its records' TTL runs out, within 5 s..`[redirect]
//! dns_refresh`: [`super::dns`]), by `ip` or by `cidr`, and/or a `port`.
//! The first matching entry in file order wins; among entries that match
//! the same address, the first request's authority (HTTP/1.1 `Host`, h2c
//! `:authority`) picks the one whose `host` it names
//! ([`DestinationTable::select`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::time::Instant;

use super::dns::{self, Lookup};

use crate::config::{PeerPattern, Protocol};
use crate::redirect::Cidr;

/// `[[destination]]`: one kind of original destination and the peer behind it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Name in logs and metrics; absent: the host, ip or cidr.
    pub name: Option<String>,
    /// A DNS name; its addresses are resolved at start and again on their
    /// TTL (at least every `dns_refresh`).
    pub host: Option<String>,
    /// One address.
    pub ip: Option<IpAddr>,
    /// A network.
    pub cidr: Option<Cidr>,
    /// The destination port; absent: any.
    pub port: Option<u16>,
    /// The SPIFFE ID the peer must present: exact, or a `/*` prefix.
    pub peer: PeerPattern,
    /// What the app speaks to it.
    #[serde(default)]
    pub protocol: DestinationProtocol,
}

/// `[[destination]] protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DestinationProtocol {
    /// HTTP/1.1 (the app may still speak h2c: moat follows its preface).
    #[default]
    Http1,
    /// HTTP/2 without TLS (h2c prior knowledge) from the app.
    Http2,
    /// gRPC: HTTP/2.
    Grpc,
    /// Bytes both ways.
    Tcp,
}

/// The table, its host names resolved; shared by the outbound listener and
/// the refresh task, read per connection without a lock.
pub struct DestinationTable {
    entries: Vec<Entry>,
    resolved: ArcSwap<Vec<Vec<IpAddr>>>,
    /// `dns_refresh`: the longest an answer is kept, whatever its TTL.
    max_refresh: Duration,
    /// When each entry's `host` is next resolved (written only at start
    /// and by the refresh task, never held across a lookup).
    due: std::sync::Mutex<Vec<Instant>>,
    /// Whether each entry's `host` has ever resolved: until it has, the
    /// entry matches nothing and its traffic follows `unmatched`, so the
    /// proxy is not ready ([`DestinationTable::unresolved`]).
    ever_resolved: Vec<AtomicBool>,
}

/// One entry, validated, with the name it is known by.
#[derive(Debug)]
pub struct Entry {
    /// Name in logs and metrics.
    pub name: Arc<str>,
    /// As configured.
    pub config: Destination,
}

impl Destination {
    /// Checks the entry on its own; the message names the entry and field.
    pub fn validate(&self, index: usize) -> Result<(), String> {
        let what = format!("[[destination]] {}", self.label(index));
        let addresses = [self.host.is_some(), self.ip.is_some(), self.cidr.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if addresses > 1 {
            return Err(format!("{what}: set one of host, ip or cidr"));
        }
        if addresses == 0 && self.port.is_none() {
            return Err(format!(
                "{what}: set host, ip, cidr and/or port: an entry must say what it matches"
            ));
        }
        if self.port == Some(0) {
            return Err(format!("{what}: port must not be 0"));
        }
        if let Some(host) = &self.host
            && (host.is_empty() || host.parse::<IpAddr>().is_ok() || host.contains(['/', ':', ' ']))
        {
            return Err(format!(
                "{what}: host = {host:?} must be a DNS name (use ip = for an address)"
            ));
        }
        if let Some(name) = &self.name
            && (name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        {
            return Err(format!(
                "{what}: name {name:?}: use letters, digits, '-', '_' or '.'"
            ));
        }
        Ok(())
    }

    /// The entry's name: `name`, else its host, ip or cidr (and port),
    /// else its position.
    pub fn label(&self, index: usize) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let addr = self
            .host
            .clone()
            .or_else(|| self.ip.map(|i| i.to_string()))
            .or_else(|| self.cidr.map(|c| c.to_string()));
        match (addr, self.port) {
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a,
            (None, Some(p)) => format!("port-{p}"),
            (None, None) => format!("destination-{index}"),
        }
    }

    /// True when the app speaks HTTP to it.
    pub fn is_http(&self) -> bool {
        self.protocol != DestinationProtocol::Tcp
    }

    /// The listener protocol that serves it.
    pub fn listener_protocol(&self) -> Protocol {
        if self.is_http() {
            Protocol::Http
        } else {
            Protocol::Tcp
        }
    }
}

impl DestinationTable {
    /// The table for `destinations` (validated by the configuration),
    /// nothing resolved yet: see [`DestinationTable::resolve_all`].
    pub fn new(destinations: &[Destination], max_refresh: Duration) -> Self {
        let entries = destinations
            .iter()
            .enumerate()
            .map(|(i, d)| Entry {
                name: d.label(i).into(),
                config: d.clone(),
            })
            .collect::<Vec<_>>();
        let resolved = vec![Vec::new(); entries.len()];
        let due = vec![Instant::now(); entries.len()];
        let ever_resolved = entries.iter().map(|_| AtomicBool::new(false)).collect();
        Self {
            entries,
            resolved: ArcSwap::from_pointee(resolved),
            max_refresh,
            due: std::sync::Mutex::new(due),
            ever_resolved,
        }
    }

    /// The entries whose `host` has never resolved: they match nothing
    /// yet, so what the app sends them follows `unmatched` (in plaintext,
    /// with `passthrough`) instead of going over mutual TLS.
    pub fn unresolved(&self) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .zip(&self.ever_resolved)
            .filter(|(e, ever)| e.config.host.is_some() && !ever.load(Ordering::Relaxed))
            .map(|(e, _)| e)
    }

    /// The entries, in file order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The current addresses of each entry's `host` (empty for entries
    /// without one, and for a name that has not resolved yet).
    pub fn resolved(&self) -> Arc<Vec<Vec<IpAddr>>> {
        self.resolved.load_full()
    }

    /// Resolves every `host` that is due (all of them at start) with the
    /// system's resolver. A name that does not resolve keeps the addresses
    /// it had (none at start), is logged, and is asked again after 5 s.
    pub async fn resolve_all(&self) {
        if self.has_hosts() {
            self.refresh_due(&dns::System::new()).await;
        }
    }

    /// Resolves each `host` when its answer's TTL runs out, for ever (a
    /// task of the proxy).
    pub async fn run_refresh(self: Arc<Self>) {
        self.refresh_loop(dns::System::new).await;
    }

    fn has_hosts(&self) -> bool {
        self.entries.iter().any(|e| e.config.host.is_some())
    }

    /// The refresh task, with a resolver made by `resolver` for each round.
    async fn refresh_loop<L: Lookup>(&self, resolver: impl Fn() -> L) {
        if !self.has_hosts() {
            return;
        }
        loop {
            let next = self.next_due();
            tokio::time::sleep_until(next).await;
            self.refresh_due(&resolver()).await;
        }
    }

    /// When the first `host` is due again.
    fn next_due(&self) -> Instant {
        let due = self.due.lock().expect("due");
        self.entries
            .iter()
            .zip(due.iter())
            .filter(|(e, _)| e.config.host.is_some())
            .map(|(_, d)| *d)
            .min()
            .unwrap_or_else(|| Instant::now() + self.max_refresh)
    }

    /// Resolves each `host` whose time has come with `lookup`, and sets
    /// when it is due again: after its TTL (within [`dns::MIN_REFRESH`]
    /// and `dns_refresh`), or after [`dns::retry_after`] on failure, the
    /// last good addresses kept.
    async fn refresh_due(&self, lookup: &impl Lookup) {
        let mut due = self.due.lock().expect("due").clone();
        let mut next = (*self.resolved.load_full()).clone();
        let now = Instant::now();
        for (i, e) in self.entries.iter().enumerate() {
            let Some(host) = &e.config.host else {
                continue;
            };
            if due[i] > now {
                continue;
            }
            let outcome = tokio::time::timeout(Duration::from_secs(10), lookup.lookup(host)).await;
            let answered = Instant::now();
            match outcome {
                Ok(Ok(answer)) => {
                    let keep = dns::keep_for(answer.ttl, self.max_refresh);
                    if answer.addrs != next[i] {
                        let addresses: Vec<String> =
                            answer.addrs.iter().map(ToString::to_string).collect();
                        tracing::info!(destination = %e.name, host = %host, addresses = addresses.join(" "), ttl_seconds = answer.ttl.map(|t| t.as_secs()), next_in = %humantime::format_duration(keep), "destination resolved");
                    } else {
                        tracing::debug!(destination = %e.name, host = %host, ttl_seconds = answer.ttl.map(|t| t.as_secs()), next_in = %humantime::format_duration(keep), "destination resolved again, unchanged");
                    }
                    next[i] = answer.addrs;
                    due[i] = answered + keep;
                    self.ever_resolved[i].store(true, Ordering::Relaxed);
                }
                failed => {
                    let error = match failed {
                        Ok(Err(error)) => error,
                        _ => "timed out after 10 s".to_owned(),
                    };
                    let retry = dns::retry_after(self.max_refresh);
                    if self.ever_resolved[i].load(Ordering::Relaxed) {
                        let kept: Vec<String> = next[i].iter().map(ToString::to_string).collect();
                        tracing::warn!(destination = %e.name, host = %host, %error, kept = kept.join(" "), retry_in = %humantime::format_duration(retry), "destination did not resolve; keeping its last addresses");
                    } else {
                        tracing::warn!(destination = %e.name, host = %host, %error, retry_in = %humantime::format_duration(retry), "destination has never resolved: it is not enforced (its traffic follows [redirect] unmatched) and the proxy is not ready until it resolves");
                    }
                    due[i] = answered + retry;
                }
            }
        }
        self.resolved.store(Arc::new(next));
        *self.due.lock().expect("due") = due;
    }

    /// The entries matching `dst`, in file order (indexes).
    pub fn matching(&self, dst: SocketAddr) -> Vec<usize> {
        let ip = dst.ip().to_canonical();
        let resolved = self.resolved.load();
        self.entries
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                let c = &e.config;
                let port = c.port.is_none_or(|p| p == dst.port());
                let addr = if c.host.is_some() {
                    resolved[*i].contains(&ip)
                } else if let Some(want) = c.ip {
                    want.to_canonical() == ip
                } else if let Some(cidr) = c.cidr {
                    cidr_contains(cidr, ip)
                } else {
                    true
                };
                port && addr
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Of several entries matching one address, the one whose `host` is
    /// the first request's authority (`Host` or `:authority`, without its
    /// port), else the first.
    pub fn select(&self, candidates: &[usize], host: Option<&str>) -> usize {
        let by_host = host.and_then(|h| {
            let name = strip_port(h);
            candidates.iter().copied().find(|&i| {
                self.entries[i]
                    .config
                    .host
                    .as_deref()
                    .is_some_and(|want| want.eq_ignore_ascii_case(name))
            })
        });
        by_host.unwrap_or(candidates[0])
    }
}

/// `host` of a `host[:port]` or `[v6]:port` authority.
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// True when `ip` is inside `cidr` (same family).
pub(crate) fn cidr_contains(cidr: Cidr, ip: IpAddr) -> bool {
    let prefix = u32::from(cidr.prefix());
    match (cidr.addr().to_canonical(), ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(toml_text: &str) -> Destination {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn entries_match_by_ip_cidr_port_and_resolved_host_in_file_order() {
        let table = DestinationTable::new(
            &[
                dest("ip = \"10.0.0.5\"\nport = 8080\npeer = \"spiffe://td/a\""),
                dest("cidr = \"10.1.0.0/16\"\npeer = \"spiffe://td/b/*\""),
                dest("port = 5432\npeer = \"spiffe://td/db\"\nprotocol = \"tcp\""),
                dest("host = \"billing.shop\"\npeer = \"spiffe://td/billing\""),
                dest("cidr = \"fd00::/64\"\nport = 80\npeer = \"spiffe://td/v6\""),
            ],
            Duration::from_secs(30),
        );
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(table.matching(at("10.0.0.5:8080")), vec![0]);
        assert!(table.matching(at("10.0.0.5:8081")).is_empty());
        assert_eq!(table.matching(at("10.1.200.3:9")), vec![1]);
        assert_eq!(table.matching(at("10.1.200.3:5432")), vec![1, 2]);
        assert_eq!(table.matching(at("192.0.2.1:5432")), vec![2]);
        assert_eq!(table.matching(at("[fd00::9]:80")), vec![4]);
        assert_eq!(table.matching(at("[::ffff:10.1.0.1]:1")), vec![1]);
        // An unresolved host matches nothing; once resolved, its addresses.
        assert!(table.matching(at("192.0.2.7:8080")).is_empty());
        let mut resolved = (*table.resolved()).clone();
        resolved[3] = vec!["192.0.2.7".parse().unwrap()];
        table.resolved.store(Arc::new(resolved));
        assert_eq!(table.matching(at("192.0.2.7:8080")), vec![3]);
        assert_eq!(&*table.entries()[3].name, "billing.shop");
        assert_eq!(&*table.entries()[2].name, "port-5432");
    }

    #[test]
    fn the_host_header_picks_among_entries_for_one_address() {
        let table = DestinationTable::new(
            &[
                dest("host = \"a.shop\"\npeer = \"spiffe://td/a\""),
                dest("host = \"b.shop\"\npeer = \"spiffe://td/b\""),
            ],
            Duration::from_secs(30),
        );
        assert_eq!(table.select(&[0, 1], Some("B.shop:8080")), 1);
        assert_eq!(table.select(&[0, 1], Some("c.shop")), 0);
        assert_eq!(table.select(&[0, 1], None), 0);
    }

    /// Answers in order, then failures; records when each was asked for.
    #[derive(Clone, Default)]
    struct Script {
        answers: Arc<std::sync::Mutex<std::collections::VecDeque<Result<dns::Answer, String>>>>,
        asked: Arc<std::sync::Mutex<Vec<Instant>>>,
    }

    impl Lookup for Script {
        async fn lookup(&self, _host: &str) -> Result<dns::Answer, String> {
            self.asked.lock().unwrap().push(Instant::now());
            let next = self.answers.lock().unwrap().pop_front();
            next.unwrap_or_else(|| Err("SERVFAIL".into()))
        }
    }

    #[tokio::test]
    async fn hosts_are_resolved_again_on_their_ttl_and_keep_their_addresses_on_failure() {
        let table = DestinationTable::new(
            &[
                dest("host = \"billing.shop\"\npeer = \"spiffe://td/billing\""),
                dest("ip = \"10.9.9.9\"\npeer = \"spiffe://td/a\""),
            ],
            Duration::from_secs(30),
        );
        let s = Duration::from_secs;
        let answer = |ip: &str, ttl: u64| {
            Ok(dns::Answer {
                addrs: vec![ip.parse().unwrap()],
                ttl: Some(s(ttl)),
            })
        };
        let script = Script::default();
        script.answers.lock().unwrap().extend([
            answer("10.0.0.1", 8),
            Err("SERVFAIL".into()),
            answer("10.0.0.2", 3600),
            answer("10.0.0.3", 0),
        ]);
        let addresses = |t: &DestinationTable| t.resolved()[0].clone();
        let ip = |a: &str| vec![a.parse::<IpAddr>().unwrap()];
        let make_due = |t: &DestinationTable| t.due.lock().unwrap()[0] = Instant::now();
        let expect = [
            (ip("10.0.0.1"), s(8)),
            // The lookup fails: the addresses stay; asked again in 5 s.
            (ip("10.0.0.1"), s(5)),
            // A TTL of an hour is kept 30 s (dns_refresh), a TTL of 0 for 5 s.
            (ip("10.0.0.2"), s(30)),
            (ip("10.0.0.3"), s(5)),
        ];
        for (i, (want, keep)) in expect.into_iter().enumerate() {
            if i > 0 {
                make_due(&table);
            }
            // What the host resolves to, and in how long it is due again
            // (measured around the round).
            let before = Instant::now();
            table.refresh_due(&script).await;
            let due = table.next_due();
            let after = Instant::now();
            assert_eq!(addresses(&table), want, "round {i}");
            assert!(
                due >= before + keep && due <= after + keep,
                "round {i}: due in {:?}, want {keep:?}",
                due - before
            );
        }
        // Not due yet: not asked.
        table.refresh_due(&script).await;
        assert_eq!(script.asked.lock().unwrap().len(), 4);
        // The entry without a host was never looked up, nor given addresses.
        assert!(table.resolved()[1].is_empty());
    }

    #[test]
    fn an_entry_must_say_what_it_matches() {
        let e = dest("peer = \"spiffe://td/a\"");
        assert!(
            e.validate(0)
                .unwrap_err()
                .contains("must say what it matches")
        );
        let e = dest("ip = \"10.0.0.1\"\ncidr = \"10.0.0.0/8\"\npeer = \"spiffe://td/a\"");
        assert!(
            e.validate(0)
                .unwrap_err()
                .contains("one of host, ip or cidr")
        );
        let e = dest("host = \"10.0.0.1\"\npeer = \"spiffe://td/a\"");
        assert!(e.validate(0).unwrap_err().contains("use ip ="));
        let bad: Result<Destination, _> =
            toml::from_str("ip = \"10.0.0.1\"\npeer = \"spiffe://td/a\"\nprotocol = \"h3\"");
        assert!(bad.is_err());
    }

    #[test]
    fn cidrs_contain_their_addresses_only() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(cidr_contains(c, "10.1.255.255".parse().unwrap()));
        assert!(!cidr_contains(c, "10.2.0.0".parse().unwrap()));
        assert!(!cidr_contains(c, "fd00::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(cidr_contains(all, "192.0.2.1".parse().unwrap()));
    }
}
