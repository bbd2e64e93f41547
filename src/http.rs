//! The HTTP surface: webhooks in, inspection API, health. Handlers here parse
//! and answer; they never await a turn — a webhook returns as soon as its
//! message is on disk.

// Helpers here return `Err(Response)`: the error *is* the answer to send, and
// boxing it would buy nothing on a path that allocates a body anyway.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::backup;
use crate::clock::Clock;
use crate::config::{MetaConfig, WahaConfig};
use crate::context;
use crate::ingest::{self, signature, Accepted, Ingest, IngestError};
use crate::message::{unix_ms, Conv, Message};
use crate::metrics::{Gauges, Metrics};
use crate::store::{ContextMeta, Store, TurnRecord, TurnSummary};
use crate::turns::{ContextOp, ContextOutcome, DriverHandle, RetryOutcome};

pub struct AppState {
    pub ingest: Ingest,
    pub store: Store,
    pub driver: DriverHandle,
    pub clock: Clock,
    /// Set once recovery is done; webhooks and /readyz answer 503 before.
    pub ready: Arc<AtomicBool>,
    /// Set on a fatal fault (a dead task): webhooks and /readyz answer 503
    /// with it while the daemon stops for a restart.
    pub fatal: Arc<std::sync::Mutex<Option<String>>>,
    /// Cancelled on shutdown: webhooks answer 503 so the gateway retries later.
    pub draining: CancellationToken,
    pub metrics: Arc<Metrics>,
    /// Empty: the admin routes are open (loopback only, enforced by config).
    pub admin_token: String,
    pub meta: MetaConfig,
    pub waha: WahaConfig,
    pub max_body_bytes: usize,
    pub context_max_bytes: usize,
    pub default_company_id: String,
}

pub fn router(state: Arc<AppState>) -> Router {
    let webhooks = Router::new()
        .route("/webhook/whatsapp/batched", post(webhook_batched))
        .route("/webhook/whatsapp", post(webhook_immediate))
        .route("/webhook/meta", get(meta_verify).post(meta_webhook))
        .route("/webhook/waha", post(waha_webhook))
        .route_layer(middleware::from_fn_with_state(state.clone(), count_webhooks));
    let admin = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/outbox", get(outbox))
        .route("/api/backup", post(online_backup))
        .route("/api/batches", get(batches))
        .route("/api/conversations/{phone}", get(conversation))
        .route("/api/dead", get(dead))
        .route("/api/dead/{turn_id}/retry", post(retry_dead))
        .route("/api/contexts/{company_id}/{phone}", get(get_context).put(put_context).delete(delete_context))
        .route("/api/contexts/{company_id}/{phone}/invalidate", post(invalidate_context))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(webhooks)
        .merge(admin)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .with_state(state)
}

/// Every error answer has the same shape: status code + `{"error": "..."}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn webhook_batched(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    webhook(&s, &headers, body, false).await
}

async fn webhook_immediate(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    webhook(&s, &headers, body, true).await
}

async fn webhook(s: &AppState, headers: &HeaderMap, body: Body, immediate: bool) -> Response {
    let body = match webhook_body(s, headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let outcome = async {
        let message = ingest::parse(&body, &s.default_company_id)?;
        s.ingest.accept(message, immediate).await
    };
    match outcome.await {
        Ok(accepted) => accepted_json(accepted),
        Err(e) => ingest_error(e),
    }
}

/// What every webhook checks before parsing, in this order: the daemon takes
/// webhooks (503 while recovering or draining), the body is JSON, not too large.
async fn webhook_body(s: &AppState, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, Response> {
    accepting(s)?;
    read_json_body(headers, body, s.max_body_bytes).await
}

fn accepted_json(accepted: Accepted) -> Response {
    let status = match accepted {
        Accepted::New => "accepted",
        Accepted::Duplicate => "duplicate",
    };
    Json(json!({ "status": status })).into_response()
}

fn ingest_error(e: IngestError) -> Response {
    match e {
        IngestError::Malformed(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        IngestError::Invalid(_) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        IngestError::Store(_) => {
            tracing::warn!(error = %e, "webhook refused: not stored");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// Meta's subscription check: echo `hub.challenge` when the token matches.
async fn meta_verify(
    State(s): State<Arc<AppState>>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let param = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    let token_ok = !s.meta.verify_token.is_empty()
        && signature::same(param("hub.verify_token").as_bytes(), s.meta.verify_token.as_bytes());
    if param("hub.mode") == "subscribe" && token_ok {
        return (StatusCode::OK, param("hub.challenge").to_owned()).into_response();
    }
    error(StatusCode::FORBIDDEN, "verification refused: wrong hub.mode or hub.verify_token")
}

/// One Meta delivery: possibly several messages, possibly none (statuses only).
async fn meta_webhook(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let body = match webhook_body(&s, &headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    if !s.meta.app_secret.is_empty() {
        let sig = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok());
        if !signature::meta_valid(&s.meta.app_secret, &body, sig) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong X-Hub-Signature-256");
        }
    }
    let outcome = async {
        let messages = ingest::meta::parse(&body, &s.meta.companies, &s.default_company_id, unix_ms())?;
        s.ingest.accept_many(messages, false).await
    };
    match outcome.await {
        Ok(c) => Json(json!({ "status": "accepted", "accepted": c.accepted, "duplicates": c.duplicates }))
            .into_response(),
        Err(e) => ingest_error(e),
    }
}

/// One WAHA event; only client messages are stored, the rest acknowledged.
async fn waha_webhook(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let body = match webhook_body(&s, &headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    if !s.waha.hmac_key.is_empty() {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (sig, algorithm) = (header("x-webhook-hmac"), header("x-webhook-hmac-algorithm"));
        if !signature::waha_valid(&s.waha.hmac_key, &body, sig, algorithm) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong X-Webhook-Hmac");
        }
    }
    let outcome = async {
        match ingest::waha::parse(&body, &s.waha.sessions, &s.default_company_id, unix_ms())? {
            Some(message) => s.ingest.accept(message, false).await.map(Some),
            None => Ok(None),
        }
    };
    match outcome.await {
        Ok(Some(accepted)) => accepted_json(accepted),
        Ok(None) => Json(json!({ "status": "ignored" })).into_response(),
        Err(e) => ingest_error(e),
    }
}

/// The content-type and size checks every JSON webhook shares.
async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, Response> {
    if !is_json(headers) {
        return Err(error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "content type must be application/json"));
    }
    read_body(headers, body, limit).await
}

/// Replies waiting for the gateway, and the ones given up.
async fn outbox(State(s): State<Arc<AppState>>) -> Response {
    match s.store.outbox() {
        Ok(items) => {
            let items: Vec<Value> = items
                .iter()
                .map(|o| {
                    json!({
                        "turn_id": o.turn_id, "company_id": o.conv.company_id, "phone": o.conv.phone,
                        "text": o.text, "part": o.part, "parts": o.parts, "attempts": o.attempts,
                        "last_error": o.last_error, "state": if o.failed { "failed" } else { "pending" },
                        "created_at": o.created_at_ms,
                    })
                })
                .collect();
            Json(json!({ "outbox": items })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
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
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<axum::body::Bytes, Response> {
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("body exceeds {limit} bytes"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, format!("could not read the body: {e}"))),
    }
}

fn message_json(m: &Message) -> Value {
    json!({ "id": m.id, "text": m.text, "received_at": m.received_at_ms, "timestamp": m.timestamp })
}

async fn batches(State(s): State<Arc<AppState>>) -> Response {
    let Some(snap) = s.driver.snapshot().await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let now_ms = unix_ms();
    let mut out = Vec::new();
    for (conv, seqs, first_at, deadline) in &snap.collecting {
        let messages = s.store.messages(conv, seqs);
        out.push(json!({
            "company_id": conv.company_id,
            "phone": conv.phone,
            "state": "collecting",
            "messages": messages.iter().map(message_json).collect::<Vec<_>>(),
            "age_ms": ms(snap.now.saturating_duration_since(*first_at)),
            "fires_in_ms": ms(deadline.saturating_duration_since(snap.now)),
        }));
    }
    for (conv, seqs) in &snap.waiting {
        let messages = s.store.messages(conv, seqs);
        let first = messages.iter().map(|m| m.received_at_ms).min().unwrap_or(now_ms);
        out.push(json!({
            "company_id": conv.company_id,
            "phone": conv.phone,
            "state": "waiting_for_turn",
            "messages": messages.iter().map(message_json).collect::<Vec<_>>(),
            "age_ms": now_ms.saturating_sub(first),
            "fires_in_ms": 0,
        }));
    }
    let running: Vec<Value> =
        snap.running.iter().map(|c| json!({ "company_id": c.company_id, "phone": c.phone })).collect();
    Json(json!({ "batches": out, "running": running })).into_response()
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn summary_json(t: &TurnSummary) -> Value {
    json!({
        "turn_id": t.turn_id,
        "company_id": t.conv.company_id,
        "messages": t.messages.iter().map(message_json).collect::<Vec<_>>(),
        "text": t.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>().join("\n"),
        "reply": t.reply,
        "cut_reason": t.cut_reason,
        "attempts": t.attempts,
        "first_message_at": t.messages.iter().map(|m| m.received_at_ms).min(),
        "cut_at": t.cut_at_ms,
        "started_at": t.started_at_ms,
        "committed_at": t.committed_at_ms,
    })
}

fn record_json(t: &TurnRecord) -> Value {
    json!({
        "turn_id": t.turn_id,
        "company_id": t.conv.company_id,
        "phone": t.conv.phone,
        "messages": t.messages.iter().map(message_json).collect::<Vec<_>>(),
        "text": t.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>().join("\n"),
        "attempts": t.attempts,
        "error": t.dead.as_ref().map(|d| d.error.clone()),
        "died_at": t.dead.as_ref().map(|d| d.died_at_ms),
    })
}

async fn conversation(State(s): State<Arc<AppState>>, Path(phone): Path<String>) -> Response {
    let phone = match ingest::normalize_phone(&phone) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let history = match s.store.history(&phone) {
        Ok(h) => h,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let open = match s.store.turns() {
        Ok(t) => t,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let open: Vec<Value> = open
        .iter()
        .filter(|t| t.conv.phone == phone)
        .map(|t| {
            let mut v = record_json(t);
            v["state"] = json!(if t.dead.is_some() { "dead" } else { "open" });
            v
        })
        .collect();
    Json(json!({
        "phone": phone,
        "turns": history.iter().map(summary_json).collect::<Vec<_>>(),
        "open_turns": open,
    }))
    .into_response()
}

async fn dead(State(s): State<Arc<AppState>>) -> Response {
    match s.store.turns() {
        Ok(turns) => {
            let dead: Vec<Value> = turns.iter().filter(|t| t.dead.is_some()).map(record_json).collect();
            Json(json!({ "dead": dead })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn retry_dead(State(s): State<Arc<AppState>>, Path(turn_id): Path<String>) -> Response {
    match s.driver.retry(turn_id.clone()).await {
        RetryOutcome::Queued => {
            (StatusCode::ACCEPTED, Json(json!({ "status": "queued", "turn_id": turn_id }))).into_response()
        }
        RetryOutcome::NotFound => error(StatusCode::NOT_FOUND, format!("no turn {turn_id}")),
        RetryOutcome::NotDead => error(StatusCode::CONFLICT, format!("turn {turn_id} is not dead")),
        RetryOutcome::Failed(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// 503 while recovering, after a fault, or shutting down: a webhook refused
/// so is retried by the gateway, never lost.
fn accepting(s: &AppState) -> Result<(), Response> {
    if let Some(reason) = s.store.failure() {
        Err(error(StatusCode::SERVICE_UNAVAILABLE, format!("store failed, restarting: {reason}")))
    } else if let Some(reason) = s.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        Err(error(StatusCode::SERVICE_UNAVAILABLE, format!("restarting: {reason}")))
    } else if s.draining.is_cancelled() {
        Err(error(StatusCode::SERVICE_UNAVAILABLE, "shutting down; retry later"))
    } else if !s.ready.load(Ordering::Acquire) {
        Err(error(StatusCode::SERVICE_UNAVAILABLE, "recovering from disk; retry shortly"))
    } else {
        Ok(())
    }
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    match accepting(&s) {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(refused) => refused,
    }
}

async fn count_webhooks(State(s): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let endpoint = request.uri().path().to_owned();
    let response = next.run(request).await;
    s.metrics.webhook(&endpoint, response.status().as_u16());
    response
}

/// `Authorization: Bearer <admin_token>` on /api/* and /metrics, when a token is set.
async fn require_token(State(s): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if !s.admin_token.is_empty() {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !signature::same(given.as_bytes(), s.admin_token.as_bytes()) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    next.run(request).await
}

/// A consistent snapshot while the daemon keeps serving: written to a temp
/// file off the runtime (writers pause for the copy), then streamed.
async fn online_backup(State(s): State<Arc<AppState>>) -> Response {
    let store = s.store.clone();
    let path =
        std::env::temp_dir().join(format!("turnstile-backup-{}-{}.partial", std::process::id(), unix_ms()));
    let written = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
            let mut w = std::io::BufWriter::new(file);
            backup::write(&store, &mut w).map_err(|e| e.to_string())?;
            w.into_inner().map_err(|e| e.to_string())?.sync_all().map_err(|e| e.to_string())
        })
        .await
    };
    let opened = match written {
        Ok(Ok(())) => tokio::fs::File::open(&path).await.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(e.to_string()),
    };
    // Unlinked at once: the open file streams on, and nothing is left behind.
    let _ = std::fs::remove_file(&path);
    match opened {
        Ok(file) => {
            let name = format!("attachment; filename=\"turnstile-{}.backup\"", unix_ms());
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (header::CONTENT_DISPOSITION, name),
                ],
                body,
            )
                .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("backup failed: {e}")),
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut g = Gauges { ready: accepting(&s).is_ok(), ..Gauges::default() };
    if let Some(snap) = s.driver.snapshot().await {
        g.pending_batches = snap.collecting.len() + snap.waiting.len();
        g.pending_messages = snap.collecting.iter().map(|c| c.1.len()).sum::<usize>()
            + snap.waiting.iter().map(|w| w.1.len()).sum::<usize>();
        g.turns_in_flight = snap.running.len();
    }
    if let Ok(turns) = s.store.turns() {
        g.dead_turns = turns.iter().filter(|t| t.dead.is_some()).count();
    }
    if let Ok(items) = s.store.outbox() {
        g.outbox_failed = items.iter().filter(|i| i.failed).count();
        g.outbox_depth = items.len() - g.outbox_failed;
    }
    let c = s.store.context_stats();
    (g.context_hits, g.context_misses, g.context_invalidations) =
        (c.cache_hits, c.cache_misses, c.invalidations);
    (g.contexts, g.context_raw_bytes, g.context_stored_bytes) = (c.contexts, c.raw_bytes, c.stored_bytes);
    g.store_bytes = s.store.size_on_disk().unwrap_or(0);
    g.fsyncs = s.store.syncs();
    let st = s.store.stats();
    (g.log_syncs, g.tree_syncs, g.messages_stored, g.log_segments) =
        (st.log_syncs, st.tree_syncs, st.stored, st.log_segments);
    g.store_ok = s.store.failure().is_none();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render(&g))
        .into_response()
}

/// The conversation a context path names: company as given, phone normalised.
fn context_conv(company_id: String, phone: &str) -> Result<Conv, Response> {
    if company_id.trim().is_empty() || company_id.contains('\0') {
        return Err(error(StatusCode::UNPROCESSABLE_ENTITY, "company_id must not be empty"));
    }
    let phone = ingest::normalize_phone(phone).map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(Conv { phone, company_id })
}

fn meta_json(meta: &ContextMeta) -> (Value, Value) {
    (json!(meta.updated_at_ms), json!(meta.expires_at_ms))
}

async fn get_context(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
) -> Response {
    let conv = match context_conv(company_id, &phone) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let stored = match s.store.context(&conv, s.clock.now_ms()) {
        Ok(Some(stored)) => stored,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no context for {conv}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("context for {conv}: {e}")),
    };
    // Raw JSON text: checked, never built into a tree and serialized again.
    let decode = |which: &str, bytes: Option<&[u8]>| -> Result<Option<Box<RawValue>>, Response> {
        match bytes {
            None => Ok(None),
            Some(b) => context::decode_raw(b).map(Some).map_err(|e| {
                tracing::error!(conv = %conv.masked(), part = which, error = %e, "stored context is corrupt");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{which} of the context for {conv} is corrupt: {e}"),
                )
            }),
        }
    };
    let dialogue = match decode("dialogue", stored.dialogue.as_deref()) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let cache = match decode("cache", stored.cache.as_deref()) {
        Ok(v) => v,
        Err(r) => return r,
    };
    Json(ContextBody {
        dialogue,
        cache,
        updated_at: stored.meta.updated_at_ms,
        expires_at: stored.meta.expires_at_ms,
    })
    .into_response()
}

/// What `GET /api/contexts/...` answers (and a PUT may send back).
#[derive(serde::Serialize)]
struct ContextBody {
    dialogue: Option<Box<RawValue>>,
    cache: Option<Box<RawValue>>,
    updated_at: u64,
    expires_at: u64,
}

/// Replaces both parts. The body is the shape GET returns; `updated_at` and
/// `expires_at` in it are ignored (the daemon sets them).
async fn put_context(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let conv = match context_conv(company_id, &phone) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match read_json_body(&headers, body, s.context_max_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body is not valid JSON: {e}")),
    };
    let Some(obj) = value.as_object() else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "body must be a JSON object {\"dialogue\", \"cache\"}",
        );
    };
    if let Some(unknown) =
        obj.keys().find(|k| !["dialogue", "cache", "updated_at", "expires_at"].contains(&k.as_str()))
    {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("unknown field `{unknown}`; expected dialogue and cache"),
        );
    }
    let part = |k: &str| obj.get(k).filter(|v| !v.is_null()).cloned();
    let op = ContextOp::Put { dialogue: part("dialogue"), cache: part("cache") };
    match write_context(&s, conv, op).await {
        Ok((_, Some(meta))) => {
            let (updated_at, expires_at) = meta_json(&meta);
            Json(json!({ "status": "stored", "updated_at": updated_at, "expires_at": expires_at }))
                .into_response()
        }
        Ok((_, None)) => Json(json!({ "status": "empty" })).into_response(),
        Err(refused) => refused,
    }
}

/// Queues a context write in its conversation's turn slot and waits until it
/// is on disk: the live meta before and the meta after, or the 503 to send.
async fn write_context(
    s: &AppState,
    conv: Conv,
    op: ContextOp,
) -> Result<(Option<ContextMeta>, Option<ContextMeta>), Response> {
    match s.driver.context(conv, op).await {
        ContextOutcome::Done { before, after } => Ok((before, after)),
        ContextOutcome::Failed(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e)),
    }
}

async fn delete_context(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
) -> Response {
    let conv = match context_conv(company_id, &phone) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let label = conv.to_string();
    match write_context(&s, conv, ContextOp::Delete).await {
        Ok((Some(_), _)) => Json(json!({ "status": "deleted" })).into_response(),
        Ok((None, _)) => error(StatusCode::NOT_FOUND, format!("no context for {label}")),
        Err(refused) => refused,
    }
}

/// Drops the cache, keeps the dialogue: what the booking side calls when a
/// booking is created or cancelled. Idempotent.
async fn invalidate_context(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
) -> Response {
    let conv = match context_conv(company_id, &phone) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match write_context(&s, conv, ContextOp::Invalidate).await {
        Ok((before, _)) => {
            let had_cache = before.is_some_and(|m| m.cache.is_some());
            Json(json!({ "status": "invalidated", "had_cache": had_cache })).into_response()
        }
        Err(refused) => refused,
    }
}
