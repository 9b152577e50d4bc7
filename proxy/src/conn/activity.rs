//! Idle tracking: whether a connection has moved bytes lately and how many
//! requests it has in flight, read by the idle watchdog.
//!
//! An HTTP/2 connection is idle when it has had no stream open, whatever
//! bytes moved: PING frames (ours every 30 s, and the peer's) would
//! otherwise keep an unused connection open for ever. An HTTP/1.1
//! connection, a TCP relay and a tunnel count bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether a connection has moved bytes lately, and how many requests it
/// has in flight.
///
/// The data path only sets a flag (no clock read per read or write); the
/// idle watchdog looks at it a few times per idle period.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Bytes moved since the watchdog last looked.
    touched: AtomicBool,
    /// A request (or HTTP/2 stream) ended since the watchdog last looked.
    ended: AtomicBool,
    inflight: AtomicUsize,
    /// HTTP/2: only requests count, not bytes ([`Activity::count_streams_only`]).
    streams_only: AtomicBool,
    /// The sampler has seen a request (see [`Activity::served`]).
    served: AtomicBool,
}

/// Why [`Activity::idle_for`] resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quiet {
    /// Nothing in flight and nothing moving for the idle period.
    Idle,
    /// No request started within the first-request deadline.
    NoFirstRequest,
}

/// Counts one request in flight while held.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

/// An I/O stream that records activity on every read and write.
#[derive(Debug)]
pub(crate) struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl Activity {
    /// A fresh record, active now.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            touched: AtomicBool::new(true),
            ended: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            streams_only: AtomicBool::new(false),
            served: AtomicBool::new(false),
        })
    }

    /// From now on only requests in flight count as activity, not bytes:
    /// for an HTTP/2 connection, whose PINGs move bytes while it carries
    /// nothing. (Envoy's `idle_timeout` means the same: no active streams.)
    pub(crate) fn count_streams_only(&self) {
        raise(&self.streams_only);
    }

    fn touch(&self) {
        raise(&self.touched);
    }

    /// Marks a request in flight until the guard drops.
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Whether a request (an HTTP/2 stream) has started on this connection:
    /// one the idle watchdog saw, or one in flight or ended since it last
    /// looked. Read when the connection ends, never per request.
    pub(crate) fn served(&self) -> bool {
        self.served.load(Ordering::Relaxed)
            || self.ended.load(Ordering::Relaxed)
            || self.inflight.load(Ordering::Relaxed) > 0
    }

    /// Resolves once no request has been in flight and no byte has moved
    /// (no byte counts after [`Activity::count_streams_only`]) for `idle`
    /// (give or take an eighth of it: activity is sampled), or, with
    /// `first_request`, once that long has passed without any request (an
    /// HTTP/2 stream) having started. The first request is seen by the
    /// sampler (in flight, or ended since it last looked), so the request
    /// path pays nothing for this deadline.
    pub(crate) async fn idle_for(&self, idle: Duration, first_request: Option<Duration>) -> Quiet {
        let every = (idle / 8).max(Duration::from_millis(10));
        let mut quiet_since = Instant::now();
        let mut first_by = first_request.map(|d| quiet_since + d);
        loop {
            // All three read on every look: a request that ended must be
            // seen even while bytes move.
            let moved = self.touched.swap(false, Ordering::Relaxed)
                && !self.streams_only.load(Ordering::Relaxed);
            let ended = self.ended.swap(false, Ordering::Relaxed);
            let busy = self.inflight.load(Ordering::Relaxed) > 0;
            if ended || busy {
                raise(&self.served);
                first_by = None;
            }
            let now = Instant::now();
            if moved || ended || busy {
                quiet_since = now;
            }
            if first_by.is_some_and(|by| now >= by) {
                return Quiet::NoFirstRequest;
            }
            let quiet = now - quiet_since;
            if quiet >= idle {
                return Quiet::Idle;
            }
            let mut wait = every.min(idle - quiet);
            if let Some(by) = first_by {
                wait = wait.min(by - now);
            }
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        raise(&self.0.ended);
    }
}

/// Sets a flag that a sampler clears now and then, on a path taken far more
/// often than it samples. Read first: most calls find it set and leave the
/// cache line clean (shared, not written) for the other cores.
pub(crate) fn raise(flag: &AtomicBool) {
    if !flag.load(Ordering::Relaxed) {
        flag.store(true, Ordering::Relaxed);
    }
}

impl<T> Tracked<T> {
    /// Wraps `inner`, recording into `activity`.
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
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
