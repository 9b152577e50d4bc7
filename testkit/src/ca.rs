//! A CA directory made with `moat ca init`, and what is done with it.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{LOOPBACK_ANY_PORT, Moat, Process};

/// A CA directory (`moat ca init`): join tokens, the trust bundle,
/// offline issuance, and `moat ca serve`.
#[derive(Clone, Debug)]
pub struct Ca {
    moat: Moat,
    dir: PathBuf,
}

impl Ca {
    /// `moat ca init --dir DIR --trust-domain TD`.
    pub fn init(moat: &Moat, dir: &Path, trust_domain: &str) -> Result<Self> {
        let ca = Self::open(moat, dir);
        ca.moat.ok(&[
            "ca",
            "init",
            "--dir",
            ca.dir_str(),
            "--trust-domain",
            trust_domain,
        ])?;
        Ok(ca)
    }

    /// A CA directory that `moat ca init` already made.
    pub fn open(moat: &Moat, dir: &Path) -> Self {
        Self {
            moat: moat.clone(),
            dir: dir.to_owned(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn dir_str(&self) -> &str {
        self.dir.to_str().expect("CA directories have UTF-8 paths")
    }

    /// A join token for `id` (`moat ca token`).
    pub fn token(&self, id: &str) -> Result<String> {
        let token = self
            .moat
            .ok(&["ca", "token", "--dir", self.dir_str(), "--id", id])?;
        Ok(token.trim().to_owned())
    }

    /// A join token for `id`, written to `path`.
    pub fn token_file(&self, id: &str, path: &Path) -> Result<()> {
        std::fs::write(path, self.token(id)?)?;
        Ok(())
    }

    /// The trust bundle, PEM (`moat ca bundle`).
    pub fn bundle(&self) -> Result<String> {
        self.moat.ok(&["ca", "bundle", "--dir", self.dir_str()])
    }

    /// Issues `id` for `ttl` offline (`moat ca issue`), certificate chain
    /// and key to the two files.
    pub fn issue(&self, id: &str, ttl: &str, cert: &Path, key: &Path) -> Result<()> {
        let path = |p: &'static str, f: &Path| -> Result<String> {
            Ok(f.to_str()
                .ok_or_else(|| anyhow::anyhow!("{p}: not UTF-8"))?
                .to_owned())
        };
        let (cert, key) = (path("cert", cert)?, path("key", key)?);
        self.moat.ok(&[
            "ca",
            "issue",
            "--dir",
            self.dir_str(),
            "--id",
            id,
            "--ttl",
            ttl,
            "--cert-out",
            &cert,
            "--key-out",
            &key,
        ])?;
        Ok(())
    }

    /// `moat ca serve` with its API and admin listeners on loopback port 0
    /// (`extra` arguments first, e.g. `--log-format json`); the API's
    /// address is `listening("ca")`, the admin's `listening("admin")`.
    pub fn serve(&self, name: &str, extra: &[&str], log: Option<&Path>) -> Result<Process> {
        let mut args = extra.to_vec();
        args.extend([
            "ca",
            "serve",
            "--dir",
            self.dir_str(),
            "--listen",
            LOOPBACK_ANY_PORT,
            "--admin",
            LOOPBACK_ANY_PORT,
        ]);
        self.moat.spawn(name, &args, log)
    }
}
