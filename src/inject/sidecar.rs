//! What is injected: the sidecar container and its volumes.

use super::emit::{V, s};
use super::{Options, SIDECAR_NAME};

/// The sidecar container.
pub(super) fn sidecar(o: &Options) -> V {
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
                s("/etc/moat/config/proxy.toml"),
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
                mount("moat-token", "/var/run/secrets/moat"),
                mount("moat-bundle", "/etc/moat/bundle"),
                mount("moat-config", "/etc/moat/config"),
                mount("moat-policy", "/etc/moat/policy"),
            ]),
        ),
    ])
}

/// The sidecar's volumes, by name.
pub(super) fn volumes(o: &Options, name: &str) -> Vec<(&'static str, V)> {
    let config_map = |vol: &'static str, cm: String| {
        (
            vol,
            V::M(vec![
                ("name", s(vol)),
                ("configMap", V::M(vec![("name", V::S(cm))])),
            ]),
        )
    };
    vec![
        (
            "moat-token",
            V::M(vec![
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
        ),
        config_map("moat-bundle", o.bundle_config_map.clone()),
        config_map("moat-config", format!("{name}-moat-proxy")),
        config_map("moat-policy", format!("{name}-moat-policy")),
    ]
}
