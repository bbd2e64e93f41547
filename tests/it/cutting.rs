//! The adaptive cut policy end to end, on tokio's paused clock: WAHA's
//! presence holds a batch while the client types and releases it once they
//! stop; presence alone is never a message or a turn; without presence a
//! conversation's own rhythm sets its window. And the restart policy: late
//! messages restart a turn whose handler has not answered, one reply in the
//! end. (The fixed policy's tests are `batching.rs`, unchanged.)

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{config, config_with, http_gateway, wait_until, Daemon, FakeServer, TestHandler};
use turnstile::config::{CutPolicy, OnNewMessage};

const PHONE: &str = "79001234567";

fn adaptive(dir: &std::path::Path) -> turnstile::Config {
    let mut c = config(dir);
    c.batching.policy = CutPolicy::Adaptive;
    c.waha.sessions = HashMap::from([("salon".into(), "962302".into())]);
    c
}

async fn waha(d: &Daemon, body: Value) -> Value {
    let (status, answer) = d.post("/webhook/waha", &body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn message(d: &Daemon, id: &str, text: &str) {
    let body = json!({"event": "message", "session": "salon", "payload": {
        "id": id, "from": format!("{PHONE}@c.us"), "fromMe": false, "body": text, "hasMedia": false}});
    assert_eq!(waha(d, body).await["status"], "accepted");
}

async fn presence(d: &Daemon, state: &str) {
    let body = json!({"event": "presence.update", "session": "salon", "payload": {
        "id": format!("{PHONE}@c.us"),
        "presences": [{"participant": format!("{PHONE}@c.us"), "lastKnownPresence": state, "lastSeen": null}]}});
    assert_eq!(waha(d, body).await, json!({"status": "presence"}));
}

async fn turns(d: &Daemon) -> Vec<Value> {
    let (status, conv) = d.get(&format!("/api/conversations/{PHONE}")).await;
    assert_eq!(status, 200);
    conv["turns"].as_array().unwrap().clone()
}

async fn pending(d: &Daemon) -> usize {
    d.get("/api/batches").await.1["batches"].as_array().unwrap().len()
}

/// Lets the paused clock run `secs` (the daemon's timers fire on the way).
async fn wait(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

#[tokio::test(start_paused = true)]
async fn typing_holds_the_batch_and_stopping_releases_it_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let c = adaptive(dir.path());
    let (grace, ttl) = (c.batching.paused_grace_ms as f64 / 1000.0, c.batching.typing_ttl_ms as f64 / 1000.0);
    let d = Daemon::start(c).await;

    message(&d, "w1", "Привет").await;
    presence(&d, "typing").await;
    // Typing, refreshed, for longer than any quiet window: held.
    for _ in 0..3 {
        wait(ttl - 2.0).await;
        presence(&d, "typing").await;
    }
    assert_eq!(pending(&d).await, 1, "held while the client types");
    assert!(turns(&d).await.is_empty());
    message(&d, "w2", "хочу записаться на стрижку").await;
    presence(&d, "recording").await;
    wait(1.0).await;
    presence(&d, "paused").await;
    wait(grace - 0.3).await;
    assert!(turns(&d).await.is_empty(), "not before the grace is over");
    wait(0.6).await;
    let t = turns(&d).await;
    assert_eq!(t.len(), 1, "one turn for the whole thought");
    assert_eq!(t[0]["text"], "Привет\nхочу записаться на стрижку");
    assert_eq!(t[0]["cut_reason"], "paused");
    let metrics = d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_cuts_total{reason=\"paused\"} 1\n"), "{metrics}");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_typing_indicator_that_goes_quiet_releases_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let c = adaptive(dir.path());
    let ttl = c.batching.typing_ttl_ms as f64 / 1000.0;
    let d = Daemon::start(c).await;
    message(&d, "q1", "записаться").await;
    presence(&d, "typing").await;
    wait(ttl - 0.5).await;
    assert!(turns(&d).await.is_empty());
    wait(1.0).await;
    let t = turns(&d).await;
    assert_eq!((t.len(), t[0]["cut_reason"].as_str()), (1, Some("typing_stale")));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn presence_alone_is_never_stored_never_a_message_and_never_a_turn() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(adaptive(dir.path())).await;
    for state in ["typing", "paused", "online", "recording", "offline"] {
        presence(&d, state).await;
    }
    wait(120.0).await;
    assert_eq!(pending(&d).await, 0);
    assert!(turns(&d).await.is_empty());
    let metrics = d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_messages_stored_total 0\n"), "{metrics}");
    // Bad presence is refused like any bad input, and stores nothing either.
    let bad = json!({"event": "presence.update", "session": "salon", "payload": {
        "id": format!("{PHONE}@c.us"), "presences": [{"lastKnownPresence": "dancing"}]}});
    let (status, answer) = d.post("/webhook/waha", &bad).await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("dancing"));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn under_the_fixed_policy_presence_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = adaptive(dir.path());
    c.batching.policy = CutPolicy::Fixed;
    let debounce = c.batching.debounce_ms as f64 / 1000.0;
    let d = Daemon::start(c).await;
    message(&d, "f1", "Привет").await;
    presence(&d, "typing").await;
    wait(1.0).await;
    presence(&d, "paused").await;
    wait(debounce - 1.5).await;
    assert!(turns(&d).await.is_empty(), "the fixed window, whatever presence says");
    wait(1.0).await;
    assert_eq!(turns(&d).await[0]["cut_reason"], "quiet");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn without_presence_a_slow_typist_gets_a_longer_window_once_it_has_shown_its_rhythm() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.batching.policy = CutPolicy::Adaptive;
    let d = Daemon::start(c).await;
    // The prior window (3 s x 3 = 9 s): a line, then the next 7 s later, is one batch.
    d.send("s1", PHONE, "Добрый день").await;
    wait(7.0).await;
    d.send("s2", PHONE, "хочу записаться").await;
    wait(7.0).await;
    d.send("s3", PHONE, "на окрашивание").await;
    // Learned: gaps of 7 s make a 21 s window (20 s: max_quiet); 12 s of quiet do not cut it.
    wait(12.0).await;
    assert!(turns(&d).await.is_empty(), "the window grew with the client's rhythm");
    d.send("s4", PHONE, "в субботу").await;
    wait(22.0).await;
    let t = turns(&d).await;
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0]["cut_reason"], "rhythm");
    assert_eq!(t[0]["messages"].as_array().unwrap().len(), 4);
    d.stop().await;
}

/// The README's replay figures, held to the bar on the shipped corpus.
#[test]
fn on_the_shipped_corpus_adaptive_answers_sooner_and_splits_no_more_requests() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/corpus/trace.jsonl.gz");
    let events = turnstile::replay::read(&corpus).unwrap();
    let mut c = turnstile::config::BatchingConfig { policy: CutPolicy::Fixed, ..Default::default() };
    let fixed = turnstile::replay::run(&events, c.rules());
    c.policy = CutPolicy::Adaptive;
    let adaptive = turnstile::replay::run(&events, c.rules());
    let p50 = |r: &Value, part: &str| r[part]["wait_after_last_ms"]["p50"].as_u64().unwrap();
    assert!(p50(&fixed, "with_presence") >= 10_000 && p50(&fixed, "without_presence") >= 10_000);
    assert!(p50(&adaptive, "with_presence") <= 3_000, "{adaptive}");
    assert!(p50(&adaptive, "without_presence") <= 6_000, "{adaptive}");
    let (thoughts, split) = (fixed["thoughts"].as_u64().unwrap(), fixed["split_thoughts"].as_u64().unwrap());
    assert_eq!(adaptive["thoughts"].as_u64().unwrap(), thoughts);
    assert!(adaptive["split_thoughts"].as_u64().unwrap() <= split + thoughts / 100, "{adaptive}\n{fixed}");
    assert_eq!(adaptive["messages"], fixed["messages"], "every message in a turn");
}

#[tokio::test(start_paused = true)]
async fn a_learned_rhythm_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let adaptive = || {
        let mut c = config(dir.path());
        c.batching.policy = CutPolicy::Adaptive;
        c
    };
    let d = Daemon::start(adaptive()).await;
    // A slow typist: 8 s between lines, learned as they write.
    for (i, text) in ["Добрый день", "хочу записаться", "на окрашивание"].iter().enumerate()
    {
        d.send(&format!("b{i}"), PHONE, text).await;
        wait(8.0).await;
    }
    wait(30.0).await;
    assert_eq!(turns(&d).await.len(), 1);
    d.stop().await;
    assert!(dir.path().join("rhythms").exists(), "saved at the stop");

    let d = Daemon::start(adaptive()).await;
    // 12 s between two lines: past the prior window (9 s), within the learned one.
    d.send("c1", PHONE, "и ещё").await;
    wait(12.0).await;
    d.send("c2", PHONE, "можно в субботу").await;
    wait(40.0).await;
    let t = turns(&d).await;
    assert_eq!(t.len(), 2, "{t:?}");
    let last = t.iter().find(|t| t["messages"][0]["id"] == "c1").expect("the turn after the restart");
    assert_eq!(last["messages"].as_array().unwrap().len(), 2, "one batch: the rhythm came back");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn late_messages_restart_a_slow_turn_and_one_reply_answers_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_secs(30)).await;
    let gateway = FakeServer::start(|_| json!({"ok": true})).await;
    let mut c = config_with(dir.path(), &handler);
    http_gateway(&mut c, &gateway);
    c.turns.on_new_message = OnNewMessage::Restart;
    c.batching.debounce_ms = 2_000;
    let d = Daemon::start(c).await;

    d.send("r1", PHONE, "Привет").await;
    wait(3.0).await; // cut at 2 s: the turn runs, its handler takes 30 s
    assert_eq!(handler.calls().len(), 1);
    d.send("r2", PHONE, "можно на стрижку").await; // restarts it
    wait(4.0).await; // cut again with both: a second call
    d.send("r3", PHONE, "завтра?").await; // restarts that one too
    wait_until("the reply", Duration::from_secs(120), || !gateway.delivered("/send").is_empty()).await;
    wait(60.0).await;

    let calls = handler.calls();
    let inputs: Vec<Vec<String>> = calls.iter().map(|c| c.ids.clone()).collect();
    assert_eq!(
        inputs,
        [vec!["r1"], vec!["r1", "r2"], vec!["r1", "r2", "r3"]],
        "each restart sees every message"
    );
    let turn_ids: std::collections::HashSet<&str> = calls.iter().map(|c| c.turn_id.as_str()).collect();
    assert_eq!(
        turn_ids.len(),
        3,
        "a restarted turn runs under a new id: the handler never sees one id with other input"
    );
    let sent = gateway.delivered("/send");
    assert_eq!(sent.len(), 1, "one reply for the burst: {sent:?}");
    assert_eq!(sent[0].body["turn_id"], calls[2].turn_id);
    let t = turns(&d).await;
    assert_eq!(t.len(), 1, "{t:?}");
    let ids: Vec<&str> =
        t[0]["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["r1", "r2", "r3"], "every message, once");
    let (_, conv) = d.get(&format!("/api/conversations/{PHONE}")).await;
    assert_eq!(conv["open_turns"], json!([]), "the restarted turns left nothing open");
    let metrics = d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_turn_restarts_total 2\n"), "{metrics}");
    d.stop().await;

    // A restart leaves nothing to re-run: the next start finds no open turn.
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    wait(60.0).await;
    assert_eq!(handler.calls().len(), 3, "nothing re-ran");
    assert_eq!(turns(&d).await.len(), 1);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_turn_whose_handler_answered_is_not_restarted_by_a_late_message() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_secs(5)).await;
    let gateway = FakeServer::start(|_| json!({"ok": true})).await;
    let mut c = config_with(dir.path(), &handler);
    http_gateway(&mut c, &gateway);
    c.turns.on_new_message = OnNewMessage::Restart;
    c.batching.debounce_ms = 1_000;
    let (d, faults) = Daemon::start_with_faults(c).await;
    // The handler answers at 6 s, but the commit fails: the answered turn
    // stays in its conversation's slot (retried first, same id) while a
    // message comes. It must not be restarted: it queues.
    faults.set_commits_failing(true);
    d.send("a1", PHONE, "Привет").await;
    wait(6.3).await;
    d.send("a2", PHONE, "и ещё вопрос").await;
    faults.set_commits_failing(false);
    wait_until("two replies", Duration::from_secs(120), || gateway.delivered("/send").len() >= 2).await;
    wait(30.0).await;
    let calls = handler.calls();
    let inputs: Vec<Vec<String>> = calls.iter().map(|c| c.ids.clone()).collect();
    assert_eq!(inputs.last().unwrap(), &vec!["a2".to_owned()], "a2 in a turn of its own: {inputs:?}");
    assert!(inputs[..inputs.len() - 1].iter().all(|i| i == &vec!["a1".to_owned()]), "{inputs:?}");
    let first_ids: std::collections::HashSet<&str> =
        calls[..calls.len() - 1].iter().map(|c| c.turn_id.as_str()).collect();
    assert_eq!(first_ids.len(), 1, "the answered turn kept its id: {first_ids:?}");
    assert_eq!(gateway.delivered("/send").len(), 2, "one reply per turn");
    let metrics = d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_turn_restarts_total 0\n"), "{metrics}");
    d.stop().await;
}
