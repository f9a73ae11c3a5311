//! Offline injection into rendered manifests (`chiller-metrics inject -f`),
//! like `istioctl kube-inject`: Pods and the pod templates of workloads get the
//! same patch the webhook would return; everything else passes through.
//! `uninject` is the inverse ([`crate::uninject`]).
//!
//! A document that is not changed is written back byte for byte (comments,
//! `# Source:` lines, quoting). A changed document keeps its leading and
//! trailing comments and its key order; comments inside it are lost.

use json_patch::{Patch, PatchOperation, jsonptr::Pointer};
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
            Decision::Inject { patch, .. } => Ok(patch.to_json_patch()),
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
            out.yaml.push_str(&write_like(&changed, chunk)?);
            out.yaml.push_str(tail);
        } else {
            out.yaml.push_str(chunk);
        }
    }
    Ok(out)
}

/// Serializes `value`, indenting block sequences under their key when
/// `original` does (as `helm template` output does), so that a diff shows
/// the change rather than a new indentation.
fn write_like(value: &Yaml, original: &str) -> Result<String, ManifestError> {
    let plain = serde_norway::to_string(value).map_err(ManifestError::Write)?;
    let reads_back = |text: &str| serde_norway::from_str::<Yaml>(text).is_ok_and(|v| v == *value);
    let mut best = plain;
    if indents_sequences(original) {
        let indented = indent_sequences(&best);
        if reads_back(&indented) {
            best = indented;
        }
    }
    let respelled = keep_scalar_spelling(&best, original);
    Ok(if reads_back(&respelled) {
        respelled
    } else {
        best
    })
}

/// `(lead, key, value)` of a `  - key: value` (or `  key:`) line.
fn key_value(line: &str) -> Option<(&str, &str, &str)> {
    let body = line.trim_start_matches([' ', '-']);
    let lead = &line[..line.len() - body.len()];
    let body = body.trim_end();
    let (key, value) = match body.split_once(": ") {
        Some((key, value)) => (key, value),
        None => (body.strip_suffix(':')?, ""),
    };
    let plain_key = !key.is_empty() && !key.starts_with(['#', '{', '[', '&', '*', '!', '?']);
    plain_key.then_some((lead, key, value))
}

/// Writes a scalar, or a flow list, the way the original wrote the same key
/// and value (`image: "x"` stays quoted, `args: ["a", "b"]` stays a flow
/// list), where the serializer chose another spelling.
fn keep_scalar_spelling(text: &str, original: &str) -> String {
    let parse = |value: &str| serde_norway::from_str::<Yaml>(value).ok();
    let originals: Vec<(&str, &str, Option<Yaml>, &str)> = original
        .lines()
        .filter_map(|line| {
            let (lead, key, value) = key_value(line)?;
            Some((line, lead, parse(key), value))
        })
        .collect();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < lines.len() {
        let line = lines[at];
        let mut used = 1;
        let mut respelled = None;
        if let Some((lead, key, value)) = key_value(line.trim_end_matches('\n')) {
            let key = parse(key);
            // A key with a block list below it: the list is its value.
            let (value, snippet_lines) = if value.is_empty() && !lead.contains('-') {
                let block = lines[at + 1..]
                    .iter()
                    .take_while(|l| {
                        let indent = indent_of(l);
                        indent > lead.len()
                            || (indent == lead.len() && l[indent..].starts_with("- "))
                    })
                    .count();
                let snippet: String = lines[at + 1..=at + block]
                    .iter()
                    .map(|l| l.get(lead.len()..).unwrap_or(l))
                    .collect();
                (format!("\n{snippet}"), block + 1)
            } else {
                (value.to_string(), 1)
            };
            let ours = parse(&format!("k: {value}"));
            if ours.is_some() && (snippet_lines == 1 || value.trim_start().starts_with('-')) {
                respelled = originals
                    .iter()
                    .find(|(o, l, k, v)| {
                        *l == lead
                            && *k == key
                            && o.trim_end() != line.trim_end()
                            && !v.is_empty()
                            && parse(&format!("k: {v}")) == ours
                    })
                    .map(|(original_line, ..)| *original_line);
                if respelled.is_some() {
                    used = snippet_lines;
                }
            }
        }
        match respelled {
            Some(original_line) => {
                out.push_str(original_line);
                out.push('\n');
            }
            None => {
                for l in &lines[at..at + used] {
                    out.push_str(l);
                }
            }
        }
        at += used;
    }
    if !text.ends_with('\n') && out.ends_with('\n') {
        out.pop();
    }
    out
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_block_scalar_start(line: &str) -> bool {
    let line = line.trim_end();
    let Some((_, indicator)) = line.rsplit_once(' ') else {
        return false;
    };
    let mut chars = indicator.chars();
    matches!(chars.next(), Some('|' | '>'))
        && chars.all(|c| c.is_ascii_digit() || c == '-' || c == '+')
}

/// Does a `key:` line have its sequence items indented deeper than the key?
fn indents_sequences(text: &str) -> bool {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !is_blank_or_comment(l) && !is_separator(l))
        .collect();
    lines.windows(2).any(|pair| {
        let (key, item) = (pair[0], pair[1]);
        key.trim_end().ends_with(':')
            && item.trim_start().starts_with("- ")
            && indent_of(item) > indent_of(key)
    })
}

/// Moves every block sequence that starts at its key's column two columns
/// right, with everything inside it.
fn indent_sequences(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    // Columns of the dashes of the sequences we are inside of (as written).
    let mut sequences: Vec<usize> = Vec::new();
    let mut previous_key: Option<usize> = None;
    let mut block_scalar: Option<usize> = None;
    for line in text.split_inclusive('\n') {
        let indent = indent_of(line);
        let content = line.trim_start_matches(' ');
        let blank = content.trim().is_empty();
        if let Some(parent) = block_scalar {
            if blank || indent > parent {
                out.push_str(&" ".repeat(2 * sequences.len()));
                out.push_str(line);
                continue;
            }
            block_scalar = None;
        }
        let item = content.starts_with("- ") || content.trim_end() == "-";
        while let Some(&dash) = sequences.last() {
            if indent < dash || (indent == dash && !item) {
                sequences.pop();
            } else {
                break;
            }
        }
        if item && previous_key == Some(indent) && sequences.last() != Some(&indent) {
            sequences.push(indent);
        }
        out.push_str(&" ".repeat(2 * sequences.len()));
        out.push_str(line);
        // The key of `- - key:` sits after the dashes.
        let mut key_column = indent;
        let mut rest = content;
        while let Some(after_dash) = rest.strip_prefix("- ") {
            key_column += 2;
            rest = after_dash;
        }
        previous_key = rest.trim_end().ends_with(':').then_some(key_column);
        if is_block_scalar_start(content) {
            block_scalar = Some(indent);
        }
    }
    out
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

/// The decoded tokens of a JSON Pointer.
fn tokens(pointer: &Pointer) -> Vec<String> {
    pointer
        .tokens()
        .map(|token| token.decoded().into_owned())
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
    tokens(Pointer::parse(pointer).ok()?)
        .iter()
        .try_fold(node, |node, token| child_mut(node, token))
}

/// Applies a JSON patch to YAML in place, keeping the key order: a new key
/// goes last, a replaced or removed one keeps the others where they are.
pub fn apply(doc: &mut Yaml, patch: &Patch) -> Result<(), String> {
    for op in &patch.0 {
        let (path, value) = match op {
            PatchOperation::Add(add) => (&*add.path, Some(&add.value)),
            PatchOperation::Replace(replace) => (&*replace.path, Some(&replace.value)),
            PatchOperation::Remove(remove) => (&*remove.path, None),
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
    fn sequences_are_indented_like_helm_output() {
        let plain = "spec:\n  containers:\n  - name: a\n    args:\n    - x\n    - |-\n      - not an item\n      y\n    env: []\n  - name: b\nkind: Pod\n";
        let indented = indent_sequences(plain);
        assert_eq!(
            indented,
            "spec:\n  containers:\n    - name: a\n      args:\n        - x\n        - |-\n          - not an item\n          y\n      env: []\n    - name: b\nkind: Pod\n"
        );
        let a: Yaml = serde_norway::from_str(plain).unwrap();
        let b: Yaml = serde_norway::from_str(&indented).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            indent_sequences("list:\n- args:\n  - x\n  name: a\n"),
            "list:\n  - args:\n      - x\n    name: a\n"
        );
        assert!(indents_sequences("a:\n  - x\n"));
        assert!(!indents_sequences("a:\n- x\n"));
    }

    #[test]
    fn scalars_keep_their_original_spelling() {
        let original = "a:\n  image: \"x:1\"\n  - name: 'b'\n  n: 1\n  args: [\"p\", \"q\"]\n  \"helm.sh/hook\": x\n";
        let written = "a:\n  image: x:1\n  - name: b\n  n: '1'\n  args:\n  - p\n  - q\n  helm.sh/hook: x\n  new: y\n";
        assert_eq!(
            keep_scalar_spelling(written, original),
            "a:\n  image: \"x:1\"\n  - name: 'b'\n  n: '1'\n  args: [\"p\", \"q\"]\n  \"helm.sh/hook\": x\n  new: y\n",
            "a string '1' is not the number 1"
        );
        // A list that changed keeps the block form.
        assert_eq!(
            keep_scalar_spelling("args:\n- p\n- r\n", "args: [p, q]\n"),
            "args:\n- p\n- r\n"
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
