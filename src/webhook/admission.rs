//! The AdmissionReview protocol around the pure mutation.

use std::{
    cell::RefCell,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    time::Duration,
};

use kube::core::admission::Operation;

use super::envelope::{self, EnvelopeError, Object};

use crate::inject::{
    Decision, Injector, NamespacePolicy, PatchProblem, PodContext, PodPatch, PodView, SkipReason,
    check_pod, verify_patch,
};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// Looks up a namespace's policy; backed by a watched cache. Only a namespace
/// the watch has not delivered in time is read from the API server.
pub trait NamespacePolicies: Send + Sync {
    fn policy(&self, namespace: &str) -> Option<NamespacePolicy>;

    /// False until the namespaces are known (the cache has synced once):
    /// the webhook then injects nothing, since it cannot honour their settings.
    fn known(&self) -> bool {
        true
    }

    /// True when `namespace` is not in the synced cache. The API server only
    /// calls the webhook for opted-in namespaces, so the watch lags: the
    /// namespace was labeled or created a moment ago.
    fn is_missing(&self, _namespace: &str) -> bool {
        false
    }

    /// Waits, at most `within`, for `namespace` to reach the cache; true if it did.
    fn wait_for<'a>(
        &'a self,
        _namespace: &'a str,
        _within: Duration,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(std::future::ready(true))
    }
}

/// No cluster: only pod-level settings apply.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCluster;

impl NamespacePolicies for NoCluster {
    fn policy(&self, _namespace: &str) -> Option<NamespacePolicy> {
        None
    }
}

/// A request we cannot answer with an AdmissionReview (it becomes a 4xx).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("body is not a valid AdmissionReview: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error(
        "unsupported AdmissionReview {api_version:?}/{kind:?}; this webhook speaks {API_VERSION}/{KIND}"
    )]
    UnsupportedVersion { api_version: String, kind: String },
    #[error("AdmissionReview has no request")]
    MissingRequest,
    #[error("request.uid is empty")]
    MissingUid,
    #[error("CREATE request has no object")]
    MissingObject,
    #[error("request.object is not a valid Pod: {0}")]
    InvalidPod(#[source] serde_json::Error),
}

impl ReviewError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::MissingRequest => "missing_request",
            Self::MissingUid => "missing_uid",
            Self::MissingObject => "missing_object",
            Self::InvalidPod(_) => "invalid_pod",
        }
    }
}

/// How an answered review is counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(&'static str),
    /// Not a pod CREATE: nothing to do.
    Ignored(&'static str),
    /// An internal failure; the pod was allowed unpatched.
    Error(&'static str),
    /// The pod's namespace is not in the cache yet; allowed unpatched unless
    /// the caller waits for the cache and reviews again.
    NamespaceNotCached(String),
}

impl Outcome {
    pub fn labels(&self) -> (&'static str, &'static str) {
        match self {
            Self::Injected => ("injected", "injected"),
            Self::Skipped(reason) => ("skipped", reason),
            Self::Ignored(reason) => ("ignored", reason),
            Self::Error(reason) => ("error", reason),
            Self::NamespaceNotCached(_) => ("error", "namespace_not_cached"),
        }
    }
}

/// The answer to one review: allowed, with or without a patch. Written to the
/// wire by [`to_bytes`].
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub uid: String,
    /// The verified patch, when the pod is injected.
    pub patch: Option<PodPatch>,
    pub warnings: Vec<String>,
}

impl Answer {
    fn allowed(uid: String) -> Self {
        Self {
            uid,
            patch: None,
            warnings: Vec::new(),
        }
    }
}

/// Answers one AdmissionReview body. Every well-formed review is allowed;
/// internal failures fail open with a warning.
pub fn review(
    injector: &Injector,
    namespaces: &dyn NamespacePolicies,
    body: &[u8],
) -> Result<(Answer, Outcome), ReviewError> {
    let review = envelope::parse(body).map_err(|error| match error {
        EnvelopeError::Malformed(error) => ReviewError::Malformed(error),
        EnvelopeError::InvalidPod(error) => ReviewError::InvalidPod(error),
    })?;
    if review.api_version != API_VERSION || review.kind != KIND {
        return Err(ReviewError::UnsupportedVersion {
            api_version: review.api_version.into_owned(),
            kind: review.kind.into_owned(),
        });
    }
    let request = review.request.ok_or(ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::MissingUid);
    }
    let is_pod = request.is_pod();
    let response = Answer::allowed(request.uid.into_owned());
    if !is_pod {
        return Ok((response, Outcome::Ignored("not_a_pod")));
    }
    if request.operation != Operation::Create {
        return Ok((response, Outcome::Ignored("not_create")));
    }
    let pod = match request.object {
        Object::Pod(pod) => *pod,
        Object::Raw(raw) => envelope::view_raw(raw).map_err(ReviewError::InvalidPod)?,
        Object::Absent | Object::Skipped => return Err(ReviewError::MissingObject),
    };

    if !namespaces.known() {
        return Ok(namespaces_unknown(response));
    }
    let namespace = request
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref());
    if let Some(namespace) = namespace.filter(|ns| namespaces.is_missing(ns)) {
        return Ok(namespace_not_cached(response, namespace));
    }
    let policy = namespace.and_then(|ns| namespaces.policy(ns));
    let ctx = PodContext {
        namespace: policy.as_ref(),
        ..Default::default()
    };
    let (answer, outcome) = answer(
        response,
        &pod,
        || injector.mutate(&pod, ctx),
        |reason| injector.skip_mark(&pod, reason),
    );
    tracing::debug!(uid = answer.uid, namespace, ?outcome, "answered");
    Ok((answer, outcome))
}

/// Runs the mutation and turns its decision into the answer. Any failure on
/// the way (a panic, a patch that does not apply or would leave an invalid
/// pod) fails open: allowed, unpatched, with a warning. A skip that deserves
/// a warning is also recorded on the pod by `mark_skip`'s patch, since
/// nobody reads the warnings of pods a controller creates.
fn answer(
    mut response: Answer,
    pod: &PodView<'_>,
    mutate: impl FnOnce() -> Decision,
    mark_skip: impl FnOnce(&SkipReason) -> Option<PodPatch>,
) -> (Answer, Outcome) {
    let decision = match catch_unwind(AssertUnwindSafe(mutate)) {
        Ok(decision) => decision,
        Err(_) => return fail_open(response, "mutation panicked"),
    };
    match decision {
        Decision::Skip(reason) => {
            if reason.warrants_warning() {
                response
                    .warnings
                    .push(format!("chiller-metrics did not inject: {reason}"));
            }
            if let Some(mark) = mark_skip(&reason) {
                match verify_patch(pod, &mark) {
                    Ok(()) => response.patch = Some(mark),
                    // Recording the skip is a courtesy: never fail the pod over it.
                    Err(problem) => {
                        tracing::warn!(uid = %response.uid, error = %problem, "skip not recorded on the pod");
                    }
                }
            }
            (response, Outcome::Skipped(reason.metric_label()))
        }
        Decision::Inject {
            patch, warnings, ..
        } => {
            // Verify before answering: the patch must apply and leave a pod
            // the API server accepts. A rule the pod broke before the patch
            // is not the patch's doing: the API server decides on that pod.
            match verify_patch(pod, &patch) {
                Ok(()) => {}
                Err(PatchProblem::BreaksRule(_)) if check_pod(pod).is_err() => {}
                Err(problem) => return fail_open(response, &problem.to_string()),
            }
            response.patch = Some(patch);
            response.warnings = warnings
                .into_iter()
                .map(|w| format!("chiller-metrics: {w}"))
                .collect();
            (response, Outcome::Injected)
        }
    }
}

/// The namespace cache has not synced yet (the API server was unreachable at
/// start): allowed unpatched, never injected against a namespace's settings.
fn namespaces_unknown(mut response: Answer) -> (Answer, Outcome) {
    tracing::warn!(uid = %response.uid, "namespace cache not synced; pod allowed without injection");
    response.warnings = vec![
        "chiller-metrics did not inject: its namespace cache has not synced yet (is the API server reachable?)"
            .to_string(),
    ];
    (response, Outcome::Error("namespace_cache_not_synced"))
}

/// The namespace is not in the cache yet: allowed unpatched, since its
/// settings are not known.
fn namespace_not_cached(mut response: Answer, namespace: &str) -> (Answer, Outcome) {
    tracing::warn!(uid = %response.uid, namespace, "namespace not in the cache yet; pod allowed without injection");
    response.warnings = vec![format!(
        "chiller-metrics did not inject: namespace {namespace:?} is not in its cache yet"
    )];
    (response, Outcome::NamespaceNotCached(namespace.to_string()))
}

fn fail_open(mut response: Answer, why: &str) -> (Answer, Outcome) {
    tracing::warn!(uid = %response.uid, error = why, "internal error; pod allowed without injection");
    response.patch = None;
    response.warnings = vec![format!("chiller-metrics failed and did not inject: {why}")];
    (response, Outcome::Error("internal"))
}

thread_local! {
    /// The patch's JSON before it is base64-encoded into the response; kept
    /// per thread so that a review allocates no buffer for it.
    static PATCH_JSON: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A scratch buffer that grew past this is given back after use.
const PATCH_JSON_KEEP: usize = 64 * 1024;

/// The review's JSON body, as sent to the API server: the AdmissionReview
/// envelope with `patch` as a base64 string, as Kubernetes documents it on
/// the wire. The patch is serialized into a reused buffer and encoded
/// straight into the response.
pub fn to_bytes(answer: &Answer) -> Vec<u8> {
    PATCH_JSON.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        if let Some(patch) = &answer.patch {
            serde_json::to_writer(&mut *scratch, patch).expect("a patch serializes");
        }
        let out = write_response(answer, &scratch);
        if scratch.capacity() > PATCH_JSON_KEEP {
            *scratch = Vec::new();
        }
        out
    })
}

fn write_response(answer: &Answer, patch_json: &[u8]) -> Vec<u8> {
    use base64_simd::STANDARD;

    let warnings: usize = answer.warnings.iter().map(|w| w.len() + 8).sum();
    let capacity = 160 + answer.uid.len() + patch_json.len().div_ceil(3) * 4 + warnings;
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#,
    );
    serde_json::to_writer(&mut out, &answer.uid).expect("a string serializes");
    out.extend_from_slice(br#","allowed":true,"status":{}"#);
    if answer.patch.is_some() {
        out.extend_from_slice(br#","patch":""#);
        STANDARD.encode_append(patch_json, &mut out);
        out.extend_from_slice(br#"","patchType":"JSONPatch""#);
    }
    if !answer.warnings.is_empty() {
        out.extend_from_slice(br#","warnings":"#);
        serde_json::to_writer(&mut out, &answer.warnings).expect("strings serialize");
    }
    out.extend_from_slice(b"}}");
    out
}

/// The review as a JSON value, exactly as [`to_bytes`] writes it.
pub fn to_json(answer: &Answer) -> serde_json::Value {
    serde_json::from_slice(&to_bytes(answer)).expect("the response is JSON")
}

#[cfg(test)]
mod tests {
    use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
    use serde::Deserialize;
    use serde_json::json;

    use super::*;
    use crate::inject::InjectionStatus;

    type Pod = PodView<'static>;

    fn pod_json() -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "api"},
            "spec": {"containers": [{"name": "api", "image": "api:1"}]}
        })
    }

    fn response() -> Answer {
        Answer::allowed("uid-1".into())
    }

    fn inject(ops: Vec<PatchOperation>) -> Decision {
        Decision::Inject {
            patch: PodPatch::try_from(&Patch(ops)).unwrap(),
            status: InjectionStatus {
                version: "test".into(),
                sidecar: "statsd-exporter".into(),
                mode: crate::inject::ResolvedMode::Native,
                prefix: "api".into(),
                containers: vec!["api".into()],
                config_hash: String::new(),
                sidecar_hash: String::new(),
            },
            warnings: vec![],
        }
    }

    fn assert_failed_open(answer: (Answer, Outcome), why: &str) {
        let (answer, outcome) = answer;
        assert_eq!(outcome, Outcome::Error("internal"));
        let wire = to_json(&answer);
        assert_eq!(
            wire["response"]["allowed"], true,
            "an internal failure never blocks the pod"
        );
        assert_eq!(wire["response"]["uid"], "uid-1");
        assert!(answer.patch.is_none(), "no patch when failing open");
        assert!(
            wire["response"]["patch"].is_null(),
            "no patch when failing open"
        );
        assert!(!answer.warnings.is_empty(), "a warning");
        let warnings = answer.warnings.join(" ");
        assert!(
            warnings.contains("did not inject") && warnings.contains(why),
            "{warnings}"
        );
    }

    #[test]
    fn a_panicking_mutation_fails_open() {
        let pod = Pod::deserialize(pod_json()).unwrap();
        let answer = answer(response(), &pod, || panic!("boom"), |_| None);
        assert_failed_open(answer, "mutation panicked");
    }

    #[test]
    fn a_patch_that_does_not_apply_fails_open() {
        let pod = Pod::deserialize(pod_json()).unwrap();
        let broken = inject(vec![PatchOperation::Replace(ReplaceOperation {
            path: PointerBuf::parse("/spec/initContainers/7/name").unwrap(),
            value: json!("x"),
        })]);
        assert_failed_open(
            answer(response(), &pod, || broken, |_| None),
            "patch does not apply",
        );
    }

    #[test]
    fn a_patch_that_would_break_the_pod_fails_open() {
        let pod = Pod::deserialize(pod_json()).unwrap();
        let duplicate = inject(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/spec/containers/-").unwrap(),
            value: json!({"name": "api", "image": "other:1"}),
        })]);
        assert_failed_open(
            answer(response(), &pod, || duplicate, |_| None),
            "patched pod would be invalid",
        );
    }

    /// A pod that already breaks a rule (two containers named "api").
    fn invalid_pod() -> Pod {
        let mut value = pod_json();
        value["spec"]["containers"] = json!([
            {"name": "api", "image": "api:1"},
            {"name": "api", "image": "api:2"}
        ]);
        Pod::deserialize(value).unwrap()
    }

    #[test]
    fn a_patch_that_does_not_apply_fails_open_even_for_a_pod_already_invalid() {
        let broken = inject(vec![PatchOperation::Replace(ReplaceOperation {
            path: PointerBuf::parse("/spec/initContainers/7/name").unwrap(),
            value: json!("x"),
        })]);
        assert_failed_open(
            answer(response(), &invalid_pod(), || broken, |_| None),
            "patch does not apply",
        );
    }

    #[test]
    fn a_rule_the_pod_broke_before_is_not_blamed_on_the_patch() {
        let good = inject(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/metadata/labels").unwrap(),
            value: json!({"metrics.chiller.io/injected": "true"}),
        })]);
        let (answer, outcome) = answer(response(), &invalid_pod(), || good, |_| None);
        assert_eq!(outcome, Outcome::Injected);
        assert!(answer.patch.is_some());
    }

    #[test]
    fn a_good_patch_is_returned() {
        let pod = Pod::deserialize(pod_json()).unwrap();
        let good = inject(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/metadata/labels").unwrap(),
            value: json!({"metrics.chiller.io/injected": "true"}),
        })]);
        let (answer, outcome) = answer(response(), &pod, || good, |_| None);
        assert_eq!(outcome, Outcome::Injected);
        let wire = to_json(&answer);
        assert_eq!(wire["response"]["allowed"], true);
        assert!(answer.patch.is_some() && answer.warnings.is_empty());
        assert!(wire["response"]["warnings"].is_null());
    }

    /// A skip worth a warning is recorded on the pod by a patch of its own;
    /// the pod carrying that mark gets no patch the second time.
    #[test]
    fn a_warned_skip_is_recorded_on_the_pod_once() {
        let injector = Injector::new(
            crate::config::Config::default(),
            crate::inject::ResolvedMode::Native,
        );
        let mut value = pod_json();
        value["spec"]["hostNetwork"] = json!(true);
        let body = |pod: &serde_json::Value| {
            json!({
                "apiVersion": API_VERSION,
                "kind": KIND,
                "request": {
                    "uid": "u1",
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "operation": "CREATE",
                    "namespace": "shop",
                    "object": pod,
                },
            })
            .to_string()
        };
        let (first, outcome) = review(&injector, &NoCluster, body(&value).as_bytes()).unwrap();
        assert_eq!(outcome, Outcome::Skipped("host_network"));
        assert_eq!(first.warnings.len(), 1, "{:?}", first.warnings);
        let patch = first.patch.expect("the skip is recorded");
        json_patch::patch(&mut value, &patch.to_json_patch()).unwrap();
        assert_eq!(
            value["metadata"]["annotations"]["metrics.chiller.io/skipped"],
            "host_network"
        );
        let (second, outcome) = review(&injector, &NoCluster, body(&value).as_bytes()).unwrap();
        assert_eq!(outcome, Outcome::Skipped("host_network"));
        assert!(second.patch.is_none(), "{:?}", second.patch);

        // A routine skip (the user opted out) is not recorded.
        let mut opted_out = pod_json();
        opted_out["metadata"]["annotations"] = json!({"metrics.chiller.io/inject": "false"});
        let (answer, outcome) = review(&injector, &NoCluster, body(&opted_out).as_bytes()).unwrap();
        assert_eq!(outcome, Outcome::Skipped("opted_out"));
        assert!(answer.patch.is_none() && answer.warnings.is_empty());
    }

    /// The wire format: the patch is the base64 of its JSON, `patchType` goes
    /// with it, strings are escaped; the reused buffer leaves nothing behind.
    #[test]
    fn the_response_is_written_as_kubernetes_reads_it() {
        use base64::{Engine, engine::general_purpose::STANDARD};
        let patch = Patch(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/metadata/labels").unwrap(),
            value: json!({"metrics.chiller.io/injected": "tr\"ue\u{e9}"}),
        })]);
        let long = Patch(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/metadata/annotations").unwrap(),
            value: json!({"x": "y".repeat(100_000)}),
        })]);
        let with = |patch: Option<&Patch>, warnings: &[&str]| Answer {
            uid: "u\"1".into(),
            patch: patch.map(|p| PodPatch::try_from(p).unwrap()),
            warnings: warnings.iter().map(|w| w.to_string()).collect(),
        };
        let prebuilt = PodPatch(vec![
            crate::inject::Operation::add(
                PointerBuf::parse("/spec/volumes").unwrap(),
                crate::inject::Prebuilt::new(json!([{"name": "m\"ap", "configMap": {}}])),
            ),
            crate::inject::Operation::add(
                PointerBuf::parse("/metadata/labels/a").unwrap(),
                json!("b"),
            ),
        ]);
        for answer in [
            Answer {
                uid: "u\"1".into(),
                patch: Some(prebuilt),
                warnings: vec![],
            },
            with(Some(&long), &[]),
            with(Some(&patch), &["a \"quoted\" warning", "second"]),
            with(None, &["only a warning"]),
            with(None, &[]),
        ] {
            let wire = to_json(&answer);
            let mut expected = json!({
                "apiVersion": API_VERSION,
                "kind": KIND,
                "response": {"uid": "u\"1", "allowed": true, "status": {}},
            });
            if let Some(patch) = &answer.patch {
                let json_patch = serde_json::to_vec(&patch.to_json_patch()).unwrap();
                let encoded = STANDARD.encode(json_patch);
                expected["response"]["patch"] = json!(encoded);
                expected["response"]["patchType"] = json!("JSONPatch");
            }
            if !answer.warnings.is_empty() {
                expected["response"]["warnings"] = json!(answer.warnings);
            }
            assert_eq!(wire, expected);
        }
    }
}
