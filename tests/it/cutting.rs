//! The adaptive cut policy end to end, on tokio's paused clock: WAHA's
//! presence holds a batch while the client types and releases it once they
//! have been silent longer than clients take to go on (a `paused` between
//! fragments is not the end); presence alone is never a message or a turn;
//! without presence the learned gaps set the window. The restart policy:
//! late messages (and typing) restart a turn whose handler has not
//! answered, the abandoned turn's messages first, one reply in the end.
//! (The fixed policy's tests are `batching.rs`, unchanged; the corpus
//! family's bar is `replay.rs`.)

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

/// The resume window a fresh daemon with `c` starts with (the prior's).
fn prior_resume(c: &turnstile::Config) -> f64 {
    turnstile::batcher::Batcher::<u8>::new(c.batching.rules()).windows(&0).resume.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn typing_holds_the_batch_and_silence_longer_than_the_resume_window_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = adaptive(dir.path());
    let (window, ttl) = (prior_resume(&c), c.batching.typing_ttl_ms as f64 / 1000.0);
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
    wait(window - 0.3).await;
    assert!(turns(&d).await.is_empty(), "not before the silence outlasted the window");
    wait(0.6).await;
    let t = turns(&d).await;
    assert_eq!(t.len(), 1, "one turn for the whole thought");
    assert_eq!(t[0]["text"], "Привет\nхочу записаться на стрижку");
    assert_eq!(t[0]["cut_reason"], "paused");
    let metrics = d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_cuts_total{reason=\"paused\"} 1\n"), "{metrics}");
    d.stop().await;
}

/// The case, under the shipped defaults: WhatsApp reports `paused`
/// between two fragments of one request; typing resumes 3 s later.
#[tokio::test(start_paused = true)]
async fn under_the_defaults_a_paused_between_fragments_does_not_split_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = turnstile::Config::default();
    let test = config(dir.path());
    (c.server, c.log) = (test.server, test.log);
    c.waha.sessions = HashMap::from([("salon".into(), "962302".into())]);
    let d = Daemon::start(c).await;
    presence(&d, "typing").await;
    wait(1.0).await;
    message(&d, "p1", "Добрый день").await;
    presence(&d, "paused").await;
    wait(3.0).await;
    presence(&d, "typing").await;
    wait(2.5).await;
    message(&d, "p2", "можно на стрижку в субботу?").await;
    wait(0.4).await;
    presence(&d, "paused").await;
    wait(60.0).await;
    let t = turns(&d).await;
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0]["text"], "Добрый день\nможно на стрижку в субботу?");
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
    // A presence this build does not know is no message either: it waits in
    // the quarantine (an authenticated delivery is never refused 4xx).
    let bad = json!({"event": "presence.update", "session": "salon", "payload": {
        "id": format!("{PHONE}@c.us"), "presences": [{"lastKnownPresence": "dancing"}]}});
    let (status, answer) = d.post("/webhook/waha", &bad).await;
    assert_eq!((status, &answer["status"]), (200, &json!("quarantined")), "{answer}");
    let held = d.get("/api/quarantine").await.1;
    assert!(held["quarantine"][0]["reason"].as_str().unwrap().contains("dancing"), "{held}");
    assert_eq!(pending(&d).await, 0);
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

/// Without presence: a client whose lines come 12 s apart — longer than
/// the prior window — is cut early once; the line that came back teaches
/// the window, and their next request stays one turn. Also after a restart.
#[tokio::test(start_paused = true)]
async fn without_presence_a_slow_typist_teaches_a_longer_window_which_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let slow = || {
        let mut c = config(dir.path());
        c.batching.policy = CutPolicy::Adaptive;
        c
    };
    let prior = turnstile::batcher::Batcher::<u8>::new(slow().batching.rules()).windows(&0).gap;
    assert!(prior < Duration::from_secs(12), "{prior:?}");
    let d = Daemon::start(slow()).await;
    d.send("s1", PHONE, "Добрый день").await;
    wait(12.0).await;
    d.send("s2", PHONE, "хочу записаться").await;
    wait(40.0).await;
    assert_eq!(turns(&d).await.len(), 2, "the prior window was too short for this client");
    // The next request: lines 12 s apart, one turn now.
    d.send("s3", PHONE, "и ещё").await;
    wait(12.0).await;
    d.send("s4", PHONE, "на окрашивание").await;
    wait(40.0).await;
    let t = turns(&d).await;
    assert_eq!(t.len(), 3, "{t:?}");
    let third = t.iter().find(|t| t["messages"][0]["id"] == "s3").expect("the third turn");
    assert_eq!(third["messages"].as_array().unwrap().len(), 2);
    assert_eq!(third["cut_reason"], "rhythm");
    d.stop().await;
    assert!(dir.path().join("rhythms").exists(), "saved at the stop");

    let d = Daemon::start(slow()).await;
    d.send("s5", PHONE, "и можно").await;
    wait(12.0).await;
    d.send("s6", PHONE, "к Анне").await;
    wait(40.0).await;
    let t = turns(&d).await;
    let after = t.iter().find(|t| t["messages"][0]["id"] == "s5").expect("the turn after the restart");
    assert_eq!(after["messages"].as_array().unwrap().len(), 2, "one batch: what was learned came back");
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

/// The case: a restartable turn runs with m01, then one Meta
/// delivery brings m02..m11 — more than a batch holds. The abandoned turn's
/// message goes first: [m01..m10] is the re-run, [m11] follows; one reply
/// per committed turn, none for the abandoned one.
#[tokio::test(start_paused = true)]
async fn a_full_delivery_during_a_restartable_turn_keeps_the_first_message_first() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_secs(20)).await;
    let gateway = FakeServer::start(|_| json!({"ok": true})).await;
    let mut c = config_with(dir.path(), &handler);
    http_gateway(&mut c, &gateway);
    c.turns.on_new_message = OnNewMessage::Restart;
    c.batching.debounce_ms = 2_000;
    c.meta.app_secret = crate::helpers::META_SECRET.into();
    c.meta.companies = HashMap::from([("1055".into(), "962302".into())]);
    let d = Daemon::start(c).await;
    let meta = |ids: std::ops::RangeInclusive<u32>| {
        let messages: Vec<Value> = ids
            .map(|i| {
                json!({"from": PHONE, "id": format!("m{i:02}"), "timestamp": "1763800000",
                            "type": "text", "text": {"body": format!("часть {i}")}})
            })
            .collect();
        json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{"field": "messages",
            "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1055"},
                      "contacts": [{"wa_id": PHONE}], "messages": messages}}]}]})
    };
    let post_meta = |body: Value| {
        let bytes = serde_json::to_vec(&body).unwrap();
        let sig = format!(
            "sha256={}",
            turnstile::ingest::signature::sign_hex(crate::helpers::META_SECRET, &bytes, false)
        );
        d.client
            .post(format!("{}/webhook/meta", d.base))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sig)
            .body(bytes)
            .send()
    };
    assert_eq!(post_meta(meta(1..=1)).await.unwrap().status(), 200);
    wait(3.0).await; // cut at 2 s; the handler takes 20 s
    assert_eq!(handler.calls().len(), 1);
    assert_eq!(post_meta(meta(2..=11)).await.unwrap().status(), 200);
    wait_until("two replies", Duration::from_secs(300), || gateway.delivered("/send").len() >= 2).await;
    wait(60.0).await;

    let calls = handler.calls();
    let inputs: Vec<Vec<String>> = calls.iter().map(|c| c.ids.clone()).collect();
    let ids = |r: std::ops::RangeInclusive<u32>| r.map(|i| format!("m{i:02}")).collect::<Vec<_>>();
    assert_eq!(inputs, [ids(1..=1), ids(1..=10), ids(11..=11)], "the abandoned message first, then in order");
    let t = turns(&d).await;
    let committed: Vec<Vec<&str>> = t
        .iter()
        .map(|t| t["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect())
        .collect();
    assert_eq!(committed.len(), 2, "{committed:?}");
    assert!(committed.iter().any(|c| c.first() == Some(&"m01") && c.len() == 10), "{committed:?}");
    let sent = gateway.delivered("/send");
    assert_eq!(sent.len(), 2, "one reply per committed turn: {sent:?}");
    let replied: Vec<&str> = sent.iter().map(|s| s.body["turn_id"].as_str().unwrap()).collect();
    assert_eq!(replied, [calls[1].turn_id.as_str(), calls[2].turn_id.as_str()], "m01's turn answered first");
    assert!(!replied.contains(&calls[0].turn_id.as_str()), "never a reply for the abandoned turn");
    d.stop().await;
}

/// Under the adaptive policy a client typing again before the answer
/// restarts the turn too: its message waits, held, in a pending batch
/// (`/api/batches` names the rule), and the rest of the request joins it.
#[tokio::test(start_paused = true)]
async fn typing_during_a_restartable_turn_takes_it_back_until_the_client_has_written() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_secs(20)).await;
    let gateway = FakeServer::start(|_| json!({"ok": true})).await;
    let mut c = adaptive(dir.path());
    c.handler.kind = turnstile::config::HandlerKind::Http;
    c.handler.url = handler.url.clone();
    http_gateway(&mut c, &gateway);
    c.waha.allow_unauthenticated = true;
    c.turns.on_new_message = OnNewMessage::Restart;
    let d = Daemon::start(c).await;
    presence(&d, "typing").await;
    message(&d, "k1", "Добрый день").await;
    wait(10.0).await; // silent past the resume window: cut; the handler takes 20 s
    assert_eq!(handler.calls().len(), 1);
    presence(&d, "typing").await;
    wait(1.0).await;
    let (_, batches) = d.get("/api/batches").await;
    assert_eq!(batches["batches"][0]["rule"], "typing_stale", "{batches}");
    assert_eq!(batches["cutting"]["policy"], "adaptive");
    message(&d, "k2", "хочу записаться на маникюр").await;
    wait_until("the reply", Duration::from_secs(300), || !gateway.delivered("/send").is_empty()).await;
    wait(60.0).await;
    let inputs: Vec<Vec<String>> = handler.calls().iter().map(|c| c.ids.clone()).collect();
    assert_eq!(inputs, [vec!["k1"], vec!["k1", "k2"]]);
    assert_eq!(gateway.delivered("/send").len(), 1, "one reply for the request");
    assert_eq!(turns(&d).await.len(), 1);
    d.stop().await;
}
