//! Request path normalization: the one form in which paths are matched and
//! forwarded.
//!
//! A path is normalized once, before any route is consulted, and the service
//! receives exactly the normalized path, so a route can never be matched on
//! one spelling of a path while the service acts on another.
//!
//! Rules, in order:
//! - the query (from the first `?`) is split off and kept as is;
//! - the path must start with `/` and hold only visible ASCII; `\`, `;`, `#`
//!   and control characters are refused;
//! - `%XX` escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded; other escapes are kept, with uppercase hex; `%2F` (`/`), `%5C`
//!   (`\`), `%00`–`%1F`, `%7F` and malformed escapes are refused;
//! - empty segments (`//`) are dropped, `.` segments removed, `..` removes the
//!   segment before it; `..` above the root is refused;
//! - a trailing `/` is kept (`/a/` and `/a` are different paths).
//!
//! Refused paths are answered with 400 before any route is consulted.

use std::borrow::Cow;

/// The longest request path (without query) accepted, in bytes.
pub const MAX_PATH_LEN: usize = 8192;

/// Why a request path was refused (answered 400 `bad_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/` (asterisk-form or empty).
    #[error("the path does not start with '/'")]
    NotAbsolute,
    /// The path is longer than [`MAX_PATH_LEN`].
    #[error("the path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    /// An encoded slash (`%2F`) could split a segment differently at the service.
    #[error("the path holds an encoded slash (%2F)")]
    EncodedSlash,
    /// A backslash, raw or encoded, is a separator for some servers.
    #[error("the path holds a backslash")]
    Backslash,
    /// `;` starts path parameters that some servers strip before routing.
    #[error("the path holds ';' (path parameters are not accepted)")]
    Semicolon,
    /// A control character, space, non-ASCII byte or `#`, raw or encoded.
    #[error("the path holds a control, space, '#' or non-ASCII character")]
    BadChar,
    /// A `%` not followed by two hex digits.
    #[error("the path holds a malformed percent escape")]
    BadEscape,
    /// `..` climbs above the root.
    #[error("the path climbs above the root with '..'")]
    AboveRoot,
}

/// A raw request path (possibly with `?query`) split into its normalized
/// path and its untouched query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath<'a> {
    /// The normalized path; borrowed when the raw path was already normal.
    pub path: Cow<'a, str>,
    /// The query after `?`, without the `?`, untouched.
    pub query: Option<&'a str>,
}

impl NormalizedPath<'_> {
    /// The path and query to forward to the service.
    pub fn path_and_query(&self) -> Cow<'_, str> {
        match self.query {
            None => Cow::Borrowed(&self.path),
            Some(q) => Cow::Owned(format!("{}?{}", self.path, q)),
        }
    }
}

/// Normalizes a raw request path (possibly with a query). See the module
/// documentation for the rules. Allocates only when the path changes.
pub fn normalize(raw: &str) -> Result<NormalizedPath<'_>, PathError> {
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    let bytes = path.as_bytes();
    // First pass: validate characters and escapes, and find out whether
    // anything needs rewriting at all (the common case is a normal path).
    let mut needs_rewrite = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let decoded = escape_at(bytes, i)?;
                check_decoded(decoded)?;
                if is_unreserved(decoded)
                    || bytes[i + 1].is_ascii_lowercase()
                    || bytes[i + 2].is_ascii_lowercase()
                {
                    needs_rewrite = true;
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::Semicolon),
            b'#' => return Err(PathError::BadChar),
            0x21..=0x7e => {}
            _ => return Err(PathError::BadChar),
        }
        if b == b'/' {
            let rest = &bytes[i + 1..];
            let segment = &rest[..rest.iter().position(|&c| c == b'/').unwrap_or(rest.len())];
            // `//` (an empty segment before another `/`), `.` or `..`.
            if (segment.is_empty() && !rest.is_empty()) || segment == b"." || segment == b".." {
                needs_rewrite = true;
            }
        }
        i += 1;
    }
    if !needs_rewrite {
        return Ok(NormalizedPath {
            path: Cow::Borrowed(path),
            query,
        });
    }
    let decoded = decode_unreserved(path)?;
    Ok(NormalizedPath {
        path: Cow::Owned(remove_dot_segments(&decoded)?),
        query,
    })
}

/// True when `path` is already in normal form (what route paths in a policy
/// file must be).
pub fn is_normal(path: &str) -> bool {
    !path.contains('?')
        && matches!(
            normalize(path),
            Ok(NormalizedPath {
                path: Cow::Borrowed(_),
                ..
            })
        )
}

/// The byte a `%XX` escape at `i` stands for.
fn escape_at(bytes: &[u8], i: usize) -> Result<u8, PathError> {
    let hex = |b: u8| -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    };
    let hi = bytes
        .get(i + 1)
        .copied()
        .and_then(hex)
        .ok_or(PathError::BadEscape)?;
    let lo = bytes
        .get(i + 2)
        .copied()
        .and_then(hex)
        .ok_or(PathError::BadEscape)?;
    Ok(hi << 4 | lo)
}

fn check_decoded(b: u8) -> Result<(), PathError> {
    match b {
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::Backslash),
        0x00..=0x1f | 0x7f => Err(PathError::BadChar),
        _ => Ok(()),
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters and uppercases the hex of the
/// others. The input has been validated by [`normalize`].
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let b = escape_at(bytes, i)?;
            if is_unreserved(b) {
                out.push(b as char);
            } else {
                out.push('%');
                out.push(bytes[i + 1].to_ascii_uppercase() as char);
                out.push(bytes[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    Ok(out)
}

/// Drops empty and `.` segments and resolves `..`, keeping a trailing slash.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path[1..].split('/') {
        trailing_slash = false;
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_table() {
        let ok: &[(&str, &str, Option<&str>)] = &[
            ("/", "/", None),
            ("/a/b", "/a/b", None),
            ("/a/b/", "/a/b/", None),
            ("/a//b", "/a/b", None),
            ("//a///b//", "/a/b/", None),
            ("/a/./b", "/a/b", None),
            ("/a/b/.", "/a/b/", None),
            ("/a/b/..", "/a/", None),
            ("/a/../b", "/b", None),
            ("/a/b/../../c", "/c", None),
            ("/a/%2e%2e/b", "/b", None),
            ("/a/%2E%2E/b", "/b", None),
            ("/a/%2e/b", "/a/b", None),
            ("/a/.%2e/b", "/b", None),
            ("/%61dmin", "/admin", None),
            ("/a%7eb", "/a~b", None),
            ("/a%20b", "/a%20b", None),
            ("/a%3ab", "/a%3Ab", None),
            ("/a%25b", "/a%25b", None),
            ("/A/B", "/A/B", None),
            ("/a/..b/c", "/a/..b/c", None),
            ("/a/.b", "/a/.b", None),
            ("/a/b?x=1&y=/../", "/a/b", Some("x=1&y=/../")),
            ("/a/../b?", "/b", Some("")),
        ];
        for (raw, want, query) in ok {
            let got = normalize(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(got.path, *want, "{raw}");
            assert_eq!(got.query, *query, "{raw}");
        }
        let bad: &[(&str, PathError)] = &[
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("a/b", PathError::NotAbsolute),
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a\\b", PathError::Backslash),
            ("/a%5cb", PathError::Backslash),
            ("/a;b", PathError::Semicolon),
            ("/a/..;/b", PathError::Semicolon),
            ("/a#b", PathError::BadChar),
            ("/a b", PathError::BadChar),
            ("/a%00", PathError::BadChar),
            ("/a%0d%0a", PathError::BadChar),
            ("/a\u{e9}", PathError::BadChar),
            ("/a%", PathError::BadEscape),
            ("/a%2", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/..", PathError::AboveRoot),
            ("/a/../..", PathError::AboveRoot),
            ("/%2e%2e/etc", PathError::AboveRoot),
        ];
        for (raw, want) in bad {
            assert_eq!(normalize(raw), Err(*want), "{raw:?}");
        }
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert_eq!(normalize(&long), Err(PathError::TooLong));
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/healthz", "/a/b/", "/a%20b", "/a/..b"] {
            assert!(
                matches!(normalize(p).unwrap().path, Cow::Borrowed(_)),
                "{p}"
            );
            assert!(is_normal(p), "{p}");
        }
        for p in ["//a", "/a/./b", "/%61", "/a%3a", "/a?x"] {
            assert!(!is_normal(p), "{p}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for raw in ["/a/%2e%2e/b/./c//d/", "/x/%7e/%41", "/a/b/../c?q=1"] {
            let once = normalize(raw).unwrap();
            let twice = normalize(&once.path).unwrap();
            assert_eq!(once.path, twice.path, "{raw}");
        }
    }

    /// The fuzz target's invariants (fuzz/fuzz_targets/path_normalize.rs)
    /// over random strings from an alphabet of the characters that matter.
    #[test]
    fn random_paths_keep_the_normal_form_invariants() {
        use rand::Rng;
        const ALPHABET: &[&str] = &[
            "/", "/", ".", ".", "%", "2", "e", "E", "f", "F", "5", "c", "a", "%2e", "%2F", "%5C",
            "..", "\\", ";", "?", "#", "~", "%41", "%7e", "%25", " ",
        ];
        let mut rng = rand::rng();
        for _ in 0..50_000 {
            let len = rng.random_range(0..12);
            let mut raw = String::from("/");
            for _ in 0..len {
                raw.push_str(ALPHABET[rng.random_range(0..ALPHABET.len())]);
            }
            let Ok(n) = normalize(&raw) else { continue };
            let p: &str = &n.path;
            assert!(p.starts_with('/') && !p.contains("//"), "{raw:?} -> {p:?}");
            assert!(!p.contains(['\\', ';', '?', '#', ' ']), "{raw:?} -> {p:?}");
            let lower = p.to_ascii_lowercase();
            assert!(
                !lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"),
                "{raw:?} -> {p:?}"
            );
            assert!(
                p.split('/').all(|s| s != "." && s != ".."),
                "{raw:?} -> {p:?}"
            );
            assert_eq!(
                normalize(p).expect("normal paths are accepted").path,
                p,
                "{raw:?}"
            );
        }
    }

    #[test]
    fn forwarded_path_keeps_the_query() {
        let n = normalize("/a/../b?x=%2F").unwrap();
        assert_eq!(n.path_and_query(), "/b?x=%2F");
    }
}
