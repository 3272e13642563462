//! The network side: accepting under a connection cap, hyper's HTTP/1 with a header size
//! limit, a header-read and an idle timeout per connection, the routes, graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tollgate::key::PeerAddr;
use tower::ServiceExt;

use crate::app::{Body, Live, Original};

/// What every connection needs.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) live: Live,
    pub(crate) metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// Accepts until `shutdown` turns true, then gives open connections the configured time to
/// finish.
pub(crate) async fn run(
    listener: TcpListener,
    shared: Shared,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let max = shared.live.load().config.http.max_connections;
    // Connections beyond the cap are not accepted: they wait in the listen backlog until one
    // closes (and the kernel refuses them once the backlog is full).
    let permits = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(target: "tollgate::server", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            connection(stream, peer, shared, shutdown).await;
            drop(permit);
        });
    }
    drop(listener);
    let grace = shared.live.load().config.http.shutdown_timeout;
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    match tokio::time::timeout(grace, permits.acquire_many(all)).await {
        Ok(_) => tracing::info!(target: "tollgate::server", "every connection closed"),
        Err(_) => tracing::warn!(
            target: "tollgate::server",
            open = max - permits.available_permits(),
            "shutdown timeout: closing the connections still open"
        ),
    }
    Ok(())
}

/// Serves one connection until it closes, a timeout passes, or the server shuts down.
///
/// The header-read timeout runs from the accept, and then from the first byte of each next
/// request, until hyper hands the request head over: a connection that never finishes a head
/// is dropped when it passes, however it dribbles. (hyper's own `header_read_timeout` also
/// runs while a keep-alive connection waits for its next request, which would close every
/// proxy's idle upstream connection after a few seconds; so it is off, and timed here.) The
/// idle timeout runs while no request is in progress and no byte moves.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Shared,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = shared.live.load().config.http;
    let clock = Arc::new(Clock {
        epoch: Instant::now(),
        last: AtomicU64::new(0),
        // The first head is due from the accept on.
        head_since: AtomicU64::new(1),
        in_request: AtomicBool::new(false),
        head_started: tokio::sync::Notify::new(),
    });
    let io = TokioIo::new(Activity {
        inner: stream,
        clock: Arc::clone(&clock),
    });
    let service_clock = Arc::clone(&clock);
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let clock = Arc::clone(&service_clock);
        clock.request_started();
        async move {
            let response = handle(req, peer, &shared).await;
            clock.request_done();
            Ok::<_, Infallible>(response)
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes);
    let conn = http.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        let deadline = match closing {
            Some(deadline) => deadline,
            None => match clock.due(limits.header_read_timeout, limits.idle_timeout) {
                Ok(deadline) => tokio::time::Instant::from_std(deadline),
                // Past the header-read or the idle timeout: dropping the connection closes it.
                Err(Expired) => return,
            },
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep_until(deadline) => {
                if closing.is_some() {
                    return;
                }
            }
            () = clock.head_started.notified(), if closing.is_none() => {}
            _ = shutdown.changed(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(tokio::time::Instant::now() + limits.shutdown_timeout);
            }
        }
    }
}

/// A connection's timers: when it last moved a byte, whether a request head is on its way
/// (and since when), whether a request is being answered.
struct Clock {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last: AtomicU64,
    /// 1 + milliseconds since `epoch` when the current request head began; 0 for none.
    head_since: AtomicU64,
    /// hyper has handed a request over and its answer is not ready yet.
    in_request: AtomicBool,
    /// Wakes the connection's watchdog when a head begins, so its timer is looked at.
    head_started: tokio::sync::Notify,
}

/// A timeout has passed.
struct Expired;

impl Clock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn read_some(&self) {
        let now = self.now_ms();
        self.last.store(now, Ordering::Relaxed);
        if !self.in_request.load(Ordering::Relaxed) {
            // The first byte of the next request head starts its timer (once).
            let started = self
                .head_since
                .compare_exchange(0, now + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
            if started {
                self.head_started.notify_one();
            }
        }
    }

    fn wrote_some(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    fn request_started(&self) {
        self.in_request.store(true, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
    }

    fn request_done(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
        self.in_request.store(false, Ordering::Relaxed);
    }

    /// When to look again, or `Expired` when a timeout has passed.
    fn due(&self, header_read: Duration, idle: Duration) -> Result<Instant, Expired> {
        let now = self.now_ms();
        let at = |ms: u64| self.epoch + Duration::from_millis(ms);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut next = now.saturating_add(ms(idle));
        let head_since = self.head_since.load(Ordering::Relaxed);
        if head_since != 0 {
            let head_due = (head_since - 1).saturating_add(ms(header_read));
            if now >= head_due {
                return Err(Expired);
            }
            next = next.min(head_due);
        }
        if !self.in_request.load(Ordering::Relaxed) {
            let idle_due = self.last.load(Ordering::Relaxed).saturating_add(ms(idle));
            if now >= idle_due {
                return Err(Expired);
            }
            next = next.min(idle_due);
        }
        Ok(at(next))
    }
}

/// A stream that tells its connection's [`Clock`] when bytes move.
struct Activity {
    inner: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Activity {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read_some();
        }
        polled
    }
}

impl AsyncWrite for Activity {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote_some();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote_some();
        }
        polled
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

/// The routes: `/healthz`, `/metrics`, and the check on `/check` and `/check/...`.
async fn handle(req: Request<Incoming>, peer: SocketAddr, shared: &Shared) -> Response<Body> {
    let path = req.uri().path();
    if path == "/check" || path.starts_with("/check/") {
        let generation = shared.live.load_full();
        let (mut parts, _body) = req.into_parts();
        let trusted = generation.trusts(peer.ip());
        let original = Original::of(&parts, trusted);
        parts.extensions.insert(PeerAddr(peer));
        parts.extensions.insert(original);
        let request = Request::from_parts(parts, ());
        return match generation.check.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/healthz") => healthz(shared).await,
        (&Method::GET, "/metrics") => match &shared.metrics {
            Some(handle) => text(StatusCode::OK, "text/plain; version=0.0.4", handle.render()),
            None => text(StatusCode::NOT_FOUND, "text/plain", "no metrics\n".into()),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: tollgate-server answers /check (and /check/...), /healthz and /metrics\n"
                .into(),
        ),
    }
}

/// Never limited: 200 with the store's health as JSON (a Redis store is asked for a PING
/// within its command timeout).
async fn healthz(shared: &Shared) -> Response<Body> {
    let generation = shared.live.load_full();
    let health = tollgate::Store::health(&generation.store.store).await;
    let error = match &health {
        Ok(()) => "null".to_owned(),
        Err(e) => json_string(&e.to_string()),
    };
    let body = format!(
        "{{\"status\":\"ok\",\"store\":\"{}\",\"store_healthy\":{},\"store_error\":{error},\"policies\":{}}}\n",
        generation.store.config.kind.name(),
        health.is_ok(),
        generation.layers.len(),
    );
    text(StatusCode::OK, "application/json", body)
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
