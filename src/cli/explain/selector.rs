//! Label selectors as the API server evaluates a webhook's namespaceSelector
//! and objectSelector: `matchLabels` and `matchExpressions`, all ANDed. Says
//! which requirement decided.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

/// One requirement in `kubectl -l` syntax, and whether the labels meet it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub text: String,
    pub met: bool,
}

/// Every requirement of `selector` whose key `include` accepts, evaluated
/// on `labels`. An absent or empty selector has none: it matches everything.
pub fn requirements(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
    include: impl Fn(&str) -> bool,
) -> Vec<Requirement> {
    let Some(selector) = selector else {
        return Vec::new();
    };
    let equal = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| Requirement {
            key: key.clone(),
            text: format!("{key}={value}"),
            met: labels.get(key) == Some(value),
        });
    let expressions = selector
        .match_expressions
        .iter()
        .flatten()
        .map(|r| expression(r, labels));
    equal
        .chain(expressions)
        .filter(|r| include(&r.key))
        .collect()
}

fn expression(
    requirement: &LabelSelectorRequirement,
    labels: &BTreeMap<String, String>,
) -> Requirement {
    let key = &requirement.key;
    let values = requirement.values.as_deref().unwrap_or_default();
    let set = values.join(",");
    let value = labels.get(key);
    let in_set = value.is_some_and(|v| values.contains(v));
    let (text, met) = match requirement.operator.as_str() {
        "In" => (format!("{key} in ({set})"), in_set),
        "NotIn" => (format!("{key} notin ({set})"), !in_set),
        "Exists" => (key.clone(), value.is_some()),
        "DoesNotExist" => (format!("!{key}"), value.is_none()),
        // The API server rejects other operators; nothing can match them.
        other => (format!("{key} {other} ({set})"), false),
    };
    Requirement {
        key: key.clone(),
        text,
        met,
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

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

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
        let all = requirements(Some(&selector), &good, |_| true);
        assert!(all.iter().all(|r| r.met), "{all:?}");
        assert_eq!(
            describe(&all),
            "team=shop,tier in (web,api),env notin (test),owner,!legacy"
        );

        let mut bad = good.clone();
        bad.insert("env".into(), "test".into());
        bad.insert("legacy".into(), "yes".into());
        bad.remove("owner");
        let unmet: Vec<String> = requirements(Some(&selector), &bad, |_| true)
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
        let only_b = requirements(Some(&selector), &labels(&[]), |k| k == "b");
        assert_eq!(describe(&only_b), "b");
        assert!(requirements(None, &labels(&[]), |_| true).is_empty());
    }

    #[test]
    fn an_unknown_operator_never_matches() {
        let selector = selector(serde_json::json!({"matchExpressions": [
            {"key": "a", "operator": "Gt", "values": ["1"]},
        ]}));
        let all = requirements(Some(&selector), &labels(&[("a", "2")]), |_| true);
        assert!(!all[0].met);
    }
}
