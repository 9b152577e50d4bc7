//! Redirect rules: the nftables table `inet moat` that sends a workload's
//! TCP through moat's transparent listeners.
//!
//! [`RedirectConfig`] is the `[redirect]` section of proxy.toml (or the same
//! values given to `moat redirect` as flags). [`Ruleset::new`] turns it into
//! rules; [`Ruleset::to_nft`] prints them in nft syntax and
//! [`Ruleset::apply`] installs them over netlink, replacing an earlier
//! `inet moat` table in the same transaction, so applying twice leaves one
//! table and a failed apply changes nothing. [`cleanup`] removes the table.
//!
//! Only this step needs `CAP_NET_ADMIN`; `moat proxy` never touches the
//! rules. The netlink messages are written here rather than by a crate:
//! the pure-Rust nftables crate (`rustables`) is GPL-3.0 and generates
//! bindings with bindgen at build time, and the other (`nftables`) drives
//! the `nft` program, which the shell-less image does not have. What is
//! sent is small and fixed: one table, two base chains, rules built from
//! seven matches and two verdicts.
//!
//! What the rules do (see [`Ruleset::new`]):
//! - `prerouting` (`type nat hook prerouting`): TCP arriving for the app's
//!   ports (listed, or all but an exclusion list and moat's own ports) is
//!   redirected to the transparent inbound listener.
//! - `output` (`type nat hook output`): TCP the workload opens is redirected
//!   to the transparent outbound listener, except moat's own (by socket
//!   owner UID, optionally GID), anything over loopback, and operator-listed
//!   destination ports and CIDRs.

mod netlink;

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;

/// The nftables table (family `inet`, so IPv4 and IPv6) that holds the rules.
pub const TABLE: &str = "moat";
/// Where inbound TCP is redirected unless configured otherwise.
pub const DEFAULT_INBOUND_LISTENER_PORT: u16 = 15006;
/// Where outbound TCP is redirected unless configured otherwise.
pub const DEFAULT_OUTBOUND_LISTENER_PORT: u16 = 15001;
/// The UID moat runs as in the image (distroless `nonroot`).
pub const DEFAULT_PROXY_UID: u32 = 65532;

/// `[redirect]`: which TCP the rules send through moat, and what they leave alone.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// The port of moat's transparent inbound listener (on every address).
    #[serde(default = "default_inbound_listener_port")]
    pub inbound_listener_port: u16,
    /// The port of moat's transparent outbound listener (on loopback).
    #[serde(default = "default_outbound_listener_port")]
    pub outbound_listener_port: u16,
    /// Inbound ports redirected: `"all"` (the default) or a list; `[]`
    /// redirects no inbound traffic.
    #[serde(default)]
    pub inbound_ports: InboundPorts,
    /// With `inbound_ports = "all"`: ports left alone (e.g. 22 on a VM).
    #[serde(default)]
    pub skip_inbound_ports: Vec<u16>,
    /// Redirect the workload's outbound TCP (default true).
    #[serde(default = "yes")]
    pub outbound: bool,
    /// Outbound destination ports left alone.
    #[serde(default)]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destination addresses or CIDRs left alone (the Kubernetes
    /// API, the CA, DNS servers reached over TCP).
    #[serde(default)]
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// The UID moat runs as; its own connections are never redirected.
    #[serde(default = "default_proxy_uid")]
    pub proxy_uid: Owner,
    /// Also exempt connections owned by this GID (absent: UID only).
    #[serde(default)]
    pub proxy_gid: Option<Owner>,
    /// The proxy's transparent inbound: `strict` (mutual TLS only, the
    /// default) or `permissive` (plaintext too, counted). Not a rule.
    #[serde(default)]
    pub mode: crate::transparent::InboundMode,
    /// Ports of server-first protocols (MySQL, SMTP): never peeked at.
    #[serde(default)]
    pub opaque_ports: Vec<u16>,
    /// How long `permissive` waits for a connection's first byte.
    #[serde(default = "default_detection_timeout", with = "humantime_serde")]
    pub detection_timeout: std::time::Duration,
    /// What the transparent outbound does with a destination no
    /// `[[destination]]` matches.
    #[serde(default)]
    pub unmatched: crate::transparent::Unmatched,
    /// The longest a `[[destination]]` host name's addresses are kept: each
    /// name is resolved again when its records' TTL runs out, but never
    /// sooner than 5 s (or this, if shorter) nor later than this.
    #[serde(default = "default_dns_refresh", with = "humantime_serde")]
    pub dns_refresh: std::time::Duration,
}

/// Which inbound ports are redirected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InboundPorts {
    /// Every port but moat's own and `skip_inbound_ports`.
    #[default]
    All,
    /// These ports only.
    Listed(Vec<u16>),
}

/// A user or group: a number, or a name looked up in `/etc/passwd` or
/// `/etc/group` when the rules are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A numeric ID.
    Id(u32),
    /// A name.
    Name(String),
}

/// As written in the configuration: the number, or the name.
impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Id(id) => write!(f, "{id}"),
            Owner::Name(name) => f.write_str(name),
        }
    }
}

/// An IPv4 or IPv6 network: an address and a prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// moat's own ports in the same configuration: never redirected inbound,
/// and never listed as app ports.
#[derive(Debug, Clone, Default)]
pub struct OwnPorts {
    /// The admin listener's port (probes and scrapes reach it directly).
    pub admin: Option<u16>,
    /// The explicit `[[inbound]]` listeners' ports (peers in explicit mode).
    pub inbound: Vec<u16>,
}

/// Errors from building, applying or removing the rules.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedirectError {
    /// A value cannot be used; the message names the field.
    #[error("[redirect] {0}")]
    Invalid(String),
    /// The netlink socket could not be opened or used.
    #[error("netlink: {0}")]
    Socket(std::io::Error),
    /// The kernel refused the change; nothing was changed.
    #[error("the kernel refused {what}: {error}{hint}")]
    Refused {
        /// The message that failed, e.g. `rule 3 of chain output (tcp dport 53 return)`.
        what: String,
        /// The kernel's error.
        error: std::io::Error,
        /// What usually causes it, starting with "; " (or empty).
        hint: &'static str,
    },
}

/// The rules for one network namespace, ready to print or apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    chains: Vec<Chain>,
}

/// A base chain of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chain {
    pub(crate) name: &'static str,
    pub(crate) hook: Hook,
    pub(crate) rules: Vec<Rule>,
}

/// The netfilter hook a chain is attached to (both at priority -100, where
/// destination NAT runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    /// Packets arriving from the network.
    Prerouting,
    /// Packets sent by local processes.
    Output,
}

/// One match and one verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) when: Match,
    pub(crate) then: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Match {
    /// The input interface is loopback.
    IifLoopback,
    /// The output interface is loopback.
    OifLoopback,
    /// The socket's owner UID.
    SkUid(u32),
    /// The socket's owner GID.
    SkGid(u32),
    /// The destination address is in this network.
    Daddr(Cidr),
    /// TCP to this destination port.
    TcpDport(u16),
    /// Any TCP.
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Leave the packet to the rest of the ruleset.
    Return,
    /// Redirect to this port on the receiving host.
    RedirectTo(u16),
}

fn default_inbound_listener_port() -> u16 {
    DEFAULT_INBOUND_LISTENER_PORT
}

fn default_outbound_listener_port() -> u16 {
    DEFAULT_OUTBOUND_LISTENER_PORT
}

fn default_proxy_uid() -> Owner {
    Owner::Id(DEFAULT_PROXY_UID)
}

fn default_detection_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

fn default_dns_refresh() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

fn yes() -> bool {
    true
}

impl Default for RedirectConfig {
    fn default() -> Self {
        Self {
            inbound_listener_port: DEFAULT_INBOUND_LISTENER_PORT,
            outbound_listener_port: DEFAULT_OUTBOUND_LISTENER_PORT,
            inbound_ports: InboundPorts::All,
            skip_inbound_ports: Vec::new(),
            outbound: true,
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
            proxy_uid: default_proxy_uid(),
            proxy_gid: None,
            mode: Default::default(),
            opaque_ports: Vec::new(),
            detection_timeout: default_detection_timeout(),
            unmatched: Default::default(),
            dns_refresh: default_dns_refresh(),
        }
    }
}

impl RedirectConfig {
    /// Checks the values against each other and against moat's own ports;
    /// the message names the field. Names of users and groups are looked up
    /// later, by [`Ruleset::new`].
    pub fn validate(&self, own: &OwnPorts) -> Result<(), String> {
        let (inl, outl) = (self.inbound_listener_port, self.outbound_listener_port);
        if inl == 0 || outl == 0 {
            return Err("inbound_listener_port and outbound_listener_port must not be 0".into());
        }
        if inl == outl {
            return Err(format!(
                "inbound_listener_port and outbound_listener_port are both {inl}"
            ));
        }
        let zero = |name: &str, ports: &[u16]| {
            if ports.contains(&0) {
                Err(format!("{name} lists port 0"))
            } else {
                Ok(())
            }
        };
        zero("skip_inbound_ports", &self.skip_inbound_ports)?;
        zero("skip_outbound_ports", &self.skip_outbound_ports)?;
        zero("opaque_ports", &self.opaque_ports)?;
        if self.detection_timeout.is_zero() || self.dns_refresh.is_zero() {
            return Err("detection_timeout and dns_refresh must be positive".into());
        }
        match &self.inbound_ports {
            InboundPorts::All => {}
            InboundPorts::Listed(ports) => {
                zero("inbound_ports", ports)?;
                if !self.skip_inbound_ports.is_empty() {
                    return Err(
                        "skip_inbound_ports applies to inbound_ports = \"all\" only; leave the port out of inbound_ports instead".into(),
                    );
                }
                for &p in ports {
                    let why = if p == inl || p == outl {
                        Some("a transparent listener's own port")
                    } else if own.admin == Some(p) {
                        Some("the admin port")
                    } else if own.inbound.contains(&p) {
                        Some("an [[inbound]] listener's port")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        return Err(format!(
                            "inbound_ports lists {p}, {why}: moat's own ports are never redirected"
                        ));
                    }
                }
            }
        }
        if matches!(&self.inbound_ports, InboundPorts::Listed(p) if p.is_empty()) && !self.outbound
        {
            return Err("inbound_ports = [] and outbound = false: nothing to redirect".into());
        }
        if self.proxy_uid == Owner::Id(0) {
            return Err(
                "proxy_uid = 0 would exempt every process running as root; run moat as its own user"
                    .into(),
            );
        }
        if self.proxy_gid == Some(Owner::Id(0)) {
            return Err("proxy_gid = 0 would exempt every process in group root".into());
        }
        Ok(())
    }
}

/// What `moat redirect --config proxy.toml` reads from the proxy's file:
/// `[redirect]` and moat's own ports. Other sections are not read, so an
/// init step needs only this file, not the certificates or policies it
/// names; `moat proxy` checks the whole file. A file without `[redirect]`
/// is refused: its proxy would not listen where the rules send traffic.
pub fn load(path: &Path) -> Result<(RedirectConfig, OwnPorts), crate::config::ConfigError> {
    #[derive(Deserialize)]
    struct Partial {
        redirect: Option<RedirectConfig>,
        admin: Option<PartialAdmin>,
        #[serde(default)]
        inbound: Vec<PartialListen>,
    }
    #[derive(Deserialize)]
    struct PartialAdmin {
        listen: Option<std::net::SocketAddr>,
    }
    #[derive(Deserialize)]
    struct PartialListen {
        listen: std::net::SocketAddr,
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| crate::config::ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
    let partial: Partial =
        toml::from_str(&text).map_err(|e| crate::config::parse_error(path, &text, &e))?;
    let admin = partial
        .admin
        .and_then(|a| a.listen)
        .map_or(crate::config::DEFAULT_ADMIN_PORT, |a| a.port());
    let own = OwnPorts {
        admin: Some(admin),
        inbound: partial.inbound.iter().map(|l| l.listen.port()).collect(),
    };
    let redirect = partial
        .redirect
        .ok_or_else(|| crate::config::ConfigError::Invalid {
            file: path.to_owned(),
            message: "no [redirect] section: the proxy would not serve what the rules redirect (add `[redirect]`, empty for the defaults)".into(),
        })?;
    Ok((redirect, own))
}

impl Ruleset {
    /// The rules for `config`, with moat's own ports (`own`) left alone.
    ///
    /// Inbound (`prerouting`), in order: loopback returns; with
    /// `inbound_ports = "all"`, the admin port, the `[[inbound]]` ports and
    /// `skip_inbound_ports` return and every other TCP port is redirected;
    /// with a list, each listed port is redirected. Outbound (`output`):
    /// loopback, the proxy's UID (and GID), `skip_outbound_cidrs` and
    /// `skip_outbound_ports` return; every other TCP connection is
    /// redirected. Only the first packet of a connection meets these rules
    /// (NAT chains), so their number does not cost per packet.
    pub fn new(config: &RedirectConfig, own: &OwnPorts) -> Result<Self, RedirectError> {
        Self::with_files(
            config,
            own,
            Path::new("/etc/passwd"),
            Path::new("/etc/group"),
        )
    }

    fn with_files(
        config: &RedirectConfig,
        own: &OwnPorts,
        passwd: &Path,
        group: &Path,
    ) -> Result<Self, RedirectError> {
        config.validate(own).map_err(RedirectError::Invalid)?;
        let rule = |when, then| Rule { when, then };
        let mut chains = Vec::new();
        let inbound_to = Action::RedirectTo(config.inbound_listener_port);
        let inbound = match &config.inbound_ports {
            InboundPorts::Listed(ports) if ports.is_empty() => None,
            InboundPorts::Listed(ports) => {
                let mut rules = vec![rule(Match::IifLoopback, Action::Return)];
                rules.extend(dedup(ports).map(|p| rule(Match::TcpDport(p), inbound_to)));
                Some(rules)
            }
            InboundPorts::All => {
                let mut rules = vec![rule(Match::IifLoopback, Action::Return)];
                let skipped = own
                    .admin
                    .iter()
                    .chain(&own.inbound)
                    .chain(&config.skip_inbound_ports);
                let skipped: Vec<u16> = skipped.copied().collect();
                rules.extend(dedup(&skipped).map(|p| rule(Match::TcpDport(p), Action::Return)));
                rules.push(rule(Match::Tcp, inbound_to));
                Some(rules)
            }
        };
        if let Some(rules) = inbound {
            chains.push(Chain {
                name: "prerouting",
                hook: Hook::Prerouting,
                rules,
            });
        }
        if config.outbound {
            let uid = resolve(&config.proxy_uid, passwd, "proxy_uid")?;
            let mut rules = vec![
                rule(Match::OifLoopback, Action::Return),
                rule(Match::SkUid(uid), Action::Return),
            ];
            if let Some(gid) = &config.proxy_gid {
                let gid = resolve(gid, group, "proxy_gid")?;
                rules.push(rule(Match::SkGid(gid), Action::Return));
            }
            let mut cidrs = Vec::new();
            for c in &config.skip_outbound_cidrs {
                if !cidrs.contains(c) {
                    cidrs.push(*c);
                }
            }
            rules.extend(
                cidrs
                    .into_iter()
                    .map(|c| rule(Match::Daddr(c), Action::Return)),
            );
            rules.extend(
                dedup(&config.skip_outbound_ports)
                    .map(|p| rule(Match::TcpDport(p), Action::Return)),
            );
            rules.push(rule(
                Match::Tcp,
                Action::RedirectTo(config.outbound_listener_port),
            ));
            chains.push(Chain {
                name: "output",
                hook: Hook::Output,
                rules,
            });
        }
        Ok(Self { chains })
    }

    /// The table in nft syntax, as `nft list table inet moat` prints it
    /// once applied.
    pub fn table_nft(&self) -> String {
        let mut out = format!("table inet {TABLE} {{\n");
        for (i, chain) in self.chains.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let (hook, priority) = match chain.hook {
                Hook::Prerouting => ("prerouting", "dstnat"),
                // nft names -100 `dstnat` for prerouting only.
                Hook::Output => ("output", "-100"),
            };
            let _ = writeln!(out, "\tchain {} {{", chain.name);
            let _ = writeln!(
                out,
                "\t\ttype nat hook {hook} priority {priority}; policy accept;"
            );
            for r in &chain.rules {
                let _ = writeln!(out, "\t\t{r}");
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
        out
    }

    /// What [`Ruleset::apply`] does, as a file `nft -f` accepts: create the
    /// table if absent, delete it, and create it with the rules, all in one
    /// transaction.
    pub fn to_nft(&self) -> String {
        format!(
            "# moat redirect: replaces the table inet {TABLE} in one transaction\n{}{}",
            cleanup_nft(),
            self.table_nft()
        )
    }

    /// Installs the rules in the current network namespace, replacing an
    /// earlier `inet moat` table atomically. Needs `CAP_NET_ADMIN`.
    pub fn apply(&self) -> Result<(), RedirectError> {
        netlink::replace(self)
    }

    pub(crate) fn chains(&self) -> &[Chain] {
        &self.chains
    }
}

/// What [`cleanup`] does, as a file `nft -f` accepts.
pub fn cleanup_nft() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Removes the `inet moat` table from the current network namespace:
/// `true` when it was there, `false` (no error) when it was not. Needs
/// `CAP_NET_ADMIN`.
pub fn cleanup() -> Result<bool, RedirectError> {
    netlink::delete()
}

/// Ports in first-seen order, each once.
fn dedup(ports: &[u16]) -> impl Iterator<Item = u16> + '_ {
    ports
        .iter()
        .enumerate()
        .filter(|(i, p)| !ports[..*i].contains(p))
        .map(|(_, p)| *p)
}

/// A numeric ID as is; a name from `file` (`name:x:ID:...`), read without
/// NSS so that the static binary needs no libc resolver.
pub(crate) fn resolve(owner: &Owner, file: &Path, field: &str) -> Result<u32, RedirectError> {
    let name = match owner {
        Owner::Id(id) => return Ok(*id),
        Owner::Name(name) => name,
    };
    let text = std::fs::read_to_string(file).map_err(|e| {
        RedirectError::Invalid(format!(
            "{field} = {name:?}: cannot read {}: {e}",
            file.display()
        ))
    })?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(n, _)| n == name)
        .and_then(|(_, id)| id.parse().ok())
        .ok_or_else(|| {
            RedirectError::Invalid(format!(
                "{field} = {name:?}: no such name in {}",
                file.display()
            ))
        })
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.when {
            Match::IifLoopback => f.write_str("iifname \"lo\"")?,
            Match::OifLoopback => f.write_str("oifname \"lo\"")?,
            Match::SkUid(uid) => write!(f, "meta skuid {uid}")?,
            Match::SkGid(gid) => write!(f, "meta skgid {gid}")?,
            Match::Daddr(c) if c.addr.is_ipv4() => write!(f, "ip daddr {c}")?,
            Match::Daddr(c) => write!(f, "ip6 daddr {c}")?,
            Match::TcpDport(p) => write!(f, "tcp dport {p}")?,
            Match::Tcp => f.write_str("meta l4proto tcp")?,
        }
        match self.then {
            Action::Return => f.write_str(" return"),
            Action::RedirectTo(p) => write!(f, " redirect to :{p}"),
        }
    }
}

impl Cidr {
    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The address bytes (4 or 16) and the mask bytes of the prefix.
    pub(crate) fn bytes_and_mask(&self) -> (Vec<u8>, Vec<u8>) {
        let bytes = match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let mask = (0..bytes.len())
            .map(|i| {
                let bits = (self.prefix as usize).saturating_sub(i * 8).min(8);
                (0xffu16 << (8 - bits)) as u8
            })
            .collect();
        (bytes, mask)
    }

    fn full(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let full = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => full,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= full)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {full}"))?,
        };
        let cidr = Cidr { addr, prefix };
        let (bytes, mask) = cidr.bytes_and_mask();
        let network: Vec<u8> = bytes.iter().zip(&mask).map(|(b, m)| b & m).collect();
        if network != bytes {
            let net = match addr {
                IpAddr::V4(_) => {
                    IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&network[..]).unwrap()))
                }
                IpAddr::V6(_) => {
                    IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&network[..]).unwrap()))
                }
            };
            return Err(format!(
                "{s:?} has host bits set (the network is {net}/{prefix})"
            ));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == self.full() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for InboundPorts {
    type Err = String;

    /// `all`, or ports separated by commas (empty: none).
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(InboundPorts::All);
        }
        parse_ports(s).map(InboundPorts::Listed)
    }
}

/// Ports separated by commas (`8080,9090`); empty is none.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number"))
        })
        .collect()
}

impl<'de> Deserialize<'de> for InboundPorts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Ports(Vec<u16>),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("inbound_ports must be \"all\" or a list of ports")
        })? {
            Raw::Word(w) if w == "all" => Ok(InboundPorts::All),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "inbound_ports = {w:?}: use \"all\" or a list of ports"
            ))),
            Raw::Ports(p) => Ok(InboundPorts::Listed(p)),
        }
    }
}

impl FromStr for Owner {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("a user or group must not be empty".into());
        }
        Ok(match s.parse() {
            Ok(id) => Owner::Id(id),
            Err(_) => Owner::Name(s.to_owned()),
        })
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Id(u32),
            Name(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a numeric ID or a name"))?
        {
            Raw::Id(id) => Ok(Owner::Id(id)),
            Raw::Name(n) => n.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests;
