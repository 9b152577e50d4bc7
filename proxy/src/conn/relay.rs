//! Byte streams: splicing two streams both ways with idle tracking, and
//! [`relay_plain`], plain TCP to a destination.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{Activity, First, Tracked, race};

/// Splices two streams: bytes both ways, half-close passed on, until both
/// directions end, the pair is idle too long, or the drain's grace runs out
/// (the process exits then).
pub(crate) async fn splice<A, B>(
    a: A,
    b: B,
    activity: &Activity,
    idle: Duration,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    splice_until(a, b, activity, idle, std::future::pending::<()>()).await
}

/// Why [`relay_plain`] could not reach its destination.
#[derive(Debug)]
pub(crate) enum RelayConnectError {
    /// The destination refused or failed the connection.
    Refused(io::Error),
    /// No connection within the connect timeout.
    TimedOut,
}

/// Plain TCP from `tcp` to `to`: connects within `connect_timeout`, then
/// splices both ways with activity tracking and the `idle` timeout (the
/// permissive inbound's plaintext and the transparent outbound's
/// passthrough). `Err` only when `to` could not be reached; how the stream
/// ended afterwards is logged at debug under `listener`.
pub(crate) async fn relay_plain(
    tcp: TcpStream,
    to: SocketAddr,
    connect_timeout: Duration,
    idle: Duration,
    listener: &str,
) -> Result<(), RelayConnectError> {
    let remote =
        match tokio::time::timeout(connect_timeout, crate::upstream::connect_local(to)).await {
            Ok(Ok(remote)) => remote,
            Ok(Err(e)) => return Err(RelayConnectError::Refused(e)),
            Err(_) => return Err(RelayConnectError::TimedOut),
        };
    let _ = remote.set_nodelay(true);
    let activity = Activity::new();
    let local = Tracked::new(tcp, activity.clone());
    let remote = Tracked::new(remote, activity.clone());
    if let Err(e) = splice(local, remote, &activity, idle).await {
        tracing::debug!(listener, destination = %to, error = %e, "plain stream ended with an error");
    }
    Ok(())
}

/// [`splice`], also ending at once when `close` resolves (the peer's
/// credential lapsed: a byte stream has no boundary to wait for).
pub(crate) async fn splice_until<A, B, X>(
    mut a: A,
    mut b: B,
    activity: &Activity,
    idle: Duration,
    close: X,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    X: Future,
{
    // The watchdogs are polled only when one of them woke the task, not on
    // each of the copy's wake-ups (`race`).
    let copy = std::pin::pin!(tokio::io::copy_bidirectional(&mut a, &mut b));
    let watchdogs = std::pin::pin!(async {
        tokio::select! {
            _ = activity.idle_for(idle, None) => io::Error::new(io::ErrorKind::TimedOut, "idle timeout"),
            _ = close => io::Error::new(io::ErrorKind::ConnectionAborted, "the peer's credential lapsed"),
        }
    });
    match race(copy, watchdogs).await {
        First::Main(res) => res,
        First::Side(e) => Err(e),
    }
}
