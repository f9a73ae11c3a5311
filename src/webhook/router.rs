//! The webhook's HTTP routes. Separate from serving so tests can `oneshot` it.

use std::{sync::Arc, time::Instant};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};

use super::admission::{self, NamespacePolicies, ReviewError};
use crate::{admin::Metrics, live_config::LiveInjector};

/// kube-apiserver sends up to 3 MiB per object, and UPDATE carries two.
pub const DEFAULT_BODY_LIMIT: usize = 7 * 1024 * 1024;

pub struct WebhookState {
    /// The current config's injector; a reloaded config applies to the next request.
    pub injector: Arc<LiveInjector>,
    pub namespaces: Arc<dyn NamespacePolicies>,
    pub metrics: Arc<Metrics>,
    pub body_limit: usize,
}

pub fn router(state: Arc<WebhookState>) -> Router {
    let limit = state.body_limit;
    Router::new()
        .route("/mutate", post(mutate))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn mutate(
    State(state): State<Arc<WebhookState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let response = answer(&state, &headers, body);
    state
        .metrics
        .admission_duration
        .observe(started.elapsed().as_secs_f64());
    response
}

fn answer(
    state: &WebhookState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reject = |status: StatusCode, reason: &'static str, message: String| {
        state.metrics.rejected(reason);
        tracing::info!(status = status.as_u16(), reason, %message, "rejected webhook request");
        (status, message + "\n").into_response()
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            format!("content type must be application/json, got {content_type:?}"),
        );
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let reason = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "body"
            };
            return reject(status, reason, rejection.body_text());
        }
    };
    if body.is_empty() {
        return reject(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "request body is empty".into(),
        );
    }
    match admission::review(&state.injector.current(), state.namespaces.as_ref(), &body) {
        Ok((review, outcome)) => {
            let (outcome, reason) = outcome.labels();
            state.metrics.admission(outcome, reason);
            (
                [(header::CONTENT_TYPE, "application/json")],
                admission::to_bytes(&review),
            )
                .into_response()
        }
        Err(error) => {
            let status = match error {
                ReviewError::InvalidPod(_) => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::BAD_REQUEST,
            };
            reject(status, error.metric_label(), error.to_string())
        }
    }
}
