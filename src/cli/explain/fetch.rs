//! The thin layer that reads the object, its namespace, the webhook
//! configuration and the release's config through the user's kubeconfig.

use std::future::Future;

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{Namespace, Pod},
    },
    serde::{Serialize, de::DeserializeOwned},
};
use kube::{Api, Client, Resource};
use serde_json::Value;

use super::{
    ExplainArgs, ExplainError, ObjectKind,
    decide::{self, Explanation, Inputs, NamespaceFacts, WebhookFacts, our_webhook},
    input::subject_of,
};
use crate::{
    cli::cluster_access,
    cluster::parse_version,
    config::Config,
    inject::{Injector, ResolvedMode},
};

async fn api<T>(
    action: &'static str,
    what: impl Into<String>,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ExplainError> {
    Ok(cluster_access::call(action, what, call).await?)
}

/// Reads one namespaced object as JSON, `apiVersion` and `kind` included.
async fn get_object<K>(client: &Client, namespace: &str, name: &str) -> Result<Value, ExplainError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let what = format!("{} {namespace}/{name}", K::kind(&()));
    let object = api(
        "get",
        what.clone(),
        Api::<K>::namespaced(client.clone(), namespace).get_opt(name),
    )
    .await?
    .ok_or(ExplainError::NotFound(what))?;
    let mut value = serde_json::to_value(object).expect("a Kubernetes object serializes");
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).into());
        map.insert("kind".into(), K::kind(&()).into());
    }
    Ok(value)
}

pub async fn explain_live(
    args: &ExplainArgs,
    kind: ObjectKind,
    namespace: &str,
    name: &str,
) -> Result<Explanation, ExplainError> {
    let client = cluster_access::client().await?;
    let object = match kind {
        ObjectKind::Pod => get_object::<Pod>(&client, namespace, name).await?,
        ObjectKind::Deployment => get_object::<Deployment>(&client, namespace, name).await?,
        ObjectKind::Statefulset => get_object::<StatefulSet>(&client, namespace, name).await?,
        ObjectKind::Daemonset => get_object::<DaemonSet>(&client, namespace, name).await?,
        ObjectKind::Job => get_object::<Job>(&client, namespace, name).await?,
        ObjectKind::Cronjob => get_object::<CronJob>(&client, namespace, name).await?,
    };
    let subject = subject_of(&object, namespace, true).ok_or_else(|| {
        ExplainError::NotFound(format!("the pod template of {kind:?} {namespace}/{name}"))
    })?;

    let namespace_facts = api(
        "get",
        format!("Namespace {namespace}"),
        Api::<Namespace>::all(client.clone()).get_opt(namespace),
    )
    .await?
    .map(|ns| NamespaceFacts {
        labels: ns.metadata.labels.unwrap_or_default(),
        annotations: ns.metadata.annotations.unwrap_or_default(),
    });
    let configuration = api(
        "get",
        format!("MutatingWebhookConfiguration {}", args.name),
        Api::<MutatingWebhookConfiguration>::all(client.clone()).get_opt(&args.name),
    )
    .await?;
    let (config, config_source) = release_config(&client, args).await?;
    let webhook = WebhookFacts {
        source: format!("MutatingWebhookConfiguration {}", args.name),
        webhook: configuration.and_then(|c| our_webhook(c.webhooks, &config.domain)),
    };
    let version = api("get", "the API server version", client.apiserver_version()).await?;
    let mode = ResolvedMode::resolve(
        config.sidecar.mode,
        parse_version(&version.major, &version.minor),
    );
    let injector = Injector::new(config, mode);
    let mut explanation = decide::explain(&Inputs {
        subject: &subject,
        namespace: namespace_facts.as_ref(),
        webhook: &webhook,
        injector: &injector,
    });
    explanation.sources.push(config_source);
    Ok(explanation)
}

/// The release's config, so that the decision is the webhook's.
async fn release_config(
    client: &Client,
    args: &ExplainArgs,
) -> Result<(Config, String), ExplainError> {
    Ok(cluster_access::release_config(client, &args.install_namespace, &args.name).await?)
}
