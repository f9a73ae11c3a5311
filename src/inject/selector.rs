//! Parses the string form of a label selector (`app!=db,tier in (web,api),!legacy`)
//! into kube's [`Selector`], which does the matching.

use std::collections::BTreeSet;

use kube::core::{Expression, Selector};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

/// Parses a selector in the syntax `kubectl -l` accepts.
pub fn parse_selector(text: &str) -> Result<Selector, SelectorError> {
    let fail = |reason: &str| SelectorError {
        selector: text.to_string(),
        reason: reason.to_string(),
    };
    let mut expressions = Vec::new();
    for term in split_terms(text).map_err(fail)? {
        let term = term.trim();
        if term.is_empty() {
            return Err(fail("empty term"));
        }
        expressions.push(parse_term(term).map_err(|r| fail(&r))?);
    }
    Ok(Selector::from_iter(expressions))
}

/// Splits on commas that are not inside a `( … )` value set.
fn split_terms(text: &str) -> Result<Vec<&str>, &'static str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced ')'")?,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('");
    }
    if !text.trim().is_empty() {
        terms.push(&text[start..]);
    }
    Ok(terms)
}

fn parse_term(term: &str) -> Result<Expression, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(key_of(key)?));
    }
    for (op, build) in [
        (
            "!=",
            Expression::NotEqual as fn(String, String) -> Expression,
        ),
        ("==", Expression::Equal),
        ("=", Expression::Equal),
    ] {
        if let Some((key, value)) = term.split_once(op) {
            return Ok(build(key_of(key)?, value_of(value)?));
        }
    }
    let words: Vec<&str> = term.splitn(2, char::is_whitespace).collect();
    if let [key, rest] = words[..] {
        let rest = rest.trim_start();
        let (negate, set) = if let Some(set) = rest.strip_prefix("notin") {
            (true, set)
        } else if let Some(set) = rest.strip_prefix("in") {
            (false, set)
        } else {
            return Err(format!("unknown operator in {term:?}"));
        };
        let values = set
            .trim()
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| format!("expected a (value, …) set in {term:?}"))?
            .split(',')
            .map(value_of)
            .collect::<Result<BTreeSet<_>, _>>()?;
        let key = key_of(key)?;
        return Ok(if negate {
            Expression::NotIn(key, values)
        } else {
            Expression::In(key, values)
        });
    }
    Ok(Expression::Exists(key_of(term)?))
}

fn key_of(key: &str) -> Result<String, String> {
    let key = key.trim();
    let name = key.rsplit('/').next().unwrap_or_default();
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && key.matches('/').count() <= 1;
    if valid {
        Ok(key.to_string())
    } else {
        Err(format!("{key:?} is not a label key"))
    }
}

fn value_of(value: &str) -> Result<String, String> {
    let value = value.trim();
    let valid = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!("{value:?} is not a label value"))
    }
}

#[cfg(test)]
mod tests {
    use kube::core::SelectorExt;

    use super::*;
    use crate::test_support::labels;

    #[test]
    fn not_equal_excludes_the_database() {
        let selector = parse_selector("app!=db").unwrap();
        assert!(!selector.matches(&labels(&[("app", "db")])));
        assert!(selector.matches(&labels(&[("app", "api")])));
        assert!(selector.matches(&labels(&[])));
    }

    #[test]
    fn all_operators() {
        let selector = parse_selector(
            "tier in (web, api),env notin (test),team,!legacy,app.kubernetes.io/name==chiller",
        )
        .unwrap();
        let good = labels(&[
            ("tier", "web"),
            ("env", "prod"),
            ("team", "x"),
            ("app.kubernetes.io/name", "chiller"),
        ]);
        assert!(selector.matches(&good));
        let mut legacy = good.clone();
        legacy.insert("legacy".into(), "y".into());
        assert!(!selector.matches(&legacy));
        let mut test = good.clone();
        test.insert("env".into(), "test".into());
        assert!(!selector.matches(&test));
    }

    #[test]
    fn empty_selects_everything() {
        assert!(parse_selector("").unwrap().selects_all());
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [
            "app in web",
            "a b c",
            "(",
            "app=",
            "app=x y",
            "a/b/c=1",
            ",",
            "app in (a",
        ] {
            let ok = parse_selector(bad);
            // `app=` is legal (empty value); the rest are not.
            if bad == "app=" {
                assert!(ok.is_ok());
            } else {
                assert!(ok.is_err(), "{bad:?} should be rejected");
            }
        }
    }
}
