//! Deciding whether a desired object needs a write.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Annotation carrying a hash of the object as we last applied it. It makes a
/// changed desired object (even one that only lost a field) differ from the
/// live one, which a subset comparison alone would not notice.
pub fn applied_hash_key(domain: &str) -> String {
    format!("{domain}/applied-hash")
}

/// The object as applied: the desired value plus its applied-hash annotation.
pub fn applied_value(desired: &Value, domain: &str) -> Value {
    let digest = Sha256::digest(desired.to_string().as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut value = desired.clone();
    let metadata = &mut value["metadata"];
    if !metadata["annotations"].is_object() {
        metadata["annotations"] = json!({});
    }
    metadata["annotations"][applied_hash_key(domain)] = json!(hash);
    value
}

/// Strings longer than this are compared by their digest.
const LONG_STRING: usize = 128;

/// Replaces every string longer than [`LONG_STRING`] bytes (a dashboard's
/// JSON, a statsd mapping) with its SHA-256 digest. The live cache stores
/// objects so, and [`is_subset`] compares a desired object so digested with
/// them: the comparison is unchanged, and a namespace's objects hold 10 KB
/// less. A digest is shorter than the limit, so digesting twice changes
/// nothing.
pub fn digest_long_strings(value: &mut Value) {
    match value {
        Value::String(text) if text.len() > LONG_STRING => {
            let digest = Sha256::digest(text.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            *text = format!("sha256:{hex}");
        }
        Value::Object(fields) => fields.values_mut().for_each(digest_long_strings),
        Value::Array(items) => items.iter_mut().for_each(digest_long_strings),
        _ => {}
    }
}

/// Whether every field of `desired` is present and equal in `live`.
/// `apiVersion` and `kind` are not compared (list items may lack them);
/// arrays must match element by element; null, empty and zero values in
/// `desired` match absent fields, since the API server may drop them.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match desired {
        Value::Object(fields) => fields
            .iter()
            .filter(|(name, _)| !matches!(name.as_str(), "apiVersion" | "kind"))
            .all(|(name, value)| field_matches(value, live.get(name))),
        _ => field_matches(desired, Some(live)),
    }
}

fn field_matches(desired: &Value, live: Option<&Value>) -> bool {
    let Some(live) = live.filter(|l| !l.is_null()) else {
        return is_empty(desired);
    };
    match (desired, live) {
        (Value::Object(want), Value::Object(have)) => want
            .iter()
            .all(|(name, value)| field_matches(value, have.get(name))),
        (Value::Array(want), Value::Array(have)) => {
            want.len() == have.len()
                && want
                    .iter()
                    .zip(have)
                    .all(|(w, h)| field_matches(w, Some(h)))
        }
        (Value::Number(want), Value::Number(have)) => {
            want == have || want.as_f64().is_some_and(|w| Some(w) == have.as_f64())
        }
        (Value::Null, _) => true,
        (want, have) => want == have,
    }
}

/// Zero values: Go's `omitempty` drops them, so the live object may lack them.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::String(text) => text.is_empty(),
        Value::Number(number) => number.as_f64() == Some(0.0),
        Value::Object(map) => map.values().all(is_empty),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_compare_by_digest_and_digesting_twice_changes_nothing() {
        let dashboard = "x".repeat(LONG_STRING + 1);
        let desired = json!({"data": {"dashboard.json": dashboard, "short": "kept"}});
        let mut stored = desired.clone();
        digest_long_strings(&mut stored);
        assert_eq!(stored["data"]["short"], "kept");
        assert!(stored["data"]["dashboard.json"].as_str().unwrap().len() < LONG_STRING);
        let mut twice = stored.clone();
        digest_long_strings(&mut twice);
        assert_eq!(twice, stored);
        let mut digested = desired.clone();
        digest_long_strings(&mut digested);
        assert!(is_subset(&digested, &stored));
        let mut changed = json!({"data": {"dashboard.json": "y".repeat(LONG_STRING + 1)}});
        digest_long_strings(&mut changed);
        assert!(
            !is_subset(&changed, &stored),
            "a changed long string is a change"
        );
    }

    #[test]
    fn extra_live_fields_are_ignored() {
        let desired = json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "data": {"k": "v"}});
        let live = json!({
            "apiVersion": "v1",
            "metadata": {"name": "a", "uid": "u", "resourceVersion": "7", "labels": {"x": "1", "y": "2"}},
            "data": {"k": "v"}
        });
        assert!(is_subset(&desired, &live));
    }

    #[test]
    fn changed_or_missing_fields_differ() {
        let desired = json!({"metadata": {"name": "a"}, "data": {"k": "v"}});
        assert!(!is_subset(
            &desired,
            &json!({"metadata": {"name": "a"}, "data": {"k": "edited"}})
        ));
        assert!(!is_subset(&desired, &json!({"metadata": {"name": "a"}})));
    }

    #[test]
    fn arrays_match_element_wise_with_defaults_allowed() {
        let desired = json!({"spec": {"ports": [{"port": 9102}]}});
        let defaulted = json!({"spec": {"ports": [{"port": 9102, "protocol": "TCP"}]}});
        assert!(is_subset(&desired, &defaulted));
        let longer = json!({"spec": {"ports": [{"port": 9102}, {"port": 1}]}});
        assert!(!is_subset(&desired, &longer));
    }

    #[test]
    fn empty_desired_values_match_absent_fields() {
        let desired = json!({"spec": {"emptyDir": {}, "items": [], "x": null, "hostNetwork": false, "s": ""}});
        assert!(is_subset(&desired, &json!({"spec": {}})));
        assert!(!is_subset(
            &json!({"spec": {"hostNetwork": true}}),
            &json!({"spec": {}})
        ));
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(is_subset(&json!({"a": 1}), &json!({"a": 1.0})));
        assert!(!is_subset(&json!({"a": 1}), &json!({"a": "1"})));
    }

    #[test]
    fn applied_hash_changes_with_the_desired_object() {
        let a = applied_value(
            &json!({"metadata": {"name": "a"}, "data": {"k": "v"}}),
            "d.io",
        );
        let b = applied_value(&json!({"metadata": {"name": "a"}, "data": {}}), "d.io");
        let hash = |v: &Value| v["metadata"]["annotations"]["d.io/applied-hash"].clone();
        assert!(hash(&a).is_string());
        assert_ne!(hash(&a), hash(&b));
        assert!(!is_subset(&a, &b));
    }
}
