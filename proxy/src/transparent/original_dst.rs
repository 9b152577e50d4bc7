//! `SO_ORIGINAL_DST`: where a redirected TCP connection was going before
//! the redirect rules' NAT changed it; and whether it came from moat's own
//! process ([`from_this_process`]), which is how a redirect loop shows.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

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

/// True when one of this process's own sockets is connected from `local`
/// to `remote`: a connection accepted from `local` whose original
/// destination is `remote` was opened by moat itself and redirected back
/// to it. Reads `/proc/self/fd` (a socket per open connection), so it is
/// called only where such a loop is possible.
pub(crate) fn from_this_process(local: SocketAddr, remote: SocketAddr) -> bool {
    let canon = |a: SocketAddr| (a.ip().to_canonical(), a.port());
    let (local, remote) = (canon(local), canon(remote));
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    fds.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::c_int>().ok())
        .any(|fd| {
            // A descriptor closed (or reused) since the listing answers
            // for another socket or not at all: only an exact match counts.
            socket2_local(fd).is_ok_and(|a| canon(a) == local)
                && socket_addr(fd, libc::getpeername).is_ok_and(|a| canon(a) == remote)
        })
}

/// The socket's local address (getsockname), without a std wrapper type.
fn socket2_local(fd: libc::c_int) -> io::Result<SocketAddr> {
    socket_addr(fd, libc::getsockname)
}

/// The address `call` (getsockname or getpeername) gives for `fd`.
fn socket_addr(
    fd: libc::c_int,
    call: unsafe extern "C" fn(
        libc::c_int,
        *mut libc::sockaddr,
        *mut libc::socklen_t,
    ) -> libc::c_int,
) -> io::Result<SocketAddr> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is valid for `len` bytes; the kernel writes at most that.
    let rc = unsafe { call(fd, storage.as_mut_ptr().cast(), &mut len) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

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

    #[tokio::test]
    async fn a_connection_from_this_process_is_told_from_others() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (_server, from) = listener.accept().await.unwrap();
        assert_eq!(client.local_addr().unwrap(), from);
        assert!(from_this_process(from, addr));
        let elsewhere: SocketAddr = "192.0.2.1:80".parse().unwrap();
        assert!(!from_this_process(from, elsewhere));
        assert!(!from_this_process(elsewhere, addr));
    }

    #[test]
    fn a_socket_that_is_not_ip_is_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(original_dst(&a).is_err());
    }
}
