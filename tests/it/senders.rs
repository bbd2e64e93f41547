//! The gateways as they are really deployed, on payloads built from the
//! senders' own source (`tests/fixtures/`, each field's origin in
//! `PROVENANCE.md`): Evolution API with its default webhook (`"apikey":
//! null`), its per-event paths and its global webhook; hidden-number
//! (`@lid`) chats on Evolution and WAHA, with and without the phone; their
//! presence; WAHA's presence subscriptions; and the quarantine that keeps an
//! authenticated delivery no parser takes.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use turnstile::config::{CutPolicy, GatewayKind};

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);
const KEY: &str = "evolution-instance-token-0001";
const URL_SECRET: &str = "evo-url-secret-0123456789abcdef";

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)).unwrap()
}

/// A fixture with `id` as its message id (for a second message of one chat).
fn with_id(path: &str, pointer: &str, id: &str) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&fixture(path)).unwrap();
    *v.pointer_mut(pointer).unwrap() = json!(id);
    serde_json::to_vec(&v).unwrap()
}

async fn post(d: &Daemon, path: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = d.client.post(format!("{}{path}", d.base)).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.body(body.to_vec()).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn metrics(d: &Daemon) -> String {
    d.client.get(format!("{}/metrics", d.admin)).send().await.unwrap().text().await.unwrap()
}

async fn texts_of(d: &Daemon, phone: &str) -> Vec<String> {
    let (_, conv) = d.get(&format!("/api/conversations/{phone}")).await;
    conv["turns"]
        .as_array()
        .map_or(Vec::new(), |t| t.iter().map(|t| t["text"].as_str().unwrap().to_owned()).collect())
}

fn evolution_config(dir: &Path, evolution: &FakeServer) -> turnstile::Config {
    let mut c = config(dir);
    c.gateway.kind = GatewayKind::Evolution;
    c.gateway.url = evolution.base.clone();
    c.gateway.api_key = "evolution-global-key".into();
    c.gateway.session = "turnstile-main".into();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.evolution.api_key = KEY.into();
    c.evolution.url_secret = URL_SECRET.into();
    c.evolution.instances = HashMap::from([("turnstile-main".into(), "962302".into())]);
    c
}

#[tokio::test(start_paused = true)]
async fn evolution_as_deployed_default_webhook_global_webhook_per_event_paths_and_lid_chats() {
    let dir = tempfile::tempdir().unwrap();
    let evolution = FakeServer::start(|_| json!({"key": {"id": "3EB0OUT"}, "status": "PENDING"})).await;
    let d = Daemon::start(evolution_config(dir.path(), &evolution)).await;
    let header = [("apikey", KEY)];

    // Evolution's default: "apikey": null in the body, no header. Refused,
    // and the answer says where the key goes.
    let (status, answer) =
        post(&d, "/webhook/evolution", &fixture("evolution/messages-upsert.pn-conversation.json"), &[]).await;
    assert_eq!(status, 401, "{answer}");
    let error = answer["error"].as_str().unwrap();
    for hint in ["apikey", "AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES", "/webhook/evolution/key/"] {
        assert!(error.contains(hint), "{hint}: {error}");
    }
    assert!(metrics(&d).await.contains(
        "turnstile_webhooks_total{endpoint=\"/webhook/evolution\",status=\"401\",reason=\"secret\"} 1\n"
    ));
    // The same with the key in the header (a per-instance webhook's headers).
    let (status, answer) =
        post(&d, "/webhook/evolution", &fixture("evolution/messages-upsert.pn-conversation.json"), &header)
            .await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")), "{answer}");
    // The body key, where Evolution exposes it.
    let exposed = fixture("evolution/messages-upsert.pn-conversation.apikey-exposed.json");
    let mut exposed: Value = serde_json::from_slice(&exposed).unwrap();
    exposed["apikey"] = json!(KEY);
    exposed["data"]["key"]["id"] = json!("3EB0EXPOSED01");
    let (status, _) = post(&d, "/webhook/evolution", &serde_json::to_vec(&exposed).unwrap(), &[]).await;
    assert_eq!(status, 200);
    // A per-event path (webhookByEvents), key in the header.
    let (status, answer) = post(
        &d,
        "/webhook/evolution/messages-upsert",
        &fixture("evolution/messages-upsert.pn-extended-text.json"),
        &header,
    )
    .await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")), "{answer}");
    let other = json!({"event": "connection.update", "instance": "turnstile-main", "data": {"state": "open"}, "apikey": null});
    let (status, answer) =
        post(&d, "/webhook/evolution/connection-update", &serde_json::to_vec(&other).unwrap(), &header).await;
    assert_eq!((status, &answer["status"]), (200, &json!("ignored")), "other events: ignored, never 404");
    // The global webhook: no headers at all, the secret in the URL, by events.
    let global = fixture("evolution/messages-upsert.lid-hidden.json");
    let (status, answer) =
        post(&d, &format!("/webhook/evolution/key/{URL_SECRET}/messages-upsert"), &global, &[]).await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")), "{answer}");
    let (status, _) =
        post(&d, "/webhook/evolution/key/not-the-secret-0123456789/messages-upsert", &global, &[]).await;
    assert_eq!(status, 401);
    // A LID chat whose phone WhatsApp revealed: the phone's conversation.
    let (status, _) =
        post(&d, "/webhook/evolution", &fixture("evolution/messages-upsert.lid-with-alt.json"), &header)
            .await;
    assert_eq!(status, 200);

    sleep_secs(30).await;
    assert_eq!(texts_of(&d, "79007654321").await, ["Добрый день, сколько стоит окрашивание?"]);
    let hidden = texts_of(&d, "176543210987654@lid").await;
    assert_eq!(hidden.len(), 1, "the hidden number's own conversation");
    assert!(texts_of(&d, "176543210987654").await.is_empty(), "never taken for a phone of the same digits");
    wait_until("the replies", 30 * S, || evolution.delivered("/message/sendText/turnstile-main").len() >= 3)
        .await;
    let numbers: Vec<String> = evolution
        .delivered("/message/sendText/turnstile-main")
        .iter()
        .map(|s| s.body["number"].as_str().unwrap().to_owned())
        .collect();
    assert!(numbers.contains(&"79007654321".to_owned()), "{numbers:?}");
    assert!(
        numbers.contains(&"176543210987654@lid".to_owned()),
        "the hidden number answered at its LID jid: {numbers:?}"
    );
    let m = metrics(&d).await;
    assert!(!m.contains(URL_SECRET), "the secret never reaches the metrics");
    d.stop().await;
}

async fn sleep_secs(n: u64) {
    tokio::time::sleep(Duration::from_secs(n)).await;
}

#[tokio::test(start_paused = true)]
async fn presence_keyed_by_a_lid_holds_the_batch_of_the_conversation_it_belongs_to() {
    let dir = tempfile::tempdir().unwrap();
    let evolution = FakeServer::start(|_| json!({"key": {"id": "3EB0OUT"}})).await;
    let mut c = evolution_config(dir.path(), &evolution);
    c.batching.policy = CutPolicy::Adaptive;
    let ttl = c.batching.typing_ttl_ms / 1000;
    let d = Daemon::start(c).await;
    let header = [("apikey", KEY)];
    // The message reveals the LID's phone; its presence comes by LID alone.
    post(&d, "/webhook/evolution", &fixture("evolution/messages-upsert.lid-with-alt.json"), &header).await;
    let presence = fixture("evolution/presence-update.lid.json");
    for _ in 0..4 {
        let (status, answer) = post(&d, "/webhook/evolution", &presence, &header).await;
        assert_eq!((status, &answer["status"]), (200, &json!("presence")), "{answer}");
        sleep_secs(ttl - 2).await;
    }
    let (_, batches) = d.get("/api/batches").await;
    let batch = &batches["batches"][0];
    assert_eq!(
        (&batch["phone"], &batch["rule"]),
        (&json!("79007654321"), &json!("typing_stale")),
        "{batches}"
    );
    assert!(texts_of(&d, "79007654321").await.is_empty(), "held while the client types");
    // The link survives a restart: after it, the LID's presence still finds the phone.
    d.stop().await;
    let mut c = evolution_config(dir.path(), &evolution);
    c.batching.policy = CutPolicy::Adaptive;
    let d = Daemon::start(c).await;
    sleep_secs(60).await;
    let turns = texts_of(&d, "79007654321").await;
    assert_eq!(turns.len(), 1, "{turns:?}");
    let next = with_id("evolution/messages-upsert.lid-hidden.json", "/data/key/id", "3EB0NEXT01");
    let mut next: Value = serde_json::from_slice(&next).unwrap();
    next["data"]["key"]["remoteJid"] = json!("98765432109876@lid");
    post(&d, "/webhook/evolution", &serde_json::to_vec(&next).unwrap(), &header).await;
    sleep_secs(60).await;
    assert_eq!(
        texts_of(&d, "79007654321").await.len(),
        2,
        "a LID-only message after the restart: the phone's conversation"
    );
    assert!(texts_of(&d, "98765432109876@lid").await.is_empty());
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn waha_lid_chats_per_engine_and_one_presence_subscription_per_chat() {
    let dir = tempfile::tempdir().unwrap();
    let waha = FakeServer::start(|_| json!({"id": "true_98765432109876@lid_3EB0OUT"})).await;
    let mut c = config(dir.path());
    c.batching.policy = CutPolicy::Adaptive;
    c.gateway.kind = GatewayKind::Waha;
    c.gateway.url = waha.base.clone();
    c.gateway.api_key = "waha-api-key".into();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.waha.hmac_key = WAHA_KEY.into();
    c.waha.sessions = HashMap::from([("default".into(), "962302".into())]);
    let d = Daemon::start(c).await;
    let signed = |body: &[u8]| turnstile::ingest::signature::sign_hex(WAHA_KEY, body, true);
    let send = |body: Vec<u8>| {
        let sig = signed(&body);
        let d = &d;
        async move {
            post(
                d,
                "/webhook/waha",
                &body,
                &[("x-webhook-hmac", &sig), ("x-webhook-hmac-algorithm", "sha512")],
            )
            .await
        }
    };
    let subscribes = |chat: &str| waha.delivered(&format!("/api/default/presence/{chat}/subscribe")).len();

    assert_eq!(send(fixture("waha/noweb/message.pn.json")).await.1["status"], "accepted");
    wait_until("the subscription", 10 * S, || subscribes("79001234567@c.us") == 1).await;
    let second = with_id("waha/noweb/message.pn.json", "/payload/id", "false_79001234567@c.us_SECOND");
    assert_eq!(send(second).await.1["status"], "accepted");
    sleep_secs(2).await;
    assert_eq!(subscribes("79001234567@c.us"), 1, "once per chat");
    let seen = waha.seen();
    let call = seen.iter().find(|s| s.path.ends_with("/subscribe")).unwrap();
    assert_eq!(call.method, "POST");
    assert_eq!(call.headers.get("x-api-key").map(String::as_str), Some("waha-api-key"));
    // WAHA restarted its session: the chat is subscribed again.
    let started = serde_json::to_vec(
        &json!({"event": "session.status", "session": "default", "payload": {"status": "WORKING"}}),
    )
    .unwrap();
    assert_eq!(send(started).await.0, 200);
    let third = with_id("waha/noweb/message.pn.json", "/payload/id", "false_79001234567@c.us_THIRD");
    send(third).await;
    wait_until("a new subscription", 10 * S, || subscribes("79001234567@c.us") == 2).await;

    // NOWEB and GOWS reveal a LID chat's phone; WEBJS does not.
    assert_eq!(send(fixture("waha/noweb/message.lid-with-alt.json")).await.1["status"], "accepted");
    let gows = with_id("waha/gows/message.lid-with-alt.json", "/payload/id", "false_98765432109876@lid_GOWS");
    assert_eq!(send(gows).await.1["status"], "accepted");
    assert_eq!(
        send(fixture("waha/webjs/message.lid.json")).await.1["status"],
        "duplicate",
        "the NOWEB one's id"
    );
    let webjs = with_id("waha/webjs/message.lid.json", "/payload/id", "false_12312312312312@lid_WEBJS");
    let mut webjs: Value = serde_json::from_slice(&webjs).unwrap();
    webjs["payload"]["from"] = json!("12312312312312@lid");
    assert_eq!(send(serde_json::to_vec(&webjs).unwrap()).await.1["status"], "accepted");
    // The LID chat's presence (by LID) holds the phone's batch.
    for _ in 0..3 {
        send(fixture("waha/noweb/presence-update.lid.json")).await;
        sleep_secs(5).await;
    }
    let (_, batches) = d.get("/api/batches").await;
    let phone_batch =
        batches["batches"].as_array().unwrap().iter().find(|b| b["phone"] == "79007654321").cloned();
    assert_eq!(phone_batch.map(|b| b["rule"].clone()), Some(json!("typing_stale")), "{batches}");
    sleep_secs(90).await;
    assert_eq!(texts_of(&d, "79007654321").await.len(), 1, "NOWEB and GOWS: one conversation, one turn");
    assert_eq!(texts_of(&d, "12312312312312@lid").await.len(), 1, "WEBJS: the LID's own");
    wait_until("the replies", 30 * S, || waha.delivered("/api/sendText").len() >= 3).await;
    let chats: Vec<String> = waha
        .delivered("/api/sendText")
        .iter()
        .map(|s| s.body["chatId"].as_str().unwrap().to_owned())
        .collect();
    assert!(chats.contains(&"79007654321@c.us".to_owned()), "{chats:?}");
    assert!(
        chats.contains(&"12312312312312@lid".to_owned()),
        "a hidden number answered at its LID jid: {chats:?}"
    );
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_authenticated_delivery_no_parser_takes_is_kept_and_replayed_into_a_turn() {
    let dir = tempfile::tempdir().unwrap();
    let evolution = FakeServer::start(|_| json!({"key": {"id": "3EB0OUT"}})).await;
    let (d, faults) = Daemon::start_with_faults(evolution_config(dir.path(), &evolution)).await;
    let header = [("apikey", KEY)];
    let body = fixture("evolution/messages-upsert.pn-conversation.json");
    // A sender version whose shape this build does not know.
    faults.set_gateway_shapes_unknown(true);
    let (status, answer) = post(&d, "/webhook/evolution", &body, &header).await;
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("quarantined")),
        "never a 4xx the sender drops: {answer}"
    );
    let id = answer["id"].as_str().unwrap().to_owned();
    // Only authenticated deliveries are kept.
    assert_eq!(post(&d, "/webhook/evolution", &body, &[]).await.0, 401);
    let (_, held) = d.get("/api/quarantine").await;
    assert_eq!(held["quarantine"].as_array().unwrap().len(), 1, "{held}");
    assert_eq!(held["quarantine"][0]["gateway"], "evolution");
    assert!(held["quarantine"][0]["reason"].as_str().unwrap().contains("does not know"), "{held}");
    assert!(metrics(&d).await.contains("turnstile_quarantined_total{gateway=\"evolution\"} 1\n"));
    assert!(metrics(&d).await.contains("turnstile_quarantine_held 1\n"));
    sleep_secs(30).await;
    assert!(texts_of(&d, "79001234567").await.is_empty(), "nothing stored from it");
    // Still unknown: the replay says so and keeps it.
    let (status, answer) = d.post(&format!("/api/quarantine/{id}/replay"), &json!({})).await;
    assert_eq!(status, 422, "{answer}");
    d.stop().await;

    // "The upgrade": a daemon that knows the shape; the delivery survived the restart.
    let d = Daemon::start(evolution_config(dir.path(), &evolution)).await;
    let (status, answer) = d.post(&format!("/api/quarantine/{id}/replay"), &json!({})).await;
    assert_eq!((status, &answer["status"]), (200, &json!("replayed")), "{answer}");
    sleep_secs(30).await;
    assert_eq!(
        texts_of(&d, "79001234567").await,
        ["Здравствуйте! Можно записаться на стрижку завтра в 15:00?"]
    );
    assert_eq!(d.get("/api/quarantine").await.1["quarantine"], json!([]));
    assert_eq!(d.post(&format!("/api/quarantine/{id}/replay"), &json!({})).await.0, 404);
    d.stop().await;
}

#[tokio::test]
async fn an_evolution_gateway_without_its_api_key_refuses_to_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = binary_env(Ports::free(), &dir.path().join("data"), None);
    env.extend([
        ("TURNSTILE_GATEWAY_KIND", "evolution".into()),
        ("TURNSTILE_GATEWAY_URL", "http://127.0.0.1:9".into()),
        ("TURNSTILE_INGEST_WEBHOOK_TOKEN", WEBHOOK_TOKEN.into()),
    ]);
    let log = dir.path().join("refused.log");
    let mut child = Spawned(spawn_binary(&env, &log));
    let status = exited_within(&mut child.0, Duration::from_secs(20)).expect("refuses to start");
    let printed = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{printed}");
    assert!(printed.contains("invalid config key gateway.api_key"), "{printed}");
}
