//! The webhook's HTTP routes. Separate from serving so tests can `oneshot` it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, FromRequest, Request, State, rejection::BytesRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};

use super::admission::{self, NamespacePolicies, Outcome, ReviewError};

/// How long a review waits for a namespace that is not in the cache yet
/// (labeled a moment ago); well within the webhook's timeout.
pub const NAMESPACE_CATCH_UP: Duration = Duration::from_secs(2);
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

/// Takes the request whole: the `HeaderMap` extractor would copy the headers.
async fn mutate(State(state): State<Arc<WebhookState>>, request: Request) -> Response {
    let started = Instant::now();
    let response = match json_content_type(&request) {
        Ok(()) => {
            let body = Bytes::from_request(request, &()).await;
            answer(&state, body).await
        }
        Err(message) => reject(
            &state,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            message,
        ),
    };
    state
        .metrics
        .admission_duration
        .observe(started.elapsed().as_secs_f64());
    response
}

fn reject(
    state: &WebhookState,
    status: StatusCode,
    reason: &'static str,
    message: String,
) -> Response {
    state.metrics.rejected(reason);
    tracing::info!(status = status.as_u16(), reason, %message, "rejected webhook request");
    (status, message + "\n").into_response()
}

/// Reviews come as `application/json` (parameters allowed).
fn json_content_type(request: &Request) -> Result<(), String> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let end = content_type
        .bytes()
        .position(|b| b == b';')
        .unwrap_or(content_type.len());
    let media_type = content_type[..end].trim_ascii();
    if media_type.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(format!(
            "content type must be application/json, got {content_type:?}"
        ))
    }
}

async fn answer(state: &WebhookState, body: Result<Bytes, BytesRejection>) -> Response {
    let reject = |status, reason, message| reject(state, status, reason, message);
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
    let review = || admission::review(&state.injector.current(), state.namespaces.as_ref(), &body);
    let mut result = review();
    if let Ok((_, Outcome::NamespaceNotCached(namespace))) = &result
        && state
            .namespaces
            .wait_for(namespace, NAMESPACE_CATCH_UP)
            .await
    {
        result = review();
    }
    match result {
        Ok((review, outcome)) => {
            let (outcome, reason) = outcome.labels();
            state.metrics.admission(outcome, reason);
            let mut response = Response::new(Body::from(admission::to_bytes(&review)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
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
