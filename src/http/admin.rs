//! The inspection API (`/api/batches`, conversations, dead turns, the
//! outbox), the online backup and `/metrics`, behind the admin token.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::contexts::{delete_context, get_context, invalidate_context, put_context};
use super::{accepting, bearer, ApiError, AppState};
use crate::backup;
use crate::ingest::{self, signature};
use crate::message::{unix_ms, Message};
use crate::metrics::Gauges;
use crate::outbox::OutboxState;
use crate::store::{TurnRecord, TurnSummary};
use crate::turns::RetryOutcome;

pub(super) fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/outbox", get(outbox))
        .route("/api/backup", post(online_backup))
        .route("/api/store/rewrite", post(rewrite_store))
        .route("/api/batches", get(batches))
        .route("/api/conversations/{phone}", get(conversation))
        .route("/api/conversations/{phone}/pause", post(pause))
        .route("/api/conversations/{phone}/resume", post(resume))
        .route("/api/takeovers", get(takeovers))
        .route("/api/dead", get(dead))
        .route("/api/dead/{turn_id}/retry", post(retry_dead))
        .route("/api/quarantine", get(quarantine))
        .route("/api/quarantine/{id}", get(quarantined_one).delete(drop_quarantined))
        .route("/api/quarantine/{id}/replay", post(replay_quarantined))
        .route("/api/contexts/{company_id}/{phone}", get(get_context).put(put_context).delete(delete_context))
        .route("/api/contexts/{company_id}/{phone}/invalidate", post(invalidate_context))
        .merge(super::console::api_routes())
        .route_layer(middleware::from_fn_with_state(state, require_token))
        .merge(super::console::page_routes())
}

/// Replies waiting for the gateway, the ones given up, and the ones parked by the reply cap.
async fn outbox(State(s): State<Arc<AppState>>) -> Response {
    let items: Vec<Value> = s
        .store
        .outbox()
        .iter()
        .map(|o| {
            json!({
                "turn_id": o.turn_id, "company_id": o.conv.company_id, "phone": o.conv.phone,
                "text": o.text, "part": o.part, "parts": o.parts, "attempts": o.attempts,
                "last_error": o.last_error, "state": OutboxState::of(o).as_str(),
                "created_at": o.created_at_ms,
            })
        })
        .collect();
    Json(json!({ "outbox": items })).into_response()
}

/// Gateway deliveries no parser took, oldest first (bodies on `GET …/{id}`).
async fn quarantine(State(s): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let held: Vec<Value> = s
        .store
        .quarantined()
        .await?
        .iter()
        .map(|h| {
            json!({ "id": h.id, "gateway": h.gateway, "received_at": h.received_at_ms,
                    "reason": h.reason, "bytes": h.body.len() })
        })
        .collect();
    Ok(Json(json!({ "quarantine": held })))
}

async fn held(s: &AppState, id: &str) -> Result<crate::store::Held, ApiError> {
    s.store
        .quarantined_one(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no quarantined delivery {id}")))
}

async fn quarantined_one(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let h = held(&s, &id).await?;
    Ok(Json(json!({ "id": h.id, "gateway": h.gateway, "received_at": h.received_at_ms, "reason": h.reason,
                    "body": String::from_utf8_lossy(&h.body) })))
}

async fn drop_quarantined(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !s.store.release_quarantined(&id).await? {
        return Err(ApiError::not_found(format!("no quarantined delivery {id}")));
    }
    Ok(Json(json!({ "status": "dropped", "id": id })))
}

/// Hands a held delivery to its gateway's parser again (after an upgrade
/// that knows its shape): taken, it leaves the quarantine; still refused,
/// it stays (422 with the parser's words).
async fn replay_quarantined(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let h = held(&s, &id).await?;
    let gateway = super::webhooks::Gateway::from_name(&h.gateway)
        .ok_or_else(|| ApiError::unprocessable(format!("unknown gateway {:?}", h.gateway)))?;
    super::accepting(&s)?;
    if let Err(e) = super::webhooks::parse(&s, gateway, &h.body) {
        return Err(ApiError::unprocessable(format!("still not taken: {e}")));
    }
    let answer = super::webhooks::deliver(&s, gateway, &h.body).await?;
    s.store.release_quarantined(&id).await?;
    Ok(Json(json!({ "status": "replayed", "id": id, "delivery": answer.0 })))
}

fn message_json(m: &Message) -> Value {
    json!({ "id": m.id, "text": m.text, "received_at": m.received_at_ms, "timestamp": m.timestamp })
}

async fn batches(State(s): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let Some(snap) = s.driver.snapshot().await else {
        return Err(ApiError::unavailable("shutting down"));
    };
    let now_ms = unix_ms();
    let mut out = Vec::new();
    for p in &snap.collecting {
        let messages = s.store.messages(&p.key, &p.seqs);
        out.push(json!({
            "company_id": p.key.company_id,
            "phone": p.key.phone,
            "state": "collecting",
            "messages": messages.iter().map(message_json).collect::<Vec<_>>(),
            "age_ms": ms(snap.now.saturating_duration_since(p.first_at)),
            "fires_in_ms": ms(p.deadline.saturating_duration_since(snap.now)),
            "rule": p.rule.as_str(),
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
    Ok(Json(json!({ "batches": out, "running": running, "cutting": s.cutting })))
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

async fn conversation(
    State(s): State<Arc<AppState>>,
    Path(phone): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let phone = ingest::normalize_conversation(&phone)?;
    let wanted = phone.clone();
    let history = s.store.read(move |st| st.history(&wanted)).await?;
    let open: Vec<Value> = s
        .store
        .read(|st| st.turns())
        .await?
        .iter()
        .filter(|t| t.conv.phone == phone)
        .map(|t| {
            let mut v = record_json(t);
            v["state"] = json!(if t.dead.is_some() { "dead" } else { "open" });
            v
        })
        .collect();
    // The conversations of this phone: its companies in the history and open
    // turns, and the default one.
    let mut companies: std::collections::BTreeSet<String> =
        history.iter().map(|t| t.conv.company_id.clone()).collect();
    companies.insert(s.default_company_id.clone());
    let takeovers: Vec<Value> = companies
        .into_iter()
        .filter_map(|company_id| {
            let conv = crate::message::Conv { phone: phone.clone(), company_id };
            let t = s.store.takeover(&conv);
            (t.paused.is_some() || !t.staff.is_empty()).then(|| takeover_json(&conv, &t))
        })
        .collect();
    Ok(Json(json!({
        "phone": phone,
        "turns": history
            .iter()
            .map(|t| {
                let mut v = summary_json(t);
                v["delivery"] = delivery_json(&s.store.receipts_of(&t.turn_id));
                v
            })
            .collect::<Vec<_>>(),
        "open_turns": open,
        "takeover": takeovers,
    })))
}

/// What WhatsApp said of a reply's pieces.
pub(super) fn delivery_json(receipts: &[crate::store::Receipt]) -> Value {
    json!(receipts
        .iter()
        .map(|r| json!({
            "part": r.part, "parts": r.parts, "id": r.id, "state": r.state.as_str(),
            "sent_at": r.sent_at_ms, "delivered_at": r.delivered_at_ms, "read_at": r.read_at_ms,
            "failed": r.failed.as_ref().map(|f| json!({"code": f.code, "title": f.title, "at": f.at_ms})),
        }))
        .collect::<Vec<_>>())
}

fn takeover_json(conv: &crate::message::Conv, t: &crate::store::Takeover) -> Value {
    json!({
        "company_id": conv.company_id,
        "phone": conv.phone,
        "state": if t.paused.is_some() { "paused" } else { "assistant" },
        "paused": t.paused.as_ref().map(|p| json!({"by": p.by, "since": p.since_ms, "resumes_at": p.resume_at_ms})),
        "staff": t.staff.iter().map(|m| json!({"id": m.id, "text": m.text, "at": m.at_ms, "by": m.by})).collect::<Vec<_>>(),
    })
}

/// Every paused conversation.
async fn takeovers(State(s): State<Arc<AppState>>) -> Json<Value> {
    let paused: Vec<Value> =
        s.store.paused().iter().map(|(conv, _)| takeover_json(conv, &s.store.takeover(conv))).collect();
    Json(json!({ "paused": paused }))
}

/// The conversation a pause or resume names: the path's phone, and the
/// body's `company_id` (default: `ingest.default_company_id`); and the body.
async fn takeover_target(
    s: &AppState,
    phone: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(crate::message::Conv, serde_json::Map<String, Value>), ApiError> {
    let phone = ingest::normalize_conversation(phone)?;
    let bytes = super::read_json_body(s, headers, body, 4096).await?;
    let body: serde_json::Map<String, Value> = if bytes.iter().all(u8::is_ascii_whitespace) {
        Default::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(ApiError::unprocessable("body must be a JSON object")),
            Err(e) => return Err(ApiError::bad_request(format!("body is not valid JSON: {e}"))),
        }
    };
    if let Some(unknown) = body.keys().find(|k| !["company_id", "minutes"].contains(&k.as_str())) {
        return Err(ApiError::unprocessable(format!(
            "unknown field `{unknown}`; expected company_id, minutes"
        )));
    }
    let company_id = match body.get("company_id") {
        None | Some(Value::Null) => s.default_company_id.clone(),
        Some(Value::String(c)) => c.trim().to_owned(),
        Some(_) => return Err(ApiError::unprocessable("`company_id` must be a string")),
    };
    if let Some(problem) = crate::message::company_id_problem(&company_id) {
        return Err(ApiError::unprocessable(format!("`company_id` {problem}")));
    }
    Ok((crate::message::Conv { phone, company_id }, body))
}

/// Staff take the conversation over from the API (or the console): for
/// `minutes` (default `takeover.resume_after_min`; 0: until resumed).
async fn pause(
    State(s): State<Arc<AppState>>,
    Path(phone): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (conv, body) = takeover_target(&s, &phone, &headers, body).await?;
    let minutes = match body.get("minutes") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|m| *m <= 7 * 24 * 60).ok_or_else(|| {
            ApiError::unprocessable("`minutes` must be a whole number from 0 (until resumed) to 10080")
        })?),
    };
    s.handover.pause(&conv, minutes).await?;
    Ok(Json(takeover_json(&conv, &s.store.takeover(&conv))))
}

/// The assistant takes the conversation back: what waited becomes a turn.
async fn resume(
    State(s): State<Arc<AppState>>,
    Path(phone): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (conv, _) = takeover_target(&s, &phone, &headers, body).await?;
    if !s.handover.resume(&conv).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("{} is not paused", conv.masked())));
    }
    Ok(Json(takeover_json(&conv, &s.store.takeover(&conv))))
}

async fn dead(State(s): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let turns = s.store.read(|st| st.turns()).await?;
    let dead: Vec<Value> = turns.iter().filter(|t| t.dead.is_some()).map(record_json).collect();
    Ok(Json(json!({ "dead": dead })))
}

async fn retry_dead(
    State(s): State<Arc<AppState>>,
    Path(turn_id): Path<String>,
) -> Result<Response, ApiError> {
    match s.driver.retry(turn_id.clone()).await {
        RetryOutcome::Queued => {
            Ok((StatusCode::ACCEPTED, Json(json!({ "status": "queued", "turn_id": turn_id })))
                .into_response())
        }
        RetryOutcome::NotFound => Err(ApiError::not_found(format!("no turn {turn_id}"))),
        RetryOutcome::NotDead => {
            Err(ApiError::new(StatusCode::CONFLICT, format!("turn {turn_id} is not dead")))
        }
        RetryOutcome::Failed(e) => Err(ApiError::unavailable(e)),
    }
}

/// `Authorization: Bearer <admin_token>` on /api/* and /metrics, when a token is set.
async fn require_token(
    State(s): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !s.admin_token.is_empty() {
        let given = bearer(request.headers()).unwrap_or("");
        if !signature::same(given.as_bytes(), s.admin_token.as_bytes()) {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"));
        }
    }
    Ok(next.run(request).await)
}

/// A consistent snapshot while the daemon keeps serving: written to a temp
/// file by a low-priority thread (ingest goes on; tree writes wait for the
/// cut), then streamed.
async fn online_backup(State(s): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let path =
        std::env::temp_dir().join(format!("turnstile-backup-{}-{}.partial", std::process::id(), unix_ms()));
    let opened = match backup::write_online(s.store.clone(), path.clone()).await {
        Ok(_) => tokio::fs::File::open(&path).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    // Unlinked at once: the open file streams on, and nothing is left behind.
    let _ = std::fs::remove_file(&path);
    let file = opened.map_err(|e| ApiError::internal(format!("backup failed: {e}")))?;
    let name = format!("attachment; filename=\"turnstile-{}.backup\"", unix_ms());
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream".to_owned()), (header::CONTENT_DISPOSITION, name)],
        body,
    )
        .into_response())
}

/// Rewrites the store's files now (what the daemon does by itself at
/// `store.rewrite_after_mb`); answers once the new files are in use.
async fn rewrite_store(State(s): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let generation = s.store.rewrite_now().await?;
    let trees_bytes = s.store.read(|st| st.file_sizes()).await?.trees;
    Ok(Json(json!({ "generation": generation, "trees_bytes": trees_bytes })))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut g = Gauges { ready: accepting(&s).is_ok(), ..Gauges::default() };
    if let Some(snap) = s.driver.snapshot().await {
        let oldest = snap.collecting.iter().map(|c| snap.now.saturating_duration_since(c.first_at)).max();
        g.oldest_pending_batch_s = oldest.unwrap_or_default().as_secs_f64();
        g.pending_batches = snap.collecting.len() + snap.waiting.len();
        g.pending_messages = snap.collecting.iter().map(|c| c.seqs.len()).sum::<usize>()
            + snap.waiting.iter().map(|w| w.1.len()).sum::<usize>();
        g.turns_in_flight = snap.running.len();
        g.paused_oldest_waiting_s = snap
            .paused
            .iter()
            .filter_map(|h| h.since.filter(|_| h.messages > 0))
            .map(|since| snap.now.saturating_duration_since(since).as_secs_f64())
            .fold(0.0, f64::max);
    }
    g.batch_max_wait_s = s.batch_max_wait_ms as f64 / 1000.0;
    let items = s.store.outbox();
    let now_ms = crate::message::unix_ms();
    let oldest = items.iter().filter(|i| !i.failed).map(|i| i.created_at_ms).min();
    g.oldest_outbox_s = oldest.map_or(0, |at| now_ms.saturating_sub(at)) as f64 / 1000.0;
    g.last_sync_age_s = now_ms.saturating_sub(s.store.last_sync_ms()) as f64 / 1000.0;
    g.quarantine_held = s.store.quarantine_len();
    g.paused_conversations = s.store.paused().len();
    g.outbox_outside_window = items
        .iter()
        .filter(|i| matches!(OutboxState::of(i), OutboxState::OutsideWindow | OutboxState::AwaitingClient))
        .count();

    let count = |state| items.iter().filter(|i| OutboxState::of(i) == state).count();
    (g.outbox_depth, g.outbox_failed, g.outbox_rate_limited) =
        (count(OutboxState::Pending), count(OutboxState::Failed), count(OutboxState::RateLimited));
    let c = s.store.context_stats();
    (g.context_hits, g.context_misses, g.context_invalidations) =
        (c.cache_hits, c.cache_misses, c.invalidations);
    (g.contexts, g.context_raw_bytes, g.context_stored_bytes) = (c.contexts, c.raw_bytes, c.stored_bytes);
    (g.file_bytes, g.trees) = s
        .store
        .read(|st| (st.file_sizes().unwrap_or_default(), st.tree_sizes_recent().unwrap_or_default()))
        .await;
    g.store_bytes = g.file_bytes.total();
    g.fsyncs = s.store.syncs();
    let st = s.store.stats();
    g.dead_turns = st.dead_turns as usize;
    g.expired = [st.expired_dead, st.expired_failed, st.expired_history];
    g.store_rewrites = st.rewrites;
    g.store_repairs = s.store.repairs().len();
    (g.log_syncs, g.tree_syncs, g.messages_stored, g.log_segments) =
        (st.log_syncs, st.tree_syncs, st.stored, st.log_segments);
    g.store_ok = s.store.failure().is_none() && s.store.trouble().is_none();
    let count = |c: &super::serve::Counts| {
        use std::sync::atomic::Ordering::Relaxed;
        (c.open.load(Relaxed), c.refused.load(Relaxed))
    };
    g.connections = [count(&s.connections[0]), count(&s.connections[1])];
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render(&g))
        .into_response()
}
