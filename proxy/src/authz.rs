//! The authorization hook on the inbound HTTP path.
//!
//! Right before a request is forwarded to the local service, the inbound
//! listener asks its [`Authorize`] whether the verified peer may make it.
//! The per-route policy engine (`policy`) implements this trait; without a
//! policy, [`AllowAll`] forwards every request from a peer that passed the
//! handshake (and `allow_peers`).

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderValue, StatusCode};
use moat_ca::SpiffeId;

/// Decides whether a request from a verified peer goes on to the service.
pub trait Authorize: Send + Sync + 'static {
    /// Called once per request with its head (which an implementation may
    /// rewrite: normalize the path, add headers derived from verified claims)
    /// and the peer's verified SPIFFE ID.
    fn authorize(&self, parts: &mut Parts, peer: &SpiffeId) -> Decision;
}

/// The outcome of [`Authorize::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward the request.
    Allow,
    /// Answer it here.
    Deny(Denial),
}

/// A refused request: status, a short reason for the body and the log, and
/// the `WWW-Authenticate` challenge for 401s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// 400, 401 or 403 usually.
    pub status: StatusCode,
    /// Short, safe to show the caller.
    pub reason: String,
    /// Sent with 401.
    pub www_authenticate: Option<HeaderValue>,
}

/// Allows every request (no route policy configured).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorize for AllowAll {
    fn authorize(&self, _parts: &mut Parts, _peer: &SpiffeId) -> Decision {
        Decision::Allow
    }
}

impl<T: Authorize + ?Sized> Authorize for Arc<T> {
    fn authorize(&self, parts: &mut Parts, peer: &SpiffeId) -> Decision {
        (**self).authorize(parts, peer)
    }
}
