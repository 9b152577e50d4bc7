//! `moat inject`: add the moat sidecar to Kubernetes manifests.
//!
//! The input is a YAML stream (one or more documents; a JSON document is a
//! YAML document too). For every Pod, Deployment, StatefulSet, DaemonSet,
//! ReplicaSet, ReplicationController, Job and CronJob, the pod spec gets:
//!
//! - the sidecar as a native sidecar: an `initContainers` entry named
//!   `moat-proxy` with `restartPolicy: Always`, **first** among the init
//!   containers (so the others can use the mesh), a locked-down
//!   `securityContext`, resources, the mTLS and admin ports, and startup,
//!   readiness and liveness probes on the admin port;
//! - four volumes: `moat-token` (a projected service-account token for the
//!   CA's audience, 600 s), `moat-bundle` (ConfigMap `moat-bundle`),
//!   `moat-config` (ConfigMap `<name>-moat-proxy`, key `proxy.toml`) and
//!   `moat-policy` (ConfigMap `<name>-moat-policy`, key `policy.toml`), where
//!   `<name>` is the resource's `metadata.name`.
//!
//! In transparent mode (the default; [`Options::transparent`]) two more
//! things happen: the `moat-redirect` init container goes first of all,
//! ahead of the sidecar (`moat redirect` installs the nftables rules of
//! proxy.toml's `[redirect]` and exits; UID 0 with `NET_ADMIN` alone), and
//! the app containers' `httpGet` and `tcpSocket` probes on ports that are
//! not moat's own are pointed at the sidecar's admin port, the originals
//! recorded in the sidecar's environment ([`probes`]). Explicit mode
//! (`--explicit`) writes exactly what `moat inject` wrote before
//! transparent mode existed.
//!
//! A workload whose own or pod template's annotations say
//! `moat.dev/inject: "false"` is left alone (the CA's own Deployment does:
//! its pod cannot wait for a certificate from itself). Other kinds (Service,
//! ConfigMap, ...) pass through unchanged; a kind this module does not know
//! that holds a pod template (an Argo `Rollout`) passes through with a
//! warning in the report.
//!
//! # Text is edited, not re-serialized
//!
//! The input is parsed (with `granit-parser`, the parser under `serde-saphyr`)
//! only to find *where* to insert; the output is the input text with new lines
//! spliced in. Everything else, comments, key order, quoting, blank lines and
//! documents that need nothing, comes out byte for byte as it went in. New
//! entries go before the first entry (init containers) or after the last
//! line (volumes, new keys) of the collection they join; no comment is moved
//! away from the line it annotates. In a JSON document everything added is
//! JSON, pretty-printed like the document when it is.
//!
//! # Idempotent, and upgradable
//!
//! moat owns its init containers and its four volumes, by name. Without
//! `upgrade`, only what is missing is added; one of moat's entries that
//! differs from what the options would write is kept as it is and reported
//! (and so is the redirect step under `--explicit`). With `upgrade`, such
//! entries are replaced (and the sidecar moved first), the redirect step
//! removed under `--explicit` with the probes written back, and nothing
//! else is touched. Either way, an entry that already is what
//! the options write stays byte for byte, so running `moat inject` (with or
//! without `--upgrade`) on its own output changes nothing.
//!
//! Refused, with the document number and line: malformed YAML, `List` kinds,
//! resources with no `metadata.name`, pod specs that use `hostNetwork: true`
//! (the plaintext hop between the app and its sidecar would be on the host's
//! loopback, shared with every host-network pod), an app container named
//! `moat-proxy`, an opt-out annotation that is neither `"true"` nor
//! `"false"`, and pod specs built with aliases or merge keys where the
//! sidecar would go (editing them would change what the alias points at).

mod config;
mod emit;
mod list;
mod probes;
mod report;
mod sidecar;
mod tree;

use emit::{Inline, Style, V, block_entry, block_item};
use list::{Layout, Placement};
use sidecar::{
    Owned, config_maps, init_containers, proxy_config_map, retired_init_containers, volumes,
};
use tree::{Node, parse};

use report::{Change, Document, Item, Outcome, Report, Workload};

/// The sidecar container's name; its presence marks a pod spec as injected.
pub(crate) const SIDECAR_NAME: &str = "moat-proxy";

/// The redirect step's init container (transparent mode).
pub(crate) const REDIRECT_NAME: &str = "moat-redirect";

/// The annotation that keeps `moat inject` away from a workload, on the
/// workload's or the pod template's `metadata.annotations`: `"false"`
/// leaves it alone, `"true"` (or no annotation) injects.
pub(crate) const OPT_OUT_ANNOTATION: &str = "moat.dev/inject";

/// What the injected sidecar looks like, and whether to replace an older one.
#[derive(Debug, Clone)]
pub(crate) struct Options {
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
    /// Replace moat's init container and volumes where they differ from
    /// what these options write (and move the sidecar first); without it,
    /// only what is missing is added.
    pub upgrade: bool,
    /// Transparent mode (the default): the redirect step first among the
    /// init containers, and the app's probes rewritten to the sidecar's
    /// admin port. `false` is explicit mode (`--explicit`): the sidecar
    /// alone, as before transparent mode existed.
    pub transparent: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            image: format!("moat:{}", env!("CARGO_PKG_VERSION")),
            inbound_port: 15443,
            admin_port: 9901,
            audience: "moat-ca".into(),
            bundle_config_map: "moat-bundle".into(),
            upgrade: false,
            transparent: true,
        }
    }
}

/// Why a stream could not be injected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum InjectError {
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

/// The injected stream and what was done to it.
#[derive(Debug)]
pub(crate) struct Injected {
    /// The stream with the sidecar added.
    pub output: String,
    /// What was done, document by document.
    pub report: Report,
}

/// Adds the sidecar to every workload in `input`, as `options` describe it.
pub(crate) fn inject(input: &str, options: &Options) -> Result<Injected, InjectError> {
    let docs = parse(input)?;
    let nl = if input.contains("\r\n") { "\r\n" } else { "\n" };
    let stream = Stream::scan(&docs);
    let mut report = Report {
        config_maps_in_stream: stream
            .config_maps
            .iter()
            .map(|c| (c.namespace.clone(), c.name.clone()))
            .collect(),
        transparent: options.transparent,
        ..Report::default()
    };
    let mut edits = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let ctx = DocCtx {
            text: input,
            doc: i + 1,
            line: doc.start_line(),
            what: String::new(),
            nl,
            json: is_json(doc),
        };
        if let Some(d) = plan_document(doc, ctx, options, &stream, &mut edits)? {
            report.documents.push(d);
        }
    }
    Ok(Injected {
        output: apply(input, edits),
        report,
    })
}

/// Applies `edits` (planned in order, none overlapping) to `input`.
fn apply(input: &str, edits: Vec<Edit>) -> String {
    // Back to front, so earlier offsets stay valid. At one offset, a
    // deletion goes first (it removes text that starts there), then the
    // insertions, the one planned first applied last so it ends up first.
    let mut edits: Vec<(usize, Edit)> = edits.into_iter().enumerate().collect();
    edits.sort_by_key(|(i, e)| std::cmp::Reverse((e.at, e.delete > 0, *i)));
    let mut out = input.to_owned();
    for (_, e) in edits {
        out.replace_range(e.at..e.at + e.delete, &e.insert);
    }
    out
}

/// One splice: at byte `at`, remove `delete` bytes and insert `insert`.
#[derive(Debug)]
struct Edit {
    at: usize,
    delete: usize,
    insert: String,
}

/// Where an error is, for messages, and how the document is written.
#[derive(Clone)]
struct DocCtx<'a> {
    text: &'a str,
    doc: usize,
    line: usize,
    what: String,
    nl: &'static str,
    /// The document is JSON: what is added must be JSON too.
    json: bool,
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
        let mut edit = self.insert_lines_at(at, lines);
        if break_first {
            edit.insert.insert_str(0, self.nl);
        }
        edit
    }

    /// An edit inserting `lines` at `at`, the start of a line.
    fn insert_lines_at(&self, at: usize, lines: &[String]) -> Edit {
        let mut insert = String::new();
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

/// What the injector needs to know about the whole stream.
struct Stream {
    config_maps: Vec<StreamConfigMap>,
}

/// A ConfigMap in the stream.
struct StreamConfigMap {
    namespace: Option<String>,
    name: String,
    /// `data` keys and their text.
    data: Vec<(String, Option<String>)>,
}

impl Stream {
    fn scan(docs: &[Node]) -> Self {
        let config_maps = docs
            .iter()
            .filter(|d| d.get("kind").and_then(Node::as_str) == Some("ConfigMap"))
            .filter_map(|d| {
                let meta = d.get("metadata")?;
                let data = match d.get("data") {
                    Some(Node::Map { entries, .. }) => entries
                        .iter()
                        .filter_map(|(k, v)| {
                            Some((k.as_str()?.to_owned(), v.as_str().map(str::to_owned)))
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Some(StreamConfigMap {
                    namespace: meta.get("namespace").and_then(Node::as_str).map(Into::into),
                    name: meta.get("name").and_then(Node::as_str)?.to_owned(),
                    data,
                })
            })
            .collect();
        Self { config_maps }
    }

    fn config_map(&self, namespace: Option<&str>, name: &str) -> Option<&StreamConfigMap> {
        self.config_maps
            .iter()
            .find(|c| c.namespace.as_deref() == namespace && c.name == name)
    }

    /// The inbound ports the redirect rules of workload `name` take: as its
    /// proxy.toml in the stream says, else the defaults `moat inject`
    /// writes for (every port but the admin and mTLS ports).
    fn redirected_ports(
        &self,
        namespace: Option<&str>,
        name: &str,
        o: &Options,
    ) -> probes::RedirectedPorts {
        let from_config = self
            .config_map(namespace, &proxy_config_map(name))
            .and_then(|cm| cm.data.iter().find(|(k, _)| k == "proxy.toml"))
            .and_then(|(_, toml)| toml.as_deref())
            .and_then(probes::RedirectedPorts::from_proxy_toml);
        from_config.unwrap_or_else(|| probes::RedirectedPorts::defaults(o))
    }

    /// What is wrong with the ConfigMaps in the stream that workload `name`
    /// mounts: a `proxy.toml` unfit for the pod, a bundle without a
    /// certificate (the sidecar would stop at start).
    fn problems(&self, namespace: Option<&str>, name: &str, o: &Options) -> Vec<String> {
        let mut out = Vec::new();
        let text = |cm: &StreamConfigMap, key: &str| {
            cm.data
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone().unwrap_or_default())
        };
        if let Some(cm) = self.config_map(namespace, &proxy_config_map(name)) {
            match text(cm, "proxy.toml") {
                Some(toml) => out.extend(config::problems(&toml, o)),
                None => out.push(format!("ConfigMap {} has no key proxy.toml", cm.name)),
            }
        }
        if let Some(cm) = self.config_map(namespace, &o.bundle_config_map)
            && !text(cm, "bundle.pem")
                .is_some_and(|pem| pem.contains("-----BEGIN CERTIFICATE-----"))
        {
            out.push(format!(
                "ConfigMap {}: bundle.pem holds no certificate, so the sidecar stops at start; \
                 make it from `moat ca bundle` (kubectl create configmap {} --from-file=bundle.pem)",
                cm.name, cm.name
            ));
        }
        out
    }
}

/// A JSON document: a flow mapping whose keys are double-quoted.
fn is_json(doc: &Node) -> bool {
    match doc {
        Node::Map {
            flow: true,
            entries,
            ..
        } => entries.first().is_some_and(|(k, _)| k.is_double_quoted()),
        _ => false,
    }
}

/// One-line JSON without a space after its first key's colon.
fn is_tight(text: &str, doc: &Node) -> bool {
    let Node::Map { entries, .. } = doc else {
        return false;
    };
    entries.first().is_some_and(|(k, _)| {
        text[k.end()..].starts_with(':') && !text[k.end()..].starts_with(": ")
    })
}

/// Where the pod spec lives in each kind that carries one.
fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &["spec"],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template", "spec"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        _ => return None,
    })
}

/// Where an unknown kind keeps a pod spec, if it has one where the
/// built-in workloads do (an Argo `Rollout`, an OpenKruise `CloneSet`, ...).
fn unknown_pod_template(doc: &Node) -> Option<String> {
    let paths: [&[&str]; 2] = [
        &["spec", "template", "spec"],
        &["spec", "jobTemplate", "spec", "template", "spec"],
    ];
    paths.iter().find_map(|path| {
        let spec = path.iter().try_fold(doc, |n, k| n.get(k))?;
        matches!(spec.get("containers"), Some(Node::Seq { .. })).then(|| path.join("."))
    })
}

/// The value of the opt-out annotation on `node`'s `metadata.annotations`
/// (`at`, for messages), if set: `Some(false)` opts out.
fn inject_annotation(node: &Node, ctx: &DocCtx<'_>, at: &str) -> Result<Option<bool>, InjectError> {
    let Some(value) = node
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(OPT_OUT_ANNOTATION))
    else {
        return Ok(None);
    };
    match value.as_str() {
        Some("false") => Ok(Some(false)),
        Some("true") => Ok(Some(true)),
        _ => Err(ctx.refuse(format!(
            "{at}.{OPT_OUT_ANNOTATION} must be \"true\" or \"false\" (\"false\" leaves the workload without the sidecar)"
        ))),
    }
}

fn plan_document(
    doc: &Node,
    mut ctx: DocCtx<'_>,
    o: &Options,
    stream: &Stream,
    edits: &mut Vec<Edit>,
) -> Result<Option<Document>, InjectError> {
    if doc.is_null() {
        return Ok(None); // an empty document, e.g. after a trailing `---`
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
    let meta = |key| {
        doc.get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Node::as_str)
    };
    let name = meta("name");
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
    let mut report = Document {
        doc: ctx.doc,
        line: ctx.line,
        kind: kind.clone(),
        name: name.map(Into::into),
        namespace: meta("namespace").map(Into::into),
        outcome: Outcome::PassedThrough,
    };
    let Some(path) = pod_spec_path(&kind) else {
        // Service, ConfigMap, ...: passed through unchanged.
        if let Some(path) = unknown_pod_template(doc) {
            report.outcome = Outcome::UnknownPodTemplate { path };
        }
        return Ok(Some(report));
    };
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err(ctx.refuse(
            "no metadata.name; it names the ConfigMaps the sidecar mounts (<name>-moat-proxy, <name>-moat-policy)",
        ));
    };
    let root_opt_out = inject_annotation(doc, &ctx, "metadata.annotations")? == Some(false);

    // Down to the pod spec, noting the pod (and job) templates on the way:
    // their annotations may opt out too.
    let mut templates: Vec<(String, &Node)> = Vec::new();
    let mut parent = doc;
    let mut spec = Some(doc);
    for (i, key) in path.iter().enumerate() {
        let Some(node) = spec else { break };
        if i + 1 == path.len() {
            parent = node;
        }
        if matches!(*key, "spec") && i > 0 {
            templates.push((path[..i].join("."), node));
        }
        spec = match node.get(key) {
            Some(n @ Node::Map { .. }) => Some(n),
            Some(Node::Alias { .. }) if !root_opt_out => {
                return Err(ctx.refuse(format!(
                    "{} is an alias; write the pod spec out in full",
                    path.join(".")
                )));
            }
            _ => None,
        };
    }
    let mut opted_out = root_opt_out.then(|| "metadata.annotations".to_owned());
    for (at, template) in &templates {
        let at = format!("{at}.metadata.annotations");
        if inject_annotation(template, &ctx, &at)? == Some(false) && opted_out.is_none() {
            opted_out = Some(at);
        }
    }
    if let Some(at) = opted_out {
        let has_sidecar = spec
            .and_then(|s| s.get("initContainers"))
            .is_some_and(|i| i.names().contains(&SIDECAR_NAME));
        report.outcome = Outcome::OptedOut { at, has_sidecar };
        return Ok(Some(report));
    }
    let Some(spec) = spec else {
        return Err(ctx.refuse(format!("no pod spec at {}", path.join("."))));
    };
    let spec_key_col = parent
        .key(path[path.len() - 1])
        .map_or(0, |k| k.start().col);
    if spec.key("<<").is_some() {
        return Err(ctx.refuse("the pod spec uses a merge key (<<); write it out in full"));
    }
    if matches!(spec.get("hostNetwork"), Some(Node::Scalar { value, .. }) if value.eq_ignore_ascii_case("true"))
    {
        return Err(ctx.refuse(format!(
            "hostNetwork: true; the app's plaintext hop to the sidecar would be on the node's loopback, \
             open to every host-network pod. Run it without hostNetwork to use the sidecar, or annotate \
             it {OPT_OUT_ANNOTATION}: \"false\" to pass it through without one"
        )));
    }
    let Some(containers @ Node::Seq { .. }) = spec.get("containers") else {
        return Err(ctx.refuse("the pod spec has no containers list"));
    };
    let owned_names: &[&str] = if o.transparent {
        &[REDIRECT_NAME, SIDECAR_NAME]
    } else {
        &[SIDECAR_NAME]
    };
    for name in owned_names {
        if containers.names().contains(name) {
            return Err(ctx.refuse(format!(
                "containers already has a container named {name}; moat's containers belong in \
                 initContainers. Remove it and inject again"
            )));
        }
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
    let inline = Inline {
        json: ctx.json,
        pretty: pretty_step(&ctx, spec),
        tight: ctx.json && is_tight(ctx.text, doc),
        nl: ctx.nl,
    };
    let ports = stream.redirected_ports(report.namespace.as_deref(), name, o);
    let probe_plan = probes::plan(
        spec,
        o,
        &ports,
        &probes::Writer {
            ctx: &ctx,
            style: &style,
            inline,
        },
    );
    let desired_init = init_containers(o, &probe_plan.registered);
    let retired = retired_init_containers(o);
    let desired_volumes = volumes(o, name);
    let mut new_keys: Vec<(&'static str, V)> = Vec::new();
    let lists = Lists {
        ctx: &ctx,
        spec,
        style: &style,
        inline,
        upgrade: o.upgrade,
    };
    let containers = lists.reconcile(
        "initContainers",
        &desired_init,
        &retired,
        Placement::Front,
        edits,
        &mut new_keys,
    )?;
    let volumes = lists.reconcile(
        "volumes",
        &desired_volumes,
        &[],
        Placement::Anywhere,
        edits,
        &mut new_keys,
    )?;
    if !new_keys.is_empty() {
        edits.push(lists.new_keys(&new_keys));
    }
    // The probes change with the sidecar that answers them: not when an
    // existing sidecar is kept as it is (no --upgrade).
    let mut probe_warnings = probe_plan.warnings;
    let mut probe_lines = Vec::new();
    let sidecar_kept = containers
        .iter()
        .any(|c| c.name == SIDECAR_NAME && matches!(c.change, Change::Kept { .. }));
    if sidecar_kept && !probe_plan.edits.is_empty() {
        probe_warnings.push(format!(
            "{} app probe(s) not rewritten, because the sidecar that would answer them is kept \
             as it is: --upgrade rewrites both",
            probe_plan.edits.len()
        ));
    } else {
        edits.extend(probe_plan.edits);
        probe_lines = probe_plan.done;
    }

    let config_problems = stream.problems(report.namespace.as_deref(), name, o);
    report.outcome = Outcome::Workload(Workload {
        containers,
        volumes,
        config_maps: config_maps(o, name),
        config_problems,
        probes: probe_lines,
        probe_warnings,
    });
    Ok(Some(report))
}

/// The indentation step of a pretty-printed JSON pod spec (its first key's
/// column less the indentation of the line its `{` is on); `None` when it
/// is not JSON or written on one line.
fn pretty_step(ctx: &DocCtx<'_>, spec: &Node) -> Option<usize> {
    let Node::Map { entries, end, .. } = spec else {
        return None;
    };
    let start = spec.start().byte;
    if !ctx.json || !ctx.text[start..*end].contains('\n') {
        return None;
    }
    let ls = ctx.line_start(start);
    let indent = ctx.text[ls..start].len() - ctx.text[ls..start].trim_start().len();
    let first = entries.first()?.0.start().col;
    Some(first.saturating_sub(indent).clamp(1, 8))
}

/// Puts moat's entries into the pod spec's lists.
struct Lists<'a> {
    ctx: &'a DocCtx<'a>,
    spec: &'a Node,
    style: &'a Style,
    inline: Inline,
    upgrade: bool,
}

impl Lists<'_> {
    /// Plans `key` so that it holds `desired` where `placement` says;
    /// returns what happened to each of moat's entries. A list that does
    /// not exist yet is left in `new_keys`, to be added with the others.
    fn reconcile(
        &self,
        key: &'static str,
        desired: &[Owned],
        retired: &[&str],
        placement: Placement,
        edits: &mut Vec<Edit>,
        new_keys: &mut Vec<(&'static str, V)>,
    ) -> Result<Vec<Item>, InjectError> {
        let ctx = self.ctx;
        match self.spec.get(key) {
            Some(seq @ Node::Seq { items, .. }) if !items.is_empty() => {
                let plan = list::plan(items, desired, retired, placement, self.upgrade);
                let layout = if seq.is_flow() {
                    Layout::Inline(self.inline)
                } else {
                    Layout::Block(self.style)
                };
                edits.extend(list::edits(ctx, key, seq, &plan, &layout)?);
                return Ok(plan.items);
            }
            // `key: []`, `key:` or `key: null`: the value becomes the list.
            Some(v) => {
                let all = V::L(desired.iter().map(|d| d.value.clone()).collect());
                edits.extend(self.replace_empty(key, v, &all));
            }
            None => new_keys.push((key, V::L(desired.iter().map(|d| d.value.clone()).collect()))),
        }
        Ok(desired
            .iter()
            .map(|d| Item {
                name: d.name.to_owned(),
                change: Change::Added,
            })
            .collect())
    }

    /// Edits that replace the empty value `v` of `key` with `list`.
    fn replace_empty(&self, key: &str, v: &Node, list: &V) -> Vec<Edit> {
        let ctx = self.ctx;
        let key_node = self.spec.key(key).expect("key present");
        let (from, to) = match v {
            Node::Seq { start, end, .. } => (start.byte, *end),
            Node::Scalar { start, end, .. } if *end > start.byte => (start.byte, *end),
            // An empty plain scalar: nothing to delete.
            _ => (key_node.end(), key_node.end()),
        };
        if self.spec.is_flow() {
            let inline = self.inline;
            let text = inline.value(list, key_node.start().col);
            let text = if from == to && ctx.text[..from].ends_with(':') {
                format!(" {text}")
            } else {
                text
            };
            return vec![Edit {
                at: from,
                delete: to - from,
                insert: text,
            }];
        }
        let mut out = Vec::new();
        if to > from {
            out.push(Edit {
                at: from,
                delete: to - from,
                insert: String::new(),
            });
        }
        let dash = key_node.start().col + self.style.seq_offset;
        let V::L(items) = list else {
            unreachable!("a list")
        };
        let lines: Vec<String> = items
            .iter()
            .flat_map(|item| block_item(item, dash, self.style.pad, self.style))
            .collect();
        let anchor = if to > from { to } else { key_node.leaf_end() };
        out.push(ctx.insert_lines(anchor, &lines));
        out
    }

    /// The edit that adds `keys` (lists the pod spec did not have) to it.
    fn new_keys(&self, keys: &[(&'static str, V)]) -> Edit {
        let ctx = self.ctx;
        let spec = self.spec;
        if let Node::Map {
            flow: true,
            entries,
            ..
        } = spec
        {
            // After the last value: `{a: 1}` -> `{a: 1, k: [...]}`, and a
            // pretty-printed JSON spec gets one entry a line.
            let (last_key, last_value) = entries.last().expect("the spec has containers");
            let col = last_key.start().col;
            let inline = self.inline;
            let mut insert = String::new();
            for (k, v) in keys {
                insert.push_str(&inline.separator(col));
                insert.push_str(&inline.entry(k, v, col));
            }
            return Edit {
                at: last_value.end(),
                delete: 0,
                insert,
            };
        }
        let lines: Vec<String> = keys
            .iter()
            .flat_map(|(k, v)| block_entry(k, v, self.style.key_col, self.style))
            .collect();
        ctx.insert_lines(spec.leaf_end(), &lines)
    }
}
