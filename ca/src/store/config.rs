//! `[store]` in `ca.toml`: where the CA keeps its state.
//!
//! Absent, the state is SQLite in `DIR/ca.db` (one `moat ca serve`). With
//! `url` (or `url_file`) it is PostgreSQL, shared by every replica:
//!
//! ```toml
//! [store]
//! url = "postgres://moat@db.example.internal:5432/moat?sslmode=verify-full"
//! password_file = "/etc/moat/db/password"
//! ca_file = "/etc/moat/db/ca.crt"      # roots that verify the database server
//! pool_size = 16                        # connections per replica
//! timeout = "5s"                        # one store operation, then 503
//! ```
//!
//! Two `sslmode`s: `verify-full` (the default: TLS through rustls, the
//! server's chain checked against `ca_file` and its name against the URL's
//! host) and `disable`, which is refused unless the host is loopback or a
//! Unix socket directory. libpq's `prefer`/`require`/`verify-ca` encrypt
//! without proving who answers and are refused. The password never goes in
//! the URL (URLs end up in logs and ConfigMaps): it is read from
//! `password_file`.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// `[store]` as written in `ca.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user@host:port/db?sslmode=...`; absent means SQLite in the CA directory.
    pub url: Option<String>,
    /// A file holding the URL (for a URL kept in a Kubernetes Secret).
    pub url_file: Option<PathBuf>,
    /// A file holding the database password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// PEM roots that verify the database server (`sslmode=verify-full`).
    pub ca_file: Option<PathBuf>,
    /// Connections each replica keeps open at most (default 16).
    pub pool_size: Option<usize>,
    /// Time limit of one store operation (default 5s); past it the request gets 503.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// The engine a configuration chose, parsed and checked.
#[derive(Clone)]
pub enum Engine {
    /// SQLite in `DIR/ca.db`.
    Sqlite,
    /// PostgreSQL.
    Postgres(Box<PgSettings>),
}

/// Everything needed to open the PostgreSQL pool.
#[derive(Clone)]
pub struct PgSettings {
    /// The driver's configuration (hosts, user, database, password).
    pub config: tokio_postgres::Config,
    /// TLS to the server, or none (loopback only).
    pub tls: PgTls,
    /// Pool size.
    pub pool_size: usize,
    /// One operation's time limit.
    pub timeout: Duration,
    /// The URL as written, for messages (it carries no password).
    pub display: String,
}

/// How the CA talks to PostgreSQL.
#[derive(Clone)]
pub enum PgTls {
    /// Plaintext: loopback or a Unix socket only.
    Disable,
    /// TLS, the server verified against these PEM roots and by name.
    VerifyFull {
        /// The roots file.
        ca_file: PathBuf,
    },
}

/// Default connections per replica: enough for a few hundred renewals in
/// flight (one short transaction each) without crowding `max_connections`.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Default time limit of one store operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

impl StoreConfig {
    /// Checks what can be checked without reading the files the section
    /// names (they may exist only where the CA runs, e.g. a Secret).
    pub fn validate(&self) -> Result<(), String> {
        match (&self.url, &self.url_file) {
            (None, None) => self.engine().map(|_| ()),
            (Some(_), Some(_)) => Err("store: set url or url_file, not both".into()),
            (Some(url), None) => {
                let parsed = PgUrl::parse(url.trim())?;
                if !matches!(parsed.sslmode.as_str(), "verify-full" | "disable") {
                    return Err(format!(
                        "store.url {}: sslmode={} is not supported: use verify-full (TLS, server verified) or disable (loopback only)",
                        parsed.display, parsed.sslmode
                    ));
                }
                self.limits().map(|_| ())
            }
            (None, Some(_)) => self.limits().map(|_| ()),
        }
    }

    fn limits(&self) -> Result<(usize, Duration), String> {
        let pool_size = self.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        if pool_size == 0 || pool_size > 1000 {
            return Err("store.pool_size must be between 1 and 1000".into());
        }
        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err("store.timeout must be more than 0".into());
        }
        Ok((pool_size, timeout))
    }

    /// Checks the section and reads the files it names. Errors say which
    /// field is wrong; the caller adds the file name.
    pub fn engine(&self) -> Result<Engine, String> {
        let url = match (&self.url, &self.url_file) {
            (None, None) => {
                if self.password_file.is_some() || self.ca_file.is_some() {
                    return Err(
                        "store: password_file and ca_file need store.url (PostgreSQL)".into(),
                    );
                }
                return Ok(Engine::Sqlite);
            }
            (Some(url), None) => url.trim().to_owned(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("store.url_file {}: {e}", file.display()))?
                .trim()
                .to_owned(),
            (Some(_), Some(_)) => return Err("store: set url or url_file, not both".into()),
        };
        let (pool_size, timeout) = self.limits()?;
        let parsed = PgUrl::parse(&url)?;
        let mut config = parsed.config;
        if let Some(file) = &self.password_file {
            let password = std::fs::read_to_string(file)
                .map_err(|e| format!("store.password_file {}: {e}", file.display()))?;
            config.password(password.trim_end_matches(['\n', '\r']));
        }
        config
            .connect_timeout(timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("moat-ca");
        let tls = match parsed.sslmode.as_str() {
            "verify-full" => {
                if parsed.local_only_unix {
                    return Err(format!(
                        "store.url {}: sslmode=verify-full needs a TCP host (a Unix socket has no TLS); use sslmode=disable for a socket directory",
                        parsed.display
                    ));
                }
                let ca_file = self.ca_file.clone().or(parsed.sslrootcert).ok_or_else(|| {
                    format!(
                        "store.url {}: sslmode=verify-full needs store.ca_file, the PEM roots that verify the database server",
                        parsed.display
                    )
                })?;
                if !ca_file.exists() {
                    return Err(format!("store.ca_file {}: no such file", ca_file.display()));
                }
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                PgTls::VerifyFull { ca_file }
            }
            "disable" => {
                if !parsed.local {
                    return Err(format!(
                        "store.url {}: sslmode=disable sends the CA's state in plaintext; it is allowed only to a loopback address or a Unix socket directory",
                        parsed.display
                    ));
                }
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                PgTls::Disable
            }
            other => {
                return Err(format!(
                    "store.url {}: sslmode={other} is not supported: use verify-full (TLS, server verified) or disable (loopback only)",
                    parsed.display
                ));
            }
        };
        Ok(Engine::Postgres(Box::new(PgSettings {
            config,
            tls,
            pool_size,
            timeout,
            display: parsed.display,
        })))
    }
}

/// A PostgreSQL URL taken apart: the parameters moat handles itself
/// (`sslmode`, `sslrootcert`) removed, the rest given to the driver.
struct PgUrl {
    config: tokio_postgres::Config,
    sslmode: String,
    sslrootcert: Option<PathBuf>,
    /// Every host is loopback or a Unix socket.
    local: bool,
    /// Every host is a Unix socket.
    local_only_unix: bool,
    display: String,
}

impl PgUrl {
    fn parse(url: &str) -> Result<Self, String> {
        let display = url.to_owned();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!(
                "store.url {display:?} must start with postgres:// (SQLite needs no url: leave [store] out)"
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut sslmode = "verify-full".to_owned();
        let mut sslrootcert = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => sslmode = v.to_owned(),
                "sslrootcert" => sslrootcert = Some(PathBuf::from(percent_decode(v))),
                "password" => {
                    return Err(format!(
                        "store.url {display:?}: put the password in store.password_file, not in the URL"
                    ));
                }
                _ => kept.push(pair),
            }
        }
        let authority = base
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(""))
            .unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && userinfo.contains(':')
        {
            return Err(format!(
                "store.url: put the password in store.password_file, not in the URL ({})",
                redact(&display)
            ));
        }
        let rebuilt = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let config = tokio_postgres::Config::from_str(&rebuilt)
            .map_err(|e| format!("store.url {display:?}: {e}"))?;
        if config.get_user().is_none() {
            return Err(format!(
                "store.url {display:?} names no user (postgres://USER@host/db)"
            ));
        }
        if config.get_dbname().is_none() {
            return Err(format!(
                "store.url {display:?} names no database (postgres://user@host/DB)"
            ));
        }
        let hosts = config.get_hosts();
        if hosts.is_empty() {
            return Err(format!("store.url {display:?} names no host"));
        }
        let is_local = |h: &tokio_postgres::config::Host| match h {
            tokio_postgres::config::Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            tokio_postgres::config::Host::Unix(_) => true,
        };
        let local = hosts.iter().all(is_local);
        let local_only_unix = hosts
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        Ok(Self {
            config,
            sslmode,
            sslrootcert,
            local,
            local_only_unix,
            display,
        })
    }
}

/// `%2F` and friends, for socket paths in URLs (`host=%2Fvar%2Frun%2Fpostgresql`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL with anything between `://` and `@` after a `:` hidden.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Engine::Sqlite => f.write_str("sqlite"),
            Engine::Postgres(pg) => write!(f, "postgres({})", pg.display),
        }
    }
}

impl PgTls {
    /// The roots file, when TLS is on.
    pub fn ca_file(&self) -> Option<&Path> {
        match self {
            PgTls::Disable => None,
            PgTls::VerifyFull { ca_file } => Some(ca_file),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(toml_text: &str) -> Result<Engine, String> {
        let c: StoreConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        c.engine()
    }

    #[test]
    fn no_url_means_sqlite() {
        assert!(matches!(engine(""), Ok(Engine::Sqlite)));
        assert!(engine("password_file = \"/x\"").is_err());
    }

    #[test]
    fn verify_full_is_the_default_and_needs_roots() {
        let err = engine("url = \"postgres://moat@db:5432/moat\"")
            .err()
            .unwrap();
        assert!(err.contains("ca_file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "x").unwrap();
        let ok = engine(&format!(
            "url = \"postgres://moat@db:5432/moat?sslmode=verify-full&connect_timeout=3\"\nca_file = {:?}",
            ca.display().to_string()
        ))
        .unwrap();
        let Engine::Postgres(pg) = ok else { panic!() };
        assert!(matches!(pg.tls, PgTls::VerifyFull { .. }));
        assert_eq!(pg.config.get_dbname(), Some("moat"));
    }

    #[test]
    fn plaintext_only_to_loopback() {
        for url in [
            "postgres://moat@127.0.0.1:5432/moat?sslmode=disable",
            "postgres://moat@localhost/moat?sslmode=disable",
            "postgres://moat@%2Ftmp%2Fpg/moat?sslmode=disable",
            "postgres://moat@/moat?host=/run/postgresql&sslmode=disable",
        ] {
            assert!(
                matches!(engine(&format!("url = {url:?}")), Ok(Engine::Postgres(_))),
                "{url}"
            );
        }
        let err = engine("url = \"postgres://moat@db.example:5432/moat?sslmode=disable\"")
            .err()
            .unwrap();
        assert!(err.contains("loopback"), "{err}");
    }

    #[test]
    fn weak_modes_and_passwords_in_urls_are_refused() {
        for mode in ["require", "prefer", "verify-ca", "allow"] {
            let err = engine(&format!(
                "url = \"postgres://moat@127.0.0.1/moat?sslmode={mode}\""
            ))
            .err()
            .unwrap();
            assert!(err.contains("not supported"), "{err}");
        }
        let err = engine("url = \"postgres://moat:hunter2@127.0.0.1/moat?sslmode=disable\"")
            .err()
            .unwrap();
        assert!(err.contains("password_file"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(engine("url = \"mysql://x@y/z\"").is_err());
        assert!(engine("url = \"postgres://127.0.0.1/moat?sslmode=disable\"").is_err());
    }
}
