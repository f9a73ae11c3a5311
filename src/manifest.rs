//! Offline injection into rendered manifests (`chiller-metrics inject -f`),
//! like `istioctl kube-inject`: Pods and the pod templates of workloads get the
//! same patch the webhook would return; everything else passes through.
//! `uninject` is the inverse ([`crate::uninject`]).
//!
//! A document that is not changed is written back byte for byte (comments,
//! `# Source:` lines, quoting). A changed document keeps its leading and
//! trailing comments and its key order; comments inside it are lost.

use json_patch::{Patch, PatchOperation};
use serde::Deserialize;
use serde_json::Value;
use serde_norway::Value as Yaml;

use crate::{
    config::Config,
    inject::{Decision, Injector, PodContext, PodView},
    uninject::uninject_patch,
};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {number} is not valid YAML: {source}")]
    Yaml {
        /// Counted from 1, as a reader counts.
        number: usize,
        #[source]
        source: serde_norway::Error,
    },
    #[error("document {number} cannot be read as JSON: {source}")]
    NotJson {
        number: usize,
        #[source]
        source: serde_json::Error,
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
    /// `None` when changed, else why not.
    pub skipped: Option<String>,
}

#[derive(Debug, Default)]
pub struct Injected {
    pub yaml: String,
    pub results: Vec<ObjectResult>,
}

/// A pod or a pod template inside a document.
#[derive(Debug, Clone)]
pub struct PodTarget {
    /// JSON pointer to the pod or template inside the document.
    pub pointer: String,
    /// `Kind/name` of the object it belongs to.
    pub label: String,
    /// Name of the workload, for a template.
    pub owner: Option<String>,
    /// The template belongs to a Job or CronJob.
    pub job: bool,
}

/// Where the pod template of a kind lives, and whether it runs to completion.
pub fn template_of(api_version: &str, kind: &str) -> Option<(&'static str, bool)> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(("", false)),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some(("/spec/template", false))
        }
        ("batch/v1", "Job") => Some(("/spec/template", true)),
        ("batch/v1", "CronJob") => Some(("/spec/jobTemplate/spec/template", true)),
        _ => None,
    }
}

/// Every pod and pod template of an object (recursing into `List` items).
pub fn pod_targets(object: &Value, base: &str, out: &mut Vec<PodTarget>) {
    let text = |key: &str| object.get(key).and_then(Value::as_str).unwrap_or_default();
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    if (api_version, kind) == ("v1", "List") {
        for (i, item) in object
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            pod_targets(item, &format!("{base}/items/{i}"), out);
        }
        return;
    }
    let Some((template, job)) = template_of(api_version, kind) else {
        return;
    };
    if object.pointer(template).is_none_or(|t| !t.is_object()) {
        return;
    }
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    out.push(PodTarget {
        pointer: format!("{base}{template}"),
        label: format!("{kind}/{name}"),
        owner: (!template.is_empty()).then(|| name.to_string()),
        job,
    });
}

/// A pod or template as the mutation reads it: `metadata` always present.
pub fn with_metadata(pod: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(map) = pod.as_object_mut() {
        map.entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
    }
    pod
}

/// Injects into every document of a multi-document YAML stream.
pub fn inject_yaml(injector: &Injector, input: &str) -> Result<Injected, ManifestError> {
    rewrite_yaml(input, |target, pod| {
        let view = PodView::deserialize(pod).map_err(|source| ManifestError::InvalidPod {
            object: target.label.clone(),
            source,
        })?;
        let ctx = PodContext {
            namespace: None,
            owner_hint: target.owner.as_deref(),
            job_template: target.job,
        };
        Ok(match injector.mutate(&view, ctx) {
            Decision::Inject { patch, .. } => Ok(patch),
            Decision::Skip(reason) => Err(reason.to_string()),
        })
    })
}

/// Removes what `inject` or the webhook added, from every document.
pub fn uninject_yaml(config: &Config, input: &str) -> Result<Injected, ManifestError> {
    rewrite_yaml(input, |_, pod| {
        Ok(uninject_patch(config, pod).ok_or_else(|| "not injected".to_string()))
    })
}

/// Applies `decide`'s patch to every pod and template; writes unchanged
/// documents back as they were.
fn rewrite_yaml(
    input: &str,
    mut decide: impl FnMut(&PodTarget, &Value) -> Result<Result<Patch, String>, ManifestError>,
) -> Result<Injected, ManifestError> {
    let mut out = Injected::default();
    for (index, chunk) in split_documents(input).into_iter().enumerate() {
        let number = index + 1;
        let yaml = Yaml::deserialize(serde_norway::Deserializer::from_str(chunk))
            .map_err(|source| ManifestError::Yaml { number, source })?;
        let json: Value = serde_json::to_value(&yaml)
            .map_err(|source| ManifestError::NotJson { number, source })?;
        let mut targets = Vec::new();
        pod_targets(&json, "", &mut targets);
        let mut changed = yaml.clone();
        let mut any = false;
        for target in &targets {
            let pod = with_metadata(json.pointer(&target.pointer).expect("target exists"));
            let skipped = match decide(target, &pod)? {
                Ok(patch) => {
                    let node = pointer_mut(&mut changed, &target.pointer)
                        .expect("the target exists in the YAML too");
                    ensure_metadata(node);
                    apply(node, &patch).map_err(|detail| ManifestError::Patch {
                        object: target.label.clone(),
                        detail,
                    })?;
                    any = true;
                    None
                }
                Err(reason) => Some(reason),
            };
            out.results.push(ObjectResult {
                object: target.label.clone(),
                skipped,
            });
        }
        if any {
            let (head, tail) = comments_around(chunk);
            out.yaml.push_str(head);
            out.yaml
                .push_str(&serde_norway::to_string(&changed).map_err(ManifestError::Write)?);
            out.yaml.push_str(tail);
        } else {
            out.yaml.push_str(chunk);
        }
    }
    Ok(out)
}

/// Splits a YAML stream into its documents' text, separators kept with the
/// document they start, so that concatenating the parts gives the input.
/// A document starts at a `---` line at column 0 (a block scalar's lines are
/// always indented, so they cannot be one); comments before the first one
/// belong to the first document.
pub fn split_documents(input: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut offset) = (0, 0);
    let mut started = false;
    for line in input.split_inclusive('\n') {
        let separator = is_separator(line);
        if separator && started {
            parts.push(&input[start..offset]);
            start = offset;
        }
        started |= separator || !is_blank_or_comment(line);
        offset += line.len();
    }
    parts.push(&input[start..]);
    parts
}

fn is_separator(line: &str) -> bool {
    let line = line.trim_end();
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t")
}

fn is_blank_or_comment(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#') || line == "..."
}

/// The lines before a document's first content line (separator, comments)
/// and after its last one (comments, `...`).
fn comments_around(chunk: &str) -> (&str, &str) {
    let lines: Vec<&str> = chunk.split_inclusive('\n').collect();
    let head_lines = lines
        .iter()
        .take_while(|l| is_separator(l) && l.trim_end() == "---" || is_blank_or_comment(l))
        .count();
    let tail_lines = lines[head_lines..]
        .iter()
        .rev()
        .take_while(|l| is_blank_or_comment(l))
        .count();
    let head: usize = lines[..head_lines].iter().map(|l| l.len()).sum();
    let tail: usize = lines[lines.len() - tail_lines..]
        .iter()
        .map(|l| l.len())
        .sum();
    let head_text = &chunk[..head];
    let tail_text = &chunk[chunk.len() - tail..];
    // The serializer ends with a newline; a head without one would glue to it.
    (head_text, tail_text)
}

fn ensure_metadata(node: &mut Yaml) {
    if let Yaml::Mapping(map) = node
        && !map.contains_key("metadata")
    {
        map.insert(
            Yaml::String("metadata".into()),
            Yaml::Mapping(Default::default()),
        );
    }
}

fn tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn child_mut<'a>(node: &'a mut Yaml, token: &str) -> Option<&'a mut Yaml> {
    match node {
        Yaml::Mapping(map) => map.get_mut(token),
        Yaml::Sequence(list) => list.get_mut(token.parse::<usize>().ok()?),
        _ => None,
    }
}

fn pointer_mut<'a>(node: &'a mut Yaml, pointer: &str) -> Option<&'a mut Yaml> {
    tokens(pointer)
        .iter()
        .try_fold(node, |node, token| child_mut(node, token))
}

/// Applies a JSON patch to YAML in place, keeping the key order: a new key
/// goes last, a replaced or removed one keeps the others where they are.
pub fn apply(doc: &mut Yaml, patch: &Patch) -> Result<(), String> {
    for op in &patch.0 {
        let (path, value) = match op {
            PatchOperation::Add(add) => (add.path.as_str(), Some(&add.value)),
            PatchOperation::Replace(replace) => (replace.path.as_str(), Some(&replace.value)),
            PatchOperation::Remove(remove) => (remove.path.as_str(), None),
            other => return Err(format!("unsupported operation {other:?}")),
        };
        let tokens = tokens(path);
        let (last, parents) = tokens
            .split_last()
            .ok_or_else(|| format!("{path}: cannot change the whole document"))?;
        let parent = parents
            .iter()
            .try_fold(&mut *doc, |node, token| child_mut(node, token))
            .ok_or_else(|| format!("{path}: parent does not exist"))?;
        let value = value
            .map(serde_norway::to_value)
            .transpose()
            .map_err(|e| format!("{path}: {e}"))?;
        let replace = matches!(op, PatchOperation::Replace(_));
        match (parent, value) {
            (Yaml::Mapping(map), Some(value)) => {
                if replace && !map.contains_key(last.as_str()) {
                    return Err(format!("{path}: nothing to replace"));
                }
                match map.get_mut(last.as_str()) {
                    Some(slot) => *slot = value,
                    None => {
                        map.insert(Yaml::String(last.clone()), value);
                    }
                }
            }
            (Yaml::Mapping(map), None) => {
                map.shift_remove(last.as_str())
                    .ok_or_else(|| format!("{path}: nothing to remove"))?;
            }
            (Yaml::Sequence(list), value) => {
                let index = if last == "-" && !replace && value.is_some() {
                    list.len()
                } else {
                    last.parse::<usize>()
                        .map_err(|_| format!("{path}: {last:?} is not an index"))?
                };
                let in_bounds = index < list.len() || (index == list.len() && !replace);
                match value {
                    Some(_) if !in_bounds => return Err(format!("{path}: index out of range")),
                    Some(value) if replace => list[index] = value,
                    Some(value) => list.insert(index, value),
                    None if index < list.len() => {
                        list.remove(index);
                    }
                    None => return Err(format!("{path}: index out of range")),
                }
            }
            _ => return Err(format!("{path}: parent is not a map or a list")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_byte() {
        let input =
            "# top\n---\n# Source: a.yaml\nkind: A\n---\nkind: B\n...\n---\n# only a comment\n";
        let parts = split_documents(input);
        assert_eq!(parts.concat(), input);
        assert_eq!(
            parts,
            [
                "# top\n---\n# Source: a.yaml\nkind: A\n",
                "---\nkind: B\n...\n",
                "---\n# only a comment\n",
            ]
        );
    }

    #[test]
    fn split_gives_each_empty_document_its_own_part() {
        assert_eq!(
            split_documents("---\n---\nkind: A\n"),
            ["---\n", "---\nkind: A\n"]
        );
        assert_eq!(
            split_documents("# c\n---\nkind: A\n"),
            ["# c\n---\nkind: A\n"]
        );
        assert_eq!(split_documents(""), [""]);
    }

    #[test]
    fn comments_around_a_document() {
        let chunk = "---\n# Source: x\nkind: A\n# inner\nname: b\n# trailing\n";
        assert_eq!(
            comments_around(chunk),
            ("---\n# Source: x\n", "# trailing\n")
        );
    }

    #[test]
    fn apply_keeps_key_order() {
        let mut doc: Yaml = serde_norway::from_str("z: 1\na: [x]\nm: {k: v}\n").unwrap();
        let patch: Patch = serde_json::from_value(serde_json::json!([
            {"op": "add", "path": "/a/-", "value": "y"},
            {"op": "add", "path": "/b", "value": 2},
            {"op": "replace", "path": "/z", "value": 3},
            {"op": "remove", "path": "/m/k"},
        ]))
        .unwrap();
        apply(&mut doc, &patch).unwrap();
        assert_eq!(
            serde_norway::to_string(&doc).unwrap(),
            "z: 3\na:\n- x\n- y\nm: {}\nb: 2\n"
        );
    }

    #[test]
    fn apply_rejects_what_json_patch_rejects() {
        let mut doc: Yaml = serde_norway::from_str("a: [x]\n").unwrap();
        for op in [
            serde_json::json!({"op": "replace", "path": "/b", "value": 1}),
            serde_json::json!({"op": "remove", "path": "/a/3"}),
            serde_json::json!({"op": "add", "path": "/c/d", "value": 1}),
        ] {
            let patch: Patch = serde_json::from_value(serde_json::json!([op])).unwrap();
            assert!(apply(&mut doc, &patch).is_err(), "{op}");
        }
    }
}
