//! `moat inject` end to end: golden files, idempotence, untouched text,
//! refusals with exit 64, and the output validated against the Kubernetes
//! schemas by a real validator (`kubernetes-validate`; see `support::require`
//! for what happens when it is not installed).
//!
//! Golden files live in `tests/golden/inject/`: `NAME.in.yaml` is the input,
//! `NAME.out.yaml` the expected output. `MOAT_UPDATE_GOLDEN=1 cargo test
//! --test it inject::` rewrites the outputs; review the diff before committing.

use crate::support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::{moat, moat_bin, path_str};

const IMAGE: &str = "registry.example/moat:0.1.0";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject")
}

/// Every `NAME.in.yaml` in the golden directory, sorted.
fn golden_inputs() -> Vec<PathBuf> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().is_some_and(|s| s.ends_with(".in.yaml")))
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 8, "golden inputs missing: {inputs:?}");
    inputs
}

fn expected_path(input: &Path) -> PathBuf {
    PathBuf::from(path_str(input).replace(".in.yaml", ".out.yaml"))
}

/// `moat inject --image IMAGE FILE`, asserting success; returns stdout.
fn inject_file(file: &Path) -> String {
    let out = moat(&["inject", "--image", IMAGE, path_str(file)]);
    assert!(
        out.status.success(),
        "moat inject {} failed ({}): {}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `moat inject ARGS` with `input` on standard input.
fn inject_stdin(args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(moat_bin())
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn moat inject");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().expect("wait for moat inject")
}

#[test]
fn every_kind_matches_its_golden_file() {
    let update = std::env::var_os("MOAT_UPDATE_GOLDEN").is_some();
    let mut mismatched = Vec::new();
    for input in golden_inputs() {
        let got = inject_file(&input);
        let expected_file = expected_path(&input);
        if update {
            std::fs::write(&expected_file, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_file).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with MOAT_UPDATE_GOLDEN=1 to create it)",
                expected_file.display()
            )
        });
        if got != expected {
            mismatched.push(format!("{}:\n{got}", input.display()));
        }
    }
    assert!(
        mismatched.is_empty(),
        "output differs from the golden file:\n{}",
        mismatched.join("\n")
    );
}

#[test]
fn injecting_twice_is_byte_identical() {
    for input in golden_inputs() {
        let once = inject_file(&input);
        let out = inject_stdin(&["--image", IMAGE, "-"], &once);
        assert!(
            out.status.success(),
            "{}: {}",
            input.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            once,
            "{}: a second injection changed the output",
            input.display()
        );
    }
}

#[test]
fn every_input_character_and_comment_survives_in_order() {
    // Injection only inserts text, except that an empty `key: []` becomes
    // `key:` followed by a block list. So the input (less those `[]`) is a
    // subsequence of the output, and every comment is still there.
    for input in golden_inputs() {
        let text = std::fs::read_to_string(&input).unwrap();
        let out = inject_file(&input);
        let mut rest = out.chars();
        for (i, c) in text.replace(": []", ": ").chars().enumerate() {
            assert!(
                rest.any(|o| o == c),
                "{}: input character {i} ({c:?}) is missing or out of order in:\n{out}",
                input.display()
            );
        }
        for comment in text.lines().filter_map(|l| l.find('#').map(|i| &l[i..])) {
            assert!(
                out.contains(comment),
                "{}: comment {comment:?} lost",
                input.display()
            );
        }
    }
}

#[test]
fn kinds_without_a_pod_spec_pass_through_unchanged() {
    let input = "\
# a Service and a ConfigMap: nothing to add
apiVersion: v1
kind: Service
metadata: {name: billing}   # flow style kept
spec:
  ports: [{port: 8443, targetPort: moat-mtls}]
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: billing-moat-policy
data:
  policy.toml: |
    # not YAML, left alone
";
    let out = inject_stdin(&[], input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), input);
}

#[test]
fn the_sidecar_is_a_locked_down_native_sidecar() {
    let out = inject_file(&golden_dir().join("deployment.in.yaml"));
    let sidecar = &out[out.find("- name: moat-proxy").expect("sidecar injected")..];
    for needle in [
        "restartPolicy: Always",
        "runAsNonRoot: true",
        "runAsUser: 65532",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "- ALL",
        "type: RuntimeDefault",
        "audience: moat-ca",
        "expirationSeconds: 600",
        "containerPort: 15443",
        "path: /ready",
        "path: /live",
        "name: billing-moat-proxy",
        "name: billing-moat-policy",
        "name: moat-bundle",
    ] {
        assert!(
            sidecar.contains(needle),
            "{needle:?} missing from:\n{sidecar}"
        );
    }
    // It goes in initContainers, never beside the app in containers.
    let init = out.find("initContainers:").expect("initContainers added");
    assert!(out.find("- name: moat-proxy").unwrap() > init);
}

#[test]
fn flags_change_image_ports_audience_and_bundle() {
    let input = std::fs::read_to_string(golden_dir().join("pod.in.yaml")).unwrap();
    let out = inject_stdin(
        &[
            "--image",
            "example.org/moat@sha256:0123",
            "--inbound-port",
            "18443",
            "--admin-port",
            "19901",
            "--audience",
            "moat-ca.example",
            "--bundle-config-map",
            "trust-bundle",
        ],
        &input,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "image: \"example.org/moat@sha256:0123\"",
        "containerPort: 18443",
        "containerPort: 19901",
        "name: trust-bundle",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    // pod.in.yaml already has a moat-token volume: it is kept as written.
    assert!(out.contains("expirationSeconds: 3600"));
    assert!(
        !out.contains("moat-ca.example"),
        "the existing token volume was rewritten"
    );
}

/// Runs `moat inject` on a file in `refused/` and returns its stderr,
/// asserting exit 64 and no output.
fn refused(name: &str) -> String {
    let file = golden_dir().join("refused").join(name);
    let out = moat(&["inject", path_str(&file)]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{name}: expected exit 64, stderr: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{name}: refused input must produce no output"
    );
    stderr
}

#[test]
fn a_list_kind_is_refused() {
    let err = refused("list.yaml");
    assert!(
        err.contains("List") && err.contains("multi-document"),
        "{err}"
    );
}

#[test]
fn malformed_yaml_is_refused_with_its_line() {
    let err = refused("malformed.yaml");
    assert!(
        err.contains("line 8") && err.contains("not valid YAML"),
        "{err}"
    );
}

#[test]
fn host_network_is_refused_naming_the_document() {
    let err = refused("host-network.yaml");
    assert!(
        err.contains("document 2") && err.contains("DaemonSet/node-exporter"),
        "{err}"
    );
    assert!(err.contains("hostNetwork"), "{err}");
}

#[test]
fn an_app_container_named_like_the_sidecar_is_refused() {
    let err = refused("app-named-moat-proxy.yaml");
    assert!(
        err.contains("Pod/confused") && err.contains("initContainers"),
        "{err}"
    );
}

#[test]
fn a_workload_without_a_name_is_refused() {
    let err = refused("no-name.yaml");
    assert!(err.contains("metadata.name"), "{err}");
}

#[test]
fn a_merge_key_in_the_pod_spec_is_refused() {
    let err = refused("merge-key.yaml");
    assert!(err.contains("merge key"), "{err}");
}

#[test]
fn a_missing_file_is_a_usage_error() {
    let out = moat(&["inject", "/nonexistent/moat-inject.yaml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/moat-inject.yaml"));
}

#[test]
fn injected_output_validates_against_the_kubernetes_schemas() {
    if !support::require("kubernetes-validate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for input in golden_inputs() {
        let out = dir.path().join(input.file_name().unwrap());
        std::fs::write(&out, inject_file(&input)).unwrap();
        files.push(out);
    }
    let mut args = vec!["--strict", "--quiet", "-k", "1.37.0"];
    args.extend(files.iter().map(|f| path_str(f)));
    let out = support::tool("kubernetes-validate", &args);
    assert!(
        out.status.success(),
        "kubernetes-validate rejected injected output:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn windows_line_endings_and_a_missing_final_newline_are_handled() {
    let input = "apiVersion: v1\r\nkind: Pod\r\nmetadata:\r\n  name: w\r\nspec:\r\n  containers:\r\n  - name: a\r\n    image: x";
    let out = inject_stdin(&["--image", IMAGE], input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.starts_with(input),
        "the original text must come first, unchanged"
    );
    assert!(
        out.contains("\r\n  initContainers:\r\n  - name: moat-proxy\r\n"),
        "{out:?}"
    );
    assert_eq!(
        out.matches('\n').count(),
        out.matches("\r\n").count(),
        "mixed line endings"
    );
    let again = inject_stdin(&["--image", IMAGE], &out);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), out);
}
