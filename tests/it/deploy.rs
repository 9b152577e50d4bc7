//! What we ship for deployment stays valid: the Kubernetes manifests in
//! `config/kubernetes/` pass the Kubernetes schemas (strict), every one of
//! them is what `moat inject` leaves unchanged (the workloads are injected,
//! the CA opts out), the proxy, policy and CA configuration embedded in
//! ConfigMaps load, the Kubernetes proxy example is the sample's, no bundle
//! holds placeholder text, and the Dockerfile builds an image with nothing but
//! the binary, as a non-root numeric user.
//!
//! Schema validation uses `kubernetes-validate` (`support::require`: a
//! printed skip when it is not installed, a failure in CI). The documented
//! command sequence itself is followed in `kubernetes_path`.

use crate::support;

use std::path::{Path, PathBuf};

use support::{moat, path_str};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("config/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "manifests missing: {files:?}");
    files
}

/// Every `KEY: |` block scalar under a ConfigMap's `data:` whose key ends in
/// `.toml`, as (key, text). Enough YAML for our own manifests, which use
/// literal blocks for embedded files.
fn embedded_toml(yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(key) = trimmed.strip_suffix(": |")
            && key.ends_with(".toml")
        {
            let mut text = String::new();
            let mut block_indent = None;
            i += 1;
            while i < lines.len() {
                let l = lines[i];
                let li = l.len() - l.trim_start().len();
                if !l.trim().is_empty() && li <= indent {
                    break;
                }
                let bi = *block_indent.get_or_insert(li);
                text.push_str(l.get(bi..).unwrap_or(""));
                text.push('\n');
                i += 1;
            }
            out.push((key.to_owned(), text));
            continue;
        }
        i += 1;
    }
    out
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    if !support::require("kubernetes-validate") {
        return;
    }
    let files = manifests();
    let mut args = vec!["--strict", "--quiet", "-k", "1.37.0"];
    args.extend(files.iter().map(|f| path_str(f)));
    let out = support::tool("kubernetes-validate", &args);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_manifest_is_what_moat_inject_leaves_unchanged() {
    // The sample workloads already have everything `moat inject` adds, and
    // the CA's Deployment opts out: a sidecar there would wait for a
    // certificate from the CA it sits beside, and the pod would never start.
    for file in manifests() {
        let out = moat(&["inject", "--image", "moat:0.1.0", path_str(&file)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", file.display());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            std::fs::read_to_string(&file).unwrap(),
            "{}: `moat inject` changes it:\n{stderr}",
            file.display()
        );
        assert!(!stderr.contains("warning:"), "{}: {stderr}", file.display());
        if file.ends_with("ca.yaml") {
            assert!(
                stderr.contains(
                    "Deployment/moat-ca in moat-system: left alone (moat.dev/inject: \"false\""
                ),
                "{stderr}"
            );
        }
    }
}

#[test]
fn the_kubernetes_proxy_example_is_the_samples_and_fits_the_pod() {
    let example = std::fs::read_to_string(repo().join("config/kubernetes/proxy.toml")).unwrap();
    let workload = std::fs::read_to_string(repo().join("config/kubernetes/workload.yaml")).unwrap();
    let billing = embedded_toml(&workload)
        .into_iter()
        .map(|(_, text)| text)
        .find(|text| text.contains("name = \"billing\""))
        .expect("billing's proxy.toml in workload.yaml");
    let from = |t: &str| {
        let t = format!("\n{t}");
        t[t.find("\n[identity]\n").unwrap()..].to_owned()
    };
    assert_eq!(
        from(&example),
        from(&billing),
        "config/kubernetes/proxy.toml and billing-moat-proxy in workload.yaml differ"
    );
    // Where `moat inject` mounts things and what the kubelet probes.
    let config =
        moat_proxy::config::Config::parse(Path::new("/etc/moat/config/proxy.toml"), &example)
            .unwrap();
    assert!(config.admin.listen.ip().is_unspecified());
    assert_eq!(config.admin.listen.port(), 9901);
    assert_eq!(config.inbound[0].listen.port(), 15443);
    // And config/proxy.toml, a VM's, is not fit for a pod: `moat inject`
    // says so when it meets it in a ConfigMap.
    let vm = std::fs::read_to_string(repo().join("config/proxy.toml")).unwrap();
    let configmap = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: billing-moat-proxy, namespace: prod}}\ndata:\n  proxy.toml: |\n{}---\n{}",
        vm.lines().map(|l| format!("    {l}\n")).collect::<String>(),
        workload
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm-config.yaml");
    std::fs::write(&file, configmap).unwrap();
    let out = moat(&["inject", "--image", "moat:0.1.0", path_str(&file)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: Deployment/billing in prod: proxy.toml: [admin] listen = \"127.0.0.1:9901\" is loopback"),
        "{stderr}"
    );
}

#[test]
fn no_bundle_in_the_manifests_holds_placeholder_text() {
    // Inside a `|` block a `# ...` line is the value, not a comment: a
    // bundle must be PEM or empty.
    for file in manifests() {
        let yaml = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = yaml.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            let Some((key, value)) = trimmed.split_once(':') else {
                continue;
            };
            if !key.ends_with(".pem") || trimmed.starts_with('#') {
                continue;
            }
            let value = value.trim();
            if value.starts_with('|') || value.starts_with('>') {
                let first = lines[i + 1..]
                    .iter()
                    .find(|l| !l.trim().is_empty())
                    .unwrap();
                assert!(
                    first
                        .trim_start()
                        .starts_with("-----BEGIN CERTIFICATE-----"),
                    "{}:{}: {key} holds {first:?}, not PEM",
                    file.display(),
                    i + 2
                );
            } else {
                assert!(
                    value == "\"\"" || value == "''",
                    "{}:{}: {key} = {value}",
                    file.display(),
                    i + 1
                );
            }
        }
    }
}

#[test]
fn embedded_proxy_policy_and_ca_configuration_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for file in manifests() {
        let yaml = std::fs::read_to_string(&file).unwrap();
        for (n, (key, text)) in embedded_toml(&yaml).into_iter().enumerate() {
            let path = dir.path().join(format!("{n}-{key}"));
            std::fs::write(&path, &text).unwrap();
            let what = format!("{} ({key} #{n}):\n{text}", file.display());
            match key.as_str() {
                "proxy.toml" => {
                    let config = moat_proxy::config::Config::parse(&path, &text)
                        .unwrap_or_else(|e| panic!("{what}\n{e}"));
                    // What `moat inject` declares and probes must be what the
                    // proxy binds: admin on the pod IP at 9901, mTLS at 15443.
                    let admin = config.admin.listen;
                    assert!(
                        admin.ip().is_unspecified() && admin.port() == 9901,
                        "{what}\nadmin must listen on 0.0.0.0:9901 for the kubelet's probes"
                    );
                    for l in &config.inbound {
                        assert_eq!(l.listen.port(), 15443, "{what}\ninbound port");
                        assert!(l.forward.ip().is_loopback(), "{what}\nforward off loopback");
                    }
                }
                "policy.toml" => {
                    let out = moat(&["policy", "check", path_str(&path)]);
                    assert!(
                        out.status.success(),
                        "{what}\n{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                "ca.toml" => {
                    moat_ca::server::ServerConfig::load(&path)
                        .unwrap_or_else(|e| panic!("{what}\n{e}"));
                }
                other => panic!("{}: unexpected embedded file {other}", file.display()),
            }
            seen.push(key);
        }
    }
    for want in ["proxy.toml", "policy.toml", "ca.toml"] {
        assert!(seen.iter().any(|k| k == want), "no embedded {want} found");
    }
}

#[test]
fn every_container_is_locked_down() {
    // Each container and init container in the manifests runs with a
    // read-only root filesystem and no privilege escalation, and as a fixed
    // non-root UID with no capabilities, but transparent mode's redirect
    // step: UID 0 with NET_ADMIN alone, which it needs to install the rules.
    // Counted, not parsed: every `image:` must come with one of each setting.
    for file in manifests() {
        let yaml = std::fs::read_to_string(&file).unwrap();
        let count = |needle: &str| yaml.lines().filter(|l| l.trim() == needle).count();
        let images = yaml
            .lines()
            .filter(|l| l.trim_start().starts_with("image:"))
            .count();
        let redirects = count("- name: moat-redirect");
        for (needle, want) in [
            ("readOnlyRootFilesystem: true", images),
            ("allowPrivilegeEscalation: false", images),
            ("runAsNonRoot: true", images - redirects),
            ("runAsNonRoot: false", redirects),
            ("- NET_ADMIN", redirects),
            ("add:", redirects),
        ] {
            assert!(
                count(needle) >= want,
                "{}: {images} images, {redirects} redirect steps, but {} × {needle:?}",
                file.display(),
                count(needle)
            );
        }
        // No capability is added but NET_ADMIN, and only to the redirect step.
        assert_eq!(count("add:"), redirects, "{}", file.display());
        assert_eq!(count("- NET_ADMIN"), redirects, "{}", file.display());
        assert!(!yaml.contains("privileged: true"), "{}", file.display());
        assert!(!yaml.contains("hostNetwork: true"), "{}", file.display());
    }
}

#[test]
fn the_image_is_the_binary_alone_as_a_numeric_non_root_user() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = text.split("\nFROM ").collect();
    let last = stages.last().unwrap();
    assert!(
        last.starts_with("scratch"),
        "the final stage must be FROM scratch"
    );
    let instructions: Vec<&str> = last
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // Only the binary is copied in; nothing is run (there is no shell to run it).
    assert!(
        instructions.iter().all(|l| !l.starts_with("RUN")),
        "{instructions:?}"
    );
    let copies: Vec<&&str> = instructions
        .iter()
        .filter(|l| l.starts_with("COPY"))
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert!(copies[0].ends_with("/moat /moat"), "{copies:?}");
    assert!(
        instructions.contains(&"USER 65532:65532"),
        "{instructions:?}"
    );
    // Static, and checked to be.
    assert!(text.contains("+crt-static") && text.contains("ldd /moat"));
    // No secrets are passed in as build arguments or copied from the context.
    for line in text.lines().map(str::trim) {
        if line.starts_with("ARG ") || line.starts_with("ENV ") {
            let upper = line.to_ascii_uppercase();
            for word in ["SECRET", "TOKEN", "PASSWORD", "_KEY"] {
                assert!(
                    !upper.contains(word),
                    "a secret-looking build setting: {line}"
                );
            }
        }
    }
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for pattern in ["target/", ".git/", "**/*.key", "**/*.pem"] {
        assert!(
            ignore.lines().any(|l| l == pattern),
            ".dockerignore lacks {pattern}"
        );
    }
}
