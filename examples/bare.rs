//! The ceiling for the ingest benchmark: the same HTTP stack as turnstile
//! (tokio, hyper, axum, the same JSON parsing), answering the webhook with
//! `{"status":"accepted"}` and storing nothing.
//!
//!     cargo run --release --example bare -- 127.0.0.1:8090

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

async fn webhook(body: Bytes) -> (StatusCode, Json<Value>) {
    // Parse like turnstile does, so only storage and batching differ.
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) if v["id"].is_string() && v["from"].is_string() && v["message"].is_string() => {
            (StatusCode::OK, Json(json!({"status": "accepted"})))
        }
        _ => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": "bad payload"}))),
    }
}

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8090".into());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        let app = Router::new().route("/webhook/whatsapp/batched", post(webhook));
        axum::serve(listener, app).await.unwrap();
    });
}
