//! Idle tracking: whether a connection has moved bytes lately and how many
//! requests it has in flight, read by the idle watchdog.

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
    touched: AtomicBool,
    inflight: AtomicUsize,
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
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Resolves once no request has been in flight and no byte has moved
    /// for `idle` (give or take an eighth of it: activity is sampled).
    pub(crate) async fn idle_for(&self, idle: Duration) {
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
