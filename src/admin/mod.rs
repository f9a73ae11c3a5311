//! The plain-HTTP admin port: `/livez`, `/readyz` and `/metrics`.

mod metrics;

/// Label sets, for code that records metrics directly.
pub mod metrics_labels {
    pub use super::metrics::{
        AdmissionLabels, NamespaceLabels, ReasonLabels, ReconcileFailureLabels, ResultLabels,
    };
}

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};

pub use metrics::{AdmissionLabels, Metrics};

/// Readiness: ready once every dependency has synced, and not shutting down.
#[derive(Debug, Default)]
pub struct Readiness {
    namespaces_synced: AtomicBool,
    /// The namespace cache has synced at least once.
    namespaces_known: AtomicBool,
    shutting_down: AtomicBool,
    /// False while the leader election's rounds find no API server.
    api_server_unreachable: AtomicBool,
}

impl Readiness {
    /// With no cluster there is no cache to wait for.
    pub fn new(wait_for_namespaces: bool) -> Self {
        Self {
            namespaces_synced: AtomicBool::new(!wait_for_namespaces),
            namespaces_known: AtomicBool::new(!wait_for_namespaces),
            shutting_down: AtomicBool::new(false),
            api_server_unreachable: AtomicBool::new(false),
        }
    }

    pub fn mark_namespaces_synced(&self) {
        self.namespaces_known.store(true, Ordering::SeqCst);
        self.namespaces_synced.store(true, Ordering::SeqCst);
    }

    /// Whether the namespace cache has synced at least once. A later watch
    /// failure keeps the last state: no pod is created while the API
    /// server is down, and a re-list follows.
    pub fn namespaces_known(&self) -> bool {
        self.namespaces_known.load(Ordering::SeqCst)
    }

    /// The namespace watch failed: the cache may be stale until it re-lists.
    pub fn mark_namespaces_disconnected(&self) {
        self.namespaces_synced.store(false, Ordering::SeqCst);
    }

    pub fn namespaces_connected(&self) -> bool {
        self.namespaces_synced.load(Ordering::SeqCst)
    }

    pub fn mark_api_server_reachable(&self, reachable: bool) {
        self.api_server_unreachable
            .store(!reachable, Ordering::SeqCst);
    }

    pub fn mark_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> Result<(), &'static str> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err("shutting down");
        }
        if !self.namespaces_synced.load(Ordering::SeqCst) {
            return Err("namespace cache has not synced");
        }
        if self.api_server_unreachable.load(Ordering::SeqCst) {
            return Err("the API server does not answer");
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.readiness.is_ready() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_namespace_watch_and_the_api_server() {
        let readiness = Readiness::new(true);
        assert_eq!(readiness.is_ready(), Err("namespace cache has not synced"));
        readiness.mark_namespaces_synced();
        assert_eq!(readiness.is_ready(), Ok(()));
        readiness.mark_namespaces_disconnected();
        assert_eq!(readiness.is_ready(), Err("namespace cache has not synced"));
        readiness.mark_namespaces_synced();
        readiness.mark_api_server_reachable(false);
        assert_eq!(readiness.is_ready(), Err("the API server does not answer"));
        readiness.mark_api_server_reachable(true);
        assert_eq!(readiness.is_ready(), Ok(()));
        readiness.mark_shutting_down();
        assert_eq!(readiness.is_ready(), Err("shutting down"));
    }
}
