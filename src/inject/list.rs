//! Putting moat's entries into a pod spec list (`initContainers`,
//! `volumes`) that already exists: what to keep, add, replace or move, and
//! the text edits that do it without touching the other entries.
//!
//! The plan is a list of slots, the list as it should be: an existing entry
//! kept as written, or a new one. The slots keep the existing entries in
//! their order, so the edits are deletions of whole entries and insertions
//! of new ones between the entries that stay.

use super::emit::{Inline, Style, V, block_item};
use super::report::{Change, Item};
use super::sidecar::Owned;
use super::tree::{Node, dash_col, item_line_start};
use super::{DocCtx, Edit, InjectError};

/// Where moat's entries belong in the list.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    /// First, in the order given (init containers: the sidecar must be up
    /// before the other init containers run, so that they can use it).
    Front,
    /// Anywhere; new ones go last (volumes).
    Anywhere,
}

/// One entry of the list as it should be.
#[derive(Clone, Copy)]
enum Slot<'a> {
    /// The existing entry at this index, as it is written.
    Keep(usize),
    /// A new entry.
    New(&'a V),
}

/// What to do with one list.
pub(super) struct ListPlan<'a> {
    slots: Vec<Slot<'a>>,
    /// What happened to each of moat's entries.
    pub(super) items: Vec<Item>,
}

impl ListPlan<'_> {
    /// True when the list stays as it is.
    fn unchanged(&self, len: usize) -> bool {
        self.slots.len() == len
            && self
                .slots
                .iter()
                .enumerate()
                .all(|(i, s)| matches!(s, Slot::Keep(k) if *k == i))
    }
}

/// Decides the list `existing` should become, given moat's `desired`
/// entries. Without `upgrade`, only missing entries are added; an entry of
/// moat's that differs or is out of place is kept and reported. With
/// `upgrade`, such entries are replaced (and moved into place); entries
/// that already are what moat would write stay byte for byte.
///
/// `retired` names entries moat owned in another mode and no longer wants
/// (the redirect step under `--explicit`): `upgrade` removes them, and
/// without it they are kept and reported.
pub(super) fn plan<'a>(
    existing: &[Node],
    desired: &'a [Owned],
    retired: &[&str],
    placement: Placement,
    upgrade: bool,
) -> ListPlan<'a> {
    let name_of = |n: &Node| n.get("name").and_then(Node::as_str).map(str::to_owned);
    let owned: Vec<Option<usize>> = existing
        .iter()
        .map(|n| name_of(n).and_then(|name| desired.iter().position(|d| d.name == name)))
        .collect();
    let unwanted: Vec<Option<&str>> = existing
        .iter()
        .map(|n| name_of(n).and_then(|name| retired.iter().find(|r| **r == name).copied()))
        .collect();
    // The first occurrence of each desired name (Kubernetes refuses two).
    let found: Vec<Option<usize>> = (0..desired.len())
        .map(|d| owned.iter().position(|o| *o == Some(d)))
        .collect();
    // A retired entry of moat's is not someone else's: it does not make
    // the sidecar behind it "out of place".
    let first_foreign = (0..existing.len())
        .find(|j| owned[*j].is_none() && unwanted[*j].is_none())
        .unwrap_or(existing.len());

    let mut slots = Vec::new();
    let mut items = Vec::new();
    let item = |d: &Owned, change| Item {
        name: d.name.to_owned(),
        change,
    };
    match (placement, upgrade) {
        (Placement::Front, false) => {
            for (d, at) in desired.iter().zip(&found) {
                match at {
                    None => {
                        slots.push(Slot::New(&d.value));
                        items.push(item(d, Change::Added));
                    }
                    Some(j) => {
                        let differs = owned_differences(&existing[*j], d);
                        let misplaced = *j >= first_foreign;
                        items.push(item(
                            d,
                            if differs.is_empty() && !misplaced {
                                Change::Unchanged
                            } else {
                                Change::Kept { differs, misplaced }
                            },
                        ));
                    }
                }
            }
            slots.extend((0..existing.len()).map(Slot::Keep));
            for name in unwanted.iter().flatten() {
                items.push(Item {
                    name: (*name).to_owned(),
                    change: Change::Unwanted,
                });
            }
        }
        (Placement::Front, true) => {
            let mut last_kept = None;
            for (d, at) in desired.iter().zip(&found) {
                match at {
                    None => {
                        slots.push(Slot::New(&d.value));
                        items.push(item(d, Change::Added));
                    }
                    Some(j) => {
                        let differs = owned_differences(&existing[*j], d);
                        let in_place = *j < first_foreign && last_kept.is_none_or(|k| k < *j);
                        if differs.is_empty() && in_place {
                            slots.push(Slot::Keep(*j));
                            last_kept = Some(*j);
                            items.push(item(d, Change::Unchanged));
                        } else {
                            slots.push(Slot::New(&d.value));
                            items.push(item(
                                d,
                                Change::Replaced {
                                    differs,
                                    moved: !in_place,
                                },
                            ));
                        }
                    }
                }
            }
            // Every other entry of moat's (duplicates, replaced ones,
            // retired ones) goes.
            slots.extend(
                (0..existing.len())
                    .filter(|j| owned[*j].is_none() && unwanted[*j].is_none())
                    .map(Slot::Keep),
            );
            for name in unwanted.iter().flatten() {
                items.push(Item {
                    name: (*name).to_owned(),
                    change: Change::Removed,
                });
            }
        }
        (Placement::Anywhere, upgrade) => {
            for (j, node) in existing.iter().enumerate() {
                let Some(d) = owned[j] else {
                    slots.push(Slot::Keep(j));
                    continue;
                };
                if found[d] != Some(j) {
                    // A second entry of that name: Kubernetes refuses the
                    // pod anyway; --upgrade drops it.
                    if !upgrade {
                        slots.push(Slot::Keep(j));
                    }
                    continue;
                }
                let differs = owned_differences(node, &desired[d]);
                if differs.is_empty() {
                    slots.push(Slot::Keep(j));
                    items.push(item(&desired[d], Change::Unchanged));
                } else if upgrade {
                    slots.push(Slot::New(&desired[d].value));
                    items.push(item(
                        &desired[d],
                        Change::Replaced {
                            differs,
                            moved: false,
                        },
                    ));
                } else {
                    slots.push(Slot::Keep(j));
                    items.push(item(
                        &desired[d],
                        Change::Kept {
                            differs,
                            misplaced: false,
                        },
                    ));
                }
            }
            for (d, at) in desired.iter().zip(&found) {
                if at.is_none() {
                    slots.push(Slot::New(&d.value));
                    items.push(item(d, Change::Added));
                }
            }
        }
    }
    ListPlan { slots, items }
}

/// How new entries are written into a list.
pub(super) enum Layout<'s> {
    /// A block list; the manifest's indentation.
    Block(&'s Style),
    /// A flow list (`[...]`), YAML or JSON.
    Inline(Inline),
}

/// The edits that turn the non-empty list `seq` into what `plan` says.
pub(super) fn edits(
    ctx: &DocCtx<'_>,
    key: &str,
    seq: &Node,
    plan: &ListPlan<'_>,
    layout: &Layout<'_>,
) -> Result<Vec<Edit>, InjectError> {
    let existing = seq.items();
    if plan.unchanged(existing.len()) {
        return Ok(Vec::new());
    }
    match layout {
        Layout::Block(style) => block_edits(ctx, key, existing, plan, style),
        Layout::Inline(inline) => Ok(vec![flow_edit(ctx, seq, plan, inline)]),
    }
}

fn block_edits(
    ctx: &DocCtx<'_>,
    key: &str,
    existing: &[Node],
    plan: &ListPlan<'_>,
    style: &Style,
) -> Result<Vec<Edit>, InjectError> {
    let line_of = |j: usize| {
        item_line_start(ctx.text, existing[j].start().byte).ok_or_else(|| {
            ctx.refuse(format!(
                "{key}: entry {} does not start a line of its own with `-`; write the list one `- ` entry a line",
                j + 1
            ))
        })
    };
    // New entries look like the first existing one.
    let first = existing[0].start();
    let dash = dash_col(ctx.text, first.byte).unwrap_or(first.col.saturating_sub(2));
    let pad = first.col.saturating_sub(dash).max(2);
    let lines = |values: &[&V]| -> Vec<String> {
        values
            .iter()
            .flat_map(|v| block_item(v, dash, pad, style))
            .collect()
    };
    let mut out = Vec::new();
    let mut pending: Vec<&V> = Vec::new();
    let mut next = 0;
    let delete = |j: usize, out: &mut Vec<Edit>| -> Result<(), InjectError> {
        let from = line_of(j)?;
        let (to, _) = ctx.after_line(existing[j].leaf_end());
        out.push(Edit {
            at: from,
            delete: to - from,
            insert: String::new(),
        });
        Ok(())
    };
    for slot in &plan.slots {
        match *slot {
            Slot::New(v) => pending.push(v),
            Slot::Keep(k) => {
                for j in next..k {
                    delete(j, &mut out)?;
                }
                if !pending.is_empty() {
                    out.push(ctx.insert_lines_at(line_of(k)?, &lines(&pending)));
                    pending.clear();
                }
                next = k + 1;
            }
        }
    }
    for j in next..existing.len() {
        delete(j, &mut out)?;
    }
    if !pending.is_empty() {
        let last = existing.last().expect("a non-empty list");
        out.push(ctx.insert_lines(last.leaf_end(), &lines(&pending)));
    }
    Ok(out)
}

/// A flow list is rewritten between its first and last entries: the
/// entries kept come out as they were written, joined by the list's own
/// separator.
fn flow_edit(ctx: &DocCtx<'_>, seq: &Node, plan: &ListPlan<'_>, inline: &Inline) -> Edit {
    let existing = seq.items();
    let first = &existing[0];
    let last = existing.last().expect("a non-empty list");
    let multiline = ctx.text[seq.start().byte..seq.end()].contains('\n');
    let inline = Inline {
        pretty: inline.pretty.filter(|_| multiline),
        ..*inline
    };
    let col = first.start().col;
    let sep = match existing.get(1) {
        Some(second) => ctx.text[first.end()..second.start().byte].to_owned(),
        None => inline.separator(col),
    };
    let mut insert = String::new();
    let mut previous = None;
    for slot in &plan.slots {
        match (previous, *slot) {
            (None, _) => {}
            // Two entries that were neighbours keep what was between them.
            (Some(Slot::Keep(a)), Slot::Keep(b)) if b == a + 1 => {
                insert.push_str(&ctx.text[existing[a].end()..existing[b].start().byte]);
            }
            _ => insert.push_str(&sep),
        }
        match *slot {
            Slot::Keep(k) => {
                insert.push_str(&ctx.text[existing[k].start().byte..existing[k].end()]);
            }
            Slot::New(v) => insert.push_str(&inline.value(v, col)),
        }
        previous = Some(*slot);
    }
    Edit {
        at: first.start().byte,
        delete: last.end() - first.start().byte,
        insert,
    }
}

/// Where `node`, an existing entry of moat's, differs from what `d` says.
fn owned_differences(node: &Node, d: &Owned) -> Vec<String> {
    let mut out = differences(node, &d.value);
    if let Some(stale) = d.stale {
        out.extend(stale(node));
    }
    out
}

/// Where `node` differs from `want`, as `path (found → wanted)`; empty when
/// everything moat sets is there with moat's value. Keys moat does not set
/// (defaults an API server adds, say `terminationMessagePath`) are not
/// differences.
pub(super) fn differences(node: &Node, want: &V) -> Vec<String> {
    let mut out = Vec::new();
    diff_into(node, want, "", &mut out);
    out
}

fn diff_into(node: &Node, want: &V, path: &str, out: &mut Vec<String>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match (want, node) {
        (V::M(entries), Node::Map { .. }) => {
            for (k, v) in entries {
                match node.get(k) {
                    Some(n) => diff_into(n, v, &join(k), out),
                    None => out.push(format!("{} (missing)", join(k))),
                }
            }
        }
        (V::L(items), Node::Seq { items: found, .. }) if items.len() == found.len() => {
            for (i, (v, n)) in items.iter().zip(found).enumerate() {
                diff_into(n, v, &format!("{path}[{i}]"), out);
            }
        }
        (V::L(_) | V::M(_), _) => out.push(format!("{path} (not what moat writes)")),
        (scalar, Node::Scalar { .. }) if scalar_matches(node, scalar) => {}
        (scalar, _) => out.push(format!(
            "{path} ({} → {})",
            node.as_str().unwrap_or("…"),
            super::emit::flow(scalar)
        )),
    }
}

/// A scalar node holds the value `want` (as Kubernetes reads it: a number
/// or boolean written plain, a string however quoted).
fn scalar_matches(node: &Node, want: &V) -> bool {
    let Some(found) = node.as_str() else {
        return false;
    };
    match want {
        V::S(s) => found == s,
        V::N(n) => node.is_plain() && found.parse::<i64>().is_ok_and(|f| f == *n),
        V::B(b) => node.is_plain() && found == b.to_string(),
        V::M(_) | V::L(_) => false,
    }
}
