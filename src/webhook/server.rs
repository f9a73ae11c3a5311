//! The HTTPS accept loop: TLS handshakes, HTTP/1.1 and HTTP/2 (ALPN), explicit
//! limits and timeouts, and graceful shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::Request,
    http::StatusCode,
    middleware::{self, Next},
    response::IntoResponse,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use rustls::ServerConfig;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;

/// Limits of the HTTPS server. Defaults suit an admission webhook: the API
/// server keeps a few long-lived connections and sends small requests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at most; further clients wait in the accept backlog.
    pub max_connections: usize,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's headers (HTTP/1.1), counted from
    /// the start of the connection or the end of the previous response.
    pub header_read_timeout: Duration,
    /// Time to read the body and answer one request.
    pub request_timeout: Duration,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// On shutdown, time in-flight requests get to finish.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            shutdown_timeout: Duration::from_secs(15),
        }
    }
}

/// Adds the per-request timeout (408 when it runs out) to a router.
pub fn with_request_timeout(router: Router, timeout: Duration) -> Router {
    router.layer(middleware::from_fn(
        move |request: Request, next: Next| async move {
            match tokio::time::timeout(timeout, next.run(request)).await {
                Ok(response) => response,
                Err(_) => (StatusCode::REQUEST_TIMEOUT, "request took too long\n").into_response(),
            }
        },
    ))
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(limits.idle_timeout / 3))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then stops
/// accepting and lets in-flight requests finish (up to `shutdown_timeout`).
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let builder = Arc::new(http_builder(&limits));
    let router = with_request_timeout(router, limits.request_timeout);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let io = idle::IdleTimeout::new(TokioIo::new(stream), limits.idle_timeout);
            let connection = builder.serve_connection(io, service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(open, "stopped accepting; waiting for in-flight requests");
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout reached; closing remaining connections");
    }
    Ok(())
}

mod idle {
    //! Closes a connection that has neither read nor written for a while.

    use std::{
        pin::Pin,
        task::{Context, Poll},
        time::Duration,
    };

    use hyper::rt::{Read, ReadBufCursor, Write};
    use tokio::time::{Instant, Sleep};

    pub struct IdleTimeout<T> {
        inner: T,
        timeout: Duration,
        deadline: Pin<Box<Sleep>>,
    }

    impl<T> IdleTimeout<T> {
        pub fn new(inner: T, timeout: Duration) -> Self {
            Self {
                inner,
                timeout,
                deadline: Box::pin(tokio::time::sleep(timeout)),
            }
        }

        fn touch(&mut self) {
            self.deadline.as_mut().reset(Instant::now() + self.timeout);
        }

        fn expired(&mut self, cx: &mut Context<'_>) -> bool {
            self.deadline.as_mut().poll(cx).is_ready()
        }
    }

    fn timed_out() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "connection idle too long")
    }

    impl<T: Read + Unpin> Read for IdleTimeout<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: ReadBufCursor<'_>,
        ) -> Poll<std::io::Result<()>> {
            match Pin::new(&mut self.inner).poll_read(cx, buf) {
                Poll::Ready(result) => {
                    self.touch();
                    Poll::Ready(result)
                }
                Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    impl<T: Write + Unpin> Write for IdleTimeout<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let result = Pin::new(&mut self.inner).poll_write(cx, buf);
            if result.is_ready() {
                self.touch();
            }
            result
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            if result.is_ready() {
                self.touch();
            }
            result
        }
    }

    use std::future::Future;
}
