//! Serving a router on a listener, with the limits a public daemon needs
//! against clients that misbehave:
//! - a header timeout: a client has `header_timeout` to send a request's
//!   headers, counted from when the connection waits for them — so it is
//!   also the longest a keep-alive connection stays idle;
//! - a body timeout (in `read_body`: the handlers read bodies themselves);
//! - a cap on open connections: past it a new connection is closed at once
//!   (refused fast, never queued), counted in the metrics.
//!
//! - hyper's own refusals (a request that is not HTTP, headers or a URI
//!   too large: 400, 431, 414, sent by hyper with no body) get the JSON
//!   body every other refusal has (`Refusals`, around the socket).
//!
//! Stopping has two steps, so that gateways keep getting answers (503 while
//! draining) until the last moment: `close` stops accepting and asks every
//! connection to finish its request and close; `kill` drops whatever is
//! still open.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The daemon's two sockets: the public one (webhooks, health) and the admin
/// one (API, metrics, health). Bound before the daemon runs, so tests can
/// bind port 0 and read the addresses.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: std::net::SocketAddr,
    pub source: std::io::Error,
}

impl Listeners {
    /// Binds `server.listen` and `server.admin_listen`.
    pub async fn bind(server: &crate::config::ServerConfig) -> Result<Listeners, BindError> {
        let bind = |addr: std::net::SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })
        };
        Ok(Listeners { public: bind(server.listen).await?, admin: bind(server.admin_listen).await? })
    }
}

/// The limits, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Connection counts, for the metrics.
#[derive(Debug, Default)]
pub struct Counts {
    pub open: AtomicU64,
    pub refused: AtomicU64,
}

/// The two steps of stopping a server.
#[derive(Clone, Default)]
pub struct Stop {
    /// Stop accepting; connections finish their request and close.
    pub close: CancellationToken,
    /// Drop every connection still open.
    pub kill: CancellationToken,
}

/// Serves `router` on `listener` until `stop.kill` (or `stop.close` and the
/// last connection gone).
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, counts: Arc<Counts>, stop: Stop) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.kill.cancelled() => break,
            _ = stop.close.cancelled() => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, say: do not spin on it.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                    continue;
                };
                let (router, counts, stop) = (router.clone(), counts.clone(), stop.clone());
                connections.spawn(async move {
                    counts.open.fetch_add(1, Ordering::Relaxed);
                    connection(stream, router, limits, &stop).await;
                    counts.open.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    // Connections finish their request (graceful) until killed.
    tokio::select! {
        _ = async { while connections.join_next().await.is_some() {} } => {}
        _ = stop.kill.cancelled() => connections.abort_all(),
    }
    while connections.join_next().await.is_some() {}
}

async fn connection(stream: tokio::net::TcpStream, router: Router, limits: Limits, stop: &Stop) {
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        router.clone().oneshot(request.map(Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(Refusals::new(stream)), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.close.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.kill.cancelled() => {}
    }
}

/// A connection's socket, passing everything through but hyper's own
/// refusals: those it answers with a head alone (`content-length: 0`) when
/// a request cannot be parsed, which this rewrites into the JSON refusal
/// every route gives. The routes' own 4xx answers always have a body
/// (`error::json_refusals`), so a bodiless 400, 414 or 431 is hyper's.
/// Writes are not vectored, so a head arrives in one write.
struct Refusals<T> {
    inner: T,
    /// A rewritten refusal still to go out, and how much of it went.
    pending: Vec<u8>,
    sent: usize,
}

impl<T> Refusals<T> {
    fn new(inner: T) -> Self {
        Refusals { inner, pending: Vec::new(), sent: 0 }
    }
}

/// The JSON version of hyper's bodiless refusal in `head`, if it is one.
fn rewrite_refusal(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ").or_else(|| text.strip_prefix("HTTP/1.0 "))?;
    let status = rest.get(..3)?;
    let message = match status {
        "400" => "the request is not valid HTTP/1.1",
        "414" => "the request's URI is too long",
        "431" => "the request's headers are too large (at most 100 fields, about 400 KB in all)",
        _ => return None,
    };
    let headers = text.strip_suffix("\r\n\r\n")?;
    let mut lines = headers.split("\r\n");
    let status_line = lines.next()?;
    let fields: Vec<&str> = lines.collect();
    if !fields.iter().any(|f| f.eq_ignore_ascii_case("content-length: 0")) {
        return None;
    }
    let body = serde_json::json!({ "error": message }).to_string();
    let mut out = format!("{status_line}\r\n");
    for f in fields.iter().filter(|f| !f.to_ascii_lowercase().starts_with("content-length:")) {
        out.push_str(f);
        out.push_str("\r\n");
    }
    out.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()));
    Some(out.into_bytes())
}

impl<T: tokio::io::AsyncWrite + Unpin> Refusals<T> {
    fn drain(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        while self.sent < self.pending.len() {
            match std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Refusals<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Refusals<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        match self.drain(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if let Some(answer) = rewrite_refusal(buf) {
            self.pending = answer;
            if let Poll::Ready(Err(e)) = self.drain(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite_refusal;

    #[test]
    fn only_hypers_bodiless_refusals_are_rewritten() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite_refusal(head).unwrap()).unwrap();
        let (top, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(top.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{out}");
        assert!(top.contains("date: Tue") && top.contains("content-type: application/json"), "{out}");
        assert!(top.contains(&format!("content-length: {}", body.len())), "{out}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("headers are too large"));
        // A route's answer (a body), a success, or half a head: untouched.
        assert!(rewrite_refusal(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 27\r\n\r\n{\"error\":\"x\"}")
            .is_none());
        assert!(rewrite_refusal(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite_refusal(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n").is_none());
    }
}
