//! Human takeover end to end, on tokio's paused clock, with payloads built
//! from the senders' own source (`tests/fixtures/`): staff answering from
//! the salon's phone — WAHA `message.any`, Evolution `fromMe`, Meta
//! coexistence's `smb_message_echoes` — pause the assistant in that
//! conversation; echoes of turnstile's own sends do not; a reply still on its
//! way is held back; the assistant comes back after the staff's silence, on
//! the keyword or by the API, and its turn sees both sides.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use turnstile::config::{GatewayKind, HandlerKind};
use turnstile::ingest::signature::sign_hex;

use crate::helpers::*;

const PHONE: &str = "79001234567";
const S: Duration = Duration::from_secs(1);

async fn post_signed(
    d: &Daemon,
    path: &str,
    body: &Value,
    header: &str,
    secret: &str,
    sha512: bool,
) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let sig = sign_hex(secret, &bytes, sha512);
    let sig = if sha512 { sig } else { format!("sha256={sig}") };
    let mut req = d
        .client
        .post(format!("{}{path}", d.base))
        .header("content-type", "application/json")
        .header(header, sig);
    if sha512 {
        req = req.header("x-webhook-hmac-algorithm", "sha512");
    }
    let r = req.body(bytes).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn conversation(d: &Daemon) -> Value {
    d.get(&format!("/api/conversations/{PHONE}")).await.1
}

fn with_handler(c: &mut turnstile::Config, handler: &TestHandler) {
    c.handler.kind = HandlerKind::Http;
    c.handler.url = handler.url.clone();
}

async fn sleep(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

fn transcript(call: &Call) -> Vec<(String, String)> {
    call.transcript
        .as_array()
        .map(|t| {
            t.iter()
                .map(|e| (e["from"].as_str().unwrap().to_owned(), e["text"].as_str().unwrap().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// WAHA NOWEB: the message event for a client text, and `message.any`
/// for the salon's side (`source` as WAHA 2025.3+ sends it, or absent).
fn waha_client(id: &str, text: &str) -> Value {
    let mut v = fixture("waha/noweb/message.pn.json");
    v["payload"]["id"] = json!(format!("false_{PHONE}@c.us_{id}"));
    v["payload"]["body"] = json!(text);
    v
}

fn waha_ours(id: &str, text: &str, source: Option<&str>) -> Value {
    let mut v = fixture("waha/noweb/message-any.from-phone.json");
    v["payload"]["id"] = json!(format!("true_{PHONE}@c.us_{id}"));
    v["payload"]["body"] = json!(text);
    match source {
        Some(s) => v["payload"]["source"] = json!(s),
        None => {
            v["payload"].as_object_mut().unwrap().remove("source");
        }
    }
    v
}

#[tokio::test(start_paused = true)]
async fn waha_staff_pause_the_assistant_echoes_do_not_and_after_their_silence_one_turn_sees_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let n = counter.clone();
    // NOWEB's sendText answer: the raw key, the short id.
    let waha = FakeServer::start(move |body| {
        if body["text"].is_null() {
            return json!({}); // typing indicators
        }
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        json!({"key": {"remoteJid": format!("{PHONE}@s.whatsapp.net"), "fromMe": true, "id": format!("3EB0OUT{i}")}})
    })
    .await;
    let mut c = config(dir.path());
    with_handler(&mut c, &handler);
    c.gateway.kind = GatewayKind::Waha;
    c.gateway.url = waha.base.clone();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.waha.hmac_key = WAHA_KEY.into();
    c.waha.sessions = HashMap::from([("default".into(), "962302".into())]);
    let resume_after = c.takeover.resume_after_min * 60;
    let d = Daemon::start(c).await;
    let waha_post = |body: Value| {
        let d = &d;
        async move { post_signed(d, "/webhook/waha", &body, "x-webhook-hmac", WAHA_KEY, true).await }
    };

    assert_eq!(waha_post(waha_client("C1", "Привет, можно записаться?")).await.1["status"], "accepted");
    sleep(15).await;
    wait_until("the first reply", 10 * S, || !waha.delivered("/api/sendText").is_empty()).await;
    // WAHA echoes our reply on message.any: by its source, or — older WAHA,
    // no source — by the id our send got back. Neither pauses.
    assert_eq!(waha_post(waha_ours("3EB0OUT0", "turn 1 for 79001234567", None)).await.1["status"], "ignored");
    assert_eq!(
        waha_post(waha_ours("3EB0OUTX", "turn 1 for 79001234567", Some("api"))).await.1["status"],
        "ignored"
    );
    assert_eq!(conversation(&d).await["takeover"], json!([]), "no takeover from our own echo");

    // Staff answer from the salon's phone: the assistant steps aside.
    assert_eq!(
        waha_post(waha_ours("STAFF1", "Здравствуйте! Это администратор, сейчас посмотрю.", Some("app")))
            .await
            .1["status"],
        "staff"
    );
    let taken = conversation(&d).await;
    assert_eq!(taken["takeover"][0]["state"], "paused", "{taken}");
    assert_eq!(taken["takeover"][0]["paused"]["by"], "waha");
    sleep(2).await;
    assert_eq!(waha_post(waha_client("C2", "Спасибо, жду")).await.1["status"], "accepted");
    sleep(2).await;
    // Staff again without a source (older WAHA): not ours, so staff's.
    assert_eq!(
        waha_post(waha_ours("STAFF2", "Есть окно в субботу в 12:00", None)).await.1["status"],
        "staff"
    );
    sleep(2).await;
    assert_eq!(waha_post(waha_client("C3", "Да, подходит")).await.1["status"], "accepted");
    sleep(120).await;
    assert_eq!(handler.calls().len(), 1, "no turn while staff have the conversation");
    let (_, batches) = d.get("/api/batches").await;
    assert!(
        batches["batches"].as_array().unwrap().is_empty()
            || batches["batches"].as_array().unwrap().iter().all(|b| b["phone"] == PHONE),
        "{batches}"
    );
    let metrics = d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_takeovers_total{signal=\"waha\"} 1\n"), "{metrics}");
    assert!(metrics.contains("turnstile_paused_conversations 1\n"), "{metrics}");

    // Staff silent for resume_after_min: one turn with both sides, in order.
    sleep(resume_after).await;
    wait_until("the resumed turn", 10 * S, || handler.calls().len() == 2).await;
    let call = handler.calls()[1].clone();
    assert_eq!(call.ids, [format!("false_{PHONE}@c.us_C2"), format!("false_{PHONE}@c.us_C3")]);
    assert_eq!(
        transcript(&call),
        [
            ("staff".to_owned(), "Здравствуйте! Это администратор, сейчас посмотрю.".to_owned()),
            ("client".to_owned(), "Спасибо, жду".to_owned()),
            ("staff".to_owned(), "Есть окно в субботу в 12:00".to_owned()),
            ("client".to_owned(), "Да, подходит".to_owned()),
        ]
    );
    wait_until("the resumed turn's reply", 10 * S, || waha.delivered("/api/sendText").len() == 2).await;
    assert_eq!(conversation(&d).await["takeover"][0]["state"], "assistant");
    // The next turn does not see the staff messages again.
    waha_post(waha_client("C4", "И ещё вопрос")).await;
    sleep(15).await;
    wait_until("a third turn", 10 * S, || handler.calls().len() == 3).await;
    assert_eq!(handler.calls()[2].transcript, Value::Null);
    d.stop().await;
}

fn evolution(from_me: bool, id: &str, text: &str) -> Value {
    let mut v = fixture(if from_me {
        "evolution/messages-upsert.from-me-phone.json"
    } else {
        "evolution/messages-upsert.pn-conversation.json"
    });
    v["data"]["key"]["id"] = json!(id);
    v["data"]["message"] = json!({"conversation": text});
    v
}

#[tokio::test(start_paused = true)]
async fn evolution_staff_during_a_turn_hold_its_reply_back_and_the_keyword_resumes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_secs(20)).await;
    let evo = FakeServer::start(|_| json!({"key": {"id": "3EB0OUT"}, "status": "PENDING"})).await;
    let mut c = config(dir.path());
    with_handler(&mut c, &handler);
    c.gateway.kind = GatewayKind::Evolution;
    c.gateway.url = evo.base.clone();
    c.gateway.api_key = "evolution-global-key".into();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.evolution.api_key = "evolution-instance-token-0001".into();
    c.evolution.instances = HashMap::from([("turnstile-main".into(), "962302".into())]);
    let d = Daemon::start(c).await;
    let post = |body: Value| {
        let d = &d;
        async move {
            let r = d
                .client
                .post(format!("{}/webhook/evolution", d.base))
                .header("apikey", "evolution-instance-token-0001")
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(post(evolution(false, "E1", "Можно на стрижку завтра?")).await.1["status"], "accepted");
    sleep(12).await; // cut at 10 s: the handler takes 20 s
    assert_eq!(handler.calls().len(), 1);
    // Meanwhile the admin answers from the phone.
    assert_eq!(post(evolution(true, "STAFF1", "Запишу вас сама, минутку")).await.1["status"], "staff");
    sleep(60).await;
    let conv = conversation(&d).await;
    assert_eq!(conv["turns"].as_array().unwrap().len(), 1, "the turn finished and committed: {conv}");
    assert!(
        evo.delivered("/message/sendText/turnstile-main").is_empty(),
        "its reply never reached the client"
    );
    let (_, outbox) = d.get("/api/outbox").await;
    assert_eq!(outbox["outbox"][0]["state"], "suppressed", "{outbox}");
    let metrics = d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_replies_suppressed_total 1\n"), "{metrics}");
    let (_, context) = d.get(&format!("/api/contexts/962302/{PHONE}")).await;
    assert_eq!(context["dialogue"]["count"], 1, "the turn's context committed: {context}");

    // The keyword hands the conversation back at once, and is nobody's message.
    assert_eq!(post(evolution(true, "STAFF2", "  #BOT ")).await.1["status"], "staff");
    assert_eq!(conversation(&d).await["takeover"][0]["state"], "assistant");
    post(evolution(false, "E2", "А в субботу?")).await;
    sleep(35).await;
    wait_until("the next turn", 10 * S, || handler.calls().len() == 2).await;
    let call = handler.calls()[1].clone();
    let said = transcript(&call);
    assert_eq!(
        said,
        [
            ("staff".to_owned(), "Запишу вас сама, минутку".to_owned()),
            ("client".to_owned(), "А в субботу?".to_owned())
        ]
    );
    assert!(!call.text.contains("#BOT") && !call.transcript.to_string().to_lowercase().contains("#bot"));
    wait_until("its reply", 30 * S, || evo.delivered("/message/sendText/turnstile-main").len() == 1).await;
    d.stop().await;
}

fn meta_echo(id: &str, text: &str) -> Value {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{"field": "smb_message_echoes",
        "value": {"messaging_product": "whatsapp", "metadata": {"display_phone_number": "74950000000", "phone_number_id": "1055"},
                  "message_echoes": [{"from": "74950000000", "to": format!("+{PHONE}"), "id": id,
                                      "timestamp": "1763800100", "type": "text", "text": {"body": text}}]}}]}]})
}

fn meta_message(id: &str, text: &str) -> Value {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{"field": "messages",
        "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1055"},
                  "contacts": [{"wa_id": PHONE}],
                  "messages": [{"from": PHONE, "id": id, "timestamp": "1763800000", "type": "text", "text": {"body": text}}]}}]}]})
}

#[tokio::test(start_paused = true)]
async fn meta_coexistence_echoes_pause_a_restart_keeps_the_pause_and_the_api_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let graph = FakeServer::start(|_| json!({"messages": [{"id": "wamid.OUT"}]})).await;
    let meta = |dir: &Path| {
        let mut c = config(dir);
        with_handler(&mut c, &handler);
        c.gateway.kind = GatewayKind::Meta;
        c.gateway.url = graph.base.clone();
        c.gateway.access_token = "EAAG-test".into();
        c.ingest.webhook_token = WEBHOOK_TOKEN.into();
        c.meta.app_secret = META_SECRET.into();
        c.meta.companies = HashMap::from([("1055".into(), "962302".into())]);
        c
    };
    let d = Daemon::start(meta(dir.path())).await;
    assert_eq!(post_meta(&d, &meta_message("wamid.C1", "Здравствуйте")).await, 200);
    sleep(15).await;
    wait_until("the first turn", 10 * S, || handler.calls().len() == 1).await;
    // The Business app on the phone: an echo, the client in `to` with a '+'.
    assert_eq!(post_meta(&d, &meta_echo("wamid.STAFF1", "Добрый день! Подскажу по ценам сама.")).await, 200);
    let paused = conversation(&d).await["takeover"][0]["paused"].clone();
    assert_eq!(paused["by"], "meta", "{paused}");
    let resumes_at = paused["resumes_at"].as_u64().unwrap();
    assert_eq!(post_meta(&d, &meta_message("wamid.C2", "Сколько стоит окрашивание?")).await, 200);
    d.stop().await;

    // A restart during the pause: still paused, the same resume time.
    let d = Daemon::start(meta(dir.path())).await;
    let after = conversation(&d).await;
    assert_eq!(after["takeover"][0]["state"], "paused");
    assert_eq!(after["takeover"][0]["paused"]["resumes_at"], resumes_at);
    sleep(120).await;
    assert_eq!(handler.calls().len(), 1, "the recovered message waits too");
    // Resumed by hand: the waiting message is a turn that sees what staff wrote.
    let (status, resumed) =
        d.post(&format!("/api/conversations/{PHONE}/resume"), &json!({"company_id": "962302"})).await;
    assert_eq!((status, &resumed["state"]), (200, &json!("assistant")), "{resumed}");
    wait_until("the resumed turn", 10 * S, || handler.calls().len() == 2).await;
    assert_eq!(
        transcript(&handler.calls()[1]),
        [
            ("staff".to_owned(), "Добрый день! Подскажу по ценам сама.".to_owned()),
            ("client".to_owned(), "Сколько стоит окрашивание?".to_owned())
        ]
    );
    assert_eq!(
        d.post(&format!("/api/conversations/{PHONE}/resume"), &json!({"company_id": "962302"})).await.0,
        409
    );
    // And paused by hand, until resumed.
    let (status, paused) = d
        .post(&format!("/api/conversations/{PHONE}/pause"), &json!({"company_id": "962302", "minutes": 0}))
        .await;
    assert_eq!((status, &paused["paused"]["resumes_at"]), (200, &Value::Null), "{paused}");
    d.stop().await;
}
