//! What is injected: moat's init containers and its volumes.
//!
//! Everything here is *owned* by moat, by name: `moat inject` adds what is
//! missing, and `--upgrade` replaces what differs from what these functions
//! return for the flags given. A new init container (transparent mode's
//! redirect step, for one) is one more entry in [`init_containers`], with
//! its own `securityContext`; the injector puts the list, in order, first
//! among the pod's init containers.

use super::emit::{V, s};
use super::{Options, SIDECAR_NAME};

/// Where the projected service-account token is mounted (`token_file`
/// in proxy.toml is this directory's `token`).
pub(super) const TOKEN_DIR: &str = "/var/run/secrets/moat";
/// Where the trust bundle ConfigMap is mounted (`bundle.pem` in it).
pub(super) const BUNDLE_DIR: &str = "/etc/moat/bundle";
/// Where the `<name>-moat-proxy` ConfigMap is mounted (`proxy.toml` in it).
pub(super) const CONFIG_DIR: &str = "/etc/moat/config";
/// Where the `<name>-moat-policy` ConfigMap is mounted (`policy.toml` in it).
pub(super) const POLICY_DIR: &str = "/etc/moat/policy";

/// Something moat owns in a pod spec list, found there by its `name`.
pub(super) struct Owned {
    pub(super) name: &'static str,
    pub(super) value: V,
}

/// moat's init containers, in the order they must come first in
/// `initContainers`: today the sidecar alone.
pub(super) fn init_containers(o: &Options) -> Vec<Owned> {
    vec![Owned {
        name: SIDECAR_NAME,
        value: sidecar(o),
    }]
}

/// The sidecar container.
fn sidecar(o: &Options) -> V {
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
    V::M(vec![
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
                ("runAsUser", V::N(65532)),
                ("runAsGroup", V::N(65532)),
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
    ])
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
        },
        config_map("moat-bundle", o.bundle_config_map.clone()),
        config_map("moat-config", proxy_config_map(name)),
        config_map("moat-policy", policy_config_map(name)),
    ]
}
