//! Transparent mode: connections that the redirect rules (`moat redirect`,
//! [`crate::redirect`]) sent to moat, and where they were going.
//!
//! [`original_dst`] reads a redirected connection's original destination
//! from conntrack (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).
//! [`TransparentInbound`] is the listener the inbound rules redirect to: it
//! reads the original port of each connection and hands the connection to
//! the `[[inbound]]` listener that forwards to `127.0.0.1:<that port>`, which
//! does what it does for its own connections (mutual TLS, `allow_peers`,
//! route policy, forwarding). A port no `[[inbound]]` forwards to is
//! refused: plaintext from outside never reaches the app.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::{conn, drain, inbound};

/// The name of the transparent inbound listener in logs and metrics.
pub const INBOUND_NAME: &str = "transparent-inbound";

/// The destination a redirected TCP connection had before NAT changed it.
///
/// For a connection that was not redirected, conntrack reports the local
/// address itself, or the call fails with `NotFound` when the namespace
/// tracks no connections.
pub fn original_dst(socket: &impl AsFd) -> io::Result<SocketAddr> {
    let fd = socket.as_fd();
    // An IPv4 connection accepted on a dual-stack IPv6 socket is tracked
    // as IPv4: ask the IPv4 table for it.
    let local = socket2_local(fd.as_raw_fd())?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        let sin: libc::sockaddr_in =
            getsockopt(fd.as_raw_fd(), libc::SOL_IP, libc::SO_ORIGINAL_DST)?;
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(sin.sin_port),
        )))
    } else {
        let sin6: libc::sockaddr_in6 =
            getsockopt(fd.as_raw_fd(), libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)?;
        let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(sin6.sin6_port),
            sin6.sin6_flowinfo,
            sin6.sin6_scope_id,
        )))
    }
}

/// The socket's local address (getsockname), without a std wrapper type.
fn socket2_local(fd: libc::c_int) -> io::Result<SocketAddr> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is valid for `len` bytes; the kernel writes at most that.
    let rc = unsafe { libc::getsockname(fd, storage.as_mut_ptr().cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialized and partly filled by the kernel: plain data.
    let storage = unsafe { storage.assume_init() };
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { *(&raw const storage).cast::<libc::sockaddr_in>() };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { *(&raw const storage).cast::<libc::sockaddr_in6>() };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an IP socket (address family {other})"),
        )),
    }
}

/// getsockopt(2) for an option whose value is a plain C struct `T`.
fn getsockopt<T: Copy>(fd: libc::c_int, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is valid for `len` bytes; the kernel writes at most that.
    let rc = unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: T is a plain C struct (sockaddr_in or sockaddr_in6), zeroed
    // first, so every byte is initialized.
    Ok(unsafe { value.assume_init() })
}

/// The transparent inbound listener: redirected connections, each served by
/// the `[[inbound]]` listener whose `forward` port is its original port.
pub struct TransparentInbound {
    by_port: HashMap<u16, Arc<inbound::Shared>>,
    listen_port: u16,
}

/// One bound transparent inbound listener, ready to serve.
pub type TransparentListener = conn::Listener<TransparentInbound>;

impl TransparentInbound {
    /// Binds `[::]:port` (IPv4 and IPv6; `0.0.0.0:port` where the host has
    /// no IPv6), serving connections by their original port with `by_port`.
    pub async fn bind(
        port: u16,
        by_port: HashMap<u16, Arc<inbound::Shared>>,
        max_connections: usize,
    ) -> Result<(TransparentListener, SocketAddr), crate::Error> {
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let (listener, addr) = match conn::bind(INBOUND_NAME, any6).await {
            Ok(bound) => bound,
            Err(crate::Error::Bind { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
            {
                conn::bind(
                    INBOUND_NAME,
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                )
                .await?
            }
            Err(e) => return Err(e),
        };
        let shared = Self {
            by_port,
            listen_port: addr.port(),
        };
        let listener =
            conn::Listener::new(listener, addr, INBOUND_NAME.into(), max_connections, shared);
        Ok((listener, addr))
    }
}

impl conn::Serve for TransparentInbound {
    async fn connection(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr, drain: drain::Watch) {
        let dst = match original_dst(&tcp) {
            Ok(dst) => dst,
            Err(e) => {
                tracing::info!(listener = INBOUND_NAME, peer_addr = %addr, error = %e, "refused: no original destination (not redirected?)");
                return;
            }
        };
        // A connection made to this port directly was not redirected; its
        // "original" port is ours, and forwarding it would loop.
        let target = (dst.port() != self.listen_port)
            .then(|| self.by_port.get(&dst.port()))
            .flatten();
        match target {
            Some(shared) => shared.clone().connection(tcp, addr, drain).await,
            None => {
                tracing::info!(listener = INBOUND_NAME, peer_addr = %addr, original_dst = %dst, "refused: no [[inbound]] forwards to this port");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_other_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Without conntrack in this namespace the lookup fails; with it, the
        // original destination is the address we accepted on.
        match original_dst(&server) {
            Ok(dst) => assert_eq!(dst, addr),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}"),
        }
    }

    #[test]
    fn a_socket_that_is_not_ip_is_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(original_dst(&a).is_err());
    }
}
