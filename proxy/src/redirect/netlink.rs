//! The nf_tables netlink messages for a [`Ruleset`], sent as one batch
//! (one transaction: all of it applies, or none).
//!
//! Layout (linux/netfilter/nfnetlink.h, nf_tables.h): each message is an
//! `nlmsghdr`, an `nfgenmsg` and attributes; a batch is framed by
//! `NFNL_MSG_BATCH_BEGIN`/`END`. nf_tables attribute integers are
//! big-endian; data compared against packets or socket fields is in the
//! order the kernel keeps them (ports and addresses in network order, UIDs
//! in host order). The expressions are the ones `nft --debug=netlink`
//! shows for the same rules, so `nft list` prints them back as written.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{Action, Chain, Hook, Match, RedirectError, Rule, Ruleset, TABLE};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;

const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
/// NF_IP_PRI_NAT_DST: where destination NAT runs (`dstnat`).
const PRIORITY_DSTNAT: i32 = -100;
const NF_ACCEPT: u32 = 1;
const NFT_RETURN: i32 = -5;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_SKUID: u32 = 10;
const NFT_META_SKGID: u32 = 11;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const IPPROTO_TCP: u8 = 6;
const IFNAMSIZ: usize = 16;

/// Replaces the table with `ruleset`: create-if-absent, delete, create with
/// the chains and rules.
pub(super) fn replace(ruleset: &Ruleset) -> Result<(), RedirectError> {
    send(&build_replace(ruleset))
}

/// Deletes the table if it is there.
/// Deletes the table: `true` when it was there, `false` when there was
/// none (the kernel's ENOENT, so that a second cleanup can say so).
pub(super) fn delete() -> Result<bool, RedirectError> {
    let mut b = Batch::new();
    b.table(NFT_MSG_DELTABLE, "deleting the table");
    match send(&b.finish()) {
        Ok(()) => Ok(true),
        Err(RedirectError::Refused { error, .. }) if error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

pub(super) fn build_replace(ruleset: &Ruleset) -> Built {
    let mut b = Batch::new();
    b.table(NFT_MSG_NEWTABLE, "creating the table (if absent)");
    b.table(NFT_MSG_DELTABLE, "deleting the earlier table");
    b.table(NFT_MSG_NEWTABLE, "creating the table");
    for chain in ruleset.chains() {
        b.chain(chain);
        for (i, rule) in chain.rules.iter().enumerate() {
            b.rule(chain.name, i + 1, rule);
        }
    }
    b.finish()
}

/// A batch ready to send, and what each acknowledged message was.
pub(super) struct Built {
    pub(super) bytes: Vec<u8>,
    pub(super) messages: Vec<(u32, String)>,
}

struct Batch {
    w: Writer,
    seq: u32,
    messages: Vec<(u32, String)>,
}

impl Batch {
    fn new() -> Self {
        let mut b = Self {
            w: Writer::default(),
            seq: 0,
            messages: Vec::new(),
        };
        let start = b.w.header(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        b.w.end_message(start);
        b
    }

    fn message(&mut self, kind: u16, flags: u16, what: String) -> usize {
        self.seq += 1;
        self.messages.push((self.seq, what));
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | kind;
        self.w.header(
            ty,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            self.seq,
            NFPROTO_INET,
            0,
        )
    }

    fn table(&mut self, kind: u16, what: &str) {
        let flags = if kind == NFT_MSG_NEWTABLE {
            NLM_F_CREATE
        } else {
            0
        };
        let start = self.message(kind, flags, format!("{what} inet {TABLE}"));
        self.w.attr_str(NFTA_TABLE_NAME, TABLE);
        self.w.end_message(start);
    }

    fn chain(&mut self, chain: &Chain) {
        let start = self.message(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            format!("creating chain {} (type nat)", chain.name),
        );
        let w = &mut self.w;
        w.attr_str(NFTA_CHAIN_TABLE, TABLE);
        w.attr_str(NFTA_CHAIN_NAME, chain.name);
        let hook = w.nest(NFTA_CHAIN_HOOK);
        let hooknum = match chain.hook {
            Hook::Prerouting => NF_INET_PRE_ROUTING,
            Hook::Output => NF_INET_LOCAL_OUT,
        };
        w.attr_u32(NFTA_HOOK_HOOKNUM, hooknum);
        w.attr_u32(NFTA_HOOK_PRIORITY, PRIORITY_DSTNAT as u32);
        w.end_nest(hook);
        w.attr_u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        w.attr_str(NFTA_CHAIN_TYPE, "nat");
        self.w.end_message(start);
    }

    fn rule(&mut self, chain: &str, n: usize, rule: &Rule) {
        let start = self.message(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            format!("rule {n} of chain {chain} ({rule})"),
        );
        let w = &mut self.w;
        w.attr_str(NFTA_RULE_TABLE, TABLE);
        w.attr_str(NFTA_RULE_CHAIN, chain);
        let list = w.nest(NFTA_RULE_EXPRESSIONS);
        expressions(w, rule);
        w.end_nest(list);
        self.w.end_message(start);
    }

    fn finish(mut self) -> Built {
        let start = self.w.header(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            self.seq + 1,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        self.w.end_message(start);
        Built {
            bytes: self.w.buf,
            messages: self.messages,
        }
    }
}

/// The expressions of one rule, as nft itself would write them.
fn expressions(w: &mut Writer, rule: &Rule) {
    match &rule.when {
        Match::IifLoopback | Match::OifLoopback => {
            let key = if rule.when == Match::IifLoopback {
                NFT_META_IIFNAME
            } else {
                NFT_META_OIFNAME
            };
            meta(w, key);
            let mut name = [0u8; IFNAMSIZ];
            name[..2].copy_from_slice(b"lo");
            cmp_eq(w, &name);
        }
        Match::SkUid(id) | Match::SkGid(id) => {
            let key = if matches!(rule.when, Match::SkUid(_)) {
                NFT_META_SKUID
            } else {
                NFT_META_SKGID
            };
            meta(w, key);
            cmp_eq(w, &id.to_ne_bytes());
        }
        Match::Daddr(cidr) => {
            let (bytes, mask) = cidr.bytes_and_mask();
            let (family, offset) = if bytes.len() == 4 {
                (NFPROTO_IPV4, 16)
            } else {
                (NFPROTO_IPV6, 24)
            };
            meta(w, NFT_META_NFPROTO);
            cmp_eq(w, &[family]);
            payload(w, NFT_PAYLOAD_NETWORK_HEADER, offset, bytes.len() as u32);
            if mask.iter().any(|m| *m != 0xff) {
                bitwise(w, &mask);
            }
            cmp_eq(w, &bytes);
        }
        Match::TcpDport(port) => {
            meta(w, NFT_META_L4PROTO);
            cmp_eq(w, &[IPPROTO_TCP]);
            payload(w, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
            cmp_eq(w, &port.to_be_bytes());
        }
        Match::Tcp => {
            meta(w, NFT_META_L4PROTO);
            cmp_eq(w, &[IPPROTO_TCP]);
        }
    }
    match rule.then {
        Action::Return => {
            let e = w.expr("immediate");
            w.attr_u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
            let data = w.nest(NFTA_IMMEDIATE_DATA);
            let verdict = w.nest(NFTA_DATA_VERDICT);
            w.attr_u32(NFTA_VERDICT_CODE, NFT_RETURN as u32);
            w.end_nest(verdict);
            w.end_nest(data);
            w.end_expr(e);
        }
        Action::RedirectTo(port) => {
            let e = w.expr("immediate");
            w.attr_u32(NFTA_IMMEDIATE_DREG, NFT_REG_1);
            let data = w.nest(NFTA_IMMEDIATE_DATA);
            w.attr(NFTA_DATA_VALUE, &port.to_be_bytes());
            w.end_nest(data);
            w.end_expr(e);
            let e = w.expr("redir");
            w.attr_u32(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1);
            w.attr_u32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
            w.end_expr(e);
        }
    }
}

fn meta(w: &mut Writer, key: u32) {
    let e = w.expr("meta");
    w.attr_u32(NFTA_META_KEY, key);
    w.attr_u32(NFTA_META_DREG, NFT_REG_1);
    w.end_expr(e);
}

fn cmp_eq(w: &mut Writer, value: &[u8]) {
    let e = w.expr("cmp");
    w.attr_u32(NFTA_CMP_SREG, NFT_REG_1);
    w.attr_u32(NFTA_CMP_OP, NFT_CMP_EQ);
    let data = w.nest(NFTA_CMP_DATA);
    w.attr(NFTA_DATA_VALUE, value);
    w.end_nest(data);
    w.end_expr(e);
}

fn payload(w: &mut Writer, base: u32, offset: u32, len: u32) {
    let e = w.expr("payload");
    w.attr_u32(NFTA_PAYLOAD_DREG, NFT_REG_1);
    w.attr_u32(NFTA_PAYLOAD_BASE, base);
    w.attr_u32(NFTA_PAYLOAD_OFFSET, offset);
    w.attr_u32(NFTA_PAYLOAD_LEN, len);
    w.end_expr(e);
}

fn bitwise(w: &mut Writer, mask: &[u8]) {
    let e = w.expr("bitwise");
    w.attr_u32(NFTA_BITWISE_SREG, NFT_REG_1);
    w.attr_u32(NFTA_BITWISE_DREG, NFT_REG_1);
    w.attr_u32(NFTA_BITWISE_LEN, mask.len() as u32);
    let m = w.nest(NFTA_BITWISE_MASK);
    w.attr(NFTA_DATA_VALUE, mask);
    w.end_nest(m);
    let x = w.nest(NFTA_BITWISE_XOR);
    w.attr(NFTA_DATA_VALUE, &vec![0u8; mask.len()]);
    w.end_nest(x);
    w.end_expr(e);
}

/// Netlink messages and attributes, lengths patched in when each closes.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

/// Where an expression's two open nests start.
struct Expr(usize, usize);

impl Writer {
    /// `nlmsghdr` (native endian) and `nfgenmsg`; returns where it starts.
    fn header(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    fn end_message(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.attr(ty, &data);
    }

    fn nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn end_nest(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Opens `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { ... } }`.
    fn expr(&mut self, name: &str) -> Expr {
        let elem = self.nest(NFTA_LIST_ELEM);
        self.attr_str(NFTA_EXPR_NAME, name);
        let data = self.nest(NFTA_EXPR_DATA);
        Expr(elem, data)
    }

    fn end_expr(&mut self, e: Expr) {
        self.end_nest(e.1);
        self.end_nest(e.0);
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

/// Sends a batch on a fresh `NETLINK_NETFILTER` socket and reads every
/// answer: an error for a message names it; nothing was changed then.
fn send(batch: &Built) -> Result<(), RedirectError> {
    let socket = Socket::open().map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) {
            "; this kernel has no nfnetlink (CONFIG_NETFILTER_NETLINK)"
        } else {
            ""
        };
        RedirectError::Socket(io::Error::new(e.kind(), format!("{e}{hint}")))
    })?;
    socket
        .send(&batch.bytes)
        .map_err(|error| RedirectError::Refused {
            what: "the batch".into(),
            hint: hint(&error, ""),
            error,
        })?;
    // The kernel handles a batch while `send` runs, so every answer is
    // already queued: read until none is left.
    let mut acked = Vec::new();
    let mut failed: Option<(u32, i32)> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(RedirectError::Socket(e)),
        };
        for (ty, seq, payload) in messages(&buf[..n]) {
            if ty != NLMSG_ERROR || payload.len() < 4 {
                continue;
            }
            let code = i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"));
            if code == 0 {
                acked.push(seq);
            } else if failed.is_none() {
                failed = Some((seq, -code));
            }
        }
    }
    // Sequence 0 is the batch's own frame: refused as a whole (no
    // permission, say).
    let what = |seq: u32| {
        batch
            .messages
            .iter()
            .find(|(s, _)| *s == seq)
            .map_or_else(|| "the batch".to_owned(), |(_, w)| w.clone())
    };
    if let Some((seq, errno)) = failed {
        let what = what(seq);
        let error = io::Error::from_raw_os_error(errno);
        return Err(RedirectError::Refused {
            hint: hint(&error, &what),
            what,
            error,
        });
    }
    if let Some((seq, _)) = batch.messages.iter().find(|(s, _)| !acked.contains(s)) {
        return Err(RedirectError::Refused {
            what: what(*seq),
            error: io::Error::other("no answer from the kernel"),
            hint: "",
        });
    }
    Ok(())
}

/// What usually causes `e` for the message `what`.
fn hint(e: &io::Error, what: &str) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            "; changing nftables rules needs CAP_NET_ADMIN in this network namespace"
        }
        Some(libc::EOPNOTSUPP | libc::ENOENT) if what.starts_with("creating chain") => {
            "; this kernel has no NAT chains for the inet family (Linux 5.2 or later, with nft_chain_nat)"
        }
        Some(libc::EOPNOTSUPP | libc::ENOENT) if what.contains("redirect") => {
            "; this kernel has no nftables redirect (nft_redir)"
        }
        Some(libc::ENOENT | libc::EOPNOTSUPP) => {
            "; this kernel lacks an nftables feature the rules use"
        }
        _ => "",
    }
}

/// `(type, seq, payload)` of each netlink message in `buf`.
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(buf[..4].try_into().ok()?) as usize;
        if len < 16 || len > buf.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().ok()?);
        let payload = &buf[16..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, seq, payload))
    })
}

/// A `NETLINK_NETFILTER` socket, closed on drop.
struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor we just opened and own alone.
        let socket = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        let addr = kernel();
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                socket.0.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let addr = kernel();
        // SAFETY: `bytes` and `addr` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != bytes.len() {
            return Err(io::Error::other("short send to netlink"));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The kernel's netlink address.
fn kernel() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}
