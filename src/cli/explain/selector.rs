//! Label selectors as the API server evaluates a webhook's namespaceSelector
//! and objectSelector, matched with kube's [`Selector`]: one requirement per
//! term, so that explain can say which one decided.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Expression, ParseExpressionError, Selector, SelectorExt};

/// One term in `kubectl -l` syntax, and whether the labels meet it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub text: String,
    pub met: bool,
}

/// Every term of `selector` whose key `include` accepts, evaluated on
/// `labels`. An absent or empty selector has none: it matches everything.
/// A selector the API server would not accept (an unknown operator, a set
/// without values) is an error.
pub fn requirements(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
    include: impl Fn(&str) -> bool,
) -> Result<Vec<Requirement>, ParseExpressionError> {
    let Some(selector) = selector else {
        return Ok(Vec::new());
    };
    let selector = Selector::try_from(selector.clone())?;
    Ok(selector
        .into_iter()
        .filter(|term| include(key(term)))
        .map(|term| Requirement {
            key: key(&term).to_string(),
            text: term.to_string(),
            met: term.matches(labels),
        })
        .collect())
}

fn key(term: &Expression) -> &str {
    match term {
        Expression::In(key, _)
        | Expression::NotIn(key, _)
        | Expression::Equal(key, _)
        | Expression::NotEqual(key, _)
        | Expression::Exists(key)
        | Expression::DoesNotExist(key) => key,
    }
}

/// The requirements as one `kubectl -l` selector.
pub fn describe(requirements: &[Requirement]) -> String {
    requirements
        .iter()
        .map(|r| r.text.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::labels;

    fn selector(json: serde_json::Value) -> LabelSelector {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn match_labels_and_every_operator() {
        let selector = selector(serde_json::json!({
            "matchLabels": {"team": "shop"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["web", "api"]},
                {"key": "env", "operator": "NotIn", "values": ["test"]},
                {"key": "owner", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        }));
        let good = labels(&[("team", "shop"), ("tier", "api"), ("owner", "x")]);
        let all = requirements(Some(&selector), &good, |_| true).unwrap();
        assert!(all.iter().all(|r| r.met), "{all:?}");
        assert_eq!(
            describe(&all),
            "team=shop,tier in (api,web),env notin (test),owner,!legacy"
        );

        let mut bad = good.clone();
        bad.insert("env".into(), "test".into());
        bad.insert("legacy".into(), "yes".into());
        bad.remove("owner");
        let unmet: Vec<String> = requirements(Some(&selector), &bad, |_| true)
            .unwrap()
            .into_iter()
            .filter(|r| !r.met)
            .map(|r| r.text)
            .collect();
        assert_eq!(unmet, ["env notin (test)", "owner", "!legacy"]);
    }

    #[test]
    fn not_in_matches_a_missing_key_and_in_does_not() {
        let selector = selector(serde_json::json!({"matchExpressions": [
            {"key": "a", "operator": "NotIn", "values": ["x"]},
            {"key": "b", "operator": "In", "values": ["x"]},
        ]}));
        let met: Vec<bool> = requirements(Some(&selector), &labels(&[]), |_| true)
            .unwrap()
            .iter()
            .map(|r| r.met)
            .collect();
        assert_eq!(met, [true, false]);
    }

    #[test]
    fn include_filters_by_key_and_no_selector_has_no_requirements() {
        let selector = selector(serde_json::json!({
            "matchLabels": {"a": "1"},
            "matchExpressions": [{"key": "b", "operator": "Exists"}],
        }));
        let only_b = requirements(Some(&selector), &labels(&[]), |k| k == "b").unwrap();
        assert_eq!(describe(&only_b), "b");
        assert!(
            requirements(None, &labels(&[]), |_| true)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn an_operator_the_api_server_rejects_is_an_error() {
        let selector = selector(serde_json::json!({"matchExpressions": [
            {"key": "a", "operator": "Gt", "values": ["1"]},
        ]}));
        assert!(requirements(Some(&selector), &labels(&[("a", "2")]), |_| true).is_err());
    }
}
