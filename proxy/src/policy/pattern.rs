//! Route path patterns: literal segments, single-segment wildcards, and a
//! trailing `/*`.
//!
//! - `/a/b` matches exactly `/a/b` (`/a/b/` is another path);
//! - `/a/*` matches `/a` and everything under `/a/`; `/*` matches every path;
//! - `*` as a segment anywhere but last, or `{name}` as any segment, matches
//!   exactly one non-empty segment: `/v1/orders/*/refund` and
//!   `/v1/orders/{id}/refund` are the same pattern, and `/v1/orders/{id}`
//!   matches `/v1/orders/7` but not `/v1/orders` nor `/v1/orders/7/lines`.
//!
//! A wildcard is a whole segment (`/order-{id}` and `/a*` are refused), and
//! the literal parts must be in normal form (requests are matched after
//! normalization, see [`super::path`]).
//!
//! Two patterns are compared by the sets of paths they match: one is *more
//! specific* than another when it matches a strict subset of its paths (a
//! literal segment is more specific than a wildcard; `/a/b/*` than `/a/*`;
//! `/a/{id}` than `/a/*`). The policy compiler uses [`PathPattern::covers`]
//! and [`PathPattern::overlap`] to insist that the file order agrees.

use std::fmt;

/// A compiled route path.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PathPattern {
    /// As written in the policy file (for messages and `explain`).
    text: String,
    /// The segments after the leading `/` (`/` is one empty segment, `/a/`
    /// is `a` and an empty one); empty for `/*`.
    segments: Vec<Segment>,
    /// A trailing `/*`: the path and everything under it.
    prefix: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*` (not last) or `{name}`: one non-empty segment.
    Any,
}

/// Why a route path was refused (the compiler adds the file position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PatternError {
    /// Not starting with `/`.
    NotAbsolute,
    /// `*` or `{...}` inside a segment, or `**`.
    PartialWildcard(String),
    /// `{name}` with a name that is not `[A-Za-z_][A-Za-z0-9_]*`.
    BadName(String),
    /// The same `{name}` twice.
    DuplicateName(String),
    /// `//` before the trailing `/*`.
    EmptyBeforePrefix,
    /// Refused by normalization (would never match a request).
    Refused(super::path::PathError),
    /// Not in normal form; the normal form is given.
    NotNormal(String),
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAbsolute => f.write_str("must start with '/'"),
            Self::PartialWildcard(seg) => write!(
                f,
                "has a wildcard inside the segment {seg:?}: a wildcard is a whole segment (\"*\" or \"{{name}}\" between slashes, or a trailing \"/*\")"
            ),
            Self::BadName(name) => write!(
                f,
                "names a segment {{{name}}}: a segment name is letters, digits and '_', not starting with a digit"
            ),
            Self::DuplicateName(name) => write!(f, "uses {{{name}}} twice"),
            Self::EmptyBeforePrefix => f.write_str("has an empty segment before \"/*\""),
            Self::Refused(e) => write!(f, "would never match a request: {e}"),
            Self::NotNormal(normal) => write!(
                f,
                "is not in normal form and would never match; write {normal:?} (requests are matched after normalization)"
            ),
        }
    }
}

impl PathPattern {
    /// Parses a route's `path`.
    pub(crate) fn parse(text: &str) -> Result<Self, PatternError> {
        if !text.starts_with('/') {
            return Err(PatternError::NotAbsolute);
        }
        let (base, prefix) = match text.strip_suffix("/*") {
            Some(base) => (base, true),
            None => (text, false),
        };
        if prefix && base.ends_with('/') {
            return Err(PatternError::EmptyBeforePrefix);
        }
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        // The literal skeleton, with wildcards as `x`, for the normal-form check.
        let mut skeleton = String::with_capacity(base.len());
        if !base.is_empty() {
            let raw: Vec<&str> = base[1..].split('/').collect();
            for (i, seg) in raw.iter().enumerate() {
                let last = i + 1 == raw.len();
                // `*` is one segment unless it ends the pattern (then it is
                // the trailing "everything under", split off above).
                let segment = if *seg == "*" && (!last || prefix) {
                    Segment::Any
                } else if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    let valid = name
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        return Err(PatternError::BadName(name.to_owned()));
                    }
                    if names.contains(&name) {
                        return Err(PatternError::DuplicateName(name.to_owned()));
                    }
                    names.push(name);
                    Segment::Any
                } else if seg.contains(['*', '{', '}']) {
                    return Err(PatternError::PartialWildcard((*seg).to_owned()));
                } else {
                    Segment::Literal((*seg).to_owned())
                };
                skeleton.push('/');
                skeleton.push_str(match &segment {
                    Segment::Any => "x",
                    Segment::Literal(s) => s,
                });
                segments.push(segment);
            }
        }
        if prefix {
            skeleton.push('/');
        }
        match super::path::normalize(&skeleton) {
            Err(e) => return Err(PatternError::Refused(e)),
            Ok(n) if n.path != skeleton || n.query.is_some() => {
                return Err(PatternError::NotNormal(n.path.into_owned()));
            }
            Ok(_) => {}
        }
        Ok(Self {
            text: text.to_owned(),
            segments,
            prefix,
        })
    }

    /// The pattern as written.
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal first segment, or `None` when any first segment may
    /// match (`/*`, `/*/x`, `/{tenant}/...`): the route index's key.
    pub(crate) fn first_literal(&self) -> Option<&str> {
        match self.segments.first() {
            Some(Segment::Literal(s)) => Some(s),
            _ => None,
        }
    }

    /// Does the normalized `path` match? No allocation.
    pub(crate) fn matches(&self, path: &str) -> bool {
        let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
        for segment in &self.segments {
            let Some(part) = parts.next() else {
                return false;
            };
            let ok = match segment {
                Segment::Literal(lit) => lit == part,
                Segment::Any => !part.is_empty(),
            };
            if !ok {
                return false;
            }
        }
        parts.next().is_none() || self.prefix
    }

    /// True when every path `other` matches, this one matches too.
    pub(crate) fn covers(&self, other: &PathPattern) -> bool {
        let seg_covers = |mine: &Segment, theirs: &Segment| match (mine, theirs) {
            (Segment::Any, Segment::Literal(s)) => !s.is_empty(),
            (Segment::Any, Segment::Any) => true,
            (Segment::Literal(a), Segment::Literal(b)) => a == b,
            (Segment::Literal(_), Segment::Any) => false,
        };
        if self.prefix {
            other.segments.len() >= self.segments.len()
                && self
                    .segments
                    .iter()
                    .zip(&other.segments)
                    .all(|(m, t)| seg_covers(m, t))
        } else {
            !other.prefix
                && other.segments.len() == self.segments.len()
                && self
                    .segments
                    .iter()
                    .zip(&other.segments)
                    .all(|(m, t)| seg_covers(m, t))
        }
    }

    /// A path both patterns match, if there is one.
    pub(crate) fn overlap(&self, other: &PathPattern) -> Option<String> {
        let (a, b) = (&self.segments, &other.segments);
        let lengths_fit = match (self.prefix, other.prefix) {
            (false, false) => a.len() == b.len(),
            (true, false) => b.len() >= a.len(),
            (false, true) => a.len() >= b.len(),
            (true, true) => true,
        };
        if !lengths_fit {
            return None;
        }
        let mut example = String::new();
        for i in 0..a.len().max(b.len()) {
            let part = match (a.get(i), b.get(i)) {
                (Some(Segment::Literal(x)), Some(Segment::Literal(y))) if x == y => x.as_str(),
                (Some(Segment::Literal(_)), Some(Segment::Literal(_))) => return None,
                (Some(Segment::Literal(x)), Some(Segment::Any))
                | (Some(Segment::Any), Some(Segment::Literal(x))) => {
                    if x.is_empty() {
                        return None;
                    }
                    x.as_str()
                }
                (Some(Segment::Literal(x)), None) | (None, Some(Segment::Literal(x))) => x.as_str(),
                _ => "x",
            };
            example.push('/');
            example.push_str(part);
        }
        if example.is_empty() {
            example.push('/');
        }
        Some(example)
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn matching_table() {
        let table: &[(&str, &[&str], &[&str])] = &[
            ("/", &["/"], &["/a", "//"]),
            ("/*", &["/", "/a", "/a/b/", "/a/"], &[]),
            ("/a", &["/a"], &["/a/", "/ab", "/a/b", "/"]),
            ("/a/", &["/a/"], &["/a", "/a/b"]),
            (
                "/a/*",
                &["/a", "/a/", "/a/b", "/a/b/c"],
                &["/ab", "/", "/b/a"],
            ),
            (
                "/v1/orders/*/refund",
                &["/v1/orders/7/refund"],
                &[
                    "/v1/orders/refund",
                    "/v1/orders/7/refund/x",
                    "/v1/orders/7/8/refund",
                ],
            ),
            (
                "/v1/orders/{id}/refund",
                &["/v1/orders/abc/refund"],
                &["/v1/orders//refund", "/v1/orders/7/refund/"],
            ),
            (
                "/v1/orders/{id}",
                &["/v1/orders/7"],
                &["/v1/orders", "/v1/orders/", "/v1/orders/7/x"],
            ),
            ("/{tenant}/*", &["/acme", "/acme/x/y"], &["/"]),
            ("/*/health", &["/a/health"], &["/health", "/a/b/health"]),
            ("/a/*/", &["/a/b/"], &["/a/b", "/a//"]),
            ("/a/*/*", &["/a/b", "/a/b/c/d"], &["/a", "/a/"]),
        ];
        for (pattern, yes, no) in table {
            let pat = p(pattern);
            for path in *yes {
                assert!(pat.matches(path), "{pattern} should match {path}");
            }
            for path in *no {
                assert!(!pat.matches(path), "{pattern} should not match {path}");
            }
        }
    }

    #[test]
    fn bad_patterns_are_refused() {
        for (text, want) in [
            ("a/b", "must start with '/'"),
            ("/a*/b", "a wildcard is a whole segment"),
            ("/order-{id}", "a wildcard is a whole segment"),
            ("/a/**", "a wildcard is a whole segment"),
            ("/a/{1x}", "a segment name"),
            ("/a/{}", "a segment name"),
            ("/a/{id}/b/{id}", "uses {id} twice"),
            ("/a//*", "empty segment before"),
            ("/a//b", "normal form"),
            ("/a/./{id}", "normal form"),
            ("/a/%2F/*", "never match"),
        ] {
            let e = PathPattern::parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn covers_is_the_subset_relation() {
        let yes = [
            ("/*", "/a"),
            ("/*", "/{x}/b"),
            ("/a/*", "/a/b/*"),
            ("/a/*", "/a/{id}"),
            ("/a/*", "/a"),
            ("/a/{id}", "/a/b"),
            ("/a/*/c", "/a/b/c"),
            ("/{x}/*", "/a/{y}/*"),
            ("/a/*/", "/a/b/"),
        ];
        for (a, b) in yes {
            assert!(p(a).covers(&p(b)), "{a} covers {b}");
        }
        let no = [
            ("/a", "/a/*"),
            ("/a/{id}", "/a/*"),
            ("/a/{id}", "/a/"),
            ("/a/b/*", "/a/*"),
            ("/{x}", "/"),
            ("/a/*/c", "/a/b/*"),
        ];
        for (a, b) in no {
            assert!(!p(a).covers(&p(b)), "{a} does not cover {b}");
        }
    }

    #[test]
    fn overlap_gives_a_path_both_match() {
        for (a, b) in [
            ("/v1/*/refund", "/v1/orders/*"),
            ("/*", "/a/{x}"),
            ("/a/{x}/c", "/a/b/{y}"),
            ("/a/*", "/a/*"),
            ("/{t}/orders", "/acme/*"),
        ] {
            let ex = p(a)
                .overlap(&p(b))
                .unwrap_or_else(|| panic!("{a} and {b} overlap"));
            assert!(p(a).matches(&ex) && p(b).matches(&ex), "{a} {b}: {ex}");
            let back = p(b).overlap(&p(a)).expect("symmetric");
            assert!(
                p(a).matches(&back) && p(b).matches(&back),
                "{b} {a}: {back}"
            );
        }
        for (a, b) in [
            ("/a", "/b"),
            ("/a/{x}", "/a"),
            ("/a/{x}", "/a/"),
            ("/a/*", "/b/*"),
            ("/a/{x}/c", "/a/b/d"),
            ("/a/b", "/a/b/c/*"),
        ] {
            assert_eq!(p(a).overlap(&p(b)), None, "{a} {b}");
            assert_eq!(p(b).overlap(&p(a)), None, "{b} {a}");
        }
    }
}
