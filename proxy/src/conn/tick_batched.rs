//! [`TickBatched`]: a stream whose writes wait for the end of the
//! scheduler's tick, so the requests parsed in one tick reach the service
//! together.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
///
/// Only on the one-thread runtime (`[runtime] worker_threads = 1`, which
/// builds tokio's `current_thread` runtime, as the load harness sets it):
/// that is where the figure was measured. On the
/// multi-thread runtime a task that wakes itself goes to the back of its
/// worker's queue and may wake an idle worker to steal it, so the deferral
/// can cost more than it saves. Measured with two workers (callgrind,
/// instructions per request, `WORKERS=2 bash benches/load/callgrind.sh`):
/// deferring cost 51,921 against 49,265 on in_h1 (+5.4 %) and 51,790
/// against 49,709 on pair_h1's inbound (+4.2 %), 71,205 against 71,843 on
/// in_h2 (−0.9 %, within noise); no gain in CPU time can be shown on this
/// 2-core machine (the load generator shares the cores). So there writes
/// pass straight through (issue 17, item 14).
#[derive(Debug)]
pub(crate) struct TickBatched<T> {
    inner: T,
    deferred: bool,
    batch: bool,
}

impl<T> TickBatched<T> {
    /// Wraps `inner`, deferring writes when this runs on a one-thread
    /// (`current_thread`) runtime.
    pub(crate) fn new(inner: T) -> Self {
        let one_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        Self::batching(inner, one_thread)
    }

    /// Wraps `inner`; writes wait for the tick's end only if `batch`.
    pub(crate) fn batching(inner: T, batch: bool) -> Self {
        Self {
            inner,
            deferred: false,
            batch,
        }
    }

    /// `Ready` once this write has waited for the tick's end.
    fn wait_tick(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.deferred || !self.batch {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

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
        let mut a = TickBatched::batching(a, true);
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
