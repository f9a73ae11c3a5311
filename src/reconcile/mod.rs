//! The per-namespace monitoring reconcile loop.
//!
//! One replica (the Lease holder) watches every Namespace and every object it
//! manages. Opted-in namespaces get their desired objects applied with
//! server-side apply, but only those that differ from the live ones; other
//! namespaces lose whatever we created for them.
//!
//! Status: pod counts and readiness go to a Namespace annotation (read by
//! `chiller-metrics check`), to per-namespace gauges and to Events. The
//! Namespace watch only triggers on what configures us (labels, the other
//! annotations, deletion), so writing the status never causes a reconcile.
//! Events are series kept on the API server (`events`), so a new leader
//! continues them instead of repeating them.

use std::sync::Arc;

pub mod compare;
pub mod context;
pub mod controller;
pub mod desired;
pub mod events;
pub mod leader;
pub mod live;
pub mod namespace;
pub mod outdated;
pub mod pod_sightings;
pub mod pod_state;
pub mod pods;
pub mod uninjected;

use tokio::sync::{oneshot, watch};

use crate::{
    admin::{Metrics, Readiness},
    live_config::LiveInjector,
};

pub use context::{Context, NamespaceStatus, ReconcileError, error_policy};
pub use leader::{LeaseLock, LeaseTimings};
pub use namespace::reconcile;

/// Leader-election settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    /// Where each election round reports whether the API server answered.
    pub readiness: Option<Arc<Readiness>>,
}

impl Options {
    pub fn from_env(lease_namespace: Option<String>, lease_name: String) -> Self {
        Self {
            lease_namespace: lease_namespace
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "chiller-metrics".into()),
            lease_name,
            identity: identity(),
            readiness: None,
        }
    }
}

/// This replica's name in the lease: the pod name (`POD_NAME`, else the
/// hostname, which is the pod name in Kubernetes), else one unique to the process.
fn identity() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| format!("chiller-metrics-{}", std::process::id()))
}

/// Campaigns for the lease and, while leading, runs the controller, until
/// `stop` turns true: then the controller stops and the lease is released.
/// Every replica keeps serving the webhook whatever happens here.
pub async fn run(
    client: kube::Client,
    injector: Arc<LiveInjector>,
    metrics: Arc<Metrics>,
    options: Options,
    mut stop: watch::Receiver<bool>,
) {
    let (leading_tx, leading) = watch::channel(false);
    let lock = LeaseLock::new(
        client.clone(),
        &options.lease_namespace,
        &options.lease_name,
        &options.identity,
        LeaseTimings::default(),
    );
    let lock = match options.readiness.clone() {
        Some(readiness) => lock.reporting_to(readiness),
        None => lock,
    };
    let (release, released) = oneshot::channel::<()>();
    let elector = tokio::spawn(lock.run(leading_tx, async {
        let _ = released.await;
    }));
    let ctx = Arc::new(Context::new(
        client,
        injector,
        metrics,
        leading.clone(),
        &options.identity,
    ));
    tracing::info!(
        lease = %format!("{}/{}", options.lease_namespace, options.lease_name),
        identity = %options.identity,
        "reconcile loop waiting for leadership"
    );
    tokio::select! {
        () = lead(ctx, leading) => {}
        _ = stop.wait_for(|stop| *stop) => tracing::info!("stopping the reconcile loop"),
    }
    // The controller has stopped (its future is dropped); only now give up the lease.
    let _ = release.send(());
    let _ = elector.await;
}

/// Runs the controller whenever we lead, until the elector ends.
async fn lead(ctx: Arc<Context>, mut leading: watch::Receiver<bool>) {
    loop {
        if leading.wait_for(|lead| *lead).await.is_err() {
            return;
        }
        tracing::info!("leading: starting the reconcile controller");
        tokio::select! {
            () = controller::run(ctx.clone()) => {
                tracing::warn!("reconcile controller ended");
            }
            lost = leading.wait_for(|lead| !*lead) => {
                if lost.is_err() {
                    return;
                }
                tracing::warn!("no longer leading: reconcile controller stopped");
            }
        }
        ctx.live.clear();
        ctx.pods.pods.clear();
        ctx.pods.replica_sets.clear();
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
