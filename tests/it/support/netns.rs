//! Network-namespace harness for the transparent-mode tests: three "pods"
//! (client, server, outsider), each a namespace with an `eth0` joined by a
//! veth pair to a bridge in a hub namespace, on 10.200.0.0/24 and
//! fd00:200::/64; commands and threads run inside them (as root or as
//! moat's UID); packets captured on a pod's veth with an `AF_PACKET`
//! socket; every namespace deleted on drop, panics included. The
//! namespaces, `ip`, and entering them come from `moat_testkit::netns`,
//! shared with `moat demo --transparent`; the capture and inspection tools
//! are the tests' own.
//!
//! The addresses are the same in every instance: each instance has its own
//! namespaces, so nothing collides, and no packet leaves them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_testkit::netns::Network;

/// The UID and GID moat runs as in the image (and in these tests).
pub(crate) const MOAT_UID: u32 = 65532;

/// Says why a test does not run: `SKIPPED: why` on stderr, or a panic
/// under `MOAT_TEST_REQUIRE_ALL=1` (`support::require_that`).
pub(crate) fn skip(why: &str) {
    crate::support::require_that(
        false,
        why,
        "root, iproute2 and nftables, as .ci/run has them",
    );
}

// The benches include this module too and use none of these.
#[allow(unused_imports)]
pub(crate) use moat_testkit::netns::{in_netns, netns_command, netns_command_as, unavailable};

/// Why `program` cannot be used (for tools the tests only inspect with).
pub(crate) fn missing_tool(program: &str, args: &[&str], package: &str) -> Option<String> {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => None,
        _ => Some(format!(
            "`{program}` is missing (apt-get install {package})"
        )),
    }
}

/// One pod: a namespace whose `eth0` is on the hub's bridge.
pub(crate) type Pod = moat_testkit::netns::Host;

/// Client, server and outsider pods on one bridge; the namespaces are
/// deleted on drop.
pub(crate) struct Pods {
    /// The namespace holding the bridge and the hub ends of the veths.
    pub hub: String,
    pub client: Pod,
    pub server: Pod,
    pub outsider: Pod,
    _net: Network,
}

static INSTANCE: AtomicUsize = AtomicUsize::new(0);

impl Pods {
    /// Makes the namespaces and links; on error, removes what it made.
    pub(crate) fn create() -> Result<Self, String> {
        moat_testkit::netns::sweep_stale("moat-t");
        let prefix = format!(
            "moat-t{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        let net = Network::create(&prefix, &["client", "server", "outsider"])
            .map_err(|e| format!("{e:#}"))?;
        let [client, server, outsider] = [0, 1, 2].map(|i| net.hosts[i].clone());
        Ok(Pods {
            hub: net.hub.clone(),
            client,
            server,
            outsider,
            _net: net,
        })
    }

    /// The three pods.
    pub(crate) fn all(&self) -> [&Pod; 3] {
        [&self.client, &self.server, &self.outsider]
    }
}

/// A connection a [`Recorder`] accepted.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    /// The address it was accepted on.
    pub local: SocketAddr,
    /// Who connected.
    pub peer: SocketAddr,
    /// What `SO_ORIGINAL_DST` says (an error as text).
    pub original: Result<SocketAddr, String>,
    /// The first bytes the client sent (up to 256, within 10 s; empty if
    /// it closed without sending).
    pub first_bytes: Vec<u8>,
}

/// Plain TCP listeners inside a namespace that record every connection,
/// with its original destination as moat would read it; stopped on drop.
pub(crate) struct Recorder {
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    /// The bound addresses.
    pub addrs: Vec<SocketAddr>,
}

impl Recorder {
    /// Binds every address in `ns` (an IPv6 wildcard is dual-stack).
    pub(crate) fn start(ns: &str, addrs: &[SocketAddr]) -> Self {
        let addrs = addrs.to_vec();
        let listeners: Vec<TcpListener> = in_netns(ns, move || {
            addrs
                .iter()
                .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
                .collect()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let mut bound = Vec::new();
        for listener in listeners {
            bound.push(listener.local_addr().unwrap());
            listener.set_nonblocking(true).unwrap();
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, peer)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let original =
                        moat_proxy::transparent::original_dst(&stream).map_err(|e| e.to_string());
                    let local = stream.local_addr().unwrap();
                    stream.set_nonblocking(false).unwrap();
                    // The accept can come before the client's first write,
                    // and on a busy machine the client can wait for a core
                    // well past a few hundred milliseconds. Every client
                    // of these tests sends or closes, so a long wait costs
                    // nothing.
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let mut buf = [0u8; 256];
                    let n = stream.read(&mut buf).unwrap_or(0);
                    accepted.lock().unwrap().push(Accepted {
                        local,
                        peer,
                        original,
                        first_bytes: buf[..n].to_vec(),
                    });
                }
            });
        }
        Self {
            stop,
            accepted,
            addrs: bound,
        }
    }

    /// Every connection so far.
    pub(crate) fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().unwrap().clone()
    }

    /// Waits for a connection matching `pred`, or panics after 20 s.
    pub(crate) fn wait_for(&self, what: &str, pred: impl Fn(&Accepted) -> bool) -> Accepted {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(a) = self.accepted().into_iter().find(|a| pred(a)) {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "no connection {what}; accepted: {:?}",
                self.accepted()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `setsockopt(fd, SOL_SOCKET, name, value)`; a failure is ignored (the
/// capture still works with the defaults, only less patiently).
fn set_socket_option<T>(fd: &OwnedFd, name: libc::c_int, value: &T) {
    // SAFETY: `value` points at a live `T` of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as u32,
        );
    }
}

/// Every frame seen on one interface of a namespace, both directions,
/// through an `AF_PACKET` socket (what tcpdump reads).
pub(crate) struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    /// Starts capturing on `ifname` in `ns`.
    pub(crate) fn start(ns: &str, ifname: &str) -> Self {
        let name = std::ffi::CString::new(ifname).unwrap();
        let socket: OwnedFd = in_netns(ns, move || {
            let all = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket/bind calls, results checked.
            unsafe {
                let ifindex = libc::if_nametoindex(name.as_ptr());
                assert_ne!(ifindex, 0, "no interface {name:?}");
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all as libc::c_int);
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let fd = OwnedFd::from_raw_fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = all;
                sll.sll_ifindex = ifindex as i32;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
                let timeout = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                set_socket_option(&fd, libc::SO_RCVTIMEO, &timeout);
                // Room for every frame of a test's traffic while the reading
                // thread waits for a core (the default ~200 KiB drops frames).
                let rcvbuf: libc::c_int = 32 << 20;
                set_socket_option(&fd, libc::SO_RCVBUFFORCE, &rcvbuf);
                fd
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, frames) = (stop.clone(), frames.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    // Once stopped, what the socket already holds is still
                    // read (without waiting): frames of traffic that ended
                    // before `stop` but that this thread, behind on a busy
                    // machine, had not read yet.
                    let stopping = stop.load(Ordering::Relaxed);
                    let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
                    // SAFETY: `buf` is valid for writes of its length.
                    let n = unsafe {
                        libc::recv(
                            socket.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            flags,
                        )
                    };
                    if n > 0 {
                        frames.lock().unwrap().push(buf[..n as usize].to_vec());
                    } else if stopping {
                        break;
                    }
                }
            })
        };
        Self {
            stop,
            frames,
            thread: Some(thread),
        }
    }

    /// Stops and returns every frame seen.
    pub(crate) fn stop(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.frames.lock().unwrap())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One TCP segment out of an Ethernet frame.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub syn: bool,
    pub payload: Vec<u8>,
}

/// The TCP segments among `frames` (Ethernet, IPv4 or IPv6 without
/// extension headers; anything else is skipped).
pub(crate) fn tcp_segments(frames: &[Vec<u8>]) -> Vec<Segment> {
    frames.iter().filter_map(|f| segment(f)).collect()
}

fn segment(f: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = f.get(14..)?;
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let ihl = ((ip.first()? & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize;
            if *ip.get(9)? != 6 {
                return None;
            }
            let src = IpAddr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?);
            (src, dst, ip.get(ihl..total)?)
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let len = u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]) as usize;
            let src = IpAddr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?);
            (src, dst, ip.get(40..40 + len)?)
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    let offset = ((tcp.get(12)? >> 4) as usize) * 4;
    let syn = tcp.get(13)? & 0x02 != 0;
    Some(Segment {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        seq,
        syn,
        payload: tcp.get(offset..)?.to_vec(),
    })
}

/// Each direction of each TCP connection in `frames`, its payload put
/// back in sequence order (retransmissions counted once).
pub(crate) fn tcp_streams(frames: &[Vec<u8>]) -> HashMap<(SocketAddr, SocketAddr), Vec<u8>> {
    let mut by_flow: HashMap<(SocketAddr, SocketAddr), Vec<Segment>> = HashMap::new();
    for s in tcp_segments(frames) {
        by_flow.entry((s.src, s.dst)).or_default().push(s);
    }
    by_flow
        .into_iter()
        .map(|(flow, segs)| {
            // The first byte of data is the SYN's sequence number + 1.
            let base = segs
                .iter()
                .find(|s| s.syn)
                .map(|s| s.seq.wrapping_add(1))
                .unwrap_or_else(|| segs.iter().map(|s| s.seq).min().unwrap_or(0));
            let mut data: Vec<(u32, &[u8])> = segs
                .iter()
                .filter(|s| !s.payload.is_empty())
                .map(|s| (s.seq.wrapping_sub(base), &s.payload[..]))
                .collect();
            data.sort_by_key(|(off, _)| *off);
            let mut out = Vec::new();
            for (off, bytes) in data {
                let off = off as usize;
                if off + bytes.len() > out.len() && off <= out.len() {
                    out.extend_from_slice(&bytes[out.len() - off..]);
                }
            }
            (flow, out)
        })
        .collect()
}

/// Reads `bytes` as a sequence of TLS records (type 20-23, version 3.x,
/// length at most 2^14 + 2048); the count, or where it stops being TLS.
/// A last record cut short (the capture stopped) is allowed.
pub(crate) fn tls_records(bytes: &[u8]) -> Result<usize, String> {
    let mut at = 0;
    let mut count = 0;
    while at + 5 <= bytes.len() {
        let (ty, major) = (bytes[at], bytes[at + 1]);
        let len = u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]) as usize;
        if !(20..=23).contains(&ty) || major != 3 || len > (1 << 14) + 2048 {
            return Err(format!(
                "not a TLS record at byte {at}: {:02x?}",
                &bytes[at..bytes.len().min(at + 16)]
            ));
        }
        at += 5 + len;
        count += 1;
    }
    Ok(count)
}

/// Makes `path` (a test's temp dir, a key file) usable by moat's UID.
pub(crate) fn give_to_moat(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::chown(c.as_ptr(), MOAT_UID, MOAT_UID) };
    assert_eq!(
        rc,
        0,
        "chown {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}
