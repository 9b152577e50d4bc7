//! The Kubernetes path as the docs tell it, followed literally, so the docs
//! cannot drift from the manifests and the binary: the shell blocks of
//! docs/deploy.md's numbered Kubernetes steps, and README's Kubernetes quick
//! start, run in order.
//!
//! No cluster runs here, so `kubectl` is played by a model of one that
//! knows what the API server would refuse or leave pending: an object put
//! in a namespace nothing has created yet; `kubectl create` of something
//! that exists; a pod whose ConfigMap, Secret or ServiceAccount does not
//! exist once its file is applied (it would never start); a `--from-file`
//! that no earlier step made. Every file applied is checked against the
//! Kubernetes schemas (`kubernetes-validate --strict`) and must be what `moat
//! inject` leaves unchanged, without a warning (the workloads are injected,
//! the CA opts out). `moat` commands run for real, in a scratch directory
//! (those that need PostgreSQL, `--config`, are only noted).
//!
//! Only unindented ```sh blocks count: an indented one (inside a list item)
//! is an illustration with placeholders. A command the model does not know
//! fails the test, so a new step has to be taught here rather than skipped.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{moat_bin, path_str};

/// The image the shipped manifests name.
const IMAGE: &str = "moat:0.1.0";

/// Files the reader brings (the docs say where they come from), not made by
/// an earlier command.
const READER_FILES: &[&str] = &["db-password", "db-ca.crt"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The unindented ```sh blocks of `markdown`, in order.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line == "```sh" => current = Some(String::new()),
            Some(block) if line == "```" => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// The text of `markdown` from the heading line `heading` to the next
/// heading of the same or a higher level (a `# comment` inside a fenced
/// code block is not a heading).
fn section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let start = markdown
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"))
        + 1;
    let body = &markdown[start + heading.len()..];
    let end = body
        .lines()
        .scan((0, false), |(offset, fenced), line| {
            let at = *offset;
            *offset += line.len() + 1;
            if line.trim_start().starts_with("```") {
                *fenced = !*fenced;
            }
            Some((at, line, *fenced))
        })
        .find(|(_, line, fenced)| {
            let hashes = line.chars().take_while(|c| *c == '#').count();
            !fenced && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ')
        })
        .map(|(at, _, _)| at)
        .unwrap_or(body.len());
    &markdown[start..start + heading.len() + end]
}

/// docs/deploy.md's numbered Kubernetes steps (`### 1. ...`), in order.
fn deploy_md_steps() -> String {
    let text = std::fs::read_to_string(repo().join("docs/deploy.md")).unwrap();
    let kubernetes = section(&text, "## Kubernetes");
    let mut steps = String::new();
    for part in kubernetes.split("\n### ").skip(1) {
        if part.starts_with(|c: char| c.is_ascii_digit()) {
            steps.push_str("\n### ");
            steps.push_str(part);
        }
    }
    assert!(
        steps.contains("### 3."),
        "docs/deploy.md lost its numbered Kubernetes steps"
    );
    steps
}

/// One command: words, and where its standard output goes.
struct Cmd {
    words: Vec<String>,
    stdout: Option<String>,
    heredoc: Option<String>,
}

/// The commands of a shell block: continuation lines joined, comments
/// dropped, `&&` lists split; a pipeline is one entry of several commands.
fn commands(block: &str) -> Vec<Vec<Cmd>> {
    let mut out = Vec::new();
    let mut lines = block.lines();
    let mut pending = String::new();
    while let Some(line) = lines.next() {
        let line = strip_comment(line);
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(&line);
        let full = std::mem::take(&mut pending);
        if full.trim().is_empty() {
            continue;
        }
        let mut heredoc = None;
        let mut text = full.clone();
        if let Some(at) = full.find("<<") {
            let marker = full[at + 2..].trim().trim_matches(['\'', '"']).to_owned();
            let mut body = String::new();
            for l in lines.by_ref() {
                if l == marker {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            heredoc = Some(body);
            text = full[..at].to_owned();
        }
        for list in split_outside_quotes(&text, "&&") {
            let pipeline: Vec<Cmd> = split_outside_quotes(&list, "|")
                .iter()
                .map(|c| {
                    let mut words = words(c);
                    let stdout = words.iter().position(|w| w == ">").map(|i| {
                        let file = words[i + 1].clone();
                        words.drain(i..i + 2);
                        file
                    });
                    Cmd {
                        words,
                        stdout,
                        heredoc: heredoc.take(),
                    }
                })
                .collect();
            out.push(pipeline);
        }
    }
    out
}

/// `line` without a `#` comment (a `#` that starts a word outside quotes).
fn strip_comment(line: &str) -> String {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return line[..i].trim_end().to_owned(),
            _ => {}
        }
        prev = c;
    }
    line.to_owned()
}

fn split_outside_quotes(text: &str, sep: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut quote = None;
    let mut start = 0;
    let mut i = 0;
    while i < text.len() {
        let c = text[i..].chars().next().unwrap();
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, _) if text[i..].starts_with(sep) && !text[i..].starts_with("||") => {
                parts.push(text[start..i].trim().to_owned());
                start = i + sep.len();
                i = start;
                continue;
            }
            _ => {}
        }
        i += c.len_utf8();
    }
    parts.push(text[start..].trim().to_owned());
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// Shell words: whitespace-separated, with '...' and "..." quoting. No
/// expansion: a `$` fails the test (the model cannot follow it).
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    for c in text.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('"') | None, '$') => panic!("shell expansion in {text:?}: teach the model"),
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

/// A kind, namespace and name.
type Key = (String, String, String);

/// The cluster, as far as the documented commands can tell.
struct Walk {
    /// Where the docs are, for messages.
    source: &'static str,
    /// The reader's working directory.
    cwd: tempfile::TempDir,
    /// Directories a command was only noted to make (no PostgreSQL here).
    noted_dirs: Vec<PathBuf>,
    namespaces: BTreeSet<String>,
    objects: BTreeSet<Key>,
    /// Every manifest applied, for the final checks.
    applied: Vec<PathBuf>,
}

impl Walk {
    fn new(source: &'static str) -> Self {
        Self {
            source,
            cwd: tempfile::tempdir().unwrap(),
            noted_dirs: Vec::new(),
            namespaces: ["default", "kube-system"].map(String::from).into(),
            objects: BTreeSet::new(),
            applied: Vec::new(),
        }
    }

    fn run_block(&mut self, block: &str) {
        for pipeline in commands(block) {
            let line: Vec<String> = pipeline.iter().map(|c| c.words.join(" ")).collect();
            let line = line.join(" | ");
            match pipeline.as_slice() {
                [one] => self.run(one, &line),
                [create, apply]
                    if create.words.get(..2) == Some(&["kubectl".into(), "create".into()])
                        && create.words.iter().any(|w| w == "--dry-run=client")
                        && apply.words == ["kubectl", "apply", "-f", "-"] =>
                {
                    self.kubectl_create(&create.words, &line, true);
                }
                _ => panic!(
                    "{}: `{line}`: a pipeline the model does not know",
                    self.source
                ),
            }
        }
    }

    fn fail(&self, line: &str, why: impl std::fmt::Display) -> ! {
        panic!("{}: `{line}`: {why}", self.source)
    }

    fn run(&mut self, cmd: &Cmd, line: &str) {
        let w: Vec<&str> = cmd.words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["moat", ..] => self.moat(cmd, line),
            ["kubectl", rest @ ..] => self.kubectl(rest, &cmd.words, line),
            ["rm", "-rf", paths @ ..] => {
                for p in paths {
                    let p = self.cwd.path().join(p);
                    let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
                    self.noted_dirs.retain(|d| !d.starts_with(&p));
                }
            }
            ["cat"] if cmd.heredoc.is_some() => {
                let file = cmd
                    .stdout
                    .as_deref()
                    .unwrap_or_else(|| self.fail(line, "cat without > FILE"));
                std::fs::write(self.cwd.path().join(file), cmd.heredoc.as_ref().unwrap()).unwrap();
            }
            _ => self.fail(line, "a command the model does not know; teach it"),
        }
    }

    fn moat(&mut self, cmd: &Cmd, line: &str) {
        let args = &cmd.words[1..];
        if args.first().is_some_and(|a| a == "ca") && args.iter().any(|a| a == "--config") {
            // Needs the database the config names: noted, not run.
            if let Some(i) = args.iter().position(|a| a == "--dir") {
                self.noted_dirs.push(self.cwd.path().join(&args[i + 1]));
            }
            if let Some(f) = &cmd.stdout {
                std::fs::write(self.cwd.path().join(f), "").unwrap();
            }
            return;
        }
        let out = Command::new(moat_bin())
            .args(args)
            .current_dir(self.cwd.path())
            .output()
            .unwrap();
        if !out.status.success() {
            self.fail(
                line,
                format!("failed: {}", String::from_utf8_lossy(&out.stderr)),
            );
        }
        if let Some(f) = &cmd.stdout {
            std::fs::write(self.cwd.path().join(f), &out.stdout).unwrap();
        }
    }

    /// Where a path in a command is: the reader's directory, or the repository.
    fn path(&self, p: &str) -> Option<PathBuf> {
        let local = self.cwd.path().join(p);
        if local.exists() || self.noted_dirs.iter().any(|d| local.starts_with(d)) {
            return Some(local);
        }
        let in_repo = repo().join(p);
        in_repo.exists().then_some(in_repo)
    }

    fn kubectl(&mut self, rest: &[&str], words: &[String], line: &str) {
        // -n NS / --namespace NS / --namespace=NS, anywhere.
        let mut namespace = None;
        let mut args: Vec<&str> = Vec::new();
        let mut it = rest.iter();
        while let Some(a) = it.next() {
            match *a {
                "-n" | "--namespace" => namespace = it.next().copied(),
                a if a.starts_with("--namespace=") => namespace = Some(&a[12..]),
                a => args.push(a),
            }
        }
        let ns = namespace.unwrap_or("default");
        let need_ns = |walk: &Self| {
            if !walk.namespaces.contains(ns) {
                walk.fail(line, format!("namespace {ns} does not exist yet"));
            }
        };
        match args.as_slice() {
            ["create", "namespace", name] => {
                if !self.namespaces.insert((*name).to_owned()) {
                    self.fail(line, "the namespace exists already (kubectl create fails)");
                }
            }
            ["create", "secret", "generic", ..] | ["create", "configmap", ..] => {
                self.kubectl_create(words, line, false);
            }
            ["apply", "-f", file] => {
                let file = self
                    .path(file)
                    .unwrap_or_else(|| self.fail(line, "no such file"));
                self.apply(&file, namespace, line);
            }
            ["label", "namespace", name, ..] => {
                if !self.namespaces.contains(*name) {
                    self.fail(line, "no such namespace");
                }
            }
            ["exec" | "logs", target, ..] | ["rollout", "status", target, ..] => {
                need_ns(self);
                if let Some(name) = target.strip_prefix("deploy/") {
                    let key = ("Deployment".into(), ns.into(), name.into());
                    if !self.objects.contains(&key) {
                        self.fail(line, format!("no Deployment {ns}/{name}"));
                    }
                }
            }
            _ => self.fail(line, "a kubectl command the model does not know; teach it"),
        }
    }

    /// `kubectl [-n NS] create secret generic|configmap NAME --from-...`;
    /// `or_update` for `--dry-run=client -o yaml | kubectl apply -f -`.
    fn kubectl_create(&mut self, words: &[String], line: &str, or_update: bool) {
        let mut ns = "default".to_owned();
        let mut positional = Vec::new();
        let mut i = 1;
        while i < words.len() {
            let w = words[i].as_str();
            match w {
                "-n" | "--namespace" => {
                    ns = words[i + 1].clone();
                    i += 1;
                }
                "-o" => i += 1,
                w if w.starts_with("--from-file=") => {
                    let spec = &w["--from-file=".len()..];
                    let path = spec.split_once('=').map_or(spec, |(_, p)| p);
                    let brought = READER_FILES
                        .iter()
                        .any(|f| Path::new(path).file_name() == Some(f.as_ref()));
                    if self.path(path).is_none() && !brought {
                        self.fail(line, format!("{path}: no earlier step makes this file"));
                    }
                }
                w if w.starts_with('-') => {}
                w => positional.push(w.to_owned()),
            }
            i += 1;
        }
        let (kind, name) = match positional.as_slice() {
            [_, s, _, name] if s == "secret" => ("Secret", name.clone()),
            [_, c, name] if c == "configmap" => ("ConfigMap", name.clone()),
            _ => self.fail(line, "a create the model does not know"),
        };
        if !self.namespaces.contains(&ns) {
            self.fail(line, format!("namespace {ns} does not exist yet"));
        }
        if !self.objects.insert((kind.into(), ns, name)) && !or_update {
            self.fail(line, "it exists already (kubectl create fails)");
        }
    }

    fn apply(&mut self, file: &Path, namespace: Option<&str>, line: &str) {
        let docs = load_yaml(file);
        if validate(file) {
            let out = Command::new(moat_bin())
                .args(["inject", "--image", IMAGE, path_str(file)])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success()
                || out.stdout != std::fs::read(file).unwrap()
                || stderr.contains("warning:")
            {
                self.fail(
                    line,
                    format!(
                        "`moat inject --image {IMAGE}` does not leave it as it is, without a warning:\n{stderr}"
                    ),
                );
            }
        }
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if kind == "Namespace" {
                self.namespaces.insert(name.clone());
                continue;
            }
            if CLUSTER_SCOPED.contains(&kind.as_str()) {
                continue;
            }
            let ns = doc["metadata"]["namespace"]
                .as_str()
                .or(namespace)
                .unwrap_or("default")
                .to_owned();
            if !self.namespaces.contains(&ns) {
                self.fail(
                    line,
                    format!("{kind}/{name} goes in namespace {ns}, which nothing has created yet"),
                );
            }
            self.objects.insert((kind, ns, name));
        }
        // Once the file is in, every pod in it must find what it mounts.
        for doc in &docs {
            let Some(spec) = pod_spec(doc) else { continue };
            let ns = doc["metadata"]["namespace"]
                .as_str()
                .or(namespace)
                .unwrap_or("default");
            let what = format!(
                "{}/{}",
                doc["kind"].as_str().unwrap(),
                doc["metadata"]["name"].as_str().unwrap()
            );
            let mut needs: Vec<(&str, &str)> = Vec::new();
            if let Some(sa) = spec["serviceAccountName"].as_str() {
                needs.push(("ServiceAccount", sa));
            }
            for v in spec["volumes"].as_array().into_iter().flatten() {
                let mut refs = vec![
                    ("ConfigMap", &v["configMap"], "name"),
                    ("Secret", &v["secret"], "secretName"),
                ];
                for s in v["projected"]["sources"].as_array().into_iter().flatten() {
                    refs.push(("ConfigMap", &s["configMap"], "name"));
                    refs.push(("Secret", &s["secret"], "name"));
                }
                for (kind, source, field) in refs {
                    if let Some(name) = source[field].as_str()
                        && source["optional"] != true
                    {
                        needs.push((kind, name));
                    }
                }
            }
            for (kind, name) in needs {
                let key = (kind.to_owned(), ns.to_owned(), name.to_owned());
                let built_in = kind == "ServiceAccount" && name == "default";
                if !built_in && !self.objects.contains(&key) {
                    self.fail(
                        line,
                        format!(
                            "{what} needs {kind} {ns}/{name}, which no step has made: its pods would never start"
                        ),
                    );
                }
            }
        }
        self.applied.push(file.to_owned());
    }

    fn has(&self, kind: &str, ns: &str, name: &str) -> bool {
        self.objects
            .contains(&(kind.to_owned(), ns.to_owned(), name.to_owned()))
    }
}

const CLUSTER_SCOPED: &[&str] = &["ClusterRole", "ClusterRoleBinding", "Namespace"];

/// The pod spec of a workload, by kind.
fn pod_spec(doc: &Value) -> Option<&Value> {
    let pointer = match doc["kind"].as_str()? {
        "Pod" => "/spec",
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => "/spec/template/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        _ => return None,
    };
    doc.pointer(pointer)
}

/// The documents of a YAML file, read by PyYAML (installed with
/// kubernetes-validate).
fn load_yaml(file: &Path) -> Vec<Value> {
    let out = support::tool(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
            path_str(file),
        ],
    );
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn validate(file: &Path) -> bool {
    let out = support::tool(
        "kubernetes-validate",
        &["--strict", "--quiet", "-k", "1.37.0", path_str(file)],
    );
    assert!(
        out.status.success(),
        "{}: not valid Kubernetes 1.37:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn have_tools() -> bool {
    support::require("kubernetes-validate")
}

#[test]
fn the_kubernetes_steps_of_deploy_md_work_in_order() {
    if !have_tools() {
        return;
    }
    let mut walk = Walk::new("docs/deploy.md");
    for block in sh_blocks(&deploy_md_steps()) {
        walk.run_block(&block);
    }
    // The path ends with the CA and both sample workloads applied.
    for (kind, ns, name) in [
        ("Deployment", "moat-system", "moat-ca"),
        ("ConfigMap", "prod", "moat-bundle"),
        ("Deployment", "prod", "billing"),
        ("Deployment", "prod", "frontend"),
    ] {
        assert!(
            walk.has(kind, ns, name),
            "following docs/deploy.md never makes {kind} {ns}/{name}"
        );
    }
}

#[test]
fn the_kubernetes_quick_start_in_the_readme_works_in_order() {
    if !have_tools() {
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let deployment = section(&readme, "## Deployment");
    let kubernetes = section(deployment, "### Kubernetes");
    let blocks = sh_blocks(kubernetes);
    let mut walk = Walk::new("README.md");
    walk.run_block(&blocks[0]);
    assert!(walk.has("Deployment", "moat-system", "moat-ca"));
    assert!(walk.has("ConfigMap", "prod", "moat-bundle"));
}

#[test]
fn the_model_refuses_what_a_cluster_would() {
    // The checks above are only as good as the model: it must fail the
    // orders the docs got wrong before (the bundle ConfigMap in a namespace
    // nothing had made yet), and a pod whose ConfigMap no step makes.
    if !have_tools() {
        return;
    }
    let caught = |block: &'static str| {
        std::panic::catch_unwind(move || {
            let mut walk = Walk::new("test");
            walk.run_block(block);
        })
        .is_err()
    };
    assert!(caught(
        "moat ca init --dir ./moat-ca --trust-domain example.org\nmoat ca bundle --dir ./moat-ca > bundle.pem\nkubectl -n prod create configmap moat-bundle --from-file=bundle.pem\n"
    ));
    assert!(caught(
        "kubectl apply -f config/kubernetes/namespace.yaml\nkubectl apply -f config/kubernetes/workload.yaml\n"
    ));
    assert!(caught(
        "kubectl create namespace prod\nkubectl -n prod create configmap x --from-file=missing.pem\n"
    ));
    assert!(!caught(
        "kubectl apply -f config/kubernetes/namespace.yaml\nkubectl -n prod create configmap moat-bundle --from-file=config/kubernetes/proxy.toml\nkubectl apply -f config/kubernetes/workload.yaml\n"
    ));
}
