//! The thin layer that reads the object, its namespace, the webhook
//! configuration and the release's config through the user's kubeconfig.

use std::future::Future;

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{ConfigMap, Namespace, Pod},
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
    cli::check::TIMEOUT,
    cluster::parse_version,
    config::Config,
    inject::{Injector, ResolvedMode},
};

async fn api<T>(
    action: &'static str,
    what: impl Into<String>,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ExplainError> {
    let what = what.into();
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(result) => result.map_err(|source| ExplainError::Api {
            action,
            what,
            source,
        }),
        Err(_) => Err(ExplainError::Timeout {
            what: format!("{action} {what}"),
            seconds: TIMEOUT.as_secs(),
        }),
    }
}

async fn client() -> Result<Client, ExplainError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(ExplainError::Kubeconfig)?;
    config.connect_timeout = Some(TIMEOUT);
    config.read_timeout = Some(TIMEOUT);
    config.write_timeout = Some(TIMEOUT);
    Client::try_from(config).map_err(ExplainError::Client)
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
    let client = client().await?;
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

/// The release's config (its ConfigMap `NAME-config`), so that the decision
/// is the webhook's; the defaults when there is none.
async fn release_config(
    client: &Client,
    args: &ExplainArgs,
) -> Result<(Config, String), ExplainError> {
    let name = format!("{}-config", args.name);
    let where_ = format!("ConfigMap {}/{name}", args.install_namespace);
    let map = api(
        "get",
        where_.clone(),
        Api::<ConfigMap>::namespaced(client.clone(), &args.install_namespace).get_opt(&name),
    )
    .await?;
    let Some(map) = map else {
        return Ok((
            Config::default(),
            format!("config: defaults ({where_} not found)"),
        ));
    };
    let data = map.data.unwrap_or_default();
    let text = data
        .get("config.yaml")
        .or_else(|| data.values().next())
        .cloned()
        .unwrap_or_default();
    let parsed = Config::from_yaml(&text)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            config
                .validate()
                .map(|()| config)
                .map_err(|e| e.to_string())
        });
    Ok(match parsed {
        Ok(config) => (config, format!("config: {where_}")),
        Err(error) => (
            Config::default(),
            format!("config: defaults ({where_} is invalid: {error})"),
        ),
    })
}
