//! The webhooks, the public listener's only business: the generic payload
//! (debounced or immediate), Meta's and WAHA's. Each checks, in order, that
//! the daemon takes webhooks, that the sender knows the secret (the generic
//! token before the body is read; Meta's and WAHA's HMAC over the body), the
//! body, and then hands the payload to ingest. A request refused on the way
//! stores nothing: no message, no dedup mark.
//!
//! Meta's, WAHA's and Evolution's routes exist only while their config
//! sections are set, the generic ones unless `ingest.generic_webhooks =
//! false`; an absent route answers 404.
//!
//! A gateway delivery that passed its secret check is never answered 4xx
//! for its content — a sender drops what it is refused (Evolution at once):
//! what no parser takes is kept in the quarantine (`store::quarantine`) and
//! answered 200 `{"status": "quarantined"}`, to be replayed after an upgrade.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{accepting, bearer, read_json_body, ApiError, AppState};
use crate::ingest::{self, signature, Accepted, Inbound};
use crate::message::unix_ms;
use crate::message::Urgency;
use crate::takeover::Handled;

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
        // The per-event paths Evolution's `webhookByEvents` appends
        // (`/messages-upsert`, `/presence-update`, …; the body still names the
        // event), and the same under a secret in the path for the global
        // webhook, which sends no headers.
        routes = routes
            .route("/webhook/evolution", post(evolution_webhook))
            .route("/webhook/evolution/{event}", post(evolution_webhook))
            .route("/webhook/evolution/key/{secret}", post(evolution_keyed))
            .route("/webhook/evolution/key/{secret}/{event}", post(evolution_keyed));
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
    webhook(&s, &headers, body, Urgency::Debounced).await
}

async fn webhook_immediate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    webhook(&s, &headers, body, Urgency::Immediate).await
}

async fn webhook(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    urgency: Urgency,
) -> Result<Json<Value>, ApiError> {
    accepting(s)?;
    // The token before the body: a stranger's request is not even read.
    if !token_ok(s, headers) {
        return Err(ApiError::secret("missing or wrong webhook token: send ingest.webhook_token as `Authorization: Bearer <token>` or `X-Webhook-Token`"));
    }
    let body = read_json_body(s, headers, body, s.max_body_bytes).await?;
    let message = ingest::parse(&body, &s.default_company_id)?;
    s.caps.message(&message)?;
    Ok(accepted_json(s.ingest.accept(message, urgency).await?))
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

pub(super) fn accepted_json(accepted: Accepted) -> Json<Value> {
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
            return Err(ApiError::secret(
                "missing or wrong X-Hub-Signature-256: meta.app_secret must be the app's secret",
            ));
        }
    }
    deliver(&s, Gateway::Meta, &body).await
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
            return Err(ApiError::secret("missing or wrong X-Webhook-Hmac: waha.hmac_key must be the webhook's hmac key (WHATSAPP_HOOK_HMAC_KEY)"));
        }
    }
    deliver(&s, Gateway::Waha, &body).await
}

/// One Evolution API event; its `apikey` (body or header) is checked before
/// anything else is read.
async fn evolution_webhook(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    evolution(&s, &headers, body, None).await
}

/// The same, authenticated by the secret in its path (the global webhook).
async fn evolution_keyed(
    State(s): State<Arc<AppState>>,
    Path(params): Path<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    evolution(&s, &headers, body, params.get("secret").map(String::as_str)).await
}

async fn evolution(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    path_secret: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    let body = webhook_body(s, headers, body).await?;
    let e = &s.evolution;
    if !e.api_key.is_empty() || !e.url_secret.is_empty() {
        let header = headers.get("apikey").and_then(|v| v.to_str().ok());
        let root = serde_json::from_slice::<Value>(&body).ok();
        let key = root.as_ref().map_or(header, |v| ingest::evolution::api_key(v, header));
        let by_key =
            !e.api_key.is_empty() && key.is_some_and(|k| signature::same(k.as_bytes(), e.api_key.as_bytes()));
        let by_path = !e.url_secret.is_empty()
            && path_secret.is_some_and(|p| signature::same(p.as_bytes(), e.url_secret.as_bytes()));
        if !(by_key || by_path) {
            return Err(ApiError::secret(
                "missing or wrong Evolution key: send the instance's key (evolution.api_key) in an `apikey` header \
                 (the instance webhook's \"headers\": {\"apikey\": …}), or in the body with Evolution's \
                 AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES=true; for the global webhook (WEBHOOK_GLOBAL_URL, no headers) \
                 use /webhook/evolution/key/<evolution.url_secret>",
            ));
        }
    }
    deliver(s, Gateway::Evolution, &body).await
}

/// The gateways whose deliveries are quarantined rather than refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gateway {
    Meta,
    Waha,
    Evolution,
}

impl Gateway {
    pub(super) fn name(self) -> &'static str {
        match self {
            Gateway::Meta => "meta",
            Gateway::Waha => "waha",
            Gateway::Evolution => "evolution",
        }
    }

    pub(super) fn from_name(name: &str) -> Option<Gateway> {
        [Gateway::Meta, Gateway::Waha, Gateway::Evolution].into_iter().find(|g| g.name() == name)
    }
}

/// An authenticated delivery: parsed and taken, or — when no parser takes it
/// — kept in the quarantine (200), or refused 503 when that is full (the
/// sender retries). Also what a quarantined delivery's replay runs.
pub(super) async fn deliver(s: &AppState, gateway: Gateway, body: &[u8]) -> Result<Json<Value>, ApiError> {
    match parse(s, gateway, body) {
        Ok(inbound) => {
            let t = take(s, inbound).await?;
            Ok(Json(match gateway {
                // Meta's deliveries hold several messages (or none: statuses).
                Gateway::Meta => {
                    json!({ "status": "accepted", "accepted": t.accepted, "duplicates": t.duplicates })
                }
                _ if t.accepted > 0 => json!({ "status": "accepted" }),
                _ if t.duplicates > 0 => json!({ "status": "duplicate" }),
                _ if t.presences > 0 => json!({ "status": "presence" }),
                _ if t.staff > 0 => json!({ "status": "staff" }),
                _ if t.receipts > 0 => json!({ "status": "receipt" }),
                _ => json!({ "status": "ignored" }),
            }))
        }
        Err(e @ (ingest::IngestError::Malformed(_) | ingest::IngestError::Invalid(_))) => {
            quarantine(s, gateway, body, &e.to_string()).await
        }
        Err(e) => Err(e.into()),
    }
}

/// What a gateway's parser makes of a delivery (a Meta delivery may hold
/// several messages).
pub(super) fn parse(
    s: &AppState,
    gateway: Gateway,
    body: &[u8],
) -> Result<Vec<Inbound>, ingest::IngestError> {
    if s.store.faults().gateway_shapes_unknown() {
        return Err(ingest::IngestError::Invalid("a shape this build does not know (test hook)".into()));
    }
    let at = unix_ms();
    let events = match gateway {
        Gateway::Meta => ingest::meta::parse(body, &s.meta.companies, &s.default_company_id, at)?,
        Gateway::Waha => vec![ingest::waha::parse_event(body, &s.waha.sessions, &s.default_company_id, at)?],
        Gateway::Evolution => {
            let root: Value =
                serde_json::from_slice(body).map_err(|e| ingest::IngestError::Malformed(e.to_string()))?;
            vec![ingest::evolution::parse_event(&root, &s.evolution.instances, &s.default_company_id, at)?]
        }
    };
    // Whatever parsed is held to the same caps as the generic webhook.
    s.caps.inbound(&events)?;
    Ok(events)
}

async fn quarantine(
    s: &AppState,
    gateway: Gateway,
    body: &[u8],
    reason: &str,
) -> Result<Json<Value>, ApiError> {
    let capacity = s.quarantine_max;
    match s.store.quarantine(gateway.name(), reason, body, unix_ms(), capacity).await? {
        Some(id) => {
            s.metrics.quarantined(gateway.name());
            s.quarantine_log.note(gateway.name(), reason, &id);
            Ok(Json(json!({ "status": "quarantined", "id": id })))
        }
        None => Err(ApiError::unavailable(format!(
            "no parser takes this delivery ({reason}) and the quarantine is full ({capacity}): retry later"
        ))),
    }
}

/// What a delivery did.
struct Taken {
    accepted: usize,
    duplicates: usize,
    presences: usize,
    staff: usize,
    receipts: usize,
}

/// A gateway delivery's events taken: its messages stored (under one sync),
/// presences handed to the driver. LID-addressed events are pointed at their
/// conversation first (`Ingest::resolve`).
async fn take(s: &AppState, inbound: Vec<Inbound>) -> Result<Taken, ApiError> {
    let mut messages = Vec::new();
    let (mut presences, mut staff_messages, mut receipts) = (0, 0, 0);
    for event in inbound {
        match event {
            Inbound::Message(mut message, lid) => {
                s.ingest.resolve(&mut message.conv, lid.as_ref()).await?;
                messages.push(message);
            }
            Inbound::Presence { mut conv, presence, lid } => {
                s.ingest.resolve(&mut conv, lid.as_ref()).await?;
                // Not stored, not synced: a lost presence only costs a little latency.
                s.driver.presence(conv, presence);
                presences += 1;
            }
            Inbound::Staff(mut staff) => {
                s.ingest.resolve(&mut staff.conv, staff.lid.as_ref()).await?;
                if s.handover.staff(staff).await.map_err(ingest::IngestError::from)? != Handled::Ignored {
                    staff_messages += 1;
                }
            }
            Inbound::Receipt(receipt) => {
                s.deliveries.receipt(receipt).await.map_err(ingest::IngestError::from)?;
                receipts += 1;
            }
            Inbound::SessionStarted(session) => {
                if let Some(p) = &s.presence {
                    p.session_started(&session);
                }
            }
            Inbound::Ignored => {}
        }
    }
    let convs: Vec<crate::message::Conv> = messages.iter().map(|m| m.conv.clone()).collect();
    let c = if messages.is_empty() {
        Default::default()
    } else {
        s.ingest.accept_many(messages, Urgency::Debounced).await?
    };
    if let Some(p) = &s.presence {
        for conv in &convs {
            p.message(conv);
        }
    }
    Ok(Taken { accepted: c.accepted, duplicates: c.duplicates, presences, staff: staff_messages, receipts })
}

/// Counts each webhook by its route (never its path: an Evolution path may
/// hold a secret), its status and why it was refused.
async fn count_webhooks(State(s): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("", |m| m.as_str());
    let endpoint =
        if route.starts_with("/webhook/evolution") { "/webhook/evolution" } else { route }.to_owned();
    let response = next.run(request).await;
    let reason = response.extensions().get::<super::error::Refusal>().map(|r| r.0);
    s.metrics.webhook(&endpoint, response.status().as_u16(), reason);
    response
}
