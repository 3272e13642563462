//! The network side: accepting under a connection cap, hyper's HTTP/1 with a header-read
//! timeout and a header size limit, an idle timeout per connection, the routes, graceful
//! shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
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

/// Serves one connection until it closes, its idle timeout passes, or the server shuts down.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Shared,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = shared.live.load().config.http;
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Activity {
        inner: stream,
        last: Arc::clone(&last),
        epoch,
    });
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(req, peer, &shared).await) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes);
    let conn = http.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    let mut deadline = tokio::time::Instant::now() + limits.idle_timeout;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep_until(deadline), if !closing => {
                let idle_since = epoch + Duration::from_millis(last.load(Ordering::Relaxed));
                let idle_until = tokio::time::Instant::from_std(idle_since + limits.idle_timeout);
                if idle_until <= tokio::time::Instant::now() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    // A connection that does not finish promptly once asked is dropped.
                    deadline = tokio::time::Instant::now() + limits.header_read_timeout;
                } else {
                    deadline = idle_until;
                }
            }
            () = tokio::time::sleep_until(deadline), if closing => return,
            _ = shutdown.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
                deadline = tokio::time::Instant::now() + limits.shutdown_timeout;
            }
        }
    }
}

/// A stream that records when it last moved bytes, for the idle timeout.
struct Activity {
    inner: TcpStream,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
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
            self.touch();
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
            self.touch();
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
            self.touch();
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
