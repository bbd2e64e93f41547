//! Safe when exposed: the public listener serves the webhooks and health and
//! nothing else, whatever a reverse proxy forwards to it; the admin API,
//! metrics and backups answer on the admin listener only; every webhook
//! wants its secret once something can leave the machine, and a request
//! without it stores nothing. In process, and the real binary as deployed.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::sleep;
use turnstile::ingest::signature::sign_hex;

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);

/// Every admin route, with a method it answers to.
pub const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/metrics"),
    ("GET", "/api/outbox"),
    ("POST", "/api/backup"),
    ("POST", "/api/store/rewrite"),
    ("GET", "/api/batches"),
    ("GET", "/api/conversations/79001234567"),
    ("GET", "/api/dead"),
    ("POST", "/api/dead/t000000000001/retry"),
    ("GET", "/api/contexts/default/79001234567"),
    ("PUT", "/api/contexts/default/79001234567"),
    ("DELETE", "/api/contexts/default/79001234567"),
    ("POST", "/api/contexts/default/79001234567/invalidate"),
    ("GET", "/api/events"),
    ("GET", "/api/console/turns/t000000000001"),
    ("GET", "/api/batches/default/79001234567"),
];

/// Admin pages served without the token: they hold no data, and read it
/// through the routes above.
pub const ADMIN_PAGES: &[&str] = &["/ui"];

/// Every webhook route, with a method it answers to.
pub const WEBHOOK_ROUTES: &[(&str, &str)] = &[
    ("POST", "/webhook/whatsapp/batched"),
    ("POST", "/webhook/whatsapp"),
    ("GET", "/webhook/meta"),
    ("POST", "/webhook/meta"),
    ("POST", "/webhook/waha"),
    ("POST", "/webhook/evolution"),
];

/// What a listener answers for a path it does not serve.
pub fn no_such_endpoint() -> (u16, Value) {
    (404, json!({"error": "no such endpoint"}))
}

/// `method path` at `base` with a JSON body and optional bearer token.
pub async fn call(
    client: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client.request(method, format!("{base}{path}")).json(&json!({"dialogue": {}}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    // An event stream never ends: that it opened is the answer.
    if r.headers().get("content-type").is_some_and(|v| v == "text/event-stream") {
        return (status, json!({"stream": "open"}));
    }
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(start_paused = true)]
async fn the_public_listener_serves_webhooks_and_health_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.meta.verify_token = "meta-verify-token".into();
    c.waha.hmac_key = "waha-hmac-key".into();
    c.evolution.api_key = "evolution-api-key".into();
    let d = Daemon::start(c).await;
    for (method, path) in ADMIN_ROUTES {
        assert_eq!(call(&d.client, &d.base, method, path, None).await, no_such_endpoint(), "{method} {path}");
        let (status, body) = call(&d.client, &d.admin, method, path, None).await;
        assert_ne!((status, body.clone()), no_such_endpoint(), "{method} {path} on the admin listener");
    }
    for path in ADMIN_PAGES {
        let page = |base: &str| d.client.get(format!("{base}{path}")).send();
        assert_eq!(page(&d.base).await.unwrap().status(), 404, "{path} on the public listener");
        let served = page(&d.admin).await.unwrap();
        assert_eq!(served.status(), 200, "{path} on the admin listener");
        assert!(served.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    }
    for (method, path) in WEBHOOK_ROUTES {
        assert_eq!(
            call(&d.client, &d.admin, method, path, None).await,
            no_such_endpoint(),
            "{method} {path}"
        );
        let (status, body) = call(&d.client, &d.base, method, path, None).await;
        assert_ne!((status, body.clone()), no_such_endpoint(), "{method} {path} on the public listener");
    }
    for base in [&d.base, &d.admin] {
        assert_eq!(call(&d.client, base, "GET", "/healthz", None).await, (200, json!({"status": "ok"})));
        assert_eq!(call(&d.client, base, "GET", "/readyz", None).await, (200, json!({"status": "ready"})));
    }
    d.stop().await;
}

/// POSTs `body` to a generic webhook on the public listener with `headers` only.
async fn post_with(d: &Daemon, path: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = d.client.post(format!("{}{path}", d.base)).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    status_json(request).await
}

#[tokio::test(start_paused = true)]
async fn a_generic_webhook_without_its_token_is_refused_and_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let hook = FakeServer::start(|_| json!({"ok": true})).await;
    let mut c = config(dir.path());
    http_gateway(&mut c, &hook);
    let d = Daemon::start(c).await;
    let message = |id: &str| json!({"id": id, "from": "79001234567", "message": "Привет"});
    let bearer = format!("Bearer {WEBHOOK_TOKEN}");
    let wrong = [
        vec![],
        vec![("authorization", "Bearer test-webhook-token-0002")],
        vec![("authorization", WEBHOOK_TOKEN)],
        vec![("x-webhook-token", "test-webhook-token-0002")],
        vec![("x-webhook-token", "")],
    ];
    for path in ["/webhook/whatsapp/batched", "/webhook/whatsapp"] {
        for headers in &wrong {
            let (status, body) = post_with(&d, path, &message("m1"), headers).await;
            assert_eq!(status, 401, "{path} {headers:?}");
            assert!(body["error"].as_str().is_some_and(|e| e.contains("token")), "{body}");
        }
    }
    // Nothing stored, batched, answered or sent.
    sleep(30 * S).await;
    let batches = d.get("/api/batches").await.1;
    assert_eq!((&batches["batches"], &batches["running"]), (&json!([]), &json!([])));
    assert_eq!(d.get("/api/conversations/79001234567").await.1["turns"], json!([]));
    assert!(hook.seen().is_empty());
    // No dedup mark either: the same id with the token is new, in either header.
    let (status, body) =
        post_with(&d, "/webhook/whatsapp/batched", &message("m1"), &[("authorization", &bearer)]).await;
    assert_eq!((status, body), (200, json!({"status": "accepted"})));
    let header = [("x-webhook-token", WEBHOOK_TOKEN)];
    assert_eq!(
        post_with(&d, "/webhook/whatsapp/batched", &message("m2"), &header).await.1["status"],
        "accepted"
    );
    assert_eq!(
        post_with(&d, "/webhook/whatsapp/batched", &message("m1"), &header).await.1["status"],
        "duplicate"
    );
    let lower = [("authorization", format!("bearer {WEBHOOK_TOKEN}"))];
    let lower: Vec<(&str, &str)> = lower.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        post_with(&d, "/webhook/whatsapp/batched", &message("m3"), &lower).await.1["status"],
        "accepted"
    );
    wait_until("the reply", 30 * S, || hook.delivered("/send").len() == 1).await;
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn meta_and_waha_answer_404_until_configured_and_generic_webhooks_can_be_off() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    for (method, path) in [("GET", "/webhook/meta"), ("POST", "/webhook/meta"), ("POST", "/webhook/waha")] {
        assert_eq!(call(&d.client, &d.base, method, path, None).await, no_such_endpoint(), "{method} {path}");
    }
    d.stop().await;

    let mut c = config(dir.path());
    c.ingest.generic_webhooks = false;
    c.waha.hmac_key = WAHA_KEY.into();
    let d = Daemon::start(c).await;
    for path in ["/webhook/whatsapp", "/webhook/whatsapp/batched"] {
        assert_eq!(call(&d.client, &d.base, "POST", path, None).await, no_such_endpoint(), "{path}");
    }
    assert_eq!(call(&d.client, &d.base, "POST", "/webhook/waha", None).await.0, 401, "configured: served");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_trial_defaults_take_the_readme_example_without_a_secret() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let try_it = readme.split("## Try it").nth(1).unwrap().split("```").nth(1).unwrap();
    for line in [
        "curl -s localhost:8080/webhook/whatsapp/batched -H 'content-type: application/json'",
        "curl -s localhost:8081/api/batches",
        "curl -s localhost:8081/api/conversations/79001234567",
    ] {
        assert!(try_it.contains(line), "README's Try it no longer has {line:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    for (i, m) in ["Привет", "можно", "записаться"].iter().enumerate() {
        // What curl -d sends: no Authorization, no X-Webhook-Token.
        let body = json!({"id": format!("try{i}"), "from": "79001234567@c.us", "message": m});
        assert_eq!(
            post_with(&d, "/webhook/whatsapp/batched", &body, &[]).await,
            (200, json!({"status": "accepted"}))
        );
    }
    let (_, batches) = status_json(d.client.get(format!("{}/api/batches", d.admin))).await;
    assert_eq!(batches["batches"][0]["messages"].as_array().unwrap().len(), 3);
    sleep(11 * S).await;
    let (_, conv) = status_json(d.client.get(format!("{}/api/conversations/79001234567", d.admin))).await;
    assert_eq!(conv["turns"][0]["reply"], "received: Привет\nможно\nзаписаться");
    d.stop().await;
}

const ADMIN_TOKEN: &str = "test-admin-token-0001";

type Headers<'a> = Vec<(&'a str, String)>;

/// POSTs raw JSON bytes to `base` with `headers` only.
async fn post_raw(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, String)],
) -> (u16, Value) {
    let mut request =
        client.post(format!("{base}{path}")).header("content-type", "application/json").body(body.to_vec());
    for (k, v) in headers {
        request = request.header(*k, v);
    }
    status_json(request).await
}

fn meta_delivery(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{
        "field": "messages", "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1055"},
        "messages": [{"from": "79001234567", "id": id, "timestamp": "1763800000", "type": "text",
                      "text": {"body": "Привет из Meta"}}]}}]}]}))
    .unwrap()
}

fn waha_event(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"event": "message", "session": "default", "payload": {"id": id,
        "timestamp": 1763800000, "from": "79001234567@c.us", "fromMe": false, "body": "Привет из WAHA"}}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_binary_serves_nothing_admin_publicly_and_every_webhook_wants_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let ports = Ports::free();
    let mut env = binary_env(ports, &dir.path().join("data"), Some(&handler.url));
    env.extend([
        ("TURNSTILE_SERVER_ADMIN_TOKEN", ADMIN_TOKEN.into()),
        ("TURNSTILE_META_VERIFY_TOKEN", "meta-verify-token".into()),
        ("TURNSTILE_META_APP_SECRET", META_SECRET.into()),
        ("TURNSTILE_WAHA_HMAC_KEY", WAHA_KEY.into()),
        ("TURNSTILE_EVOLUTION_API_KEY", "evolution-api-key-0001".into()),
        ("TURNSTILE_BATCHING_DEBOUNCE_MS", "200".into()),
    ]);
    let mut child = Spawned(spawn_binary(&env, &dir.path().join("daemon.log")));
    let client = reqwest::Client::new();
    let (public, admin) = (ports.base(), ports.admin_base());
    wait_ready(&client, &public).await;

    // Nothing admin on the public listener, with or without the admin token.
    for (method, path) in ADMIN_ROUTES {
        for token in [None, Some(ADMIN_TOKEN)] {
            let answer = call(&client, &public, method, path, token).await;
            assert_eq!(answer, no_such_endpoint(), "{method} {path} on the public listener");
        }
    }
    // Every webhook without its secret, or with a wrong one: 401.
    let generic =
        serde_json::to_vec(&json!({"id": "g1", "from": "79001234567", "message": "Привет"})).unwrap();
    let (meta, waha) = (meta_delivery("wamid.M1"), waha_event("w1"));
    let evolution =
        serde_json::to_vec(&json!({"event": "messages.upsert", "instance": "x", "apikey": "wrong",
        "data": {"key": {"remoteJid": "79001234567@s.whatsapp.net", "fromMe": false, "id": "E1"},
                 "message": {"conversation": "Привет"}}}))
        .unwrap();
    let refused: Vec<(&str, &[u8], Headers)> = vec![
        ("/webhook/whatsapp/batched", &generic, vec![]),
        (
            "/webhook/whatsapp/batched",
            &generic,
            vec![("authorization", "Bearer wrong-token-00000001".into())],
        ),
        ("/webhook/whatsapp", &generic, vec![]),
        ("/webhook/whatsapp", &generic, vec![("x-webhook-token", "wrong-token-00000001".into())]),
        ("/webhook/whatsapp", &generic, vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))]),
        ("/webhook/meta", &meta, vec![]),
        (
            "/webhook/meta",
            &meta,
            vec![("x-hub-signature-256", format!("sha256={}", sign_hex("x", &meta, false)))],
        ),
        ("/webhook/waha", &waha, vec![]),
        ("/webhook/waha", &waha, vec![("x-webhook-hmac", sign_hex("not-the-key", &waha, true))]),
        ("/webhook/evolution", &evolution, vec![]),
        ("/webhook/evolution", &evolution, vec![("apikey", "not-the-key".into())]),
    ];
    for (path, body, headers) in &refused {
        let (status, answer) = post_raw(&client, &public, path, body, headers).await;
        assert_eq!(status, 401, "{path} {headers:?}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    // Meta's subscription check with a wrong verify token: 403, as Meta expects.
    let verify = format!("{public}/webhook/meta?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=42");
    assert_eq!(client.get(verify).send().await.unwrap().status(), 403);

    // The admin listener wants the admin token, and has no webhooks.
    for (method, path) in ADMIN_ROUTES {
        assert_eq!(
            call(&client, &admin, method, path, None).await.0,
            401,
            "{method} {path} without the token"
        );
    }
    for (method, path) in WEBHOOK_ROUTES {
        let answer = call(&client, &admin, method, path, Some(ADMIN_TOKEN)).await;
        assert_eq!(answer, no_such_endpoint(), "{method} {path} on the admin listener");
    }
    for base in [&public, &admin] {
        assert_eq!(call(&client, base, "GET", "/healthz", None).await.0, 200);
    }

    // The refused requests stored nothing...
    tokio::time::sleep(Duration::from_millis(500)).await;
    let get = |path: &'static str| call(&client, &admin, "GET", path, Some(ADMIN_TOKEN));
    let (status, batches) = get("/api/batches").await;
    assert_eq!((status, &batches["batches"], &batches["running"]), (200, &json!([]), &json!([])));
    assert_eq!(get("/api/conversations/79001234567").await.1["turns"], json!([]));
    assert!(handler.calls().is_empty());
    // ...and left no dedup mark: with their secrets, the same ids are new.
    let bearer = vec![("authorization", format!("Bearer {WEBHOOK_TOKEN}"))];
    let signed_meta =
        vec![("x-hub-signature-256", format!("sha256={}", sign_hex(META_SECRET, &meta, false)))];
    let signed_waha = vec![("x-webhook-hmac", sign_hex(WAHA_KEY, &waha, true))];
    let accepted = |n: u64| json!({"status": "accepted", "accepted": n, "duplicates": 0});
    assert_eq!(
        post_raw(&client, &public, "/webhook/whatsapp/batched", &generic, &bearer).await,
        (200, json!({"status": "accepted"}))
    );
    assert_eq!(post_raw(&client, &public, "/webhook/meta", &meta, &signed_meta).await, (200, accepted(1)));
    assert_eq!(
        post_raw(&client, &public, "/webhook/waha", &waha, &signed_waha).await,
        (200, json!({"status": "accepted"}))
    );
    let start = std::time::Instant::now();
    loop {
        let turns = get("/api/conversations/79001234567").await.1["turns"].clone();
        let ids: usize =
            turns.as_array().unwrap().iter().map(|t| t["messages"].as_array().unwrap().len()).sum();
        if ids == 3 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the three messages never made a turn: {turns}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status();
    let status = exited_within(&mut child.0, Duration::from_secs(20)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_gateway_with_an_open_webhook_is_refused_at_start_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let mut env = binary_env(ports, &dir.path().join("data"), None);
    env.extend([
        ("TURNSTILE_GATEWAY_KIND", "http".into()),
        ("TURNSTILE_GATEWAY_URL", "http://127.0.0.1:9/send".into()),
    ]);
    let waha_section = dir.path().join("waha.toml");
    std::fs::write(&waha_section, "[waha]\nsessions = { \"lotos\" = \"962302\" }\n").unwrap();
    let token = ("TURNSTILE_INGEST_WEBHOOK_TOKEN", WEBHOOK_TOKEN.to_owned());
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![], "ingest.webhook_token"),
        (vec![token.clone(), ("TURNSTILE_META_VERIFY_TOKEN", "verify".into())], "meta.app_secret"),
        (vec![token.clone(), ("TURNSTILE_CONFIG", waha_section.display().to_string())], "waha.hmac_key"),
    ];
    for (i, (extra, key)) in cases.into_iter().enumerate() {
        let log = dir.path().join(format!("refused-{i}.log"));
        let mut child = Spawned(spawn_binary(&[env.clone(), extra].concat(), &log));
        let status = exited_within(&mut child.0, Duration::from_secs(20)).expect("refuses to start");
        let printed = std::fs::read_to_string(&log).unwrap();
        assert_eq!(status.code(), Some(2), "{printed}");
        assert!(printed.contains(&format!("invalid config key {key}")), "{key}: {printed}");
    }

    // Allowed by its section: it starts, and says so at every start.
    let log = dir.path().join("allowed.log");
    let allowed = [
        token,
        ("TURNSTILE_META_VERIFY_TOKEN", "verify".into()),
        ("TURNSTILE_META_ALLOW_UNAUTHENTICATED", "true".into()),
    ];
    let mut child = Spawned(spawn_binary(&[env, allowed.to_vec()].concat(), &log));
    let client = reqwest::Client::new();
    wait_ready(&client, &ports.base()).await;
    let _ = std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status();
    assert!(exited_within(&mut child.0, Duration::from_secs(20)).expect("stops").success());
    let printed = std::fs::read_to_string(&log).unwrap();
    let warning = printed.lines().find(|l| l.contains("/webhook/meta takes unauthenticated requests"));
    assert!(warning.is_some_and(|l| l.contains("WARN") && l.contains("meta.app_secret")), "{printed}");
}
