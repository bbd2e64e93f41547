//! `ApiError`, the one refusal every route answers with: a status code and
//! `{"error": "..."}`. Handlers return `Result<_, ApiError>` and use `?`; the
//! `From` impls below say which status a module's error becomes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::ingest::IngestError;
use crate::store::StoreError;

/// A refused request: sent as its status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Why, for the webhooks' metrics (`reason` label), when it matters.
    refusal: Option<&'static str>,
}

/// Set on a response refused for a reason the metrics name.
#[derive(Debug, Clone, Copy)]
pub struct Refusal(pub &'static str);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), refusal: None }
    }

    /// 401 for a missing or wrong secret; the message says where it goes.
    pub fn secret(message: impl Into<String>) -> Self {
        ApiError { refusal: Some("secret"), ..Self::new(StatusCode::UNAUTHORIZED, message) }
    }

    /// 400: the request itself is broken.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: nothing by that name.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 422: well-formed, but a value is unacceptable.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    /// 500: the daemon's own fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// 503: not now; the caller should retry later.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if let Some(reason) = self.refusal {
            response.extensions_mut().insert(Refusal(reason));
        }
        response
    }
}

/// Refusals that did not come from an `ApiError` — an extractor's own (a
/// path segment that is not UTF-8, a query that does not parse) — get the
/// same shape: the status kept, their words (or the status's) as `error`.
pub async fn json_refusals(response: Response) -> Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use http_body_util::{BodyExt, Limited};
    let status = response.status();
    let json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let words = match Limited::new(body, 4096).collect().await {
        Ok(c) => String::from_utf8_lossy(&c.to_bytes()).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = if words.is_empty() {
        status.canonical_reason().unwrap_or("refused").to_ascii_lowercase()
    } else {
        words
    };
    let mut answer = (status, Json(json!({ "error": message }))).into_response();
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    *answer.extensions_mut() = parts.extensions;
    answer
}

/// A message refused by ingest: broken JSON 400, a bad field 422, and a
/// store that could not take it 503, so the gateway delivers it again.
/// A phone or conversation in a path that is not one: 422.
impl From<crate::ingest::PhoneError> for ApiError {
    fn from(e: crate::ingest::PhoneError) -> Self {
        Self::unprocessable(e.to_string())
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Malformed(_) => Self::bad_request(e.to_string()),
            IngestError::Invalid(_) => Self::unprocessable(e.to_string()),
            IngestError::Store(_) => {
                tracing::warn!(error = %e, "webhook refused: not stored");
                Self::unavailable(e.to_string())
            }
        }
    }
}

/// A failed store read: 500, with the store's own words.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::internal(e.to_string())
    }
}
