//! When the stream carries a workload's `<name>-moat-proxy` ConfigMap, its
//! `proxy.toml` is checked against the pod `moat inject` makes: the
//! kubelet's probes reach the admin listener only on the pod IP, Services
//! point at the `moat-mtls` port, and the identity files are where the
//! volumes are mounted. A config that passes on a VM (`config/proxy.toml`
//! binds admin to loopback) would leave the pod never ready.

use std::net::SocketAddr;
use std::path::Path;

use moat_proxy::config::{Config, Identity};
use moat_proxy::redirect::Owner;

use super::Options;
use super::sidecar::{BUNDLE_DIR, CONFIG_DIR, POLICY_DIR, SIDECAR_UID, TOKEN_DIR};

/// What is wrong with `text` as the proxy.toml of an injected pod; empty
/// when nothing is.
pub(super) fn problems(text: &str, o: &Options) -> Vec<String> {
    let path = format!("{CONFIG_DIR}/proxy.toml");
    let config = match Config::parse(Path::new(&path), text) {
        Ok(c) => c,
        Err(e) => return vec![format!("proxy.toml does not load: {e}")],
    };
    let mut out = Vec::new();
    let admin = config.admin.listen;
    if admin.ip().is_loopback() {
        out.push(format!(
            "proxy.toml: [admin] listen = \"{admin}\" is loopback, but the kubelet probes the pod IP, \
             so the pod never becomes ready; use listen = \"0.0.0.0:{}\"",
            o.admin_port
        ));
    } else if admin.port() != o.admin_port {
        out.push(format!(
            "proxy.toml: [admin] listen = \"{admin}\", but the probes use port {} (--admin-port)",
            o.admin_port
        ));
    }
    let listens = |addr: &SocketAddr| addr.port() == o.inbound_port && !addr.ip().is_loopback();
    if !config.inbound.is_empty() && !config.inbound.iter().any(|l| listens(&l.listen)) {
        out.push(format!(
            "proxy.toml: no [[inbound]] listens on 0.0.0.0:{} (--inbound-port), the port named \
             moat-mtls that Services point at",
            o.inbound_port
        ));
    }
    match &config.identity {
        Identity::Ca(ca) => {
            let token = format!("{TOKEN_DIR}/token");
            if ca.token_file != Path::new(&token) {
                out.push(format!(
                    "proxy.toml: token_file = {:?}, but the projected token is mounted at {token}",
                    ca.token_file
                ));
            }
            let bundle = format!("{BUNDLE_DIR}/bundle.pem");
            if ca.bundle != Path::new(&bundle) {
                out.push(format!(
                    "proxy.toml: bundle = {:?}, but the bundle ConfigMap is mounted at {bundle}",
                    ca.bundle
                ));
            }
        }
        Identity::Files(_) => out.push(
            "proxy.toml: [identity] reads cert and key files, but the pod gets its identity from \
             the CA (ca_url and token_file)"
                .into(),
        ),
    }
    match (&config.redirect, o.transparent) {
        (None, true) => out.push(
            "proxy.toml: no [redirect] section, so the moat-redirect init container stops at \
             start and the pod never runs; add [redirect] (empty for the defaults), or inject \
             with --explicit"
                .into(),
        ),
        (Some(r), true) if r.proxy_uid != Owner::Id(SIDECAR_UID) => out.push(format!(
            "proxy.toml: [redirect] proxy_uid = {:?}, but the sidecar runs as UID {SIDECAR_UID} \
             (a name cannot be looked up in the image): its own connections would be redirected \
             back to it; leave proxy_uid out",
            r.proxy_uid
        )),
        (Some(_), false) => out.push(
            "proxy.toml: [redirect] is set, but --explicit adds no moat-redirect init container, \
             so no rule sends traffic to the transparent listeners; remove [redirect] or inject \
             without --explicit"
                .into(),
        ),
        _ => {}
    }
    for l in &config.inbound {
        if let Some(policy) = &l.policy
            && !policy.starts_with(POLICY_DIR)
        {
            out.push(format!(
                "proxy.toml: [[inbound]] {:?} policy = {policy:?}, but the policy ConfigMap is \
                 mounted in {POLICY_DIR}/",
                l.name
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"
[identity]
ca_url = "https://moat-ca.moat-system.svc:8443"
bundle = "/etc/moat/bundle/bundle.pem"
token_file = "/var/run/secrets/moat/token"

[admin]
listen = "0.0.0.0:9901"

[[inbound]]
name = "api"
listen = "0.0.0.0:15443"
forward = "127.0.0.1:8080"
protocol = "http"
policy = "/etc/moat/policy/policy.toml"

[redirect]
"#;

    #[test]
    fn a_pod_config_has_no_problems() {
        assert_eq!(problems(POD, &Options::default()), Vec::<String>::new());
    }

    #[test]
    fn a_vm_config_is_told_apart() {
        let vm = POD
            .replace("0.0.0.0:9901", "127.0.0.1:9901")
            .replace("/etc/moat/bundle/bundle.pem", "/etc/moat/bundle.pem")
            .replace("0.0.0.0:15443", "0.0.0.0:8443")
            .replace("/etc/moat/policy/policy.toml", "policy.toml");
        let found = problems(&vm, &Options::default());
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(found[0].contains("kubelet"), "{found:#?}");
    }

    #[test]
    fn transparent_mode_needs_redirect_and_explicit_mode_does_not_want_it() {
        let explicit = Options {
            transparent: false,
            ..Options::default()
        };
        let without = POD.replace("\n[redirect]\n", "\n");
        assert_eq!(problems(&without, &explicit), Vec::<String>::new());
        let found = problems(&without, &Options::default());
        assert!(found[0].contains("no [redirect] section"), "{found:?}");
        let found = problems(POD, &explicit);
        assert!(
            found[0].contains("--explicit adds no moat-redirect"),
            "{found:?}"
        );
        let named = format!("{POD}proxy_uid = \"moat\"\n");
        let found = problems(&named, &Options::default());
        assert!(found[0].contains("proxy_uid"), "{found:?}");
    }

    #[test]
    fn a_config_that_does_not_load_says_why() {
        let found = problems("[identity]\n", &Options::default());
        assert!(
            found[0].starts_with("proxy.toml does not load"),
            "{found:?}"
        );
    }
}
