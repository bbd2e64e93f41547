//! Retention, on the paused clock with the wall clock moved ahead: dead
//! turns, given-up reply pieces and old history are removed after their
//! periods (30 days by default), counted in /metrics; newer ones stay.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::sleep;
use turnstile::clock::Clock;

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(24 * 3600);

async fn expired(d: &Daemon, kind: &str) -> u64 {
    let text = d.client.get(d.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let line = format!("turnstile_expired_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("{line} in {text}"))
        .parse()
        .unwrap()
}

async fn immediate(d: &Daemon, id: &str, phone: &str) {
    let body = json!({"id": id, "from": phone, "message": "Привет"});
    assert_eq!(d.post("/webhook/whatsapp", &body).await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn dead_turns_given_up_replies_and_old_history_go_after_their_period() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let gateway = FakeServer::start(|_| json!({"ok": true})).await;
    gateway.set_status(500);
    let mut c = config_with(dir.path(), &handler);
    c.handler.max_attempts = 1;
    http_gateway(&mut c, &gateway);
    c.gateway.max_attempts = 1;
    let clock = Clock::system();
    let d = Daemon::start_with_clock(c, clock.clone()).await;

    // A committed turn whose reply is given up, and a dead turn.
    immediate(&d, "a1", "79001110001").await;
    wait_until("the given-up reply", 30 * S, || !gateway.seen().is_empty()).await;
    handler.fail_with(Some(500));
    immediate(&d, "d1", "79001110002").await;
    wait_until("the dead turn", 30 * S, || handler.calls().len() == 2).await;
    sleep(5 * S).await;
    handler.fail_with(None);
    assert_eq!(d.get("/api/dead").await.1["dead"].as_array().unwrap().len(), 1);
    let outbox = d.get("/api/outbox").await.1;
    assert_eq!(outbox["outbox"][0]["state"], "failed", "{outbox}");
    assert_eq!(d.get("/api/conversations/79001110001").await.1["turns"].as_array().unwrap().len(), 1);

    // 29 days on: the hourly sweep keeps everything.
    clock.advance(29 * DAY);
    sleep(3601 * S).await;
    assert_eq!(d.get("/api/dead").await.1["dead"].as_array().unwrap().len(), 1);
    // A newer turn, committed now.
    immediate(&d, "b1", "79001110003").await;
    wait_until("the newer turn", 30 * S, || handler.calls().len() == 3).await;
    sleep(5 * S).await;

    // Past 30 days for the old ones: gone, counted; the newer one stays.
    clock.advance(2 * DAY);
    sleep(3601 * S).await;
    assert_eq!(d.get("/api/dead").await.1, json!({"dead": []}));
    let left: Vec<Value> = d.get("/api/outbox").await.1["outbox"].as_array().unwrap().clone();
    assert_eq!(left.len(), 1, "only the newer reply is left: {left:?}");
    assert_eq!(d.get("/api/conversations/79001110001").await.1["turns"], json!([]));
    assert_eq!(d.get("/api/conversations/79001110003").await.1["turns"].as_array().unwrap().len(), 1);
    assert_eq!(expired(&d, "dead_turns").await, 1);
    assert_eq!(expired(&d, "outbox_failed").await, 1);
    assert_eq!(expired(&d, "history").await, 1);
    let metrics = d.client.get(d.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_dead_turns 0\n"), "{metrics}");
    d.stop().await;
}
