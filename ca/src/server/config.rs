//! The CA server's configuration file, `ca.toml`: certificate lifetimes,
//! Kubernetes token verification, limits and the state store, with their
//! defaults. Loading checks the values once; a TOML error names the file,
//! line and column ([`crate::toml_error`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::toml_error::TomlError;

/// The CA server's configuration file (`ca.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Certificate lifetimes.
    #[serde(default)]
    pub issuance: IssuanceConfig,
    /// Kubernetes service-account token verification; absent means join tokens only.
    pub kubernetes: Option<KubernetesConfig>,
    /// Timeouts and size limits.
    #[serde(default)]
    pub limits: Limits,
    /// Where the state lives: SQLite in the CA directory (absent) or PostgreSQL.
    #[serde(default)]
    pub store: crate::store::config::StoreConfig,
}

/// `[issuance]`: certificate lifetimes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuanceConfig {
    /// Lifetime when the request asks for none (default 1h).
    #[serde(with = "humantime_serde", default = "default_ttl")]
    pub default_ttl: Duration,
    /// The longest lifetime granted (default and maximum 24h).
    #[serde(with = "humantime_serde", default = "max_ttl")]
    pub max_ttl: Duration,
}

/// `[kubernetes]`: how to verify projected service-account tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The audience the tokens must carry (the CA's), e.g. `moat-ca`.
    pub audience: String,
    /// The cluster's token issuer; checked when set.
    pub issuer: Option<String>,
    /// The cluster's JWKS as a file.
    pub jwks_file: Option<PathBuf>,
    /// The cluster's JWKS as an HTTPS URL.
    pub jwks_url: Option<String>,
    /// PEM roots that verify `jwks_url`'s server.
    pub jwks_ca: Option<PathBuf>,
    /// A bearer token file sent with each `jwks_url` fetch (in a cluster:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`).
    pub jwks_token_file: Option<PathBuf>,
}

/// `[limits]`: timeouts and sizes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// TLS handshake timeout.
    #[serde(with = "humantime_serde", default = "handshake_timeout")]
    pub handshake_timeout: Duration,
    /// Time to read a request's headers and body and answer it.
    #[serde(with = "humantime_serde", default = "request_timeout")]
    pub request_timeout: Duration,
    /// Largest request body, bytes.
    #[serde(default = "max_body")]
    pub max_body: usize,
    /// Most connections served at once.
    #[serde(default = "max_connections")]
    pub max_connections: usize,
}

impl ServerConfig {
    /// Loads `ca.toml`; errors name the file, line and column.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let config: Self =
            toml::from_str(&text).map_err(|e| TomlError::new(path, &text, &e).to_string())?;
        // A check across fields names the field first (`issuance.max_ttl
        // ...`): pointed at its value when the file sets it.
        config.validate().map_err(|e| {
            TomlError::at_named_field(path, &text, &e)
                .map_or_else(|| format!("{}: {e}", path.display()), |t| t.to_string())
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.issuance.max_ttl > crate::issuer::MAX_SVID_TTL || self.issuance.max_ttl.is_zero() {
            return Err(format!(
                "issuance.max_ttl {} is not allowed: it must be more than 0 and at most {}",
                crate::format_duration(self.issuance.max_ttl),
                crate::format_duration(crate::issuer::MAX_SVID_TTL)
            ));
        }
        if self.issuance.default_ttl > self.issuance.max_ttl || self.issuance.default_ttl.is_zero()
        {
            return Err(
                "issuance.default_ttl must be more than 0 and at most issuance.max_ttl".into(),
            );
        }
        if let Some(k) = &self.kubernetes {
            match (&k.jwks_file, &k.jwks_url) {
                (Some(_), None) => {}
                (None, Some(_)) if k.jwks_ca.is_some() => {}
                (None, Some(_)) => {
                    return Err("kubernetes.jwks_url needs kubernetes.jwks_ca".into());
                }
                _ => return Err("kubernetes needs exactly one of jwks_file or jwks_url".into()),
            }
        }
        self.store.validate()?;
        Ok(())
    }
}

fn default_ttl() -> Duration {
    crate::issuer::DEFAULT_SVID_TTL
}
fn max_ttl() -> Duration {
    crate::issuer::MAX_SVID_TTL
}
fn handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn max_body() -> usize {
    64 * 1024
}
fn max_connections() -> usize {
    1024
}

impl Default for IssuanceConfig {
    fn default() -> Self {
        Self {
            default_ttl: default_ttl(),
            max_ttl: max_ttl(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: handshake_timeout(),
            request_timeout: request_timeout(),
            max_body: max_body(),
            max_connections: max_connections(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.toml");
        std::fs::write(&path, "[issuance]\ndefault_ttl = \"1h\"\nbogus = 1\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err();
        assert!(err.contains("ca.toml:3:1"), "{err}");
        assert!(err.contains("bogus"), "{err}");
        // Checked after parsing, and still placed at the value.
        std::fs::write(&path, "[issuance]\nmax_ttl = \"48h\"\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err();
        assert!(err.contains("ca.toml:2:11: issuance.max_ttl"), "{err}");
        std::fs::write(&path, "[store]\nurl_file = \"pg-url\"\npool_size = 0\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err();
        assert!(err.contains("ca.toml:3:13: store.pool_size"), "{err}");
    }
}
