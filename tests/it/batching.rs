//! Debounce and the one-turn-at-a-time rule, as a client and the AI service see them.

use std::time::Duration;

use serde_json::json;
use tokio::time::{sleep, Instant};

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn five_messages_one_to_two_seconds_apart_become_one_turn_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;

    let gaps_ms = [1500, 1000, 2000, 1200];
    for (i, text) in BURST.iter().enumerate() {
        let (status, body) = d.send(&format!("m{i}"), "79001234567@c.us", text).await;
        assert_eq!((status, body), (200, json!({"status": "accepted"})));
        if let Some(gap) = gaps_ms.get(i) {
            sleep(Duration::from_millis(*gap)).await;
        }
    }
    let last_sent = Instant::now();
    // While the client is quiet, nothing fires before the debounce.
    sleep(9 * S).await;
    assert!(handler.calls().is_empty(), "fired before debounce_ms");
    wait_until("the turn", 5 * S, || handler.calls().len() == 1).await;
    sleep(60 * S).await;

    let calls = handler.calls();
    assert_eq!(calls.len(), 1, "exactly one turn: {calls:?}");
    assert_eq!(calls[0].text, "Привет\nможно\nзаписаться\nна стрижку\nзавтра?");
    assert_eq!(calls[0].ids, ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(calls[0].phone, "79001234567");
    assert_eq!(calls[0].idempotency_key, calls[0].turn_id);
    let fired_after = calls[0].started - last_sent;
    assert!(fired_after >= 10 * S && fired_after < 10 * S + Duration::from_millis(50), "{fired_after:?}");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn twelve_quick_messages_become_two_turns_of_ten_and_two() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    for i in 0..12 {
        assert_eq!(d.send(&format!("q{i}"), "+7 900 123-45-67", &format!("msg {i}")).await.0, 200);
        sleep(Duration::from_millis(100)).await;
    }
    wait_until("two turns", 30 * S, || handler.calls().len() == 2).await;
    sleep(30 * S).await;
    let calls = handler.calls();
    assert_eq!(calls.len(), 2);
    let expect = |r: std::ops::Range<i32>| r.map(|i| format!("q{i}")).collect::<Vec<_>>();
    assert_eq!(calls[0].ids, expect(0..10));
    assert_eq!(calls[1].ids, expect(10..12));
    assert_eq!(calls[1].seen_count, 1, "the second turn sees the first one's context");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_during_a_running_turn_waits_for_its_commit_and_sees_its_context() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(30 * S).await; // the AI takes 30 s
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    for (i, text) in BURST.iter().enumerate() {
        d.send(&format!("a{i}"), "79001234567", text).await;
        sleep(S).await;
    }
    wait_until("turn 1 to start", 15 * S, || handler.calls().len() == 1).await;
    // The client writes again while turn 1's handler is still thinking.
    sleep(2 * S).await;
    for (i, text) in ["а ещё", "маникюр", "тоже можно?"].iter().enumerate() {
        d.send(&format!("b{i}"), "79001234567", text).await;
        sleep(S).await;
    }
    // Its debounce passes while turn 1 still runs: it must wait.
    sleep(12 * S).await;
    assert_eq!(handler.calls().len(), 1, "turn 2 started while turn 1 was running");
    let (_, batches) = d.get("/api/batches").await;
    assert_eq!(batches["batches"][0]["state"], "waiting_for_turn", "{batches}");
    assert_eq!(batches["running"][0]["phone"], "79001234567");

    wait_until("turn 2", 60 * S, || handler.calls().len() == 2).await;
    wait_until("turn 2 to end", 60 * S, || handler.calls()[1].ended.is_some()).await;
    let calls = handler.calls();
    assert_eq!(calls[1].ids, ["b0", "b1", "b2"]);
    assert!(calls[1].started >= calls[0].ended.unwrap(), "turns overlapped");
    assert_eq!(calls[0].seen_count, 0);
    assert_eq!(calls[1].seen_count, 1, "turn 2 ran with turn 1's saved context");
    assert_eq!(handler.max_in_flight().0, 1);

    sleep(S).await;
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    let turns = conv["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[1]["text"], "а ещё\nманикюр\nтоже можно?");
    assert_eq!(turns[1]["reply"], "turn 2 for 79001234567");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn two_hundred_phones_in_parallel_give_two_hundred_turns_never_two_per_phone() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(3 * S).await;
    let d = std::sync::Arc::new(Daemon::start(config_with(dir.path(), &handler)).await);
    let phones: Vec<String> = (0..200).map(|p| format!("7900{:07}", p)).collect();
    let mut senders = Vec::new();
    for (p, phone) in phones.iter().enumerate() {
        let (d, phone) = (d.clone(), phone.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..3 {
                assert_eq!(d.send(&format!("{phone}-{i}"), &phone, &format!("{p}/{i}")).await.0, 200);
                sleep(Duration::from_millis(300 + (p as u64 * 7) % 900)).await;
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    wait_until("200 turns", 120 * S, || handler.calls().iter().filter(|c| c.ended.is_some()).count() == 200)
        .await;
    sleep(30 * S).await;
    let calls = handler.calls();
    assert_eq!(calls.len(), 200);
    for phone in &phones {
        let mine: Vec<_> = calls.iter().filter(|c| &c.phone == phone).collect();
        assert_eq!(mine.len(), 1, "{phone}");
        assert_eq!(mine[0].ids, (0..3).map(|i| format!("{phone}-{i}")).collect::<Vec<_>>());
    }
    let (per_phone, global) = handler.max_in_flight();
    assert_eq!(per_phone, 1, "a phone had two turns in flight");
    assert!(global > 1 && global <= 32, "max_concurrent bounds the turns in flight: {global}");
    std::sync::Arc::into_inner(d).unwrap().stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_immediate_webhook_skips_debounce_but_never_overlaps_a_phone() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(5 * S).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    let t0 = Instant::now();
    for i in 0..3 {
        let body = json!({"id": format!("i{i}"), "from": "79005550000@c.us", "message": format!("now {i}")});
        assert_eq!(d.post("/webhook/whatsapp", &body).await.0, 200);
    }
    wait_until("first turn", 5 * S, || !handler.calls().is_empty()).await;
    assert!(handler.calls()[0].started - t0 < Duration::from_millis(100), "no debounce");
    wait_until("both turns done", 30 * S, || {
        let c = handler.calls();
        c.len() == 2 && c[1].ended.is_some()
    })
    .await;
    let calls = handler.calls();
    assert_eq!(calls[0].ids, ["i0"]);
    // The two cut while turn 1 ran were merged into the phone's next batch.
    assert_eq!(calls[1].ids, ["i1", "i2"]);
    assert!(calls[1].started >= calls[0].ended.unwrap());
    assert_eq!(calls[1].seen_count, 1);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pending_batches_are_visible_with_their_timers() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    d.send("v1", "79001112233", "Привет").await;
    sleep(4 * S).await;
    d.send("v2", "79001112233", "можно").await;
    sleep(S).await;
    let (status, body) = d.get("/api/batches").await;
    assert_eq!(status, 200);
    let b = &body["batches"][0];
    assert_eq!((b["phone"].as_str(), b["state"].as_str()), (Some("79001112233"), Some("collecting")));
    assert_eq!(b["messages"].as_array().unwrap().len(), 2);
    assert_eq!(b["messages"][1]["text"], "можно");
    assert_eq!(b["age_ms"], 5000);
    assert_eq!(b["fires_in_ms"], 9000);

    // The echo handler answers once the batch fires.
    sleep(10 * S).await;
    let (_, conv) = d.get("/api/conversations/+79001112233").await;
    assert_eq!(conv["turns"][0]["reply"], "received: Привет\nможно");
    let (_, body) = d.get("/api/batches").await;
    assert_eq!(body["batches"], json!([]));
    d.stop().await;
}
