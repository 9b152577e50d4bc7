//! `[identity]`: where the workload's certificate, key and trust bundle
//! come from (the moat CA with a join token, or files).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Where the workload's identity (certificate, key, trust bundle) comes from.
#[derive(Debug, Clone)]
pub enum Identity {
    /// From the moat CA: a key made in memory, a first certificate got with a
    /// token, renewals over mutual TLS, the bundle refreshed from the CA.
    Ca(CaIdentity),
    /// From files managed elsewhere, watched and reloaded when they change.
    Files(FileIdentity),
}

/// `[identity]` with `ca_url`.
#[derive(Debug, Clone)]
pub struct CaIdentity {
    /// `https://host:port` of the CA: one URL (a Kubernetes Service in
    /// front of the replicas), or several replicas tried in turn.
    pub ca_urls: Vec<String>,
    /// The trust bundle file: verifies the CA (and peers, until the CA's
    /// own bundle has been fetched).
    pub bundle: PathBuf,
    /// The join token or Kubernetes service-account token.
    pub token_file: PathBuf,
    /// How often the trust bundle is fetched from the CA again.
    pub bundle_refresh: Duration,
    /// The certificate lifetime to ask for; the CA's default when absent.
    pub ttl: Option<Duration>,
    /// The first wait before retrying an unreachable CA (it doubles, with jitter).
    pub retry_base: Duration,
    /// The longest wait between retries.
    pub retry_max: Duration,
    /// Where the current certificate and key are kept across restarts
    /// (0600, written atomically); `None` keeps the key in memory only.
    pub state_dir: Option<PathBuf>,
}

/// `[identity]` with `cert` and `key`.
#[derive(Debug, Clone)]
pub struct FileIdentity {
    /// Certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// PKCS#8 private key, PEM.
    pub key: PathBuf,
    /// Trust bundle, PEM.
    pub bundle: PathBuf,
    /// A deny-list file (`deny_list`), in the JSON the CA serves at
    /// `GET /v1/revocations` (and `moat ca revoke --list --json` prints):
    /// the revocations a sidecar without a CA connection enforces. Watched
    /// and reloaded with the other files.
    pub deny_list: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    ca_url: Option<CaUrls>,
    state_dir: Option<PathBuf>,
    bundle: PathBuf,
    token_file: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    bundle_refresh: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_base: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_max: Option<Duration>,
    deny_list: Option<PathBuf>,
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = RawIdentity::deserialize(d)?;
        match (raw.ca_url, raw.token_file, raw.cert, raw.key) {
            (Some(CaUrls(ca_urls)), Some(token_file), None, None) => {
                if ca_urls.is_empty() {
                    return Err(D::Error::custom(
                        "identity.ca_url: name at least one CA URL",
                    ));
                }
                for (i, url) in ca_urls.iter().enumerate() {
                    if !url.starts_with("https://") {
                        return Err(D::Error::custom(format!(
                            "identity.ca_url {url:?} must be an https:// URL"
                        )));
                    }
                    if ca_urls[..i].contains(url) {
                        return Err(D::Error::custom(format!(
                            "identity.ca_url {url:?} is listed twice"
                        )));
                    }
                }
                let retry_base = raw.retry_base.unwrap_or(Duration::from_secs(1));
                let retry_max = raw.retry_max.unwrap_or(Duration::from_secs(60));
                let bundle_refresh = raw.bundle_refresh.unwrap_or(Duration::from_secs(300));
                if raw.deny_list.is_some() {
                    return Err(D::Error::custom(
                        "identity.deny_list applies to cert + key only: with ca_url the CA publishes the deny-list",
                    ));
                }
                if retry_base.is_zero() || retry_max < retry_base || bundle_refresh.is_zero() {
                    return Err(D::Error::custom(
                        "identity: retry_base and bundle_refresh must be positive, and retry_max at least retry_base",
                    ));
                }
                Ok(Identity::Ca(CaIdentity {
                    ca_urls,
                    bundle: raw.bundle,
                    token_file,
                    bundle_refresh,
                    ttl: raw.ttl,
                    retry_base,
                    retry_max,
                    state_dir: raw.state_dir,
                }))
            }
            (None, None, Some(cert), Some(key)) => {
                if raw.bundle_refresh.is_some()
                    || raw.retry_base.is_some()
                    || raw.retry_max.is_some()
                    || raw.state_dir.is_some()
                {
                    return Err(D::Error::custom(
                        "identity: bundle_refresh, retry_base, retry_max and state_dir apply to ca_url only",
                    ));
                }
                Ok(Identity::Files(FileIdentity {
                    cert,
                    key,
                    bundle: raw.bundle,
                    deny_list: raw.deny_list,
                }))
            }
            _ => Err(D::Error::custom(
                "identity: set either ca_url + token_file + bundle (certificates from the CA) or cert + key + bundle (files), not a mix",
            )),
        }
    }
}

/// `ca_url`: one URL, or a list of them.
struct CaUrls(Vec<String>);

impl<'de> Deserialize<'de> for CaUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CaUrls;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an https:// URL, or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CaUrls, E> {
                Ok(CaUrls(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CaUrls, A::Error> {
                let mut urls = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    urls.push(url);
                }
                Ok(CaUrls(urls))
            }
        }
        d.deserialize_any(Visitor)
    }
}
