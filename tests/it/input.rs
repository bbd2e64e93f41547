//! What the webhook answers to redeliveries and bad input, and that bad input
//! changes nothing stored.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::sleep;

use crate::helpers::*;

#[tokio::test(start_paused = true)]
async fn a_redelivered_id_is_stored_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    assert_eq!(d.send("wamid.1", "79001234567@c.us", "Привет").await.1, json!({"status": "accepted"}));
    assert_eq!(d.send("wamid.1", "79001234567@c.us", "Привет").await.1, json!({"status": "duplicate"}));
    // Same id from another spelling of the phone: still the same message.
    assert_eq!(d.send("wamid.1", "+7 900 123-45-67", "Привет").await, (200, json!({"status": "duplicate"})));
    d.stop().await;

    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    assert_eq!(d.send("wamid.1", "79001234567", "Привет").await.1, json!({"status": "duplicate"}));
    wait_until("the turn", Duration::from_secs(30), || handler.calls().len() == 1).await;
    sleep(Duration::from_secs(30)).await;
    let calls = handler.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].ids, ["wamid.1"]);
    d.stop().await;
}

/// Sends raw bytes with the given content type; returns status and JSON body.
async fn raw(d: &Daemon, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req =
        d.client.post(format!("{}/webhook/whatsapp/batched", d.base)).bearer_auth(WEBHOOK_TOKEN).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(start_paused = true)]
async fn bad_input_gets_its_status_and_a_json_error_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    let json_ct = Some("application/json");
    let good = |id: &str| json!({"id": id, "from": "79001234567", "message": "hi"});
    let with = |field: &str, v: Value| {
        let mut body = good("bad");
        body[field] = v;
        serde_json::to_vec(&body).unwrap()
    };
    let without = |field: &str| {
        let mut body = good("bad");
        body.as_object_mut().unwrap().remove(field);
        serde_json::to_vec(&body).unwrap()
    };
    let cases: Vec<(&str, Option<&str>, Vec<u8>, u16)> = vec![
        ("malformed JSON", json_ct, b"{\"id\": \"x\", \"from\":".to_vec(), 400),
        ("not JSON at all", json_ct, b"hello".to_vec(), 400),
        ("missing id", json_ct, without("id"), 422),
        ("missing from", json_ct, without("from"), 422),
        ("missing message", json_ct, without("message"), 422),
        ("empty message", json_ct, with("message", json!("")), 422),
        ("empty id", json_ct, with("id", json!("")), 422),
        ("numeric from", json_ct, with("from", json!(79001234567u64)), 422),
        ("unparseable phone", json_ct, with("from", json!("call me maybe")), 422),
        ("string timestamp", json_ct, with("timestamp", json!("yesterday")), 422),
        ("array company", json_ct, with("company_id", json!(["a"])), 422),
        ("a 257-byte id", json_ct, with("id", json!("i".repeat(257))), 422),
        ("a 65-byte company", json_ct, with("company_id", json!("c".repeat(65))), 422),
        ("a 30 KB company", json_ct, with("company_id", json!("c".repeat(30 * 1024))), 422),
        ("a company with a space", json_ct, with("company_id", json!("salon one")), 422),
        ("a text over ingest.max_text_bytes", json_ct, with("message", json!("я".repeat(8193))), 422),
        ("a negative timestamp", json_ct, with("timestamp", json!(-5)), 422),
        ("a timestamp in milliseconds", json_ct, with("timestamp", json!(1_763_800_000_000u64)), 422),
        ("a JSON array", json_ct, b"[]".to_vec(), 422),
        ("oversized body", json_ct, with("message", json!("x".repeat(70 * 1024))), 413),
        ("text/plain", Some("text/plain"), serde_json::to_vec(&good("bad")).unwrap(), 415),
        ("form", Some("application/x-www-form-urlencoded"), b"id=1".to_vec(), 415),
        ("no content type", None, serde_json::to_vec(&good("bad")).unwrap(), 415),
    ];
    for (what, ct, body, want) in cases {
        let (status, body) = raw(&d, ct, body).await;
        assert_eq!(status, want, "{what}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {body}");
    }

    // An oversized body sent chunked (no Content-Length) is refused too.
    let addr = d.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk =
        format!("{{\"id\":\"big\",\"from\":\"79001234567\",\"message\":\"{}\"}}", "y".repeat(80 * 1024));
    let req = format!(
        "POST /webhook/whatsapp/batched HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {WEBHOOK_TOKEN}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let _ = s.write_all(req.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Nothing of the above was stored, batched, deduplicated or answered.
    let (_, batches) = d.get("/api/batches").await;
    assert_eq!(batches["batches"], json!([]));
    sleep(Duration::from_secs(60)).await;
    assert!(handler.calls().is_empty());
    // "bad" was never marked seen: the same id with a valid body is new.
    assert_eq!(d.post("/webhook/whatsapp/batched", &good("bad")).await.1, json!({"status": "accepted"}));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn unknown_routes_and_methods_answer_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let (status, body) = d.get("/nope").await;
    assert_eq!((status, body["error"].is_string()), (404, true));
    let (status, body) = d.get("/webhook/whatsapp/batched").await;
    assert_eq!((status, body["error"].is_string()), (405, true));
    assert_eq!(d.get("/healthz").await, (200, json!({"status": "ok"})));
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_gateways_oversized_fields_are_quarantined_and_an_empty_text_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.meta.app_secret = META_SECRET.into();
    c.meta.companies = std::collections::HashMap::from([("1055".into(), "962302".into())]);
    let d = Daemon::start(c).await;
    let message = |id: &str, body: &str| {
        json!({"object": "whatsapp_business_account", "entry": [{"id": "W", "changes": [{"field": "messages",
            "value": {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1055"},
                      "messages": [{"from": "79001234567", "id": id, "timestamp": "1763800000", "type": "text",
                                    "text": {"body": body}}]}}]}]})
    };
    // A signed 60,000-byte id and a 20 KB text: kept in the quarantine with
    // the reason, not stored as messages.
    for (body, why) in [
        (message(&"w".repeat(60_000), "Привет"), "`id` is longer than 256 bytes"),
        (message("wamid.long", &"я".repeat(10_000)), "ingest.max_text_bytes"),
    ] {
        assert_eq!(post_meta(&d, &body).await, 200);
        let (_, q) = d.get("/api/quarantine").await;
        let reasons: Vec<&str> =
            q["quarantine"].as_array().unwrap().iter().filter_map(|e| e["reason"].as_str()).collect();
        assert!(reasons.iter().any(|r| r.contains(why)), "{q}");
    }
    // A text message with no text: nothing to answer, like WAHA and Evolution.
    assert_eq!(post_meta(&d, &message("wamid.empty", "  ")).await, 200);
    let (_, batches) = d.get("/api/batches").await;
    assert_eq!(batches["batches"], json!([]), "nothing was stored");
    d.stop().await;
}

/// Every admin route that takes a path parameter, as `src/http/admin.rs`
/// and `console.rs` declare them (so a new one is covered without editing
/// this test).
fn parameter_routes() -> Vec<(String, Vec<&'static str>)> {
    let source =
        [include_str!("../../src/http/admin.rs"), include_str!("../../src/http/console.rs")].concat();
    let mut out = Vec::new();
    for line in source.lines().filter(|l| l.contains(".route(\"")) {
        let path = line.split('"').nth(1).unwrap().to_owned();
        if !path.contains('{') {
            continue;
        }
        let methods: Vec<&str> = ["get", "post", "put", "delete"]
            .into_iter()
            .filter(|m| line.contains(&format!("{m}(")) || line.contains(&format!(".{m}(")))
            .collect();
        out.push((path, methods));
    }
    out
}

/// Raw bytes to a listener; the status, content type and body of the answer.
async fn raw_request(base: &str, request: &[u8]) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    let _ = s.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let ct = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_owned))
        .unwrap_or_default();
    (status, ct, body.to_owned())
}

#[tokio::test(start_paused = true)]
async fn every_refusal_is_json_on_both_listeners_from_a_bad_path_to_oversized_headers() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let routes = parameter_routes();
    assert!(routes.len() >= 10, "{routes:?}");
    for (path, methods) in &routes {
        // Each parameter a byte that is not UTF-8.
        let mut bad = String::new();
        let mut rest = path.as_str();
        while let Some((before, after)) = rest.split_once('{') {
            bad.push_str(before);
            bad.push_str("%FF");
            rest = after.split_once('}').map_or("", |(_, a)| a);
        }
        bad.push_str(rest);
        for method in methods {
            let m = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let r = d
                .client
                .request(m, format!("{}{bad}", d.admin))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let ct =
                r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            let body = r.text().await.unwrap();
            assert!((400..500).contains(&status), "{method} {bad}: {status} {body}");
            assert!(ct.starts_with("application/json"), "{method} {bad}: {ct} {body}");
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{method} {bad}: {body}"));
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{method} {bad}: {body}");
        }
    }
    // What hyper refuses before any route runs: the same shape, on both listeners.
    hyper_refusals_are_json(&[&d.base, &d.admin]).await;
    // And the daemon still answers.
    assert_eq!(d.get("/healthz").await, (200, json!({"status": "ok"})));
    d.stop().await;
}

/// A request hyper refuses before any route runs (headers or URI too
/// large, not HTTP) gets the JSON refusal on each of `bases`.
async fn hyper_refusals_are_json(bases: &[&str]) {
    let huge = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "h".repeat(500 * 1024));
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many = format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "u".repeat(70 * 1024));
    for base in bases {
        for (what, request, want) in [
            ("a 500 KB header", huge.as_bytes(), 431),
            ("150 header fields", many.as_bytes(), 431),
            ("a 70 KB URI", long_uri.as_bytes(), 414),
            ("not HTTP", b"HELLO THERE\r\n\r\n".as_slice(), 400),
        ] {
            let (status, ct, body) = raw_request(base, request).await;
            assert_eq!(status, want, "{what} on {base}: {body}");
            assert_eq!(ct, "application/json", "{what} on {base}");
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: {body:?}"));
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {body}");
        }
    }
}

/// While the store cannot be opened yet (here: its first two opens fail as
/// an I/O error would), the daemon waits in place: health 200, everything
/// else 503 with the reason — in JSON, hyper's own refusals too — and once
/// the store opens, webhooks are taken with nobody restarting anything.
#[tokio::test]
async fn while_the_store_cannot_open_every_answer_is_json_and_then_webhooks_are_taken() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_millis(5)).await;
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let mut env = binary_env(ports, &dir.path().join("data"), Some(&handler.url));
    env.push((turnstile::config::TEST_FAULTS_ENV, "store-open-fails=2".into()));
    let _daemon = Spawned(spawn_binary(&env, &dir.path().join("daemon.log")));
    let client = reqwest::Client::new();
    let alive = std::time::Instant::now();
    while client.get(format!("{base}/healthz")).send().await.map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(alive.elapsed() < Duration::from_secs(20), "never alive");
        sleep(Duration::from_millis(20)).await;
    }
    let webhook = json!({"id": "w-1", "from": "79001230001", "message": "привет"});
    let waiting = post_batched(&client, &base, &webhook).await.unwrap();
    assert_eq!(waiting.status(), 503);
    let v: Value = waiting.json().await.unwrap();
    assert!(v["error"].as_str().is_some_and(|e| e.contains("cannot be opened yet")), "{v}");
    let r = client.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    hyper_refusals_are_json(&[&base, &admin]).await;

    wait_ready(&client, &admin).await;
    let taken = post_batched(&client, &base, &webhook).await.unwrap();
    assert_eq!(taken.status(), 200);
    assert_eq!(taken.json::<Value>().await.unwrap()["status"], "accepted");
    let committed = std::time::Instant::now();
    while handler.calls().is_empty() {
        assert!(committed.elapsed() < Duration::from_secs(20), "the message never reached the handler");
        sleep(Duration::from_millis(50)).await;
    }
    let call = &handler.calls()[0];
    assert_eq!((call.ids.as_slice(), call.text.as_str()), (["w-1".to_owned()].as_slice(), "привет"));
}
