//! `moat inject`: add the moat sidecar to Kubernetes manifests.
//!
//! The input is a YAML stream (one or more documents). For every Pod,
//! Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob, the pod
//! spec gets:
//!
//! - the sidecar as a native sidecar: an `initContainers` entry named
//!   `moat-proxy` with `restartPolicy: Always`, a locked-down
//!   `securityContext`, resources, the mTLS and admin ports, and startup,
//!   readiness and liveness probes on the admin port;
//! - four volumes: `moat-token` (a projected service-account token for the
//!   CA's audience, 600 s), `moat-bundle` (ConfigMap `moat-bundle`),
//!   `moat-config` (ConfigMap `<name>-moat-proxy`, key `proxy.toml`) and
//!   `moat-policy` (ConfigMap `<name>-moat-policy`, key `policy.toml`), where
//!   `<name>` is the resource's `metadata.name`.
//!
//! Other kinds (Service, ConfigMap, ...) pass through unchanged.
//!
//! # Text is edited, not re-serialized
//!
//! The input is parsed (with `granit-parser`, the parser under `serde-saphyr`)
//! only to find *where* to insert; the output is the input text with new lines
//! spliced in. Everything else, comments, key order, quoting, blank lines and
//! documents that need nothing, comes out byte for byte as it went in. New
//! entries go after the last line of the collection they join, so a comment
//! that trailed that collection now trails the new entry; no comment is moved
//! away from the line it annotates.
//!
//! Injection is idempotent: a pod spec that already has an init container
//! named `moat-proxy` gets no second one, and volumes are added only when no
//! volume of that name exists. Running `moat inject` on its own output
//! changes nothing.
//!
//! Refused, with the document number and line: malformed YAML, `List` kinds,
//! resources with no `metadata.name`, pod specs that use `hostNetwork: true`
//! (the plaintext hop between the app and its sidecar would be on the host's
//! loopback, shared with every host-network pod), an app container named
//! `moat-proxy`, and pod specs built with aliases or merge keys where the
//! sidecar would go (editing them would change what the alias points at).

mod emit;
mod sidecar;
mod tree;

use emit::{Style, V, block_entry, block_item, flow};
use sidecar::{sidecar, volumes};
use tree::{Node, dash_col, parse};

/// The sidecar container's name; its presence marks a pod spec as injected.
pub const SIDECAR_NAME: &str = "moat-proxy";

/// What the injected sidecar looks like.
#[derive(Debug, Clone)]
pub struct Options {
    /// The moat image, e.g. `registry.example/moat:0.1.0`.
    pub image: String,
    /// The port the sidecar's inbound mTLS listener binds (`[[inbound]] listen`).
    pub inbound_port: u16,
    /// The admin port (`[admin] listen`), probed by the kubelet.
    pub admin_port: u16,
    /// The audience of the projected token; must match the CA's `[kubernetes] audience`.
    pub audience: String,
    /// The ConfigMap holding the trust bundle (`bundle.pem`).
    pub bundle_config_map: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            image: format!("moat:{}", env!("CARGO_PKG_VERSION")),
            inbound_port: 15443,
            admin_port: 9901,
            audience: "moat-ca".into(),
            bundle_config_map: "moat-bundle".into(),
        }
    }
}

/// Why a stream could not be injected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    /// The input is not valid YAML.
    #[error("line {line}, column {column}: not valid YAML: {message}")]
    Yaml {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A document is valid YAML but not something the sidecar can be added to.
    #[error("document {doc} (line {line}){what}: {reason}")]
    Refused {
        /// 1-based document number in the stream.
        doc: usize,
        /// 1-based line where the document's content starts.
        line: usize,
        /// ` kind/name` when known.
        what: String,
        /// Why, and what to do instead.
        reason: String,
    },
}

/// Adds the sidecar to every workload in `input`, as `options` describe it.
pub fn inject(input: &str, options: &Options) -> Result<String, InjectError> {
    let docs = parse(input)?;
    let nl = if input.contains("\r\n") { "\r\n" } else { "\n" };
    let mut edits = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let ctx = DocCtx {
            text: input,
            doc: i + 1,
            line: doc.start_line(),
            what: String::new(),
            nl,
        };
        plan_document(doc, ctx, options, &mut edits)?;
    }
    // Back to front, so earlier offsets stay valid; of two insertions at one
    // offset the one planned first must end up first, so it is applied last.
    let mut edits: Vec<(usize, Edit)> = edits.into_iter().enumerate().collect();
    edits.sort_by_key(|(i, e)| std::cmp::Reverse((e.at, *i)));
    let mut out = input.to_owned();
    for (_, e) in edits {
        out.replace_range(e.at..e.at + e.delete, &e.insert);
    }
    Ok(out)
}

/// One splice: at byte `at`, remove `delete` bytes and insert `insert`.
#[derive(Debug)]
struct Edit {
    at: usize,
    delete: usize,
    insert: String,
}

/// Where an error is, for messages.
#[derive(Clone)]
struct DocCtx<'a> {
    text: &'a str,
    doc: usize,
    line: usize,
    what: String,
    nl: &'static str,
}

impl DocCtx<'_> {
    fn refuse(&self, reason: impl Into<String>) -> InjectError {
        InjectError::Refused {
            doc: self.doc,
            line: self.line,
            what: self.what.clone(),
            reason: reason.into(),
        }
    }

    /// The byte offset of the start of the line holding `byte`.
    fn line_start(&self, byte: usize) -> usize {
        self.text[..byte].rfind('\n').map_or(0, |i| i + 1)
    }

    /// Where to put new lines that follow a node whose last leaf ends at
    /// `end`: the start of the next line (so a trailing comment stays on its
    /// line), and whether a line break must come first (end of input
    /// without one).
    fn after_line(&self, end: usize) -> (usize, bool) {
        let ls = self.line_start(end);
        // A block scalar's span runs to the next token's indentation.
        if self.text[ls..end]
            .chars()
            .all(|c| c == ' ' || c == '\t' || c == '\r')
        {
            return (ls, false);
        }
        match self.text[end..].find('\n') {
            Some(i) => (end + i + 1, false),
            None => (self.text.len(), true),
        }
    }

    /// An edit inserting `lines` on new lines after `end`.
    fn insert_lines(&self, end: usize, lines: &[String]) -> Edit {
        let (at, break_first) = self.after_line(end);
        let mut insert = String::new();
        if break_first {
            insert.push_str(self.nl);
        }
        for l in lines {
            insert.push_str(l);
            insert.push_str(self.nl);
        }
        Edit {
            at,
            delete: 0,
            insert,
        }
    }
}

/// Where the pod spec lives in each kind that carries one.
fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &["spec"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &["spec", "template", "spec"]
        }
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        _ => return None,
    })
}

fn plan_document(
    doc: &Node,
    mut ctx: DocCtx<'_>,
    o: &Options,
    edits: &mut Vec<Edit>,
) -> Result<(), InjectError> {
    if doc.is_null() {
        return Ok(()); // an empty document, e.g. after a trailing `---`
    }
    if !matches!(doc, Node::Map { .. }) {
        return Err(
            ctx.refuse("not a Kubernetes resource (expected a mapping with apiVersion and kind)")
        );
    }
    let kind = doc
        .get("kind")
        .and_then(Node::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Node::as_str);
    ctx.what = match name {
        Some(n) => format!(" {kind}/{n}"),
        None => format!(" {kind}"),
    };
    if kind.is_empty() {
        return Err(ctx.refuse("no kind; every document must be a Kubernetes resource"));
    }
    if kind.ends_with("List") {
        return Err(ctx.refuse(
            "a List cannot be injected; pass its items as a multi-document stream (separated by `---`)",
        ));
    }
    let Some(path) = pod_spec_path(&kind) else {
        return Ok(()); // Service, ConfigMap, ...: passed through unchanged
    };
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err(ctx.refuse(
            "no metadata.name; it names the ConfigMaps the sidecar mounts (<name>-moat-proxy, <name>-moat-policy)",
        ));
    };
    let mut parent = doc;
    let mut spec = doc;
    for (i, key) in path.iter().enumerate() {
        if i + 1 == path.len() {
            parent = spec;
        }
        spec = match spec.get(key) {
            Some(n @ Node::Map { .. }) => n,
            Some(Node::Alias { .. }) => {
                return Err(ctx.refuse(format!(
                    "{} is an alias; write the pod spec out in full",
                    path.join(".")
                )));
            }
            _ => return Err(ctx.refuse(format!("no pod spec at {}", path.join(".")))),
        };
    }
    let spec_key_col = parent
        .key(path[path.len() - 1])
        .map_or(0, |k| k.start().col);
    if spec.key("<<").is_some() {
        return Err(ctx.refuse("the pod spec uses a merge key (<<); write it out in full"));
    }
    if matches!(spec.get("hostNetwork"), Some(Node::Scalar { value, .. }) if value.eq_ignore_ascii_case("true"))
    {
        return Err(ctx.refuse(
            "hostNetwork: true; the app's plaintext hop to the sidecar would be on the node's loopback, \
             open to every host-network pod. Run it without hostNetwork to use the sidecar",
        ));
    }
    let containers = match spec.get("containers") {
        Some(c @ Node::Seq { .. }) => c,
        _ => return Err(ctx.refuse("the pod spec has no containers list")),
    };
    if containers.names().contains(&SIDECAR_NAME) {
        return Err(ctx.refuse(format!(
            "containers already has a container named {SIDECAR_NAME}; the sidecar belongs in initContainers \
             (restartPolicy: Always). Remove it and inject again"
        )));
    }
    for key in ["initContainers", "volumes"] {
        if let Some(Node::Alias { .. }) = spec.get(key) {
            return Err(ctx.refuse(format!("{key} is an alias; write it out in full")));
        }
        if let Some(v) = spec.get(key)
            && !v.is_null()
            && !matches!(v, Node::Seq { .. })
        {
            return Err(ctx.refuse(format!("{key} is not a list")));
        }
    }

    let style = Style::detect(ctx.text, spec, spec_key_col, containers);
    let mut missing: Vec<(&'static str, Vec<V>)> = Vec::new();
    let init = spec.get("initContainers");
    if !init.is_some_and(|n| n.names().contains(&SIDECAR_NAME)) {
        missing.push(("initContainers", vec![sidecar(o)]));
    }
    let vols = spec.get("volumes");
    let have = vols.map(Node::names).unwrap_or_default();
    let new_vols: Vec<V> = volumes(o, name)
        .into_iter()
        .filter(|(n, _)| !have.contains(n))
        .map(|(_, v)| v)
        .collect();
    if !new_vols.is_empty() {
        missing.push(("volumes", new_vols));
    }

    let mut new_keys: Vec<String> = Vec::new();
    let mut flow_keys: Vec<String> = Vec::new();
    for (key, items) in missing {
        match spec.get(key) {
            // Append to an existing non-empty list.
            Some(Node::Seq {
                flow: false,
                items: existing,
                ..
            }) if !existing.is_empty() => {
                let first = existing[0].start();
                let dash = dash_col(ctx.text, first.byte).unwrap_or(first.col.saturating_sub(2));
                let pad = first.col.saturating_sub(dash).max(2);
                let mut lines = Vec::new();
                for item in &items {
                    lines.extend(block_item(item, dash, pad, &style));
                }
                edits.push(ctx.insert_lines(existing.last().map_or(0, Node::leaf_end), &lines));
            }
            Some(Node::Seq {
                flow: true,
                items: existing,
                end,
                ..
            }) if !existing.is_empty() => {
                // `[a, b]` -> `[a, b, {...}]`: the closing bracket is the last byte of the span.
                let flows: Vec<String> = items.iter().map(flow).collect();
                let close = ctx.text[..*end].rfind(']').unwrap_or(*end);
                edits.push(Edit {
                    at: close,
                    delete: 0,
                    insert: format!(", {}", flows.join(", ")),
                });
            }
            // `key: []`, `key:` or `key: null`: replace the value with a block list.
            Some(v @ (Node::Seq { .. } | Node::Scalar { .. })) => {
                let (del_start, del_end) = match v {
                    Node::Seq { start, end, .. } => (start.byte, *end),
                    Node::Scalar { start, end, .. } if *end > start.byte => (start.byte, *end),
                    _ => (0, 0),
                };
                if spec_is_flow(spec) {
                    edits.push(Edit {
                        at: del_start,
                        delete: del_end - del_start,
                        insert: flow(&V::L(items)),
                    });
                    continue;
                }
                let key_node = spec.key(key).expect("key present");
                if del_end > del_start {
                    edits.push(Edit {
                        at: del_start,
                        delete: del_end - del_start,
                        insert: String::new(),
                    });
                }
                let dash = key_node.start().col + style.seq_offset;
                let mut lines = Vec::new();
                for item in &items {
                    lines.extend(block_item(item, dash, style.pad, &style));
                }
                let anchor = if del_end > del_start {
                    del_end
                } else {
                    key_node.leaf_end()
                };
                edits.push(ctx.insert_lines(anchor, &lines));
            }
            _ => {
                if spec_is_flow(spec) {
                    flow_keys.push(format!("{key}: {}", flow(&V::L(items))));
                } else {
                    new_keys.extend(block_entry(key, &V::L(items), style.key_col, &style));
                }
            }
        }
    }
    if !new_keys.is_empty() {
        edits.push(ctx.insert_lines(spec.leaf_end(), &new_keys));
    }
    if !flow_keys.is_empty()
        && let Node::Map { end, entries, .. } = spec
    {
        let close = ctx.text[..*end].rfind('}').unwrap_or(*end);
        let sep = if entries.is_empty() { "" } else { ", " };
        edits.push(Edit {
            at: close,
            delete: 0,
            insert: format!("{sep}{}", flow_keys.join(", ")),
        });
    }
    Ok(())
}

fn spec_is_flow(spec: &Node) -> bool {
    matches!(spec, Node::Map { flow: true, .. })
}
