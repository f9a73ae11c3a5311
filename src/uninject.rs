//! The inverse of the mutation: a patch that removes exactly what
//! [`crate::inject::Injector::mutate`] added to a pod or pod template (the
//! sidecar, its volume, the statsd flags in `GUNICORN_CMD_ARGS`, the label
//! and the annotations). Pure, like the mutation.
//!
//! What the mutation cannot tell apart afterwards is resolved towards its
//! own output: a list or map it may have created is removed when it becomes
//! empty, and `kubectl.kubernetes.io/default-container` is removed when it
//! names the first container (the mutation sets it only when it is missing).

use json_patch::{Patch, PatchOperation, RemoveOperation, ReplaceOperation, jsonptr::PointerBuf};
use serde_json::Value;

use crate::{config::Config, inject::GUNICORN_CMD_ARGS, keys};

/// What the status annotation says was injected (any later fields are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedStatus {
    pub containers: Vec<String>,
    pub prefix: Option<String>,
}

/// Reads the status annotation's JSON.
pub fn recorded_status(annotation: &str) -> Option<RecordedStatus> {
    let value: Value = serde_json::from_str(annotation).ok()?;
    Some(RecordedStatus::from_value(&value))
}

impl RecordedStatus {
    /// From the status annotation's parsed JSON.
    pub fn from_value(value: &Value) -> Self {
        Self {
            containers: value
                .get("containers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            prefix: value
                .get("prefix")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn remove(tokens: &[&str]) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation {
        path: pointer(tokens),
    })
}

/// The patch that removes what injection added, or `None` when the pod
/// carries nothing of ours. Only a pod with our label or status annotation
/// was injected: a container that merely has the sidecar's name is someone
/// else's. A skipped pod only loses the skip the webhook recorded.
pub fn uninject_patch(config: &Config, pod: &Value) -> Option<Patch> {
    let keys = config.keys();
    let sidecar = config.sidecar.name.as_str();
    let mut ops = Vec::new();

    let status_text = pod
        .pointer(&annotation_pointer(&keys.status))
        .and_then(Value::as_str);
    let labeled = pod
        .pointer(&pointer(&["metadata", "labels", &keys.injected]).to_string())
        .and_then(Value::as_str)
        == Some("true");
    // The webhook records a skip on the pod as `DOMAIN/skipped`.
    let skipped_key = skipped_annotation(&config.domain);
    let skipped = pod.pointer(&annotation_pointer(&skipped_key)).is_some();
    if status_text.is_none() && !labeled {
        return skipped
            .then(|| Patch(remove_keys(pod, "annotations", |key, _| key == skipped_key)));
    }
    let status = status_text.and_then(recorded_status);
    let containers = list(pod, "containers");
    if let Some(status) = &status {
        for (index, container) in containers.iter().enumerate() {
            let name = container.get("name").and_then(Value::as_str);
            if name.is_some_and(|n| status.containers.iter().any(|c| c == n)) {
                ops.extend(env_ops(container, index));
            }
        }
    }
    for list_name in ["initContainers", "containers"] {
        ops.extend(remove_named(pod, list_name, sidecar));
    }
    ops.extend(remove_named(pod, "volumes", &config.sidecar.volume_name));

    let first_app = containers
        .iter()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .find(|name| *name != sidecar);
    ops.extend(remove_keys(pod, "labels", |key, value| {
        key == keys.injected && value == "true"
    }));
    ops.extend(remove_keys(pod, "annotations", |key, value| {
        key == keys.status
            || key == keys.mapping
            || key == skipped_key
            || (key == keys::DEFAULT_CONTAINER && Some(value) == first_app)
    }));
    (!ops.is_empty()).then_some(Patch(ops))
}

/// The annotation the webhook sets on a pod it skipped for a reason that
/// deserves a warning.
pub fn skipped_annotation(domain: &str) -> String {
    format!("{domain}/skipped")
}

fn annotation_pointer(key: &str) -> String {
    pointer(&["metadata", "annotations", key]).to_string()
}

fn list<'a>(pod: &'a Value, name: &str) -> &'a [Value] {
    pod.pointer(&format!("/spec/{name}"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Removes the entry called `name` from `spec.<list_name>`, or the whole
/// list when it is the only entry.
fn remove_named(pod: &Value, list_name: &str, name: &str) -> Option<PatchOperation> {
    let entries = list(pod, list_name);
    let index = entries
        .iter()
        .position(|e| e.get("name").and_then(Value::as_str) == Some(name))?;
    // `containers` is required, so it is never removed as a whole.
    Some(if entries.len() == 1 && list_name != "containers" {
        remove(&["spec", list_name])
    } else {
        remove(&["spec", list_name, &index.to_string()])
    })
}

/// Takes the statsd flags out of a container's `GUNICORN_CMD_ARGS`: the
/// variable goes when nothing else is left, the `env` list when it was its
/// only entry.
fn env_ops(container: &Value, index: usize) -> Option<PatchOperation> {
    let env = container.get("env").and_then(Value::as_array)?;
    let at = env
        .iter()
        .rposition(|e| e.get("name").and_then(Value::as_str) == Some(GUNICORN_CMD_ARGS))?;
    let value = env[at].get("value").and_then(Value::as_str)?;
    let kept = strip_statsd_flags(value)?;
    let (index, at) = (index.to_string(), at.to_string());
    Some(match kept {
        Some(kept) => PatchOperation::Replace(ReplaceOperation {
            path: pointer(&["spec", "containers", &index, "env", &at, "value"]),
            value: Value::String(kept.to_string()),
        }),
        None if env.len() == 1 => remove(&["spec", "containers", &index, "env"]),
        None => remove(&["spec", "containers", &index, "env", &at]),
    })
}

/// `Some(Some(rest))` when `value` ends with the statsd flags after other
/// text, `Some(None)` when it is only the flags, `None` when it has none.
fn strip_statsd_flags(value: &str) -> Option<Option<&str>> {
    let host_at = value.rfind("--statsd-host=")?;
    let flags = &value[host_at..];
    let mut parts = flags.split(' ');
    let well_formed = parts
        .next()
        .is_some_and(|p| p.starts_with("--statsd-host="))
        && parts
            .next()
            .is_some_and(|p| p.starts_with("--statsd-prefix="))
        && parts.next().is_none();
    if !well_formed {
        return None;
    }
    match value[..host_at].strip_suffix(' ') {
        Some(rest) if !rest.is_empty() => Some(Some(rest)),
        None if host_at == 0 => Some(None),
        _ => None,
    }
}

/// Removes the entries of `metadata.<field>` that `ours` accepts, or the
/// whole map when nothing else is in it.
fn remove_keys(pod: &Value, field: &str, ours: impl Fn(&str, &str) -> bool) -> Vec<PatchOperation> {
    let Some(map) = pod
        .pointer(&format!("/metadata/{field}"))
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    let matching: Vec<&String> = map
        .iter()
        .filter(|(k, v)| v.as_str().is_some_and(|v| ours(k, v)))
        .map(|(k, _)| k)
        .collect();
    if matching.is_empty() {
        Vec::new()
    } else if matching.len() == map.len() {
        vec![remove(&["metadata", field])]
    } else {
        matching
            .into_iter()
            .map(|key| remove(&["metadata", field, key]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The pod after its uninject patch (the default config); it must have one.
    fn uninjected(pod: &Value) -> Value {
        let mut patched = pod.clone();
        json_patch::patch(
            &mut patched,
            &uninject_patch(&Config::default(), pod).unwrap(),
        )
        .unwrap();
        patched
    }

    #[test]
    fn strips_only_a_trailing_pair_of_statsd_flags() {
        let flags = "--statsd-host=localhost:9125 --statsd-prefix=api";
        assert_eq!(strip_statsd_flags(flags), Some(None));
        assert_eq!(
            strip_statsd_flags(&format!("--workers 4 {flags}")),
            Some(Some("--workers 4"))
        );
        assert_eq!(strip_statsd_flags("--workers 4"), None);
        assert_eq!(
            strip_statsd_flags("--statsd-host=a:1 --workers 4"),
            None,
            "flags not at the end are the user's"
        );
        assert_eq!(strip_statsd_flags(&format!("--workers 4{flags}")), None);
    }

    #[test]
    fn a_pod_without_marks_gives_no_patch() {
        let pod = json!({"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [
            {"name": "app", "env": [{"name": "GUNICORN_CMD_ARGS", "value": "--statsd-host=x:1 --statsd-prefix=y"}]},
            {"name": "statsd-exporter", "image": "someone-elses"},
        ]}});
        assert_eq!(uninject_patch(&Config::default(), &pod), None);
    }

    #[test]
    fn a_recorded_skip_is_removed_and_nothing_else() {
        let pod = json!({
            "metadata": {"annotations": {"metrics.chiller.io/skipped": "host_network", "team": "shop"}},
            "spec": {"hostNetwork": true, "containers": [{"name": "app"}]},
        });
        let patched = uninjected(&pod);
        assert_eq!(
            patched["metadata"],
            json!({"annotations": {"team": "shop"}})
        );
        assert_eq!(patched["spec"], pod["spec"]);
    }

    #[test]
    fn a_skipped_pods_own_statsd_exporter_stays() {
        let pod = json!({
            "metadata": {"annotations": {"metrics.chiller.io/skipped": "name_conflict"}},
            "spec": {"containers": [{"name": "app"}, {"name": "statsd-exporter", "image": "theirs"}]},
        });
        let patched = uninjected(&pod);
        assert_eq!(patched["metadata"], json!({}));
        assert_eq!(patched["spec"], pod["spec"]);
    }

    #[test]
    fn the_users_default_container_for_another_container_stays() {
        let keys = Config::default().keys();
        let pod = json!({
            "metadata": {
                "labels": {keys.injected.clone(): "true"},
                "annotations": {keys::DEFAULT_CONTAINER: "worker", keys.status.clone(): "{}"},
            },
            "spec": {"containers": [{"name": "app"}, {"name": "worker"}]},
        });
        let patched = uninjected(&pod);
        assert_eq!(
            patched["metadata"],
            json!({"annotations": {keys::DEFAULT_CONTAINER: "worker"}})
        );
    }
}
