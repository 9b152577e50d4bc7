//! Routes indexed by the first segment of their path, so a decision only
//! tries the routes that can match: those whose pattern starts with the
//! request's first segment, and those whose first segment is a wildcard
//! (`/*`, `/{tenant}/...`). Candidates come out in file order,
//! so first-match-wins is unchanged; `explain` still scans every route to
//! say why each one did not match.

use std::collections::HashMap;

use super::Route;

/// Route positions by first path segment, plus those with a wildcard there.
#[derive(Debug, Default)]
pub(crate) struct RouteIndex {
    by_segment: HashMap<String, Vec<usize>>,
    every_path: Vec<usize>,
}

/// Positions of the routes that may match a path, ascending.
pub(crate) struct Candidates<'a> {
    a: &'a [usize],
    b: &'a [usize],
}

/// `/a/b` → `a`; `/` → ``. `path` starts with `/` (normalized, or a route path).
fn first_segment(path: &str) -> &str {
    let rest = path.strip_prefix('/').unwrap_or(path);
    &rest[..rest.find('/').unwrap_or(rest.len())]
}

impl RouteIndex {
    pub(crate) fn build(routes: &[Route]) -> Self {
        let mut index = Self::default();
        for (i, route) in routes.iter().enumerate() {
            match route.path.first_literal() {
                None => index.every_path.push(i),
                Some(first) => index
                    .by_segment
                    .entry(first.to_owned())
                    .or_default()
                    .push(i),
            }
        }
        index
    }

    /// The routes that may match the normalized `path`, in file order.
    pub(crate) fn candidates(&self, path: &str) -> Candidates<'_> {
        let a = self
            .by_segment
            .get(first_segment(path))
            .map_or(&[][..], Vec::as_slice);
        Candidates {
            a,
            b: &self.every_path,
        }
    }
}

impl Iterator for Candidates<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(a), Some(b)) => a < b,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let side = if take_a { &mut self.a } else { &mut self.b };
        let (first, rest) = side.split_first()?;
        *side = rest;
        Some(*first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_segments() {
        for (p, want) in [
            ("/", ""),
            ("/a", "a"),
            ("/a/", "a"),
            ("/a/b/c", "a"),
            ("/ab", "ab"),
        ] {
            assert_eq!(first_segment(p), want, "{p}");
        }
    }

    #[test]
    fn candidates_merge_in_order() {
        let c = Candidates {
            a: &[1, 4, 5, 9],
            b: &[0, 2, 6],
        };
        assert_eq!(c.collect::<Vec<_>>(), vec![0, 1, 2, 4, 5, 6, 9]);
    }
}
