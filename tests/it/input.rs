//! What the webhook answers to redeliveries and bad input, and that bad input
//! changes nothing stored.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::sleep;

use crate::helpers::*;

#[tokio::test(start_paused = true)]
async fn a_redelivered_id_is_stored_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    assert_eq!(d.send("wamid.1", "79001234567@c.us", "Привет").await.1, json!({"status": "accepted"}));
    assert_eq!(d.send("wamid.1", "79001234567@c.us", "Привет").await.1, json!({"status": "duplicate"}));
    // Same id from another spelling of the phone: still the same message.
    assert_eq!(d.send("wamid.1", "+7 900 123-45-67", "Привет").await, (200, json!({"status": "duplicate"})));
    d.stop().await;

    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    assert_eq!(d.send("wamid.1", "79001234567", "Привет").await.1, json!({"status": "duplicate"}));
    wait_until("the turn", Duration::from_secs(30), || handler.calls().len() == 1).await;
    sleep(Duration::from_secs(30)).await;
    let calls = handler.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].ids, ["wamid.1"]);
    d.stop().await;
}

/// Sends raw bytes with the given content type; returns status and JSON body.
async fn raw(d: &Daemon, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req =
        d.client.post(format!("{}/webhook/whatsapp/batched", d.base)).bearer_auth(WEBHOOK_TOKEN).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(start_paused = true)]
async fn bad_input_gets_its_status_and_a_json_error_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    let json_ct = Some("application/json");
    let good = |id: &str| json!({"id": id, "from": "79001234567", "message": "hi"});
    let with = |field: &str, v: Value| {
        let mut body = good("bad");
        body[field] = v;
        serde_json::to_vec(&body).unwrap()
    };
    let without = |field: &str| {
        let mut body = good("bad");
        body.as_object_mut().unwrap().remove(field);
        serde_json::to_vec(&body).unwrap()
    };
    let cases: Vec<(&str, Option<&str>, Vec<u8>, u16)> = vec![
        ("malformed JSON", json_ct, b"{\"id\": \"x\", \"from\":".to_vec(), 400),
        ("not JSON at all", json_ct, b"hello".to_vec(), 400),
        ("missing id", json_ct, without("id"), 422),
        ("missing from", json_ct, without("from"), 422),
        ("missing message", json_ct, without("message"), 422),
        ("empty message", json_ct, with("message", json!("")), 422),
        ("empty id", json_ct, with("id", json!("")), 422),
        ("numeric from", json_ct, with("from", json!(79001234567u64)), 422),
        ("unparseable phone", json_ct, with("from", json!("call me maybe")), 422),
        ("string timestamp", json_ct, with("timestamp", json!("yesterday")), 422),
        ("array company", json_ct, with("company_id", json!(["a"])), 422),
        ("a JSON array", json_ct, b"[]".to_vec(), 422),
        ("oversized body", json_ct, with("message", json!("x".repeat(70 * 1024))), 413),
        ("text/plain", Some("text/plain"), serde_json::to_vec(&good("bad")).unwrap(), 415),
        ("form", Some("application/x-www-form-urlencoded"), b"id=1".to_vec(), 415),
        ("no content type", None, serde_json::to_vec(&good("bad")).unwrap(), 415),
    ];
    for (what, ct, body, want) in cases {
        let (status, body) = raw(&d, ct, body).await;
        assert_eq!(status, want, "{what}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {body}");
    }

    // An oversized body sent chunked (no Content-Length) is refused too.
    let addr = d.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk =
        format!("{{\"id\":\"big\",\"from\":\"79001234567\",\"message\":\"{}\"}}", "y".repeat(80 * 1024));
    let req = format!(
        "POST /webhook/whatsapp/batched HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {WEBHOOK_TOKEN}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let _ = s.write_all(req.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Nothing of the above was stored, batched, deduplicated or answered.
    let (_, batches) = d.get("/api/batches").await;
    assert_eq!(batches["batches"], json!([]));
    sleep(Duration::from_secs(60)).await;
    assert!(handler.calls().is_empty());
    // "bad" was never marked seen: the same id with a valid body is new.
    assert_eq!(d.post("/webhook/whatsapp/batched", &good("bad")).await.1, json!({"status": "accepted"}));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn unknown_routes_and_methods_answer_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let (status, body) = d.get("/nope").await;
    assert_eq!((status, body["error"].is_string()), (404, true));
    let (status, body) = d.get("/webhook/whatsapp/batched").await;
    assert_eq!((status, body["error"].is_string()), (405, true));
    assert_eq!(d.get("/healthz").await, (200, json!({"status": "ok"})));
    d.stop().await;
}
