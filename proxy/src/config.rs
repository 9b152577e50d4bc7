//! The proxy's configuration file (TOML).

use std::path::Path;

/// The whole proxy configuration.
#[derive(Debug, Default)]
pub struct Config {
    /// Runtime settings.
    pub runtime: Runtime,
}

/// `[runtime]`: how many worker threads.
#[derive(Debug, Default)]
pub struct Runtime {
    /// Tokio worker threads; `None` means one per core.
    pub worker_threads: Option<usize>,
}

/// A configuration error naming file, line and field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Err(ConfigError(format!("{}: not implemented yet", path.display())))
    }
}
