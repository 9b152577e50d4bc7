//! The YAML stream as a tree of nodes that remember where they are in the
//! source text, built from `granit-parser` events, so the injector can
//! decide where to insert without re-serializing anything.

use granit_parser::{Event, Marker, Parser, ScalarStyle, StructureStyle};

use super::InjectError;

/// A parsed node with the source positions needed to edit around it.
#[derive(Debug)]
pub(super) enum Node {
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
        end: usize,
    },
}

/// A position: byte offset, 1-based line, 0-based column (in characters).
#[derive(Debug, Clone, Copy)]
pub(super) struct Pos {
    pub(super) byte: usize,
    pub(super) line: usize,
    pub(super) col: usize,
}

impl Node {
    pub(super) fn start(&self) -> Pos {
        match self {
            Node::Scalar { start, .. }
            | Node::Seq { start, .. }
            | Node::Map { start, .. }
            | Node::Alias { start, .. } => *start,
        }
    }

    pub(super) fn start_line(&self) -> usize {
        self.start().line
    }

    /// The value under `key` in a mapping.
    pub(super) fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map { entries, .. } => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The key node for `key` in a mapping.
    pub(super) fn key(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map { entries, .. } => entries
                .iter()
                .map(|(k, _)| k)
                .find(|k| k.as_str() == Some(key)),
            _ => None,
        }
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Node::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// True for an empty or `null`/`~` plain scalar.
    pub(super) fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { value, style: ScalarStyle::Plain, .. }
            if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// `name` of each mapping in a sequence.
    pub(super) fn names(&self) -> Vec<&str> {
        match self {
            Node::Seq { items, .. } => items
                .iter()
                .filter_map(|i| i.get("name")?.as_str())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The byte offset just past this node's own text. For a block
    /// collection that may include the line break and indentation of the
    /// next token; for scalars, aliases and flow collections it is exact.
    pub(super) fn end(&self) -> usize {
        match self {
            Node::Scalar { end, .. }
            | Node::Seq { end, .. }
            | Node::Map { end, .. }
            | Node::Alias { end, .. } => *end,
        }
    }

    /// True for a flow (`{...}` or `[...]`) collection.
    pub(super) fn is_flow(&self) -> bool {
        matches!(
            self,
            Node::Seq { flow: true, .. } | Node::Map { flow: true, .. }
        )
    }

    /// True for a plain (unquoted) scalar.
    pub(super) fn is_plain(&self) -> bool {
        matches!(
            self,
            Node::Scalar {
                style: ScalarStyle::Plain,
                ..
            }
        )
    }

    /// True for a double-quoted scalar (how JSON writes every key).
    pub(super) fn is_double_quoted(&self) -> bool {
        matches!(
            self,
            Node::Scalar {
                style: ScalarStyle::DoubleQuoted,
                ..
            }
        )
    }

    /// The items of a sequence (empty for anything else).
    pub(super) fn items(&self) -> &[Node] {
        match self {
            Node::Seq { items, .. } => items,
            _ => &[],
        }
    }

    /// The byte offset where the source text of this node's last leaf ends.
    pub(super) fn leaf_end(&self) -> usize {
        match self {
            Node::Scalar { end, .. } => *end,
            Node::Alias { end, .. } => *end,
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

pub(super) fn parse(input: &str) -> Result<Vec<Node>, InjectError> {
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
                end: byte_of(&span.end),
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

/// The column of the `-` that introduces the sequence item starting at `byte`.
pub(super) fn dash_col(text: &str, byte: usize) -> Option<usize> {
    let before = &text[..byte];
    let trimmed = before.trim_end_matches(' ');
    if !trimmed.ends_with('-') {
        return None;
    }
    let dash = trimmed.len() - 1;
    let ls = before.rfind('\n').map_or(0, |i| i + 1);
    Some(text[ls..dash].chars().count())
}

/// The byte offset of the start of the line that holds the `-` introducing
/// the block sequence item whose content starts at `byte`, when that line
/// holds nothing before the `-` (so whole lines can be removed or inserted
/// before it). The `-` may be on an earlier line (`-` alone, then the item).
pub(super) fn item_line_start(text: &str, byte: usize) -> Option<usize> {
    let trimmed = text[..byte].trim_end_matches([' ', '\t', '\r', '\n']);
    let dash = trimmed.strip_suffix('-')?.len();
    let ls = text[..dash].rfind('\n').map_or(0, |i| i + 1);
    text[ls..dash]
        .chars()
        .all(|c| c == ' ' || c == '\t')
        .then_some(ls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dash_column_is_found_for_indented_and_indentless_lists() {
        let text = "a:\n  - b: 1\nc:\n- d: 2\n";
        assert_eq!(dash_col(text, text.find("b:").unwrap()), Some(2));
        assert_eq!(dash_col(text, text.find("d:").unwrap()), Some(0));
    }

    #[test]
    fn an_item_line_starts_at_its_dash_line() {
        let text = "a:\n  - b: 1\n  -\n    c: 2\nd: [x]\n";
        assert_eq!(item_line_start(text, text.find("b:").unwrap()), Some(3));
        assert_eq!(
            item_line_start(text, text.find("c:").unwrap()),
            text.find("  -\n")
        );
        assert_eq!(item_line_start(text, text.find('x').unwrap()), None);
    }
}
