//! The webhook over real HTTPS (HTTP/1.1 and HTTP/2), the admin port, the
//! router without a network, and the real binary's `serve`.

use crate::support;

use std::{process::Command, sync::Arc};

use axum::body::Body;
use chiller_metrics::{
    admin::Metrics,
    config::Config,
    inject::{Injector, ResolvedMode},
    webhook::{self, NoCluster, WebhookState},
};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use support::https::{
    HttpResponse, HttpVersion, HttpsClient, ServeProcess, ServerOptions, TestServer,
    chiller_api_review, decoded_patch, sample, write_certs,
};
use tower::ServiceExt;

const INJECTED: &str = r#"chiller_metrics_admissions_total{outcome="injected",reason="injected"}"#;
const DURATION_COUNT: &str = "chiller_metrics_admission_duration_seconds_count";
const BODY_LIMIT: usize = 8192;

fn fixture_bytes() -> Vec<u8> {
    serde_json::to_vec(&chiller_api_review()).unwrap()
}

fn rejected(reason: &str) -> String {
    format!(r#"chiller_metrics_rejected_requests_total{{reason="{reason}"}}"#)
}

fn admissions(outcome: &str, reason: &str) -> String {
    format!(r#"chiller_metrics_admissions_total{{outcome="{outcome}",reason="{reason}"}}"#)
}

fn assert_content_type(response: &HttpResponse, wanted: &str) {
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with(wanted)),
        "content-type: {:?}",
        response.header("content-type")
    );
}

/// The chiller API fixture, once per version, each on a new connection:
/// injected.
async fn assert_injects(client: &HttpsClient, versions: impl IntoIterator<Item = HttpVersion>) {
    for version in versions {
        let response = client
            .post_json("/mutate", fixture_bytes(), version)
            .await
            .unwrap();
        assert_injected(&response, version);
    }
}

/// Checks a 200 answer to the chiller API fixture: uid echoed, allowed, a
/// base64 JSONPatch that applies to the request's pod and injects.
fn assert_injected(response: &HttpResponse, version: HttpVersion) {
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.version, version.version());
    assert_eq!(response.alpn.as_deref(), Some(version.alpn()));
    assert_content_type(response, "application/json");
    let review = response.json();
    let request = chiller_api_review();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["response"]["uid"], request["request"]["uid"]);
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    let patch = decoded_patch(&review);
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the request's pod");
    let pod: Pod = serde_json::from_value(pod).expect("the patched object is a Pod");
    let spec = pod.spec.unwrap();
    let sidecar = spec
        .init_containers
        .as_ref()
        .and_then(|c| c.iter().find(|c| c.name == "statsd-exporter"))
        .expect("statsd-exporter init container");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let env = spec.containers[0].env.as_ref().unwrap();
    let args = env.iter().find(|e| e.name == "GUNICORN_CMD_ARGS").unwrap();
    assert_eq!(
        args.value.as_deref(),
        Some("--statsd-host=localhost:9125 --statsd-prefix=chiller-api")
    );
    assert_eq!(
        pod.metadata.labels.unwrap()["metrics.chiller.io/injected"],
        "true"
    );
}

fn assert_allowed_unpatched(response: &HttpResponse, uid: &Value) {
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let review = response.json();
    assert_eq!(review["response"]["uid"], *uid);
    assert_eq!(review["response"]["allowed"], true);
    assert!(review["response"].get("patch").is_none(), "{review}");
    assert!(review["response"].get("patchType").is_none(), "{review}");
}

#[tokio::test]
async fn admission_review_over_https_http1_and_http2() {
    let server = TestServer::start(ServerOptions::default()).await;
    let client = server.client();
    assert_injects(&client, HttpVersion::ALL).await;
    // Several reviews on one connection.
    for version in HttpVersion::ALL {
        let mut connection = client.connect(version).await.unwrap();
        for _ in 0..3 {
            let response = connection
                .post_json("/mutate", fixture_bytes())
                .await
                .unwrap();
            assert_injected(&response, version);
        }
    }
    let metrics = server.admin_get("/metrics").await.text();
    assert_eq!(sample(&metrics, INJECTED), Some(8.0), "{metrics}");
}

/// kube-apiserver offers h2 and http/1.1; on HTTP/1.1 it keeps a pool of
/// connections, so one stalled connection holds up one review, not all.
#[tokio::test]
async fn a_client_offering_both_protocols_gets_http1() {
    let server = TestServer::start(ServerOptions::default()).await;
    let client = server.client();
    let stream = client
        .tls_connect_with(client.tls_config(&["h2", "http/1.1"]))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn other_requests_are_allowed_without_a_patch() {
    let server = TestServer::start(ServerOptions::default()).await;
    let client = server.client();
    let mut update = chiller_api_review();
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = update["request"]["object"].clone();
    let mut deployment = chiller_api_review();
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["request"]["resource"] =
        json!({"group": "apps", "version": "v1", "resource": "deployments"});
    deployment["request"]["object"] = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chiller-api", "namespace": "chiller"},
        "spec": {"selector": {"matchLabels": {"app": "api"}}, "template": {"spec": {"containers": []}}}
    });
    let uid = chiller_api_review()["request"]["uid"].clone();
    for version in HttpVersion::ALL {
        for review in [&update, &deployment] {
            let body = serde_json::to_vec(review).unwrap();
            let response = client.post_json("/mutate", body, version).await.unwrap();
            assert_allowed_unpatched(&response, &uid);
        }
    }
    let metrics = server.admin_get("/metrics").await.text();
    assert_eq!(
        sample(&metrics, &admissions("ignored", "not_create")),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, &admissions("ignored", "not_a_pod")),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, INJECTED), None, "{metrics}");
}

struct BadRequest {
    name: &'static str,
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: StatusCode,
    /// Text the answer must contain.
    says: &'static [&'static str],
}

fn bad_requests() -> Vec<BadRequest> {
    let mut v1beta1 = chiller_api_review();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut oversized = fixture_bytes();
    oversized.resize(BODY_LIMIT + 4096, b' ');
    vec![
        BadRequest {
            name: "wrong content type",
            method: Method::POST,
            path: "/mutate",
            content_type: Some("text/plain"),
            body: fixture_bytes(),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            says: &["content type must be application/json", "text/plain"],
        },
        BadRequest {
            name: "no content type",
            method: Method::POST,
            path: "/mutate",
            content_type: None,
            body: fixture_bytes(),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            says: &["content type must be application/json"],
        },
        BadRequest {
            name: "malformed JSON",
            method: Method::POST,
            path: "/mutate",
            content_type: Some("application/json"),
            body: br#"{"apiVersion": "admission.k8s.io/v1", "kind": "#.to_vec(),
            status: StatusCode::BAD_REQUEST,
            says: &["body is not a valid AdmissionReview"],
        },
        BadRequest {
            name: "v1beta1 AdmissionReview",
            method: Method::POST,
            path: "/mutate",
            content_type: Some("application/json"),
            body: serde_json::to_vec(&v1beta1).unwrap(),
            status: StatusCode::BAD_REQUEST,
            says: &[
                "unsupported AdmissionReview",
                "admission.k8s.io/v1beta1",
                "speaks admission.k8s.io/v1/AdmissionReview",
            ],
        },
        BadRequest {
            name: "body over the limit",
            method: Method::POST,
            path: "/mutate",
            content_type: Some("application/json"),
            body: oversized,
            status: StatusCode::PAYLOAD_TOO_LARGE,
            says: &[],
        },
        BadRequest {
            name: "GET /mutate",
            method: Method::GET,
            path: "/mutate",
            content_type: None,
            body: Vec::new(),
            status: StatusCode::METHOD_NOT_ALLOWED,
            says: &[],
        },
        BadRequest {
            name: "unknown path",
            method: Method::POST,
            path: "/validate",
            content_type: Some("application/json"),
            body: fixture_bytes(),
            status: StatusCode::NOT_FOUND,
            says: &[],
        },
    ]
}

#[tokio::test]
async fn bad_requests_get_clear_answers_and_the_server_keeps_serving() {
    let server = TestServer::start(ServerOptions {
        body_limit: BODY_LIMIT,
        ..Default::default()
    })
    .await;
    let client = server.client();
    for version in HttpVersion::ALL {
        for bad in bad_requests() {
            let headers: Vec<(&str, &str)> = bad
                .content_type
                .map(|t| ("content-type", t))
                .into_iter()
                .collect();
            let response = client
                .request(bad.method.clone(), bad.path, &headers, bad.body, version)
                .await
                .unwrap_or_else(|e| panic!("{} over {version:?}: {e}", bad.name));
            assert_eq!(
                response.status,
                bad.status,
                "{} over {version:?}: {}",
                bad.name,
                response.text()
            );
            for text in bad.says {
                assert!(
                    response.text().contains(text),
                    "{} over {version:?}: answer {:?} lacks {text:?}",
                    bad.name,
                    response.text()
                );
            }
            let good = client
                .post_json("/mutate", fixture_bytes(), version)
                .await
                .unwrap();
            assert_injected(&good, version);
        }
        // A rejected request does not break the connection it came on.
        let mut connection = client.connect(version).await.unwrap();
        let bad = connection.post_json("/mutate", "{").await.unwrap();
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        let good = connection
            .post_json("/mutate", fixture_bytes())
            .await
            .unwrap();
        assert_injected(&good, version);
    }

    let metrics = server.admin_get("/metrics").await.text();
    for (reason, count) in [
        ("content_type", 4.0),
        ("malformed", 4.0),
        ("unsupported_version", 2.0),
        ("too_large", 2.0),
    ] {
        assert_eq!(
            sample(&metrics, &rejected(reason)),
            Some(count),
            "{reason}: {metrics}"
        );
    }
    // Seven bad requests per version, of which five reach /mutate by POST.
    let good = (bad_requests().len() + 1) * 2;
    assert_eq!(sample(&metrics, INJECTED), Some(good as f64), "{metrics}");
    let answered = good + (5 + 1) * 2;
    assert_eq!(
        sample(&metrics, DURATION_COUNT),
        Some(answered as f64),
        "{metrics}"
    );
}

#[tokio::test]
async fn admin_port_serves_health_and_openmetrics() {
    let server = TestServer::start(ServerOptions::default()).await;
    let livez = server.admin_get("/livez").await;
    assert_eq!(livez.status, StatusCode::OK);
    assert_eq!(livez.text(), "ok\n");
    let readyz = server.admin_get("/readyz").await;
    assert_eq!(readyz.status, StatusCode::OK, "{}", readyz.text());

    let client = server.client();
    assert_injects(
        &client,
        [HttpVersion::Http1, HttpVersion::Http2, HttpVersion::Http2],
    )
    .await;
    let bad = client
        .post_json("/mutate", "not json", HttpVersion::Http1)
        .await
        .unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let metrics = server.admin_get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert_content_type(&metrics, "application/openmetrics-text");
    let text = metrics.text();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("# TYPE chiller_metrics_admission_duration_seconds histogram"),
        "{text}"
    );
    assert_eq!(sample(&text, INJECTED), Some(3.0), "{text}");
    assert_eq!(sample(&text, &rejected("malformed")), Some(1.0), "{text}");
    assert_eq!(sample(&text, DURATION_COUNT), Some(4.0), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"chiller_metrics_admission_duration_seconds_bucket{le="+Inf"}"#
        ),
        Some(4.0),
        "{text}"
    );

    // Shutting down marks the server not ready.
    server.readiness.mark_shutting_down();
    let readyz = server.admin_get("/readyz").await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(readyz.text().contains("shutting down"), "{}", readyz.text());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn router_answers_without_a_network() {
    let state = Arc::new(WebhookState {
        injector: Injector::new(Config::default(), ResolvedMode::Native).into(),
        namespaces: Arc::new(NoCluster),
        metrics: Arc::new(Metrics::new()),
        body_limit: BODY_LIMIT,
    });
    let request = |method: Method, content_type: &str, body: Vec<u8>| {
        Request::builder()
            .method(method)
            .uri("/mutate")
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap()
    };
    let response = webhook::router(state.clone())
        .oneshot(request(Method::POST, "application/json", fixture_bytes()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        review["response"]["uid"],
        chiller_api_review()["request"]["uid"]
    );
    let mut pod = chiller_api_review()["request"]["object"].clone();
    json_patch::patch(&mut pod, &decoded_patch(&review)).unwrap();
    assert_eq!(
        pod["metadata"]["labels"]["metrics.chiller.io/injected"],
        "true"
    );

    let response = webhook::router(state.clone())
        .oneshot(request(
            Method::POST,
            "application/json; charset=utf-8",
            b"[]".to_vec(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = webhook::router(state)
        .oneshot(request(Method::PUT, "application/json", fixture_bytes()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn binary_serves_alone_with_certs_from_env_and_stops_on_sigterm() {
    let scratch = tempfile::tempdir().unwrap();
    let certs = write_certs(scratch.path());
    let mut command = ServeProcess::command(scratch.path());
    command
        .env("CHILLER_METRICS_TLS_CERT", scratch.path().join("tls.crt"))
        .env("CHILLER_METRICS_TLS_KEY", scratch.path().join("tls.key"))
        .args(["--max-body-bytes", &BODY_LIMIT.to_string()]);
    let serve = ServeProcess::start(command).unwrap();

    let alone = serve.json_log().into_iter().any(|entry| {
        entry["message"]
            .as_str()
            .is_some_and(|m| m.contains("serving the webhook alone"))
    });
    assert!(
        alone,
        "no log line says the webhook serves alone:\n{}",
        serve.log().join("\n")
    );
    serve.wait_ready().await.unwrap();

    let client = serve.client(&certs.ca_cert);
    assert_injects(&client, HttpVersion::ALL).await;
    let mut oversized = fixture_bytes();
    oversized.resize(BODY_LIMIT + 1, b' ');
    let response = client
        .post_json("/mutate", oversized, HttpVersion::Http1)
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::PAYLOAD_TOO_LARGE);

    let metrics = support::https::admin_get(serve.admin_addr, "/metrics")
        .await
        .unwrap()
        .text();
    assert_eq!(sample(&metrics, INJECTED), Some(2.0), "{metrics}");
    assert_eq!(
        sample(&metrics, &rejected("too_large")),
        Some(1.0),
        "{metrics}"
    );

    let (status, log) = serve.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", log.join("\n"));
    assert!(
        log.iter().any(|line| line.contains("\"stopped\"")),
        "no \"stopped\" line:\n{}",
        log.join("\n")
    );
}

fn run_to_exit(command: &mut Command) -> (Option<i32>, String) {
    let output = command.output().expect("running chiller-metrics");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn binary_rejects_invalid_flags_clearly() {
    let scratch = tempfile::tempdir().unwrap();
    let (code, stderr) =
        run_to_exit(ServeProcess::command(scratch.path()).args(["--listen", "nope"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'nope' for '--listen <LISTEN>'"),
        "{stderr}"
    );

    let (code, stderr) =
        run_to_exit(ServeProcess::command(scratch.path()).args(["--tls-min-version", "1.1"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-min-version"), "{stderr}");
    assert!(stderr.contains("1.2") && stderr.contains("1.3"), "{stderr}");
}

#[test]
fn binary_reports_a_missing_certificate_file() {
    let scratch = tempfile::tempdir().unwrap();
    write_certs(scratch.path());
    let missing = scratch.path().join("missing.crt");
    let mut command = ServeProcess::command(scratch.path());
    command
        .env("CHILLER_METRICS_TLS_CERT", &missing)
        .env("CHILLER_METRICS_TLS_KEY", scratch.path().join("tls.key"));
    let (code, stderr) = run_to_exit(&mut command);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(code.is_some(), "killed by a signal: {stderr}");
    // Which file, which settings name it, and how to make a pair.
    for needle in [
        format!("certificate {} does not exist", missing.display()),
        "--tls-cert or CHILLER_METRICS_TLS_CERT".to_string(),
        "`chiller-metrics certs".to_string(),
    ] {
        assert!(stderr.contains(&needle), "lacks {needle:?}: {stderr}");
    }
}
