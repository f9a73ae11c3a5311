//! The HTTPS accept loop: TLS handshakes, HTTP/1.1 and HTTP/2 (ALPN), explicit
//! limits and timeouts, and graceful shutdown.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{Router, extract::Request, http::StatusCode, response::IntoResponse};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore, mpsc, watch},
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Limits of the HTTPS server. Defaults suit an admission webhook: the API
/// server keeps a few long-lived connections and sends small requests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at most; further clients wait in the accept backlog.
    pub max_connections: usize,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's headers (HTTP/1.1), counted from
    /// the first byte of the request. An idle keep-alive connection waits for
    /// its next request up to `idle_timeout`.
    pub header_read_timeout: Duration,
    /// Time to read the body and answer one request.
    pub request_timeout: Duration,
    /// A connection with no request in flight for this long is closed
    /// gracefully; bytes without requests (HTTP/2 pings) do not count. A
    /// client that ignores the close is dropped `header_read_timeout` later.
    /// Longer than kube-apiserver keeps idle connections (90 s), so the API
    /// server always closes first and never sends a review into a connection
    /// this side is closing.
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
            idle_timeout: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(15),
        }
    }
}

/// The answer to a request that ran out of `Limits::request_timeout`.
fn request_timed_out() -> axum::response::Response {
    (StatusCode::REQUEST_TIMEOUT, "request took too long\n").into_response()
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper would time the wait for the next request on a keep-alive
        // connection too; the head is timed from its first byte instead.
        .header_read_timeout(None)
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

/// What the connections are told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// Finish in-flight requests, then close.
    Graceful,
    /// Close now.
    Abort,
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
    let (stop, stopping) = watch::channel(Stop::Running);
    // Every connection task holds a sender; `recv` returns None once all ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
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
        let connection = ConnectionTask {
            acceptor: acceptor.clone(),
            builder: builder.clone(),
            router: router.clone(),
            limits: limits.clone(),
            stopping: stopping.clone(),
        };
        let open = open.clone();
        tokio::spawn(async move {
            let _slot = permit;
            let _open = open;
            connection.run(tcp, peer).await;
        });
    }
    drop(listener);
    drop(open);
    tracing::info!("stopped accepting; waiting for in-flight requests");
    let _ = stop.send(Stop::Graceful);
    if tokio::time::timeout(limits.shutdown_timeout, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout reached; closing remaining connections");
        let _ = stop.send(Stop::Abort);
        let _ = tokio::time::timeout(Duration::from_secs(1), all_closed.recv()).await;
    }
    Ok(())
}

struct ConnectionTask {
    acceptor: TlsAcceptor,
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: Router,
    limits: Limits,
    stopping: watch::Receiver<Stop>,
}

impl ConnectionTask {
    async fn run(mut self, tcp: TcpStream, peer: SocketAddr) {
        let handshake =
            tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp));
        let stream = tokio::select! {
            result = handshake => match result {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            },
            _ = self.stopping.wait_for(|stop| *stop != Stop::Running) => return,
        };
        let activity = Arc::new(Activity::new());
        // HTTP/2 frames flow without requests (pings, settings): only an
        // HTTP/1.1 head is timed from its first byte.
        let times_heads = stream.get_ref().1.alpn_protocol() != Some(b"h2");
        let service = {
            let activity = activity.clone();
            let router = self.router.clone();
            let timeout = self.limits.request_timeout;
            // The timeout here rather than as a router layer: a layer boxes
            // each request's future once more.
            hyper::service::service_fn(move |request: Request<Incoming>| {
                let in_flight = activity.start();
                let router = router.clone();
                async move {
                    let response = tokio::time::timeout(timeout, router.oneshot(request))
                        .await
                        .unwrap_or_else(|_| Ok(request_timed_out()));
                    drop(in_flight);
                    response
                }
            })
        };
        let io = TokioIo::new(ReadWatch {
            inner: stream,
            activity: activity.clone(),
        });
        let connection = self.builder.serve_connection(io, service);
        tokio::pin!(connection);
        let mut closing = false;
        // A graceful close can stall on a client that ignores it (HTTP/2 waits
        // for a ping answer): an idle connection gets this long, then is dropped.
        let mut idle_close_by: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                    return;
                }
                stop = stop_signal(&mut self.stopping, closing) => {
                    if stop == Stop::Abort {
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = activity.head_overdue(self.limits.header_read_timeout), if times_heads => {
                    tracing::debug!(%peer, "request head not complete in time; dropping the connection");
                    return;
                }
                () = activity.idle_for(self.limits.idle_timeout), if !closing => {
                    tracing::debug!(%peer, "closing idle connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    idle_close_by = Some(tokio::time::Instant::now() + self.limits.header_read_timeout);
                }
                () = sleep_until(idle_close_by) => {
                    if activity.in_flight.load(Ordering::SeqCst) == 0 {
                        tracing::debug!(%peer, "idle connection ignored the close; dropping it");
                        return;
                    }
                    idle_close_by = Some(tokio::time::Instant::now() + self.limits.request_timeout);
                }
            }
        }
    }
}

/// Sleeps until `deadline`; never resolves without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Resolves with the next instruction a connection must act on: `Graceful`
/// (unless it is already closing) or `Abort`. A dropped sender means abort.
async fn stop_signal(stopping: &mut watch::Receiver<Stop>, closing: bool) -> Stop {
    let wanted = |stop: &Stop| match stop {
        Stop::Running => false,
        Stop::Graceful => !closing,
        Stop::Abort => true,
    };
    match stopping.wait_for(wanted).await {
        Ok(stop) => *stop,
        Err(_) => Stop::Abort,
    }
}

/// Requests in flight on one connection. A connection is idle while none is,
/// whatever bytes flow (HTTP/2 pings, a client trickling headers). Bytes
/// that arrive while it is idle start a request's head.
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
    head_since: Mutex<Option<Instant>>,
    changed: Notify,
}

struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            head_since: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// A request started. Wakes nobody: the timers look again when they
    /// run out, so a request costs the connection's task no extra poll.
    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        *self.head_since.lock().expect("lock") = None;
        InFlight(self.clone())
    }

    /// Bytes arrived: with no request in flight, they begin the next head.
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::SeqCst) != 0 {
            return;
        }
        let mut head_since = self.head_since.lock().expect("lock");
        if head_since.is_none() {
            *head_since = Some(Instant::now());
            self.changed.notify_waiters();
        }
    }

    /// Resolves once a head began `timeout` ago and no request started since.
    async fn head_overdue(&self, timeout: Duration) {
        loop {
            // Registered before the check, so a head that begins after it wakes us.
            let changed = self.changed.notified();
            let head_since = *self.head_since.lock().expect("lock");
            match head_since {
                Some(since) => {
                    tokio::time::sleep_until((since + timeout).into()).await;
                    if *self.head_since.lock().expect("lock") == Some(since) {
                        return;
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Resolves once no request has been in flight for `timeout`. Checked
    /// when a timer runs out, not on every request: a connection that was
    /// busy at a check is closed at most `timeout` later than it could be.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let deadline = if self.in_flight.load(Ordering::SeqCst) == 0 {
                *self.idle_since.lock().expect("lock") + timeout
            } else {
                Instant::now() + timeout
            };
            tokio::time::sleep_until(deadline.into()).await;
            let idle_since = *self.idle_since.lock().expect("lock");
            if self.in_flight.load(Ordering::SeqCst) == 0 && idle_since.elapsed() >= timeout {
                return;
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.idle_since.lock().expect("lock") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connection's stream, telling `Activity` when bytes arrive.
struct ReadWatch<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadWatch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
