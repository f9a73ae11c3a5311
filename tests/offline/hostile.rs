//! Hostile input against the running webhook over real HTTPS: every request
//! gets a clear 4xx or "allowed" with no patch, and after each one the server
//! still serves the chiller API pod. Also: the limits and timeouts (slow
//! clients, idle connections beyond `max_connections`, clients that vanish
//! mid-request) and the TLS versions offered.

use crate::support;

use std::time::{Duration, Instant};

use chiller_metrics::webhook::{server::Limits, tls::MinTlsVersion};
use http::{Method, StatusCode};
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use support::https::{
    HttpResponse, HttpVersion, ServerOptions, TestServer, chiller_api_review, decoded_patch,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Short limits so that the timeout cases run in seconds.
fn short_limits() -> Limits {
    Limits {
        max_connections: 8,
        handshake_timeout: Duration::from_secs(1),
        header_read_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(2),
    }
}

async fn start() -> TestServer {
    TestServer::start(ServerOptions {
        limits: short_limits(),
        ..ServerOptions::default()
    })
    .await
}

fn fixture() -> Vec<u8> {
    serde_json::to_vec(&chiller_api_review()).unwrap()
}

/// The chiller API pod, on a new connection of each HTTP version, is injected.
async fn assert_serves(server: &TestServer, after: &str) {
    for version in HttpVersion::ALL {
        let response = server
            .client()
            .post_json("/mutate", fixture(), version)
            .await
            .unwrap_or_else(|e| panic!("after {after}: normal {version:?} request failed: {e}"));
        assert_eq!(
            response.status,
            StatusCode::OK,
            "after {after}: {}",
            response.text()
        );
        let patch = decoded_patch(&response.json());
        assert!(!patch.0.is_empty(), "after {after}: empty patch");
    }
}

/// A 4xx with a message that says what is wrong.
fn assert_client_error(response: &HttpResponse, status: StatusCode, mentions: &str, case: &str) {
    assert_eq!(response.status, status, "{case}: {}", response.text());
    assert!(
        response.text().to_lowercase().contains(mentions),
        "{case}: answer {:?} does not mention {mentions:?}",
        response.text()
    );
}

/// "allowed" for the request's uid, with no patch.
fn assert_allowed_without_patch(response: &HttpResponse, uid: &str, case: &str) {
    assert_eq!(
        response.status,
        StatusCode::OK,
        "{case}: {}",
        response.text()
    );
    let review = response.json();
    assert_eq!(review["response"]["uid"], uid, "{case}");
    assert_eq!(review["response"]["allowed"], true, "{case}");
    assert!(
        review["response"].get("patch").is_none(),
        "{case}: {review}"
    );
}

/// Each case, over each HTTP version, gets its 4xx with a clear message, and
/// a normal request succeeds right after it.
async fn assert_rejected_then_serves(
    server: &TestServer,
    cases: &[(&str, Vec<u8>, StatusCode, &str)],
) {
    for (case, body, status, mentions) in cases {
        for version in HttpVersion::ALL {
            let response = post(server, body.clone(), version).await;
            assert_client_error(&response, *status, mentions, case);
            assert_serves(server, case).await;
        }
    }
}

async fn post(server: &TestServer, body: Vec<u8>, version: HttpVersion) -> HttpResponse {
    server
        .client()
        .post_json("/mutate", body, version)
        .await
        .expect("the server answers")
}

fn review_with(change: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut review = chiller_api_review();
    change(&mut review);
    serde_json::to_vec(&review).unwrap()
}

#[tokio::test]
async fn malformed_bodies_get_a_clear_4xx() {
    let server = start().await;
    let whole = fixture();
    let mut invalid_utf8 = whole.clone();
    let at = whole
        .windows(4)
        .position(|w| w == b"api\"")
        .expect("the fixture names the api container");
    invalid_utf8[at] = 0xff;
    // Deep nesting inside the pod, unterminated: the body ends before the
    // nesting does. (Well-formed, it is skipped like any field the webhook
    // does not read: see `deep_nesting_in_fields_the_webhook_skips_changes_nothing`.)
    let envelope = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE","object":{"kind":"Pod","metadata":{"managedFields":[{"fieldsV1":"#;
    let nested = |open: &str, close: &str, depth: usize, closed: bool| {
        let mut body = format!("{envelope}{}", open.repeat(depth));
        if closed {
            body += if close == "}" { "0" } else { "" };
            body += &close.repeat(depth);
            body += "}]}}}}";
        }
        body.into_bytes()
    };
    let deep_array = nested("[", "]", 100_000, false);
    let deep_object = nested(r#"{"a":"#, "}", 50_000, false);
    let cases: [(&str, Vec<u8>, StatusCode, &str); 6] = [
        (
            "truncated JSON",
            whole[..whole.len() / 2].to_vec(),
            StatusCode::BAD_REQUEST,
            "eof",
        ),
        (
            "array nested 100000 deep, unterminated",
            deep_array,
            StatusCode::BAD_REQUEST,
            "eof while parsing",
        ),
        (
            "object nested 50000 deep, unterminated",
            deep_object,
            StatusCode::BAD_REQUEST,
            "eof while parsing",
        ),
        (
            "invalid UTF-8",
            invalid_utf8,
            StatusCode::BAD_REQUEST,
            "invalid unicode",
        ),
        ("empty body", Vec::new(), StatusCode::BAD_REQUEST, "empty"),
        (
            "not JSON at all",
            b"\x00\x01binary\xfe".to_vec(),
            StatusCode::BAD_REQUEST,
            "not a valid admissionreview",
        ),
    ];
    assert_rejected_then_serves(&server, &cases).await;
}

/// Fields the webhook does not read (`options`, `oldObject`, `userInfo`, and
/// in the pod everything but what the injector reads, such as the free-form
/// `managedFields[].fieldsV1`) are skipped without recursion: nesting there,
/// a million deep, neither overflows the stack nor changes the answer.
#[tokio::test]
async fn deep_nesting_in_fields_the_webhook_skips_changes_nothing() {
    let server = start().await;
    let depth = 1_000_000;
    let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let objects = format!("{}0{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
    let in_options = "/request/options";
    let in_fields_v1 = "/request/object/metadata/managedFields/0/fieldsV1";
    let cases = [
        ("arrays in options", in_options, &arrays),
        ("arrays in fieldsV1", in_fields_v1, &arrays),
        ("objects in fieldsV1", in_fields_v1, &objects),
    ];
    for (case, place, nesting) in cases {
        let mut review = chiller_api_review();
        review["request"]["object"]["metadata"]["managedFields"] =
            json!([{"manager": "kubectl", "operation": "Update", "fieldsV1": {}}]);
        review["request"]["options"] = json!({});
        *review.pointer_mut(place).expect("the place exists") = json!("NESTED");
        let uid = review["request"]["uid"].as_str().unwrap().to_string();
        let body = serde_json::to_string(&review)
            .unwrap()
            .replace("\"NESTED\"", nesting)
            .into_bytes();
        for version in HttpVersion::ALL {
            let response = post(&server, body.clone(), version).await;
            assert_eq!(
                response.status,
                StatusCode::OK,
                "{case}: {}",
                response.text()
            );
            let answer = response.json();
            assert_eq!(answer["response"]["uid"], uid.as_str(), "{case}");
            assert_eq!(answer["response"]["allowed"], true, "{case}");
            assert!(
                !decoded_patch(&answer).0.is_empty(),
                "{case}: the pod is injected as usual"
            );
            assert_serves(&server, case).await;
        }
    }
}

#[tokio::test]
async fn wrong_content_type_gets_415() {
    let server = start().await;
    for content_type in ["text/plain", "application/yaml", ""] {
        for version in HttpVersion::ALL {
            let headers: Vec<(&str, &str)> = if content_type.is_empty() {
                Vec::new()
            } else {
                vec![("content-type", content_type)]
            };
            let response = server
                .client()
                .request(Method::POST, "/mutate", &headers, fixture(), version)
                .await
                .expect("the server answers");
            let case = format!("content type {content_type:?}");
            assert_client_error(
                &response,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content type must be application/json",
                &case,
            );
            assert_serves(&server, &case).await;
        }
    }
}

#[tokio::test]
async fn reviews_we_cannot_answer_get_a_clear_4xx() {
    let server = start().await;
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "missing uid",
            review_with(|r| {
                r["request"].as_object_mut().unwrap().remove("uid");
            }),
            StatusCode::BAD_REQUEST,
            "uid",
        ),
        (
            "empty uid",
            review_with(|r| r["request"]["uid"] = json!("")),
            StatusCode::BAD_REQUEST,
            "uid",
        ),
        (
            "unknown apiVersion",
            review_with(|r| r["apiVersion"] = json!("admission.k8s.io/v1beta1")),
            StatusCode::BAD_REQUEST,
            "unsupported admissionreview",
        ),
        (
            "wrong kind",
            review_with(|r| r["kind"] = json!("TokenReview")),
            StatusCode::BAD_REQUEST,
            "unsupported admissionreview",
        ),
        (
            "no request",
            review_with(|r| {
                r.as_object_mut().unwrap().remove("request");
            }),
            StatusCode::BAD_REQUEST,
            "no request",
        ),
        (
            "null object on CREATE",
            review_with(|r| r["request"]["object"] = Value::Null),
            StatusCode::BAD_REQUEST,
            "no object",
        ),
        (
            "object that is not a pod",
            review_with(|r| r["request"]["object"]["spec"]["containers"] = json!("api")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not a valid pod",
        ),
    ];
    assert_rejected_then_serves(&server, &cases).await;
}

#[tokio::test]
async fn requests_we_do_not_mutate_are_allowed_without_patch() {
    let server = start().await;
    let uid = chiller_api_review()["request"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let deployment = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "DELETE",
            review_with(|r| {
                r["request"]["operation"] = json!("DELETE");
                r["request"]["oldObject"] = r["request"]["object"].take();
            }),
        ),
        (
            "UPDATE",
            review_with(|r| {
                r["request"]["operation"] = json!("UPDATE");
                r["request"]["oldObject"] = r["request"]["object"].clone();
            }),
        ),
        (
            "Deployment",
            review_with(|r| r["request"]["kind"] = deployment.clone()),
        ),
        (
            "ConfigMap with a null object",
            review_with(|r| {
                r["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
                r["request"]["object"] = Value::Null;
            }),
        ),
        (
            "pods/ephemeralcontainers subresource",
            review_with(|r| r["request"]["subResource"] = json!("ephemeralcontainers")),
        ),
    ];
    for (case, body) in cases {
        for version in HttpVersion::ALL {
            let response = post(&server, body.clone(), version).await;
            assert_allowed_without_patch(&response, &uid, case);
            assert_serves(&server, case).await;
        }
    }
}

#[tokio::test]
async fn a_10_mb_body_gets_413() {
    let server = start().await;
    let padding = "x".repeat(10 * 1024 * 1024);
    let body = review_with(|r| {
        r["request"]["object"]["metadata"]["annotations"]["padding"] = json!(padding)
    });
    for version in HttpVersion::ALL {
        let response = post(&server, body.clone(), version).await;
        assert_client_error(
            &response,
            StatusCode::PAYLOAD_TOO_LARGE,
            "length limit exceeded",
            "10 MB body",
        );
        assert_serves(&server, "a 10 MB body").await;
    }
    // Without a content-length the limit applies while reading (HTTP/1.1 chunked).
    let mut stream = server
        .client()
        .tls_connect(HttpVersion::Http1)
        .await
        .unwrap();
    let head = "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                transfer-encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 1024 * 1024];
    let mut answer = Vec::new();
    for _ in 0..10 {
        let framed = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "chunked 10 MB body: {answer:?}"
    );
    assert_serves(&server, "a chunked 10 MB body").await;
}

/// Reads until the server closes the connection (or the deadline passes).
/// Returns what it sent and whether it closed.
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Duration,
) -> (Vec<u8>, bool) {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(deadline, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (received, closed)
}

#[tokio::test]
async fn slowloris_headers_are_cut_off_by_the_header_timeout() {
    let server = start().await;
    let mut stream = server
        .client()
        .tls_connect(HttpVersion::Http1)
        .await
        .unwrap();
    let head = b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\nx-slow: yes\r\n";
    let started = Instant::now();
    let mut cut_off = false;
    // One byte every 100 ms: far slower than the 1 s header timeout allows.
    for byte in head.iter().cycle().take(600) {
        if stream.write_all(&[*byte]).await.is_err() || stream.flush().await.is_err() {
            cut_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 512];
        // An answer (408) or EOF: either way the server is done with us.
        if tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe))
            .await
            .is_ok()
        {
            cut_off = true;
            break;
        }
    }
    assert!(
        cut_off,
        "a client trickling its headers for {:?} was never cut off",
        started.elapsed()
    );
    assert_serves(&server, "a slowloris client").await;
}

#[tokio::test]
async fn http2_headers_that_never_end_are_cut_off_by_the_idle_timeout() {
    let server = start().await;
    let mut stream = server
        .client()
        .tls_connect(HttpVersion::Http2)
        .await
        .unwrap();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let settings = [0u8, 0, 0, 0x4, 0, 0, 0, 0, 0];
    // HEADERS on stream 1 without END_HEADERS; the CONTINUATION never comes.
    let headers = [0u8, 0, 1, 0x1, 0, 0, 0, 0, 1, 0x83];
    stream
        .write_all(&[&preface[..], &settings, &headers].concat())
        .await
        .unwrap();
    stream.flush().await.unwrap();
    // Well before the 20 s HTTP/2 keep-alive timeout could close it instead.
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        closed,
        "an HTTP/2 client that never finished its headers kept its connection"
    );
    assert_serves(&server, "unfinished HTTP/2 headers").await;
}

#[tokio::test]
async fn a_silent_client_is_cut_off_by_the_handshake_timeout() {
    let server = start().await;
    let mut tcp = tokio::net::TcpStream::connect(server.webhook_addr)
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut tcp, Duration::from_secs(20)).await;
    assert!(closed, "a client that never starts TLS kept its connection");
    assert_serves(&server, "a silent TCP client").await;
}

#[tokio::test]
async fn a_slow_body_gets_408() {
    let server = start().await;
    let body = fixture();
    let mut stream = server
        .client()
        .tls_connect(HttpVersion::Http1)
        .await
        .unwrap();
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..10]).await.unwrap();
    stream.flush().await.unwrap();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        closed,
        "a request whose body never came kept its connection"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "slow body: {answer:?}");
    assert_serves(&server, "a slow body").await;
}

#[tokio::test]
async fn idle_connections_beyond_the_limit_are_closed_and_serving_resumes() {
    let limits = Limits {
        max_connections: 4,
        ..short_limits()
    };
    let server = TestServer::start(ServerOptions {
        limits,
        ..ServerOptions::default()
    })
    .await;
    let client = server.client();
    // Fill every slot: two idle HTTP/1.1 and two idle HTTP/2 connections (TLS done, no request).
    let mut idle = Vec::new();
    for version in [
        HttpVersion::Http1,
        HttpVersion::Http1,
        HttpVersion::Http2,
        HttpVersion::Http2,
    ] {
        idle.push(client.tls_connect(version).await.expect("idle connection"));
    }
    // More clients than slots: they wait in the backlog, then are served.
    let waiting: Vec<_> = (0..6)
        .map(|i| {
            let client = client.clone();
            let version = HttpVersion::ALL[i % 2];
            tokio::spawn(async move { client.post_json("/mutate", fixture(), version).await })
        })
        .collect();
    for waiter in waiting {
        let response = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("a waiting client was never served")
            .unwrap()
            .expect("a waiting client failed");
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    }
    for (i, stream) in idle.iter_mut().enumerate() {
        let (_, closed) = read_until_closed(stream, Duration::from_secs(20)).await;
        assert!(closed, "idle connection {i} was never closed");
    }
    assert_serves(&server, "idle connections").await;
}

#[tokio::test]
async fn keep_alive_connections_stay_open_past_the_header_timeout() {
    // kube-apiserver keeps idle webhook connections for 90 s and writes the
    // next review into one of them: a server that closes sooner races it
    // (a broken pipe, the review fails open, the pod goes uninjected).
    let server = start().await;
    for version in HttpVersion::ALL {
        let mut connection = server.client().connect(version).await.unwrap();
        let response = connection.post_json("/mutate", fixture()).await.unwrap();
        assert_eq!(response.status, StatusCode::OK);
        // Idle longer than the 1 s header timeout, shorter than the 2 s idle timeout.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let again = connection.post_json("/mutate", fixture()).await;
        assert!(
            again.as_ref().is_ok_and(|r| r.status == StatusCode::OK),
            "{version:?}: a keep-alive connection was closed before the idle timeout: {:?}",
            again.err()
        );
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let server = start().await;
    for version in HttpVersion::ALL {
        let mut connection = server.client().connect(version).await.unwrap();
        let response = connection.post_json("/mutate", fixture()).await.unwrap();
        assert_eq!(response.status, StatusCode::OK);
        // Idle for longer than every timeout: the server must have closed it.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let again = connection.post_json("/mutate", fixture()).await;
        assert!(
            again.is_err(),
            "{version:?}: a connection idle beyond the idle timeout was still open"
        );
    }
    assert_serves(&server, "idle keep-alive connections").await;
}

#[tokio::test]
async fn clients_that_vanish_mid_request_do_not_hurt() {
    let server = start().await;
    let body = fixture();
    for cut in [0, 10, body.len() / 2, body.len() - 1] {
        let mut stream = server
            .client()
            .tls_connect(HttpVersion::Http1)
            .await
            .unwrap();
        let head = format!(
            "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body[..cut]).await.unwrap();
        stream.flush().await.unwrap();
        drop(stream);
        assert_serves(&server, &format!("a client gone after {cut} body bytes")).await;
    }
    // HTTP/2: a request whose stream is dropped before the body is complete.
    let mut tls = server
        .client()
        .tls_connect(HttpVersion::Http2)
        .await
        .unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    drop(tls);
    assert_serves(&server, "an HTTP/2 client gone after its preface").await;
}

fn tls12_only_client(server: &TestServer) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(server.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

#[tokio::test]
async fn tls_1_2_is_accepted_by_default_and_refused_in_1_3_only_mode() {
    let default = start().await;
    let stream = default
        .client()
        .tls_connect_with(tls12_only_client(&default))
        .await
        .expect("a TLS 1.2 client is accepted by default");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let suite = stream.get_ref().1.negotiated_cipher_suite().unwrap();
    let name = format!("{:?}", suite.suite());
    assert!(
        name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
        "TLS 1.2 suite {name} is not an AEAD suite"
    );

    let strict = TestServer::start(ServerOptions {
        limits: short_limits(),
        tls_min_version: MinTlsVersion::Tls13,
        ..ServerOptions::default()
    })
    .await;
    let refused = strict
        .client()
        .tls_connect_with(tls12_only_client(&strict))
        .await;
    assert!(
        refused.is_err(),
        "a TLS 1.2 client was accepted in 1.3-only mode"
    );
    let stream = strict
        .client()
        .tls_connect(HttpVersion::Http2)
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_serves(&strict, "a refused TLS 1.2 client").await;
}
