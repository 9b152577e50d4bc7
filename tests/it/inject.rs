//! `moat inject` end to end: golden files, idempotence, untouched text,
//! JSON in and JSON out, the opt-out annotation, `--upgrade`, the report on
//! standard error, refusals with exit 64, and the output validated against
//! the Kubernetes schemas by a real validator (`kubernetes-validate`; see
//! `support::require` for what happens when it is not installed).
//!
//! Golden files live in `tests/golden/inject/`: `NAME.in.yaml` (or
//! `NAME.in.json`) is the input, `NAME.out.yaml` (`NAME.out.json`) the
//! expected output of `moat inject --explicit --image registry.example/moat:0.1.0`
//! (explicit mode: what `moat inject` wrote before transparent mode, byte
//! for byte), and `NAME.transparent.yaml` (`.json`) that of the default,
//! transparent mode. Most tests here run in explicit mode; those named
//! `transparent_*` run in the default mode.
//! `MOAT_UPDATE_GOLDEN=1 cargo test --test it inject::` rewrites the outputs;
//! review the diff before committing.

use crate::support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::{moat, moat_bin, path_str};

const IMAGE: &str = "registry.example/moat:0.1.0";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject")
}

/// Every `NAME.in.yaml` and `NAME.in.json` in the golden directory, sorted.
fn golden_inputs() -> Vec<PathBuf> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.to_str()
                .is_some_and(|s| s.ends_with(".in.yaml") || s.ends_with(".in.json"))
        })
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 11, "golden inputs missing: {inputs:?}");
    inputs
}

/// The JSON golden inputs.
fn json_inputs() -> Vec<PathBuf> {
    let inputs: Vec<PathBuf> = golden_inputs()
        .into_iter()
        .filter(|p| path_str(p).ends_with(".json"))
        .collect();
    assert!(inputs.len() >= 3, "JSON golden inputs missing: {inputs:?}");
    inputs
}

fn expected_path(input: &Path) -> PathBuf {
    PathBuf::from(path_str(input).replace(".in.", ".out."))
}

fn transparent_path(input: &Path) -> PathBuf {
    PathBuf::from(path_str(input).replace(".in.", ".transparent."))
}

/// `moat inject --explicit --image IMAGE FILE`, asserting success; returns stdout.
fn inject_file(file: &Path) -> String {
    inject_file_with(&["--explicit"], file)
}

/// `moat inject --image IMAGE FILE` (transparent mode), asserting success.
fn inject_file_transparent(file: &Path) -> String {
    inject_file_with(&[], file)
}

fn inject_file_with(flags: &[&str], file: &Path) -> String {
    let mut args = vec!["inject", "--image", IMAGE];
    args.extend(flags);
    args.push(path_str(file));
    let out = moat(&args);
    assert!(
        out.status.success(),
        "moat inject {} failed ({}): {}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `moat inject --explicit ARGS` with `input` on standard input.
fn inject_stdin(args: &[&str], input: &str) -> std::process::Output {
    let mut all = vec!["--explicit"];
    all.extend(args);
    inject_stdin_transparent(&all, input)
}

/// `moat inject ARGS` (transparent unless ARGS say `--explicit`) with
/// `input` on standard input.
fn inject_stdin_transparent(args: &[&str], input: &str) -> std::process::Output {
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

/// Checks `files` against the Kubernetes 1.37 schemas, strictly; false
/// (after printing why) when `kubernetes-validate` is not installed.
fn validate(files: &[PathBuf]) -> bool {
    if !support::require("kubernetes-validate") {
        return false;
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
    true
}

#[test]
fn injected_output_validates_against_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for input in golden_inputs() {
        let out = dir.path().join(input.file_name().unwrap());
        std::fs::write(&out, inject_file(&input)).unwrap();
        files.push(out);
    }
    validate(&files);
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

/// `moat inject --explicit ARGS` on `input`, asserting success; (stdout, stderr).
fn inject_ok(args: &[&str], input: &str) -> (String, String) {
    let mut all = vec!["--explicit"];
    all.extend(args);
    inject_ok_transparent(&all, input)
}

/// `moat inject ARGS` on `input` (transparent unless ARGS say
/// `--explicit`), asserting success; (stdout, stderr).
fn inject_ok_transparent(args: &[&str], input: &str) -> (String, String) {
    let out = inject_stdin_transparent(args, input);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        out.status.success(),
        "moat inject {args:?} failed: {stderr}"
    );
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(golden_dir().join(name)).unwrap()
}

/// The pod spec of a JSON workload, by kind.
fn pod_spec_mut(doc: &mut serde_json::Value) -> &mut serde_json::Value {
    let pointer = match doc["kind"].as_str().unwrap() {
        "Pod" => "/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        _ => "/spec/template/spec",
    };
    doc.pointer_mut(pointer).expect("a pod spec")
}

#[test]
fn json_in_json_out() {
    // kubectl decides by the first byte: `{` is parsed as JSON, and YAML
    // flow style (`{name: moat-proxy}`) fails with "invalid character".
    // So what is added to a JSON document must be JSON; and apart from
    // moat's additions the document is the same, key for key.
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for input in json_inputs() {
        let text = std::fs::read_to_string(&input).unwrap();
        let out = inject_file(&input);
        let mut got: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!("{}: the output is not JSON ({e}):\n{out}", input.display())
        });
        let want: serde_json::Value = serde_json::from_str(&text).unwrap();
        let spec = pod_spec_mut(&mut got);
        let init = spec["initContainers"].as_array().expect("initContainers");
        assert_eq!(init[0]["name"], "moat-proxy", "{}", input.display());
        assert_eq!(init[0]["image"], IMAGE);
        assert_eq!(init[0]["ports"][0]["containerPort"], 15443);
        assert_eq!(init[0]["securityContext"]["runAsNonRoot"], true);
        let had = pod_spec_mut(&mut want.clone()).clone();
        for key in ["initContainers", "volumes"] {
            let list = spec[key].as_array_mut().unwrap();
            list.retain(|item| {
                !item["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("moat-"))
            });
            if list.is_empty() && had.get(key).is_none() {
                spec.as_object_mut().unwrap().remove(key);
            }
        }
        assert_eq!(
            got,
            want,
            "{}: more than moat's additions changed",
            input.display()
        );
        let file = dir.path().join(input.file_name().unwrap());
        std::fs::write(&file, &out).unwrap();
        files.push(file);
    }
    validate(&files);
}

#[test]
fn pretty_printed_json_stays_pretty_printed() {
    let out = inject_file(&golden_dir().join("kubectl.in.json"));
    // kubectl's four-space indentation, one entry a line, and the sidecar
    // first among the init containers.
    assert!(
        out.contains(
            "                \"initContainers\": [\n                    {\n                        \"name\": \"moat-proxy\",\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("                    },\n                    {\n                        \"args\": [\"migrate\""),
        "{out}"
    );
    assert!(out.lines().all(|l| l.len() < 120), "a long line in:\n{out}");
}

#[test]
fn the_sidecar_comes_before_existing_init_containers() {
    // So that init containers (migrations, cache warmers) can use the mesh:
    // a native sidecar only serves the init containers that come after it.
    let out = inject_file(&golden_dir().join("statefulset.in.yaml"));
    let sidecar = out.find("- name: moat-proxy").expect("sidecar");
    let migrate = out.find("- name: migrate").expect("migrate kept");
    assert!(sidecar < migrate, "the sidecar is not first:\n{out}");
    let out = inject_file(&golden_dir().join("kubectl.in.json"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["moat-proxy", "migrate"]);
}

#[test]
fn the_opt_out_annotation_leaves_a_workload_alone() {
    let input = golden("opt-out.in.yaml");
    let (out, stderr) = inject_ok(&["--image", IMAGE], &input);
    let docs_in: Vec<&str> = input.split("\n---\n").collect();
    let docs_out: Vec<&str> = out.split("\n---\n").collect();
    assert_eq!(docs_in.len(), docs_out.len());
    // The CA (pod template annotation), the host-network DaemonSet
    // (workload annotation) and the Rollout are untouched; the Job with
    // "true" is injected.
    for i in [0, 1, 3] {
        assert_eq!(docs_in[i], docs_out[i], "document {} changed", i + 1);
    }
    assert!(docs_out[2].contains("- name: moat-proxy"), "{out}");
    for needle in [
        "Deployment/moat-ca in moat-system: left alone (moat.dev/inject: \"false\" in spec.template.metadata.annotations)",
        "DaemonSet/node-exporter in monitoring: left alone (moat.dev/inject: \"false\" in metadata.annotations)",
        "Job/report in prod: sidecar added",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
}

#[test]
fn an_opt_out_annotation_that_is_not_true_or_false_is_refused() {
    let err = refused("opt-out-typo.yaml");
    assert!(
        err.contains("Deployment/billing")
            && err.contains("moat.dev/inject")
            && err.contains("\"true\" or \"false\""),
        "{err}"
    );
}

#[test]
fn new_flags_without_upgrade_change_nothing_and_say_so() {
    let once = inject_file(&golden_dir().join("deployment.in.yaml"));
    let (again, stderr) = inject_ok(
        &[
            "--image",
            "registry.example/moat:0.2.0",
            "--audience",
            "moat-ca.prod",
        ],
        &once,
    );
    assert_eq!(again, once, "without --upgrade an existing sidecar is kept");
    for needle in [
        "warning: Deployment/billing in prod: the sidecar differs from what these flags make",
        "image (registry.example/moat:0.1.0 → registry.example/moat:0.2.0)",
        "--upgrade replaces it",
        "warning: Deployment/billing in prod: kept the existing volume moat-token",
        "audience (moat-ca → moat-ca.prod)",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
}

#[test]
fn upgrade_replaces_what_moat_owns_and_nothing_else() {
    for input in ["deployment.in.yaml", "kubectl.in.json", "flow.in.json"] {
        let once = inject_file(&golden_dir().join(input));
        let flags = [
            "--upgrade",
            "--image",
            "registry.example/moat:0.2.0",
            "--audience",
            "moat-ca.prod",
        ];
        let (up, stderr) = inject_ok(&flags, &once);
        // Exactly two values changed: the sidecar's image and the token's
        // audience; every other byte is where it was.
        let changed = |a: &str, b: &str| -> Vec<(String, String)> {
            let (mut i, mut j) = (0, 0);
            let (a, b) = (a.as_bytes(), b.as_bytes());
            let mut out = Vec::new();
            while i < a.len() && j < b.len() {
                if a[i] == b[j] {
                    i += 1;
                    j += 1;
                    continue;
                }
                // Resynchronize at the next `\n` or `,` on both sides.
                let end = |s: &[u8], k: usize| {
                    k + s[k..]
                        .iter()
                        .position(|c| *c == b'\n' || *c == b',')
                        .unwrap()
                };
                let (ei, ej) = (end(a, i), end(b, j));
                out.push((
                    String::from_utf8_lossy(&a[i..ei]).into_owned(),
                    String::from_utf8_lossy(&b[j..ej]).into_owned(),
                ));
                i = ei;
                j = ej;
            }
            out
        };
        let diffs = changed(&once, &up);
        assert_eq!(diffs.len(), 2, "{input}: {diffs:?}\n{up}");
        assert!(diffs[0].1.starts_with("2.0"), "{input}: {diffs:?}");
        assert!(diffs[1].1.starts_with(".prod"), "{input}: {diffs:?}");
        assert!(
            stderr.contains("sidecar upgraded (image (registry.example/moat:0.1.0 → registry.example/moat:0.2.0))")
                && stderr.contains("volumes upgraded: moat-token"),
            "{input}: {stderr}"
        );
        // Idempotent: the same flags again change nothing.
        let (twice, stderr) = inject_ok(&flags, &up);
        assert_eq!(twice, up, "{input}: a second --upgrade changed the output");
        assert!(stderr.contains("sidecar already present"), "{stderr}");
        assert!(!stderr.contains("warning"), "{stderr}");
        // And --upgrade with the flags it was made with changes nothing.
        let (same, _) = inject_ok(&["--upgrade", "--image", IMAGE], &once);
        assert_eq!(same, once, "{input}");
    }
}

#[test]
fn upgrade_moves_a_sidecar_injected_last_to_the_front() {
    // What an older moat inject wrote: the sidecar after `migrate`.
    let old = golden("upgrade/sidecar-last.yaml");
    let (kept, stderr) = inject_ok(&["--image", IMAGE], &old);
    assert_eq!(kept, old);
    assert!(
        stderr.contains("it is not first among the init containers")
            && stderr.contains("--upgrade"),
        "{stderr}"
    );
    let (up, stderr) = inject_ok(&["--upgrade", "--image", IMAGE], &old);
    assert_eq!(
        up,
        inject_file(&golden_dir().join("statefulset.in.yaml")),
        "upgrading the old output is not what injecting the input makes now"
    );
    assert!(
        stderr.contains("sidecar upgraded (moved first among the init containers)"),
        "{stderr}"
    );
}

#[test]
fn standard_error_says_what_was_done_to_each_document() {
    // One stream with every case: a fresh workload, one that has the
    // sidecar, one with a hand-written token volume, an opted-out one, an
    // unknown kind with a pod template, a Service, and a VM proxy config.
    let stream = [
        golden("deployment.in.yaml"),
        inject_file(&golden_dir().join("cronjob.in.yaml")),
        golden("pod.in.yaml"),
        golden("opt-out.in.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: billing, namespace: prod}\nspec:\n  ports: [{port: 8443}]\n".into(),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: billing-moat-proxy, namespace: prod}\ndata:\n  proxy.toml: |\n    [identity]\n    ca_url = \"https://moat-ca.moat-system.svc:8443\"\n    bundle = \"/etc/moat/bundle/bundle.pem\"\n    token_file = \"/var/run/secrets/moat/token\"\n    [admin]\n    listen = \"127.0.0.1:9901\"\n    [[inbound]]\n    name = \"api\"\n    listen = \"0.0.0.0:15443\"\n    forward = \"127.0.0.1:8080\"\n".into(),
    ]
    .join("---\n");
    let (_, stderr) = inject_ok(&["--image", IMAGE], &stream);
    let lines: Vec<&str> = stderr.lines().collect();
    for want in [
        "moat inject: Deployment/billing in prod: sidecar added, first among the init containers; volumes added: moat-token, moat-bundle, moat-config, moat-policy",
        "moat inject: CronJob/cleanup in prod: sidecar already present",
        "moat inject: Pod/debug in prod: sidecar added, first among the init containers; volumes added: moat-bundle, moat-config, moat-policy",
        "moat inject: warning: Pod/debug in prod: kept the existing volume moat-token, which differs from what moat would add (projected.sources[0].serviceAccountToken.expirationSeconds (3600 → 600)); --upgrade replaces it",
        "moat inject: Deployment/moat-ca in moat-system: left alone (moat.dev/inject: \"false\" in spec.template.metadata.annotations)",
        "moat inject: warning: Rollout/canary in prod (document 7, line 208): holds a pod template at spec.template.spec, but moat inject does not know the kind Rollout; passed through without the sidecar",
        "moat inject: Service/billing in prod: passed through (no pod template)",
        "moat inject: ConfigMap/billing-moat-proxy in prod: passed through (no pod template)",
        "moat inject: ConfigMaps the injected pods mount (a pod does not start until they exist):",
        "moat inject:   prod/billing-moat-proxy, key proxy.toml: in this stream",
        "moat inject:   prod/billing-moat-policy, key policy.toml: not in this stream",
        "moat inject:   prod/moat-bundle, key bundle.pem: not in this stream",
        "moat inject:   prod/cleanup-moat-proxy, key proxy.toml: not in this stream",
    ] {
        assert!(lines.contains(&want), "{want:?} not in:\n{stderr}");
    }
    assert!(
        stderr.contains("warning: Deployment/billing in prod: proxy.toml: [admin] listen = \"127.0.0.1:9901\" is loopback, but the kubelet probes the pod IP"),
        "{stderr}"
    );
    // --quiet keeps the warnings only.
    let (_, quiet) = inject_ok(&["--image", IMAGE, "--quiet"], &stream);
    assert!(
        quiet
            .lines()
            .all(|l| l.starts_with("moat inject: warning: ")),
        "{quiet}"
    );
    assert_eq!(quiet.lines().count(), 3, "{quiet}");
}

#[test]
fn a_bundle_config_map_without_a_certificate_is_a_warning() {
    // config/kubernetes/bundle.yaml as shipped (bundle.pem empty), applied
    // with the workloads: every sidecar would stop at start.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubernetes");
    let stream = [
        std::fs::read_to_string(repo.join("bundle.yaml")).unwrap(),
        std::fs::read_to_string(repo.join("workload.yaml")).unwrap(),
    ]
    .join("---\n");
    let (_, stderr) = inject_ok_transparent(&["--image", "moat:0.1.0", "--quiet"], &stream);
    for workload in ["billing", "frontend"] {
        let want = format!(
            "moat inject: warning: Deployment/{workload} in prod: ConfigMap moat-bundle: bundle.pem holds no certificate"
        );
        assert!(stderr.contains(&want), "{want:?} not in:\n{stderr}");
    }
    // With a certificate in it, nothing to say.
    let ca = tempfile::tempdir().unwrap();
    support::ca_init(&ca.path().join("ca"));
    let pem = support::moat_ok(&["ca", "bundle", "--dir", path_str(&ca.path().join("ca"))]);
    let block: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    let stream = stream.replace("  bundle.pem: \"\"\n", &format!("  bundle.pem: |\n{block}"));
    let (_, stderr) = inject_ok_transparent(&["--image", "moat:0.1.0", "--quiet"], &stream);
    assert_eq!(stderr, "");
}

#[test]
fn transparent_every_kind_matches_its_golden_file() {
    let update = std::env::var_os("MOAT_UPDATE_GOLDEN").is_some();
    let mut mismatched = Vec::new();
    for input in golden_inputs() {
        let got = inject_file_transparent(&input);
        let expected_file = transparent_path(&input);
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
fn transparent_injecting_twice_is_byte_identical() {
    for input in golden_inputs() {
        let once = inject_file_transparent(&input);
        let (again, stderr) = inject_ok_transparent(&["--image", IMAGE, "-"], &once);
        assert_eq!(
            again,
            once,
            "{}: a second injection changed the output",
            input.display()
        );
        assert!(
            !stderr.contains("not rewritten"),
            "{}: {stderr}",
            input.display()
        );
        // --upgrade is a fixed point too (once it has replaced what differs,
        // such as pod.in.yaml's hand-written token volume).
        let (up, _) = inject_ok_transparent(&["--upgrade", "--image", IMAGE], &once);
        let (twice, _) = inject_ok_transparent(&["--upgrade", "--image", IMAGE], &up);
        assert_eq!(
            twice,
            up,
            "{}: a second --upgrade changed the output",
            input.display()
        );
    }
}

#[test]
fn transparent_output_validates_against_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for input in golden_inputs() {
        let out = dir.path().join(input.file_name().unwrap());
        std::fs::write(&out, inject_file_transparent(&input)).unwrap();
        files.push(out);
    }
    validate(&files);
}

/// The init containers of the first workload in a JSON output.
fn init_containers(out: &str) -> Vec<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(out).unwrap();
    pod_spec_mut(&mut v)["initContainers"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn transparent_mode_puts_a_hardened_redirect_step_first() {
    let out = inject_file_transparent(&golden_dir().join("kubectl.in.json"));
    let init = init_containers(&out);
    let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["moat-redirect", "moat-proxy", "migrate"]);
    let redirect = &init[0];
    assert_eq!(redirect["image"], IMAGE);
    assert_eq!(
        redirect["args"],
        serde_json::json!(["redirect", "--config", "/etc/moat/config/proxy.toml"])
    );
    // Not a native sidecar: it runs to completion before the sidecar starts.
    assert!(redirect.get("restartPolicy").is_none());
    let sc = &redirect["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["runAsNonRoot"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["add"], serde_json::json!(["NET_ADMIN"]));
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(sc.get("privileged").is_none());
    // proxy.toml is all it reads.
    assert_eq!(
        redirect["volumeMounts"],
        serde_json::json!([{"name": "moat-config", "mountPath": "/etc/moat/config", "readOnly": true}])
    );
    // The sidecar is the one explicit mode makes: UID 65532, which the rules exempt.
    let explicit = init_containers(&inject_file(&golden_dir().join("kubectl.in.json")));
    assert_eq!(init[1], explicit[0]);
    assert_eq!(init[1]["securityContext"]["runAsUser"], 65532);
}

#[test]
fn transparent_and_explicit_switch_with_upgrade_both_ways() {
    for input in [
        "deployment.in.yaml",
        "statefulset.in.yaml",
        "probes.in.yaml",
        "kubectl.in.json",
    ] {
        let file = golden_dir().join(input);
        let explicit = inject_file(&file);
        let transparent = inject_file_transparent(&file);
        // Without --upgrade, transparent mode adds the redirect step ...
        let (added, stderr) = inject_ok_transparent(&["--image", IMAGE], &explicit);
        assert!(
            stderr.contains(
                "redirect step (init container moat-redirect) added, ahead of the sidecar"
            ),
            "{input}: {stderr}"
        );
        if input == "probes.in.yaml" {
            // ... but leaves the sidecar, and so the probes, as they are.
            assert!(stderr.contains("app probe(s) not rewritten"), "{stderr}");
            assert_ne!(added, transparent);
        } else {
            assert_eq!(added, transparent, "{input}");
        }
        // With --upgrade it becomes what transparent mode makes of the input.
        let (up, _) = inject_ok_transparent(&["--upgrade", "--image", IMAGE], &explicit);
        assert_eq!(up, transparent, "{input}: explicit -> transparent");
        // --explicit without --upgrade keeps the redirect step, and says so.
        let (kept, stderr) = inject_ok(&["--image", IMAGE], &transparent);
        assert_eq!(kept, transparent, "{input}");
        assert!(
            stderr.contains("which explicit mode does not use; left as it is")
                && stderr.contains("--upgrade removes it"),
            "{input}: {stderr}"
        );
        // --upgrade --explicit takes it out again (and restores the probes).
        let (back, stderr) = inject_ok(&["--upgrade", "--image", IMAGE], &transparent);
        assert!(
            stderr.contains("redirect step (init container moat-redirect) removed (explicit mode)"),
            "{input}: {stderr}"
        );
        if input == "probes.in.yaml" {
            // The originals come back from the sidecar's record, written
            // anew: the named port as its number, flow style as block.
            assert!(
                !back.contains("app-health") && !back.contains("MOAT_APP_PROBES"),
                "{back}"
            );
            for needle in [
                "          httpGet:
            path: /healthz
            port: 8080
            httpHeaders:
            - name: X-Probe
              value: liveness
          periodSeconds: 10   # kept as it is
",
                "        readinessProbe:
          tcpSocket:
            port: 8080
          timeoutSeconds: 2
",
                "livenessProbe: {httpGet: {path: /live, port: 9090}, periodSeconds: 5}",
            ] {
                assert!(
                    back.contains(needle),
                    "{needle:?} not in:
{back}"
                );
            }
            assert!(
                stderr
                    .contains("container app livenessProbe restored (GET 127.0.0.1:8080/healthz)"),
                "{stderr}"
            );
        } else {
            assert_eq!(back, explicit, "{input}: transparent -> explicit");
        }
        // And each is a fixed point of its own mode, with --upgrade.
        let (again, _) = inject_ok(&["--upgrade", "--image", IMAGE], &back);
        assert_eq!(again, back, "{input}");
    }
}

#[test]
fn transparent_mode_points_app_probes_at_the_sidecar() {
    let out = inject_file_transparent(&golden_dir().join("probes.in.yaml"));
    for needle in [
        // The block probe, by named port: rewritten; its other keys kept.
        "        livenessProbe:\n          httpGet:\n            path: /app-health/app/livez\n            port: 9901\n          periodSeconds: 10   # kept as it is\n",
        // The tcpSocket probe, written in flow style: an httpGet now.
        "        readinessProbe:\n          httpGet:\n            path: /app-health/app/readyz\n            port: 9901\n          timeoutSeconds: 2\n",
        // exec probes run in the container: untouched.
        "        startupProbe:\n          exec:\n            command: [/bin/true]\n",
        // A flow-style probe stays in flow style.
        "livenessProbe: {httpGet: {path: /app-health/worker/livez, port: 9901}, periodSeconds: 5}",
        // HTTPS: untouched.
        "            port: 9443\n            scheme: HTTPS\n",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    // The originals, for the sidecar's admin listener.
    let env = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("value: "))
        .filter(|v| v.contains("app-health"))
        .expect("the sidecar's MOAT_APP_PROBES");
    let json: String = serde_json::from_str(env).expect("a double-quoted YAML string is JSON here");
    let probes: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        probes,
        serde_json::json!({
            "/app-health/app/livez": {"httpGet": {"path": "/healthz", "port": 8080,
                "httpHeaders": [{"name": "X-Probe", "value": "liveness"}]}},
            "/app-health/app/readyz": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 2},
            "/app-health/worker/livez": {"httpGet": {"path": "/live", "port": 9090}},
        })
    );
    let (_, stderr) = inject_ok_transparent(&["--image", IMAGE], &golden("probes.in.yaml"));
    for needle in [
        "Deployment/orders in shop: container app livenessProbe rewritten to GET :9901/app-health/app/livez (the sidecar checks GET 127.0.0.1:8080/healthz)",
        "Deployment/orders in shop: container app readinessProbe rewritten to GET :9901/app-health/app/readyz (the sidecar checks a TCP connection to 127.0.0.1:8080)",
        "warning: Deployment/orders in shop: container worker readinessProbe: an HTTPS probe of port 9443",
        "transparent mode: moat inject adds the moat-redirect init container",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
    // Explicit mode leaves every probe alone.
    assert!(!inject_file(&golden_dir().join("probes.in.yaml")).contains("app-health"));
}

/// The ConfigMap with orders' proxy.toml, its `[redirect]` given.
fn orders_proxy_config_map(redirect: &str) -> String {
    let toml = format!(
        "[identity]\nca_url = \"https://moat-ca.moat-system.svc:8443\"\nbundle = \"/etc/moat/bundle/bundle.pem\"\n\
         token_file = \"/var/run/secrets/moat/token\"\n\n[admin]\nlisten = \"0.0.0.0:9901\"\n\n\
         [[inbound]]\nname = \"api\"\nlisten = \"0.0.0.0:15443\"\nforward = \"127.0.0.1:8080\"\n\n\
         [redirect]\n{redirect}\n"
    );
    let indented: String = toml.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: orders-moat-proxy\n  namespace: shop\ndata:\n  proxy.toml: |\n{indented}"
    )
}

#[test]
fn only_probes_of_ports_the_rules_redirect_are_pointed_at_the_sidecar() {
    // The pod's rules take port 8080 only: the worker's 9090 and 9443 are
    // still reached by the kubelet directly, and left as they are.
    let stream = golden("probes.in.yaml") + &orders_proxy_config_map("inbound_ports = [8080]");
    let (out, stderr) = inject_ok_transparent(&["--image", IMAGE], &stream);
    assert!(out.contains("path: /app-health/app/livez"), "{out}");
    assert!(out.contains("path: /app-health/app/readyz"), "{out}");
    assert!(
        out.contains("livenessProbe: {httpGet: {path: /live, port: 9090}, periodSeconds: 5}"),
        "{out}"
    );
    assert!(!out.contains("/app-health/worker/"), "{out}");
    assert!(!stderr.contains("an HTTPS probe of port 9443"), "{stderr}");

    // skip_inbound_ports leaves a port alone as well.
    let skipping =
        golden("probes.in.yaml") + &orders_proxy_config_map("skip_inbound_ports = [9090]");
    let (out, _) = inject_ok_transparent(&["--image", IMAGE], &skipping);
    assert!(out.contains("path: /app-health/app/livez"), "{out}");
    assert!(!out.contains("/app-health/worker/"), "{out}");

    // A pod injected before its rules stopped taking 8080: the rewritten
    // probes are reported, and --upgrade writes their originals back.
    let (everything, _) = inject_ok_transparent(&["--image", IMAGE], &golden("probes.in.yaml"));
    let narrowed = everything + &orders_proxy_config_map("inbound_ports = [9090]");
    let (kept, stderr) = inject_ok_transparent(&["--image", IMAGE], &narrowed);
    assert!(kept.contains("path: /app-health/app/livez"), "{kept}");
    assert!(
        stderr.contains("container app livenessProbe is rewritten to the sidecar's admin port, but its port 8080 is not redirected"),
        "{stderr}"
    );
    let (restored, _) = inject_ok_transparent(&["--upgrade", "--image", IMAGE], &narrowed);
    assert!(!restored.contains("/app-health/app/"), "{restored}");
    assert!(restored.contains("path: /healthz"), "{restored}");
    assert!(restored.contains("/app-health/worker/livez"), "{restored}");
    // And that is a fixed point.
    let (again, _) = inject_ok_transparent(&["--upgrade", "--image", IMAGE], &restored);
    assert_eq!(again, restored);
}
