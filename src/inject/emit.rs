//! Writing new YAML: values in block style that follow the manifest's own
//! indentation, or in flow style where they join a flow collection.

use std::fmt::Write as _;

use super::tree::{Node, dash_col};

/// A value to insert, kept in the order it is written.
pub(super) enum V {
    S(String),
    N(i64),
    B(bool),
    M(Vec<(&'static str, V)>),
    L(Vec<V>),
}

/// The manifest's own indentation habits, so new lines look like old ones.
pub(super) struct Style {
    /// Column of the pod spec's keys.
    pub(super) key_col: usize,
    /// Spaces a nested mapping is indented by.
    pub(super) step: usize,
    /// Spaces between a key and the `-` of its list items (0 or 2, usually).
    pub(super) seq_offset: usize,
    /// Columns from a `-` to its item's content (2, usually).
    pub(super) pad: usize,
}

impl Style {
    pub(super) fn detect(text: &str, spec: &Node, spec_key_col: usize, containers: &Node) -> Self {
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
pub(super) fn block_entry(key: &str, v: &V, col: usize, s: &Style) -> Vec<String> {
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
pub(super) fn block_item(v: &V, dash: usize, pad: usize, s: &Style) -> Vec<String> {
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
pub(super) fn flow(v: &V) -> String {
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
pub(super) fn scalar(s: &str) -> String {
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

pub(super) fn s(v: &str) -> V {
    V::S(v.to_owned())
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
}
