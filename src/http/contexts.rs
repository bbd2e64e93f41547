//! The context API: read a conversation's context straight from the store;
//! write, delete or invalidate it as gate work in the conversation's turn
//! slot, answering once the write is on disk.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{error, read_json_body, AppState};
use crate::context;
use crate::ingest;
use crate::message::Conv;
use crate::store::ContextMeta;
use crate::turns::{ContextOp, ContextOutcome};

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

pub(super) async fn get_context(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
) -> Response {
    let conv = match context_conv(company_id, &phone) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (key, now) = (conv.clone(), s.clock.now_ms());
    let stored = match s.store.read(move |st| st.context(&key, now)).await {
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
pub(super) async fn put_context(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let conv = match context_conv(company_id, &phone) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match read_json_body(&s, &headers, body, s.context_max_bytes).await {
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

pub(super) async fn delete_context(
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
pub(super) async fn invalidate_context(
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
