//! JSON Web Key Sets for JWT routes: the one JWKS implementation lives in
//! [`moat_ca::jwks`] (the CA verifies Kubernetes tokens with it too), and is
//! re-exported here under the names the policy code has always used.
//!
//! Policies bind their issuers' sources through a shared [`JwksCache`], so
//! a reload does not refetch; `jwks_file` sources are read when a policy is
//! loaded, `jwks_url` sources by [`JwksCache::fetch_all`] (call it at start
//! and wait for [`Policy::keys_ready`](super::Policy::keys_ready)); both by
//! the loop in [`JwksCache::run_refresh`], and on an unknown `kid`, at most
//! once per `min_refetch`.

pub use moat_ca::jwks::{IssuerKeys, JwksCache, JwksError, JwksSource, JwksStats};

#[cfg(test)]
pub(crate) use moat_ca::jwks::parse_jwks;
