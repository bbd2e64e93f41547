//! What the client actually received: Meta's `statuses[]`, WAHA's
//! `message.ack` and Evolution's `messages.update` (payloads from
//! `tests/fixtures/`), matched to our sends by the id the gateway gave back;
//! a failure after sending is an outcome (back in line, or parked); Meta's
//! 24-hour window known in advance; the typing indicator kept up for the
//! whole turn.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use turnstile::config::{GatewayKind, HandlerKind};

use crate::helpers::*;

const PHONE: &str = "79001234567";
const S: Duration = Duration::from_secs(1);

async fn sleep(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

fn meta_config(dir: &Path, graph: &FakeServer, handler: &TestHandler) -> turnstile::Config {
    let mut c = config(dir);
    c.handler.kind = HandlerKind::Http;
    c.handler.url = handler.url.clone();
    c.gateway.kind = GatewayKind::Meta;
    c.gateway.url = graph.base.clone();
    c.gateway.access_token = "EAAG-test".into();
    c.gateway.typing = false;
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.meta.app_secret = META_SECRET.into();
    c.meta.companies = HashMap::from([("1055".into(), "962302".into())]);
    c
}

fn evolution_config(dir: &Path, evo: &FakeServer, handler: &TestHandler) -> turnstile::Config {
    let mut c = config(dir);
    c.handler.kind = HandlerKind::Http;
    c.handler.url = handler.url.clone();
    c.gateway.kind = GatewayKind::Evolution;
    c.gateway.url = evo.base.clone();
    c.gateway.api_key = "evolution-global-key".into();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.evolution.allow_unauthenticated = true;
    c.evolution.instances = HashMap::from([("turnstile-main".into(), "962302".into())]);
    c
}

fn meta_message(id: &str, text: &str, sent_s_ago: u64) -> Value {
    let ts = (turnstile::message::unix_ms() / 1000 - sent_s_ago).to_string();
    json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{"field": "messages",
        "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1055"},
                  "contacts": [{"wa_id": PHONE}],
                  "messages": [{"from": PHONE, "id": id, "timestamp": ts, "type": "text", "text": {"body": text}}]}}]}]})
}

fn meta_status(id: &str, status: &str) -> Value {
    let mut v = fixture("meta/statuses.failed-131047.json");
    let st = &mut v["entry"][0]["changes"][0]["value"]["statuses"][0];
    st["id"] = json!(id);
    st["status"] = json!(status);
    if status != "failed" {
        st.as_object_mut().unwrap().remove("errors");
    }
    v
}

/// Texts the Graph stand-in was asked to send, and templates.
fn sends(graph: &FakeServer) -> (Vec<String>, usize) {
    let posts = graph.delivered("/1055/messages");
    let texts = posts
        .iter()
        .filter(|s| s.body["type"] == "text")
        .map(|s| s.body["text"]["body"].as_str().unwrap().to_owned())
        .collect();
    let templates = posts.iter().filter(|s| s.body["type"] == "template").count();
    (texts, templates)
}

async fn outbox_state(d: &Daemon) -> Vec<String> {
    let (_, o) = d.get("/api/outbox").await;
    o["outbox"].as_array().unwrap().iter().map(|i| i["state"].as_str().unwrap().to_owned()).collect()
}

async fn delivery(d: &Daemon) -> Value {
    let (_, conv) = d.get(&format!("/api/conversations/{PHONE}")).await;
    conv["turns"].as_array().and_then(|t| t.last()).map_or(Value::Null, |t| t["delivery"].clone())
}

#[tokio::test(start_paused = true)]
async fn meta_receipts_show_on_the_reply_survive_a_restart_and_a_late_131047_parks_it_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let graph =
        FakeServer::start(|_| json!({"messaging_product": "whatsapp", "messages": [{"id": "wamid.OUT1"}]}))
            .await;
    let d = Daemon::start(meta_config(dir.path(), &graph, &handler)).await;
    assert_eq!(post_meta(&d, &meta_message("wamid.C1", "Можно на завтра?", 5)).await, 200);
    sleep(15).await;
    wait_until("the reply", 10 * S, || sends(&graph).0.len() == 1).await;
    wait_until("its receipt", 10 * S, || true).await;
    assert_eq!(delivery(&d).await[0]["state"], "sent");
    assert_eq!(post_meta(&d, &meta_status("wamid.OUT1", "delivered")).await, 200);
    assert_eq!(post_meta(&d, &meta_status("wamid.OUT1", "read")).await, 200);
    let shown = delivery(&d).await;
    assert_eq!(shown[0]["state"], "read", "{shown}");
    assert!(shown[0]["delivered_at"].is_u64() && shown[0]["read_at"].is_u64(), "{shown}");
    // A receipt for no message of ours is counted, not an error.
    assert_eq!(post_meta(&d, &meta_status("wamid.NOT-OURS", "read")).await, 200);
    let metrics = d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_receipts_total{state=\"read\"} 1\n"), "{metrics}");
    assert!(metrics.contains("turnstile_receipts_total{state=\"unknown\"} 1\n"), "{metrics}");
    d.stop().await;

    // A restart keeps what was recorded.
    let d = Daemon::start(meta_config(dir.path(), &graph, &handler)).await;
    assert_eq!(delivery(&d).await[0]["state"], "read");
    // Meta later says the reply failed: outside the window. It is parked,
    // never sent again.
    assert_eq!(post_meta(&d, &meta_status("wamid.OUT1", "failed")).await, 200);
    sleep(30).await;
    assert_eq!(outbox_state(&d).await, ["outside_window"]);
    assert_eq!(sends(&graph).0.len(), 1, "not sent again");
    let shown = delivery(&d).await;
    assert_eq!(shown[0]["failed"]["code"], 131047, "{shown}");
    let metrics = d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_delivery_failures_total{code=\"131047\"} 1\n"), "{metrics}");
    assert!(metrics.contains("turnstile_outbox_outside_window 1\n"), "{metrics}");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn with_a_template_a_closed_window_sends_it_once_and_the_reply_waits_for_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    // Meta refuses free-form text outside the window at once (400, 131047).
    let graph = FakeServer::start(|body| {
        if body["type"] == "text" && body["text"]["body"].as_str().is_some_and(|t| t.starts_with("turn 1")) {
            json!({"__status": 400, "error": {"message": "(#131047) Re-engagement message", "code": 131047,
                             "error_data": {"messaging_product": "whatsapp", "details": "Message failed to send because more than 24 hours have passed since the customer last replied to this number."}}})
        } else {
            json!({"messaging_product": "whatsapp", "messages": [{"id": "wamid.OUT"}]})
        }
    })
    .await;
    let mut c = meta_config(dir.path(), &graph, &handler);
    c.meta.reengagement_template = "booking_followup".into();
    c.meta.reengagement_language = "ru".into();
    c.gateway.window_hours = 0; // only what Meta says
    let d = Daemon::start(c).await;
    assert_eq!(post_meta(&d, &meta_message("wamid.C1", "Здравствуйте", 5)).await, 200);
    sleep(15).await;
    wait_until("the template", 10 * S, || sends(&graph).1 == 1).await;
    sleep(30).await;
    assert_eq!(sends(&graph).1, 1, "the template went once");
    assert_eq!(outbox_state(&d).await, ["awaiting_client"]);
    let posted = graph.seen().into_iter().find(|s| s.body["type"] == "template").unwrap();
    assert_eq!(posted.body["template"], json!({"name": "booking_followup", "language": {"code": "ru"}}));
    // The client answers the template: the waiting reply goes out (the
    // window is open again: Meta takes it now).
    let refused_before = graph.seen().iter().filter(|s| s.status == 400).count();
    assert_eq!(post_meta(&d, &meta_message("wamid.C2", "Да, актуально", 0)).await, 200);
    wait_until("the waiting reply tried again", 30 * S, || {
        graph.seen().iter().filter(|s| s.status == 400).count() > refused_before
    })
    .await;
    assert_eq!(sends(&graph).1, 1, "no second template while a reply waits");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reply_to_a_client_who_wrote_25_hours_ago_is_parked_without_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let graph = FakeServer::start(|_| json!({"messages": [{"id": "wamid.OUT"}]})).await;
    let d = Daemon::start(meta_config(dir.path(), &graph, &handler)).await;
    // Meta redelivers for days: the message's own time is what counts.
    assert_eq!(
        post_meta(&d, &meta_message("wamid.OLD", "Вы работаете в воскресенье?", 25 * 3600)).await,
        200
    );
    sleep(30).await;
    assert_eq!(handler.calls().len(), 1, "the turn ran");
    assert_eq!(outbox_state(&d).await, ["outside_window"]);
    assert!(graph.seen().iter().all(|s| s.body["type"] != "text"), "no send attempt");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn waha_acks_and_evolution_updates_show_on_the_reply() {
    // WAHA NOWEB: sendText answers the raw key; acks name it in the long form.
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let waha = FakeServer::start(|body| {
        if body["text"].is_null() {
            return json!({});
        }
        json!({"key": {"remoteJid": format!("{PHONE}@s.whatsapp.net"), "fromMe": true, "id": "3EB0C4D5E6F708192A3B4C"}})
    })
    .await;
    let mut c = config(dir.path());
    c.handler.kind = HandlerKind::Http;
    c.handler.url = handler.url.clone();
    c.gateway.kind = GatewayKind::Waha;
    c.gateway.url = waha.base.clone();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.waha.allow_unauthenticated = true;
    c.waha.sessions = HashMap::from([("default".into(), "962302".into())]);
    let d = Daemon::start(c).await;
    let (status, _) = d.post("/webhook/waha", &fixture("waha/noweb/message.pn.json")).await;
    assert_eq!(status, 200);
    sleep(15).await;
    wait_until("the reply", 10 * S, || !waha.delivered("/api/sendText").is_empty()).await;
    assert!(!waha.delivered("/api/sendSeen").is_empty(), "the client's message marked read");
    let (status, answer) = d.post("/webhook/waha", &fixture("waha/noweb/message-ack.read.json")).await;
    assert_eq!((status, &answer["status"]), (200, &json!("receipt")), "{answer}");
    assert_eq!(delivery(&d).await[0]["state"], "read");
    d.stop().await;

    // Evolution: the WhatsApp id is `keyId` (`messageId` is Evolution's own).
    let dir = tempfile::tempdir().unwrap();
    let evo =
        FakeServer::start(|_| json!({"key": {"id": "3EB0C4D5E6F708192A3B4C"}, "status": "PENDING"})).await;
    let d = Daemon::start(evolution_config(dir.path(), &evo, &handler)).await;
    d.post("/webhook/evolution", &fixture("evolution/messages-upsert.pn-conversation.json")).await;
    sleep(15).await;
    wait_until("the reply", 10 * S, || !evo.delivered("/message/sendText/turnstile-main").is_empty()).await;
    assert!(!evo.delivered("/chat/markMessageAsRead/turnstile-main").is_empty(), "marked read");
    let (status, answer) =
        d.post("/webhook/evolution", &fixture("evolution/messages-update.read.json")).await;
    assert_eq!((status, &answer["status"]), (200, &json!("receipt")), "{answer}");
    assert_eq!(delivery(&d).await[0]["state"], "read");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_long_handler_call_keeps_typing_every_20_s_and_stops_with_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_secs(59)).await;
    let waha = FakeServer::start(|_| json!({"key": {"id": "3EB0OUT"}})).await;
    let mut c = config(dir.path());
    c.handler.kind = HandlerKind::Http;
    c.handler.url = handler.url.clone();
    c.gateway.kind = GatewayKind::Waha;
    c.gateway.url = waha.base.clone();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.waha.allow_unauthenticated = true;
    let d = Daemon::start(c).await;
    d.post("/webhook/waha", &fixture("waha/noweb/message.pn.json")).await;
    sleep(11).await; // cut at 10 s: typing now, then at 20 and 40 s; the answer at 60 s
    sleep(30).await;
    assert_eq!(waha.delivered("/api/startTyping").len(), 2, "at 0 and 20 s");
    sleep(40).await;
    assert_eq!(waha.delivered("/api/startTyping").len(), 3, "and 40 s; the handler answered at 59 s");
    assert_eq!(waha.delivered("/api/stopTyping").len(), 1);
    sleep(120).await;
    assert_eq!(waha.delivered("/api/startTyping").len(), 3, "none after the commit");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn evolution_keeps_composing_for_the_whole_turn_and_pauses_after_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_secs(45)).await;
    let evo = FakeServer::start(|_| json!({"key": {"id": "3EB0OUT"}, "status": "PENDING"})).await;
    let d = Daemon::start(evolution_config(dir.path(), &evo, &handler)).await;
    d.post("/webhook/evolution", &fixture("evolution/messages-upsert.pn-conversation.json")).await;
    sleep(11).await; // cut at 10 s: composing now, at 20 and 40 s; the answer at 55 s
    sleep(60).await;
    let presence: Vec<(String, u64)> = evo
        .delivered("/chat/sendPresence/turnstile-main")
        .iter()
        .map(|s| (s.body["presence"].as_str().unwrap().to_owned(), s.body["delay"].as_u64().unwrap()))
        .collect();
    // Each "composing" lasts until just before the next one (Evolution
    // says "paused" itself after `delay`); ours ends it after the commit.
    let composing = ("composing".to_owned(), 19_000);
    assert_eq!(presence, [composing.clone(), composing.clone(), composing, ("paused".to_owned(), 0)]);
    sleep(120).await;
    assert_eq!(evo.delivered("/chat/sendPresence/turnstile-main").len(), 4, "none after the commit");
    assert_eq!(evo.delivered("/message/sendText/turnstile-main").len(), 1);
    d.stop().await;
}
