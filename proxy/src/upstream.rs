//! The proxy's client side: pooled connections to the one upstream a
//! listener forwards to (the local service inbound, the peer sidecar
//! outbound).
//!
//! HTTP/1.1 requests take an idle keep-alive connection from a LIFO pool
//! (or dial a new one); HTTP/2 requests share one multiplexed connection.
//! Either is closed once it has carried no request for
//! `pool_idle_timeout`: an HTTP/1.1 connection idle in the pool, an HTTP/2
//! connection with no stream open (its keep-alive PINGs, sent only while a
//! stream is open, do not count; a stream that stays open, a long gRPC call
//! or download, keeps it).
//! Built on hyper's connection-level client rather than hyper-util's pooled
//! `Client`: a listener has exactly one upstream, so there is no pool key to
//! hash, no request channel hop through a pool task, and no task spawned per
//! request to wait for the connection to become idle again — measured as
//! the largest user-space share of a forwarded request
//! (benches/results/analysis.md).
//!
//! Response heads are held to the same limits as request heads
//! (`max_header_bytes`, `max_header_count`): one over them is answered 502
//! `response_headers_too_large` for its own request, never passed on to a
//! peer whose parser would have to refuse it (over HTTP/2, a header block
//! far over the receiver's limit is a connection error that takes every
//! other stream with it).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::{CallerBodyError, ProxyBody};
use crate::config::Limits;
use crate::conn::{First, race};
use crate::conn_registry::Lease;
use crate::expect::{self, Gate, HeldBody};
use crate::head_limits::{head_within, wire};
use crate::headers::strip_hop_by_hop;
use crate::proxy_error::ProxyError;

/// Opens a new transport connection to the upstream.
pub(crate) trait Dial: Send + Sync + 'static {
    /// The connected stream (TCP, or TLS over TCP).
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Dials the upstream; the error names the side that failed.
    fn dial(&self) -> impl Future<Output = Result<Self::Io, ProxyError>> + Send;

    /// Registers a dialed connection with the open-connection registry,
    /// when its peer authenticated it (peer sidecars; not the local
    /// service). The pool stops using the connection once the lease says
    /// the peer's credential lapsed.
    fn lease(&self, _io: &Self::Io) -> Option<Lease> {
        None
    }
}

/// What goes upstream: the caller's body, none (a request without a body
/// can be sent again), or the caller's body held back for
/// `Expect: 100-continue` ([`crate::expect`]).
pub(crate) enum OutBody<B> {
    /// The caller's body, as it comes.
    Whole(B),
    /// No body.
    Empty,
    /// The caller's body once the upstream asks for it (boxed: rare, and
    /// larger than the others).
    Held(Box<HeldBody<B>>),
}

/// A pooled connection idle at least this long may have been closed by the
/// service just as we send on it; a bodiless idempotent request sent on it
/// is kept so that it can go again on a fresh connection.
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(500);

/// Pooled HTTP/1.1 and HTTP/2 connections to one upstream.
pub(crate) struct UpstreamClient<D, B = Incoming> {
    h1_dial: D,
    h2_dial: D,
    h1: Arc<Mutex<VecDeque<Idle<B>>>>,
    h2: Arc<Mutex<Option<PooledH2<B>>>>,
    h2_connecting: tokio::sync::Mutex<()>,
    h1_builder: http1::Builder,
    h2_builder: http2::Builder<TokioExecutor>,
    limits: Limits,
    max_idle: usize,
}

/// An HTTP/1.1 connection in the pool, and since when.
struct Idle<B> {
    tx: http1::SendRequest<OutBody<B>>,
    since: Instant,
    lapsed: Lapsed,
}

/// The shared HTTP/2 connection: its handle, whether its peer lapsed, and
/// whether it has streams open.
struct PooledH2<B> {
    tx: http2::SendRequest<OutBody<B>>,
    lapsed: Lapsed,
    /// One reference here and one per stream open on the connection
    /// ([`OpenStream`]): the count of streams is the `Arc`'s, as hyper
    /// counts them for its own keep-alive (`ping::Recorder`), so a request
    /// costs the clone and drop it needs anyway and no counter of its own.
    streams: Arc<StreamsEnded>,
    /// Since when the reaper has seen no stream open or ended on it.
    quiet_since: Instant,
}

/// Set when a stream on a pooled HTTP/2 connection ends, so that the
/// reaper, which looks every so often, sees a connection that carried
/// requests between two looks as used.
#[derive(Debug, Default)]
struct StreamsEnded(AtomicBool);

/// One stream open on the pooled HTTP/2 connection: taken with the
/// connection's handle for a request, then carried by the response body
/// until it ends or is dropped. The pool closes the connection only once
/// it has had none for `pool_idle_timeout`.
#[derive(Debug)]
pub struct OpenStream(Arc<StreamsEnded>);

/// Set once the peer's credential behind a pooled connection lapsed
/// (revoked, expired, root retired): the connection takes no new request,
/// and closes once the ones on it have answered.
#[derive(Clone, Default)]
struct Lapsed(Option<Arc<AtomicBool>>);

impl Lapsed {
    fn is_set(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

impl<D, B> UpstreamClient<D, B>
where
    D: Dial,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A client dialing with `h1_dial` for HTTP/1.1 and `h2_dial` for
    /// HTTP/2 (they differ outbound: the ALPN offered), with the pool and
    /// timeout limits.
    pub(crate) fn new(h1_dial: D, h2_dial: D, limits: &Limits) -> Self {
        let h1 = Arc::new(Mutex::new(VecDeque::new()));
        let h2 = Arc::default();
        spawn_reaper(
            Arc::downgrade(&h1),
            Arc::downgrade(&h2),
            limits.pool_idle_timeout,
        );
        let wire = wire(limits);
        let mut h1_builder = http1::Builder::new();
        h1_builder
            .max_headers(limits.max_header_count)
            .max_header_size(wire.h1_head);
        let mut h2_builder = http2::Builder::new(TokioExecutor::new());
        // Keep-alive finds a peer gone silent under an open stream. hyper's
        // client pings only while a stream is open (`keep_alive_while_idle`
        // stays off), so the PINGs never keep an unused connection up: the
        // reaper closes it. Kept on for its per-request cost of ~2 %
        // (benches/results/analysis.md, "HTTP/2 keep-alive pings off").
        h2_builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
            .max_header_list_size(wire.h2_client_header_list);
        Self {
            h1_dial,
            h2_dial,
            h1,
            h2,
            h2_connecting: tokio::sync::Mutex::new(()),
            h1_builder,
            h2_builder,
            limits: limits.clone(),
            max_idle: 256,
        }
    }

    /// Sends `req` (HTTP/2 if its version says so, else HTTP/1.1) and
    /// returns the response with hop-by-hop headers removed, its head
    /// checked against the limits, and no body if it answers a HEAD. The
    /// timeout covers connecting and the response head.
    ///
    /// Not an `async fn`: the request is taken apart before the future is
    /// built, so the future holds it once (inside the boxed send) instead
    /// of also keeping the argument's slot (rustc #62958), and the timeout
    /// is mapped rather than awaited by an `async` block that would hold it
    /// twice.
    pub(crate) fn send(
        &self,
        req: Request<B>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + '_ {
        let head_only = req.method() == Method::HEAD;
        let h2 = req.version() == Version::HTTP_2;
        let mut gate = None;
        let req = if req.body().is_end_stream() {
            req.map(|_| OutBody::Empty)
        } else if !h2 && expect::expects_continue(req.headers()) {
            let (held, g) = expect::hold(req, self.limits.expect_continue_timeout);
            gate = Some(g);
            held.map(|b| OutBody::Held(Box::new(b)))
        } else {
            req.map(OutBody::Whole)
        };
        let send: Pin<Box<dyn Future<Output = _> + Send + '_>> = if h2 {
            Box::pin(self.send_h2(req))
        } else {
            Box::pin(self.send_h1(req).map(|sent| sent.map(|resp| (resp, None))))
        };
        let timeout = self.limits.request_timeout;
        tokio::time::timeout(timeout, send).map(move |sent| match sent {
            Ok(Ok((resp, stream))) => self.relay(resp, head_only, gate, stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProxyError::Timeout(timeout)),
        })
    }

    /// The upstream's response as it goes back: in HTTP/1.1, hop-by-hop
    /// headers out, the head within the limits, no body on a HEAD answer (an HTTP/2 service
    /// may send one, which HTTP/2 forbids: it is dropped, not passed on as
    /// a stream error), a body held for 100-continue given up once the
    /// final answer is relayed, and the HTTP/2 `stream` counted open until
    /// the body ends.
    fn relay(
        &self,
        resp: Response<Incoming>,
        head_only: bool,
        gate: Option<Arc<Gate>>,
        stream: Option<OpenStream>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // A proxy answers in its own version (RFC 9110 §6.2), whatever the
        // service spoke: an HTTP/1.0 answer (python's `http.server`) would
        // end the caller's keep-alive connection and lose chunked framing.
        // hyper still answers an HTTP/1.0 caller in HTTP/1.0.
        parts.version = Version::HTTP_11;
        if !head_within(&parts.headers, &self.limits) {
            return Err(ProxyError::ResponseHeadersTooLarge(format!(
                "{} fields",
                parts.headers.len()
            )));
        }
        let body = if head_only {
            ProxyBody::empty()
        } else {
            ProxyBody::Upstream {
                body,
                limit: (&self.limits).into(),
                give_up: gate.filter(|g| g.is_waiting()).map(|g| g.give_up_on_drop()),
                stream,
            }
        };
        Ok(Response::from_parts(parts, body))
    }

    /// Sends an `Upgrade` request on a connection of its own (HTTP/1.1,
    /// never pooled: after a 101 it carries the upgraded protocol) and
    /// returns the response as it came, `OnUpgrade` included. The timeout
    /// covers connecting and the response head.
    pub(crate) async fn send_upgrade(
        &self,
        req: Request<B>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut req = req.map(|b| {
            if b.is_end_stream() {
                OutBody::Empty
            } else {
                OutBody::Whole(b)
            }
        });
        into_origin_form(&mut req);
        let exchange = async {
            let io = self.h1_dial.dial().await?;
            let lease = self.h1_dial.lease(&io);
            let (mut tx, conn) = self
                .h1_builder
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| upstream_error(&e))?;
            // A tunnel has no request boundary: it ends at once when the
            // peer's credential lapses.
            drive(
                conn.with_upgrades(),
                "HTTP/1.1 upgrade",
                lease,
                Lapsed::default(),
                || {},
                true,
            );
            tx.send_request(req).await.map_err(|e| upstream_error(&e))
        };
        let timeout = self.limits.request_timeout;
        match tokio::time::timeout(timeout, exchange).await {
            Ok(sent) => sent,
            Err(_) => Err(ProxyError::Timeout(timeout)),
        }
    }

    /// Sends `req` on a pooled HTTP/1.1 connection (or a new one).
    ///
    /// Not an `async fn`: it would keep the request twice in its state, the
    /// argument and the local it moves into (rustc #62958). The future is
    /// boxed per request, and kept under glibc's per-thread cache limit
    /// (1,032 bytes) so that its allocation takes the fast path: the
    /// connect (once per connection; a TLS handshake on the outbound, over
    /// 2 KiB of state) and the rare replay copy are boxed on their own.
    fn send_h1(
        &self,
        mut req: Request<OutBody<B>>,
    ) -> impl Future<Output = Result<Response<Incoming>, ProxyError>> + Send + '_ {
        into_origin_form(&mut req);
        async move {
            loop {
                let Some((mut tx, idle, lapsed)) = self.checkout_h1() else {
                    let (mut tx, lapsed) = Box::pin(self.connect_h1()).await?;
                    return match tx.send_request(req).await {
                        Ok(resp) => {
                            self.checkin_h1(tx, lapsed);
                            Ok(resp)
                        }
                        Err(e) => Err(upstream_error(&e)),
                    };
                };
                let again = if idle >= REPLAY_AFTER_IDLE {
                    replay(&req).map(Box::new)
                } else {
                    None
                };
                match tx.try_send_request(req).await {
                    Ok(resp) => {
                        self.checkin_h1(tx, lapsed);
                        return Ok(resp);
                    }
                    // The pooled connection was closed under us: the request
                    // either never left (hyper gives it back) or was bodiless,
                    // idempotent and got no answer at all. Try the next one.
                    Err(mut e) => match e.take_message().or_else(|| {
                        again
                            .filter(|_| e.error().is_incomplete_message())
                            .map(|b| *b)
                    }) {
                        Some(back) => req = back,
                        None => return Err(upstream_error(e.error())),
                    },
                }
            }
        }
    }

    /// The most recently used idle connection that is ready for a request,
    /// and how long it has been idle. Connections still streaming a
    /// response body stay in the pool.
    fn checkout_h1(&self) -> Option<(http1::SendRequest<OutBody<B>>, Duration, Lapsed)> {
        let mut idle = self
            .h1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let entry = &idle[i];
            if entry.tx.is_closed() || entry.lapsed.is_set() {
                idle.remove(i);
            } else if entry.tx.is_ready() {
                return idle.remove(i).map(|e| (e.tx, e.since.elapsed(), e.lapsed));
            }
        }
        None
    }

    /// Returns a connection to the pool; it takes the next request once its
    /// response has been read to the end.
    fn checkin_h1(&self, tx: http1::SendRequest<OutBody<B>>, lapsed: Lapsed) {
        if lapsed.is_set() {
            // Dropped: the connection closes once this response is read.
            return;
        }
        let mut idle = self
            .h1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push_back(Idle {
                tx,
                since: Instant::now(),
                lapsed,
            });
        }
    }

    async fn connect_h1(&self) -> Result<(http1::SendRequest<OutBody<B>>, Lapsed), ProxyError> {
        let io = self.h1_dial.dial().await?;
        let lease = self.h1_dial.lease(&io);
        let (tx, conn) = self
            .h1_builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| upstream_error(&e))?;
        let lapsed = Lapsed(lease.is_some().then(Arc::default));
        let pool = Arc::downgrade(&self.h1);
        // Idle pooled connections of the lapsed peer close at once.
        let purge = move || {
            if let Some(pool) = pool.upgrade() {
                let mut idle = pool
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                idle.retain(|e| !e.lapsed.is_set());
            }
        };
        drive(conn, "HTTP/1.1", lease, lapsed.clone(), purge, false);
        Ok((tx, lapsed))
    }

    /// Sends `req` on the shared HTTP/2 connection (or a new one); the
    /// response comes with its stream, counted open until dropped.
    async fn send_h2(
        &self,
        req: Request<OutBody<B>>,
    ) -> Result<(Response<Incoming>, Option<OpenStream>), ProxyError> {
        let mut req = req;
        let mut fresh = false;
        loop {
            let (tx, stream) = match self.current_h2() {
                Some(current) => current,
                None => {
                    fresh = true;
                    self.connect_h2().await?
                }
            };
            let mut tx = tx;
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Some(stream))),
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => {
                        self.forget_h2(&tx);
                        req = back;
                    }
                    _ => return Err(upstream_error(e.error())),
                },
            }
        }
    }

    /// The shared connection's handle and a new stream on it, if it is
    /// open. The stream is counted under the lock the reaper takes, so the
    /// reaper never closes a connection a request has just taken.
    fn current_h2(&self) -> Option<(http2::SendRequest<OutBody<B>>, OpenStream)> {
        let slot = self
            .h2
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.as_ref()
            .filter(|c| !c.tx.is_closed() && !c.lapsed.is_set())
            .map(|c| (c.tx.clone(), OpenStream(c.streams.clone())))
    }

    fn forget_h2(&self, dead: &http2::SendRequest<OutBody<B>>) {
        let mut slot = self
            .h2
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot
            .as_ref()
            .is_some_and(|c| c.tx.is_closed() || c.lapsed.is_set() || dead.is_closed())
        {
            *slot = None;
        }
    }

    /// Opens the shared HTTP/2 connection; concurrent callers wait for the
    /// one being opened instead of each dialing their own.
    async fn connect_h2(&self) -> Result<(http2::SendRequest<OutBody<B>>, OpenStream), ProxyError> {
        let _one = self.h2_connecting.lock().await;
        if let Some(current) = self.current_h2() {
            return Ok(current);
        }
        let io = self.h2_dial.dial().await?;
        let lease = self.h2_dial.lease(&io);
        let (tx, conn) = self
            .h2_builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| upstream_error(&e))?;
        let lapsed = Lapsed(lease.is_some().then(Arc::default));
        let slot = Arc::downgrade(&self.h2);
        // Our handle is dropped: new requests open a new connection, and
        // this one closes once its open streams have answered.
        let purge = move || {
            if let Some(slot) = slot.upgrade() {
                let mut slot = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if slot.as_ref().is_some_and(|c| c.lapsed.is_set()) {
                    *slot = None;
                }
            }
        };
        drive(conn, "HTTP/2", lease, lapsed.clone(), purge, false);
        let streams = Arc::<StreamsEnded>::default();
        let stream = OpenStream(streams.clone());
        *self
            .h2
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(PooledH2 {
            tx: tx.clone(),
            lapsed,
            streams,
            quiet_since: Instant::now(),
        });
        Ok((tx, stream))
    }
}

/// Runs a client connection on its own task until it closes. With a
/// lease, when the peer's credential lapses: `lapsed` is set and `purge`
/// drops the pool's handles, so the connection takes no new request and
/// ends once the open ones have answered; `abort` ends it at once (a
/// tunnel, which has no request boundary).
fn drive<C, E>(
    conn: C,
    version: &'static str,
    lease: Option<Lease>,
    lapsed: Lapsed,
    purge: impl FnOnce() + Send + 'static,
    abort: bool,
) where
    C: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send,
{
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        let ended = match &lease {
            None => Some(conn.as_mut().await),
            // The lease is polled only when it wakes the task, not on each
            // of the connection's wake-ups (`race`).
            Some(lease) => match race(conn.as_mut(), std::pin::pin!(lease.closed())).await {
                First::Main(ended) => Some(ended),
                First::Side(_) => None,
            },
        };
        let ended = match ended {
            Some(ended) => ended,
            None if abort => return,
            None => {
                if let Some(flag) = &lapsed.0 {
                    flag.store(true, Ordering::Relaxed);
                }
                purge();
                conn.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(version, error = %e, "upstream connection ended with an error");
        }
    });
}

/// Closes pooled HTTP/1.1 connections idle longer than `timeout`, and the
/// HTTP/2 connection once it has had no stream open for `timeout`; ends
/// when the client is dropped.
fn spawn_reaper<B: Send + 'static>(
    h1: Weak<Mutex<VecDeque<Idle<B>>>>,
    h2: Weak<Mutex<Option<PooledH2<B>>>>,
    timeout: Duration,
) {
    let every = (timeout / 2).max(Duration::from_millis(250));
    // Built outside a runtime (unit tests of config only): nothing to reap.
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let (Some(h1), Some(h2)) = (h1.upgrade(), h2.upgrade()) else {
                return;
            };
            {
                let mut idle = h1.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                // Oldest first: check-ins push to the back.
                idle.retain(|e| {
                    !e.tx.is_closed() && !e.lapsed.is_set() && e.since.elapsed() < timeout
                });
            }
            let mut slot = h2.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Dropping the pool's handle closes the connection (GOAWAY),
            // as hyper closes one with no handle and no stream left.
            if slot
                .as_mut()
                .is_some_and(|c| c.tx.is_closed() || c.idle_for(timeout))
            {
                *slot = None;
            }
        }
    });
}

impl<B> PooledH2<B> {
    /// Whether the connection has had no stream open for `timeout`, as far
    /// as the reaper's looks tell: a look that finds a stream open, or one
    /// ended since the last look, restarts the count.
    fn idle_for(&mut self, timeout: Duration) -> bool {
        let open = Arc::strong_count(&self.streams) > 1;
        // A stream sets `ended` before its reference goes (a release): seen
        // gone, its flag is seen too.
        std::sync::atomic::fence(Ordering::Acquire);
        let ended = self.streams.0.swap(false, Ordering::Relaxed);
        if open || ended {
            self.quiet_since = Instant::now();
            return false;
        }
        self.quiet_since.elapsed() >= timeout
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        // Between two looks of the reaper, only the first of the streams
        // that end writes the line.
        crate::conn::raise(&self.0.0);
    }
}

/// A copy of a request to send again, if it has no body and is idempotent
/// (RFC 9110 §9.2.2).
fn replay<B>(req: &Request<OutBody<B>>) -> Option<Request<OutBody<B>>> {
    if !matches!(req.body(), OutBody::Empty) || !req.method().is_idempotent() {
        return None;
    }
    let mut again = Request::new(OutBody::Empty);
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    Some(again)
}

/// HTTP/1.1 sends the origin form (`/path?q`) with the authority in `Host`.
fn into_origin_form<B>(req: &mut Request<B>) {
    if !req.headers().contains_key(header::HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(pq);
}

/// A failed exchange as the side that failed: a response head over the
/// limits is the upstream's fault, named as such; a failure of the
/// caller's body (marked [`CallerBodyError`] on its way in, somewhere in
/// the error's causes, or over HTTP/2 a stream our client reset) is the
/// caller's.
fn upstream_error(e: &hyper::Error) -> ProxyError {
    let mut causes = std::iter::successors(std::error::Error::source(e), |s| s.source());
    if causes.any(<dyn std::error::Error>::is::<CallerBodyError>) || reset_by_us(e) {
        ProxyError::BadRequestBody(describe(e))
    } else if e.is_parse_too_large() {
        ProxyError::ResponseHeadersTooLarge(describe(e))
    } else {
        ProxyError::Upstream(describe(e))
    }
}

/// An HTTP/2 stream to the upstream that hyper's client reset itself
/// (neither the upstream nor h2 did). It does that when the request body
/// it sends fails, which is the caller's body ([`CallerBodyError`]); but
/// then it answers the response's future with the reset, not with the
/// body's error, so the mark never reaches [`upstream_error`]. (Its other
/// resets, CANCEL for a response future dropped and one for a CONNECT
/// answer with a body, never come here.)
fn reset_by_us(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h2| h2.is_reset() && !h2.is_remote() && !h2.is_library())
}

impl<B> Body for OutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            OutBody::Whole(b) => Pin::new(b).poll_frame(cx).map_err(CallerBodyError::mark),
            OutBody::Empty => Poll::Ready(None),
            OutBody::Held(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Whole(b) => b.is_end_stream(),
            OutBody::Empty => true,
            OutBody::Held(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Whole(b) => b.size_hint(),
            OutBody::Empty => SizeHint::with_exact(0),
            OutBody::Held(b) => b.size_hint(),
        }
    }
}

/// An error and its causes on one line.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    detail
}

/// Connects to `addr`, refusing a TCP self-connection: the dials that
/// carry traffic go through here (to the local service, a peer sidecar, a
/// transparent-mode destination, a passed-through one).
///
/// While nothing listens on `addr` and its port lies in the kernel's
/// ephemeral range (`ip_local_port_range`), a dial can be given that very
/// port as its source and connect to itself (TCP simultaneous open):
/// `127.0.0.1:P <-> 127.0.0.1:P`. Kept, it would carry requests to nobody
/// (to a peer: a TLS handshake with ourselves) and hold the port, so the
/// service could not bind it on restart (EADDRINUSE). It is closed and
/// reported as the refusal it stands for. Two syscalls per new connection,
/// none per request.
pub(crate) async fn connect_tcp(
    addr: impl tokio::net::ToSocketAddrs,
) -> std::io::Result<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    refuse_self_connect(&stream)?;
    Ok(stream)
}

/// Connects to the local service at `addr` ([`connect_tcp`]).
pub(crate) async fn connect_local(
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    connect_tcp(addr).await
}

/// `Err(ConnectionRefused)` if `stream` is connected to itself.
fn refuse_self_connect(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    if stream.local_addr()? == stream.peer_addr()? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused (a TCP self-connection to the port, closed)",
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A socket bound to a port and connected to that same address is
    /// connected to itself (simultaneous open), as a dial to a closed
    /// ephemeral port can be: refused, and a real connection is not.
    #[tokio::test]
    async fn a_tcp_self_connection_is_refused() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let selfie = socket.connect(addr).await.unwrap();
        assert_eq!(selfie.local_addr().unwrap(), selfie.peer_addr().unwrap());
        let err = refuse_self_connect(&selfie).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ok = connect_local(listener.local_addr().unwrap()).await;
        assert!(ok.is_ok(), "{ok:?}");
    }

    /// The dial itself, where the kernel makes the self-connection: in a
    /// network namespace whose ephemeral range is the closed port alone, a
    /// dial to that port is given it as its source, every time. Refused,
    /// for the address forms of the local service (`SocketAddr`) and of a
    /// peer sidecar (`host`, `port`: `PeerConnector`). Root only (a
    /// namespace of its own, for this thread); skipped otherwise.
    #[test]
    fn a_dial_the_kernel_connects_to_itself_is_refused() {
        let Some(kinds) = in_a_namespace_of_its_own(|rt| {
            only_ephemeral_port(40000);
            let local = rt.block_on(connect_local("127.0.0.1:40000".parse().unwrap()));
            only_ephemeral_port(40001);
            let peer = rt.block_on(connect_tcp(("127.0.0.1", 40001)));
            [local, peer].map(|r| {
                let e = r.expect_err("a self-connection");
                assert!(e.to_string().contains("self-connection"), "{e}");
                e.kind()
            })
        }) else {
            return;
        };
        assert_eq!(kinds, [std::io::ErrorKind::ConnectionRefused; 2]);
    }

    /// Runs `f` on a thread of its own in a new network namespace (loopback
    /// up) with a current-thread runtime; `None` when not root (skipped, or
    /// a failure under `MOAT_TEST_REQUIRE_ALL=1`).
    pub(crate) fn in_a_namespace_of_its_own<T: Send + 'static>(
        f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send + 'static,
    ) -> Option<T> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var_os("MOAT_TEST_REQUIRE_ALL").is_none_or(|v| v != "1"),
                "MOAT_TEST_REQUIRE_ALL=1 and this test needs root"
            );
            eprintln!("SKIPPED: not root: a network namespace needs root");
            return None;
        }
        let ran = std::thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) moves this thread alone (network
            // namespaces are per thread) into a new namespace; the thread
            // ends with `f`.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            // `ip` runs in the thread's namespace (a child inherits it).
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(up.success());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            f(&rt)
        });
        Some(ran.join().unwrap())
    }

    /// In [`in_a_namespace_of_its_own`]: the kernel's one ephemeral port is
    /// `port`, so a dial to it, closed, is given it as its source. One port
    /// per dial: a refused one stays in TIME_WAIT.
    pub(crate) fn only_ephemeral_port(port: u16) {
        let range = "/proc/sys/net/ipv4/ip_local_port_range";
        std::fs::write(range, format!("{port} {port}")).unwrap();
    }

    struct Plain(SocketAddr);

    impl Dial for Plain {
        type Io = TcpStream;

        async fn dial(&self) -> Result<TcpStream, ProxyError> {
            TcpStream::connect(self.0)
                .await
                .map_err(|e| ProxyError::LocalUnavailable(e.to_string()))
        }
    }

    /// An HTTP/1.1 server answering `per_conn` requests on each connection
    /// and then closing it without saying so (no `Connection: close`), as a
    /// service does whose keep-alive timeout has just run out.
    async fn closing_server(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_conn {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                        buf.drain(..end + 4);
                        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(resp).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Boxed per request: 616 bytes measured (1,144 on the inbound and
    /// 2,904 on the outbound while the connect, with the outbound's TLS
    /// handshake, and the replay copy were part of it and it held the
    /// request twice). At most 1,024 so that its malloc stays in glibc's
    /// per-thread cache (up to 1,032 bytes), ~40 instructions instead of
    /// ~300 (benches/results/analysis.md, "Run 25").
    #[test]
    fn the_send_future_stays_in_the_allocator_cache() {
        use crate::future_size::{assert_between, returned_2};
        let inbound = returned_2(UpstreamClient::<Plain, Incoming>::send_h1);
        assert_between("the HTTP/1.1 send future", inbound, 512, 1024);
    }

    fn client(addr: SocketAddr) -> UpstreamClient<Plain, Empty<Bytes>> {
        UpstreamClient::new(Plain(addr), Plain(addr), &Limits::default())
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::builder()
            .uri("http://service.internal/x")
            .body(Empty::new())
            .unwrap()
    }

    async fn status_and_body(
        client: &UpstreamClient<Plain, Empty<Bytes>>,
    ) -> Result<(u16, Bytes), ProxyError> {
        let resp = client.send(get()).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok((status, body))
    }

    #[tokio::test]
    async fn sequential_requests_share_one_keep_alive_connection() {
        let (addr, accepted) = closing_server(usize::MAX).await;
        let client = client(addr);
        for _ in 0..10 {
            let (status, body) = status_and_body(&client).await.unwrap();
            assert_eq!((status, &body[..]), (200, &b"ok"[..]));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");
    }

    #[tokio::test]
    async fn a_connection_the_service_closed_is_not_a_failed_request() {
        let (addr, accepted) = closing_server(1).await;
        let client = client(addr);
        for i in 0..20 {
            let got = status_and_body(&client).await;
            assert!(matches!(got, Ok((200, _))), "request {i} failed: {got:?}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn a_request_on_a_connection_closed_unnoticed_is_sent_again() {
        // A blocking server on its own thread: one response per connection,
        // then a close 10 ms later, while this runtime's only thread is
        // blocked — so the pool has not seen the close when the next
        // request, after a keep-alive idle gap, takes that connection.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let client = client(addr);
        for i in 0..3 {
            let got = status_and_body(&client).await;
            assert!(matches!(got, Ok((200, _))), "request {i} failed: {got:?}");
            std::thread::sleep(REPLAY_AFTER_IDLE + Duration::from_millis(100));
        }
    }

    /// A server that answers one request with `response` and hands back
    /// the request head and the still-open stream.
    async fn serve_once(
        response: &'static [u8],
    ) -> (SocketAddr, tokio::task::JoinHandle<(String, TcpStream)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(response).await.unwrap();
            (String::from_utf8_lossy(&buf[..n]).into_owned(), s)
        });
        (addr, served)
    }

    #[tokio::test]
    async fn an_idle_pooled_connection_is_closed_after_the_pool_idle_timeout() {
        let (addr, served) = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let limits = Limits {
            pool_idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let client = UpstreamClient::new(Plain(addr), Plain(addr), &limits);
        let resp = client.send(get()).await.unwrap();
        resp.into_body().collect().await.unwrap();
        let idle_from = std::time::Instant::now();
        let (_, mut s) = served.await.unwrap();
        // The client sends nothing more; EOF is the pool letting go.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the idle connection was never closed")
            .unwrap();
        assert_eq!(n, 0, "EOF");
        let after = idle_from.elapsed();
        assert!(
            after >= Duration::from_millis(250),
            "closed after {after:?}"
        );
    }

    /// An HTTP/2 (h2c) server: `/hold` answers at once with a body that
    /// ends once `release` is notified, anything else `ok`. Counts the
    /// connections it accepted and tells `ended` when one closes.
    struct H2Server {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        ended: tokio::sync::mpsc::UnboundedReceiver<()>,
        release: Arc<tokio::sync::Notify>,
    }

    impl H2Server {
        async fn start() -> Self {
            use http_body_util::combinators::BoxBody;
            use http_body_util::{Full, StreamBody};
            use hyper::server::conn::http2 as server;

            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let release = Arc::new(tokio::sync::Notify::new());
            let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
            let (count, notify) = (accepted.clone(), release.clone());
            tokio::spawn(async move {
                loop {
                    let (s, _) = listener.accept().await.unwrap();
                    count.fetch_add(1, Ordering::SeqCst);
                    let (notify, ended_tx) = (notify.clone(), ended_tx.clone());
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let notify = notify.clone();
                        async move {
                            let body: BoxBody<Bytes, std::convert::Infallible> =
                                if req.uri().path() == "/hold" {
                                    let done = futures_util::stream::once(async move {
                                        notify.notified().await;
                                        Ok(Frame::data(Bytes::from_static(b"done")))
                                    });
                                    BoxBody::new(StreamBody::new(done))
                                } else {
                                    BoxBody::new(Full::new(Bytes::from_static(b"ok")))
                                };
                            Ok::<_, std::convert::Infallible>(Response::new(body))
                        }
                    });
                    tokio::spawn(async move {
                        let _ = server::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), service)
                            .await;
                        let _ = ended_tx.send(());
                    });
                }
            });
            Self {
                addr,
                accepted,
                ended,
                release,
            }
        }

        fn client(&self, pool_idle_timeout: Duration) -> UpstreamClient<Plain, Empty<Bytes>> {
            let limits = Limits {
                pool_idle_timeout,
                ..Limits::default()
            };
            UpstreamClient::new(Plain(self.addr), Plain(self.addr), &limits)
        }
    }

    fn get_h2(path: &str) -> Request<Empty<Bytes>> {
        Request::builder()
            .version(Version::HTTP_2)
            .uri(format!("http://service.internal{path}"))
            .body(Empty::new())
            .unwrap()
    }

    async fn h2_body(client: &UpstreamClient<Plain, Empty<Bytes>>, path: &str) -> Bytes {
        let resp = client.send(get_h2(path)).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_after_the_pool_idle_timeout() {
        let mut server = H2Server::start().await;
        let client = server.client(Duration::from_millis(300));
        assert_eq!(h2_body(&client, "/x").await, "ok");
        let idle_from = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), server.ended.recv())
            .await
            .expect("the idle HTTP/2 connection was never closed");
        let after = idle_from.elapsed();
        assert!(
            after >= Duration::from_millis(250),
            "closed after {after:?}"
        );
        // The next request dials a new connection.
        assert_eq!(h2_body(&client, "/x").await, "ok");
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_http2_connection_with_a_stream_open_is_not_closed_by_the_pool() {
        let mut server = H2Server::start().await;
        let timeout = Duration::from_millis(300);
        let client = server.client(timeout);
        let held = client.send(get_h2("/hold")).await.unwrap();
        // Four timeouts, several of the reaper's looks (every 250 ms): a
        // time that passes is what this test is about.
        tokio::time::sleep(4 * timeout).await;
        assert!(server.ended.try_recv().is_err(), "still open");
        // Still the pool's connection: the next request shares it.
        assert_eq!(h2_body(&client, "/x").await, "ok");
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
        server.release.notify_one();
        let body = held.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "done");
        // Its last stream ended: now it is idle, and closed.
        tokio::time::timeout(Duration::from_secs(5), server.ended.recv())
            .await
            .expect("the HTTP/2 connection was never closed once idle");
    }

    #[tokio::test]
    async fn nobody_listening_is_the_dialers_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = client(addr).send(get()).await.unwrap_err();
        assert!(matches!(err, ProxyError::LocalUnavailable(_)), "{err:?}");
        assert_eq!(err.status(), 502);
    }

    #[tokio::test]
    async fn the_request_goes_out_in_origin_form_with_the_host() {
        let (addr, served) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let resp = client(addr).send(get()).await.unwrap();
        assert_eq!(resp.status(), 204);
        let head = served.await.unwrap().0.to_ascii_lowercase();
        assert!(head.starts_with("get /x http/1.1\r\n"), "{head}");
        assert!(head.contains("host: service.internal\r\n"), "{head}");
    }
}
