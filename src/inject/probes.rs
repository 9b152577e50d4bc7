//! The app's kubelet probes in transparent mode.
//!
//! The redirect rules send every inbound TCP connection to an app port
//! through moat, and a strict listener takes only mutual TLS, so the
//! kubelet's plaintext probes of the app would fail. As Istio does, each
//! `httpGet` or `tcpSocket` probe of an app container on a port that is not
//! moat's own becomes an `httpGet` of `/app-health/<container>/<livez|readyz|startupz>`
//! on the sidecar's admin port (never redirected), and the original goes
//! into the sidecar's environment ([`moat_proxy::probe::ENV`]), where the
//! admin listener finds it (see `moat_proxy::probe`).
//!
//! Only probes of ports the rules redirect are rewritten: those of the
//! workload's proxy.toml `[redirect]` (`inbound_ports`, less moat's own
//! ports and `skip_inbound_ports`) when the stream carries its ConfigMap,
//! else every port but the sidecar's admin and mTLS ports (the default
//! `inbound_ports = "all"`). A probe of a port the kubelet still reaches
//! directly is left as it is.
//!
//! A probe already rewritten is found again by its path and port; its
//! original comes back from the existing sidecar's environment, so
//! injecting twice changes nothing. `--upgrade --explicit` writes the
//! originals back.

use moat_proxy::probe::{AppProbe, AppProbes, HttpGet, HttpHeader, PATH_PREFIX, TcpSocket};

use super::emit::{Inline, Style, V, block_entry, s};
use super::tree::Node;
use super::{DocCtx, Edit, Options, SIDECAR_NAME};

/// The probe fields of a container, and the name each gets in its path.
const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// What to do with a pod's app probes.
#[derive(Default)]
pub(super) struct ProbePlan {
    /// The probes the sidecar must answer (its environment).
    pub(super) registered: AppProbes,
    /// The text edits that rewrite (or restore) probes.
    pub(super) edits: Vec<Edit>,
    /// One line per probe rewritten or restored, for the report.
    pub(super) done: Vec<String>,
    /// Probes left as they are that will fail, or that need `--upgrade`.
    pub(super) warnings: Vec<String>,
}

/// How the new probe handlers are written.
pub(super) struct Writer<'a> {
    pub(super) ctx: &'a DocCtx<'a>,
    pub(super) style: &'a Style,
    pub(super) inline: Inline,
}

/// Which inbound ports the pod's redirect rules send to moat.
pub(super) struct RedirectedPorts {
    redirect: moat_proxy::redirect::RedirectConfig,
    own: moat_proxy::redirect::OwnPorts,
}

impl RedirectedPorts {
    /// What the rules of a proxy.toml with `[redirect]` redirect; `None`
    /// when the file does not load or has no `[redirect]` (reported
    /// elsewhere).
    pub(super) fn from_proxy_toml(text: &str) -> Option<Self> {
        let path = std::path::Path::new("proxy.toml");
        let config = moat_proxy::config::Config::parse(path, text).ok()?;
        let own = config.own_ports();
        Some(Self {
            redirect: config.redirect?,
            own,
        })
    }

    /// The rules `moat inject` expects: every port but the admin and mTLS ports.
    pub(super) fn defaults(o: &Options) -> Self {
        Self {
            redirect: Default::default(),
            own: moat_proxy::redirect::OwnPorts {
                admin: Some(o.admin_port),
                inbound: vec![o.inbound_port],
            },
        }
    }

    /// True when the rules send inbound TCP to `port` through moat.
    pub(super) fn redirected(&self, port: u16) -> bool {
        use moat_proxy::redirect::InboundPorts;
        match &self.redirect.inbound_ports {
            InboundPorts::Listed(ports) => ports.contains(&port),
            InboundPorts::All => {
                self.own.admin != Some(port)
                    && !self.own.inbound.contains(&port)
                    && !self.redirect.skip_inbound_ports.contains(&port)
            }
        }
    }
}

/// Plans the probes of `spec`'s app containers for the mode `o` gives,
/// where the rules redirect `ports`.
pub(super) fn plan(spec: &Node, o: &Options, ports: &RedirectedPorts, w: &Writer<'_>) -> ProbePlan {
    let mut out = ProbePlan::default();
    let recorded = recorded(spec, &mut out.warnings);
    for container in spec.get("containers").map_or(&[][..], Node::items) {
        let Some(name) = container.get("name").and_then(Node::as_str) else {
            continue;
        };
        for (field, short) in KINDS {
            let Some(probe @ Node::Map { entries, .. }) = container.get(field) else {
                continue;
            };
            let at = format!("{PATH_PREFIX}{name}/{short}");
            let what = format!("container {name} {field}");
            let Some((key, value)) = entries
                .iter()
                .find(|(k, _)| matches!(k.as_str(), Some("httpGet" | "tcpSocket" | "grpc")))
            else {
                continue; // exec probes run inside the container
            };
            let handler = key.as_str().unwrap_or_default();
            let port = value.get("port").and_then(|p| resolve_port(container, p));
            // Already rewritten: find the original again.
            if handler == "httpGet"
                && port == Some(o.admin_port)
                && value.get("path").and_then(Node::as_str) == Some(at.as_str())
            {
                let original = recorded.as_ref().and_then(|r| r.get(&at)).cloned();
                let still_redirected = |p: &AppProbe| ports.redirected(original_port(p));
                match (o.transparent, original) {
                    (true, Some(p)) if still_redirected(&p) => out.registered.insert(at, p),
                    (true, Some(p)) if !o.upgrade => {
                        out.warnings.push(format!(
                            "{what} is rewritten to the sidecar's admin port, but its port {} is \
                             not redirected ([redirect] inbound_ports): --upgrade restores the original",
                            original_port(&p)
                        ));
                        out.registered.insert(at, p);
                    }
                    (false, Some(_)) if !o.upgrade => out.warnings.push(format!(
                        "{what} is rewritten to the sidecar's admin port (transparent mode); \
                         left as it is: --upgrade --explicit restores the original"
                    )),
                    (_, Some(p)) => {
                        let (k, v) = handler_value(&p);
                        match replace(w, probe, key, value, k, &v) {
                            Some(e) => {
                                out.edits.push(e);
                                out.done.push(format!("{what} restored ({})", describe(&p)));
                            }
                            None => out.warnings.push(format!(
                                "{what}: cannot restore it in place; write it out one key a line"
                            )),
                        }
                    }
                    (_, None) => out.warnings.push(format!(
                        "{what} asks the sidecar for {at}, but the sidecar has no such probe in \
                         {}; it fails until the original is written back",
                        moat_proxy::probe::ENV
                    )),
                }
                continue;
            }
            if !o.transparent {
                continue;
            }
            let Some(port) = port else {
                out.warnings.push(format!(
                    "{what}: {handler} port is not a number or a named port of the container; \
                     left as it is, and refused under strict mutual TLS"
                ));
                continue;
            };
            if port == o.admin_port || port == o.inbound_port || !ports.redirected(port) {
                continue; // not redirected: the kubelet reaches the app directly
            }
            if handler == "grpc" {
                out.warnings.push(format!(
                    "{what}: a gRPC probe of port {port} is redirected and refused under strict \
                     mutual TLS, and moat cannot rewrite gRPC probes: use an httpGet or exec probe"
                ));
                continue;
            }
            if value.get("host").is_some() {
                out.warnings.push(format!(
                    "{what}: {handler} sets host, so it does not probe this pod; left as it is"
                ));
                continue;
            }
            if value
                .get("scheme")
                .and_then(Node::as_str)
                .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
            {
                out.warnings.push(format!(
                    "{what}: an HTTPS probe of port {port} is redirected and refused under strict \
                     mutual TLS, and moat rewrites plain-HTTP probes only; left as it is"
                ));
                continue;
            }
            let timeout_seconds = probe
                .get("timeoutSeconds")
                .and_then(Node::as_str)
                .and_then(|t| t.parse().ok());
            let original = if handler == "httpGet" {
                let headers = value
                    .get("httpHeaders")
                    .map_or(&[][..], Node::items)
                    .iter()
                    .filter_map(|h| {
                        Some(HttpHeader {
                            name: h.get("name")?.as_str()?.to_owned(),
                            value: h.get("value")?.as_str()?.to_owned(),
                        })
                    })
                    .collect();
                AppProbe {
                    http_get: Some(HttpGet {
                        path: value
                            .get("path")
                            .and_then(Node::as_str)
                            .filter(|p| p.starts_with('/'))
                            .unwrap_or("/")
                            .to_owned(),
                        port,
                        http_headers: headers,
                    }),
                    tcp_socket: None,
                    timeout_seconds,
                }
            } else {
                AppProbe {
                    http_get: None,
                    tcp_socket: Some(TcpSocket { port }),
                    timeout_seconds,
                }
            };
            let rewritten = V::M(vec![
                ("path", V::S(at.clone())),
                ("port", V::N(o.admin_port.into())),
            ]);
            match replace(w, probe, key, value, "httpGet", &rewritten) {
                Some(e) => {
                    out.edits.push(e);
                    out.done.push(format!(
                        "{what} rewritten to GET :{}{at} (the sidecar checks {})",
                        o.admin_port,
                        describe(&original)
                    ));
                    out.registered.insert(at, original);
                }
                None => out.warnings.push(format!(
                    "{what}: cannot rewrite it in place (write the probe one key a line); \
                     left as it is, and refused under strict mutual TLS"
                )),
            }
        }
    }
    out
}

/// The probes the pod's existing sidecar records, if it has any.
fn recorded(spec: &Node, warnings: &mut Vec<String>) -> Option<AppProbes> {
    let sidecar = spec
        .get("initContainers")?
        .items()
        .iter()
        .find(|c| c.get("name").and_then(Node::as_str) == Some(SIDECAR_NAME))?;
    let value = sidecar
        .get("env")?
        .items()
        .iter()
        .find(|e| e.get("name").and_then(Node::as_str) == Some(moat_proxy::probe::ENV))?
        .get("value")?
        .as_str()?;
    match AppProbes::parse(value) {
        Ok(p) => Some(p),
        Err(e) => {
            warnings.push(format!(
                "the sidecar's {}: {e}; its probes are not recovered",
                moat_proxy::probe::ENV
            ));
            None
        }
    }
}

/// A probe's port as a number: a number, or the name of one of the
/// container's ports.
fn resolve_port(container: &Node, port: &Node) -> Option<u16> {
    let text = port.as_str()?;
    if port.is_plain()
        && let Ok(n) = text.parse()
    {
        return Some(n);
    }
    container
        .get("ports")?
        .items()
        .iter()
        .find(|p| p.get("name").and_then(Node::as_str) == Some(text))?
        .get("containerPort")?
        .as_str()?
        .parse()
        .ok()
}

/// The app port an original probe checks.
fn original_port(p: &AppProbe) -> u16 {
    match (&p.http_get, &p.tcp_socket) {
        (Some(h), _) => h.port,
        (None, Some(t)) => t.port,
        (None, None) => 0,
    }
}

/// The original handler, as it is written back.
fn handler_value(p: &AppProbe) -> (&'static str, V) {
    match (&p.http_get, &p.tcp_socket) {
        (Some(h), _) => {
            let mut m = vec![("path", s(&h.path)), ("port", V::N(h.port.into()))];
            if !h.http_headers.is_empty() {
                m.push((
                    "httpHeaders",
                    V::L(
                        h.http_headers
                            .iter()
                            .map(|h| V::M(vec![("name", s(&h.name)), ("value", s(&h.value))]))
                            .collect(),
                    ),
                ));
            }
            ("httpGet", V::M(m))
        }
        (None, Some(t)) => ("tcpSocket", V::M(vec![("port", V::N(t.port.into()))])),
        (None, None) => ("tcpSocket", V::M(vec![])),
    }
}

fn describe(p: &AppProbe) -> String {
    match (&p.http_get, &p.tcp_socket) {
        (Some(h), _) => format!("GET 127.0.0.1:{}{}", h.port, h.path),
        (None, Some(t)) => format!("a TCP connection to 127.0.0.1:{}", t.port),
        (None, None) => "nothing".into(),
    }
}

/// The edit that replaces the entry `key: value` of `probe` with
/// `new_key: new`; `None` when the entry does not start a line of its own
/// in a block mapping.
fn replace(
    w: &Writer<'_>,
    probe: &Node,
    key: &Node,
    value: &Node,
    new_key: &str,
    new: &V,
) -> Option<Edit> {
    let ctx = w.ctx;
    let start = key.start();
    if probe.is_flow() {
        return Some(Edit {
            at: start.byte,
            delete: value.end() - start.byte,
            insert: w.inline.entry(new_key, new, start.col),
        });
    }
    let from = ctx.line_start(start.byte);
    if !ctx.text[from..start.byte].chars().all(|c| c == ' ') {
        return None;
    }
    let (to, _) = ctx.after_line(value.leaf_end());
    let mut insert = String::new();
    for line in block_entry(new_key, new, start.col, w.style) {
        insert.push_str(&line);
        insert.push_str(ctx.nl);
    }
    Some(Edit {
        at: from,
        delete: to - from,
        insert,
    })
}
