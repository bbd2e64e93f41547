//! Real gateways and a real AI, against local fakes that check the exact
//! request shapes: Meta and WAHA webhooks in (with signatures), replies out
//! through the durable outbox, and the OpenAI-compatible handler.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::sleep;
use turnstile::config::{GatewayKind, HandlerKind};
use turnstile::ingest::signature::sign_hex;

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);

fn meta_delivery(messages: Value) -> Value {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{"field": "messages",
        "value": {"messaging_product": "whatsapp",
                  "metadata": {"display_phone_number": "74950000000", "phone_number_id": "1055"},
                  "contacts": [{"profile": {"name": "Анна"}, "wa_id": "79001234567"}],
                  "messages": messages}}]}]})
}

/// POSTs raw bytes with optional extra headers.
async fn post_raw(d: &Daemon, path: &str, body: &[u8], headers: &[(&str, String)]) -> (u16, Value) {
    let mut req = d.client.post(format!("{}{path}", d.base)).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.body(body.to_vec()).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(start_paused = true)]
async fn meta_verification_answers_the_challenge_only_to_the_right_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.meta.verify_token = "salon-token".into();
    let d = Daemon::start(c).await;
    let get = |q: &str| {
        let url = format!("{}/webhook/meta?{q}", d.base);
        let client = d.client.clone();
        async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(
        get("hub.mode=subscribe&hub.verify_token=salon-token&hub.challenge=1158201444").await,
        (200, "1158201444".into())
    );
    assert_eq!(get("hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1").await.0, 403);
    assert_eq!(get("hub.mode=unsubscribe&hub.verify_token=salon-token&hub.challenge=1").await.0, 403);
    assert_eq!(get("hub.challenge=1").await.0, 403);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn meta_deliveries_are_verified_normalised_deduplicated_and_batched() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let mut c = config_with(dir.path(), &handler);
    c.meta.app_secret = "app-secret".into();
    c.meta.companies = HashMap::from([("1055".into(), "962302".into())]);
    let d = Daemon::start(c).await;

    let delivery = meta_delivery(json!([
        {"from": "79001234567", "id": "wamid.A1", "timestamp": "1763800000", "type": "text", "text": {"body": "Привет"}},
        {"from": "79001234567", "id": "wamid.A2", "timestamp": "1763800001", "type": "text", "text": {"body": "можно на стрижку?"}},
        {"from": "79001234567", "id": "wamid.A3", "timestamp": "1763800002", "type": "image",
         "image": {"caption": "вот такую", "mime_type": "image/jpeg", "sha256": "x", "id": "media1"}},
    ]));
    let body = serde_json::to_vec(&delivery).unwrap();
    let good = format!("sha256={}", sign_hex("app-secret", &body, false));

    // Refused without, or with a wrong, signature: nothing stored.
    assert_eq!(post_raw(&d, "/webhook/meta", &body, &[]).await.0, 401);
    let forged = format!("sha256={}", sign_hex("not-the-secret", &body, false));
    assert_eq!(post_raw(&d, "/webhook/meta", &body, &[("x-hub-signature-256", forged)]).await.0, 401);
    assert_eq!(d.get("/api/batches").await.1["batches"], json!([]));

    let (status, answer) =
        post_raw(&d, "/webhook/meta", &body, &[("x-hub-signature-256", good.clone())]).await;
    assert_eq!((status, answer), (200, json!({"status": "accepted", "accepted": 3, "duplicates": 0})));
    // Meta redelivers: stored once.
    let (_, again) = post_raw(&d, "/webhook/meta", &body, &[("x-hub-signature-256", good)]).await;
    assert_eq!(again["duplicates"], 3);
    // A delivery receipt for our own reply is acknowledged and ignored.
    let statuses = json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{"field": "messages",
        "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1055"},
                  "statuses": [{"id": "wamid.OUT", "status": "delivered", "timestamp": "1763800009", "recipient_id": "79001234567"}]}}]}]});
    let sbody = serde_json::to_vec(&statuses).unwrap();
    let ssig = format!("sha256={}", sign_hex("app-secret", &sbody, false));
    assert_eq!(
        post_raw(&d, "/webhook/meta", &sbody, &[("x-hub-signature-256", ssig)]).await.1["accepted"],
        0
    );

    wait_until("the turn", 30 * S, || handler.calls().len() == 1).await;
    sleep(30 * S).await;
    let calls = handler.calls();
    assert_eq!(calls.len(), 1, "three messages of one delivery, one turn");
    assert_eq!(calls[0].ids, ["wamid.A1", "wamid.A2", "wamid.A3"]);
    assert_eq!(calls[0].text, "Привет\nможно на стрижку?\n[image] вот такую");
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    assert_eq!(conv["turns"][0]["company_id"], "962302", "phone_number_id 1055 is company 962302");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn waha_events_are_verified_and_only_client_messages_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.waha.hmac_key = "waha-key".into();
    c.waha.sessions = HashMap::from([("lotos".into(), "962302".into())]);
    c.takeover.enabled = false;
    let d = Daemon::start(c).await;
    let event = |id: &str, from_me: bool| {
        serde_json::to_vec(&json!({"event": "message", "session": "lotos", "engine": "WEBJS", "payload": {
            "id": id, "timestamp": 1763800000, "from": "79001234567@c.us", "fromMe": from_me,
            "body": "Привет", "hasMedia": false}}))
        .unwrap()
    };
    let signed = |body: &[u8]| {
        vec![
            ("x-webhook-hmac", sign_hex("waha-key", body, true)),
            ("x-webhook-hmac-algorithm", "sha512".to_owned()),
        ]
    };

    let body = event("false_79001234567@c.us_3EB0AAA", false);
    assert_eq!(post_raw(&d, "/webhook/waha", &body, &[]).await.0, 401);
    let wrong = vec![
        ("x-webhook-hmac", sign_hex("other", &body, true)),
        ("x-webhook-hmac-algorithm", "sha512".to_owned()),
    ];
    assert_eq!(post_raw(&d, "/webhook/waha", &body, &wrong).await.0, 401);
    assert_eq!(
        post_raw(&d, "/webhook/waha", &body, &signed(&body)).await,
        (200, json!({"status": "accepted"}))
    );
    assert_eq!(post_raw(&d, "/webhook/waha", &body, &signed(&body)).await.1["status"], "duplicate");
    // The salon's side (takeover is off here: `takeover.rs` has it on).
    let mine = event("true_79001234567@c.us_3EB0BBB", true);
    assert_eq!(post_raw(&d, "/webhook/waha", &mine, &signed(&mine)).await.1["status"], "ignored");

    let (_, batches) = d.get("/api/batches").await;
    let batches = batches["batches"].as_array().unwrap().clone();
    assert_eq!(batches.len(), 1);
    assert_eq!(
        (batches[0]["company_id"].as_str(), batches[0]["messages"].as_array().unwrap().len()),
        (Some("962302"), 1)
    );
    d.stop().await;
}

/// Sends one message to the immediate webhook (so a turn runs at once).
async fn say(d: &Daemon, id: &str, phone: &str, text: &str) {
    let body = json!({"id": id, "from": phone, "message": text, "company_id": "962302"});
    assert_eq!(d.post("/webhook/whatsapp", &body).await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn replies_go_out_through_meta_in_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let graph =
        FakeServer::start(|_| json!({"messaging_product": "whatsapp", "messages": [{"id": "wamid.OUT"}]}))
            .await;
    let mut c = config(dir.path());
    c.gateway.kind = GatewayKind::Meta;
    c.gateway.url = format!("{}/v21.0", graph.base);
    c.gateway.access_token = "EAAG-token".into();
    c.meta.companies = HashMap::from([("1055".into(), "962302".into())]);
    (c.ingest.webhook_token, c.meta.app_secret) = (WEBHOOK_TOKEN.into(), META_SECRET.into());
    let d = Daemon::start(c).await;
    say(&d, "wamid.IN1", "79001234567", "Привет").await;
    wait_until("the reply", 10 * S, || !graph.delivered("/v21.0/1055/messages").is_empty()).await;
    sleep(S).await;
    let sent: Vec<Seen> = graph.delivered("/v21.0/1055/messages");
    let reply = sent.iter().find(|s| s.body["type"] == "text").expect("a text message");
    assert_eq!(
        (reply.method.as_str(), reply.headers["authorization"].as_str()),
        ("POST", "Bearer EAAG-token")
    );
    assert_eq!(
        reply.body,
        json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": "79001234567",
               "type": "text", "text": {"preview_url": false, "body": "received: Привет"}})
    );
    // While the turn ran: the client's message marked read, with a typing indicator.
    let typing = sent.iter().find(|s| s.body["status"] == "read").expect("a read receipt");
    assert_eq!(typing.body["message_id"], "wamid.IN1");
    assert_eq!(typing.body["typing_indicator"], json!({"type": "text"}));
    assert_eq!(d.get("/api/outbox").await.1, json!({"outbox": []}));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn replies_go_out_through_waha_and_http_in_their_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let waha = FakeServer::start(|_| json!({"id": "true_79001234567@c.us_OUT"})).await;
    let mut c = config(dir.path());
    c.gateway.kind = GatewayKind::Waha;
    c.gateway.url = waha.base.clone();
    c.gateway.api_key = "waha-api-key".into();
    c.waha.sessions = HashMap::from([("lotos".into(), "962302".into())]);
    (c.ingest.webhook_token, c.waha.hmac_key) = (WEBHOOK_TOKEN.into(), WAHA_KEY.into());
    let d = Daemon::start(c).await;
    say(&d, "w1", "79001234567", "Привет").await;
    wait_until("the reply", 10 * S, || !waha.delivered("/api/sendText").is_empty()).await;
    sleep(S).await;
    let sent = waha.delivered("/api/sendText");
    assert_eq!(
        sent[0].body,
        json!({"session": "lotos", "chatId": "79001234567@c.us", "text": "received: Привет"})
    );
    assert_eq!(sent[0].headers["x-api-key"], "waha-api-key");
    let paths: Vec<String> = waha.seen().into_iter().map(|s| s.path).collect();
    assert!(
        paths.contains(&"/api/startTyping".to_owned()) && paths.contains(&"/api/stopTyping".to_owned()),
        "{paths:?}"
    );
    d.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let hook = FakeServer::start(|_| json!({"ok": true})).await;
    let mut c = config(dir.path());
    http_gateway(&mut c, &hook);
    let d = Daemon::start(c).await;
    say(&d, "h1", "79001234567", "Привет").await;
    wait_until("the reply", 10 * S, || !hook.delivered("/send").is_empty()).await;
    let sent = hook.delivered("/send");
    let turn_id = sent[0].body["turn_id"].as_str().unwrap().to_owned();
    assert_eq!(
        sent[0].body,
        json!({"phone": "79001234567", "company_id": "962302", "text": "received: Привет",
               "turn_id": turn_id, "part": 1, "parts": 1})
    );
    assert_eq!(sent[0].headers["idempotency-key"], turn_id);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_gateway_down_for_a_while_gets_every_reply_once_in_order_per_phone() {
    let dir = tempfile::tempdir().unwrap();
    let hook = FakeServer::start(|_| json!({"ok": true})).await;
    hook.set_status(503);
    let mut c = config(dir.path());
    http_gateway(&mut c, &hook);
    c.gateway.max_chars = 40;
    c.gateway.timeout_ms = 2_000;
    let d = Daemon::start(c).await;
    let phones = ["79001110001", "79001110002", "79001110003"];
    for round in 0..3 {
        for phone in phones {
            // The third round's reply is long: two pieces.
            let text = if round == 2 {
                "длинное сообщение. ".repeat(3)
            } else {
                format!("сообщение {round}")
            };
            say(&d, &format!("{phone}-{round}"), phone, &text).await;
        }
        sleep(3 * S).await;
    }
    sleep(20 * S).await;
    assert!(hook.delivered("/send").is_empty());
    let (_, outbox) = d.get("/api/outbox").await;
    assert_eq!(outbox["outbox"].as_array().unwrap().len(), 12, "3 phones x (1 + 1 + 2 pieces) wait");
    // Then it hangs instead of failing fast...
    hook.set_status(200);
    hook.set_delay(5 * S);
    sleep(30 * S).await;
    // ...and recovers.
    hook.set_delay(Duration::ZERO);
    wait_until("every reply", 300 * S, || hook.delivered("/send").len() >= 12).await;
    sleep(120 * S).await;

    let delivered = hook.delivered("/send");
    assert_eq!(delivered.len(), 12, "each piece exactly once");
    for phone in phones {
        let texts: Vec<(String, u64)> = delivered
            .iter()
            .filter(|s| s.body["phone"] == phone)
            .map(|s| (s.body["text"].as_str().unwrap().to_owned(), s.body["part"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            texts,
            [
                ("received: сообщение 0".to_owned(), 1),
                ("received: сообщение 1".to_owned(), 1),
                ("received: длинное сообщение.".to_owned(), 1),
                ("длинное сообщение. длинное сообщение.".to_owned(), 2),
            ],
            "{phone}: in order"
        );
    }
    assert_eq!(d.get("/api/outbox").await.1, json!({"outbox": []}));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_between_commit_and_send_still_delivers_and_a_sent_reply_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let hook = FakeServer::start(|_| json!({"ok": true})).await;
    hook.set_status(500);
    let mut c = config(dir.path());
    http_gateway(&mut c, &hook);
    let d = Daemon::start(c.clone()).await;
    say(&d, "r1", "79001234567", "Привет").await;
    sleep(5 * S).await;
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    assert_eq!(conv["turns"].as_array().unwrap().len(), 1, "committed");
    assert!(hook.delivered("/send").is_empty(), "not sent");
    d.stop().await;

    hook.set_status(200);
    let d = Daemon::start(c.clone()).await;
    wait_until("the reply after the restart", 30 * S, || hook.delivered("/send").len() == 1).await;
    sleep(5 * S).await;
    d.stop().await;

    let d = Daemon::start(c).await;
    sleep(60 * S).await;
    assert_eq!(hook.delivered("/send").len(), 1, "a reply marked sent is not sent again");
    d.stop().await;
}

/// The openai handler against `llm` (a stand-in server), its key in `key_env`.
fn openai_config(dir: &std::path::Path, llm: &FakeServer, key_env: &str) -> turnstile::Config {
    let mut c = config(dir);
    c.handler.kind = HandlerKind::OpenAi;
    c.openai.base_url = format!("{}/v1", llm.base);
    c.openai.model = "test-model".into();
    c.openai.system_prompt = "Ты администратор салона.".into();
    c.openai.api_key_env = key_env.into();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c
}

#[tokio::test(start_paused = true)]
async fn the_openai_handler_sends_prompt_history_and_text_and_keeps_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let turns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = turns.clone();
    let llm = FakeServer::start(move |_| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "test-model",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("ответ {n}")}, "finish_reason": "stop"}]})
    })
    .await;
    std::env::set_var("TURNSTILE_TEST_LLM_KEY", "sk-test");
    let mut c = openai_config(dir.path(), &llm, "TURNSTILE_TEST_LLM_KEY");
    c.openai.history_turns = 1;
    let d = Daemon::start(c).await;
    for (i, text) in ["Привет", "Хочу на стрижку", "Завтра можно?"].iter().enumerate()
    {
        say(&d, &format!("o{i}"), "79001234567", text).await;
        wait_until("the answer", 10 * S, || llm.seen().len() == i + 1).await;
        sleep(S).await;
    }
    let seen = llm.seen();
    assert!(seen
        .iter()
        .all(|s| s.path == "/v1/chat/completions" && s.headers["authorization"] == "Bearer sk-test"));
    let sys = json!({"role": "system", "content": "Ты администратор салона."});
    assert_eq!(
        seen[0].body,
        json!({"model": "test-model", "messages": [sys, {"role": "user", "content": "Привет"}]})
    );
    assert_eq!(
        seen[1].body["messages"],
        json!([sys, {"role": "user", "content": "Привет"}, {"role": "assistant", "content": "ответ 1"},
               {"role": "user", "content": "Хочу на стрижку"}])
    );
    // history_turns = 1: only the last turn goes along.
    assert_eq!(
        seen[2].body["messages"],
        json!([sys, {"role": "user", "content": "Хочу на стрижку"}, {"role": "assistant", "content": "ответ 2"},
               {"role": "user", "content": "Завтра можно?"}])
    );
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    assert_eq!(conv["turns"][2]["reply"], "ответ 3");
    d.stop().await;
}

fn evolution_upsert(jid: &str, from_me: bool, id: &str, message: Value, apikey: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"event": "messages.upsert", "instance": "lotos", "apikey": apikey,
        "server_url": "http://127.0.0.1:8099", "date_time": "2026-11-24T10:00:00.000Z",
        "data": {"key": {"remoteJid": jid, "fromMe": from_me, "id": id}, "pushName": "Анна",
                 "message": message, "messageType": "conversation", "messageTimestamp": 1763800000}}))
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn evolution_api_events_in_and_replies_out_through_send_text() {
    let dir = tempfile::tempdir().unwrap();
    let evolution = FakeServer::start(|_| json!({"key": {"id": "OUT1"}, "status": "PENDING"})).await;
    let mut c = config(dir.path());
    c.gateway.kind = GatewayKind::Evolution;
    c.gateway.url = evolution.base.clone();
    c.gateway.api_key = "evolution-instance-key".into();
    c.evolution.api_key = "evolution-instance-key".into();
    c.evolution.instances = HashMap::from([("lotos".into(), "962302".into())]);
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.batching.debounce_ms = 1_000;
    c.takeover.enabled = false;
    let d = Daemon::start(c).await;
    let jid = "79001234567@s.whatsapp.net";
    let key = "evolution-instance-key";

    // Without the key, or with a wrong one: refused, nothing stored.
    let text = evolution_upsert(jid, false, "EV1", json!({"conversation": "Привет"}), "wrong-key");
    assert_eq!(post_raw(&d, "/webhook/evolution", &text, &[]).await.0, 401);
    let text = evolution_upsert(jid, false, "EV1", json!({"conversation": "Привет"}), key);
    let answer = post_raw(&d, "/webhook/evolution", &text, &[]).await;
    assert_eq!(answer, (200, json!({"status": "accepted"})));
    assert_eq!(post_raw(&d, "/webhook/evolution", &text, &[]).await.1["status"], "duplicate");
    let caption =
        evolution_upsert(jid, false, "EV2", json!({"imageMessage": {"caption": "вот такую стрижку"}}), key);
    assert_eq!(post_raw(&d, "/webhook/evolution", &caption, &[]).await.1["status"], "accepted");
    // The salon's side (takeover is off here: `takeover.rs` has it on).
    let mine = evolution_upsert(jid, true, "EV3", json!({"conversation": "Записали вас"}), key);
    assert_eq!(post_raw(&d, "/webhook/evolution", &mine, &[]).await.1["status"], "ignored");
    let group =
        evolution_upsert("120363025246125486@g.us", false, "EV4", json!({"conversation": "всем"}), key);
    assert_eq!(post_raw(&d, "/webhook/evolution", &group, &[]).await.1["status"], "ignored");

    // One turn of the two client messages; the reply leaves through sendText.
    wait_until("the reply", 10 * S, || !evolution.delivered("/message/sendText/lotos").is_empty()).await;
    sleep(S).await;
    let sent = evolution.delivered("/message/sendText/lotos");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0].body,
        json!({"number": "79001234567", "text": "received: Привет\n[image] вот такую стрижку"})
    );
    assert_eq!(sent[0].headers["apikey"], key);
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    let turns = conv["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 1);
    assert_eq!(turns[0]["company_id"], "962302");
    let ids: Vec<&str> =
        turns[0]["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["EV1", "EV2"], "fromMe and group messages never reach a turn");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_openai_handler_gives_the_model_the_salons_data_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let llm = FakeServer::start(|_| {
        json!({"id": "chatcmpl-2", "object": "chat.completion", "model": "test-model",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Есть окно в 11:00"}, "finish_reason": "stop"}]})
    })
    .await;
    let mut c = openai_config(dir.path(), &llm, "TURNSTILE_TEST_NO_SUCH_KEY");
    c.openai.cache_prompt = "Данные салона:".into();
    c.openai.cache_max_chars = 200;
    let d = Daemon::start(c).await;
    // The booking side puts the salon's data in the cache.
    let cache = json!({"company": "Лотос", "staff": [{"name": "Анна"}], "slots": ["11:00"]});
    let put = json!({"dialogue": {"history": [{"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Здравствуйте!"}]},
                     "cache": cache});
    assert_eq!(d.put("/api/contexts/962302/79001234567", &put).await.0, 200);
    say(&d, "c1", "79001234567", "Можно завтра?").await;
    wait_until("the request", 10 * S, || llm.seen().len() == 1).await;
    let messages = llm.seen()[0].body["messages"].clone();
    let cache_text = cache.to_string();
    assert_eq!(
        messages,
        json!([{"role": "system", "content": "Ты администратор салона."},
               {"role": "system", "content": format!("Данные салона:\n{cache_text}")},
               {"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Здравствуйте!"},
               {"role": "user", "content": "Можно завтра?"}])
    );
    assert!(cache_text.chars().count() <= 200, "within the budget: sent whole");
    d.stop().await;

    // Over the budget: cut, and said so.
    let dir = tempfile::tempdir().unwrap();
    let mut c = openai_config(dir.path(), &llm, "TURNSTILE_TEST_NO_SUCH_KEY");
    c.openai.cache_prompt = "Данные салона:".into();
    c.openai.cache_max_chars = 20;
    let d = Daemon::start(c).await;
    assert_eq!(d.put("/api/contexts/962302/79001234567", &json!({"cache": cache})).await.0, 200);
    say(&d, "c2", "79001234567", "Можно завтра?").await;
    wait_until("the request", 10 * S, || llm.seen().len() == 2).await;
    let sent = llm.seen()[1].body["messages"][1]["content"].as_str().unwrap().to_owned();
    let cut: String = cache_text.chars().take(20).collect();
    let total = cache_text.chars().count();
    assert_eq!(sent, format!("Данные салона:\n{cut}\n[cut at 20 of {total} characters]"));
    d.stop().await;
}
