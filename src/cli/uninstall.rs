//! `chiller-metrics uninstall`: removes what `helm uninstall` does not know
//! about, in an order that never blocks a pod create. First the webhook
//! configuration (no pod create calls a webhook being torn down), then the
//! replicas (no reconcile loop re-creates what follows), then every object
//! the loop made in any namespace, its Lease, and the certificates
//! cert-manager issued for the release. `helm uninstall` removes the rest.

use std::time::Duration;

use clap::Args;
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration, apps::v1::Deployment,
    coordination::v1::Lease, core::v1::Secret,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::json;

use super::cluster_access::{self, AccessError};
use crate::reconcile::live::{MANAGED_KINDS, managed_selector};

/// How often the replicas are looked at while they stop.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    /// Namespace of the release.
    #[arg(long, default_value = "chiller-metrics")]
    pub namespace: String,
    /// Name of the release's Deployment and webhook configuration (the chart's fullname).
    #[arg(long, default_value = "chiller-metrics")]
    pub name: String,
    /// Name of the reconcile loop's leader-election Lease.
    #[arg(long, default_value = "chiller-metrics-reconciler")]
    pub lease_name: String,
    /// How long to wait for the replicas to stop.
    #[arg(long, default_value_t = 120)]
    pub timeout_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the replicas of deployment {namespace}/{name} did not stop within {timeout:?}")]
    ReplicasStillRunning {
        namespace: String,
        name: String,
        timeout: Duration,
    },
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> UninstallError {
    let what = what.into();
    move |source| UninstallError::Api { what, source }
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_not_found())
}

/// Deletes `name`; gone already is fine. True if it was there.
async fn delete_if_present<K>(api: &Api<K>, name: &str, what: &str) -> Result<bool, UninstallError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(error) if is_not_found(&error) => Ok(false),
        Err(error) => Err(api_error(format!("deleting {what}"))(error)),
    }
}

/// [`run`] to completion on `runtime`. `main` calls this and not `run`: a
/// future polled in the binary is compiled again there, a minute of every
/// release build.
pub fn run_blocking(
    runtime: &tokio::runtime::Runtime,
    args: &UninstallArgs,
) -> Result<Vec<String>, UninstallError> {
    runtime.block_on(run(args))
}

/// Uninstalls; returns one line per step, for the user.
pub async fn run(args: &UninstallArgs) -> Result<Vec<String>, UninstallError> {
    let client = cluster_access::client().await?;
    let mut done = Vec::new();

    let webhooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let what = format!("mutatingwebhookconfiguration {}", args.name);
    if delete_if_present(&webhooks, &args.name, &what).await? {
        done.push(format!(
            "deleted {what}: pods are no longer sent to the webhook"
        ));
    }

    stop_replicas(&client, args).await?;
    done.push(format!(
        "scaled deployment {}/{} to 0: no reconcile loop runs",
        args.namespace, args.name
    ));

    for kind in MANAGED_KINDS {
        let api = Api::<DynamicObject>::all_with(client.clone(), &kind.api_resource());
        let objects = match api
            .list(&ListParams::default().labels(&managed_selector()))
            .await
        {
            Ok(list) => list.items,
            // The Prometheus Operator's CRDs may be gone, or never were.
            Err(error) if is_not_found(&error) => continue,
            Err(error) => return Err(api_error(format!("listing {}", kind.plural))(error)),
        };
        for object in objects {
            let namespace = object.namespace().unwrap_or_default();
            let api = Api::<DynamicObject>::namespaced_with(
                client.clone(),
                &namespace,
                &kind.api_resource(),
            );
            let what = format!("{} {namespace}/{}", kind.plural, object.name_any());
            if delete_if_present(&api, &object.name_any(), &what).await? {
                done.push(format!("deleted {what}"));
            }
        }
    }

    let leases = Api::<Lease>::namespaced(client.clone(), &args.namespace);
    let what = format!("lease {}/{}", args.namespace, args.lease_name);
    if delete_if_present(&leases, &args.lease_name, &what).await? {
        done.push(format!("deleted {what}"));
    }

    // cert-manager leaves the Secrets of its Certificates behind.
    let secrets = Api::<Secret>::namespaced(client.clone(), &args.namespace);
    let ours = [
        format!("{}-ca", args.name),
        format!("{}-serving", args.name),
    ];
    let issued = secrets
        .list(&ListParams::default())
        .await
        .map_err(api_error(format!("listing secrets in {}", args.namespace)))?;
    for secret in issued.items {
        let certificate = secret
            .annotations()
            .get("cert-manager.io/certificate-name")
            .cloned()
            .unwrap_or_default();
        if ours.contains(&certificate) {
            let what = format!(
                "secret {}/{} (certificate {certificate})",
                args.namespace,
                secret.name_any()
            );
            if delete_if_present(&secrets, &secret.name_any(), &what).await? {
                done.push(format!("deleted {what}"));
            }
        }
    }
    done.push(format!(
        "now run: helm uninstall {} --namespace {}; running pods keep their sidecars until they restart",
        args.name, args.namespace
    ));
    Ok(done)
}

/// Scales the Deployment to 0 and waits until it runs no pod.
async fn stop_replicas(client: &Client, args: &UninstallArgs) -> Result<(), UninstallError> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), &args.namespace);
    let scale = json!({"spec": {"replicas": 0}});
    match deployments
        .patch(&args.name, &PatchParams::default(), &Patch::Merge(&scale))
        .await
    {
        Ok(_) => {}
        Err(error) if is_not_found(&error) => return Ok(()),
        Err(error) => {
            return Err(api_error(format!(
                "scaling deployment {}/{}",
                args.namespace, args.name
            ))(error));
        }
    }
    let timeout = Duration::from_secs(args.timeout_seconds);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let running = match deployments.get_opt(&args.name).await {
            Ok(Some(deployment)) => deployment
                .status
                .and_then(|status| status.replicas)
                .unwrap_or(0),
            Ok(None) => 0,
            Err(error) => {
                return Err(api_error(format!(
                    "reading deployment {}/{}",
                    args.namespace, args.name
                ))(error));
            }
        };
        if running == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(UninstallError::ReplicasStillRunning {
                namespace: args.namespace.clone(),
                name: args.name.clone(),
                timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
