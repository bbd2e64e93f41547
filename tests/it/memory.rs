//! Memory bounded by configuration, against the real binary (its /metrics
//! counts the live heap): the worst storms the caps allow leave the heap
//! under the formula of docs/operating.md ("Disk and memory"), and what the
//! caps refuse stores nothing.
//!
//! The formula, with nothing pending or running:
//!     live heap ≤ 40 MiB + 4 × store.cache_mb (+ 4 × store.cache_mb more
//!     while a rewrite of sled's files runs: one cache per copy)
//! (pending messages add about twice their bytes, a running turn about
//! twice its messages and answer; both are zero once the storm settled).
//! The storm grows sled's file past `store.rewrite_after_mb`, so a rewrite
//! may run at any point of it: the rewrite's term is always allowed.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::helpers::*;

const CACHE_MB: u64 = 8;
const MIB: f64 = 1024.0 * 1024.0;

fn bound() -> f64 {
    (40 + 2 * 4 * CACHE_MB) as f64 * MIB
}

async fn metrics(client: &reqwest::Client, admin: &str) -> HashMap<String, f64> {
    let text = client.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| l.split_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
        .collect()
}

/// Until nothing is pending, running or waiting to be sent.
async fn settled(client: &reqwest::Client, admin: &str, log: &std::path::Path) -> HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let m = metrics(client, admin).await;
        let busy = ["turnstile_pending_messages", "turnstile_turns_in_flight", "turnstile_outbox_depth"]
            .iter()
            .map(|k| m.get(*k).copied().unwrap_or(1.0))
            .sum::<f64>();
        if busy == 0.0 {
            return m;
        }
        assert!(Instant::now() < deadline, "never settled: {m:?}\n{}", log_tail(log, 40));
        sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storms_at_the_caps_keep_the_heap_under_the_documented_bound() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("daemon.log");
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let mut env = binary_env(ports, &dir.path().join("data"), None);
    env.extend([
        ("TURNSTILE_INGEST_WEBHOOK_TOKEN", WEBHOOK_TOKEN.into()),
        ("TURNSTILE_STORE_CACHE_MB", CACHE_MB.to_string()),
        ("TURNSTILE_BATCHING_DEBOUNCE_MS", "200".into()),
        ("TURNSTILE_BATCHING_MAX_WAIT_MS", "1000".into()),
    ]);
    let mut daemon = spawn_binary(&env, &log);
    let client = reqwest::Client::new();
    wait_ready(&client, &admin).await;
    let post = {
        let (client, base) = (client.clone(), base.clone());
        move |body: Value| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let r = client
                    .post(format!("{base}/webhook/whatsapp/batched"))
                    .bearer_auth(WEBHOOK_TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            }
        }
    };

    // 1. The company-id storm: 30 KB company ids are refused, naming the
    //    field, and nothing of them is kept.
    for i in 0..300 {
        let (status, body) = post(json!({
            "id": format!("c{i}"), "from": format!("7904{:07}", i % 30), "message": "hi",
            "company_id": "x".repeat(30_000),
        }))
        .await;
        assert_eq!(status, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains("company_id"), "{body}");
    }
    let (status, body) =
        post(json!({"id": "t-long", "from": "79040000001", "message": "я".repeat(8193)})).await;
    assert_eq!(
        (status, body["error"].as_str().is_some_and(|e| e.contains("message"))),
        (422, true),
        "{body}"
    );
    let (_, conv) = {
        let r = client.get(format!("{admin}/api/conversations/79040000001")).send().await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(conv["turns"], json!([]), "a refused webhook stores nothing: {conv}");
    let m = settled(&client, &admin, &log).await;
    assert!(
        m["turnstile_heap_bytes"] < bound(),
        "after the refused storm: {} MiB",
        m["turnstile_heap_bytes"] / MIB
    );

    // 2. The text storm at the cap: 3,000 texts of 16,000 bytes (the default
    //    cap is 16 KiB) over 300 phones, ten each: 48 MB of text, 96 MB as
    //    history with the echo's replies — past the bound, were it all kept
    //    (159 MiB, measured with no bytes bound on the history).
    let phones = 300;
    let text = "я".repeat(8000);
    let mut senders = Vec::new();
    for s in 0..6 {
        let post = post.clone();
        let text = text.clone();
        senders.push(tokio::spawn(async move {
            for i in (s..3000).step_by(6) {
                let (status, body) = post(
                    json!({"id": format!("m{i}"), "from": format!("7905{:07}", i % phones), "message": text}),
                )
                .await;
                assert_eq!(status, 200, "{body}");
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let m = settled(&client, &admin, &log).await;
    let heap = m["turnstile_heap_bytes"];
    eprintln!(
        "memory: text storm settled, live heap {:.1} MiB (bound {:.0} MiB), {} rewrites",
        heap / MIB,
        bound() / MIB,
        m.get("turnstile_store_rewrites_total").copied().unwrap_or(0.0)
    );
    assert!(heap < bound(), "after the text storm: {:.1} MiB over {:.0} MiB", heap / MIB, bound() / MIB);

    // Every message answered, and each conversation's history within its
    // bytes: the newest turns kept, texts clipped where one turn is larger.
    let mut seen = 0;
    for p in 0..phones {
        let r = client.get(format!("{admin}/api/conversations/7905{p:07}")).send().await.unwrap();
        let conv: Value = r.json().await.unwrap();
        let turns = conv["turns"].as_array().unwrap();
        assert!(!turns.is_empty(), "7905{p:07} has its newest turn");
        let texts: usize = turns
            .iter()
            .flat_map(|t| t["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap().len()))
            .chain(turns.iter().map(|t| t["reply"].as_str().map_or(0, str::len)))
            .sum();
        assert!(texts <= 32 * 1024, "7905{p:07}: {texts} bytes of history texts");
        seen += turns.iter().map(|t| t["messages"].as_array().unwrap().len()).sum::<usize>();
    }
    let committed = m["turnstile_turns_committed_total"];
    assert!(committed >= phones as f64, "{committed} turns");
    assert!(seen >= phones, "{seen} messages in the kept history");

    // 3. The context burst at the cap: 40 contexts of ~4 MB (the default
    //    `context.max_bytes`) of random text, ~3 MB each once deflated,
    //    one after another — 120 MB stored. Parts that large live in files,
    //    not in sled's cache (which kept every one: 31 → 205 MiB for 60).
    let blob = incompressible(4_000_000);
    let body =
        |i: usize| json!({"dialogue": {"n": i, "notes": &blob[i..i + 100_000]}, "cache": {"blob": &blob}});
    for i in 0..40 {
        let r = client
            .put(format!("{admin}/api/contexts/default/7906{i:07}"))
            .json(&body(i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let m = settled(&client, &admin, &log).await;
    let heap = m["turnstile_heap_bytes"];
    eprintln!("memory: after the context burst, live heap {:.1} MiB", heap / MIB);
    assert!(heap < bound(), "after the context burst: {:.1} MiB over {:.0} MiB", heap / MIB, bound() / MIB);
    let context = |i: usize| {
        let client = client.clone();
        let url = format!("{admin}/api/contexts/default/7906{i:07}");
        async move { client.get(url).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let got = context(7).await;
    assert_eq!(
        (&got["dialogue"], &got["cache"]),
        (&body(7)["dialogue"], &body(7)["cache"]),
        "read back whole"
    );

    // 4. After a restart (the open walks the history): still bounded.
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let mut daemon = spawn_binary(&env, &log);
    wait_ready(&client, &admin).await;
    let m = settled(&client, &admin, &log).await;
    let heap = m["turnstile_heap_bytes"];
    eprintln!("memory: after a restart, live heap {:.1} MiB", heap / MIB);
    assert!(heap < bound(), "after a restart: {:.1} MiB", heap / MIB);
    let got = context(39).await;
    assert_eq!((&got["dialogue"], &got["cache"]), (&body(39)["dialogue"], &body(39)["cache"]), "kept");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}
