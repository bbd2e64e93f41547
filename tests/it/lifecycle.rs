//! Restarts, re-runs and dead turns: what survives a stop and how a failing
//! AI service is handled.

use std::time::Duration;

use serde_json::json;
use tokio::time::sleep;

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn a_pending_batch_survives_a_restart_and_fires() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    for (i, text) in BURST.iter().take(3).enumerate() {
        d.send(&format!("r{i}"), "79001234567", text).await;
    }
    d.stop().await;
    assert!(handler.calls().is_empty());

    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    d.send("r3", "79001234567", BURST[3]).await;
    wait_until("the turn", 30 * S, || handler.calls().len() == 1).await;
    sleep(30 * S).await;
    let calls = handler.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].ids, ["r0", "r1", "r2", "r3"]);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_turn_cut_short_by_shutdown_re_runs_with_the_same_turn_id() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(60 * S).await;
    let mut config = config_with(dir.path(), &handler);
    config.turns.shutdown_grace_ms = 1_000;
    let d = Daemon::start(config.clone()).await;
    d.send("s1", "79001234567", "Привет").await;
    wait_until("the turn to start", 30 * S, || handler.calls().len() == 1).await;
    d.stop().await; // the handler is still thinking; grace is 1 s

    handler.set_delay(Duration::ZERO);
    let d = Daemon::start(config).await;
    wait_until("the re-run", 30 * S, || handler.calls().len() == 2).await;
    sleep(5 * S).await;
    let calls = handler.calls();
    assert_eq!(calls[1].turn_id, calls[0].turn_id, "same turn, same id");
    assert_eq!(calls[1].ids, ["s1"]);
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    assert_eq!(conv["turns"].as_array().unwrap().len(), 1);
    assert_eq!(conv["open_turns"], json!([]));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_handler_parks_the_turn_dead_without_blocking_the_phone_and_retry_commits_it() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    handler.fail_with(Some(502));
    let mut config = config_with(dir.path(), &handler);
    config.handler.max_attempts = 3;
    config.handler.backoff_ms = 500;
    let d = Daemon::start(config).await;
    d.send("x1", "79001234567", "Привет").await;
    wait_until("three attempts", 60 * S, || handler.calls().len() == 3).await;
    sleep(S).await;
    let (_, dead) = d.get("/api/dead").await;
    let dead = dead["dead"].as_array().unwrap().clone();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["text"], "Привет");
    assert_eq!(dead[0]["attempts"], 3);
    assert!(dead[0]["error"].as_str().unwrap().contains("502"), "{}", dead[0]);
    let turn_id = dead[0]["turn_id"].as_str().unwrap().to_owned();
    let metrics = d.client.get(d.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let value =
        |name: &str| metrics.lines().find_map(|l| l.strip_prefix(&format!("{name} "))?.parse::<f64>().ok());
    assert_eq!(
        (value("turnstile_handler_errors_total"), value("turnstile_handler_retries_total")),
        (Some(3.0), Some(2.0)),
        "three failed attempts, two of them retried"
    );

    // The phone is not blocked: its next batch runs.
    handler.fail_with(None);
    d.send("x2", "79001234567", "можно").await;
    wait_until("the next turn", 30 * S, || handler.calls().len() == 4).await;
    assert_eq!(handler.calls()[3].ids, ["x2"]);

    let (status, body) = d.post(&format!("/api/dead/{turn_id}/retry"), &json!({})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("queued")));
    wait_until("the retried turn", 30 * S, || handler.calls().len() == 5).await;
    sleep(S).await;
    let calls = handler.calls();
    assert_eq!((calls[4].turn_id.as_str(), calls[4].ids.clone()), (turn_id.as_str(), vec!["x1".to_owned()]));
    assert_eq!(d.get("/api/dead").await.1, json!({"dead": []}));
    assert_eq!(d.post(&format!("/api/dead/{turn_id}/retry"), &json!({})).await.0, 404);
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    assert_eq!(conv["turns"].as_array().unwrap().len(), 2);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_times_out_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(10 * S).await;
    let mut config = config_with(dir.path(), &handler);
    config.handler.timeout_ms = 2_000;
    config.handler.backoff_ms = 100;
    let d = Daemon::start(config).await;
    d.send("y1", "79001234567", "Привет").await;
    wait_until("two attempts", 60 * S, || handler.calls().len() == 2).await;
    handler.set_delay(Duration::ZERO);
    wait_until("a third, successful attempt", 60 * S, || handler.calls().len() == 3).await;
    sleep(S).await;
    let calls = handler.calls();
    assert!(calls.iter().all(|c| c.turn_id == calls[0].turn_id));
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    assert_eq!(conv["turns"][0]["attempts"], 3);
    d.stop().await;
}

/// An answer too large, or with a context part over `context.max_bytes`, is
/// a failed attempt like any other: retried, then dead, nothing stored.
#[tokio::test(start_paused = true)]
async fn an_oversized_answer_or_context_part_fails_the_attempt_and_stores_nothing() {
    for (case, answer) in [
        ("answer", serde_json::json!({"reply": "x".repeat(5000)})),
        ("context", serde_json::json!({"reply": "ok", "context": {"blob": "y".repeat(3000)}})),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ai = FakeServer::start(move |_| answer.clone()).await;
        let mut c = config(dir.path());
        c.handler.kind = turnstile::config::HandlerKind::Http;
        c.handler.url = format!("{}/turn", ai.base);
        c.ingest.webhook_token = WEBHOOK_TOKEN.into();
        c.handler.max_attempts = 2;
        c.handler.backoff_ms = 10;
        c.handler.max_answer_bytes = 4096;
        c.context.max_bytes = 2048;
        let d = Daemon::start(c).await;
        let body = serde_json::json!({"id": "big1", "from": "79001234567", "message": "Привет"});
        assert_eq!(d.post("/webhook/whatsapp", &body).await.0, 200);
        wait_until("the dead turn", Duration::from_secs(60), || ai.seen().len() == 2).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let dead = d.get("/api/dead").await.1;
        let error = dead["dead"][0]["error"].as_str().unwrap_or_default().to_owned();
        let expected = if case == "answer" { "handler.max_answer_bytes" } else { "context.max_bytes" };
        assert!(error.contains(expected), "{case}: {dead}");
        assert_eq!(d.get("/api/contexts/default/79001234567").await.0, 404, "{case}: nothing stored");
        d.stop().await;
    }
}
