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
    shutting_down: AtomicBool,
}

impl Readiness {
    /// With no cluster there is no cache to wait for.
    pub fn new(wait_for_namespaces: bool) -> Self {
        Self {
            namespaces_synced: AtomicBool::new(!wait_for_namespaces),
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn mark_namespaces_synced(&self) {
        self.namespaces_synced.store(true, Ordering::SeqCst);
    }

    /// The namespace watch failed: the cache may be stale until it re-lists.
    pub fn mark_namespaces_disconnected(&self) {
        self.namespaces_synced.store(false, Ordering::SeqCst);
    }

    pub fn namespaces_connected(&self) -> bool {
        self.namespaces_synced.load(Ordering::SeqCst)
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
