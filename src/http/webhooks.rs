//! The webhooks, the public listener's only business: the generic payload
//! (debounced or immediate), Meta's and WAHA's. Each checks, in order, that
//! the daemon takes webhooks, that the sender knows the secret (the generic
//! token before the body is read; Meta's and WAHA's HMAC over the body), the
//! body, and then hands the payload to ingest. A request refused on the way
//! stores nothing: no message, no dedup mark.
//!
//! Meta's and WAHA's routes exist only while their config sections are set,
//! the generic ones unless `ingest.generic_webhooks = false`; an absent
//! route answers 404.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{accepting, bearer, read_json_body, ApiError, AppState};
use crate::ingest::{self, signature, Accepted, Inbound};
use crate::message::unix_ms;

pub(super) fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let mut routes = Router::new();
    if state.generic_webhooks {
        routes = routes
            .route("/webhook/whatsapp/batched", post(webhook_batched))
            .route("/webhook/whatsapp", post(webhook_immediate));
    }
    if state.meta.enabled() {
        routes = routes.route("/webhook/meta", get(meta_verify).post(meta_webhook));
    }
    if state.waha.enabled() {
        routes = routes.route("/webhook/waha", post(waha_webhook));
    }
    if state.evolution.enabled() {
        routes = routes.route("/webhook/evolution", post(evolution_webhook));
    }
    // axum refuses a route layer over no routes.
    if !routes.has_routes() {
        return routes;
    }
    routes.route_layer(middleware::from_fn_with_state(state, count_webhooks))
}

async fn webhook_batched(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    webhook(&s, &headers, body, false).await
}

async fn webhook_immediate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    webhook(&s, &headers, body, true).await
}

async fn webhook(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    immediate: bool,
) -> Result<Json<Value>, ApiError> {
    accepting(s)?;
    // The token before the body: a stranger's request is not even read.
    if !token_ok(s, headers) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong webhook token"));
    }
    let body = read_json_body(s, headers, body, s.max_body_bytes).await?;
    let message = ingest::parse(&body, &s.default_company_id)?;
    Ok(accepted_json(s.ingest.accept(message, immediate).await?))
}

/// The generic webhooks' shared secret, `ingest.webhook_token`, in
/// `Authorization: Bearer <token>` or, for senders that cannot set that
/// header, `X-Webhook-Token: <token>`. Compared in constant time.
fn token_ok(s: &AppState, headers: &HeaderMap) -> bool {
    if s.webhook_token.is_empty() {
        return true;
    }
    let header = headers.get("x-webhook-token").and_then(|v| v.to_str().ok());
    [bearer(headers), header]
        .into_iter()
        .flatten()
        .any(|given| signature::same(given.as_bytes(), s.webhook_token.as_bytes()))
}

/// What the signed webhooks (Meta, WAHA) check before their signature, in
/// this order: the daemon takes webhooks (503 while recovering or draining),
/// the body is JSON, not too large.
async fn webhook_body(s: &AppState, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    accepting(s)?;
    read_json_body(s, headers, body, s.max_body_bytes).await
}

fn accepted_json(accepted: Accepted) -> Json<Value> {
    let status = match accepted {
        Accepted::New => "accepted",
        Accepted::Duplicate => "duplicate",
    };
    Json(json!({ "status": status }))
}

/// Meta's subscription check: echo `hub.challenge` when the token matches.
async fn meta_verify(
    State(s): State<Arc<AppState>>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<String, ApiError> {
    let param = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    let token_ok = !s.meta.verify_token.is_empty()
        && signature::same(param("hub.verify_token").as_bytes(), s.meta.verify_token.as_bytes());
    if param("hub.mode") == "subscribe" && token_ok {
        return Ok(param("hub.challenge").to_owned());
    }
    Err(ApiError::new(StatusCode::FORBIDDEN, "verification refused: wrong hub.mode or hub.verify_token"))
}

/// One Meta delivery: possibly several messages, possibly none (statuses only).
async fn meta_webhook(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = webhook_body(&s, &headers, body).await?;
    if !s.meta.app_secret.is_empty() {
        let sig = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok());
        if !signature::meta_valid(&s.meta.app_secret, &body, sig) {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong X-Hub-Signature-256"));
        }
    }
    let messages = ingest::meta::parse(&body, &s.meta.companies, &s.default_company_id, unix_ms())?;
    let c = s.ingest.accept_many(messages, false).await?;
    Ok(Json(json!({ "status": "accepted", "accepted": c.accepted, "duplicates": c.duplicates })))
}

/// One WAHA event; only client messages are stored, the rest acknowledged.
async fn waha_webhook(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = webhook_body(&s, &headers, body).await?;
    if !s.waha.hmac_key.is_empty() {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (sig, algorithm) = (header("x-webhook-hmac"), header("x-webhook-hmac-algorithm"));
        if !signature::waha_valid(&s.waha.hmac_key, &body, sig, algorithm) {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong X-Webhook-Hmac"));
        }
    }
    let inbound = ingest::waha::parse_event(&body, &s.waha.sessions, &s.default_company_id, unix_ms())?;
    take(&s, inbound).await
}

/// One Evolution API event; its `apikey` is checked before anything else is read.
async fn evolution_webhook(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = webhook_body(&s, &headers, body).await?;
    let root = serde_json::from_slice::<Value>(&body);
    if !s.evolution.api_key.is_empty() {
        let header = headers.get("apikey").and_then(|v| v.to_str().ok());
        let given = match &root {
            Ok(v) => ingest::evolution::api_key(v, header),
            Err(_) => header,
        };
        if !given.is_some_and(|k| signature::same(k.as_bytes(), s.evolution.api_key.as_bytes())) {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong apikey"));
        }
    }
    let root = root.map_err(|e| ingest::IngestError::Malformed(e.to_string()))?;
    let inbound =
        ingest::evolution::parse_event(&root, &s.evolution.instances, &s.default_company_id, unix_ms())?;
    take(&s, inbound).await
}

/// A gateway event's answer: a message stored (or a duplicate), a presence
/// handed to the driver, or nothing for us.
async fn take(s: &AppState, inbound: Inbound) -> Result<Json<Value>, ApiError> {
    match inbound {
        Inbound::Message(message) => Ok(accepted_json(s.ingest.accept(message, false).await?)),
        Inbound::Presence { conv, presence } => {
            // Not stored, not synced: a lost presence only costs a little latency.
            s.driver.presence(conv, presence);
            Ok(Json(json!({ "status": "presence" })))
        }
        Inbound::Ignored => Ok(Json(json!({ "status": "ignored" }))),
    }
}

async fn count_webhooks(State(s): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let endpoint = request.uri().path().to_owned();
    let response = next.run(request).await;
    s.metrics.webhook(&endpoint, response.status().as_u16());
    response
}
