//! # moat-proxy
//!
//! moat's sidecar proxy. Inbound, it terminates mutual TLS, verifies the
//! peer's SPIFFE ID, authorizes each HTTP request per route and forwards it
//! in plaintext to the local service over loopback. Outbound, it takes the
//! local service's plaintext traffic and originates mutual TLS to the peer's
//! sidecar, checking that the peer is who it should be.
//!
//! Where to start reading: [`config`] (what an operator writes), then [`run`].

pub mod config;
pub mod policy;

/// Errors that stop the proxy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not built yet.
    #[error("the proxy is not implemented yet")]
    Unimplemented,
}

/// Runs the proxy until SIGTERM/SIGINT.
pub async fn run(_config: config::Config) -> Result<(), Error> {
    Err(Error::Unimplemented)
}
