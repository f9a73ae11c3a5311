//! Offline injection into rendered manifests (`chiller-metrics inject -f`),
//! like `istioctl kube-inject`: Pods and the pod templates of workloads get the
//! same patch the webhook would return; everything else passes through.

use serde::Deserialize;
use serde_json::Value;

use crate::inject::{Decision, Injector, PodContext, PodView};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {number} is not valid YAML: {source}")]
    Yaml {
        /// Counted from 1, as a reader counts.
        number: usize,
        #[source]
        source: serde_norway::Error,
    },
    #[error("{object}: pod spec is not valid: {source}")]
    InvalidPod {
        object: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{object}: patch did not apply: {detail}")]
    Patch { object: String, detail: String },
    #[error("cannot write YAML: {0}")]
    Write(#[source] serde_norway::Error),
}

/// What happened to one pod or pod template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectResult {
    /// `Kind/name`.
    pub object: String,
    /// `None` when injected, else why not.
    pub skipped: Option<String>,
}

#[derive(Debug, Default)]
pub struct Injected {
    pub yaml: String,
    pub results: Vec<ObjectResult>,
}

/// Injects into every document of a multi-document YAML stream.
pub fn inject_yaml(injector: &Injector, input: &str) -> Result<Injected, ManifestError> {
    let mut out = Injected::default();
    let mut documents = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(input).enumerate() {
        let mut value = Value::deserialize(document).map_err(|source| ManifestError::Yaml {
            number: index + 1,
            source,
        })?;
        if value.is_null() {
            continue; // an empty document: only comments or `---`
        }
        inject_object(injector, &mut value, &mut out.results)?;
        documents.push(value);
    }
    for (i, document) in documents.iter().enumerate() {
        if i > 0 {
            out.yaml.push_str("---\n");
        }
        out.yaml
            .push_str(&serde_norway::to_string(document).map_err(ManifestError::Write)?);
    }
    Ok(out)
}

/// Injects into one object (recursing into `List` items).
pub fn inject_object(
    injector: &Injector,
    object: &mut Value,
    results: &mut Vec<ObjectResult>,
) -> Result<(), ManifestError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let label = format!("{kind}/{name}");
    let (template_path, job) = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
                for item in items {
                    inject_object(injector, item, results)?;
                }
            }
            return Ok(());
        }
        ("v1", "Pod") => ("", false),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            ("/spec/template", false)
        }
        ("batch/v1", "Job") => ("/spec/template", true),
        ("batch/v1", "CronJob") => ("/spec/jobTemplate/spec/template", true),
        _ => return Ok(()),
    };
    let Some(target) = object.pointer_mut(template_path) else {
        return Ok(());
    };
    if let Some(map) = target.as_object_mut() {
        map.entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
    }
    let pod = PodView::deserialize(&*target).map_err(|source| ManifestError::InvalidPod {
        object: label.clone(),
        source,
    })?;
    let ctx = PodContext {
        namespace: None,
        owner_hint: (!template_path.is_empty()).then_some(name.as_str()),
        job_template: job,
    };
    let decision = injector.mutate(&pod, ctx);
    drop(pod);
    let skipped = match decision {
        Decision::Inject { patch, .. } => {
            json_patch::patch(target, &patch).map_err(|e| ManifestError::Patch {
                object: label.clone(),
                detail: e.to_string(),
            })?;
            None
        }
        Decision::Skip(reason) => Some(reason.to_string()),
    };
    results.push(ObjectResult {
        object: label,
        skipped,
    });
    Ok(())
}
