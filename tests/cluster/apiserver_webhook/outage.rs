//! A replica that starts while the API server is down, and a minute-long
//! outage mid-run. Its own module, so that `make test` runs it in a process
//! (and on a control plane) of its own, beside the other webhook tests.

use super::*;

/// How long the API server is down when a replica starts.
const OUTAGE_AT_START: Duration = Duration::from_secs(30);
/// How long the API server stops in mid-run.
const OUTAGE_MID_RUN: Duration = Duration::from_secs(60);

/// The review of the chiller API pod in `namespace`, with `app` as its label.
fn review_in(namespace: &str, app: &str) -> Value {
    let mut review = support::https::chiller_api_review();
    review["request"]["namespace"] = json!(namespace);
    review["request"]["object"]["metadata"]["namespace"] = json!(namespace);
    review["request"]["object"]["metadata"]["labels"]["app"] = json!(app);
    review
}

/// Whether `serve` patches the pod of `review`, asked directly over HTTPS.
fn patches(serve: &ServeProcess, ca: &str, review: &Value) -> bool {
    let answer = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = serve.client(ca);
        // The install's certificate names the Service and 127.0.0.1.
        client.server_name = "chiller-metrics.chiller-metrics.svc".to_string();
        let mut connection = client
            .connect(support::https::HttpVersion::Http1)
            .await
            .expect("connecting to the webhook");
        connection
            .post_json("/mutate", review.to_string())
            .await
            .expect("the webhook answers")
    });
    let answer: Value = serde_json::from_slice(&answer.body).expect("an AdmissionReview");
    assert_eq!(answer["response"]["allowed"], true, "{answer:#}");
    answer["response"]["patch"].is_string()
}

fn admin_ready(serve: &ServeProcess) -> bool {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(support::https::admin_get(serve.admin_addr, "/readyz"))
        .is_ok_and(|answer| answer.status == 200)
}

/// A replica that starts while the API server is down waits for it: not
/// ready, and injecting nothing (it cannot honour the namespaces' settings)
/// until its namespace cache has synced; then it follows them, and its
/// reconcile loop campaigns. The API server is down for 30 s at start. Then
/// it stops for a minute mid-run: the replica keeps following the namespace's
/// settings, and afterwards its watches and the reconcile loop resume
/// without a restart.
#[test]
fn a_replica_started_while_the_api_server_is_down_injects_nothing_until_its_cache_has_synced() {
    let f = fixture();
    let _serial = one_at_a_time();
    let _logs = f.logs_on_failure();
    let namespace = "chiller-late-start";
    opt_in(fixture().plane, namespace);
    install::annotate_namespace(
        f.plane,
        namespace,
        &[&format!("{DOMAIN}/pod-selector=app=selected")],
    );
    let ca = std::fs::read_to_string(f.install.certs.join("ca.crt")).unwrap();

    f.plane.stop_apiserver();
    let late = install::start_serve(f.install.serve_command("chiller-metrics-late"));
    let _late_logs = f
        .plane
        .logs_on_failure()
        .with("the late replica", late.log_tail(60));
    let deadline = Instant::now() + OUTAGE_AT_START;
    while Instant::now() < deadline {
        assert!(!admin_ready(&late), "ready while the API server is down");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !patches(&late, &ca, &review_in(namespace, "selected")),
        "injected before knowing the namespace's settings"
    );
    assert!(!patches(&late, &ca, &review_in(namespace, "other")));
    let log = late.log().join("\n");
    assert!(log.contains("cannot reach the API server"), "{log}");
    let cold = support::https::sample(
        &install::metrics_of(&late),
        "chiller_metrics_admissions_total{outcome=\"error\",reason=\"namespace_cache_not_synced\"}",
    );
    assert_eq!(cold, Some(2.0), "both pods counted as allowed uninjected");

    f.plane.start_apiserver_again();
    let deadline = Instant::now() + CONVERGE;
    while !admin_ready(&late) {
        assert!(
            Instant::now() < deadline,
            "not ready after the API server came back"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(patches(&late, &ca, &review_in(namespace, "selected")));
    assert!(
        !patches(&late, &ca, &review_in(namespace, "other")),
        "injected a pod the namespace's pod-selector excludes"
    );
    let log = late.log().join("\n");
    assert!(
        log.contains("reconcile loop waiting for leadership"),
        "{log}"
    );

    // A minute-long outage mid-run: the replica goes on answering from its
    // cache, never against the namespace's settings.
    f.plane.stop_apiserver();
    let deadline = Instant::now() + OUTAGE_MID_RUN;
    while Instant::now() < deadline {
        assert!(
            !patches(&late, &ca, &review_in(namespace, "other")),
            "injected a pod the namespace's pod-selector excludes, during the outage"
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    assert!(patches(&late, &ca, &review_in(namespace, "selected")));
    f.plane.start_apiserver_again();
    kcm_recovered(f, "chiller-late-start-probe");

    // Resumed without a restart: a changed setting reaches the webhook's
    // cache, and a newly opted-in namespace gets its objects.
    install::annotate_namespace(
        f.plane,
        namespace,
        &[&format!("{DOMAIN}/pod-selector=app=other")],
    );
    let deadline = Instant::now() + CONVERGE;
    while !patches(&late, &ca, &review_in(namespace, "other")) {
        assert!(
            Instant::now() < deadline,
            "the changed pod-selector never reached the webhook after the outage"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!patches(&late, &ca, &review_in(namespace, "selected")));
    let after = "chiller-after-outage";
    opt_in(fixture().plane, after);
    wait_until(
        CONVERGE,
        "the reconcile loop sets up a namespace opted in after the outage",
        || {
            kubectl_json(
                f.plane,
                &[
                    "get",
                    "configmaps",
                    "-n",
                    after,
                    "-l",
                    "app.kubernetes.io/managed-by=chiller-metrics",
                ],
            )["items"]
                .as_array()
                .is_some_and(|items| !items.is_empty())
        },
    );
    // The shared replica's watches came back too: the next test starts from
    // a ready webhook.
    wait_until(CONVERGE, "the shared replica is ready again", || {
        admin_ready(&f.serve)
    });
}

/// Waits until kube-controller-manager's watches are back after an API
/// server outage (it makes every namespace's default ServiceAccount), as the
/// other tests expect.
fn kcm_recovered(f: &Fixture, probe: &str) {
    ensure_namespace(f.plane, probe, &[]);
    let deadline = Instant::now() + CONVERGE;
    while !f
        .plane
        .kubectl()
        .args(["get", "serviceaccount", "default", "-n", probe])
        .output()
        .is_ok_and(|output| output.status.success())
    {
        assert!(
            Instant::now() < deadline,
            "kube-controller-manager did not recover"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
