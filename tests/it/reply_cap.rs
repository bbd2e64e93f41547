//! The outbound abuse limit: at most `gateway.max_replies_per_conversation_per_hour`
//! replies go to one conversation in any hour; the excess is parked, listed
//! and counted — never sent late, never dropped silently.

use std::time::Duration;

use prometheus_parse::{Scrape, Value as Metric};
use serde_json::{json, Value};
use tokio::time::sleep;

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);

async fn counter(d: &Daemon, name: &str) -> f64 {
    let text = d.client.get(d.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    match scrape.samples.iter().find(|s| s.metric == name).unwrap_or_else(|| panic!("no {name}")).value {
        Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => v,
        _ => panic!("{name} is not a single value"),
    }
}

/// One message to the immediate webhook, then time for its turn to commit.
async fn say(d: &Daemon, id: &str, phone: &str, text: &str) {
    let body = json!({"id": id, "from": phone, "message": text});
    assert_eq!(d.post("/webhook/whatsapp", &body).await, (200, json!({"status": "accepted"})));
    sleep(2 * S).await;
}

#[tokio::test(start_paused = true)]
async fn replies_over_the_hourly_cap_are_parked_listed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let hook = FakeServer::start(|_| json!({"ok": true})).await;
    let mut c = config(dir.path());
    http_gateway(&mut c, &hook);
    c.gateway.max_chars = 40;
    c.gateway.max_replies_per_conversation_per_hour = 2;
    let d = Daemon::start(c).await;
    let (a, b) = ("79001110001", "79001110002");
    let long = "длинное сообщение. ".repeat(3);
    for (i, text) in ["один", "два", long.as_str(), "четыре"].iter().enumerate() {
        say(&d, &format!("a{i}"), a, text).await;
    }
    say(&d, "b0", b, "другой клиент").await;
    sleep(60 * S).await;

    let texts = |phone: &str| -> Vec<String> {
        hook.delivered("/send")
            .iter()
            .filter(|s| s.body["phone"] == phone)
            .map(|s| s.body["text"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(texts(a), ["received: один", "received: два"], "two replies an hour, in order");
    assert_eq!(texts(b), ["received: другой клиент"], "other conversations are not held back");
    // The third reply (two pieces) and the fourth: parked, listed, counted.
    let (_, outbox) = d.get("/api/outbox").await;
    let parked: Vec<&Value> = outbox["outbox"].as_array().unwrap().iter().collect();
    assert_eq!(parked.len(), 3, "{outbox}");
    for item in &parked {
        assert_eq!(
            (item["phone"].as_str(), item["state"].as_str()),
            (Some(a), Some("rate_limited")),
            "{item}"
        );
        assert_eq!(item["attempts"], 0);
        let reason = item["last_error"].as_str().unwrap();
        assert!(reason.contains("gateway.max_replies_per_conversation_per_hour"), "{reason}");
    }
    assert_eq!(parked.iter().map(|i| i["parts"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 2, 1]);
    assert_eq!(counter(&d, "turnstile_replies_rate_limited_total").await, 2.0, "replies, not pieces");
    assert_eq!(counter(&d, "turnstile_outbox_rate_limited").await, 3.0);
    assert_eq!(counter(&d, "turnstile_outbox_failed").await, 0.0);
    assert_eq!(counter(&d, "turnstile_outbox_depth").await, 0.0);
    // The turns themselves committed: the replies are in the history.
    let (_, conv) = d.get(&format!("/api/conversations/{a}")).await;
    assert_eq!(conv["turns"].as_array().unwrap().len(), 4);

    // An hour on, the window has room again: new replies go out; the parked
    // ones stay parked, never sent an hour late.
    sleep(3600 * S).await;
    say(&d, "a4", a, "пять").await;
    wait_until("the reply after the hour", 30 * S, || texts(a).len() == 3).await;
    sleep(10 * S).await;
    assert_eq!(texts(a)[2], "received: пять");
    assert_eq!(texts(a).len(), 3);
    assert_eq!(d.get("/api/outbox").await.1["outbox"].as_array().unwrap().len(), 3);
    d.stop().await;
}
