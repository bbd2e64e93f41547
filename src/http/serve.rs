//! Serving a router on a listener, with the limits a public daemon needs
//! against clients that misbehave:
//! - a header timeout: a client has `header_timeout` to send a request's
//!   headers, counted from when the connection waits for them — so it is
//!   also the longest a keep-alive connection stays idle;
//! - a body timeout (in `read_body`: the handlers read bodies themselves);
//! - a cap on open connections: past it a new connection is closed at once
//!   (refused fast, never queued), counted in the metrics.
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
    let conn = builder.serve_connection(TokioIo::new(stream), service);
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
