//! Hostlist expressions: `node[001-128]`, `node[001-004,010],gpu[1-2]`, `r[1-2]n[01-04]`.
//!
//! Zero padding is kept: a range whose start is written with leading zeros pads every number to
//! that width. Expansion is capped so a typo like `n[1-999999999]` is an error, not an OOM.

use std::collections::BTreeMap;

/// The most names one expression may expand to.
pub const MAX_EXPANSION: usize = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostlistError {
    #[error("malformed hostlist '{expr}': {reason}")]
    Malformed { expr: String, reason: String },
    #[error("hostlist '{0}' expands to more than {MAX_EXPANSION} names")]
    TooLarge(String),
}

fn malformed(expr: &str, reason: impl Into<String>) -> HostlistError {
    HostlistError::Malformed { expr: expr.to_string(), reason: reason.into() }
}

/// Expands an expression into names, in the order written, without duplicates.
pub fn expand(expr: &str) -> Result<Vec<String>, HostlistError> {
    let expr_trim = expr.trim();
    if expr_trim.is_empty() {
        return Err(malformed(expr, "empty"));
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for term in split_top_level(expr_trim).map_err(|r| malformed(expr, r))? {
        if term.is_empty() {
            return Err(malformed(expr, "empty name between commas"));
        }
        for name in expand_term(expr, term)? {
            if seen.insert(name.clone()) {
                out.push(name);
                if out.len() > MAX_EXPANSION {
                    return Err(HostlistError::TooLarge(expr.to_string()));
                }
            }
        }
    }
    Ok(out)
}

fn split_top_level(expr: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in expr.char_indices() {
        match c {
            '[' => {
                if depth > 0 {
                    return Err("nested '['".into());
                }
                depth += 1
            }
            ']' => {
                if depth == 0 {
                    return Err("']' without '['".into());
                }
                depth -= 1
            }
            ',' if depth == 0 => {
                terms.push(expr[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'[' without ']'".into());
    }
    terms.push(expr[start..].trim());
    Ok(terms)
}

/// One term: literal text and bracketed ranges, expanded as a cartesian product.
fn expand_term(expr: &str, term: &str) -> Result<Vec<String>, HostlistError> {
    let mut partials = vec![String::new()];
    let mut rest = term;
    while !rest.is_empty() {
        match rest.find('[') {
            None => {
                check_literal(expr, rest)?;
                partials.iter_mut().for_each(|p| p.push_str(rest));
                rest = "";
            }
            Some(open) => {
                let literal = &rest[..open];
                check_literal(expr, literal)?;
                let close =
                    rest[open..].find(']').map(|c| c + open).ok_or_else(|| malformed(expr, "'[' without ']'"))?;
                let numbers = expand_ranges(expr, &rest[open + 1..close])?;
                let total = partials.len().saturating_mul(numbers.len());
                if total > MAX_EXPANSION {
                    return Err(HostlistError::TooLarge(expr.to_string()));
                }
                let mut next = Vec::with_capacity(total);
                for p in &partials {
                    for n in &numbers {
                        next.push(format!("{p}{literal}{n}"));
                    }
                }
                partials = next;
                rest = &rest[close + 1..];
            }
        }
    }
    Ok(partials)
}

fn check_literal(expr: &str, literal: &str) -> Result<(), HostlistError> {
    if let Some(c) = literal.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(malformed(expr, format!("character '{c}' is not allowed in a name")));
    }
    Ok(())
}

fn expand_ranges(expr: &str, inner: &str) -> Result<Vec<String>, HostlistError> {
    if inner.trim().is_empty() {
        return Err(malformed(expr, "empty brackets"));
    }
    let mut out = Vec::new();
    for part in inner.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim(), hi.trim()),
            None => (part, part),
        };
        let parse = |s: &str| -> Result<u64, HostlistError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 18 {
                return Err(malformed(expr, format!("'{part}' is not a number or a range like 001-004")));
            }
            Ok(s.parse().expect("digits checked"))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(malformed(expr, format!("range '{part}' runs backwards")));
        }
        if (b - a) as usize >= MAX_EXPANSION {
            return Err(HostlistError::TooLarge(expr.to_string()));
        }
        let width = if lo.len() > 1 && lo.starts_with('0') { lo.len() } else { 0 };
        for n in a..=b {
            out.push(format!("{n:0width$}"));
        }
    }
    Ok(out)
}

/// Folds names back into a compact expression (the inverse of [`expand`] up to ordering):
/// `node001,node002,node003,gpu1` → `gpu1,node[001-003]`.
pub fn compress<S: AsRef<str>>(names: &[S]) -> String {
    // Group by (prefix, digit width) of the trailing number; names without one stay literal.
    let mut groups: BTreeMap<(String, usize), Vec<u64>> = BTreeMap::new();
    let mut literals = Vec::new();
    for name in names {
        let name = name.as_ref();
        let digits = name.bytes().rev().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 18 {
            literals.push(name.to_string());
            continue;
        }
        let (prefix, num) = name.split_at(name.len() - digits);
        let width = if num.len() > 1 && num.starts_with('0') { num.len() } else { 0 };
        groups.entry((prefix.to_string(), width)).or_default().push(num.parse().expect("digits"));
    }
    // `node1000` has no leading zero but belongs with `node0999` (width 4), not alone.
    let padded: Vec<(String, usize)> = groups.keys().filter(|(_, w)| *w > 0).cloned().collect();
    for (prefix, width) in padded {
        if let Some(plain) = groups.get_mut(&(prefix.clone(), 0)) {
            let (fit, rest): (Vec<u64>, Vec<u64>) = plain.iter().partition(|n| n.to_string().len() == width);
            *plain = rest;
            if plain.is_empty() {
                groups.remove(&(prefix.clone(), 0));
            }
            groups.entry((prefix, width)).or_default().extend(fit);
        }
    }
    let mut parts = literals;
    for ((prefix, width), mut nums) in groups {
        nums.sort_unstable();
        nums.dedup();
        if nums.len() == 1 {
            parts.push(format!("{prefix}{:0width$}", nums[0]));
            continue;
        }
        let mut ranges = Vec::new();
        let mut start = nums[0];
        let mut prev = nums[0];
        for &n in &nums[1..] {
            if n != prev + 1 {
                ranges.push((start, prev));
                start = n;
            }
            prev = n;
        }
        ranges.push((start, prev));
        let inner: Vec<String> = ranges
            .iter()
            .map(|&(a, b)| if a == b { format!("{a:0width$}") } else { format!("{a:0width$}-{b:0width$}") })
            .collect();
        parts.push(format!("{prefix}[{}]", inner.join(",")));
    }
    parts.sort();
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_padding_and_order() {
        assert_eq!(expand("node[001-003]").unwrap(), ["node001", "node002", "node003"]);
        assert_eq!(expand("node[001-002,010],gpu[1-2]").unwrap(), ["node001", "node002", "node010", "gpu1", "gpu2"]);
        assert_eq!(expand("n[8-10]").unwrap(), ["n8", "n9", "n10"]);
        assert_eq!(expand("plain").unwrap(), ["plain"]);
    }

    #[test]
    fn cartesian_product_and_suffix() {
        assert_eq!(expand("r[1-2]n[01-02]-ib").unwrap(), ["r1n01-ib", "r1n02-ib", "r2n01-ib", "r2n02-ib"]);
    }

    #[test]
    fn duplicates_are_dropped() {
        assert_eq!(expand("n[1-2],n2,n1").unwrap(), ["n1", "n2"]);
    }

    #[test]
    fn malformed_expressions_name_the_input() {
        for bad in ["", "node[1-", "node]", "node[]", "node[3-1]", "node[a-b]", "a,,b", "n[1[2]]", "bad name"] {
            let e = expand(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
        assert!(matches!(expand("n[1-99999999]"), Err(HostlistError::TooLarge(_))));
        assert!(matches!(expand("a[1-1000]b[1-1001]"), Err(HostlistError::TooLarge(_))));
    }

    #[test]
    fn compress_examples() {
        assert_eq!(compress(&["node001", "node002", "node003", "node010", "gpu1"]), "gpu1,node[001-003,010]");
        assert_eq!(compress(&["login"]), "login");
        let names: Vec<String> = (998..=1001).map(|n| format!("b{n:04}")).collect();
        assert_eq!(compress(&names), "b[0998-1001]");
    }

    proptest! {
        #[test]
        fn compress_then_expand_is_identity((width, nums) in (0usize..5).prop_flat_map(|w| {
            // Padded names need numbers short enough to show a leading zero.
            let max = if w < 2 { 5000 } else { 10u64.pow(w as u32 - 1) };
            (Just(w), proptest::collection::btree_set(0..max, 1..60))
        })) {
            let names: Vec<String> = nums.iter().map(|n| format!("cn{n:0width$}")).collect();
            let mut again = expand(&compress(&names)).unwrap();
            again.sort();
            let mut want = names.clone();
            want.sort();
            prop_assert_eq!(again, want);
        }

        #[test]
        fn expand_never_panics(s in "[a-z0-9\\[\\],-]{0,20}") {
            let _ = expand(&s);
        }
    }
}
