//! The context API: read a conversation's context straight from the store;
//! write, delete or invalidate it as gate work in the conversation's turn
//! slot, answering once the write is on disk.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{read_json_body, ApiError, AppState};
use crate::context;
use crate::ingest;
use crate::message::Conv;
use crate::store::ContextMeta;
use crate::turns::{ContextOp, ContextOutcome};

/// The conversation a context path names: company as given, phone normalised.
fn context_conv(company_id: String, phone: &str) -> Result<Conv, ApiError> {
    if let Some(problem) = crate::message::company_id_problem(&company_id) {
        return Err(ApiError::unprocessable(format!("company_id {problem}")));
    }
    let phone = ingest::normalize_conversation(phone)?;
    Ok(Conv { phone, company_id })
}

fn meta_json(meta: &ContextMeta) -> (Value, Value) {
    (json!(meta.updated_at_ms), json!(meta.expires_at_ms))
}

pub(super) async fn get_context(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
) -> Result<Json<ContextBody>, ApiError> {
    let conv = context_conv(company_id, &phone)?;
    let (key, now) = (conv.clone(), s.clock.now_ms());
    let stored = s
        .store
        .read(move |st| st.context(&key, now))
        .await
        .map_err(|e| ApiError::internal(format!("context for {conv}: {e}")))?
        .ok_or_else(|| ApiError::not_found(format!("no context for {conv}")))?;
    // Raw JSON text: checked, never built into a tree and serialized again.
    let decode = |which: &str, bytes: Option<&[u8]>| -> Result<Option<Box<RawValue>>, ApiError> {
        match bytes {
            None => Ok(None),
            Some(b) => context::decode_raw(b).map(Some).map_err(|e| {
                tracing::error!(conv = %conv.masked(), part = which, error = %e, "stored context is corrupt");
                ApiError::internal(format!("{which} of the context for {conv} is corrupt: {e}"))
            }),
        }
    };
    Ok(Json(ContextBody {
        dialogue: decode("dialogue", stored.dialogue.as_deref())?,
        cache: decode("cache", stored.cache.as_deref())?,
        updated_at: stored.meta.updated_at_ms,
        expires_at: stored.meta.expires_at_ms,
    }))
}

/// What `GET /api/contexts/...` answers (and a PUT may send back).
#[derive(serde::Serialize)]
pub(super) struct ContextBody {
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
) -> Result<Json<Value>, ApiError> {
    let conv = context_conv(company_id, &phone)?;
    let body = read_json_body(&s, &headers, body, s.context_max_bytes).await?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(ApiError::unprocessable("body must be a JSON object {\"dialogue\", \"cache\"}"));
    };
    if let Some(unknown) =
        obj.keys().find(|k| !["dialogue", "cache", "updated_at", "expires_at"].contains(&k.as_str()))
    {
        return Err(ApiError::unprocessable(format!(
            "unknown field `{unknown}`; expected dialogue and cache"
        )));
    }
    let part = |k: &str| obj.get(k).filter(|v| !v.is_null()).cloned();
    let op = ContextOp::Put { dialogue: part("dialogue"), cache: part("cache") };
    Ok(Json(match write_context(&s, conv, op).await? {
        (_, Some(meta)) => {
            let (updated_at, expires_at) = meta_json(&meta);
            json!({ "status": "stored", "updated_at": updated_at, "expires_at": expires_at })
        }
        (_, None) => json!({ "status": "empty" }),
    }))
}

/// Queues a context write in its conversation's turn slot and waits until it
/// is on disk: the live meta before and the meta after, or the 503 to send.
async fn write_context(
    s: &AppState,
    conv: Conv,
    op: ContextOp,
) -> Result<(Option<ContextMeta>, Option<ContextMeta>), ApiError> {
    match s.driver.context(conv, op).await {
        ContextOutcome::Done { before, after } => Ok((before, after)),
        ContextOutcome::Failed(e) => Err(ApiError::unavailable(e)),
    }
}

pub(super) async fn delete_context(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let conv = context_conv(company_id, &phone)?;
    let label = conv.to_string();
    match write_context(&s, conv, ContextOp::Delete).await? {
        (Some(_), _) => Ok(Json(json!({ "status": "deleted" }))),
        (None, _) => Err(ApiError::not_found(format!("no context for {label}"))),
    }
}

/// Drops the cache, keeps the dialogue: what the booking side calls when a
/// booking is created or cancelled. Idempotent.
pub(super) async fn invalidate_context(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let conv = context_conv(company_id, &phone)?;
    let (before, _) = write_context(&s, conv, ContextOp::Invalidate).await?;
    let had_cache = before.is_some_and(|m| m.cache.is_some());
    Ok(Json(json!({ "status": "invalidated", "had_cache": had_cache })))
}
