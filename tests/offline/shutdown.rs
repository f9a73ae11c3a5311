//! Graceful shutdown of the real binary under load: on SIGTERM `/readyz`
//! turns 503 while the webhook keeps serving (the drain), no request of the
//! load generator fails, a request in flight when the drain ends completes,
//! new connections are refused only after the drain, and the exit code is 0.

use crate::support;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use http::StatusCode;
use support::https::{HttpVersion, ServeProcess, admin_get, chiller_api_review, write_certs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DRAIN_SECONDS: u64 = 8;

fn h2load(addr: std::net::SocketAddr, body: &std::path::Path, http1: bool) -> Child {
    let protocol: &[&str] = if http1 {
        &["--h1", "-m", "1"]
    } else {
        &["-m", "4", "--npn-list=h2"]
    };
    let mut command = Command::new(support::tool("h2load"));
    command
        .args(["-D", "5", "-c", "4", "-t", "1"])
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/json"])
        .args(protocol)
        .arg(format!("https://127.0.0.1:{}/mutate", addr.port()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.spawn().expect("running h2load")
}

/// Waits for h2load and panics unless every request got a 2xx.
fn assert_no_failures(child: Child, what: &str) {
    let output = child.wait_with_output().expect("waiting for h2load");
    support::load::assert_h2load_all_succeeded(&output, what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_then_exits_cleanly() {
    let scratch = tempfile::tempdir().unwrap();
    let generated = write_certs(scratch.path());
    let body_path = scratch.path().join("body.json");
    let body = serde_json::to_vec(&chiller_api_review()).unwrap();
    std::fs::write(&body_path, &body).unwrap();

    let mut command = ServeProcess::command(scratch.path());
    command
        .arg("--tls-cert")
        .arg(scratch.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(scratch.path().join("tls.key"))
        .args(["--drain-seconds", &DRAIN_SECONDS.to_string()])
        .args(["--shutdown-timeout-seconds", "10"])
        .args(["--request-timeout-seconds", "20"]);
    let mut server = ServeProcess::start(command).expect("serve starts");
    server.wait_ready().await.unwrap();
    let addr = server.webhook_addr;
    let client = server.client(&generated.ca_cert);

    let loads = [
        ("h2load HTTP/1.1", h2load(addr, &body_path, true)),
        ("h2load HTTP/2", h2load(addr, &body_path, false)),
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let signalled = Instant::now();
    server.send_sigterm();

    // Not ready at once (poll: the signal is delivered asynchronously) ...
    let deadline = signalled + Duration::from_secs(DRAIN_SECONDS / 2);
    loop {
        let readyz = admin_get(server.admin_addr, "/readyz").await.unwrap();
        if readyz.status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {} after SIGTERM",
            readyz.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... while the webhook still takes new connections and answers.
    for version in HttpVersion::ALL {
        let response = client
            .post_json("/mutate", body.clone(), version)
            .await
            .expect("a new connection during the drain is served");
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    }

    // A request in flight across the end of the drain: headers and half the body now.
    let mut in_flight = client.tls_connect(HttpVersion::Http1).await.unwrap();
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    in_flight.write_all(&body[..body.len() / 2]).await.unwrap();
    in_flight.flush().await.unwrap();

    for (what, load) in loads {
        assert_no_failures(load, what);
    }

    // After the drain, new connections are refused.
    let deadline = Instant::now() + Duration::from_secs(DRAIN_SECONDS * 3);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "the webhook still accepts connections long after the drain"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(
        signalled.elapsed() >= Duration::from_secs(DRAIN_SECONDS),
        "connections were refused before the drain period ended"
    );

    // The request in flight still completes.
    in_flight.write_all(&body[body.len() / 2..]).await.unwrap();
    in_flight.flush().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), in_flight.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the request in flight when the drain ended got {answer:?}"
    );
    assert!(answer.contains("\"allowed\":true"), "{answer}");

    let status = server.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "serve exited with {status}:\n{}",
        server.log().join("\n")
    );
}
