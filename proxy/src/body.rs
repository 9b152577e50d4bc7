//! The body of every response the proxy sends: the upstream's, streamed
//! with its trailers held to the header limits, or a short one the proxy
//! made itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::config::Limits;
use crate::head_limits::HeadLimit;

/// The body of every response the proxy sends: the upstream's, streamed, or
/// a short one of its own.
#[derive(Debug)]
pub enum ProxyBody {
    /// The upstream's body, streamed; its trailers are held to the header
    /// limits (over them, the body ends in an error: the caller's stream
    /// is reset, and only it).
    Upstream {
        /// The body.
        body: Incoming,
        /// The limits its trailers are held to.
        limit: HeadLimit,
        /// When it answers a request whose body was held back for
        /// `Expect: 100-continue` and never asked for: gives that request
        /// up (closing its upstream connection) once this body ends or drops.
        give_up: Option<crate::expect::GiveUp>,
        /// When it came over a pooled HTTP/2 connection: its stream,
        /// counted open until this body ends or drops (the pool closes a
        /// connection only after it has had none open for a while).
        stream: Option<crate::upstream::OpenStream>,
    },
    /// A body the proxy made (an error, or nothing).
    Short(Full<Bytes>),
}

/// An error of the caller's request body (a malformed chunk, a connection
/// closed mid-body), as it reaches the upstream client: marked so that the
/// failed exchange is answered as the caller's fault (400
/// `bad_request_body`), not the upstream's (see
/// `upstream::upstream_error`).
#[derive(Debug, thiserror::Error)]
#[error("the caller's request body failed")]
pub(crate) struct CallerBodyError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl CallerBodyError {
    /// `e`, marked as the caller's (boxed, as a body's error is).
    pub(crate) fn mark(
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Box<dyn std::error::Error + Send + Sync> {
        Box::new(CallerBodyError(e.into()))
    }
}

/// Trailers over the header limits: the stream is ended with an error.
#[derive(Debug, thiserror::Error)]
#[error("response trailers over the header limits ({0} fields)")]
pub(crate) struct TrailersTooLarge(usize);

impl ProxyBody {
    /// No body (a HEAD answer, a 101).
    pub fn empty() -> Self {
        ProxyBody::Short(Full::new(Bytes::new()))
    }

    /// The upstream's body, its trailers held to `limits`.
    pub fn upstream(body: Incoming, limits: &Limits) -> Self {
        ProxyBody::Upstream {
            body,
            limit: HeadLimit::from(limits),
            give_up: None,
            stream: None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, limit, .. } => {
                let frame = std::task::ready!(Pin::new(body).poll_frame(cx));
                if let Some(Ok(f)) = &frame
                    && let Some(trailers) = f.trailers_ref()
                    && !limit.admits(trailers)
                {
                    return Poll::Ready(Some(Err(Box::new(TrailersTooLarge(trailers.len())))));
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            ProxyBody::Short(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Short(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Short(b) => b.size_hint(),
        }
    }
}
