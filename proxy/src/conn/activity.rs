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

    /// Resolves once no request has been in flight and no byte has moved
    /// (no byte counts after [`Activity::count_streams_only`]) for `idle`
    /// (give or take an eighth of it: activity is sampled).
    pub(crate) async fn idle_for(&self, idle: Duration) {
        let every = (idle / 8).max(Duration::from_millis(10));
        let mut quiet_since = Instant::now();
        loop {
            let moved = self.touched.swap(false, Ordering::Relaxed)
                && !self.streams_only.load(Ordering::Relaxed);
            if moved
                || self.ended.swap(false, Ordering::Relaxed)
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
