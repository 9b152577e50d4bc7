//! What is injected: moat's init containers and its volumes.
//!
//! Everything here is *owned* by moat, by name: `moat inject` adds what is
//! missing, and `--upgrade` replaces what differs from what these functions
//! return for the flags given (and removes what the mode no longer uses:
//! the redirect step under `--explicit`). The injector puts
//! [`init_containers`], in order, first among the pod's init containers.

use moat_proxy::probe::AppProbes;

use super::emit::{V, s};
use super::tree::Node;
use super::{Options, REDIRECT_NAME, SIDECAR_NAME};

/// Where the projected service-account token is mounted (`token_file`
/// in proxy.toml is this directory's `token`).
pub(super) const TOKEN_DIR: &str = "/var/run/secrets/moat";
/// Where the trust bundle ConfigMap is mounted (`bundle.pem` in it).
pub(super) const BUNDLE_DIR: &str = "/etc/moat/bundle";
/// Where the `<name>-moat-proxy` ConfigMap is mounted (`proxy.toml` in it).
pub(super) const CONFIG_DIR: &str = "/etc/moat/config";
/// Where the `<name>-moat-policy` ConfigMap is mounted (`policy.toml` in it).
pub(super) const POLICY_DIR: &str = "/etc/moat/policy";
/// The sidecar's UID (and GID): the image's `nonroot`, and the owner the
/// redirect rules exempt.
pub(super) const SIDECAR_UID: u32 = 65532;

/// Something moat owns in a pod spec list, found there by its `name`.
pub(super) struct Owned {
    pub(super) name: &'static str,
    pub(super) value: V,
    /// What an existing entry has that moat does not write and must not
    /// keep (a differences list, like [`super::list::differences`]).
    pub(super) stale: Option<fn(&Node) -> Vec<String>>,
}

/// moat's init containers, in the order they must come first in
/// `initContainers`: in transparent mode the redirect step, then the
/// sidecar; in explicit mode the sidecar alone. `probes` are the app's
/// rewritten kubelet probes the sidecar answers (transparent mode only).
pub(super) fn init_containers(o: &Options, probes: &AppProbes) -> Vec<Owned> {
    let mut out = Vec::new();
    if o.transparent {
        out.push(Owned {
            name: REDIRECT_NAME,
            value: redirect(o),
            stale: None,
        });
    }
    out.push(Owned {
        name: SIDECAR_NAME,
        value: sidecar(o, probes),
        // Probes recorded for transparent mode, when there are none now.
        stale: probes
            .is_empty()
            .then_some(stale_probes as fn(&Node) -> Vec<String>),
    });
    out
}

/// moat's init containers that this mode does not use: `--upgrade` removes
/// them (the redirect step, under `--explicit`).
pub(super) fn retired_init_containers(o: &Options) -> Vec<&'static str> {
    if o.transparent {
        Vec::new()
    } else {
        vec![REDIRECT_NAME]
    }
}

/// The sidecar's environment variable that lists the app's probes, when
/// there are none to list.
fn stale_probes(node: &Node) -> Vec<String> {
    let has = node.get("env").is_some_and(|env| {
        env.items()
            .iter()
            .any(|e| e.get("name").and_then(Node::as_str) == Some(moat_proxy::probe::ENV))
    });
    if has {
        vec![format!(
            "env.{} (set, but no app probe is rewritten)",
            moat_proxy::probe::ENV
        )]
    } else {
        Vec::new()
    }
}

/// The redirect step: `moat redirect` installs the nftables rules in the
/// pod's network namespace and exits. It needs `CAP_NET_ADMIN` and nothing
/// else: it speaks nf_tables netlink itself (no `iptables`, so no
/// `NET_RAW`). It runs as UID 0 because Kubernetes gives a non-root
/// container no ambient capabilities (an added capability only reaches the
/// bounding set), and the image has no file capabilities to fall back on.
fn redirect(o: &Options) -> V {
    V::M(vec![
        ("name", s(REDIRECT_NAME)),
        ("image", s(&o.image)),
        (
            "args",
            V::L(vec![
                s("redirect"),
                s("--config"),
                V::S(format!("{CONFIG_DIR}/proxy.toml")),
            ]),
        ),
        (
            "resources",
            V::M(vec![
                (
                    "requests",
                    V::M(vec![("cpu", s("10m")), ("memory", s("16Mi"))]),
                ),
                (
                    "limits",
                    V::M(vec![("cpu", s("100m")), ("memory", s("32Mi"))]),
                ),
            ]),
        ),
        (
            "securityContext",
            V::M(vec![
                ("runAsNonRoot", V::B(false)),
                ("runAsUser", V::N(0)),
                ("runAsGroup", V::N(0)),
                ("readOnlyRootFilesystem", V::B(true)),
                ("allowPrivilegeEscalation", V::B(false)),
                (
                    "capabilities",
                    V::M(vec![
                        ("add", V::L(vec![s("NET_ADMIN")])),
                        ("drop", V::L(vec![s("ALL")])),
                    ]),
                ),
                ("seccompProfile", V::M(vec![("type", s("RuntimeDefault"))])),
            ]),
        ),
        (
            "volumeMounts",
            // proxy.toml only: the step reads [redirect] and moat's ports.
            V::L(vec![V::M(vec![
                ("name", s("moat-config")),
                ("mountPath", s(CONFIG_DIR)),
                ("readOnly", V::B(true)),
            ])]),
        ),
    ])
}

/// The sidecar container.
fn sidecar(o: &Options, probes: &AppProbes) -> V {
    let probe = |path: &str, period: i64, failures: i64| {
        V::M(vec![
            (
                "httpGet",
                V::M(vec![("path", s(path)), ("port", s("moat-admin"))]),
            ),
            ("periodSeconds", V::N(period)),
            ("failureThreshold", V::N(failures)),
        ])
    };
    let mount = |name: &str, path: &str| {
        V::M(vec![
            ("name", s(name)),
            ("mountPath", s(path)),
            ("readOnly", V::B(true)),
        ])
    };
    let port = |name: &str, port: u16| {
        V::M(vec![
            ("name", s(name)),
            ("containerPort", V::N(port.into())),
            ("protocol", s("TCP")),
        ])
    };
    let mut fields = vec![
        ("name", s(SIDECAR_NAME)),
        ("image", s(&o.image)),
        // A native sidecar: starts before the app containers, stops after
        // them, and does not keep a Job from completing.
        ("restartPolicy", s("Always")),
        (
            "args",
            V::L(vec![
                s("proxy"),
                s("--config"),
                V::S(format!("{CONFIG_DIR}/proxy.toml")),
            ]),
        ),
    ];
    if !probes.is_empty() {
        fields.push((
            "env",
            V::L(vec![V::M(vec![
                ("name", s(moat_proxy::probe::ENV)),
                ("value", V::S(probes.to_json())),
            ])]),
        ));
    }
    fields.extend([
        (
            "ports",
            V::L(vec![
                port("moat-mtls", o.inbound_port),
                port("moat-admin", o.admin_port),
            ]),
        ),
        // The app starts only once the sidecar holds its first certificate.
        ("startupProbe", probe("/ready", 1, 120)),
        ("readinessProbe", probe("/ready", 5, 3)),
        ("livenessProbe", probe("/live", 10, 3)),
        (
            "resources",
            V::M(vec![
                (
                    "requests",
                    V::M(vec![("cpu", s("50m")), ("memory", s("32Mi"))]),
                ),
                (
                    "limits",
                    V::M(vec![("cpu", s("1")), ("memory", s("128Mi"))]),
                ),
            ]),
        ),
        (
            "securityContext",
            V::M(vec![
                ("runAsNonRoot", V::B(true)),
                ("runAsUser", V::N(SIDECAR_UID.into())),
                ("runAsGroup", V::N(SIDECAR_UID.into())),
                ("readOnlyRootFilesystem", V::B(true)),
                ("allowPrivilegeEscalation", V::B(false)),
                ("capabilities", V::M(vec![("drop", V::L(vec![s("ALL")]))])),
                ("seccompProfile", V::M(vec![("type", s("RuntimeDefault"))])),
            ]),
        ),
        (
            "volumeMounts",
            V::L(vec![
                mount("moat-token", TOKEN_DIR),
                mount("moat-bundle", BUNDLE_DIR),
                mount("moat-config", CONFIG_DIR),
                mount("moat-policy", POLICY_DIR),
            ]),
        ),
    ]);
    V::M(fields)
}

/// The ConfigMap holding workload `name`'s proxy.toml.
pub(super) fn proxy_config_map(name: &str) -> String {
    format!("{name}-moat-proxy")
}

/// The ConfigMap holding workload `name`'s policy.toml.
fn policy_config_map(name: &str) -> String {
    format!("{name}-moat-policy")
}

/// The ConfigMaps the sidecar mounts for workload `name`: (ConfigMap, key read).
pub(super) fn config_maps(o: &Options, name: &str) -> Vec<(String, &'static str)> {
    vec![
        (proxy_config_map(name), "proxy.toml"),
        (policy_config_map(name), "policy.toml"),
        (o.bundle_config_map.clone(), "bundle.pem"),
    ]
}

/// The sidecar's volumes.
pub(super) fn volumes(o: &Options, name: &str) -> Vec<Owned> {
    let config_map = |vol: &'static str, cm: String| Owned {
        name: vol,
        value: V::M(vec![
            ("name", s(vol)),
            ("configMap", V::M(vec![("name", V::S(cm))])),
        ]),
        stale: None,
    };
    vec![
        Owned {
            name: "moat-token",
            value: V::M(vec![
                ("name", s("moat-token")),
                (
                    "projected",
                    V::M(vec![(
                        "sources",
                        V::L(vec![V::M(vec![(
                            "serviceAccountToken",
                            V::M(vec![
                                ("audience", s(&o.audience)),
                                // The shortest lifetime Kubernetes allows; the kubelet refreshes it.
                                ("expirationSeconds", V::N(600)),
                                ("path", s("token")),
                            ]),
                        )])]),
                    )]),
                ),
            ]),
            stale: None,
        },
        config_map("moat-bundle", o.bundle_config_map.clone()),
        config_map("moat-config", proxy_config_map(name)),
        config_map("moat-policy", policy_config_map(name)),
    ]
}
