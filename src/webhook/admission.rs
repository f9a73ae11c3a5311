//! The AdmissionReview protocol around the pure mutation.

use std::{
    borrow::Cow,
    collections::HashMap,
    panic::{AssertUnwindSafe, catch_unwind},
};

use kube::core::{
    DynamicObject, Status, TypeMeta,
    admission::{AdmissionResponse, AdmissionReview, Operation},
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::inject::{
    Decision, Injector, NamespacePolicy, PatchProblem, PodContext, PodView, check_pod, verify_patch,
};

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

/// The parts of an AdmissionReview request this webhook reads. The pod stays
/// raw JSON until the request turns out to be a pod CREATE; everything else
/// (`oldObject`, `options`, `userInfo`, ...) is skipped without allocating.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IncomingReview<'a> {
    #[serde(borrow, default)]
    api_version: Cow<'a, str>,
    #[serde(borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    request: Option<IncomingRequest<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IncomingRequest<'a> {
    #[serde(default)]
    uid: String,
    #[serde(borrow)]
    kind: IncomingKind<'a>,
    #[serde(borrow, default)]
    sub_resource: Option<Cow<'a, str>>,
    operation: Operation,
    #[serde(borrow, default)]
    namespace: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct IncomingKind<'a> {
    #[serde(borrow, default)]
    group: Cow<'a, str>,
    #[serde(borrow, default)]
    version: Cow<'a, str>,
    #[serde(borrow, default)]
    kind: Cow<'a, str>,
}

/// Answers one AdmissionReview body. Every well-formed review is allowed;
/// internal failures fail open with a warning.
pub fn review(
    injector: &Injector,
    namespaces: &dyn NamespacePolicies,
    body: &[u8],
) -> Result<(AdmissionReview<DynamicObject>, Outcome), ReviewError> {
    let review: IncomingReview = serde_json::from_slice(body).map_err(ReviewError::Malformed)?;
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
    let response = allowed(request.uid);
    let is_pod =
        request.kind.group.is_empty() && request.kind.version == "v1" && request.kind.kind == "Pod";
    if !is_pod || request.sub_resource.is_some_and(|s| !s.is_empty()) {
        return Ok((response.into_review(), Outcome::Ignored("not_a_pod")));
    }
    if request.operation != Operation::Create {
        return Ok((response.into_review(), Outcome::Ignored("not_create")));
    }
    let object = request.object.ok_or(ReviewError::MissingObject)?;
    let pod: PodView = serde_json::from_str(object.get()).map_err(ReviewError::InvalidPod)?;

    let namespace = request
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref());
    let policy = namespace.and_then(|ns| namespaces.policy(ns));
    let ctx = PodContext {
        namespace: policy.as_ref(),
        ..Default::default()
    };
    let (review, outcome) = answer(response, &pod, || injector.mutate(&pod, ctx));
    let uid = review.response.as_ref().map(|r| r.uid.as_str());
    tracing::debug!(uid, namespace, ?outcome, "answered");
    Ok((review, outcome))
}

/// An "allowed" response with nothing else, for the request `uid`.
fn allowed(uid: String) -> AdmissionResponse {
    // kube-core builds responses from an `AdmissionRequest` (which we do not
    // parse) or as `invalid`; start from the latter and make it an allow.
    let mut response = AdmissionResponse::invalid("");
    response.types = TypeMeta {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
    };
    response.uid = uid;
    response.allowed = true;
    response.result = Status::default();
    response
}

/// Runs the mutation and turns its decision into the answer. Any failure on
/// the way (a panic, a patch that does not apply or would leave an invalid
/// pod) fails open: allowed, unpatched, with a warning.
fn answer(
    response: AdmissionResponse,
    pod: &PodView<'_>,
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
            // Verify before answering: the patch must apply and leave a pod
            // the API server accepts. A rule the pod broke before the patch
            // is not the patch's doing: the API server decides on that pod.
            match verify_patch(pod, &patch) {
                Ok(()) => {}
                Err(PatchProblem::BreaksRule(_)) if check_pod(pod).is_err() => {}
                Err(problem) => return fail_open(response, &problem.to_string()),
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

/// A review as Kubernetes documents it on the wire: `patch` is a base64
/// string (kube-core would write a byte array, which Go also accepts).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutgoingReview<'a> {
    api_version: &'a str,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<OutgoingResponse<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutgoingResponse<'a> {
    uid: &'a str,
    allowed: bool,
    status: &'a Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    audit_annotations: &'a HashMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warnings: Option<&'a Vec<String>>,
}

impl<'a> OutgoingReview<'a> {
    fn of(review: &'a AdmissionReview<DynamicObject>) -> Self {
        use base64::{Engine, engine::general_purpose::STANDARD};
        Self {
            api_version: &review.types.api_version,
            kind: &review.types.kind,
            response: review.response.as_ref().map(|r| OutgoingResponse {
                uid: &r.uid,
                allowed: r.allowed,
                status: &r.result,
                patch: r.patch.as_ref().map(|p| STANDARD.encode(p)),
                // kube-core only ever sets a JSONPatch, together with the patch.
                patch_type: r.patch.as_ref().map(|_| "JSONPatch"),
                audit_annotations: &r.audit_annotations,
                warnings: r.warnings.as_ref(),
            }),
        }
    }
}

/// The review's JSON body, as sent to the API server.
pub fn to_bytes(review: &AdmissionReview<DynamicObject>) -> Vec<u8> {
    serde_json::to_vec(&OutgoingReview::of(review)).expect("an AdmissionReview always serializes")
}

/// The review as a JSON value, exactly as [`to_bytes`] writes it.
pub fn to_json(review: &AdmissionReview<DynamicObject>) -> serde_json::Value {
    serde_json::to_value(OutgoingReview::of(review)).expect("an AdmissionReview always serializes")
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

    type Pod = PodView<'static>;

    fn pod_json() -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "api"},
            "spec": {"containers": [{"name": "api", "image": "api:1"}]}
        })
    }

    fn response() -> AdmissionResponse {
        allowed("uid-1".into())
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
        let pod = Pod::deserialize(pod_json()).unwrap();
        let answer = answer(response(), &pod, || panic!("boom"));
        assert_failed_open(answer, "mutation panicked");
    }

    #[test]
    fn a_patch_that_does_not_apply_fails_open() {
        let pod = Pod::deserialize(pod_json()).unwrap();
        let broken = inject(vec![PatchOperation::Replace(ReplaceOperation {
            path: PointerBuf::parse("/spec/initContainers/7/name").unwrap(),
            value: json!("x"),
        })]);
        assert_failed_open(answer(response(), &pod, || broken), "patch does not apply");
    }

    #[test]
    fn a_patch_that_would_break_the_pod_fails_open() {
        let pod = Pod::deserialize(pod_json()).unwrap();
        let duplicate = inject(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/spec/containers/-").unwrap(),
            value: json!({"name": "api", "image": "other:1"}),
        })]);
        assert_failed_open(
            answer(response(), &pod, || duplicate),
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
            answer(response(), &invalid_pod(), || broken),
            "patch does not apply",
        );
    }

    #[test]
    fn a_rule_the_pod_broke_before_is_not_blamed_on_the_patch() {
        let good = inject(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/metadata/labels").unwrap(),
            value: json!({"metrics.chiller.io/injected": "true"}),
        })]);
        let (review, outcome) = answer(response(), &invalid_pod(), || good);
        assert_eq!(outcome, Outcome::Injected);
        assert!(review.response.unwrap().patch.is_some());
    }

    #[test]
    fn a_good_patch_is_returned() {
        let pod = Pod::deserialize(pod_json()).unwrap();
        let good = inject(vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::parse("/metadata/labels").unwrap(),
            value: json!({"metrics.chiller.io/injected": "true"}),
        })]);
        let (review, outcome) = answer(response(), &pod, || good);
        assert_eq!(outcome, Outcome::Injected);
        let response = review.response.unwrap();
        assert!(response.allowed && response.patch.is_some() && response.warnings.is_none());
    }
}
