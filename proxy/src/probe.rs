//! The app's kubelet probes, answered on the admin port.
//!
//! In transparent mode the redirect rules send every inbound TCP connection
//! to an app port through moat, and a strict listener takes only mutual
//! TLS; the kubelet's plaintext `httpGet` and `tcpSocket` probes of the app
//! would be refused. So `moat inject` rewrites them, as Istio does: each
//! such probe becomes an `httpGet` of `/app-health/<container>/<livez|readyz|startupz>`
//! on the sidecar's admin port (which the rules never redirect), and the
//! original (port, path, headers) goes into the sidecar's environment as
//! [`ENV`], a JSON object keyed by those paths (the Kubernetes probe
//! shape: `{"/app-health/app/livez": {"httpGet": {"path": "/healthz", "port": 8080}}}`).
//!
//! The admin listener serves exactly those registered paths and nothing
//! else under `/app-health/`: for an `httpGet` it sends a plain `GET` to
//! `127.0.0.1:<port><path>` and relays the app's status (a redirect counts
//! as success, as the kubelet counts it; it is answered 200 so that the
//! kubelet does not follow it); for a `tcpSocket` it opens and closes a TCP
//! connection to `127.0.0.1:<port>`. The destination is fixed when the
//! proxy starts, so no request can make the sidecar call anything else.
//! Over loopback, from moat's own UID, those calls are never redirected.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{Empty, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// The environment variable that carries the probes, set by `moat inject`.
pub const ENV: &str = "MOAT_APP_PROBES";

/// The path prefix of rewritten probes on the admin port.
pub const PATH_PREFIX: &str = "/app-health/";

/// The time a probe gets when its original sets no `timeoutSeconds`
/// (the kubelet's default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// One original probe, in the Kubernetes shape: exactly one of `httpGet`
/// and `tcpSocket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AppProbe {
    /// A plain-HTTP `GET` of the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    /// A TCP connect to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    /// The original probe's `timeoutSeconds`, when it set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

/// `httpGet`: what the kubelet would have asked the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpGet {
    /// The request path (and query), starting with `/`.
    pub path: String,
    /// The app's port, on loopback.
    pub port: u16,
    /// Extra request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<HttpHeader>,
}

/// One `httpHeaders` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    /// The header name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// `tcpSocket`: the app's port, on loopback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocket {
    /// The port.
    pub port: u16,
}

/// The registered probes, by admin path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppProbes {
    probes: BTreeMap<String, AppProbe>,
}

impl AppProbes {
    /// The probes in [`ENV`], none when it is not set. The error names the
    /// variable and what is wrong with it.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(ENV) {
            Ok(text) if text.trim().is_empty() => Ok(Self::default()),
            Ok(text) => Self::parse(&text).map_err(|e| format!("{ENV}: {e}")),
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(e) => Err(format!("{ENV}: {e}")),
        }
    }

    /// Parses the JSON object `moat inject` writes.
    pub fn parse(text: &str) -> Result<Self, String> {
        let probes: BTreeMap<String, AppProbe> =
            serde_json::from_str(text).map_err(|e| format!("not valid probe JSON: {e}"))?;
        for (path, p) in &probes {
            if !path.starts_with(PATH_PREFIX) {
                return Err(format!("{path:?} does not start with {PATH_PREFIX}"));
            }
            match (&p.http_get, &p.tcp_socket) {
                (Some(h), None) if h.path.starts_with('/') && h.port != 0 => {}
                (Some(h), None) if h.port == 0 => return Err(format!("{path}: port 0")),
                (Some(h), None) => {
                    return Err(format!(
                        "{path}: httpGet.path {:?} must start with /",
                        h.path
                    ));
                }
                (None, Some(t)) if t.port != 0 => {}
                (None, Some(_)) => return Err(format!("{path}: port 0")),
                _ => {
                    return Err(format!(
                        "{path}: exactly one of httpGet and tcpSocket must be set"
                    ));
                }
            }
        }
        Ok(Self { probes })
    }

    /// The probes as [`ENV`] holds them (compact JSON, sorted by path).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.probes).expect("probes serialize")
    }

    /// Registers `probe` at `path`.
    pub fn insert(&mut self, path: String, probe: AppProbe) {
        self.probes.insert(path, probe);
    }

    /// The probe registered at `path`.
    pub fn get(&self, path: &str) -> Option<&AppProbe> {
        self.probes.get(path)
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// How many probes are registered.
    pub fn len(&self) -> usize {
        self.probes.len()
    }

    /// Runs the probe registered at `path`, `None` when there is none.
    pub async fn check(&self, path: &str) -> Option<Response<Full<Bytes>>> {
        let probe = self.probes.get(path)?;
        let timeout = probe
            .timeout_seconds
            .map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs(s.max(1).into()));
        let outcome = match tokio::time::timeout(timeout, probe.run()).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failed(format!("no answer within {}s", timeout.as_secs())),
        };
        let (status, body) = match outcome {
            Outcome::Status(s) if s.is_redirection() => {
                (StatusCode::OK, format!("app answered {s}\n"))
            }
            Outcome::Status(s) => (s, format!("app answered {s}\n")),
            Outcome::Connected => (StatusCode::OK, "app accepted a connection\n".to_owned()),
            Outcome::Failed(why) => {
                tracing::debug!(target: "moat::admin", probe = path, reason = %why, "app probe failed");
                (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
            }
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
        Some(r)
    }
}

/// What a probe of the app found.
#[derive(Debug)]
enum Outcome {
    /// The app answered the GET with this status.
    Status(StatusCode),
    /// The app accepted a TCP connection.
    Connected,
    /// The app could not be reached or did not answer in HTTP.
    Failed(String),
}

impl AppProbe {
    async fn run(&self) -> Outcome {
        let port = match (&self.http_get, &self.tcp_socket) {
            (Some(h), _) => h.port,
            (None, Some(t)) => t.port,
            (None, None) => return Outcome::Failed("no probe".into()),
        };
        // A closed port in the ephemeral range can connect to itself: not
        // the app answering.
        let stream = match crate::upstream::connect_tcp(("127.0.0.1", port)).await {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(format!("cannot connect to 127.0.0.1:{port}: {e}")),
        };
        let Some(get) = &self.http_get else {
            return Outcome::Connected;
        };
        match http_get(stream, get).await {
            Ok(status) => Outcome::Status(status),
            Err(e) => Outcome::Failed(format!("GET 127.0.0.1:{port}{}: {e}", get.path)),
        }
    }
}

/// One `GET` over `stream`, HTTP/1.1, as the kubelet sends it.
async fn http_get(stream: TcpStream, get: &HttpGet) -> Result<StatusCode, String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let mut req = Request::get(get.path.as_str())
        .header(header::HOST, format!("127.0.0.1:{}", get.port))
        .header(header::USER_AGENT, "kube-probe/moat")
        .header(header::ACCEPT, "*/*");
    for h in &get.http_headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let result = sender.send_request(req).await.map_err(|e| e.to_string());
    // The body is not read: the status decides, as it does for the kubelet.
    conn.abort();
    result.map(|r| r.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"{"/app-health/app/livez":{"httpGet":{"path":"/healthz","port":8080}},"/app-health/app/readyz":{"tcpSocket":{"port":8080},"timeoutSeconds":3}}"#;

    /// An app that is down on a port the kernel also hands out as a source
    /// port: the probe's dial can connect to itself, which is not the app.
    #[test]
    fn a_tcp_probe_that_connects_to_itself_fails() {
        use crate::upstream::tests::{in_a_namespace_of_its_own, only_ephemeral_port};
        let Some(outcome) = in_a_namespace_of_its_own(|rt| {
            only_ephemeral_port(40002);
            let probe = AppProbe {
                http_get: None,
                tcp_socket: Some(TcpSocket { port: 40002 }),
                timeout_seconds: None,
            };
            rt.block_on(probe.run())
        }) else {
            return;
        };
        assert!(
            matches!(&outcome, Outcome::Failed(e) if e.contains("self-connection")),
            "{outcome:?}"
        );
    }

    #[test]
    fn probes_round_trip_through_their_json() {
        let probes = AppProbes::parse(TWO).unwrap();
        assert_eq!(probes.len(), 2);
        assert_eq!(probes.to_json(), TWO);
        assert_eq!(
            probes
                .get("/app-health/app/readyz")
                .unwrap()
                .timeout_seconds,
            Some(3)
        );
    }

    #[test]
    fn bad_probes_are_refused_with_the_path() {
        for (text, want) in [
            (r#"{"/x":{"tcpSocket":{"port":1}}}"#, "does not start with"),
            (r#"{"/app-health/a/livez":{}}"#, "exactly one"),
            (
                r#"{"/app-health/a/livez":{"httpGet":{"path":"h","port":1}}}"#,
                "must start with /",
            ),
            (
                r#"{"/app-health/a/livez":{"tcpSocket":{"port":0}}}"#,
                "port 0",
            ),
            (
                r#"{"/app-health/a/livez":{"exec":{"command":["x"]}}}"#,
                "unknown field",
            ),
            ("[", "not valid probe JSON"),
        ] {
            let err = AppProbes::parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[tokio::test]
    async fn an_unregistered_path_is_not_answered() {
        let probes = AppProbes::parse(TWO).unwrap();
        assert!(probes.check("/app-health/other/livez").await.is_none());
    }

    #[tokio::test]
    async fn a_closed_port_fails_the_probe() {
        // A port that was free a moment ago: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut probes = AppProbes::default();
        probes.insert(
            "/app-health/app/livez".into(),
            AppProbe {
                http_get: None,
                tcp_socket: Some(TcpSocket { port }),
                timeout_seconds: None,
            },
        );
        let r = probes.check("/app-health/app/livez").await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
