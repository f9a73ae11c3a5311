//! The webhook's namespace cache against a mocked API server (tower-test):
//! it lists and watches only opted-in namespaces, `/readyz` stays false until
//! the first list has landed, and policies come from the cache, not from a
//! request per admission.

use std::{sync::Arc, time::Duration};

use chiller_metrics::{
    admin::Readiness, cluster::NamespaceCache, keys::Keys, webhook::NamespacePolicies,
};
use http::{Request, Response};
use kube::{Client, client::Body};
use serde_json::json;

/// Guards against hangs only; nothing here measures speed.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn namespace_list() -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "NamespaceList",
        "metadata": {"resourceVersion": "100"},
        "items": [{
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "chiller",
                "resourceVersion": "99",
                "labels": {"metrics.chiller.io/inject": "enabled"},
                "annotations": {"metrics.chiller.io/pod-selector": "app!=db"}
            }
        }]
    })
}

#[tokio::test]
async fn cache_lists_opted_in_namespaces_and_gates_readiness() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let readiness = Arc::new(Readiness::new(true));
    let (cache, driver) = NamespaceCache::watch(client, Keys::default(), readiness.clone());
    assert_eq!(
        readiness.is_ready(),
        Err("namespace cache has not synced"),
        "not ready before the first list"
    );
    assert_eq!(cache.policy("chiller"), None);
    let driver = tokio::spawn(driver);

    // The initial list: only namespaces carrying the opt-in label.
    let (request, respond) = tokio::time::timeout(HANG_GUARD, handle.next_request())
        .await
        .expect("the cache lists namespaces")
        .expect("a request");
    assert_eq!(request.method(), "GET");
    assert_eq!(request.uri().path(), "/api/v1/namespaces");
    let query = request.uri().query().unwrap_or_default().to_string();
    assert!(
        query.contains("labelSelector=metrics.chiller.io%2Finject%3Denabled"),
        "list must select opted-in namespaces only: {query}"
    );
    assert!(
        !query.contains("watch=true"),
        "first call is a list: {query}"
    );
    respond.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&namespace_list()).unwrap()))
            .unwrap(),
    );

    // Then it watches from the list's resourceVersion; keep that watch open.
    let (request, _held_watch) = tokio::time::timeout(HANG_GUARD, handle.next_request())
        .await
        .expect("the cache watches after listing")
        .expect("a request");
    let query = request.uri().query().unwrap_or_default().to_string();
    assert!(query.contains("watch=true"), "second call watches: {query}");
    assert!(query.contains("resourceVersion=100"), "{query}");

    tokio::time::timeout(HANG_GUARD, async {
        while readiness.is_ready().is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("ready once the cache synced");

    let policy = cache
        .policy("chiller")
        .expect("the opted-in namespace is cached");
    assert_eq!(policy.pod_selector.as_deref(), Some("app!=db"));
    assert_eq!(
        cache.policy("default"),
        None,
        "namespaces not listed are unknown"
    );
    // Lookups are served from memory: no request reached the API server.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), handle.next_request())
            .await
            .is_err(),
        "a policy lookup must not call the API server"
    );
    driver.abort();
}

#[test]
fn shutting_down_overrides_synced() {
    let readiness = Readiness::new(false);
    assert_eq!(readiness.is_ready(), Ok(()));
    readiness.mark_shutting_down();
    assert_eq!(readiness.is_ready(), Err("shutting down"));
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A cache that has synced `namespace_list()` and holds its watch open.
async fn synced_cache() -> (
    NamespaceCache,
    Handle,
    tokio::task::JoinHandle<()>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let readiness = Arc::new(Readiness::new(true));
    let (cache, driver) = NamespaceCache::watch(client, Keys::default(), readiness.clone());
    let driver = tokio::spawn(driver);
    let (_, respond) = next_request(&mut handle).await;
    respond.send_response(json_response(200, &namespace_list()));
    let (_, held_watch) = next_request(&mut handle).await;
    tokio::time::timeout(HANG_GUARD, async {
        while readiness.is_ready().is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("ready once the cache synced");
    (cache, handle, driver, held_watch)
}

async fn next_request(
    handle: &mut Handle,
) -> (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    tokio::time::timeout(HANG_GUARD, handle.next_request())
        .await
        .expect("a request within the hang guard")
        .expect("a request")
}

fn json_response(status: u16, body: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn namespace(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "resourceVersion": "101",
            "labels": labels,
            "annotations": {"metrics.chiller.io/pod-selector": "app=api"}
        }
    })
}

#[tokio::test]
async fn a_namespace_the_watch_has_not_delivered_is_read_once_from_the_api_server() {
    let (cache, mut handle, driver, _held_watch) = synced_cache().await;
    assert!(cache.is_missing("shop"));
    let waiting = tokio::spawn({
        let cache = cache.clone();
        async move { cache.wait_for("shop", Duration::from_millis(100)).await }
    });
    let (request, respond) = next_request(&mut handle).await;
    assert_eq!(request.method(), "GET");
    assert_eq!(request.uri().path(), "/api/v1/namespaces/shop");
    respond.send_response(json_response(
        200,
        &namespace("shop", json!({"metrics.chiller.io/inject": "enabled"})),
    ));
    assert!(waiting.await.unwrap(), "the looked-up namespace counts");
    assert!(!cache.is_missing("shop"));
    let policy = cache.policy("shop").expect("the looked-up policy");
    assert_eq!(policy.pod_selector.as_deref(), Some("app=api"));
    // Kept: the next review of the namespace asks the API server nothing.
    assert!(cache.wait_for("shop", Duration::from_millis(100)).await);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), handle.next_request())
            .await
            .is_err(),
        "a namespace looked up lately is not looked up again"
    );
    driver.abort();
}

#[tokio::test]
async fn a_looked_up_namespace_that_is_not_opted_in_or_is_gone_stays_unknown() {
    let (cache, mut handle, driver, _held_watch) = synced_cache().await;
    for (name, answer) in [
        (
            "opted-out",
            json_response(200, &namespace("opted-out", json!({}))),
        ),
        (
            "gone",
            json_response(
                404,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not found"}),
            ),
        ),
    ] {
        let waiting = tokio::spawn({
            let cache = cache.clone();
            async move { cache.wait_for(name, Duration::from_millis(100)).await }
        });
        let (request, respond) = next_request(&mut handle).await;
        assert_eq!(request.uri().path(), format!("/api/v1/namespaces/{name}"));
        respond.send_response(answer);
        assert!(!waiting.await.unwrap(), "{name} is not opted in");
        assert!(cache.is_missing(name), "{name}");
        assert_eq!(cache.policy(name), None, "{name}");
    }
    driver.abort();
}
