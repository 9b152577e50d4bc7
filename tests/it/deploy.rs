//! What we ship for deployment stays valid: the Kubernetes manifests in
//! `config/kubernetes/` pass the Kubernetes schemas (strict), the sample
//! workload is exactly what `moat inject` produces, the proxy, policy and CA
//! configuration embedded in ConfigMaps load, and the Dockerfile builds an
//! image with nothing but the binary, as a non-root numeric user.
//!
//! Schema validation uses `kubernetes-validate` (`support::require`: a
//! printed skip when it is not installed, a failure in CI).

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
fn the_sample_workload_is_what_moat_inject_makes() {
    let file = repo().join("config/kubernetes/workload.yaml");
    let out = moat(&["inject", "--image", "moat:0.1.0", path_str(&file)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        std::fs::read_to_string(&file).unwrap(),
        "config/kubernetes/workload.yaml lacks something `moat inject` adds"
    );
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
    // Each container and init container in the manifests runs as a fixed
    // non-root UID with a read-only root filesystem, no privilege
    // escalation and no capabilities. Counted, not parsed: every
    // `image:` must come with one of each setting.
    for file in manifests() {
        let yaml = std::fs::read_to_string(&file).unwrap();
        let count = |needle: &str| yaml.lines().filter(|l| l.trim() == needle).count();
        let images = yaml
            .lines()
            .filter(|l| l.trim_start().starts_with("image:"))
            .count();
        for needle in [
            "readOnlyRootFilesystem: true",
            "allowPrivilegeEscalation: false",
            "runAsNonRoot: true",
        ] {
            assert!(
                count(needle) >= images,
                "{}: {images} images but {} × {needle:?}",
                file.display(),
                count(needle)
            );
        }
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
