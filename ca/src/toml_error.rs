//! Where a TOML file is wrong, said one way for every file moat reads: the
//! CA's `ca.toml`, the proxy's configuration and route policy files.
//!
//! [`TomlError`] turns a `toml` error into `file:line:column: message` (line
//! and column 1-based, the column counted in characters), plus the line it
//! points at for callers that quote it; [`line_col`] locates any other span
//! (the policy compiler's own diagnostics).

use std::fmt;
use std::path::{Path, PathBuf};

/// A TOML error located in its file. Displays as `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlError {
    /// The file the text was read from.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong, as the parser or the schema said it (trimmed).
    pub message: String,
    /// The line the error points at, trimmed; `None` when the error has no
    /// position (a missing top-level field) or the line is blank.
    pub source_line: Option<String>,
}

impl TomlError {
    /// Locates `err`, raised parsing `text` (read from `file`). An error
    /// without a span points at 1:1.
    pub fn new(file: &Path, text: &str, err: &toml::de::Error) -> Self {
        let start = err.span().map_or(0, |span| span.start);
        let (line, column) = line_col(text, start);
        let source_line = err
            .span()
            .and_then(|_| {
                let before = &text[..text.floor_char_boundary(start.min(text.len()))];
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                text[line_start..].lines().next()
            })
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned);
        Self {
            file: file.to_owned(),
            line,
            column,
            message: err.message().trim().to_owned(),
            source_line,
        }
    }
}

/// One step on the way to a value in a TOML document: a key, or an entry
/// of an array (of tables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A key of a table.
    Key(String),
    /// An entry of an array, from 0.
    Index(usize),
}

impl TomlError {
    /// An error found after parsing (a check across fields, on values that
    /// keep no position) about the value at `path`, placed at that value
    /// with its line quoted; `None` when `text` does not hold it (a value
    /// left to its default) or does not parse.
    pub fn at_value(file: &Path, text: &str, path: &[Step], message: &str) -> Option<Self> {
        let offset = value_offset(text, path)?;
        let (line, column) = line_col(text, offset);
        let source_line = text
            .lines()
            .nth(line - 1)
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned);
        Some(Self {
            file: file.to_owned(),
            line,
            column,
            message: message.trim().to_owned(),
            source_line,
        })
    }

    /// As [`TomlError::at_value`], for a message that starts with the
    /// dotted name of the field it is about (`issuance.max_ttl ...`,
    /// `identity.deny_list: ...`).
    pub fn at_named_field(file: &Path, text: &str, message: &str) -> Option<Self> {
        let name = message.split([' ', ':']).next()?;
        if !name.contains('.') {
            return None;
        }
        let path: Vec<Step> = name.split('.').map(|k| Step::Key(k.to_owned())).collect();
        Self::at_value(file, text, &path, message)
    }
}

/// Where the value at `path` starts in `text` (the text parsed again, with
/// positions: for errors only).
fn value_offset(text: &str, path: &[Step]) -> Option<usize> {
    use toml::de::{DeArray, DeTable, DeValue};
    if path.is_empty() {
        return None;
    }
    let root = DeTable::parse(text).ok()?;
    let mut span = root.span();
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    let mut array: Option<&DeArray<'_>> = None;
    for step in path {
        let value = match step {
            Step::Key(k) => table?
                .iter()
                .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                .map(|(_, v)| v)?,
            Step::Index(i) => array?.get(*i)?,
        };
        span = value.span();
        (table, array) = match value.get_ref() {
            DeValue::Table(t) => (Some(t), None),
            DeValue::Array(a) => (None, Some(a)),
            _ => (None, None),
        };
    }
    Some(span.start)
}

impl fmt::Display for TomlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for TomlError {}

/// 1-based line and column (in characters) of a byte offset into `text`.
/// An offset past the end, or inside a character, counts as the character
/// boundary before it.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc\nd", 0), (1, 1));
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("a\nbc\nd", 5), (3, 1));
        assert_eq!(line_col("a\nbc\nd", 99), (3, 2));
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        // "é" is two bytes; the offset of `x` is 4.
        assert_eq!(line_col("a = é x", 7), (1, 7));
        // Inside the "é": the boundary before it.
        assert_eq!(line_col("é", 1), (1, 1));
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Config {
        name: String,
    }

    #[test]
    fn renders_file_line_column_and_quotes_the_line() {
        let text = "name = \"a\"\n  bogus = 1\n";
        let err = toml::from_str::<Config>(text).unwrap_err();
        let e = TomlError::new(Path::new("x.toml"), text, &err);
        assert_eq!((e.line, e.column), (2, 3));
        assert_eq!(e.source_line.as_deref(), Some("bogus = 1"));
        assert!(
            e.to_string()
                .starts_with("x.toml:2:3: unknown field `bogus`"),
            "{e}"
        );
    }

    #[test]
    fn a_value_is_found_by_its_keys() {
        let text = "[a]\nb = 1\n\n[[l]]\nx = 1\n\n[[l]]\nx = 2\n";
        let at = |path: &[Step]| {
            TomlError::at_value(Path::new("x.toml"), text, path, "m").map(|e| (e.line, e.column))
        };
        let key = |k: &str| Step::Key(k.to_owned());
        assert_eq!(at(&[key("a"), key("b")]), Some((2, 5)));
        assert_eq!(at(&[key("l"), Step::Index(1), key("x")]), Some((8, 5)));
        assert_eq!(at(&[key("a"), key("c")]), None);
        let e = TomlError::at_named_field(Path::new("x.toml"), text, "a.b must be 2").unwrap();
        assert_eq!(e.to_string(), "x.toml:2:5: a.b must be 2");
        assert_eq!(e.source_line.as_deref(), Some("b = 1"));
    }

    #[test]
    fn an_error_without_a_position_points_at_the_start() {
        let err = toml::from_str::<Config>("").unwrap_err();
        let e = TomlError::new(Path::new("x.toml"), "", &err);
        assert_eq!((e.line, e.column, e.source_line.as_deref()), (1, 1, None));
        assert_eq!(e.to_string(), "x.toml:1:1: missing field `name`");
    }
}
