//! The one plain-HTTP GET of the project (e.g. `check` asking an admin port
//! for `/readyz`), on hyper-util's client: chunked and fixed-length answers
//! alike, a time limit on connecting and on the whole exchange, and a cap on
//! the body.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::{StatusCode, Uri, body::Bytes};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// How long a GET may take and how much it may read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to establish the TCP connection.
    pub connect: Duration,
    /// Time for the whole exchange: connecting, the answer and its body.
    pub exchange: Duration,
    /// Largest body read.
    pub max_body: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error("{url}: not an http:// URL ({reason})")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url}: no complete answer within {limit:?}")]
    Timeout { url: String, limit: Duration },
    #[error("{url}: the request failed: {reason}")]
    Request { url: String, reason: String },
    #[error("{url}: the body is larger than {limit} bytes")]
    BodyTooLarge { url: String, limit: usize },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
}

/// A GET client with fixed [`Limits`]; cheap to clone, connections are reused.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    limits: Limits,
}

impl HttpClient {
    pub fn new(limits: Limits) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.connect));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self { client, limits }
    }

    /// GETs `url` (http://host:port/path); the body when the answer is 200 OK,
    /// else an error naming the status and the start of the body.
    pub async fn get(&self, url: &str) -> Result<Bytes, HttpClientError> {
        let uri: Uri =
            url.parse().map_err(
                |e: hyper::http::uri::InvalidUri| HttpClientError::InvalidUrl {
                    url: url.to_string(),
                    reason: e.to_string(),
                },
            )?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(HttpClientError::InvalidUrl {
                url: url.to_string(),
                reason: "scheme http and a host are required".into(),
            });
        }
        let limit = self.limits.exchange;
        tokio::time::timeout(limit, self.exchange(uri, url))
            .await
            .unwrap_or_else(|_| {
                Err(HttpClientError::Timeout {
                    url: url.to_string(),
                    limit,
                })
            })
    }

    async fn exchange(&self, uri: Uri, url: &str) -> Result<Bytes, HttpClientError> {
        let response = self.client.get(uri).await.map_err(|error| {
            let reason = innermost(&error);
            if error.is_connect() {
                HttpClientError::Connect {
                    url: url.to_string(),
                    reason,
                }
            } else {
                HttpClientError::Request {
                    url: url.to_string(),
                    reason,
                }
            }
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), self.limits.max_body)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<LengthLimitError>() {
                    HttpClientError::BodyTooLarge {
                        url: url.to_string(),
                        limit: self.limits.max_body,
                    }
                } else {
                    HttpClientError::Request {
                        url: url.to_string(),
                        reason: innermost(error.as_ref()),
                    }
                }
            })?
            .to_bytes();
        if status != StatusCode::OK {
            const SHOWN: usize = 512;
            let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN)]);
            return Err(HttpClientError::Status {
                url: url.to_string(),
                status,
                body: text.trim().to_string(),
            });
        }
        Ok(body)
    }
}

/// The message of the deepest cause (e.g. "Connection refused (os error
/// 111)"), which says more than hyper's outer "client error (Connect)".
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        task::JoinHandle,
    };

    use super::*;

    const LIMITS: Limits = Limits {
        connect: Duration::from_secs(5),
        exchange: Duration::from_secs(5),
        max_body: 64 * 1024,
    };

    /// A server on 127.0.0.1 that reads one request head and writes `answer`
    /// (raw bytes, so the tests control the framing), then holds the
    /// connection open until the client closes it.
    async fn serve_once(answer: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = stream.read(&mut buffer).await.unwrap();
                if read == 0 {
                    return;
                }
                head.extend_from_slice(&buffer[..read]);
            }
            stream.write_all(answer).await.unwrap();
            // Until the client hangs up.
            while stream.read(&mut buffer).await.is_ok_and(|n| n > 0) {}
        });
        (address, task)
    }

    #[tokio::test]
    async fn a_chunked_answer_is_decoded() {
        let (address, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              7\r\n# HELP \r\n\
              19\r\nstatsd_exporter_up gauge\n\r\n\
              0\r\n\r\n",
        )
        .await;
        let body = HttpClient::new(LIMITS)
            .get(&format!("http://{address}/metrics"))
            .await
            .unwrap();
        assert_eq!(&body[..], b"# HELP statsd_exporter_up gauge\n");
        server.abort();
    }

    #[tokio::test]
    async fn a_slow_answer_hits_the_timeout() {
        // Accepts and reads, never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = [0u8; 1024];
            while stream.read(&mut buffer).await.is_ok_and(|n| n > 0) {}
        });
        let limits = Limits {
            exchange: Duration::from_millis(300),
            ..LIMITS
        };
        let url = format!("http://{address}/metrics");
        let outcome =
            tokio::time::timeout(Duration::from_secs(30), HttpClient::new(limits).get(&url))
                .await
                .expect("the client's own limit ends the call");
        let error = outcome.unwrap_err();
        assert!(
            matches!(error, HttpClientError::Timeout { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("{url}: no complete answer within 300ms")
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_refused_connection_is_reported_as_such() {
        // A port that was just free: bound, then released.
        let address = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let url = format!("http://{address}/readyz");
        let error = HttpClient::new(LIMITS).get(&url).await.unwrap_err();
        assert!(
            matches!(error, HttpClientError::Connect { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot connect to {url}: ")),
            "{message}"
        );
        assert!(message.to_lowercase().contains("refused"), "{message}");
    }

    #[tokio::test]
    async fn a_status_other_than_200_is_reported_with_the_body() {
        let (address, server) = serve_once(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 14\r\n\r\nshutting down\n",
        )
        .await;
        let url = format!("http://{address}/readyz");
        let error = HttpClient::new(LIMITS).get(&url).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("{url} answered 503 Service Unavailable: shutting down")
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let (address, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              10\r\n0123456789abcdef\r\n\
              10\r\n0123456789abcdef\r\n\
              0\r\n\r\n",
        )
        .await;
        let limits = Limits {
            max_body: 20,
            ..LIMITS
        };
        let error = HttpClient::new(limits)
            .get(&format!("http://{address}/metrics"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, HttpClientError::BodyTooLarge { limit: 20, .. }),
            "{error:?}"
        );
        server.abort();
    }
}
