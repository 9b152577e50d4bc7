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
            // Each URL was checked as it was read (`CaUrls`), so that an
            // error points at the value, not at `[identity]`.
            (Some(CaUrls(ca_urls)), Some(token_file), None, None) => {
                let retry_base = raw.retry_base.unwrap_or(Duration::from_secs(1));
                let retry_max = raw.retry_max.unwrap_or(Duration::from_secs(60));
                let bundle_refresh = raw.bundle_refresh.unwrap_or(Duration::from_secs(300));
                if raw.deny_list.is_some() {
                    return Err(D::Error::custom(
                        "identity.deny_list applies to cert + key only: with ca_url the CA publishes the deny-list",
                    ));
                }
                // Each message names one field: the error is then placed
                // at its value (`config::parse_error`).
                if retry_base.is_zero() {
                    return Err(D::Error::custom("identity.retry_base must be positive"));
                }
                if bundle_refresh.is_zero() {
                    return Err(D::Error::custom("identity.bundle_refresh must be positive"));
                }
                if retry_max < retry_base {
                    return Err(D::Error::custom(
                        "identity.retry_max must be at least retry_base",
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
                let ca_only = [
                    ("bundle_refresh", raw.bundle_refresh.is_some()),
                    ("retry_base", raw.retry_base.is_some()),
                    ("retry_max", raw.retry_max.is_some()),
                    ("state_dir", raw.state_dir.is_some()),
                ];
                if let Some((field, _)) = ca_only.iter().find(|(_, set)| *set) {
                    return Err(D::Error::custom(format!(
                        "identity.{field}: bundle_refresh, retry_base, retry_max and state_dir apply to ca_url only"
                    )));
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

/// One of `ca_url`'s URLs.
struct HttpsUrl(String);

impl<'de> Deserialize<'de> for HttpsUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let url = String::deserialize(d)?;
        https_url(&url)
            .map(HttpsUrl)
            .map_err(serde::de::Error::custom)
    }
}

/// `url` if it is an `https://` URL, else what is wrong with it.
fn https_url(url: &str) -> Result<String, String> {
    if url.starts_with("https://") {
        Ok(url.to_owned())
    } else {
        Err(format!("identity.ca_url {url:?} must be an https:// URL"))
    }
}

impl<'de> Deserialize<'de> for CaUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CaUrls;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an https:// URL, or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CaUrls, E> {
                Ok(CaUrls(vec![https_url(v).map_err(E::custom)?]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CaUrls, A::Error> {
                use serde::de::Error;
                let mut urls = Vec::new();
                // Each element checked on its own: an error points at it.
                while let Some(HttpsUrl(url)) = seq.next_element::<HttpsUrl>()? {
                    if urls.contains(&url) {
                        return Err(A::Error::custom(format!(
                            "identity.ca_url {url:?} is listed twice"
                        )));
                    }
                    urls.push(url);
                }
                if urls.is_empty() {
                    return Err(A::Error::custom(
                        "identity.ca_url: name at least one CA URL",
                    ));
                }
                Ok(CaUrls(urls))
            }
        }
        d.deserialize_any(Visitor)
    }
}
