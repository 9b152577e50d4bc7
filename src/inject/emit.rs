//! Writing new values: in block style that follows the manifest's own
//! indentation, in flow style where they join a flow collection, or as JSON
//! (one line, or pretty-printed like the document around them) where the
//! document is JSON, so that JSON in is JSON out.

use std::fmt::Write as _;

use super::tree::{Node, dash_col};

/// A value to insert, kept in the order it is written.
#[derive(Clone)]
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

/// How values are written where they join a flow collection.
#[derive(Clone, Copy)]
pub(super) struct Inline {
    /// The document is JSON: every key and string double-quoted.
    pub(super) json: bool,
    /// The indentation step of a pretty-printed JSON document; `None` when
    /// the collections joined are written on one line.
    pub(super) pretty: Option<usize>,
    /// One-line JSON written without spaces (`{"a":1,"b":2}`, as
    /// `JSON.stringify` and `kubectl -o json | jq -c` write it).
    pub(super) tight: bool,
    /// The document's line break.
    pub(super) nl: &'static str,
}

impl Inline {
    /// `v` written where it starts at column `col` (the column its
    /// continuation lines are indented from, when pretty-printed).
    pub(super) fn value(&self, v: &V, col: usize) -> String {
        match (self.json, self.pretty) {
            (true, Some(step)) => {
                let mut out = String::new();
                self.pretty_json(v, col, step, &mut out);
                out
            }
            (true, None) => json_line(v, self.tight),
            (false, _) => flow(v),
        }
    }

    /// `key: value` (or `"key": value`) starting at column `col`.
    pub(super) fn entry(&self, key: &str, v: &V, col: usize) -> String {
        if !self.json {
            return format!("{key}: {}", self.value(v, col));
        }
        let colon = if self.tight && self.pretty.is_none() {
            ":"
        } else {
            ": "
        };
        format!("{}{colon}{}", json_string(key), self.value(v, col))
    }

    /// What goes between two entries: `, ` on one line, or a comma and a
    /// line break indented to `col` when pretty-printed.
    pub(super) fn separator(&self, col: usize) -> String {
        match (self.json, self.pretty) {
            (true, Some(_)) => format!(",{}{}", self.nl, " ".repeat(col)),
            (true, None) if self.tight => ",".into(),
            _ => ", ".into(),
        }
    }

    fn pretty_json(&self, v: &V, col: usize, step: usize, out: &mut String) {
        let open = |out: &mut String, c: char| {
            out.push(c);
        };
        let close = |out: &mut String, c: char| {
            out.push_str(self.nl);
            out.push_str(&" ".repeat(col));
            out.push(c);
        };
        let inner = " ".repeat(col + step);
        match v {
            V::M(m) if !m.is_empty() => {
                open(out, '{');
                for (i, (k, v)) in m.iter().enumerate() {
                    out.push_str(if i == 0 { "" } else { "," });
                    out.push_str(self.nl);
                    out.push_str(&inner);
                    out.push_str(&json_string(k));
                    out.push_str(": ");
                    self.pretty_json(v, col + step, step, out);
                }
                close(out, '}');
            }
            V::L(l) if !l.is_empty() => {
                open(out, '[');
                for (i, v) in l.iter().enumerate() {
                    out.push_str(if i == 0 { "" } else { "," });
                    out.push_str(self.nl);
                    out.push_str(&inner);
                    self.pretty_json(v, col + step, step, out);
                }
                close(out, ']');
            }
            other => out.push_str(&json_line(other, false)),
        }
    }
}

/// A value as JSON on one line, spaced like hand-written JSON
/// (`{"a": 1, "b": [2]}`), or `tight`ly (`{"a":1,"b":[2]}`).
pub(super) fn json_line(v: &V, tight: bool) -> String {
    let (colon, comma) = if tight { (":", ",") } else { (": ", ", ") };
    match v {
        V::S(s) => json_string(s),
        V::N(n) => n.to_string(),
        V::B(b) => b.to_string(),
        V::M(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}{colon}{}", json_string(k), json_line(v, tight)))
                .collect();
            format!("{{{}}}", parts.join(comma))
        }
        V::L(l) => {
            let parts: Vec<String> = l.iter().map(|v| json_line(v, tight)).collect();
            format!("[{}]", parts.join(comma))
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
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

    #[test]
    fn json_is_written_on_one_line_or_pretty_printed() {
        let v = V::M(vec![
            ("name", s("moat-proxy")),
            ("args", V::L(vec![s("--config"), s("a\"b")])),
            ("empty", V::L(vec![])),
            ("n", V::N(1)),
            ("b", V::B(true)),
        ]);
        assert_eq!(
            json_line(&v, false),
            r#"{"name": "moat-proxy", "args": ["--config", "a\"b"], "empty": [], "n": 1, "b": true}"#
        );
        assert_eq!(
            json_line(&v, true),
            r#"{"name":"moat-proxy","args":["--config","a\"b"],"empty":[],"n":1,"b":true}"#
        );
        let pretty = Inline {
            json: true,
            pretty: Some(2),
            tight: false,
            nl: "\n",
        };
        let text = pretty.value(&v, 4);
        assert_eq!(
            text,
            "{\n      \"name\": \"moat-proxy\",\n      \"args\": [\n        \"--config\",\n        \"a\\\"b\"\n      ],\n      \"empty\": [],\n      \"n\": 1,\n      \"b\": true\n    }"
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["args"][1], "a\"b");
    }
}
