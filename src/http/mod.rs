//! The HTTP surface, on two listeners. The public one (`server.listen`,
//! what a reverse proxy forwards to) serves the webhooks and health, nothing
//! else; the admin one (`server.admin_listen`) serves the inspection and
//! context API, metrics and backups behind the admin token, and health. A
//! path of one surface answers 404 on the other, whatever a proxy forwards.
//!
//! Handlers here parse and answer; they never await a turn — a webhook
//! returns as soon as its message is on disk. `webhooks` takes the gateways'
//! deliveries, `admin` the inspection API, metrics and backups, `contexts`
//! the context API, `error` the one refusal they all answer with; this file
//! holds the state they share, the two routers, and the checks they have in
//! common.

mod admin;
mod console;
mod contexts;
mod error;
pub mod serve;
mod webhooks;

pub use error::ApiError;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{MetaConfig, WahaConfig};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::turns::DriverHandle;

pub struct AppState {
    pub ingest: Ingest,
    pub store: Store,
    pub driver: DriverHandle,
    pub clock: Clock,
    /// Set once recovery is done; webhooks and /readyz answer 503 before.
    pub ready: Arc<AtomicBool>,
    /// `server.body_timeout_ms`.
    pub body_timeout: std::time::Duration,
    /// Open and refused connections, per listener, for the metrics.
    pub connections: [Arc<serve::Counts>; 2],
    /// Set on a fatal fault (a dead task): webhooks and /readyz answer 503
    /// with it while the daemon stops for a restart.
    pub fatal: Arc<std::sync::Mutex<Option<String>>>,
    /// Cancelled on shutdown: webhooks answer 503 so the gateway retries later.
    pub draining: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// What the console shows of running and recent turns.
    pub feed: Arc<crate::feed::Feed>,
    /// The cut policy in effect (`BatchingConfig::effective`), for `/api/batches`.
    pub cutting: serde_json::Value,
    /// Empty: the admin routes are open (loopback only, enforced by config).
    pub admin_token: String,
    /// Empty: the generic webhooks take unauthenticated input (allowed by config).
    pub webhook_token: String,
    /// Serve the generic webhooks at all.
    pub generic_webhooks: bool,
    /// Served only when `enabled()`; `app_secret` empty means unsigned deliveries pass.
    pub meta: MetaConfig,
    /// Served only when `enabled()`; `hmac_key` empty means unsigned events pass.
    pub waha: WahaConfig,
    /// Served only when `enabled()`; `api_key` empty means events without a key pass.
    pub evolution: crate::config::EvolutionConfig,
    pub max_body_bytes: usize,
    pub context_max_bytes: usize,
    pub default_company_id: String,
    /// What every message is held to (`ingest.max_text_bytes`, ids, timestamps).
    pub caps: crate::ingest::caps::Caps,
    /// `batching.max_wait_ms`, for the metrics.
    pub batch_max_wait_ms: u64,
    /// `ingest.quarantine_max`.
    pub quarantine_max: usize,
    /// Says at `warn`, once an hour per gateway and reason, what is quarantined.
    pub quarantine_log: QuarantineLog,
    /// Receipts and the 24-hour window.
    pub deliveries: Arc<crate::delivery::Deliveries>,
    /// Staff signals, and the API's pause and resume.
    pub handover: Arc<crate::takeover::Handover>,
    /// WAHA presence subscriptions (`waha.subscribe_presence`), if in effect.
    pub presence: Option<Arc<crate::gateway::PresenceSubscriptions>>,
}

/// The quarantine's log lines: one per gateway and reason per hour, so a
/// sender's new shape is said once, not once per delivery.
#[derive(Default)]
pub struct QuarantineLog {
    said: std::sync::Mutex<std::collections::HashMap<(String, String), std::time::Instant>>,
}

impl QuarantineLog {
    pub fn note(&self, gateway: &str, reason: &str, id: &str) {
        const EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
        let mut said = self.said.lock().expect("quarantine log lock");
        let now = std::time::Instant::now();
        let key = (gateway.to_owned(), reason.to_owned());
        if said.get(&key).is_some_and(|at| now.duration_since(*at) < EVERY) {
            return;
        }
        if said.len() > 1_000 {
            said.retain(|_, at| now.duration_since(*at) < EVERY);
        }
        said.insert(key, now);
        tracing::warn!(gateway, reason, id, "a delivery no parser takes was quarantined (said once an hour per gateway and reason); see GET /api/quarantine, replay after an upgrade");
    }
}

/// The public listener: webhooks, `/healthz`, `/readyz`.
pub fn public_router(state: Arc<AppState>) -> Router {
    surface(webhooks::routes(state.clone()), state)
}

/// The admin listener: `/api/*`, `/metrics`, `/healthz`, `/readyz`.
pub fn admin_router(state: Arc<AppState>) -> Router {
    surface(admin::routes(state.clone()), state)
}

/// One listener's routes, plus health and the JSON answers for the rest.
fn surface(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .layer(axum::middleware::map_response(error::json_refusals))
        .with_state(state)
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case).
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The content-type, size and time checks every JSON body shares.
pub(super) async fn read_json_body(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content type must be application/json",
        ));
    }
    match tokio::time::timeout(s.body_timeout, read_body(headers, body, limit)).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {} ms", s.body_timeout.as_millis()),
        )),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads at most `limit` bytes; a larger body (declared or actual) is 413.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("body exceeds {limit} bytes"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!("could not read the body: {e}"))),
    }
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// What the daemon is doing, as `/readyz` and the console say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ServeState {
    Ready,
    /// Replaying the store before the first webhook is taken.
    Recovering,
    Stopping,
    /// A fatal fault: stopping to be restarted.
    Restarting,
    /// The store failed; the daemon exits to be restarted.
    Failed,
}

impl ServeState {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ServeState::Ready => "ready",
            ServeState::Recovering => "recovering",
            ServeState::Stopping => "stopping",
            ServeState::Restarting => "restarting",
            ServeState::Failed => "failed",
        }
    }
}

/// Whether the daemon takes webhooks now: `Ok`, or the state it is in and why.
pub(super) fn serving(s: &AppState) -> Result<(), (ServeState, String)> {
    if let Some(reason) = s.store.failure() {
        Err((ServeState::Failed, format!("store failed, restarting: {reason}")))
    } else if let Some(reason) = s.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        Err((ServeState::Restarting, format!("restarting: {reason}")))
    } else if s.draining.is_cancelled() {
        Err((ServeState::Stopping, "shutting down; retry later".to_owned()))
    } else if !s.ready.load(Ordering::Acquire) {
        Err((ServeState::Recovering, "recovering from disk; retry shortly".to_owned()))
    } else {
        Ok(())
    }
}

/// 503 while recovering, after a fatal fault, or shutting down: a webhook
/// refused so is retried by the gateway, never lost.
pub(super) fn accepting(s: &AppState) -> Result<(), ApiError> {
    serving(s).map_err(|(_, reason)| ApiError::unavailable(reason))
}

/// Ready: recovered, not stopping, the store sound and its log writable
/// (while writes fail, each call probes whether they work again).
async fn readyz(State(s): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    accepting(&s)?;
    match s.store.write_trouble().await {
        Some(e) => Err(ApiError::unavailable(format!("messages cannot be stored: {e}"))),
        None => {
            // What the open repaired stays visible for as long as it runs.
            let repairs = s.store.repairs();
            match repairs.is_empty() {
                true => Ok(Json(json!({ "status": "ready" }))),
                false => Ok(Json(json!({ "status": "ready", "repaired_at_start": repairs }))),
            }
        }
    }
}

/// What both listeners answer while the store cannot be opened yet:
/// `/healthz` 200 (the process is alive and retrying), everything else 503
/// with the reason, through the same `serve` (limits, JSON refusals) as the
/// real routes. `stop` hands the listeners back for the real routes.
pub struct Unavailable {
    listeners: serve::Listeners,
    stop: serve::Stop,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Serves the waiting answers on duplicates of `listeners` (the same
/// sockets: connections queue on them meanwhile, none is refused).
pub fn unavailable(
    listeners: serve::Listeners,
    reason: Arc<std::sync::Mutex<String>>,
    limits: serve::Limits,
) -> std::io::Result<Unavailable> {
    let stop = serve::Stop::default();
    let router = Router::new()
        .route("/healthz", get(healthz))
        .fallback(move || {
            let reason = reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
            async move { ApiError::unavailable(format!("the store cannot be opened yet: {reason}")) }
        })
        .layer(axum::middleware::map_response(error::json_refusals));
    let dup = |l: &tokio::net::TcpListener| -> std::io::Result<tokio::net::TcpListener> {
        let fd = std::os::fd::AsFd::as_fd(l).try_clone_to_owned()?;
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    };
    let mut tasks = Vec::new();
    for listener in [dup(&listeners.public)?, dup(&listeners.admin)?] {
        let serve = serve::serve(listener, router.clone(), limits, Arc::default(), stop.clone());
        tasks.push(tokio::spawn(serve));
    }
    Ok(Unavailable { listeners, stop, tasks })
}

impl Unavailable {
    /// Stops the waiting answers: connections finish the request they are
    /// in (at most a header timeout's wait), then the sockets are handed back.
    pub async fn stop(self) -> serve::Listeners {
        self.stop.close.cancel();
        let kill = self.stop.kill.clone();
        let killer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            kill.cancel();
        });
        for t in self.tasks {
            let _ = t.await;
        }
        killer.abort();
        self.listeners
    }
}
