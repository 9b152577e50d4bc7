//! Connection plumbing shared by every listener: bounded accept loops (the
//! one loop of [`moat_ca::listen`]), the idle watchdog, serving HTTP with
//! graceful shutdown, and TCP splicing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

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

/// A stream whose writes wait for the rest of the scheduler's tick.
///
/// Each write first wakes its own task and returns `Pending` once; the task
/// runs again after the other tasks that were ready, and the write goes out
/// then. The requests parsed in one tick thus reach the service together,
/// and a service that shares the core under load is woken fewer times per
/// request (HTTP/2 4x8 on one core: ~3 % less proxy CPU per request,
/// benches/results/analysis.md). A write is deferred once, never twice, so
/// nothing waits for anything but the scheduler; reads, flushes and
/// shutdowns pass straight through.
#[derive(Debug)]
pub struct TickBatched<T> {
    inner: T,
    deferred: bool,
}

impl<T> TickBatched<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            deferred: false,
        }
    }

    /// `Ready` once this write has waited for the tick's end.
    fn wait_tick(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.deferred {
            return Poll::Ready(());
        }
        self.deferred = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// After the inner write: the next write waits again, unless this one
    /// is still pending on the socket (it has waited already).
    fn wrote<R>(&mut self, res: Poll<R>) -> Poll<R> {
        if res.is_ready() {
            self.deferred = false;
        }
        res
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TickBatched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TickBatched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.wait_tick(cx));
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(res)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.wait_tick(cx));
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(res)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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

    /// What serves this listener's connections (the transparent listener
    /// hands redirected connections to it).
    pub fn shared(&self) -> Arc<S> {
        self.shared.clone()
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
/// Failing `accept()` calls (out of file descriptors) back off instead of
/// spinning: see [`moat_ca::listen`].
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
    let stop = drain.clone();
    moat_ca::listen::Acceptor::new(listener, name, max)
        .run(async move { stop.signaled().await }, move |tcp, peer| {
            handle(tcp, peer, drain.clone())
        })
        .await;
}

// The server settings, applied the same to hyper's builders and to the
// ones inside hyper-util's `auto` builder (same methods, other types). The
// parsers' limits sit above `max_header_bytes` and `max_header_count`
// (`crate::head_limits::wire`); the handlers check those and answer 414/431.
macro_rules! http1_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .header_read_timeout($limits.header_read_timeout)
            .max_buf_size(crate::head_limits::wire($limits).h1_head)
            .max_headers($limits.max_header_count)
            .keep_alive(true)
    };
}

macro_rules! http2_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .max_header_list_size(crate::head_limits::wire($limits).h2_header_list)
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

/// The HTTP/2 server side of a TLS listener (ALPN chose the version),
/// its streams run by `streams`.
pub fn http2_server(limits: &Limits, streams: Streams) -> http2::Builder<Streams> {
    let mut b = http2::Builder::new(streams);
    http2_settings!(b, limits);
    b
}

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where an HTTP/2 connection's streams run.
///
/// On a one-thread runtime (`[runtime] worker_threads = 1`), on the
/// connection's own task: hyper hands each new stream to this executor and
/// [`WithStreams`] polls the streams beside the connection, so a stream's
/// response is written by the same poll that finished it, with no task
/// spawned, scheduled and woken in between (HTTP/2 4x8 on one core: +4 %
/// requests/s, benches/results/analysis.md). On more threads each stream
/// is a task of its own, so one connection's streams (a gRPC client's,
/// say) spread over the cores. On one thread a stream that panicked (none
/// should) would end its whole connection, not only itself.
#[derive(Clone)]
pub struct Streams {
    /// Streams started since [`WithStreams`] last looked; `None`: each
    /// stream is spawned.
    new: Option<Arc<std::sync::Mutex<Vec<StreamFuture>>>>,
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        match &self.new {
            Some(new) => new
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Box::pin(fut)),
            None => {
                tokio::spawn(fut);
            }
        }
    }
}

impl Streams {
    /// For one connection on the current runtime (see [`Streams`]).
    pub fn for_connection() -> Self {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let one_thread = Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread;
        Self {
            new: one_thread.then(Arc::default),
        }
    }

    /// The connection `conn` (built with this executor) together with its
    /// streams, as one future.
    pub fn run<C>(self, conn: C) -> WithStreams<C> {
        WithStreams {
            conn: Box::pin(conn),
            streams: self,
            running: FuturesUnordered::new(),
            spawned: Vec::new(),
        }
    }
}

/// An HTTP/2 connection and the streams it started on its own task (see
/// [`Streams`]). It ends when the connection does: after a graceful close
/// that is once every stream has answered; streams still running when the
/// connection fails (its client has gone) are dropped with it.
pub struct WithStreams<C> {
    conn: Pin<Box<C>>,
    streams: Streams,
    running: FuturesUnordered<StreamFuture>,
    spawned: Vec<StreamFuture>,
}

impl<C: Future> Future for WithStreams<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        let Some(new) = &this.streams.new else {
            return this.conn.as_mut().poll(cx);
        };
        loop {
            // Streams first, so that the connection's poll below writes the
            // responses they finished.
            while let Poll::Ready(Some(())) = this.running.poll_next_unpin(cx) {}
            if let Poll::Ready(done) = this.conn.as_mut().poll(cx) {
                return Poll::Ready(done);
            }
            std::mem::swap(
                &mut this.spawned,
                &mut new.lock().unwrap_or_else(|p| p.into_inner()),
            );
            if this.spawned.is_empty() {
                return Poll::Pending;
            }
            this.running.extend(this.spawned.drain(..));
        }
    }
}

/// A connection [`serve_http`] can close gracefully.
pub trait Graceful: Future {
    /// Stops taking new requests; the future ends once the open ones have.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<C: GracefulConnection> Graceful for C {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        GracefulConnection::graceful_shutdown(self)
    }
}

impl<C: Graceful> Graceful for WithStreams<C> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().conn.as_mut().graceful_shutdown()
    }
}

/// The HTTP server side of a plaintext listener, which tells HTTP/2 (prior
/// knowledge, h2c) from HTTP/1.1 by the first bytes; same settings, the
/// HTTP/2 streams run by `streams`.
pub fn http_server(limits: &Limits, streams: Streams) -> auto::Builder<Streams> {
    let mut b = auto::Builder::new(streams);
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
pub fn serve_http<'a, C, E>(
    conn: Pin<Box<C>>,
    activity: &'a Activity,
    idle: Duration,
    drain: &'a drain::Watch,
) -> impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + 'a
where
    C: Graceful<Output = Result<(), E>> + ?Sized + 'a,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'a,
{
    // Not an async fn: the caller holds `serve_http_until`'s future alone,
    // not a second copy of the arguments around it.
    serve_http_until(conn, activity, idle, drain, std::future::pending::<()>())
}

/// [`serve_http`], also closing gracefully when `close` resolves (the
/// peer's credential lapsed: [`crate::conn_registry`]). HTTP/2 sends
/// GOAWAY and finishes its open streams; HTTP/1.1 finishes the request in
/// flight, if any, and closes.
pub async fn serve_http_until<C, E, X>(
    mut conn: Pin<Box<C>>,
    activity: &Activity,
    idle: Duration,
    drain: &drain::Watch,
    close: X,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: Graceful<Output = Result<(), E>> + ?Sized,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    X: Future,
{
    let mut closing = false;
    let close = std::pin::pin!(close);
    let mut close = close;
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
            _ = close.as_mut(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Splices two streams: bytes both ways, half-close passed on, until both
/// directions end, the pair is idle too long, or the drain's grace runs out
/// (the process exits then).
pub async fn splice<A, B>(a: A, b: B, activity: &Activity, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    splice_until(a, b, activity, idle, std::future::pending::<()>()).await
}

/// Why [`relay_plain`] could not reach its destination.
#[derive(Debug)]
pub enum RelayConnectError {
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
pub async fn relay_plain(
    tcp: TcpStream,
    to: SocketAddr,
    connect_timeout: Duration,
    idle: Duration,
    listener: &str,
) -> Result<(), RelayConnectError> {
    let remote = match tokio::time::timeout(connect_timeout, TcpStream::connect(to)).await {
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
pub async fn splice_until<A, B, X>(
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
    tokio::select! {
        res = tokio::io::copy_bidirectional(&mut a, &mut b) => res,
        _ = activity.idle_for(idle) => Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
        _ = close => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the peer's credential lapsed")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn each_write_waits_once_for_the_tick_and_then_goes_out() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = TickBatched::new(a);
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        for round in 1..=2 {
            let first = Pin::new(&mut a).poll_write(&mut cx, b"hi");
            assert!(
                first.is_pending(),
                "round {round}: the write goes out on the next poll"
            );
            assert_eq!(
                wakes.0.load(Ordering::SeqCst),
                round,
                "it asked to be polled again"
            );
            let second = Pin::new(&mut a).poll_write(&mut cx, b"hi");
            assert!(
                matches!(second, Poll::Ready(Ok(2))),
                "round {round}: {second:?}"
            );
        }
        let mut got = [0u8; 4];
        let mut read = ReadBuf::new(&mut got);
        assert!(Pin::new(&mut b).poll_read(&mut cx, &mut read).is_ready());
        assert_eq!(read.filled(), b"hihi");
    }

    /// A write that meets a full socket buffer waits for the socket, not
    /// for another tick; a large body goes through whole.
    #[tokio::test]
    async fn a_large_write_through_a_full_socket_completes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body: Vec<u8> = (0..16 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expect = body.clone();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut w = TickBatched::new(TcpStream::connect(addr).await.unwrap());
        tokio::time::timeout(Duration::from_secs(20), async {
            w.write_all(&body).await.unwrap();
            w.shutdown().await.unwrap();
        })
        .await
        .expect("the write stalled");
        let got = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the reader stalled")
            .unwrap();
        assert!(
            got == expect,
            "{} of {} bytes, or other bytes",
            got.len(),
            expect.len()
        );
    }
}
