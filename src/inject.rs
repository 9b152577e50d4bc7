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

use std::fmt::Write as _;

use granit_parser::{Event, Marker, Parser, ScalarStyle, StructureStyle};

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

/// A parsed node with the source positions needed to edit around it.
#[derive(Debug)]
enum Node {
    Scalar {
        value: String,
        style: ScalarStyle,
        start: Pos,
        end: usize,
    },
    Seq {
        flow: bool,
        start: Pos,
        end: usize,
        items: Vec<Node>,
    },
    Map {
        flow: bool,
        start: Pos,
        end: usize,
        entries: Vec<(Node, Node)>,
    },
    Alias {
        start: Pos,
    },
}

/// A position: byte offset, 1-based line, 0-based column (in characters).
#[derive(Debug, Clone, Copy)]
struct Pos {
    byte: usize,
    line: usize,
    col: usize,
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

/// A value to insert, kept in the order it is written.
enum V {
    S(String),
    N(i64),
    B(bool),
    M(Vec<(&'static str, V)>),
    L(Vec<V>),
}

impl Node {
    fn start(&self) -> Pos {
        match self {
            Node::Scalar { start, .. }
            | Node::Seq { start, .. }
            | Node::Map { start, .. }
            | Node::Alias { start } => *start,
        }
    }

    fn start_line(&self) -> usize {
        self.start().line
    }

    /// The value under `key` in a mapping.
    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map { entries, .. } => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The key node for `key` in a mapping.
    fn key(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map { entries, .. } => entries
                .iter()
                .map(|(k, _)| k)
                .find(|k| k.as_str() == Some(key)),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Node::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// True for an empty or `null`/`~` plain scalar.
    fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { value, style: ScalarStyle::Plain, .. }
            if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// `name` of each mapping in a sequence.
    fn names(&self) -> Vec<&str> {
        match self {
            Node::Seq { items, .. } => items
                .iter()
                .filter_map(|i| i.get("name")?.as_str())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The byte offset where the source text of this node's last leaf ends.
    fn leaf_end(&self) -> usize {
        match self {
            Node::Scalar { end, .. } => *end,
            Node::Alias { start } => start.byte,
            Node::Seq {
                flow: true, end, ..
            }
            | Node::Map {
                flow: true, end, ..
            } => *end,
            Node::Seq { items, end, .. } => items.last().map_or(*end, Node::leaf_end),
            Node::Map { entries, end, .. } => match entries.last() {
                // An empty value's span may sit on the next token's line.
                Some((k, v)) if v.is_null() && v.as_str() == Some("") => k.leaf_end(),
                Some((_, v)) => v.leaf_end(),
                None => *end,
            },
        }
    }
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

fn parse(input: &str) -> Result<Vec<Node>, InjectError> {
    // A mapping under construction keeps its pending key beside it.
    let mut stack: Vec<(Node, Option<Node>)> = Vec::new();
    let mut docs = Vec::new();
    let mut root: Option<Node> = None;
    let byte_of = |m: &Marker| -> usize {
        m.byte_offset().unwrap_or_else(|| {
            input
                .char_indices()
                .nth(m.index())
                .map_or(input.len(), |(b, _)| b)
        })
    };
    let pos_of = |m: &Marker| Pos {
        byte: byte_of(m),
        line: m.line(),
        col: m.col(),
    };
    for item in Parser::new_from_str(input) {
        let (event, span) = item.map_err(|e| InjectError::Yaml {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: e.info(),
        })?;
        let node = match event {
            Event::DocumentStart(..) => {
                root = None;
                continue;
            }
            Event::DocumentEnd => {
                docs.extend(root.take());
                continue;
            }
            Event::Scalar(value, style, _, _) => Node::Scalar {
                value: value.into_owned(),
                style,
                start: pos_of(&span.start),
                end: byte_of(&span.end),
            },
            Event::Alias(_) => Node::Alias {
                start: pos_of(&span.start),
            },
            Event::SequenceStart(style, _, _) => {
                let seq = Node::Seq {
                    flow: style == StructureStyle::Flow,
                    start: pos_of(&span.start),
                    end: 0,
                    items: Vec::new(),
                };
                stack.push((seq, None));
                continue;
            }
            Event::MappingStart(style, _, _) => {
                let map = Node::Map {
                    flow: style == StructureStyle::Flow,
                    start: pos_of(&span.start),
                    end: 0,
                    entries: Vec::new(),
                };
                stack.push((map, None));
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (mut node, _) = stack.pop().expect("balanced collection events");
                if let Node::Seq { end, .. } | Node::Map { end, .. } = &mut node {
                    *end = byte_of(&span.end);
                }
                node
            }
            _ => continue,
        };
        match stack.last_mut() {
            Some((Node::Seq { items, .. }, _)) => items.push(node),
            Some((Node::Map { entries, .. }, pending)) => match pending.take() {
                Some(key) => entries.push((key, node)),
                None => *pending = Some(node),
            },
            _ => root = Some(node),
        }
    }
    Ok(docs)
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
        missing.push(("initContainers", vec![sidecar(o, name)]));
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

/// The column of the `-` that introduces the sequence item starting at `byte`.
fn dash_col(text: &str, byte: usize) -> Option<usize> {
    let before = &text[..byte];
    let trimmed = before.trim_end_matches(' ');
    if !trimmed.ends_with('-') {
        return None;
    }
    let dash = trimmed.len() - 1;
    let ls = before.rfind('\n').map_or(0, |i| i + 1);
    Some(text[ls..dash].chars().count())
}

/// The manifest's own indentation habits, so new lines look like old ones.
struct Style {
    /// Column of the pod spec's keys.
    key_col: usize,
    /// Spaces a nested mapping is indented by.
    step: usize,
    /// Spaces between a key and the `-` of its list items (0 or 2, usually).
    seq_offset: usize,
    /// Columns from a `-` to its item's content (2, usually).
    pad: usize,
}

impl Style {
    fn detect(text: &str, spec: &Node, spec_key_col: usize, containers: &Node) -> Self {
        let key_col = spec.start().col;
        let step = key_col.saturating_sub(spec_key_col).clamp(1, 8);
        let first = match containers {
            Node::Seq {
                flow: false, items, ..
            } => items.first().map(Node::start),
            _ => None,
        };
        let dash = first.and_then(|f| dash_col(text, f.byte));
        let (seq_offset, pad) = match (first, dash) {
            (Some(f), Some(d)) => (
                d.saturating_sub(key_col),
                f.col.saturating_sub(d).clamp(2, 8),
            ),
            _ => (step, 2),
        };
        Self {
            key_col,
            step,
            seq_offset,
            pad,
        }
    }
}

/// Lines for `key: value` at column `col`, block style.
fn block_entry(key: &str, v: &V, col: usize, s: &Style) -> Vec<String> {
    let ind = " ".repeat(col);
    match v {
        V::M(m) if !m.is_empty() => {
            let mut lines = vec![format!("{ind}{key}:")];
            for (k, v) in m {
                lines.extend(block_entry(k, v, col + s.step, s));
            }
            lines
        }
        V::L(l) if !l.is_empty() => {
            let mut lines = vec![format!("{ind}{key}:")];
            for item in l {
                lines.extend(block_item(item, col + s.seq_offset, s.pad, s));
            }
            lines
        }
        scalar => vec![format!("{ind}{key}: {}", flow(scalar))],
    }
}

/// Lines for one list item whose `-` is at column `dash`, content `pad` columns later.
fn block_item(v: &V, dash: usize, pad: usize, s: &Style) -> Vec<String> {
    let prefix = format!("{}-{}", " ".repeat(dash), " ".repeat(pad - 1));
    match v {
        V::M(m) if !m.is_empty() => {
            let col = dash + pad;
            let mut lines = Vec::new();
            for (k, v) in m {
                lines.extend(block_entry(k, v, col, s));
            }
            lines[0] = format!("{prefix}{}", &lines[0][col..]);
            lines
        }
        scalar => vec![format!("{prefix}{}", flow(scalar))],
    }
}

/// A value in flow style (`{a: b, c: [d]}`), valid inside any YAML context.
fn flow(v: &V) -> String {
    match v {
        V::S(s) => scalar(s),
        V::N(n) => n.to_string(),
        V::B(b) => b.to_string(),
        V::M(m) => {
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {}", flow(v))).collect();
            format!("{{{}}}", parts.join(", "))
        }
        V::L(l) => {
            let parts: Vec<String> = l.iter().map(flow).collect();
            format!("[{}]", parts.join(", "))
        }
    }
}

/// A string scalar: plain when that cannot be misread, else double-quoted.
fn scalar(s: &str) -> String {
    let plain_safe = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:-".contains(c))
        && !s.ends_with(':')
        && !s.contains("://")
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        )
        && s.parse::<f64>().is_err()
        && !s.starts_with(|c: char| c.is_ascii_digit());
    if plain_safe {
        return s.to_owned();
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn s(v: &str) -> V {
    V::S(v.to_owned())
}

/// The sidecar container.
fn sidecar(o: &Options, _name: &str) -> V {
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
fn volumes(o: &Options, name: &str) -> Vec<(&'static str, V)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_that_would_be_misread_are_quoted() {
        assert_eq!(scalar("moat-proxy"), "moat-proxy");
        assert_eq!(scalar("moat:0.1.0"), "moat:0.1.0");
        assert_eq!(scalar("/ready"), "/ready");
        assert_eq!(scalar("--config"), "\"--config\"");
        assert_eq!(scalar("1"), "\"1\"");
        assert_eq!(scalar("50m"), "\"50m\"");
        assert_eq!(scalar("true"), "\"true\"");
        assert_eq!(scalar("a b"), "\"a b\"");
        assert_eq!(scalar("x\"y"), "\"x\\\"y\"");
    }

    #[test]
    fn dash_column_is_found_for_indented_and_indentless_lists() {
        let text = "a:\n  - b: 1\nc:\n- d: 2\n";
        assert_eq!(dash_col(text, text.find("b:").unwrap()), Some(2));
        assert_eq!(dash_col(text, text.find("d:").unwrap()), Some(0));
    }
}
