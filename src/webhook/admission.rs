//! The AdmissionReview protocol around the pure mutation.

use std::panic::{AssertUnwindSafe, catch_unwind};

use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use serde::Deserialize;

use crate::inject::{Decision, Injector, NamespacePolicy, PodContext, check_pod};

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// Looks up a namespace's policy; backed by a watched cache, never an API call.
pub trait NamespacePolicies: Send + Sync {
    fn policy(&self, namespace: &str) -> Option<NamespacePolicy>;
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
}

impl Outcome {
    pub fn labels(&self) -> (&'static str, &'static str) {
        match self {
            Self::Injected => ("injected", "injected"),
            Self::Skipped(reason) => ("skipped", reason),
            Self::Ignored(reason) => ("ignored", reason),
            Self::Error(reason) => ("error", reason),
        }
    }
}

/// Answers one AdmissionReview body. Every well-formed review is allowed;
/// internal failures fail open with a warning.
pub fn review(
    injector: &Injector,
    namespaces: &dyn NamespacePolicies,
    body: &[u8],
) -> Result<(AdmissionReview<DynamicObject>, Outcome), ReviewError> {
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(ReviewError::Malformed)?;
    // The objects stay plain JSON (the pod is patched as JSON below); without
    // them the envelope parses cheaply, with no `DynamicObject` buffering.
    let object = value
        .get_mut("request")
        .and_then(serde_json::Value::as_object_mut)
        .and_then(|request| {
            request.remove("oldObject");
            request.remove("object")
        })
        .filter(|object| !object.is_null());
    let review =
        AdmissionReview::<DynamicObject>::deserialize(&value).map_err(ReviewError::Malformed)?;
    if review.types.api_version != API_VERSION || review.types.kind != KIND {
        return Err(ReviewError::UnsupportedVersion {
            api_version: review.types.api_version,
            kind: review.types.kind,
        });
    }
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::MissingUid);
    }
    let response = AdmissionResponse::from(&request);
    let is_pod =
        request.kind.group.is_empty() && request.kind.version == "v1" && request.kind.kind == "Pod";
    if !is_pod
        || request
            .sub_resource
            .as_deref()
            .is_some_and(|s| !s.is_empty())
    {
        return Ok((response.into_review(), Outcome::Ignored("not_a_pod")));
    }
    if request.operation != Operation::Create {
        return Ok((response.into_review(), Outcome::Ignored("not_create")));
    }
    let object = object.ok_or(ReviewError::MissingObject)?;
    let pod = Pod::deserialize(&object).map_err(ReviewError::InvalidPod)?;

    let namespace = request
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref());
    let policy = namespace.and_then(|ns| namespaces.policy(ns));
    let ctx = PodContext {
        namespace: policy.as_ref(),
        ..Default::default()
    };
    let outcome = answer(response, &pod, object, || injector.mutate(&pod, ctx));
    tracing::debug!(uid = %request.uid, namespace, outcome = ?outcome.1, "answered");
    Ok(outcome)
}

/// Runs the mutation and turns its decision into the answer. Any failure on
/// the way (a panic, a patch that does not apply or would leave an invalid
/// pod) fails open: allowed, unpatched, with a warning.
fn answer(
    response: AdmissionResponse,
    pod: &Pod,
    mut object: serde_json::Value,
    mutate: impl FnOnce() -> Decision,
) -> (AdmissionReview<DynamicObject>, Outcome) {
    let decision = match catch_unwind(AssertUnwindSafe(mutate)) {
        Ok(decision) => decision,
        Err(_) => return fail_open(response, "mutation panicked"),
    };
    match decision {
        Decision::Skip(reason) => {
            let mut response = response;
            if reason.warrants_warning() {
                response.warnings = Some(vec![format!("chiller-metrics did not inject: {reason}")]);
            }
            (
                response.into_review(),
                Outcome::Skipped(reason.metric_label()),
            )
        }
        Decision::Inject {
            patch, warnings, ..
        } => {
            // Verify before answering: the patch must apply and leave a pod the API server accepts.
            if let Err(e) = json_patch::patch(&mut object, &patch) {
                return fail_open(response, &format!("patch does not apply: {e}"));
            }
            let verdict = serde_json::from_value::<Pod>(object)
                .map_err(|e| e.to_string())
                .and_then(|patched| check_pod(&patched).map_err(|e| e.to_string()));
            if let Err(problem) = verdict
                && check_pod(pod).is_ok()
            {
                return fail_open(
                    response,
                    &format!("patched pod would be invalid: {problem}"),
                );
            }
            let unpatched = response.clone();
            let mut response = match response.with_patch(patch) {
                Ok(response) => response,
                Err(e) => return fail_open(unpatched, &e.to_string()),
            };
            if !warnings.is_empty() {
                response.warnings = Some(
                    warnings
                        .into_iter()
                        .map(|w| format!("chiller-metrics: {w}"))
                        .collect(),
                );
            }
            (response.into_review(), Outcome::Injected)
        }
    }
}

/// Serializes a review the way Kubernetes documents it: `patch` as a base64
/// string (kube-core would write a byte array, which Go also accepts).
pub fn to_json(review: &AdmissionReview<DynamicObject>) -> serde_json::Value {
    use base64::{Engine, engine::general_purpose::STANDARD};
    // Leave the patch out of the generic serialization: as a byte array it
    // would become one JSON number per byte.
    let mut without_patch = review.clone();
    let patch = without_patch.response.as_mut().and_then(|r| r.patch.take());
    let mut value =
        serde_json::to_value(&without_patch).expect("an AdmissionReview always serializes");
    if let Some(patch) = patch {
        value["response"]["patch"] = serde_json::Value::String(STANDARD.encode(patch));
    }
    value
}

fn fail_open(
    mut response: AdmissionResponse,
    why: &str,
) -> (AdmissionReview<DynamicObject>, Outcome) {
    tracing::warn!(uid = %response.uid, error = why, "internal error; pod allowed without injection");
    response.warnings = Some(vec![format!(
        "chiller-metrics failed and did not inject: {why}"
    )]);
    (response.into_review(), Outcome::Error("internal"))
}

#[cfg(test)]
mod tests {
    use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
    use serde_json::json;

    use super::*;
    use crate::inject::InjectionStatus;

    fn pod_json() -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "api"},
            "spec": {"containers": [{"name": "api", "image": "api:1"}]}
        })
    }

    fn response() -> AdmissionResponse {
        let mut response = AdmissionResponse::invalid("");
        response.uid = "uid-1".into();
        response.allowed = true;
        response
    }

    fn inject(ops: Vec<PatchOperation>) -> Decision {
        Decision::Inject {
            patch: Patch(ops),
            status: InjectionStatus {
                version: "test".into(),
                sidecar: "statsd-exporter".into(),
                mode: crate::inject::ResolvedMode::Native,
                prefix: "api".into(),
                containers: vec!["api".into()],
            },
            warnings: vec![],
        }
    }

    fn assert_failed_open(answer: (AdmissionReview<DynamicObject>, Outcome), why: &str) {
        let (review, outcome) = answer;
        assert_eq!(outcome, Outcome::Error("internal"));
        let response = review.response.expect("a response");
        assert!(response.allowed, "an internal failure never blocks the pod");
        assert_eq!(response.uid, "uid-1");
        assert!(response.patch.is_none(), "no patch when failing open");
        let warnings = response.warnings.expect("a warning").join(" ");
        assert!(
            warnings.contains("did not inject") && warnings.contains(why),
            "{warnings}"
        );
    }

    #[test]
    fn a_panicking_mutation_fails_open() {
        let value = pod_json();
        let pod: Pod = serde_json::from_value(value.clone()).unwrap();
        let answer = answer(response(), &pod, value, || panic!("boom"));
        assert_failed_open(answer, "mutation panicked");
    }

    #[test]
    fn a_patch_that_does_not_apply_fails_open() {
        let value = pod_json();
        let pod: Pod = serde_json::from_value(value.clone()).unwrap();
        let broken = inject(vec![PatchOperation::Replace(ReplaceOperation {
            path: PointerBuf::parse("/spec/initContainers/7/name").unwrap(),
            value: json!("x"),
        })]);
        assert_failed_open(
            answer(response(), &pod, value, || broken),
            "patch does not apply",
        );
    }

    #[test]
    fn a_patch_that_would_break_the_pod_fails_open() {
        let value = pod_json();
        let pod: Pod = serde_json::from_value(value.clone()).unwrap();
        let duplicate = inject(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/spec/containers/-").unwrap(),
            value: json!({"name": "api", "image": "other:1"}),
        })]);
        assert_failed_open(
            answer(response(), &pod, value, || duplicate),
            "patched pod would be invalid",
        );
    }

    #[test]
    fn a_good_patch_is_returned() {
        let value = pod_json();
        let pod: Pod = serde_json::from_value(value.clone()).unwrap();
        let good = inject(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/metadata/labels").unwrap(),
            value: json!({"metrics.chiller.io/injected": "true"}),
        })]);
        let (review, outcome) = answer(response(), &pod, value, || good);
        assert_eq!(outcome, Outcome::Injected);
        let response = review.response.unwrap();
        assert!(response.allowed && response.patch.is_some() && response.warnings.is_none());
    }
}
