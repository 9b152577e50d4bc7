//! Connection plumbing shared by every listener: bounded accept loops, the
//! idle watchdog, serving HTTP with graceful shutdown, and TCP splicing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::Limits;
use crate::drain;

/// Whether a connection has moved bytes lately, and how many requests it
/// has in flight.
///
/// The data path only sets a flag (no clock read per read or write); the
/// idle watchdog looks at it a few times per idle period.
#[derive(Debug)]
pub struct Activity {
    touched: AtomicBool,
    inflight: AtomicUsize,
}

/// Counts one request in flight while held.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

/// An I/O stream that records activity on every read and write.
#[derive(Debug)]
pub struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl Activity {
    /// A fresh record, active now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            touched: AtomicBool::new(true),
            inflight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        // Read first: most calls find it set and leave the line clean.
        if !self.touched.load(Ordering::Relaxed) {
            self.touched.store(true, Ordering::Relaxed);
        }
    }

    /// Marks a request in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Resolves once no request has been in flight and no byte has moved
    /// for `idle` (give or take an eighth of it: activity is sampled).
    pub async fn idle_for(&self, idle: Duration) {
        let every = (idle / 8).max(Duration::from_millis(10));
        let mut quiet_since = Instant::now();
        loop {
            if self.touched.swap(false, Ordering::Relaxed)
                || self.inflight.load(Ordering::Relaxed) > 0
            {
                quiet_since = Instant::now();
            }
            let quiet = quiet_since.elapsed();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(every.min(idle - quiet).max(Duration::from_millis(1))).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl<T> Tracked<T> {
    /// Wraps `inner`, recording into `activity`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            self.activity.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Binds a listener and returns it with the address it got (port 0 picks one).
pub async fn bind(name: &str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), crate::Error> {
    let err = |source| crate::Error::Bind {
        name: name.to_owned(),
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// What serves the connections a [`Listener`] accepts.
pub trait Serve: Send + Sync + 'static {
    /// Serves one accepted connection to its end.
    fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        addr: SocketAddr,
        drain: drain::Watch,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// A bound listener and what serves its connections.
pub struct Listener<S> {
    listener: TcpListener,
    name: Arc<str>,
    max_connections: usize,
    shared: Arc<S>,
}

impl<S: Serve> Listener<S> {
    /// Pairs a listener bound at `addr` with what serves it (at most
    /// `max_connections` at once), and says so in the log.
    pub fn new(
        listener: TcpListener,
        addr: SocketAddr,
        name: Arc<str>,
        max_connections: usize,
        shared: S,
    ) -> Self {
        tracing::info!(listener = %name, addr = %addr, "listening");
        Self {
            listener,
            name,
            max_connections,
            shared: Arc::new(shared),
        }
    }

    /// Serves until the drain starts; open connections finish on their own.
    pub async fn serve(self, drain: drain::Watch) {
        let shared = self.shared;
        accept_loop(
            self.listener,
            self.name,
            self.max_connections,
            drain,
            move |tcp, addr, drain| shared.clone().connection(tcp, addr, drain),
        )
        .await;
    }
}

/// Accepts connections until the drain starts, never holding more than
/// `max` at once; each is handled on its own task with a drain watch.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: Arc<str>,
    max: usize,
    drain: drain::Watch,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, drain::Watch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = drain.signaled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.signaled() => break,
        };
        let _ = stream.set_nodelay(true);
        let fut = handle(stream, peer, drain.clone());
        tokio::spawn(async move {
            fut.await;
            drop(permit);
        });
    }
    tracing::info!(listener = %name, "stopped accepting");
}

// The server settings, applied the same to hyper's builders and to the
// ones inside hyper-util's `auto` builder (same methods, other types).
macro_rules! http1_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .header_read_timeout($limits.header_read_timeout)
            .max_buf_size($limits.max_header_bytes.max(8192))
            .keep_alive(true)
    };
}

macro_rules! http2_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .max_header_list_size($limits.max_header_bytes.min(u32::MAX as usize) as u32)
            .max_concurrent_streams(1000)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

/// The HTTP/1.1 server side of a TLS listener (ALPN chose the version).
pub fn http1_server(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    http1_settings!(b, limits);
    b
}

/// The HTTP/2 server side of a TLS listener (ALPN chose the version).
pub fn http2_server(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    http2_settings!(b, limits);
    b
}

/// The HTTP server side of a plaintext listener, which tells HTTP/2 (prior
/// knowledge, h2c) from HTTP/1.1 by the first bytes; same settings.
pub fn http_server(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    http1_settings!(b.http1(), limits);
    http2_settings!(b.http2(), limits);
    b
}

/// Serves one HTTP connection (any of hyper's) until it ends, closing it
/// gracefully (in-flight requests finish) when it has been idle too long or
/// the drain starts.
///
/// The connection comes boxed: an async fn keeps a by-value argument in its
/// state twice (rustc #62958), and hyper's connection state is kilobytes.
pub async fn serve_http<C>(
    mut conn: Pin<Box<C>>,
    activity: &Activity,
    idle: Duration,
    drain: &drain::Watch,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: GracefulConnection,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut closing = false;
    loop {
        tokio::select! {
            // The connection first, and no random branch order to draw
            // on each of its wake-ups.
            biased;
            res = conn.as_mut() => return res.map_err(Into::into),
            _ = drain.signaled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.idle_for(idle), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Splices two streams: bytes both ways, half-close passed on, until both
/// directions end, the pair is idle too long, or the drain's grace runs out
/// (the process exits then).
pub async fn splice<A, B>(
    mut a: A,
    mut b: B,
    activity: &Activity,
    idle: Duration,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        res = tokio::io::copy_bidirectional(&mut a, &mut b) => res,
        _ = activity.idle_for(idle) => Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
    }
}
