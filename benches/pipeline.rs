//! Pipeline benchmark (issue 6), on the release binary as a separate process:
//!
//! 1. recovery: start-to-ready with 100,000 pending messages on disk;
//! 2. memory: RSS idle, and the bytes each pending phone adds;
//! 3. debounce precision: 10,000 phones with pending batches, cut - deadline;
//! 4. turn overhead (echo handler, no I/O): deadline -> handler call,
//!    handler answer -> commit on disk.
//!
//! Run as below; `-- recovery MESSAGES PHONES` runs phase 1 alone, at that
//! size too (issue 24 asks for a million messages of 100,000 phones):
//!
//! ```text
//! cargo bench --bench pipeline
//! cargo bench --bench pipeline -- recovery 1000000 100000
//! ```
//!
//! Loopback only; every phase is bounded. Percentiles of 3 and 4 come from
//! the daemon's own histograms (`/metrics`), so they are bucket bounds.

#[path = "support/daemon.rs"]
mod daemon;

use std::time::{Duration, Instant};
use turnstile::message::Urgency;

use daemon::{free_ports, rss_kb, scrape, spawn, stop, wait_ready};
use turnstile::message::{unix_ms, Conv, NewMessage};
use turnstile::store::Store;

const PENDING_MESSAGES: u64 = 100_000;
const PHONES: u64 = 10_000;

fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// (count, p50 bound, p99 bound) of a histogram, in milliseconds.
fn quantiles(text: &str, name: &str) -> (u64, String, String) {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (le, count) = rest.split_once("\"} ").unwrap();
            (le.to_owned(), count.parse().unwrap())
        })
        .collect();
    let count = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let at = |q: f64| {
        let (le, _) = buckets.iter().find(|(_, c)| *c >= q * count).unwrap();
        match le.parse::<f64>() {
            Ok(s) => format!("≤ {} ms", s * 1e3),
            Err(_) => "above the last bucket".into(),
        }
    };
    (count as u64, at(0.50), at(0.99))
}

fn report(text: &str) {
    for (name, what) in [
        ("turnstile_debounce_lag_seconds", "cut - deadline"),
        ("turnstile_deadline_to_handler_seconds", "deadline -> handler call"),
        ("turnstile_commit_seconds", "handler answer -> commit on disk"),
        ("turnstile_turn_duration_seconds", "turn start -> commit"),
    ] {
        let (n, p50, p99) = quantiles(text, name);
        println!("  {what:<34} p50 {p50:<14} p99 {p99:<14} (n={n})");
    }
}

async fn post_many(client: &reqwest::Client, port: u16, ids: std::ops::Range<u64>, per_second: u64) {
    let url = format!("http://127.0.0.1:{port}/webhook/whatsapp/batched");
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in ids.clone() {
        let (client, url) = (client.clone(), url.clone());
        let due = start + Duration::from_micros((i - ids.start) * 1_000_000 / per_second);
        tasks.spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            let body = serde_json::json!({"id": format!("p{i}"), "from": format!("7904{:07}", i), "message": "Привет"});
            let r = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
        });
        while tasks.len() >= 64 {
            tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Starts the daemon three times on `messages` pending messages of
/// `phones` phones (written through the store first) and reports start to
/// ready, and the memory they take: RSS after the start, less an empty
/// daemon's, per pending message.
async fn recovery(client: &reqwest::Client, quiet: &[(&str, &str)], messages: u64, phones: u64) {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports();
    let child = spawn(&dir.path().join("empty"), ports, quiet);
    wait_ready(client, ports.public).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kb(child.id());
    stop(child);

    let data = dir.path().join("data");
    let t = Instant::now();
    {
        let store = Store::open(&data).unwrap();
        store.set_sink(Some(std::sync::Arc::new(|_| true)));
        let now = unix_ms();
        for from in (0..messages).step_by(1000) {
            let chunk: Vec<NewMessage> = (from..(from + 1000).min(messages))
                .map(|i| NewMessage {
                    id: format!("r{i}"),
                    conv: Conv { phone: format!("7903{:07}", i % phones), company_id: "default".into() },
                    kind: "text".into(),
                    text: "Привет, можно записаться?".into(),
                    timestamp: None,
                    received_at_ms: now,
                })
                .collect();
            store.accept(chunk, Urgency::Debounced).await.unwrap();
        }
        store.close().await.unwrap();
    }
    println!(
        "== recovery: {messages} pending messages of {phones} phones on disk (written in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let mut times = Vec::new();
    let (mut loaded_rss, mut heap) = (0, 0);
    for _ in 0..3 {
        let ports = free_ports();
        let t = Instant::now();
        let child = spawn(&data, ports, quiet);
        wait_ready(client, ports.public).await;
        times.push(t.elapsed());
        loaded_rss = rss_kb(child.id());
        let metrics = scrape(client, ports.admin).await;
        assert_eq!(
            value(&metrics, "turnstile_pending_messages") as u64,
            messages,
            "every message back in a batch"
        );
        heap = value(&metrics, "turnstile_heap_bytes") as u64;
        stop(child);
    }
    times.sort();
    println!(
        "  start to ready: {} (three starts), RSS then {} MiB ({} B per pending message over an empty daemon's {} MiB), live heap {} MiB ({} B per pending message)",
        times.iter().map(|t| format!("{:.0} ms", t.as_secs_f64() * 1e3)).collect::<Vec<_>>().join(", "),
        loaded_rss / 1024,
        loaded_rss.saturating_sub(idle) * 1024 / messages,
        idle / 1024,
        heap >> 20,
        heap / messages,
    );
}

fn main() {
    // `cargo bench --bench pipeline -- recovery MESSAGES PHONES`: the
    // recovery phase alone, at that size too (issue 24: 1,000,000 of 100,000).
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let recovery_only = match &args[..] {
        [mode, messages, phones] if mode == "recovery" => {
            Some((messages.parse().unwrap(), phones.parse().unwrap()))
        }
        [] => None,
        _ => panic!("usage: cargo bench --bench pipeline [-- recovery MESSAGES PHONES]"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let quiet: &[(&str, &str)] = &[
            ("TURNSTILE_BATCHING_DEBOUNCE_MS", "600000"),
            ("TURNSTILE_BATCHING_MAX_WAIT_MS", "600000"),
            ("TURNSTILE_BATCHING_MAX_MESSAGES", "1000"),
        ];

        // 1. Recovery.
        recovery(&client, quiet, PENDING_MESSAGES, PHONES).await;
        if let Some((messages, phones)) = recovery_only {
            recovery(&client, quiet, messages, phones).await;
            return;
        }

        // 2. Memory.
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports();
        let child = spawn(&dir.path().join("data"), ports, quiet);
        wait_ready(&client, ports.public).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = rss_kb(child.id());
        post_many(&client, ports.public, 0..PHONES, 5_000).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let loaded = rss_kb(child.id());
        println!("== memory: RSS idle {idle} kB; with {PHONES} phones pending {loaded} kB");
        println!(
            "  added per pending phone: {:.0} B",
            (loaded.saturating_sub(idle) * 1024) as f64 / PHONES as f64
        );
        stop(child);

        // 3 and 4. Debounce precision and turn overhead.
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports();
        let child = spawn(&dir.path().join("data"), ports, &[("TURNSTILE_BATCHING_DEBOUNCE_MS", "2000")]);
        wait_ready(&client, ports.public).await;
        post_many(&client, ports.public, 0..PHONES, 2_500).await;
        let start = Instant::now();
        let text = loop {
            let text = scrape(&client, ports.admin).await;
            if value(&text, "turnstile_turns_committed_total") as u64 >= PHONES {
                break text;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "turns never finished");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!(
            "== {PHONES} phones, one pending batch each, 2,500 new phones/s, debounce 2 s, echo handler"
        );
        report(&text);
        stop(child);

        // 4. The same, unloaded: turns never wait for a slot or a busy disk.
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports();
        let child = spawn(&dir.path().join("data"), ports, &[("TURNSTILE_BATCHING_DEBOUNCE_MS", "500")]);
        wait_ready(&client, ports.public).await;
        post_many(&client, ports.public, 0..300, 50).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!("== 300 phones, 50 new phones/s, debounce 0.5 s, echo handler (turn overhead, unloaded)");
        report(&scrape(&client, ports.admin).await);
        stop(child);
    });
}
