//! Chooses the statsd prefix gunicorn sends its metrics under.

use super::view::PodView;
use crate::keys::Keys;

const POD_TEMPLATE_HASH: &str = "pod-template-hash";
const MAX_PREFIX: usize = 63;

/// The prefix, in order of preference: the annotation, the recommended labels
/// (`app.kubernetes.io/name` + `-component`), the `app` label, the owner's name
/// (or `owner_hint` for a workload template), then the pod's name or `generateName`.
pub fn statsd_prefix(pod: &PodView, keys: &Keys, owner_hint: Option<&str>) -> String {
    let meta = &pod.metadata;
    let label = |k: &str| pod.label(k).filter(|v| !v.is_empty());
    let hash = label(POD_TEMPLATE_HASH);
    // Candidates are built only until one gives a prefix.
    let usable = |candidate: &str| Some(sanitize(candidate)).filter(|p| !p.is_empty());
    let recommended = || match (
        label("app.kubernetes.io/name"),
        label("app.kubernetes.io/component"),
    ) {
        (Some(name), Some(component)) => usable(&format!("{name}-{component}")),
        (Some(name), None) => usable(name),
        (None, Some(component)) => usable(component),
        (None, None) => None,
    };
    let owner = || {
        meta.owner_references
            .as_ref()
            .and_then(|refs| {
                refs.iter()
                    .find(|r| r.controller == Some(true))
                    .or(refs.first())
            })
            .map(|r| strip_hash(&r.name, hash))
            .or(owner_hint)
            .and_then(usable)
    };
    let own_name = || {
        meta.name
            .as_deref()
            .filter(|n| !n.is_empty())
            .or_else(|| {
                meta.generate_name
                    .as_deref()
                    .map(|g| strip_hash(g.trim_end_matches('-'), hash))
            })
            .and_then(usable)
    };
    pod.annotation(&keys.statsd_prefix)
        .and_then(usable)
        .or_else(recommended)
        .or_else(|| label("app").and_then(usable))
        .or_else(owner)
        .or_else(own_name)
        .unwrap_or_else(|| "app".to_string())
}

/// `chiller-api-7d9f8c6b5` with hash `7d9f8c6b5` → `chiller-api`.
fn strip_hash<'a>(name: &'a str, hash: Option<&str>) -> &'a str {
    let name = name.trim_end_matches('-');
    hash.and_then(|h| name.strip_suffix(h))
        .and_then(|n| n.strip_suffix('-'))
        .filter(|n| !n.is_empty())
        .unwrap_or(name)
}

/// Keeps what a statsd path component and a Prometheus label value can carry:
/// a dot would split the prefix into two glob components.
fn sanitize(raw: &str) -> String {
    let mut cleaned = String::with_capacity(raw.len().min(MAX_PREFIX));
    cleaned.extend(
        raw.trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(MAX_PREFIX),
    );
    // ASCII only from here: trim the separators in place.
    let separator = |b: &u8| *b == b'_' || *b == b'-';
    let end = cleaned.len() - cleaned.bytes().rev().take_while(separator).count();
    cleaned.truncate(end);
    let start = cleaned.bytes().take_while(separator).count();
    cleaned.drain(..start);
    cleaned
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::OwnerReference};
    use serde_json::json;

    use super::*;

    fn pod(meta: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": meta, "spec": {"containers": []}})).unwrap()
    }

    fn prefix(meta: serde_json::Value) -> String {
        statsd_prefix(&PodView::of(&pod(meta)), &Keys::default(), None)
    }

    #[test]
    fn annotation_wins() {
        let p = prefix(json!({
            "annotations": {"metrics.chiller.io/statsd-prefix": "my.app"},
            "labels": {"app": "api"}
        }));
        assert_eq!(p, "my_app");
    }

    #[test]
    fn recommended_labels_then_app_label() {
        assert_eq!(
            prefix(json!({"labels": {
                "app.kubernetes.io/name": "chiller",
                "app.kubernetes.io/component": "api",
                "app": "x"
            }})),
            "chiller-api"
        );
        assert_eq!(
            prefix(json!({"labels": {"app.kubernetes.io/name": "chiller"}})),
            "chiller"
        );
        assert_eq!(prefix(json!({"labels": {"app": "frontend"}})), "frontend");
    }

    #[test]
    fn owner_name_loses_its_template_hash() {
        let mut p = pod(json!({
            "generateName": "chiller-api-7d9f8c6b5-",
            "labels": {"pod-template-hash": "7d9f8c6b5"}
        }));
        p.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "chiller-api-7d9f8c6b5".into(),
            uid: "u".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        assert_eq!(
            statsd_prefix(&PodView::of(&p), &Keys::default(), None),
            "chiller-api"
        );
    }

    #[test]
    fn generate_name_alone_works() {
        assert_eq!(
            prefix(
                json!({"generateName": "chiller-api-7d9f8c6b5-", "labels": {"pod-template-hash": "7d9f8c6b5"}})
            ),
            "chiller-api"
        );
        assert_eq!(prefix(json!({"generateName": "worker-"})), "worker");
        assert_eq!(prefix(json!({"name": "solo"})), "solo");
    }

    #[test]
    fn owner_hint_serves_templates() {
        let p = pod(json!({"labels": {"pod-template-hash": "abc"}}));
        assert_eq!(
            statsd_prefix(&PodView::of(&p), &Keys::default(), Some("chiller-frontend")),
            "chiller-frontend"
        );
    }

    #[test]
    fn nothing_at_all_still_gives_a_prefix() {
        assert_eq!(prefix(json!({})), "app");
        assert_eq!(
            prefix(
                json!({"annotations": {"metrics.chiller.io/statsd-prefix": "..."}, "name": "p"})
            ),
            "p"
        );
    }
}
