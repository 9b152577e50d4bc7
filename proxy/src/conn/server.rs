//! Serving HTTP on an accepted connection: hyper's server builders with the
//! configured limits, HTTP/2 streams on their connection's own task on a
//! one-thread runtime ([`Streams`]), and [`serve_http`], which closes a
//! connection gracefully on idle, drain, or a lapsed peer credential.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;

use super::Activity;
use super::activity::Quiet;
use super::{First, race};
use crate::config::Limits;
use crate::drain;

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
pub(crate) fn http1_server(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    http1_settings!(b, limits);
    b
}

/// The HTTP/2 server side of a TLS listener (ALPN chose the version),
/// its streams run by `streams`.
pub(crate) fn http2_server(limits: &Limits, streams: Streams) -> http2::Builder<Streams> {
    let mut b = http2::Builder::new(streams);
    http2_settings!(b, limits);
    b
}

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where an HTTP/2 connection's streams run, each counted in flight on
/// the connection's [`Activity`] until it has answered (its response body
/// sent), so that the idle watchdog sees streams rather than bytes.
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
pub(crate) struct Streams {
    /// Streams started since [`WithStreams`] last looked; `None`: each
    /// stream is spawned.
    new: Option<Arc<std::sync::Mutex<Vec<StreamFuture>>>>,
    /// The connection's activity, which counts its streams.
    activity: Arc<Activity>,
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        // Only HTTP/2 runs streams here: a connection that does (the
        // plaintext side serves both, told apart by the preface) is idle
        // by streams, not bytes.
        self.activity.count_streams_only();
        let stream = self.activity.request();
        let fut = async move {
            let _stream = stream;
            fut.await;
        };
        match &self.new {
            Some(new) => new
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(Box::pin(fut)),
            None => {
                tokio::spawn(fut);
            }
        }
    }
}

impl Streams {
    /// For one connection with `activity` on the current runtime (see
    /// [`Streams`]).
    pub(crate) fn for_connection(activity: &Arc<Activity>) -> Self {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let one_thread = Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread;
        Self {
            new: one_thread.then(Arc::default),
            activity: activity.clone(),
        }
    }

    /// The connection `conn` (built with this executor) together with its
    /// streams, as one future.
    pub(crate) fn run<C>(self, conn: C) -> WithStreams<C> {
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
pub(crate) struct WithStreams<C> {
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
                &mut new
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            if this.spawned.is_empty() {
                return Poll::Pending;
            }
            this.running.extend(this.spawned.drain(..));
        }
    }
}

/// A connection [`serve_http`] can close gracefully.
pub(crate) trait Graceful: Future {
    /// Stops taking new requests; the future ends once the open ones have.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<C: GracefulConnection> Graceful for C {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        GracefulConnection::graceful_shutdown(self);
    }
}

impl<C: Graceful> Graceful for WithStreams<C> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().conn.as_mut().graceful_shutdown();
    }
}

/// The HTTP server side of a plaintext listener, which tells HTTP/2 (prior
/// knowledge, h2c) from HTTP/1.1 by the first bytes; same settings, the
/// HTTP/2 streams run by `streams`.
pub(crate) fn http_server(limits: &Limits, streams: Streams) -> auto::Builder<Streams> {
    let mut b = auto::Builder::new(streams);
    http1_settings!(b.http1(), limits);
    http2_settings!(b.http2(), limits);
    b
}

/// Why [`serve_http_until`] cut a connection short: both are a client
/// holding a connection (a slot under `max_connections`) without using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Cut {
    /// No request head (HTTP/1.1), or no preface and first HEADERS
    /// (HTTP/2), within `header_read_timeout` of the connection's start.
    #[error("no request within header_read_timeout")]
    NoFirstRequest,
    /// Closed gracefully for idleness (or, before any request, for the drain
    /// or a lapsed credential), the connection had not ended
    /// `header_read_timeout` later (a GOAWAY's PING left unanswered, or an
    /// HTTP/2 handshake that never finished: hyper defers a graceful close
    /// asked during its handshake until the preface has come).
    #[error("graceful close not finished within header_read_timeout")]
    CloseUnfinished,
}

/// Serves one HTTP connection (any of hyper's) until it ends, closing it
/// gracefully (in-flight requests finish) when it has been idle too long or
/// the drain starts, or it has not started a request within
/// `header_read_timeout` (then reported as a [`Cut`] error).
///
/// The connection comes boxed: an async fn keeps a by-value argument in its
/// state twice (rustc #62958), and hyper's connection state is kilobytes.
pub(crate) fn serve_http<'a, C, E>(
    conn: Pin<Box<C>>,
    activity: &'a Activity,
    limits: &'a Limits,
    drain: &'a drain::Watch,
) -> impl Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + 'a
where
    C: Graceful<Output = Result<(), E>> + ?Sized + 'a,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'a,
{
    // Not an async fn: the caller holds `serve_http_until`'s future alone,
    // not a second copy of the arguments around it.
    serve_http_until(conn, activity, limits, drain, std::future::pending::<()>())
}

/// [`serve_http`], also closing gracefully when `close` resolves (the
/// peer's credential lapsed: [`crate::conn_registry`]). HTTP/2 sends
/// GOAWAY and finishes its open streams; HTTP/1.1 finishes the request in
/// flight, if any, and closes.
///
/// Deadlines, one per connection and none per request:
/// - `header_read_timeout` for the first request: a connection that has not
///   delivered a request head (HTTP/1.1) or its preface and first HEADERS
///   (HTTP/2; or, on the plaintext side, the bytes that tell the version
///   apart) by then is closed gracefully (an HTTP/2 GOAWAY), and dropped if
///   that has not ended it `header_read_timeout` later
///   ([`Cut::NoFirstRequest`] either way).
///   hyper's own `header_read_timeout` covers each HTTP/1.1 head once
///   hyper reads one, but neither hyper's HTTP/2 server nor hyper-util's
///   version sniffing has a deadline.
/// - `idle_timeout`, then a graceful close, which must end within
///   `header_read_timeout` or the connection is dropped
///   ([`Cut::CloseUnfinished`]). An idle connection has nothing in flight
///   to wait for. Closes for the drain or a lapsed credential are bounded
///   the same only on a connection that never started a request; otherwise
///   in-flight requests finish (the drain has its own `shutdown_grace`).
pub(crate) async fn serve_http_until<C, E, X>(
    mut conn: Pin<Box<C>>,
    activity: &Activity,
    limits: &Limits,
    drain: &drain::Watch,
    close: X,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: Graceful<Output = Result<(), E>> + ?Sized,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    X: Future,
{
    let (idle, first_request) = (limits.idle_timeout, limits.header_read_timeout);
    // The watchdogs are polled only when one of them woke the task, not on
    // each of the connection's wake-ups (`race`).
    let watchdogs = std::pin::pin!(async {
        tokio::select! {
            biased;
            () = drain.signaled() => None,
            quiet = activity.idle_for(idle, Some(first_request)) => Some(quiet),
            _ = close => None,
        }
    });
    let bounded = match race(conn.as_mut(), watchdogs).await {
        First::Main(Ok(())) => return Ok(()),
        First::Main(Err(e)) => {
            let e = e.into();
            // hyper's own HTTP/1.1 header timeout, on the first head: the
            // same cut, whichever timer fired first. (On a later head it
            // is also how an idle keep-alive connection ends: not a cut.)
            if is_header_timeout(&*e) && !activity.served() {
                return Err(Cut::NoFirstRequest.into());
            }
            return Err(e);
        }
        // No request yet: closed gracefully all the same, so that an HTTP/2
        // client that connected ahead of its first call (gRPC channels do)
        // gets a GOAWAY, not a reset; one that never finished its preface
        // (hyper defers the close until it has) is dropped at the bound.
        First::Side(Some(Quiet::NoFirstRequest)) => Bound::FirstRequest,
        First::Side(Some(Quiet::Idle)) => Bound::Close,
        // The drain or a lapsed credential: in-flight requests finish,
        // unless none was ever asked (a handshake that never ends).
        First::Side(None) if !activity.served() => Bound::Close,
        First::Side(None) => Bound::None,
    };
    conn.as_mut().graceful_shutdown();
    let finished = match bounded {
        Bound::None => return conn.await.map_err(Into::into),
        Bound::Close | Bound::FirstRequest => tokio::time::timeout(first_request, conn).await,
    };
    match (finished, bounded) {
        (_, Bound::FirstRequest) => Err(Cut::NoFirstRequest.into()),
        (Ok(res), _) => res.map_err(Into::into),
        (Err(_), _) => Err(Cut::CloseUnfinished.into()),
    }
}

/// How long a graceful close in [`serve_http_until`] may take.
#[derive(Clone, Copy)]
enum Bound {
    /// As long as its requests in flight take (the drain's own grace ends it).
    None,
    /// `header_read_timeout`, then dropped ([`Cut::CloseUnfinished`]).
    Close,
    /// The same, for a connection that never started a request: reported as
    /// [`Cut::NoFirstRequest`] however it ended.
    FirstRequest,
}

/// hyper's HTTP/1.1 `header_read_timeout` (its only timeout error without
/// a source: HTTP/2's keep-alive timeout carries one).
fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper::Error>()
        .is_some_and(|e| e.is_timeout() && std::error::Error::source(e).is_none())
}
