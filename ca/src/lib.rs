//! # moat-ca
//!
//! moat's workload certificate authority. It issues short-lived X.509-SVIDs
//! (certificates carrying one SPIFFE ID) to workloads that prove who they are
//! with a single-use join token or a Kubernetes service-account token, renews
//! them over mutual TLS, and publishes a trust bundle that can hold several
//! roots so the CA itself can be rotated without an outage.
//!
//! Where to start reading:
//! - [`identity`]: [`SpiffeId`], [`TrustDomain`], [`TrustBundle`]: pure types.
//! - [`issuer`]: turns a verified identity and a CSR into a certificate.
//! - [`token`]: join tokens and Kubernetes service-account tokens.
//! - [`jwks`]: JSON Web Key Sets, cached and refreshed: the Kubernetes
//!   token keys here, and the proxy's JWT route keys.
//! - [`store`]: the CA directory (keys) and its state store: SQLite, or
//!   PostgreSQL shared by several `moat ca serve` replicas.
//! - [`server`]: the HTTPS API (`/v1/bundle`, `/v1/certs`, `/v1/renew`,
//!   `/v1/revocations`): configuration, handlers, signing state, lifecycle.
//! - `metrics.rs`: Prometheus metrics and the admin listener.
//! - [`listen`]: the accept loop every listener runs (the proxy's too).
//! - [`client`]: what a workload uses to get, renew and trust certificates.
//! - [`toml_error`]: `file:line:column` for TOML errors, shared with the
//!   proxy's configuration and policy files.

pub mod client;
mod https;
pub mod identity;
pub mod issuer;
pub mod jwks;
pub mod listen;
mod metrics;
pub mod revocation;
pub mod server;
pub mod store;
pub mod token;
pub mod toml_error;

pub use identity::{SpiffeId, TrustBundle, TrustDomain};

/// Installs aws-lc-rs as the process-wide rustls crypto provider. Call it
/// once, first thing in `main` (and in tests); later calls do nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Parses a human duration such as `90s`, `15m`, `1h`, `365d` or `500ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 90s, 15m, 1h or 365d: {e}"))
}
