//! `chiller-metrics serve`: wires config, TLS, the cluster, the webhook, the
//! admin port and the reconcile loop, and runs them until SIGTERM.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    admin::{self, AdminState, Metrics, Readiness},
    cli::ServeArgs,
    cluster::{self, ClusterError, ClusterNamespaces, NamespaceCache},
    config::ConfigError,
    live_config::LiveInjector,
    reconcile,
    webhook::{
        self, NamespacePolicies, NoCluster, WebhookState,
        server::{Limits, serve_https},
        tls::{ReloadingCert, TlsError, server_config},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How long shutdown waits for the reconcile loop to stop and release its lease.
const RECONCILER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// [`run`] until SIGTERM or Ctrl-C, on `runtime`. `main` calls this and
/// not `run`: a future polled in the binary is compiled again there, a
/// minute of every release build.
pub fn run_until_signal(
    runtime: &tokio::runtime::Runtime,
    args: ServeArgs,
) -> Result<(), ServeError> {
    runtime.block_on(run(args, shutdown_signal()))
}

/// Runs until `shutdown` resolves (SIGTERM or SIGINT in the binary).
pub async fn run(args: ServeArgs, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    // Loaded once here so that a bad file fails start-up before anything binds.
    args.config.load()?;
    let cert = ReloadingCert::load(&args.tls_cert, &args.tls_key)?;
    let tls = server_config(cert.clone(), args.tls_min_version)?;
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })
    };
    let webhook_listener = bind(args.listen).await?;
    let admin_listener = bind(args.admin_listen).await?;
    let metrics = Arc::new(Metrics::new());

    let client = if args.standalone {
        None
    } else {
        Some(cluster::client().await?)
    };
    let readiness = Arc::new(Readiness::new(client.is_some()));
    let overrides = args.config.overrides();
    let injector = LiveInjector::load(args.config.file.config.as_deref(), overrides, None)?;
    let (stop_reconciling, reconcile_stop) = tokio::sync::watch::channel(false);
    let (namespaces, reconciler): (Arc<dyn NamespacePolicies>, _) = match client {
        Some(client) => {
            let namespaces = Arc::new(ClusterNamespaces::new(readiness.clone()));
            let connecting = connect_when_the_api_server_answers(
                client,
                Connection {
                    namespaces: namespaces.clone(),
                    injector: injector.clone(),
                    readiness: readiness.clone(),
                    metrics: metrics.clone(),
                    reconcile: (!args.no_reconcile).then(|| {
                        reconcile::Options::from_env(
                            args.lease_namespace.clone(),
                            args.lease_name.clone(),
                        )
                    }),
                },
                reconcile_stop,
            );
            (namespaces, Some(tokio::spawn(connecting)))
        }
        None => {
            tracing::info!(
                "no cluster (--standalone): serving the webhook alone (pod-level settings only, no namespace settings, no reconcile loop)"
            );
            (Arc::new(NoCluster), None)
        }
    };
    let mode = injector.current().mode();

    let config_watch = tokio::spawn(injector.clone().watch(
        Duration::from_secs(args.cert_reload_seconds.max(1)),
        metrics.clone(),
    ));
    let state = Arc::new(WebhookState {
        injector,
        namespaces,
        metrics: metrics.clone(),
        body_limit: args.max_body_bytes,
    });
    let limits = Limits {
        max_connections: args.max_connections,
        handshake_timeout: Duration::from_secs(args.header_timeout_seconds),
        header_read_timeout: Duration::from_secs(args.header_timeout_seconds),
        request_timeout: Duration::from_secs(args.request_timeout_seconds),
        idle_timeout: Duration::from_secs(args.idle_timeout_seconds),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_seconds),
    };
    let cert_watch = tokio::spawn(cert.watch(
        Duration::from_secs(args.cert_reload_seconds.max(1)),
        metrics.clone(),
    ));

    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_app = admin::router(AdminState {
        metrics,
        readiness: readiness.clone(),
    });
    let admin_addr = admin_listener.local_addr()?;
    let admin = tokio::spawn(async move {
        axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(async {
                let _ = admin_stopped.await;
            })
            .await
    });
    tracing::info!(
        webhook = %webhook_listener.local_addr()?,
        admin = %admin_addr,
        ?mode,
        "serving"
    );

    let drain = Duration::from_secs(args.drain_seconds);
    let draining = async move {
        shutdown.await;
        readiness.mark_shutting_down();
        // Hand the reconcile lease to another replica while this one drains.
        let _ = stop_reconciling.send(true);
        tracing::info!(
            seconds = drain.as_secs(),
            "shutdown requested: not ready, draining"
        );
        tokio::time::sleep(drain).await;
    };
    serve_https(
        webhook_listener,
        tls,
        webhook::router(state),
        limits,
        draining,
    )
    .await?;
    cert_watch.abort();
    config_watch.abort();
    if let Some(reconciler) = reconciler
        && tokio::time::timeout(RECONCILER_STOP_TIMEOUT, reconciler)
            .await
            .is_err()
    {
        tracing::warn!("the reconcile loop did not stop in time");
    }
    let _ = admin_stop.send(());
    if let Ok(Err(error)) = admin.await {
        tracing::warn!(%error, "admin server ended with an error");
    }
    tracing::info!("stopped");
    Ok(())
}

/// What starts once the API server answers.
struct Connection {
    namespaces: Arc<ClusterNamespaces>,
    injector: Arc<LiveInjector>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    /// `None` with `--no-reconcile`.
    reconcile: Option<reconcile::Options>,
}

/// Waits for the API server (retrying, not ready meanwhile), then starts
/// the namespace cache and the reconcile loop, and runs the loop until
/// `stop`. A stop while still waiting ends the wait.
async fn connect_when_the_api_server_answers(
    client: kube::Client,
    connection: Connection,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let version = tokio::select! {
        version = cluster::wait_for_api_server(&client) => version,
        _ = stop.wait_for(|stop| *stop) => return,
    };
    let Connection {
        namespaces,
        injector,
        readiness,
        metrics,
        reconcile,
    } = connection;
    injector.set_server_version(version);
    let keys = injector.current().keys().clone();
    let (cache, driver) = NamespaceCache::watch(client.clone(), keys, readiness.clone());
    namespaces.connect(cache);
    tokio::spawn(driver);
    tracing::info!(?version, mode = ?injector.current().mode(), "connected to the cluster");
    match reconcile {
        Some(options) => {
            let options = reconcile::Options {
                readiness: Some(readiness),
                ..options
            };
            reconcile::run(client, injector, metrics, options, stop).await;
        }
        None => tracing::info!("reconcile loop disabled by --no-reconcile"),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
