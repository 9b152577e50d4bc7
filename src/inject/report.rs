//! What `moat inject` did, document by document, for standard error:
//! stdout carries the manifests, so an operator piping them into `kubectl
//! apply` still sees what changed, what was left alone and why, and which
//! ConfigMaps the pods will wait for.

use std::fmt;

use super::OPT_OUT_ANNOTATION;

/// What `moat inject` did with a stream.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// One entry per non-empty document, in stream order.
    pub documents: Vec<Document>,
    /// `(namespace, name)` of every ConfigMap in the stream.
    pub config_maps_in_stream: Vec<(Option<String>, String)>,
    /// Injected in transparent mode (the default) rather than explicit.
    pub transparent: bool,
}

/// One document of the stream.
#[derive(Debug)]
pub(crate) struct Document {
    /// 1-based document number.
    pub doc: usize,
    /// 1-based line where the document's content starts.
    pub line: usize,
    /// `kind`.
    pub kind: String,
    /// `metadata.name`, when set.
    pub name: Option<String>,
    /// `metadata.namespace`, when set.
    pub namespace: Option<String>,
    /// What happened to it.
    pub outcome: Outcome,
}

/// What happened to one document.
#[derive(Debug)]
#[non_exhaustive]
pub(crate) enum Outcome {
    /// No pod template: passed through untouched.
    PassedThrough,
    /// A kind `moat inject` does not know that holds a pod template (an
    /// Argo `Rollout`, say): passed through untouched, with a warning.
    UnknownPodTemplate {
        /// Where the pod spec is, e.g. `spec.template.spec`.
        path: String,
    },
    /// Opted out with the annotation: passed through untouched.
    OptedOut {
        /// Where the annotation is, e.g. `spec.template.metadata.annotations`.
        at: String,
        /// It has a `moat-proxy` init container all the same.
        has_sidecar: bool,
    },
    /// A workload that has the sidecar now.
    Workload(Workload),
}

/// What happened to a workload's pod spec.
#[derive(Debug)]
pub(crate) struct Workload {
    /// moat's init containers (the sidecar), and what happened to each.
    pub containers: Vec<Item>,
    /// moat's volumes, and what happened to each.
    pub volumes: Vec<Item>,
    /// The ConfigMaps the pod mounts for moat: (name, key read).
    pub config_maps: Vec<(String, &'static str)>,
    /// Problems with this workload's proxy.toml, when its ConfigMap is in
    /// the stream.
    pub config_problems: Vec<String>,
    /// The app's kubelet probes rewritten to the sidecar's admin port
    /// (transparent mode) or restored (`--upgrade --explicit`), one line each.
    pub probes: Vec<String>,
    /// Probes that stay as they are and will fail, or could not be handled.
    pub probe_warnings: Vec<String>,
}

/// One of moat's entries in a pod spec list.
#[derive(Debug)]
pub(crate) struct Item {
    /// Its `name`.
    pub name: String,
    /// What happened to it.
    pub change: Change,
}

/// What happened to one of moat's entries.
#[derive(Debug)]
pub(crate) enum Change {
    /// It was missing and was added.
    Added,
    /// It was there, as these flags would write it.
    Unchanged,
    /// `--upgrade` replaced it.
    Replaced {
        /// What differed (`path (found → wanted)`).
        differs: Vec<String>,
        /// It was not where it belongs (the sidecar after other init containers).
        moved: bool,
    },
    /// It differs or is out of place, and was left as it is (no `--upgrade`).
    Kept {
        /// What differs.
        differs: Vec<String>,
        /// It is not where it belongs.
        misplaced: bool,
    },
    /// An entry of moat's that this mode does not use (the redirect step
    /// under `--explicit`), left as it is (no `--upgrade`).
    Unwanted,
    /// `--upgrade` removed an entry of moat's that this mode does not use.
    Removed,
}

/// One line for standard error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Line {
    /// Something the operator should look at (printed even with `--quiet`).
    pub warning: bool,
    /// The text, without a trailing newline.
    pub text: String,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.warning {
            write!(f, "warning: {}", self.text)
        } else {
            f.write_str(&self.text)
        }
    }
}

impl Document {
    fn label(&self) -> String {
        let name = self.name.as_deref().unwrap_or("(no name)");
        match &self.namespace {
            Some(ns) => format!("{}/{name} in {ns}", self.kind),
            None => format!("{}/{name}", self.kind),
        }
    }
}

impl Report {
    /// The report, line by line.
    pub(crate) fn lines(&self) -> Vec<Line> {
        let mut out = Vec::new();
        let info = |text: String| Line {
            warning: false,
            text,
        };
        let warn = |text: String| Line {
            warning: true,
            text,
        };
        for d in &self.documents {
            let label = d.label();
            match &d.outcome {
                Outcome::PassedThrough => {
                    out.push(info(format!("{label}: passed through (no pod template)")));
                }
                Outcome::UnknownPodTemplate { path } => out.push(warn(format!(
                    "{label} (document {}, line {}): holds a pod template at {path}, but moat inject \
                     does not know the kind {}; passed through without the sidecar",
                    d.doc, d.line, d.kind
                ))),
                Outcome::OptedOut { at, has_sidecar } => {
                    out.push(info(format!(
                        "{label}: left alone ({OPT_OUT_ANNOTATION}: \"false\" in {at})"
                    )));
                    if *has_sidecar {
                        out.push(warn(format!(
                            "{label} opts out with {OPT_OUT_ANNOTATION}: \"false\" but has a moat-proxy \
                             init container; remove one or the other"
                        )));
                    }
                }
                Outcome::Workload(w) => workload_lines(&label, w, &mut out),
            }
        }
        self.config_map_lines(&mut out);
        out
    }

    /// Which ConfigMaps the injected pods need, once each, and whether the
    /// stream carries them.
    fn config_map_lines(&self, out: &mut Vec<Line>) {
        let mut needed: Vec<(Option<&str>, &str, &str)> = Vec::new();
        for d in &self.documents {
            if let Outcome::Workload(w) = &d.outcome {
                for (name, key) in &w.config_maps {
                    let entry = (d.namespace.as_deref(), name.as_str(), *key);
                    if !needed.contains(&entry) {
                        needed.push(entry);
                    }
                }
            }
        }
        if needed.is_empty() {
            return;
        }
        out.push(Line {
            warning: false,
            text: "ConfigMaps the injected pods mount (a pod does not start until they exist):"
                .into(),
        });
        for (ns, name, key) in needed {
            let in_stream = self
                .config_maps_in_stream
                .iter()
                .any(|(n, cm)| n.as_deref() == ns && cm == name);
            let whose = match ns {
                Some(ns) => format!("{ns}/{name}"),
                None => name.to_owned(),
            };
            let status = if in_stream {
                "in this stream"
            } else {
                "not in this stream"
            };
            out.push(Line {
                warning: false,
                text: format!("  {whose}, key {key}: {status}"),
            });
        }
        if self.transparent {
            out.push(Line {
                warning: false,
                text: "transparent mode: moat inject adds the moat-redirect init container, the \
                       sidecar and its volumes, and points the app's probes at the sidecar; each \
                       proxy.toml is yours to write, with a [redirect] section (the rules and \
                       the transparent listeners) and an [[inbound]] forwarding to \
                       127.0.0.1:<port> for each app port peers call (--explicit: the sidecar \
                       alone, without redirect rules)"
                    .into(),
            });
        }
    }
}

fn workload_lines(label: &str, w: &Workload, out: &mut Vec<Line>) {
    let mut done = Vec::new();
    let mut warnings = Vec::new();
    for c in &w.containers {
        let what = if c.name == super::SIDECAR_NAME {
            "sidecar".to_owned()
        } else if c.name == super::REDIRECT_NAME {
            format!("redirect step (init container {})", c.name)
        } else {
            format!("init container {}", c.name)
        };
        match &c.change {
            Change::Added if c.name == super::REDIRECT_NAME => {
                done.push(format!("{what} added, ahead of the sidecar"));
            }
            Change::Added => done.push(format!("{what} added, first among the init containers")),
            Change::Unchanged => done.push(format!("{what} already present")),
            Change::Replaced { differs, moved } => {
                let mut why = differs_text(differs);
                if *moved {
                    why.push("moved first among the init containers".into());
                }
                done.push(format!("{what} upgraded ({})", why.join("; ")));
            }
            Change::Kept { differs, misplaced } => {
                let mut why = differs_text(differs);
                if *misplaced {
                    why.push("it is not first among the init containers".into());
                }
                done.push(format!("{what} already present"));
                warnings.push(format!(
                    "{label}: the {what} differs from what these flags make ({}); left as it is: \
                     --upgrade replaces it",
                    why.join("; ")
                ));
            }
            Change::Unwanted => warnings.push(format!(
                "{label}: has the {what}, which explicit mode does not use; left as it is \
                 (the pod stays in transparent mode): --upgrade removes it"
            )),
            Change::Removed => done.push(format!("{what} removed (explicit mode)")),
        }
    }
    let names = |pick: fn(&Change) -> bool| -> Vec<&str> {
        w.volumes
            .iter()
            .filter(|v| pick(&v.change))
            .map(|v| v.name.as_str())
            .collect()
    };
    let added = names(|c| matches!(c, Change::Added));
    if !added.is_empty() {
        done.push(format!("volumes added: {}", added.join(", ")));
    }
    let upgraded = names(|c| matches!(c, Change::Replaced { .. }));
    if !upgraded.is_empty() {
        done.push(format!("volumes upgraded: {}", upgraded.join(", ")));
    }
    for v in &w.volumes {
        if let Change::Kept { differs, .. } = &v.change {
            warnings.push(format!(
                "{label}: kept the existing volume {}, which differs from what moat would add ({}); \
                 --upgrade replaces it",
                v.name,
                differs_text(differs).join("; ")
            ));
        }
    }
    out.push(Line {
        warning: false,
        text: format!("{label}: {}", done.join("; ")),
    });
    for p in &w.probes {
        out.push(Line {
            warning: false,
            text: format!("{label}: {p}"),
        });
    }
    warnings.extend(w.probe_warnings.iter().map(|p| format!("{label}: {p}")));
    for p in &w.config_problems {
        warnings.push(format!("{label}: {p}"));
    }
    out.extend(warnings.into_iter().map(|text| Line {
        warning: true,
        text,
    }));
}

/// At most a few differences, so one line stays readable.
fn differs_text(differs: &[String]) -> Vec<String> {
    const SHOWN: usize = 4;
    let mut out: Vec<String> = differs.iter().take(SHOWN).cloned().collect();
    if differs.len() > SHOWN {
        out.push(format!("and {} more", differs.len() - SHOWN));
    }
    out
}
