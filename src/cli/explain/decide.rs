//! The explanation itself: a pure function from what was read (the pod or
//! template, its namespace, the webhook configuration, the injector) to the
//! steps and a verdict. Steps 1–3 are the API server's (the webhook
//! configuration's selectors and matchConditions); steps 4–6 are the stages
//! of [`Injector::mutate`], the function the webhook calls: explain calls it
//! once and shows its [`Decision`], never deciding on its own.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhook;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    cel::{Admission, CelOutcome, admitted_pod},
    selector::{self, Requirement},
};
use crate::{
    inject::{
        Decision, Injector, NamespacePolicy, PodContext, PodView, ResolvedMode, SkipReason, Stage,
    },
    keys::DISABLED,
    manifest::with_metadata,
    uninject::{RecordedStatus, skipped_annotation, uninject_patch},
};

/// The label the API server sets on every namespace to its name.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The pod or pod template to explain.
#[derive(Debug, Clone)]
pub struct Subject {
    /// Lower-case kind as typed: `pod`, `deployment`, ...
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The pod, or the workload's pod template.
    pub pod: Value,
    /// The template belongs to a Job or CronJob.
    pub job: bool,
    /// A pod that exists (read from the cluster), not a template or a file.
    pub existing_pod: bool,
}

/// The namespace as read, or as given offline.
#[derive(Debug, Clone, Default)]
pub struct NamespaceFacts {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The webhook configuration: found (and where), or missing.
#[derive(Debug, Clone)]
pub struct WebhookFacts {
    /// Where it came from, e.g. `MutatingWebhookConfiguration chiller-metrics`.
    pub source: String,
    pub webhook: Option<MutatingWebhook>,
}

pub struct Inputs<'a> {
    pub subject: &'a Subject,
    /// `None`: the namespace does not exist.
    pub namespace: Option<&'a NamespaceFacts>,
    pub webhook: &'a WebhookFacts,
    pub injector: &'a Injector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Lets the pod through to the next step.
    Pass,
    /// Stops injection here.
    Fail,
    /// Cannot be decided offline or from what the configuration says.
    Unknown,
    /// The webhook stopped at an earlier step.
    #[serde(rename = "not-reached")]
    NotReached,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub number: u8,
    pub id: String,
    pub title: String,
    pub status: StepStatus,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// An existing pod that carries the sidecar.
    Injected,
    /// The webhook would inject.
    WouldInject,
    /// The API server would not call the webhook.
    NotCalled,
    /// The webhook would be called and leave the pod alone.
    Skipped,
    /// A step cannot be decided.
    Undetermined,
    /// An existing pod without the sidecar that would be injected if created now.
    Missed,
}

/// What an existing pod's status annotation records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExistingInjection {
    pub injected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub containers: Vec<String>,
    /// The reason the webhook recorded on a pod it skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// `pod shop/api`.
    pub object: String,
    pub outcome: Outcome,
    /// The one-line verdict.
    pub verdict: String,
    pub steps: Vec<Step>,
    /// For an existing pod: what was injected into it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existing: Option<ExistingInjection>,
    /// Where the webhook configuration and the config came from.
    pub sources: Vec<String>,
}

/// The webhook `inject.DOMAIN` of a configuration, or its first.
pub fn our_webhook(
    webhooks: Option<Vec<MutatingWebhook>>,
    domain: &str,
) -> Option<MutatingWebhook> {
    let mut webhooks = webhooks.unwrap_or_default();
    let ours = format!("inject.{domain}");
    let at = webhooks.iter().position(|w| w.name == ours).unwrap_or(0);
    (at < webhooks.len()).then(|| webhooks.swap_remove(at))
}

/// Explains `inputs.subject`. For an existing injected pod, the steps are
/// evaluated on the pod as it was before injection.
pub fn explain(inputs: &Inputs<'_>) -> Explanation {
    let subject = inputs.subject;
    let keys = inputs.injector.keys();
    let config = inputs.injector.config();
    let mut pod = with_metadata(&subject.pod);
    let existing = subject
        .existing_pod
        .then(|| existing_injection(&pod, &keys.status, &keys.injected, &config.domain));
    if existing.as_ref().is_some_and(|e| e.injected)
        && let Some(patch) = uninject_patch(config, &pod)
    {
        // The patch is built from this pod, so it applies.
        let _ = json_patch::patch(&mut pod, &patch);
    }
    let labels = string_map(pod.pointer("/metadata/labels"));
    let no_namespace = NamespaceFacts::default();
    let namespace = inputs.namespace.unwrap_or(&no_namespace);
    let mut namespace_labels = namespace.labels.clone();
    // The API server keeps this label equal to the name.
    namespace_labels.insert(NAME_LABEL.to_string(), subject.namespace.clone());
    let webhook = inputs.webhook.webhook.as_ref();

    let mut steps = Vec::new();
    steps.push(namespace_selector_step(inputs, webhook, &namespace_labels));
    steps.push(excluded_namespaces_step(
        &subject.namespace,
        webhook,
        &namespace_labels,
    ));
    steps.push(object_step(webhook, subject, &pod, &labels));
    let policy = NamespacePolicy::from_annotations(Some(&namespace.annotations), keys);
    steps.extend(webhook_steps(inputs, &pod, &policy));

    let object = format!("{} {}/{}", subject.kind, subject.namespace, subject.name);
    let (outcome, verdict) = verdict(&steps, existing.as_ref(), subject);
    let mut sources = vec![format!("webhook configuration: {}", inputs.webhook.source)];
    if existing.as_ref().is_some_and(|e| e.injected) {
        sources.push("steps evaluated on the pod without what injection added".into());
    }
    Explanation {
        object,
        outcome,
        verdict,
        steps,
        existing,
        sources,
    }
}

/// A step's number, id and title, to be given its outcome.
#[derive(Clone, Copy)]
struct Heading {
    number: u8,
    id: &'static str,
    title: &'static str,
}

impl Heading {
    fn step(self, status: StepStatus, detail: String) -> Step {
        Step {
            number: self.number,
            id: self.id.to_string(),
            title: self.title.to_string(),
            status,
            detail,
        }
    }

    fn pass(self, detail: String) -> Step {
        self.step(StepStatus::Pass, detail)
    }

    fn fail(self, detail: String) -> Step {
        self.step(StepStatus::Fail, detail)
    }
}

fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

fn unmet(requirements: &[Requirement]) -> Vec<&str> {
    requirements
        .iter()
        .filter(|r| !r.met)
        .map(|r| r.text.as_str())
        .collect()
}

/// Does one of the webhook's rules send pod CREATEs to it?
fn covers_pod_create(webhook: &MutatingWebhook) -> bool {
    let has = |list: &Option<Vec<String>>, wanted: &str| {
        list.iter().flatten().any(|v| v == wanted || v == "*")
    };
    webhook.rules.iter().flatten().any(|rule| {
        has(&rule.operations, "CREATE")
            && has(&rule.api_groups, "")
            && has(&rule.api_versions, "v1")
            && has(&rule.resources, "pods")
    })
}

fn namespace_selector_step(
    inputs: &Inputs<'_>,
    webhook: Option<&MutatingWebhook>,
    namespace_labels: &BTreeMap<String, String>,
) -> Step {
    let heading = Heading {
        number: 1,
        id: "namespace-selector",
        title: "namespace label and namespaceSelector",
    };
    let Some(webhook) = webhook else {
        return heading.fail(format!(
            "{} not found: the API server calls no webhook",
            inputs.webhook.source
        ));
    };
    if !covers_pod_create(webhook) {
        return heading.fail(format!(
            "webhook {}: its rules do not cover pod CREATE",
            webhook.name
        ));
    }
    if inputs.namespace.is_none() {
        return heading.fail(format!(
            "namespace {} does not exist",
            inputs.subject.namespace
        ));
    }
    let requirements = match selector::requirements(
        webhook.namespace_selector.as_ref(),
        namespace_labels,
        |key| key != NAME_LABEL,
    ) {
        Ok(requirements) => requirements,
        Err(error) => {
            return heading.fail(format!("the namespaceSelector is invalid: {error}"));
        }
    };
    let wanted = selector::describe(&requirements);
    match unmet(&requirements)[..] {
        [] if requirements.is_empty() => {
            heading.pass("the namespaceSelector selects every namespace".into())
        }
        [] => heading.pass(format!(
            "namespace {} matches {wanted}",
            inputs.subject.namespace
        )),
        ref missing => {
            let missing = missing.join(",");
            let namespace = &inputs.subject.namespace;
            let mut detail = format!("namespace {namespace} does not match {missing}");
            if missing != wanted {
                detail.push_str(&format!(" (the namespaceSelector wants {wanted})"));
            }
            let opt_in = format!("{}=enabled", inputs.injector.keys().inject);
            if missing.contains(&opt_in) {
                detail.push_str(&format!(
                    "; opt it in with `kubectl label namespace {namespace} {opt_in}`"
                ));
            }
            heading.fail(detail)
        }
    }
}

fn excluded_namespaces_step(
    namespace: &str,
    webhook: Option<&MutatingWebhook>,
    namespace_labels: &BTreeMap<String, String>,
) -> Step {
    let heading = Heading {
        number: 2,
        id: "excluded-namespaces",
        title: "excluded namespaces",
    };
    let Some(webhook) = webhook else {
        return heading.fail("no webhook configuration".into());
    };
    let requirements = match selector::requirements(
        webhook.namespace_selector.as_ref(),
        namespace_labels,
        |key| key == NAME_LABEL,
    ) {
        Ok(requirements) => requirements,
        Err(error) => {
            return heading.fail(format!("the namespaceSelector is invalid: {error}"));
        }
    };
    match unmet(&requirements)[..] {
        [] if requirements.is_empty() => {
            heading.pass("the namespaceSelector excludes no namespace by name".into())
        }
        [] => heading.pass(format!(
            "{namespace} is not excluded ({})",
            selector::describe(&requirements)
        )),
        ref missing => heading.fail(format!(
            "{namespace} is excluded by the namespaceSelector ({})",
            missing.join(",")
        )),
    }
}

fn object_step(
    webhook: Option<&MutatingWebhook>,
    subject: &Subject,
    pod: &Value,
    labels: &BTreeMap<String, String>,
) -> Step {
    let heading = Heading {
        number: 3,
        id: "object-selector",
        title: "objectSelector and matchConditions",
    };
    let Some(webhook) = webhook else {
        return heading.fail("no webhook configuration".into());
    };
    let mut notes = Vec::new();
    let mut status = StepStatus::Pass;
    match selector::requirements(webhook.object_selector.as_ref(), labels, |_| true) {
        Err(error) => {
            status = StepStatus::Fail;
            notes.push(format!("the objectSelector is invalid: {error}"));
        }
        Ok(requirements) => match unmet(&requirements)[..] {
            [] if requirements.is_empty() => notes.push("no objectSelector".to_string()),
            [] => notes.push(format!(
                "pod labels match the objectSelector {}",
                selector::describe(&requirements)
            )),
            ref missing => {
                status = StepStatus::Fail;
                notes.push(format!(
                    "pod labels do not match the objectSelector ({})",
                    missing.join(",")
                ));
            }
        },
    }
    // The API server: any false condition skips the webhook; else an
    // unknown one leaves it open; else an error goes by the failurePolicy.
    let admission =
        Admission::pod_create(&admitted_pod(pod, &subject.namespace), &subject.namespace);
    let (mut falses, mut unknowns, mut errors) = (0, 0, 0);
    for condition in webhook.match_conditions.iter().flatten() {
        let (name, expression) = (&condition.name, &condition.expression);
        match admission.evaluate(expression) {
            CelOutcome::True => notes.push(format!("matchCondition {name} is true")),
            CelOutcome::False => {
                falses += 1;
                notes.push(format!("matchCondition {name} is false: {expression}"));
            }
            CelOutcome::Unknown(reason) => {
                unknowns += 1;
                notes.push(format!(
                    "matchCondition {name} cannot be evaluated here ({reason}): {expression}"
                ));
            }
            CelOutcome::Error(error) => {
                errors += 1;
                notes.push(format!(
                    "matchCondition {name} fails with an error ({error}): {expression}"
                ));
            }
        }
    }
    if status == StepStatus::Pass {
        if falses > 0 {
            status = StepStatus::Fail;
        } else if unknowns > 0 {
            status = StepStatus::Unknown;
        } else if errors > 0 {
            status = StepStatus::Fail;
            // The API server's default is Fail.
            notes.push(match webhook.failure_policy.as_deref() {
                Some("Ignore") => "failurePolicy Ignore: the webhook is not called".to_string(),
                _ => "failurePolicy Fail: the API server rejects the pod".to_string(),
            });
        }
    }
    heading.step(status, notes.join("; "))
}

/// Steps 4–6: the stages of the webhook's one decision. Those before the
/// stage that decided passed; the one that decided says why; the webhook
/// never reaches those after it.
fn webhook_steps(inputs: &Inputs<'_>, pod: &Value, policy: &NamespacePolicy) -> Vec<Step> {
    let keys = inputs.injector.keys();
    let decision = decide(inputs, pod, policy);
    let decided = match &decision {
        Ok(Decision::Skip(reason)) => Some(reason.stage()),
        Ok(Decision::Inject { .. }) => None,
        Err(_) => Some(Stage::Wanted),
    };
    Stage::ALL
        .into_iter()
        .map(|stage| {
            let heading = stage_heading(stage);
            let (status, detail) = match (decided, &decision) {
                (Some(at), _) if stage > at => (
                    StepStatus::NotReached,
                    format!(
                        "not reached: the webhook decided at step {}",
                        stage_heading(at).number
                    ),
                ),
                (Some(at), Err(error)) if stage == at => (
                    StepStatus::Fail,
                    format!("the webhook cannot read the pod: {error}"),
                ),
                (Some(at), Ok(Decision::Skip(reason))) if stage == at => {
                    (StepStatus::Fail, skip_detail(reason, &keys.pod_selector))
                }
                (
                    None,
                    Ok(Decision::Inject {
                        status, warnings, ..
                    }),
                ) if stage == Stage::Fits => {
                    let mode = match status.mode {
                        ResolvedMode::Native => "native",
                        ResolvedMode::Container => "container",
                    };
                    let mut detail = format!(
                        "inject {} ({mode}) and configure container(s) {} with --statsd-prefix={}",
                        status.sidecar,
                        status.containers.join(","),
                        status.prefix
                    );
                    for warning in warnings {
                        detail.push_str(&format!("; {warning}"));
                    }
                    (StepStatus::Pass, detail)
                }
                _ => (StepStatus::Pass, passed_detail(stage, inputs, policy)),
            };
            heading.step(status, detail)
        })
        .collect()
}

/// A stage's step heading.
fn stage_heading(stage: Stage) -> Heading {
    let (number, id, title) = match stage {
        Stage::Wanted => (4, "opt-out", "already injected, or opted out"),
        Stage::Selected => (5, "pod-selector", "namespace pod-selector"),
        Stage::Fits => (6, "mutation", "the mutation's decision"),
    };
    Heading { number, id, title }
}

/// What a stage the pod got through checked.
fn passed_detail(stage: Stage, inputs: &Inputs<'_>, policy: &NamespacePolicy) -> String {
    let keys = inputs.injector.keys();
    match stage {
        Stage::Wanted => format!(
            "not injected yet; no {key}={DISABLED} label, no {key}: \"false\" annotation",
            key = keys.inject
        ),
        Stage::Selected => match &policy.pod_selector {
            Some(text) => format!("pod labels match {}={text:?}", keys.pod_selector),
            None => format!(
                "no {} annotation on the namespace: every pod",
                keys.pod_selector
            ),
        },
        Stage::Fits => "the sidecar fits the pod".to_string(),
    }
}

/// Why the webhook skips, in its own terms.
fn skip_detail(reason: &SkipReason, pod_selector_key: &str) -> String {
    match reason {
        SkipReason::NotSelected { selector, unmet } => format!(
            "pod labels do not match {pod_selector_key}={selector:?} (unmet: {})",
            unmet.join(", ")
        ),
        SkipReason::InvalidNamespaceSelector(error) => {
            format!("{error}: the webhook skips every pod of the namespace")
        }
        reason if reason.stage() == Stage::Fits => format!("skip: {reason}"),
        reason => reason.to_string(),
    }
}

/// The webhook's decision on the pod, as the review handler asks for it
/// (with what a template lacks: its workload's name, and whether a Job runs it).
fn decide(inputs: &Inputs<'_>, pod: &Value, policy: &NamespacePolicy) -> Result<Decision, String> {
    let subject = inputs.subject;
    let view = PodView::deserialize(pod).map_err(|error| error.to_string())?;
    let owner = (!subject.existing_pod && subject.kind != "pod").then_some(subject.name.as_str());
    let ctx = PodContext {
        namespace: Some(policy),
        owner_hint: owner,
        job_template: subject.job,
    };
    Ok(inputs.injector.mutate(&view, ctx))
}

fn existing_injection(
    pod: &Value,
    status_key: &str,
    injected_key: &str,
    domain: &str,
) -> ExistingInjection {
    let annotations = string_map(pod.pointer("/metadata/annotations"));
    let labels = string_map(pod.pointer("/metadata/labels"));
    let status: Option<Value> = annotations
        .get(status_key)
        .and_then(|s| serde_json::from_str(s).ok());
    let field = |name: &str| {
        status
            .as_ref()
            .and_then(|s| s.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let recorded = status
        .as_ref()
        .map(RecordedStatus::from_value)
        .unwrap_or_default();
    ExistingInjection {
        injected: status.is_some() || labels.get(injected_key).is_some_and(|v| v == "true"),
        version: field("version"),
        config_hash: field("configHash"),
        mode: field("mode"),
        prefix: recorded.prefix,
        containers: recorded.containers,
        skipped: annotations.get(&skipped_annotation(domain)).cloned(),
    }
}

fn verdict(
    steps: &[Step],
    existing: Option<&ExistingInjection>,
    subject: &Subject,
) -> (Outcome, String) {
    let pod = subject.existing_pod || subject.kind == "pod";
    let (would, would_not) = if pod {
        ("would be injected", "not injected")
    } else {
        (
            "its pods would be injected",
            "its pods would not be injected",
        )
    };
    let first = |status| steps.iter().find(|s| s.status == status);
    let decided = match (first(StepStatus::Fail), first(StepStatus::Unknown)) {
        (Some(fail), unknown) if unknown.is_none_or(|u| fail.number < u.number) => {
            let (outcome, why) = if fail.number <= 3 {
                (Outcome::NotCalled, "the webhook is not called")
            } else {
                (Outcome::Skipped, "the webhook leaves it alone")
            };
            (
                outcome,
                format!("{would_not}: {why} (step {}, {})", fail.number, fail.title),
            )
        }
        (_, Some(unknown)) => (
            Outcome::Undetermined,
            format!(
                "undetermined (step {}, {}, cannot be evaluated)",
                unknown.number, unknown.title
            ),
        ),
        _ => (Outcome::WouldInject, would.to_string()),
    };
    match existing {
        Some(injection) if injection.injected => {
            let version = injection.version.as_deref().unwrap_or("unknown version");
            let hash = injection
                .config_hash
                .as_deref()
                .map_or("no config hash recorded".to_string(), |h| format!("config {h}"));
            (
                Outcome::Injected,
                format!("injected (chiller-metrics {version}, {hash})"),
            )
        }
        Some(_) if decided.0 == Outcome::WouldInject => (
            Outcome::Missed,
            "not injected, but would be if created now (created before the namespace opted in, or while the webhook was unreachable): delete it or restart its workload".to_string(),
        ),
        _ => decided,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use StepStatus::{Fail, NotReached, Pass, Unknown};

    use k8s_openapi::api::admissionregistration::v1::MatchCondition;

    use super::*;
    use crate::{cli::explain::input::shipped_webhook, config::Config};

    const INJECT: &str = "metrics.chiller.io/inject";

    fn injector(mode: ResolvedMode) -> Injector {
        Injector::new(Config::default(), mode)
    }

    fn chart() -> WebhookFacts {
        WebhookFacts {
            source: "test".into(),
            webhook: shipped_webhook("metrics.chiller.io")
                .webhooks
                .and_then(|w| w.into_iter().next()),
        }
    }

    fn opted_in() -> NamespaceFacts {
        NamespaceFacts {
            labels: [(INJECT.to_string(), "enabled".to_string())].into(),
            annotations: BTreeMap::new(),
        }
    }

    fn pod(metadata: Value) -> Subject {
        Subject {
            kind: "pod".into(),
            namespace: "shop".into(),
            name: "api".into(),
            pod: json!({"metadata": metadata, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}),
            job: false,
            existing_pod: false,
        }
    }

    fn run(
        subject: &Subject,
        namespace: Option<&NamespaceFacts>,
        webhook: &WebhookFacts,
    ) -> Explanation {
        run_with(subject, namespace, webhook, &injector(ResolvedMode::Native))
    }

    fn run_with(
        subject: &Subject,
        namespace: Option<&NamespaceFacts>,
        webhook: &WebhookFacts,
        injector: &Injector,
    ) -> Explanation {
        explain(&Inputs {
            subject,
            namespace,
            webhook,
            injector,
        })
    }

    fn match_conditions(webhook: &mut WebhookFacts) -> &mut Vec<MatchCondition> {
        webhook
            .webhook
            .as_mut()
            .unwrap()
            .match_conditions
            .as_mut()
            .unwrap()
    }

    fn statuses(explanation: &Explanation) -> Vec<StepStatus> {
        explanation.steps.iter().map(|s| s.status).collect()
    }

    fn failed(explanation: &Explanation) -> Vec<u8> {
        explanation
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Fail)
            .map(|s| s.number)
            .collect()
    }

    #[test]
    fn an_opted_in_pod_would_be_injected() {
        let explanation = run(
            &pod(json!({"labels": {"app": "api"}})),
            Some(&opted_in()),
            &chart(),
        );
        assert_eq!(statuses(&explanation), [Pass; 6]);
        assert_eq!(explanation.outcome, Outcome::WouldInject);
        assert_eq!(explanation.verdict, "would be injected");
        assert!(
            explanation.steps[5].detail.contains("--statsd-prefix=api"),
            "{:?}",
            explanation.steps[5]
        );
        assert_eq!(
            explanation
                .steps
                .iter()
                .map(|s| s.number)
                .collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
    }

    #[test]
    fn a_namespace_without_the_label_is_not_called_with_a_hint() {
        let explanation = run(&pod(json!({})), Some(&NamespaceFacts::default()), &chart());
        assert_eq!(failed(&explanation), [1]);
        assert_eq!(explanation.outcome, Outcome::NotCalled);
        let detail = &explanation.steps[0].detail;
        assert!(
            detail.contains("does not match metrics.chiller.io/inject=enabled"),
            "{detail}"
        );
        assert!(
            detail.contains("kubectl label namespace shop metrics.chiller.io/inject=enabled"),
            "{detail}"
        );
        assert!(
            explanation.verdict.contains("step 1"),
            "{}",
            explanation.verdict
        );
    }

    #[test]
    fn an_excluded_namespace_fails_step_2_even_when_labeled() {
        let mut subject = pod(json!({}));
        subject.namespace = "kube-system".into();
        let explanation = run(&subject, Some(&opted_in()), &chart());
        assert_eq!(failed(&explanation), [2]);
        assert!(
            explanation.steps[1]
                .detail
                .contains("kube-system is excluded")
        );
        // The name label is the namespace's name, whatever the labels given say.
        let mut renamed = opted_in();
        renamed
            .labels
            .insert(NAME_LABEL.into(), "kube-system".into());
        let explanation = run(&pod(json!({})), Some(&renamed), &chart());
        assert_eq!(failed(&explanation), Vec::<u8>::new());
    }

    #[test]
    fn the_opt_out_label_stops_the_call_at_the_object_selector() {
        let explanation = run(
            &pod(json!({"labels": {INJECT: "disabled"}})),
            Some(&opted_in()),
            &chart(),
        );
        // The webhook, were it called, would stop at its first stage too.
        assert_eq!(
            statuses(&explanation),
            [Pass, Pass, Fail, Fail, NotReached, NotReached]
        );
        assert_eq!(explanation.outcome, Outcome::NotCalled);
        assert!(
            explanation.steps[2]
                .detail
                .contains("metrics.chiller.io/inject notin (disabled)")
        );
        assert!(
            explanation.steps[3]
                .detail
                .contains("opted out with the label metrics.chiller.io/inject=disabled"),
            "{:?}",
            explanation.steps[3]
        );
        assert_eq!(
            explanation.steps[4].detail,
            "not reached: the webhook decided at step 4"
        );
    }

    #[test]
    fn the_opt_out_annotation_is_the_webhooks_decision() {
        let explanation = run(
            &pod(json!({"annotations": {INJECT: "false"}})),
            Some(&opted_in()),
            &chart(),
        );
        assert_eq!(failed(&explanation), [4]);
        assert_eq!(explanation.outcome, Outcome::Skipped);
        assert!(
            explanation.steps[3]
                .detail
                .contains("opted out with the annotation")
        );
        assert!(
            explanation.verdict.contains("step 4"),
            "{}",
            explanation.verdict
        );
    }

    #[test]
    fn an_injected_label_fails_the_match_condition() {
        let explanation = run(
            &pod(json!({"labels": {"metrics.chiller.io/injected": "true"}})),
            Some(&opted_in()),
            &chart(),
        );
        assert_eq!(explanation.steps[2].status, Fail);
        assert!(
            explanation.steps[2]
                .detail
                .contains("matchCondition not-already-injected is false")
        );
    }

    #[test]
    fn an_unknown_match_condition_is_undetermined() {
        let mut webhook = chart();
        let conditions = match_conditions(&mut webhook);
        conditions[0].expression = "request.userInfo.username != 'system:admin'".into();
        let explanation = run(&pod(json!({})), Some(&opted_in()), &webhook);
        assert_eq!(explanation.steps[2].status, Unknown);
        assert_eq!(explanation.outcome, Outcome::Undetermined);
        assert!(explanation.steps[2].detail.contains("cannot be evaluated"));
        // A failing earlier step still decides.
        let explanation = run(&pod(json!({})), Some(&NamespaceFacts::default()), &webhook);
        assert_eq!(explanation.outcome, Outcome::NotCalled);
    }

    #[test]
    fn the_pod_selector_annotation_selects_or_skips() {
        let mut namespace = opted_in();
        namespace
            .annotations
            .insert("metrics.chiller.io/pod-selector".into(), "app!=db".into());
        let db = run(
            &pod(json!({"labels": {"app": "db"}})),
            Some(&namespace),
            &chart(),
        );
        assert_eq!(failed(&db), [5]);
        assert_eq!(db.outcome, Outcome::Skipped);
        assert_eq!(
            db.steps[4].detail,
            "pod labels do not match metrics.chiller.io/pod-selector=\"app!=db\" (unmet: app!=db)"
        );
        let api = run(
            &pod(json!({"labels": {"app": "api"}})),
            Some(&namespace),
            &chart(),
        );
        assert_eq!(api.outcome, Outcome::WouldInject);
        namespace.annotations.insert(
            "metrics.chiller.io/pod-selector".into(),
            "app in web".into(),
        );
        let invalid = run(
            &pod(json!({"labels": {"app": "api"}})),
            Some(&namespace),
            &chart(),
        );
        assert_eq!(failed(&invalid), [5]);
        assert!(invalid.steps[4].detail.contains("invalid label selector"));
    }

    #[test]
    fn match_conditions_on_the_spec_and_the_request_are_evaluated() {
        let mut webhook = chart();
        let conditions = match_conditions(&mut webhook);
        conditions.push(MatchCondition {
            name: "one-container".into(),
            expression: "object.spec.containers.size() == 1 && request.operation == 'CREATE'"
                .into(),
        });
        let explanation = run(&pod(json!({})), Some(&opted_in()), &webhook);
        assert_eq!(statuses(&explanation), [Pass; 6]);
        assert!(
            explanation.steps[2]
                .detail
                .contains("matchCondition one-container is true"),
            "{}",
            explanation.steps[2].detail
        );
        let mut two = pod(json!({}));
        two.pod["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "worker", "image": "app:1"}));
        let explanation = run(&two, Some(&opted_in()), &webhook);
        assert_eq!(explanation.outcome, Outcome::NotCalled);
        assert_eq!(explanation.steps[2].status, Fail);

        // An error (no hostNetwork field) goes by the failurePolicy: the chart's is Ignore.
        let conditions = match_conditions(&mut webhook);
        conditions[1].expression = "!object.spec.hostNetwork".into();
        let explanation = run(&pod(json!({})), Some(&opted_in()), &webhook);
        assert_eq!(explanation.steps[2].status, Fail);
        assert!(
            explanation.steps[2]
                .detail
                .contains("failurePolicy Ignore: the webhook is not called"),
            "{}",
            explanation.steps[2].detail
        );
    }

    #[test]
    fn the_mutation_decides_last() {
        let mut subject = pod(json!({}));
        subject.pod["spec"]["hostNetwork"] = json!(true);
        let explanation = run(&subject, Some(&opted_in()), &chart());
        assert_eq!(failed(&explanation), [6]);
        assert!(explanation.steps[5].detail.contains("host network"));
    }

    #[test]
    fn a_job_template_needs_the_native_mode() {
        let mut subject = pod(json!({}));
        subject.kind = "job".into();
        subject.name = "migrate".into();
        subject.job = true;
        let container = run_with(
            &subject,
            Some(&opted_in()),
            &chart(),
            &injector(ResolvedMode::Container),
        );
        assert_eq!(failed(&container), [6]);
        assert!(container.steps[5].detail.contains("run-to-completion"));
        assert_eq!(
            container.verdict.split(':').next(),
            Some("its pods would not be injected")
        );
        let native = run(&subject, Some(&opted_in()), &chart());
        assert_eq!(native.verdict, "its pods would be injected");
        // A template's prefix comes from its workload's name.
        assert!(native.steps[5].detail.contains("--statsd-prefix=migrate"));
    }

    #[test]
    fn no_webhook_configuration_or_no_namespace() {
        let missing = WebhookFacts {
            source: "MutatingWebhookConfiguration chiller-metrics".into(),
            webhook: None,
        };
        let explanation = run(&pod(json!({})), Some(&opted_in()), &missing);
        assert_eq!(failed(&explanation), [1, 2, 3]);
        assert!(
            explanation.steps[0]
                .detail
                .contains("MutatingWebhookConfiguration chiller-metrics not found")
        );
        let explanation = run(&pod(json!({})), None, &chart());
        assert_eq!(failed(&explanation), [1]);
        assert!(
            explanation.steps[0]
                .detail
                .contains("namespace shop does not exist")
        );
    }

    #[test]
    fn our_webhook_is_picked_by_name() {
        let named = |name: &str| MutatingWebhook {
            name: name.into(),
            ..Default::default()
        };
        let webhooks = vec![
            named("other.example.com"),
            named("inject.metrics.chiller.io"),
        ];
        assert_eq!(
            our_webhook(Some(webhooks), "metrics.chiller.io")
                .unwrap()
                .name,
            "inject.metrics.chiller.io"
        );
        let webhooks = vec![named("a.example.com"), named("b.example.com")];
        assert_eq!(
            our_webhook(Some(webhooks), "x").unwrap().name,
            "a.example.com"
        );
        assert!(our_webhook(None, "x").is_none());
    }

    #[test]
    fn rules_without_pod_create_are_never_called() {
        let mut webhook = chart();
        webhook.webhook.as_mut().unwrap().rules.as_mut().unwrap()[0].operations =
            Some(vec!["UPDATE".into()]);
        let explanation = run(&pod(json!({})), Some(&opted_in()), &webhook);
        assert_eq!(failed(&explanation), [1]);
        assert!(
            explanation.steps[0]
                .detail
                .contains("do not cover pod CREATE")
        );
    }

    #[test]
    fn an_existing_injected_pod_reports_its_config_and_is_explained_as_created() {
        let mut subject = pod(json!({"labels": {"app": "api"}}));
        subject.existing_pod = true;
        let injector = injector(ResolvedMode::Native);
        let Decision::Inject { patch, .. } = injector.mutate(
            &PodView::deserialize(&subject.pod).unwrap(),
            PodContext::default(),
        ) else {
            panic!("the pod is injected");
        };
        json_patch::patch(&mut subject.pod, &patch.to_json_patch()).unwrap();
        // A status annotation that records a config hash.
        let status_key = "/metadata/annotations/metrics.chiller.io~1status";
        let mut status: Value =
            serde_json::from_str(subject.pod.pointer(status_key).unwrap().as_str().unwrap())
                .unwrap();
        status["configHash"] = json!("abc123");
        *subject.pod.pointer_mut(status_key).unwrap() = json!(status.to_string());

        let explanation = run_with(&subject, Some(&opted_in()), &chart(), &injector);
        assert_eq!(explanation.outcome, Outcome::Injected);
        let existing = explanation.existing.as_ref().unwrap();
        assert!(existing.injected);
        assert_eq!(existing.config_hash.as_deref(), Some("abc123"));
        assert_eq!(existing.prefix.as_deref(), Some("api"));
        assert_eq!(existing.containers, ["app"]);
        assert!(
            explanation.verdict.contains("config abc123"),
            "{}",
            explanation.verdict
        );
        // Evaluated without our marks: the match condition passes.
        assert_eq!(statuses(&explanation), [Pass; 6]);
    }

    #[test]
    fn an_existing_pod_shows_the_skip_the_webhook_recorded() {
        let mut subject =
            pod(json!({"annotations": {"metrics.chiller.io/skipped": "host_network"}}));
        subject.pod["spec"]["hostNetwork"] = json!(true);
        subject.existing_pod = true;
        let explanation = run(&subject, Some(&opted_in()), &chart());
        let existing = explanation.existing.as_ref().unwrap();
        assert_eq!(existing.skipped.as_deref(), Some("host_network"));
        assert!(!existing.injected);
        assert_eq!(failed(&explanation), [6]);
        let text = crate::cli::explain::render(&explanation, crate::cli::check::OutputFormat::Text);
        assert!(
            text.contains("the webhook recorded on the pod: skipped, host_network"),
            "{text}"
        );
    }

    #[test]
    fn an_existing_pod_that_missed_injection() {
        let mut subject = pod(json!({"labels": {"app": "api"}}));
        subject.existing_pod = true;
        let explanation = run(&subject, Some(&opted_in()), &chart());
        assert_eq!(explanation.outcome, Outcome::Missed);
        assert!(!explanation.existing.as_ref().unwrap().injected);
        assert_eq!(explanation.existing.as_ref().unwrap().skipped, None);
        assert!(explanation.verdict.contains("would be if created now"));
        let explanation = run(&subject, Some(&NamespaceFacts::default()), &chart());
        assert_eq!(explanation.outcome, Outcome::NotCalled);
    }
}
