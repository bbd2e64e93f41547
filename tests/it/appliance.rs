//! The appliance: readiness, draining shutdown, metrics, the admin token.

use std::time::Duration;

use prometheus_parse::{Scrape, Value as Metric};
use serde_json::json;
use tokio::time::sleep;

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn shutdown_commits_what_finishes_in_the_grace_period_refuses_webhooks_and_re_runs_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    handler.set_delay_for("79001110001", 2 * S); // finishes within the grace period
    handler.set_delay_for("79001110002", 60 * S); // does not
    let mut c = config_with(dir.path(), &handler);
    c.turns.shutdown_grace_ms = 10_000;
    let mut d = Daemon::start(c.clone()).await;
    assert_eq!(d.get("/readyz").await, (200, json!({"status": "ready"})));
    for (id, phone) in [("f1", "79001110001"), ("s1", "79001110002")] {
        d.post("/webhook/whatsapp", &json!({"id": id, "from": phone, "message": "Привет"})).await;
    }
    wait_until("both turns to start", 5 * S, || handler.calls().len() == 2).await;

    d.begin_stop();
    sleep(S / 2).await;
    // Draining: the gateway is told to come back later, and nothing is stored.
    let (status, body) = d
        .post("/webhook/whatsapp/batched", &json!({"id": "late", "from": "79001110003", "message": "эй"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].is_string());
    assert_eq!(d.get("/readyz").await.0, 503);
    assert_eq!(d.get("/healthz").await.0, 200, "alive while draining");
    d.stopped().await;

    handler.set_delay_for("79001110002", Duration::ZERO);
    let d = Daemon::start(c).await;
    wait_until("the unfinished turn to re-run", 10 * S, || handler.calls().len() == 3).await;
    sleep(S).await;
    let calls = handler.calls();
    let slow: Vec<_> = calls.iter().filter(|c| c.phone == "79001110002").collect();
    assert_eq!(
        (slow.len(), slow[0].turn_id.as_str()),
        (2, slow[1].turn_id.as_str()),
        "same turn, re-run once"
    );
    for (phone, id) in [("79001110001", "f1"), ("79001110002", "s1")] {
        let (_, conv) = d.get(&format!("/api/conversations/{phone}")).await;
        let turns = conv["turns"].as_array().unwrap();
        assert_eq!(turns.len(), 1, "{phone}: exactly one committed turn");
        assert_eq!(turns[0]["messages"][0]["id"], id);
    }
    let (_, late) = d.get("/api/conversations/79001110003").await;
    assert_eq!(late["turns"], json!([]), "the refused webhook stored nothing");
    d.stop().await;
}

/// A value from a scrape: counters and gauges as they are, histograms as their count.
fn metric(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &sample.value {
        Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => *v,
        Metric::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
        Metric::Summary(_) => panic!("no summaries here"),
    }
}

async fn scrape(d: &Daemon) -> Scrape {
    let r = d.client.get(d.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

#[tokio::test(start_paused = true)]
async fn metrics_parse_and_move_under_a_small_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let before = scrape(&d).await;
    assert_eq!(metric(&before, "turnstile_ready", &[]), 1.0);
    assert_eq!(metric(&before, "turnstile_turns_committed_total", &[]), 0.0);

    for (i, text) in BURST.iter().enumerate() {
        d.send(&format!("a{i}"), "79001234567", text).await;
    }
    d.send("b0", "79007654321", "Здравствуйте").await;
    d.post("/webhook/whatsapp/batched", &json!({"id": "bad"})).await;
    sleep(2 * S).await;
    let pending = scrape(&d).await;
    assert_eq!(metric(&pending, "turnstile_pending_batches", &[]), 2.0);
    assert_eq!(metric(&pending, "turnstile_pending_messages", &[]), 6.0);
    let oldest = metric(&pending, "turnstile_oldest_pending_batch_seconds", &[]);
    assert!((2.0..2.5).contains(&oldest), "the first batch has collected for 2 s: {oldest}");
    assert_eq!(metric(&pending, "turnstile_batch_max_wait_seconds", &[]), 60.0);
    assert!(metric(&pending, "turnstile_store_last_sync_age_seconds", &[]) < 60.0, "the acks were synced");

    sleep(9 * S).await;
    let after = scrape(&d).await;
    let webhooks = |status| {
        metric(
            &after,
            "turnstile_webhooks_total",
            &[("endpoint", "/webhook/whatsapp/batched"), ("status", status)],
        )
    };
    assert_eq!((webhooks("200"), webhooks("422")), (6.0, 1.0));
    assert_eq!(metric(&after, "turnstile_turns_committed_total", &[]), 2.0);
    assert_eq!(metric(&after, "turnstile_batch_size", &[]), 2.0, "two batches cut");
    assert_eq!(metric(&after, "turnstile_debounce_lag_seconds", &[]), 2.0);
    assert_eq!(metric(&after, "turnstile_turn_duration_seconds", &[]), 2.0);
    assert_eq!(metric(&after, "turnstile_handler_latency_seconds", &[]), 2.0);
    assert_eq!(metric(&after, "turnstile_pending_batches", &[]), 0.0);
    assert_eq!(metric(&after, "turnstile_oldest_pending_batch_seconds", &[]), 0.0);
    assert_eq!(
        metric(&after, "turnstile_oldest_outbox_seconds", &[]),
        0.0,
        "the log gateway took the replies"
    );
    assert_eq!(metric(&after, "turnstile_turns_in_flight", &[]), 0.0);
    assert_eq!(metric(&after, "turnstile_contexts", &[]), 2.0, "echo keeps a counter per conversation");
    assert_eq!(
        metric(&after, "turnstile_context_cache_misses_total", &[]),
        2.0,
        "each turn read its context once"
    );
    assert!(metric(&after, "turnstile_fsyncs_total", &[]) >= 1.0);
    assert!(metric(&after, "turnstile_store_size_bytes", &[]) > 0.0);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn dedup_marks_move_out_of_the_trees_within_a_minute_and_a_restart_still_knows_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    for (i, text) in BURST.iter().enumerate() {
        d.send(&format!("a{i}"), "79001234567", text).await;
    }
    sleep(11 * S).await;
    assert_eq!(d.get("/api/conversations/79001234567").await.1["turns"].as_array().unwrap().len(), 1);
    sleep(61 * S).await;
    let after = scrape(&d).await;
    let records = |tree| metric(&after, "turnstile_tree_records", &[("tree", tree)]);
    assert_eq!((records("dedup"), records("dedup_archive")), (0.0, BURST.len() as f64));
    assert_eq!(
        metric(&after, "turnstile_store_file_bytes", &[("part", "dedup_archive")]),
        (16 + 16 * BURST.len()) as f64,
        "one chunk: its header and a hash per message"
    );
    d.stop().await;

    let d = Daemon::start(config(dir.path())).await;
    for i in 0..BURST.len() {
        let (status, body) = d.send(&format!("a{i}"), "79001234567", "again").await;
        assert_eq!((status, body["status"].as_str()), (200, Some("duplicate")), "a{i}");
    }
    assert_eq!(d.send("a9", "79001234567", "new").await.1["status"], "accepted");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_admin_token_guards_the_api_and_metrics_but_not_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.server.admin_token = "s3cret-admin-token-0042".into();
    let d = Daemon::start(c).await;
    let get = |path: &str, token: Option<&str>| {
        let mut r = d.client.get(d.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    for path in ["/api/batches", "/metrics", "/api/dead", "/api/contexts/1/79001234567"] {
        assert_eq!(get(path, None).await, 401, "{path} without a token");
        assert_eq!(get(path, Some("s3cret-admin-token-0041")).await, 401, "{path} with a wrong token");
        assert_ne!(get(path, Some("s3cret-admin-token-0042")).await, 401, "{path} with the token");
    }
    assert_eq!(get("/healthz", None).await, 200);
    assert_eq!(get("/readyz", None).await, 200);
    assert_eq!(d.send("w1", "79001234567", "Привет").await.0, 200, "gateways do not carry the admin token");
    d.stop().await;
}
