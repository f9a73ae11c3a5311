//! Golden files of the admission webhook.
//!
//! Every `tests/golden/requests/<name>.json` is a full AdmissionReview as the
//! API server sends it. The real `review` answers it, and the answer (patch
//! decoded, plus the pod after applying it) must equal
//! `tests/golden/expected/<name>.json`. Optional per request:
//! `<name>.config.yaml` (a chiller-metrics config file) and
//! `<name>.namespace.yaml` (the Namespace object, whose annotations give the
//! namespace policy).
//!
//! `UPDATE_GOLDEN=1 cargo test --test offline -- golden::` (or `make golden`) rewrites the
//! expected files and deletes orphaned ones.
//!
//! `explain -f` on every pod created here says "would be injected" exactly
//! when the webhook injected it.

use crate::support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use chiller_metrics::{
    cli::explain::decide::Outcome as ExplainOutcome,
    cluster::policy_from_namespace,
    config::Config,
    inject::{Injector, NamespacePolicy, ResolvedMode, check_pod},
    webhook::{
        NamespacePolicies,
        admission::{self, Outcome},
    },
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{Value, json};

const REQUEST_SUFFIX: &str = ".json";
const CONFIG_SUFFIX: &str = ".config.yaml";
const NAMESPACE_SUFFIX: &str = ".namespace.yaml";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The policy of the one namespace a fixture describes, as the watched cache would hold it.
struct FixtureNamespace {
    name: String,
    policy: NamespacePolicy,
    /// As explain reads them; none without a namespace file.
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

impl NamespacePolicies for FixtureNamespace {
    fn policy(&self, namespace: &str) -> Option<NamespacePolicy> {
        (namespace == self.name).then(|| self.policy.clone())
    }
}

/// One request and the settings it runs with.
struct Fixture {
    request: Value,
    injector: Injector,
    namespace: FixtureNamespace,
}

impl Fixture {
    fn load(name: &str) -> Result<Self, String> {
        let requests = golden_dir().join("requests");
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let request_path = requests.join(format!("{name}{REQUEST_SUFFIX}"));
        let request: Value = serde_json::from_str(&read(&request_path)?)
            .map_err(|e| format!("{} is not JSON: {e}", request_path.display()))?;

        let config_path = requests.join(format!("{name}{CONFIG_SUFFIX}"));
        let config = if config_path.exists() {
            let config = Config::from_yaml(&read(&config_path)?)
                .map_err(|e| format!("{}: {e}", config_path.display()))?;
            config
                .validate()
                .map_err(|e| format!("{}: {e}", config_path.display()))?;
            config
        } else {
            Config::default()
        };
        // No cluster is asked: `auto` resolves as it does without one.
        let mode = ResolvedMode::resolve(config.sidecar.mode, None);
        let keys = config.keys();
        let injector = Injector::new(config, mode);

        let namespace_path = requests.join(format!("{name}{NAMESPACE_SUFFIX}"));
        let namespace = if namespace_path.exists() {
            let object: Value = serde_norway::from_str(&read(&namespace_path)?)
                .map_err(|e| format!("{} is not YAML: {e}", namespace_path.display()))?;
            support::validate_k8s(&object)
                .map_err(|e| format!("{}: {e}", namespace_path.display()))?;
            let namespace: Namespace = serde_json::from_value(object)
                .map_err(|e| format!("{}: {e}", namespace_path.display()))?;
            FixtureNamespace {
                name: namespace.metadata.name.clone().unwrap_or_default(),
                policy: policy_from_namespace(&namespace, &keys),
                labels: namespace.metadata.labels.clone().unwrap_or_default(),
                annotations: namespace.metadata.annotations.clone().unwrap_or_default(),
            }
        } else {
            FixtureNamespace {
                name: String::new(),
                policy: NamespacePolicy::default(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
            }
        };
        Ok(Self {
            request,
            injector,
            namespace,
        })
    }

    /// Answers `request` with the real webhook code; returns the answer as
    /// the API server would read it, and how it was counted.
    fn answer(&self, request: &Value) -> Result<(Value, Outcome), String> {
        let body = serde_json::to_vec(request).expect("JSON serializes");
        let (review, outcome) = admission::review(&self.injector, &self.namespace, &body)
            .map_err(|e| format!("review failed: {e}"))?;
        Ok((admission::to_json(&review), outcome))
    }

    /// The readable golden document, after checking the invariants every answer must keep.
    fn run(&self) -> Result<Value, String> {
        let request = &self.request["request"];
        for key in ["object", "oldObject"] {
            if request[key].is_object() {
                support::validate_k8s(&request[key])
                    .map_err(|e| format!("the fixture's request.{key} is not valid: {e}"))?;
            }
        }
        let (mut answer, outcome) = self.answer(&self.request)?;
        let response = &answer["response"];
        if response["uid"] != request["uid"] {
            return Err(format!(
                "response.uid {} differs from request.uid {}",
                response["uid"], request["uid"]
            ));
        }
        if response["allowed"] != json!(true) {
            return Err(format!("the pod was not allowed: {response}"));
        }
        let (outcome_label, reason) = outcome.labels();
        let mut golden = json!({
            "outcome": {"outcome": outcome_label, "reason": reason},
        });

        match answer["response"]["patch"].as_str() {
            None => {
                if outcome == Outcome::Injected {
                    return Err("outcome is injected but the response has no patch".into());
                }
            }
            Some(encoded) => {
                let skipped = match outcome {
                    Outcome::Injected => None,
                    Outcome::Skipped(reason) => Some(reason),
                    _ => return Err(format!("outcome {outcome:?} but the response has a patch")),
                };
                if answer["response"]["patchType"] != "JSONPatch" {
                    return Err(format!(
                        "patchType is {}, not JSONPatch",
                        answer["response"]["patchType"]
                    ));
                }
                let bytes = STANDARD
                    .decode(encoded)
                    .map_err(|e| format!("patch is not base64: {e}"))?;
                let patch: json_patch::Patch = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("patch is not a JSON Patch: {e}"))?;
                let mut patched = request["object"].clone();
                json_patch::patch(&mut patched, &patch)
                    .map_err(|e| format!("patch does not apply to request.object: {e}"))?;
                match skipped {
                    None => self.check_patched(&patched)?,
                    Some(reason) => self.check_skip_mark(&request["object"], &patched, reason)?,
                }
                answer["response"]["patch"] =
                    serde_json::from_slice(&bytes).expect("checked above");
                golden["patchedPod"] = patched;
            }
        }
        golden["review"] = answer;
        Ok(golden)
    }

    /// A skip's patch only records the reason in the skipped annotation,
    /// and the marked pod gets the same skip without a patch.
    fn check_skip_mark(
        &self,
        original: &Value,
        patched: &Value,
        reason: &'static str,
    ) -> Result<(), String> {
        let key = "metrics.chiller.io/skipped";
        let mut expected = original.clone();
        if !expected["metadata"]["annotations"].is_object() {
            expected["metadata"]["annotations"] = json!({});
        }
        expected["metadata"]["annotations"][key] = json!(reason);
        if *patched != expected {
            return Err(format!(
                "the skip's patch changes more than {key}: {}",
                line_diff(&pretty(&expected), &pretty(patched))
            ));
        }
        let mut again = self.request.clone();
        again["request"]["object"] = patched.clone();
        let (answer, outcome) = self.answer(&again)?;
        if !answer["response"]["patch"].is_null() || outcome != Outcome::Skipped(reason) {
            return Err(format!(
                "the marked pod is not skipped the same way without a patch: outcome {outcome:?}, patch {}",
                answer["response"]["patch"]
            ));
        }
        Ok(())
    }

    fn check_patched(&self, patched: &Value) -> Result<(), String> {
        support::validate_k8s(patched)
            .map_err(|e| format!("the patched pod fails the Kubernetes schema: {e}"))?;
        let pod: Pod = serde_json::from_value(patched.clone())
            .map_err(|e| format!("the patched pod does not deserialize: {e}"))?;
        check_pod(&pod).map_err(|e| format!("the patched pod breaks a pod rule: {e}"))?;
        let mut again = self.request.clone();
        again["request"]["object"] = patched.clone();
        let (answer, outcome) = self.answer(&again)?;
        if !answer["response"]["patch"].is_null() || outcome != Outcome::Skipped("already_injected")
        {
            return Err(format!(
                "injecting the patched pod again is not a no-op: outcome {outcome:?}, patch {}",
                answer["response"]["patch"]
            ));
        }
        Ok(())
    }
}

/// The request names, and every file in `requests/` that belongs to none.
fn request_names() -> (Vec<String>, Vec<String>) {
    let dir = golden_dir().join("requests");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.strip_suffix(REQUEST_SUFFIX).map(str::to_string))
        .collect();
    let strays = files
        .iter()
        .filter(|f| {
            let owner = [REQUEST_SUFFIX, CONFIG_SUFFIX, NAMESPACE_SUFFIX]
                .iter()
                .find_map(|suffix| f.strip_suffix(suffix));
            owner.is_none_or(|owner| !names.iter().any(|n| n == owner))
        })
        .cloned()
        .collect();
    (names, strays)
}

fn expected_path(name: &str) -> PathBuf {
    golden_dir().join("expected").join(format!("{name}.json"))
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("JSON serializes");
    text.push('\n');
    text
}

#[test]
fn every_request_matches_its_golden_answer() {
    let (names, _) = request_names();
    assert!(
        names.len() >= 20,
        "expected the full fixture set in tests/golden/requests, found {names:?}"
    );
    let update = support::updating_golden();
    let mut failures = Vec::new();
    for name in &names {
        let golden = match Fixture::load(name).and_then(|fixture| fixture.run()) {
            Ok(golden) => golden,
            Err(error) => {
                failures.push(format!("{name}: {error}"));
                continue;
            }
        };
        let path = expected_path(name);
        let actual = pretty(&golden);
        if update {
            let current = std::fs::read_to_string(&path).ok();
            if current.as_deref() != Some(actual.as_str()) {
                std::fs::create_dir_all(path.parent().expect("has a parent"))
                    .expect("create expected/");
                std::fs::write(&path, &actual)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
                eprintln!("updated {}", path.display());
            }
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            failures.push(format!(
                "{name}: {} is missing; run `make golden` (UPDATE_GOLDEN=1 cargo test --test offline -- golden::) and review it",
                path.display()
            ));
            continue;
        };
        let expected: Value = match serde_json::from_str(&text) {
            Ok(value) => value,
            Err(e) => {
                failures.push(format!("{name}: {} is not JSON: {e}", path.display()));
                continue;
            }
        };
        if expected != golden {
            failures.push(format!(
                "{name}: the answer differs from {} (- expected, + actual); \
                 if the change is intended, run `make golden` and review the diff\n{}",
                path.display(),
                line_diff(&pretty(&expected), &actual)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} golden requests failed:\n\n{}",
        failures.len(),
        names.len(),
        failures.join("\n\n")
    );
}

/// Every pod CREATE of the fixtures, in an opted-in namespace (the API server
/// called the webhook for it) with the fixture's namespace annotations:
/// explain's verdict is "would be injected" exactly when the webhook
/// injected. The objects carry `creationTimestamp: null`, as the API server
/// sends them and as `kubectl create --dry-run=client -o yaml` writes them;
/// without the key they are new pods too.
#[test]
fn explain_agrees_with_the_webhook_on_every_pod_created() {
    let (names, _) = request_names();
    let (mut compared, mut injected) = (0, 0);
    let mut disagreements = Vec::new();
    for name in &names {
        let fixture = Fixture::load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let request = &fixture.request["request"];
        let pod_create = request["operation"] == "CREATE"
            && request["kind"]["kind"] == "Pod"
            && request.get("subResource").is_none();
        if !pod_create {
            continue;
        }
        let (_, outcome) = fixture
            .answer(&fixture.request)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let webhook_injects = outcome == Outcome::Injected;
        let namespace = request["namespace"].as_str().expect("a namespaced request");
        let (mut labels, annotations) = if fixture.namespace.name == namespace {
            (
                fixture.namespace.labels.clone(),
                fixture.namespace.annotations.clone(),
            )
        } else {
            Default::default()
        };
        labels.insert(
            fixture.injector.keys().inject.clone(),
            "enabled".to_string(),
        );
        let as_sent = request["object"].clone();
        assert!(
            as_sent["metadata"]["creationTimestamp"].is_null(),
            "{name}: the API server sends creationTimestamp: null"
        );
        let mut without = as_sent.clone();
        without["metadata"]
            .as_object_mut()
            .expect("the pod has metadata")
            .remove("creationTimestamp");
        for object in [&as_sent, &without] {
            let explanation = support::explain_manifest(
                object,
                namespace,
                labels.clone(),
                annotations.clone(),
                &fixture.injector,
            );
            let explain_injects = explanation.outcome == ExplainOutcome::WouldInject;
            if explain_injects != webhook_injects {
                disagreements.push(format!(
                    "{name}: the webhook answered {outcome:?}, explain says {:?}: {}",
                    explanation.outcome, explanation.verdict
                ));
            }
        }
        compared += 1;
        injected += usize::from(webhook_injects);
    }
    assert!(
        disagreements.is_empty(),
        "explain and the webhook disagree:\n{}",
        disagreements.join("\n")
    );
    // The fixtures hold pods of both kinds.
    assert!(compared >= 20, "only {compared} pod CREATEs compared");
    assert!(
        (8..compared).contains(&injected),
        "{injected} of {compared} pods injected"
    );
}

#[test]
fn no_orphaned_golden_files() {
    let (names, strays) = request_names();
    let wanted: BTreeSet<String> = names.iter().map(|n| format!("{n}.json")).collect();
    let dir = golden_dir().join("expected");
    let mut orphans: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            !wanted.contains(file.as_ref())
        })
        .collect();
    orphans.sort();
    if support::updating_golden() {
        for orphan in &orphans {
            std::fs::remove_file(orphan)
                .unwrap_or_else(|e| panic!("cannot remove {}: {e}", orphan.display()));
            eprintln!("removed orphaned {}", orphan.display());
        }
        orphans.clear();
    }
    assert!(
        orphans.is_empty(),
        "expected files without a request in tests/golden/requests (delete them or run `make golden`): {orphans:?}"
    );
    assert!(
        strays.is_empty(),
        "files in tests/golden/requests that belong to no <name>.json request: {strays:?}"
    );
}

#[test]
fn a_changed_answer_is_reported_as_a_diff() {
    let (names, _) = request_names();
    let name = names
        .iter()
        .find(|n| *n == "chiller-api")
        .expect("the chiller-api fixture exists");
    let golden = Fixture::load(name).and_then(|f| f.run()).unwrap();
    let mut changed = golden.clone();
    changed["patchedPod"]["metadata"]["labels"]["metrics.chiller.io/injected"] = json!("false");
    assert_ne!(golden, changed);
    let diff = line_diff(&pretty(&golden), &pretty(&changed));
    let changed: Vec<&str> = diff.lines().filter(|l| l.starts_with(['-', '+'])).collect();
    assert_eq!(
        changed,
        [
            "-         \"metrics.chiller.io/injected\": \"true\",",
            "+         \"metrics.chiller.io/injected\": \"false\",",
        ],
        "{diff}"
    );
    // Only the change and its context are shown.
    assert!(diff.lines().count() <= 2 + 2 * 3, "{diff}");
}

/// A line diff with a few lines of context (longest common subsequence).
fn line_diff(expected: &str, actual: &str) -> String {
    const CONTEXT: usize = 3;
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut lines: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            lines.push(('-', a[i]));
            i += 1;
        } else {
            lines.push(('+', b[j]));
            j += 1;
        }
    }
    let changed: Vec<usize> = (0..lines.len()).filter(|&k| lines[k].0 != ' ').collect();
    let mut out = String::new();
    let mut last_shown: Option<usize> = None;
    for (k, (sign, line)) in lines.iter().enumerate() {
        let near = changed
            .iter()
            .any(|&c| k + CONTEXT >= c && k <= c + CONTEXT);
        if !near {
            continue;
        }
        if last_shown.is_some_and(|last| last + 1 != k) {
            out.push_str("  ...\n");
        }
        let _ = writeln!(out, "{sign} {line}");
        last_shown = Some(k);
    }
    out
}
