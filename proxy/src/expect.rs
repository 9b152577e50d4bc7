//! `Expect: 100-continue` answered by the service, not by moat.
//!
//! hyper's HTTP/1.1 server sends `100 Continue` the first time a request
//! body is polled, and its client sends a body as soon as it has the
//! request. Forwarding such a request as is would have the sidecar invite
//! the whole body at once, whatever the service thinks of it. So the body
//! of a request that expects 100-continue goes upstream *held*: it is not
//! polled (and the caller is not invited) until the upstream sends its own
//! `100 Continue` ([`Gate::open`], from hyper's informational-response
//! callback). If the upstream answers finally instead, the caller gets that
//! answer, never an invitation, and once the answer has been relayed the
//! held body is given up, which closes the upstream connection it would
//! have been written on ([`GiveUp`]). An upstream that says nothing within
//! `[limits] expect_continue_timeout` (1 s, as curl waits) gets the body
//! anyway, as RFC 9110 §10.1.1 lets a client do.
//!
//! Only an HTTP/1.1 upstream can say 100: hyper's HTTP/2 client does not
//! pass informational responses on, so over HTTP/2 the body goes at once.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

const WAITING: u8 = 0;
const OPEN: u8 = 1;
const GIVEN_UP: u8 = 2;

/// Whether a held request body may go upstream.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

/// Gives the held body up when dropped, unless it was let through first.
/// Rides on the response body that answered the request.
#[derive(Debug)]
pub struct GiveUp(Arc<Gate>);

/// A request body that is not polled until its [`Gate`] opens.
pub(crate) struct HeldBody<B> {
    inner: B,
    gate: Arc<Gate>,
    wait: Pin<Box<Sleep>>,
}

/// The error a given-up body ends with (it closes the upstream connection).
#[derive(Debug, thiserror::Error)]
#[error("the upstream answered without 100 Continue; the request body is not sent")]
pub(crate) struct GivenUp;

/// True when the request asks for `100 Continue` before its body.
pub(crate) fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Holds `req`'s body back until the upstream asks for it, or for `wait`
/// (see the module docs); returns the gate, which the caller consults when
/// the response head arrives.
pub(crate) fn hold<B>(mut req: Request<B>, wait: Duration) -> (Request<HeldBody<B>>, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let opener = gate.clone();
    hyper::ext::on_informational(&mut req, move |res| {
        if res.status() == http::StatusCode::CONTINUE {
            opener.open();
        }
    });
    let (parts, inner) = req.into_parts();
    let body = HeldBody {
        inner,
        gate: gate.clone(),
        wait: Box::pin(tokio::time::sleep(wait)),
    };
    (Request::from_parts(parts, body), gate)
}

impl Gate {
    /// Lets the body through (the upstream said 100, or was silent too long).
    pub(crate) fn open(&self) {
        self.settle(OPEN);
    }

    /// True while the body has neither been let through nor given up.
    pub(crate) fn is_waiting(&self) -> bool {
        self.state.load(Ordering::Acquire) == WAITING
    }

    /// The guard that gives the body up when the answer is done with.
    pub(crate) fn give_up_on_drop(self: &Arc<Self>) -> GiveUp {
        GiveUp(self.clone())
    }

    fn settle(&self, to: u8) {
        if self
            .state
            .compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && let Some(w) = self
                .waker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        {
            w.wake();
        }
    }
}

impl Drop for GiveUp {
    fn drop(&mut self) {
        self.0.settle(GIVEN_UP);
    }
}

impl<B> Body for HeldBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            match this.gate.state.load(Ordering::Acquire) {
                OPEN => {
                    return Pin::new(&mut this.inner)
                        .poll_frame(cx)
                        .map_err(crate::body::CallerBodyError::mark);
                }
                GIVEN_UP => return Poll::Ready(Some(Err(Box::new(GivenUp)))),
                _ => {}
            }
            *this
                .gate
                .waker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cx.waker().clone());
            // Settled between the load and the waker's registration: look again.
            if !this.gate.is_waiting() {
                continue;
            }
            if this.wait.as_mut().poll(cx).is_ready() {
                this.gate.open();
                continue;
            }
            return Poll::Pending;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;

    const WAIT: Duration = Duration::from_millis(200);

    fn held() -> (HeldBody<Full<Bytes>>, Arc<Gate>) {
        let req = Request::post("/")
            .header("expect", "100-continue")
            .body(Full::new(Bytes::from_static(b"body")))
            .unwrap();
        assert!(expects_continue(req.headers()));
        let (req, gate) = hold(req, WAIT);
        (req.into_body(), gate)
    }

    #[tokio::test]
    async fn a_held_body_waits_for_the_upstreams_100() {
        let (mut body, gate) = held();
        assert!(
            futures_util::FutureExt::now_or_never(body.frame()).is_none(),
            "nothing before the 100"
        );
        gate.open();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "body");
    }

    #[tokio::test]
    async fn a_given_up_body_ends_with_an_error_and_an_open_one_is_not_given_up() {
        let (mut body, gate) = held();
        drop(gate.give_up_on_drop());
        assert!(body.frame().await.unwrap().is_err());
        let (mut body, gate) = held();
        gate.open();
        drop(gate.give_up_on_drop());
        assert!(body.frame().await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_silent_upstream_gets_the_body_after_the_wait() {
        let (mut body, gate) = held();
        let started = std::time::Instant::now();
        assert!(body.frame().await.unwrap().is_ok());
        assert!(started.elapsed() >= WAIT);
        assert!(!gate.is_waiting());
    }
}
