//! Contexts over the API and through turns: durable, expiring, invalidatable,
//! and never interleaved with a running turn.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::sleep;
use turnstile::clock::Clock;

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const CTX: &str = "/api/contexts/962302/79001234567";

fn message(id: &str, phone: &str) -> Value {
    json!({"id": id, "from": phone, "message": "Привет", "company_id": "962302"})
}

#[tokio::test(start_paused = true)]
async fn contexts_survive_a_restart_and_delete_removes_both_parts() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    assert_eq!(d.get(CTX).await.0, 404);
    let body = json!({"dialogue": {"name": "Анна", "turns": 4}, "cache": {"services": [1, 2, 3]}});
    let (status, put) = d.put(CTX, &body).await;
    assert_eq!((status, put["status"].as_str()), (200, Some("stored")));
    d.stop().await;

    let d = Daemon::start(config(dir.path())).await;
    // The phone may be spelled any way the webhook accepts.
    let (status, got) = d.get("/api/contexts/962302/+7%20900%20123-45-67").await;
    assert_eq!(status, 200);
    assert_eq!((&got["dialogue"], &got["cache"]), (&body["dialogue"], &body["cache"]));
    let expires = got["expires_at"].as_u64().unwrap() - got["updated_at"].as_u64().unwrap();
    assert_eq!(expires, 12 * 3600 * 1000, "ttl_hours = 12");
    // Round-tripping what GET returned is a valid PUT.
    assert_eq!(d.put(CTX, &got).await.0, 200);
    assert_eq!(d.delete(CTX).await, (200, json!({"status": "deleted"})));
    assert_eq!(d.get(CTX).await.0, 404);
    assert_eq!(d.delete(CTX).await.0, 404);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_dialogue_expires_after_12_hours_and_a_touched_one_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::system();
    let d = Daemon::start_with_clock(config(dir.path()), clock.clone()).await;
    let idle = "/api/contexts/962302/79001110000";
    d.put(idle, &json!({"dialogue": {"about": "idle"}})).await;
    // The busy client's context is written by its turns (echo handler).
    d.post("/webhook/whatsapp", &message("b1", "79002220000")).await;
    sleep(S).await;
    let busy = "/api/contexts/962302/79002220000";
    assert_eq!(d.get(busy).await.1["dialogue"], json!({"turns": 1}));

    clock.advance(11 * HOUR);
    d.post("/webhook/whatsapp", &message("b2", "79002220000")).await;
    sleep(S).await;
    clock.advance(HOUR + S);

    assert_eq!(d.get(idle).await.0, 404, "untouched for 12 h: gone");
    let (status, got) = d.get(busy).await;
    assert_eq!(status, 200, "touched at 11 h: lives on");
    assert_eq!(got["dialogue"], json!({"turns": 2}));
    // The next turn of the idle client starts from nothing.
    d.post("/webhook/whatsapp", &message("i2", "79001110000")).await;
    sleep(S).await;
    assert_eq!(d.get(idle).await.1["dialogue"], json!({"turns": 1}));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn invalidate_drops_the_cache_keeps_the_dialogue_and_the_next_turn_rebuilds_it() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    d.post("/webhook/whatsapp", &message("m1", "79001234567")).await;
    wait_until("turn 1", 5 * S, || handler.calls().len() == 1).await;
    sleep(S).await;
    let got = d.get(CTX).await.1;
    assert_eq!(got["cache"]["built_by"], handler.calls()[0].turn_id.as_str());

    let inv = format!("{CTX}/invalidate");
    assert_eq!(d.post(&inv, &json!({})).await, (200, json!({"status": "invalidated", "had_cache": true})));
    let after = d.get(CTX).await.1;
    assert_eq!((&after["dialogue"], &after["cache"]), (&json!({"count": 1}), &Value::Null));
    assert_eq!(after["expires_at"], got["expires_at"], "an invalidation does not extend the context's life");
    assert_eq!(d.post(&inv, &json!({})).await.1["had_cache"], false, "idempotent");

    d.post("/webhook/whatsapp", &message("m2", "79001234567")).await;
    wait_until("turn 2", 5 * S, || handler.calls().len() == 2).await;
    let calls = handler.calls();
    assert_eq!((calls[1].seen_count, &calls[1].seen_cache), (1, &Value::Null), "dialogue kept, cache gone");
    sleep(S).await;
    assert_eq!(d.get(CTX).await.1["cache"]["built_by"], calls[1].turn_id.as_str());
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_put_or_invalidate_during_a_running_turn_is_applied_after_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(30 * S).await;
    let d = std::sync::Arc::new(Daemon::start(config_with(dir.path(), &handler)).await);
    d.post("/webhook/whatsapp", &message("m1", "79001234567")).await;
    wait_until("turn 1 to start", 5 * S, || handler.calls().len() == 1).await;

    // The booking side writes while the AI is thinking.
    let (d1, d2) = (d.clone(), d.clone());
    let put = tokio::spawn(async move {
        let r = d1.put(CTX, &json!({"dialogue": {"count": 100, "note": "set by CRM"}})).await;
        (r, tokio::time::Instant::now())
    });
    sleep(S).await;
    let invalidate = tokio::spawn(async move {
        let r = d2.post(&format!("{CTX}/invalidate"), &json!({})).await;
        (r, tokio::time::Instant::now())
    });
    let ((put_answer, put_at), (inv_answer, inv_at)) = (put.await.unwrap(), invalidate.await.unwrap());
    let turn_ended = handler.calls()[0].ended.expect("the turn finished");
    assert_eq!(put_answer.0, 200);
    assert_eq!(inv_answer.0, 200);
    assert!(put_at >= turn_ended && inv_at >= turn_ended, "the writes waited for the turn's commit");

    // Neither was lost under the turn's commit: the PUT's dialogue stands, and
    // the cache the turn built was dropped by the later invalidation.
    let got = d.get(CTX).await.1;
    assert_eq!(got["dialogue"], json!({"count": 100, "note": "set by CRM"}));
    assert_eq!(got["cache"], Value::Null);
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    assert_eq!(conv["turns"][0]["reply"], "turn 1 for 79001234567", "the turn's commit stands too");

    handler.set_delay(Duration::ZERO);
    d.post("/webhook/whatsapp", &message("m2", "79001234567")).await;
    wait_until("turn 2", 5 * S, || handler.calls().len() == 2).await;
    assert_eq!(handler.calls()[1].seen_count, 100, "the next turn sees the PUT");
    std::sync::Arc::into_inner(d).unwrap().stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_context_writes_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.context.max_bytes = 64 * 1024;
    let d = Daemon::start(config).await;
    let original = json!({"dialogue": {"keep": "me"}, "cache": null});
    d.put(CTX, &original).await;
    let url = d.url(CTX);
    let send = |ct: &'static str, body: Vec<u8>| {
        let req = d.client.put(&url).header("content-type", ct).body(body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let big = serde_json::to_vec(&json!({"dialogue": {"blob": "x".repeat(65 * 1024)}})).unwrap();
    for (what, ct, body, want) in [
        ("oversized", "application/json", big, 413),
        ("not JSON", "application/json", b"{\"dialogue\":".to_vec(), 400),
        ("an array", "application/json", b"[]".to_vec(), 422),
        ("a typo", "application/json", br#"{"dialog": {}}"#.to_vec(), 422),
        ("text", "text/plain", br#"{"dialogue": {}}"#.to_vec(), 415),
    ] {
        let (status, body) = send(ct, body).await;
        assert_eq!(status, want, "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: {body}");
    }
    assert_eq!(d.put("/api/contexts/962302/not-a-phone", &original).await.0, 422);
    assert_eq!(d.get("/api/contexts/962302/not-a-phone").await.0, 422);
    assert_eq!(d.get(CTX).await.1["dialogue"], json!({"keep": "me"}), "nothing changed");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_corrupted_stored_context_is_an_error_for_that_key_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    d.put(CTX, &json!({"dialogue": {"n": 1}})).await;
    d.put("/api/contexts/962302/79009999999", &json!({"dialogue": {"n": 2}})).await;
    d.stop().await;

    // Flip bytes of one stored dialogue, behind the daemon's back.
    {
        let db = sled::Config::new()
            .path(dir.path())
            .segment_size(turnstile::store::SEGMENT_BYTES)
            .open()
            .unwrap();
        let tree = db.open_tree("ctx_dialogue").unwrap();
        let key = b"79001234567\0962302\0";
        let mut value = tree.get(key).unwrap().unwrap().to_vec();
        let mid = value.len() / 2;
        value[mid] ^= 0xff;
        value[mid + 1] ^= 0xff;
        tree.insert(key, value).unwrap();
        db.flush().unwrap();
    }

    let d = Daemon::start(config(dir.path())).await;
    let (status, body) = d.get(CTX).await;
    assert_eq!(status, 500);
    assert!(body["error"].as_str().unwrap().contains("962302/79001234567"), "{body}");
    assert_eq!(d.get("/api/contexts/962302/79009999999").await.1["dialogue"], json!({"n": 2}));
    // The client still gets answered; the turn's commit replaces the bad value.
    d.post("/webhook/whatsapp", &message("c1", "79001234567")).await;
    sleep(S).await;
    let (status, body) = d.get(CTX).await;
    assert_eq!((status, &body["dialogue"]), (200, &json!({"turns": 1})));
    d.stop().await;
}
