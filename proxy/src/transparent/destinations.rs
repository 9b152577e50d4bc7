//! The `[[destination]]` table: which original destinations (what the app
//! dialed) go over mutual TLS, to which peer identity, speaking what.
//!
//! An entry matches an address by DNS name (`host`, resolved at start and
//! again every `[redirect] dns_refresh`), by `ip` or by `cidr`, and/or a
//! `port`. The first matching entry in file order wins; among entries that
//! match the same address, an HTTP/1.1 request's `Host` picks the one whose
//! `host` it names ([`DestinationTable::select`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;

use crate::config::{PeerPattern, Protocol};
use crate::redirect::Cidr;

/// `[[destination]]`: one kind of original destination and the peer behind it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Name in logs and metrics; absent: the host, ip or cidr.
    pub name: Option<String>,
    /// A DNS name; its addresses are resolved at start and every `dns_refresh`.
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
    refresh: Duration,
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
    pub fn new(destinations: &[Destination], refresh: Duration) -> Self {
        let entries = destinations
            .iter()
            .enumerate()
            .map(|(i, d)| Entry {
                name: d.label(i).into(),
                config: d.clone(),
            })
            .collect::<Vec<_>>();
        let resolved = vec![Vec::new(); entries.len()];
        Self {
            entries,
            resolved: ArcSwap::from_pointee(resolved),
            refresh,
        }
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

    /// Resolves every `host` once. A name that does not resolve keeps the
    /// addresses it had (none at start), and is logged.
    pub async fn resolve_all(&self) {
        let mut next = (*self.resolved.load_full()).clone();
        for (i, e) in self.entries.iter().enumerate() {
            let Some(host) = &e.config.host else {
                continue;
            };
            let lookup = tokio::net::lookup_host((host.as_str(), 0));
            match tokio::time::timeout(Duration::from_secs(10), lookup).await {
                Ok(Ok(addrs)) => {
                    let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip().to_canonical()).collect();
                    ips.sort();
                    ips.dedup();
                    if ips != next[i] {
                        tracing::info!(destination = %e.name, host = %host, addresses = ?ips, "destination resolved");
                    }
                    next[i] = ips;
                }
                Ok(Err(error)) => {
                    tracing::warn!(destination = %e.name, host = %host, %error, kept = ?next[i], "destination did not resolve; keeping its last addresses");
                }
                Err(_) => {
                    tracing::warn!(destination = %e.name, host = %host, kept = ?next[i], "destination resolution timed out; keeping its last addresses");
                }
            }
        }
        self.resolved.store(Arc::new(next));
    }

    /// Resolves every `dns_refresh`, for ever (a task of the proxy).
    pub async fn run_refresh(self: Arc<Self>) {
        if !self.entries.iter().any(|e| e.config.host.is_some()) {
            return;
        }
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.resolve_all().await;
        }
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
    /// the request's `Host` (without its port), else the first.
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
pub fn cidr_contains(cidr: Cidr, ip: IpAddr) -> bool {
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
