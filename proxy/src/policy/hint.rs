//! "Did you mean" hints: the defined name nearest to a misspelt one.

/// The name in `names` nearest to `name` by edit distance, when it is near
/// enough to be a typo (at most a third of the name's characters, at least
/// one, differ): for "did you mean" hints.
pub(crate) fn nearest<'n>(name: &str, names: impl IntoIterator<Item = &'n str>) -> Option<&'n str> {
    let limit = (name.chars().count() / 3).max(1);
    names
        .into_iter()
        .map(|n| (edit_distance(name, n), n))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// Levenshtein distance, counting an adjacent swap as one edit (so "crop"
/// is one edit from "corp").
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_names_are_suggested_and_far_ones_are_not() {
        let names = ["corp", "partners", "read-invoices", "write-invoices"];
        assert_eq!(nearest("crop", names), Some("corp"), "a swap is one edit");
        assert_eq!(nearest("corpp", names), Some("corp"));
        assert_eq!(nearest("read-invoice", names), Some("read-invoices"));
        assert_eq!(nearest("wrte-invoices", names), Some("write-invoices"));
        assert_eq!(nearest("billing", names), None);
        assert_eq!(nearest("x", ["y"]), Some("y"), "one edit is always near");
        assert_eq!(nearest("ab", ["cd"]), None);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
