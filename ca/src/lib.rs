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

pub mod atomic_file;
pub mod client;
pub mod exposition;
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

/// Formats a duration the way operators write one in the configuration and
/// on the command line, so that a message puts a requested lifetime and its
/// limit in the same unit: `48h`, `24h`, `90m`, `30s`, `1500ms`: the largest
/// of hours, minutes and seconds that divides it exactly (milliseconds below
/// a second). [`parse_duration`] reads every result back.
pub fn format_duration(d: std::time::Duration) -> String {
    if d.subsec_nanos() == 0 {
        let s = d.as_secs();
        match s {
            0 => "0s".to_owned(),
            _ if s.is_multiple_of(3600) => format!("{}h", s / 3600),
            _ if s.is_multiple_of(60) => format!("{}m", s / 60),
            _ => format!("{s}s"),
        }
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        // Nothing an operator types; humantime's `1s 500us` still reads back.
        humantime::format_duration(d).to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{format_duration, parse_duration};

    #[test]
    fn durations_are_printed_in_the_largest_unit_that_divides_them() {
        for (secs, want) in [
            (48 * 3600, "48h"),
            (24 * 3600, "24h"),
            (3600, "1h"),
            (90 * 60, "90m"),
            (30, "30s"),
            (3601, "3601s"),
            (0, "0s"),
        ] {
            let d = Duration::from_secs(secs);
            assert_eq!(format_duration(d), want);
            assert_eq!(parse_duration(want), Ok(d), "{want} reads back");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        let odd = Duration::new(1, 500);
        assert_eq!(parse_duration(&format_duration(odd)), Ok(odd));
    }
}
