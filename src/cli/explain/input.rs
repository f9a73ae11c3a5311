//! `explain -f FILE`: everything from files and flags, no cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use serde::Deserialize;
use serde_json::Value;

use super::{
    ExplainArgs,
    decide::{self, Explanation, Inputs, NamespaceFacts, Subject, WebhookFacts, our_webhook},
};
use crate::{
    cli::offline::{OfflineError, read_input},
    config::{Config, ConfigError, DEFAULT_DOMAIN, Overrides},
    inject::{Injector, ResolvedMode},
    manifest::{PodTarget, pod_targets},
};

/// The webhook configuration the chart and the kustomize base ship.
const SHIPPED_WEBHOOK: &str = include_str!("../../../manifests/base/webhook.yaml");

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(transparent)]
    Read(#[from] OfflineError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path} is not valid YAML: {source}")]
    Yaml {
        path: String,
        #[source]
        source: serde_norway::Error,
    },
    #[error("{path} has no Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob")]
    NoPod { path: String },
    #[error("--namespace-labels: {0:?} is not KEY=VALUE")]
    Label(String),
    #[error("{path}: {reason}")]
    Webhook { path: String, reason: String },
}

/// The first pod or pod template of `object`, as a [`Subject`].
pub fn subject_of(object: &Value, default_namespace: &str, existing_pod: bool) -> Option<Subject> {
    let mut targets: Vec<PodTarget> = Vec::new();
    pod_targets(object, "", &mut targets);
    let target = targets.into_iter().next()?;
    let item = object.pointer(
        target
            .pointer
            .trim_end_matches(template_suffix(&target.pointer)),
    )?;
    let kind = item
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_lowercase();
    let text = |path: &str| item.pointer(path).and_then(Value::as_str);
    Some(Subject {
        existing_pod: existing_pod && kind == "pod",
        kind,
        namespace: text("/metadata/namespace")
            .unwrap_or(default_namespace)
            .to_string(),
        name: text("/metadata/name").unwrap_or("<unnamed>").to_string(),
        pod: object.pointer(&target.pointer)?.clone(),
        job: target.job,
    })
}

/// The first pod or pod template of a manifest as `explain -f` reads it: a
/// pod with a `metadata.creationTimestamp` exists (as `kubectl get -o yaml`
/// prints it); generated manifests (`kubectl create --dry-run=client -o
/// yaml`) and AdmissionReview objects write `creationTimestamp: null`, and
/// are pods yet to be created.
pub fn subject_of_manifest(object: &Value, default_namespace: &str) -> Option<Subject> {
    let existing = object
        .pointer("/metadata/creationTimestamp")
        .is_some_and(|created| !created.is_null());
    subject_of(object, default_namespace, existing)
}

/// The part of a target's pointer below its object.
fn template_suffix(pointer: &str) -> &'static str {
    ["/spec/jobTemplate/spec/template", "/spec/template"]
        .into_iter()
        .find(|suffix| pointer.ends_with(suffix))
        .unwrap_or("")
}

pub fn parse_labels(pairs: &[String]) -> Result<BTreeMap<String, String>, InputError> {
    pairs
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| InputError::Label(pair.clone()))
        })
        .collect()
}

/// The shipped webhook configuration, with `domain` in its keys.
pub fn shipped_webhook(domain: &str) -> MutatingWebhookConfiguration {
    let text = SHIPPED_WEBHOOK.replace(DEFAULT_DOMAIN, domain);
    serde_norway::from_str(&text).expect("the shipped webhook configuration parses")
}

/// The MutatingWebhookConfiguration named `name` in a YAML stream, or its only one.
fn webhook_from_file(
    path: &str,
    text: &str,
    name: &str,
) -> Result<MutatingWebhookConfiguration, InputError> {
    let mut found = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|source| InputError::Yaml {
            path: path.to_string(),
            source,
        })?;
        if value.get("kind").and_then(Value::as_str) == Some("MutatingWebhookConfiguration") {
            found.push(value);
        }
    }
    let named = |v: &&Value| v.pointer("/metadata/name").and_then(Value::as_str) == Some(name);
    let chosen = match found.iter().find(named) {
        Some(value) => value.clone(),
        None if found.len() == 1 => found.remove(0),
        None => {
            return Err(InputError::Webhook {
                path: path.to_string(),
                reason: format!(
                    "no MutatingWebhookConfiguration named {name} among {} found",
                    found.len()
                ),
            });
        }
    };
    serde_json::from_value(chosen).map_err(|e| InputError::Webhook {
        path: path.to_string(),
        reason: format!("not a valid MutatingWebhookConfiguration: {e}"),
    })
}

pub fn explain_offline(args: &ExplainArgs) -> Result<Explanation, InputError> {
    let file = args.file.as_ref().expect("offline needs -f");
    let path = file.display().to_string();
    let config = Config::load(
        args.config.as_deref(),
        &Overrides {
            sidecar_mode: args.sidecar_mode,
            ..Default::default()
        },
    )?;
    let text = read_input(file)?;
    let default_namespace = args.namespace.as_deref().unwrap_or("default");
    let mut subject = None;
    for document in serde_norway::Deserializer::from_str(&text) {
        let value = Value::deserialize(document).map_err(|source| InputError::Yaml {
            path: path.clone(),
            source,
        })?;
        if let Some(found) = subject_of_manifest(&value, default_namespace) {
            subject = Some(found);
            break;
        }
    }
    let mut subject = subject.ok_or(InputError::NoPod { path: path.clone() })?;
    if let Some(namespace) = &args.namespace {
        subject.namespace = namespace.clone();
    }
    let webhook = match &args.webhook_file {
        Some(webhook_path) => {
            let shown = webhook_path.display().to_string();
            let text = read_input(webhook_path)?;
            let configuration = webhook_from_file(&shown, &text, &args.name)?;
            WebhookFacts {
                source: format!(
                    "{shown} (MutatingWebhookConfiguration {})",
                    configuration.metadata.name.clone().unwrap_or_default()
                ),
                webhook: our_webhook(configuration.webhooks, &config.domain),
            }
        }
        None => WebhookFacts {
            source: "the chart's defaults".into(),
            webhook: our_webhook(shipped_webhook(&config.domain).webhooks, &config.domain),
        },
    };
    let mut annotations = BTreeMap::new();
    if let Some(selector) = &args.pod_selector {
        annotations.insert(config.keys().pod_selector, selector.clone());
    }
    let namespace = NamespaceFacts {
        labels: parse_labels(&args.namespace_labels)?,
        annotations,
    };
    let config_source = match &args.config {
        Some(path) => format!("config: {}", path.display()),
        None => "config: defaults".to_string(),
    };
    let mode = ResolvedMode::resolve(config.sidecar.mode, None);
    let injector = Injector::new(config, mode);
    let mut explanation = decide::explain(&Inputs {
        subject: &subject,
        namespace: Some(&namespace),
        webhook: &webhook,
        injector: &injector,
    });
    explanation.sources.push(config_source);
    Ok(explanation)
}
