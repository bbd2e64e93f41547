//! The release binary as a separate process, for the benches that drive it
//! over loopback: ports, start, readiness, RSS, metrics, and an open-loop
//! webhook load that records every acknowledgement's latency.

#![allow(dead_code)] // each bench uses its own part of this file

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The daemon's public port (webhooks, /readyz) and admin port (/metrics, /api).
#[derive(Clone, Copy)]
pub struct Ports {
    pub public: u16,
    pub admin: u16,
}

pub fn free_ports() -> Ports {
    let public = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Ports { public: public.local_addr().unwrap().port(), admin: admin.local_addr().unwrap().port() }
}

/// `turnstile serve` on `data`, its defaults but for the ports and `env`.
pub fn spawn<V: AsRef<std::ffi::OsStr>>(data: &Path, ports: Ports, env: &[(&str, V)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("serve")
        .env_clear()
        .env("TURNSTILE_SERVER_LISTEN", format!("127.0.0.1:{}", ports.public))
        .env("TURNSTILE_SERVER_ADMIN_LISTEN", format!("127.0.0.1:{}", ports.admin))
        .env("TURNSTILE_SERVER_DATA_DIR", data)
        .env("TURNSTILE_LOG_FILTER", "warn")
        // The benches time batches by `batching.debounce_ms`; a bench's own
        // TURNSTILE_BATCHING_POLICY (in `env`) wins.
        .env("TURNSTILE_BATCHING_POLICY", "fixed")
        .envs(env.iter().map(|(k, v)| (k, v.as_ref())))
        // The allocator's own settings pass through, to try them.
        .envs(std::env::vars().filter(|(k, _)| k.starts_with("MIMALLOC_")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the release binary")
}

/// SIGTERM, then wait for the exit.
pub fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

pub async fn wait_ready(client: &reqwest::Client, port: u16) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("http://127.0.0.1:{port}/readyz")).send().await {
            if r.status() == 200 {
                return start.elapsed();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(300), "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A client for the benches: it drops pooled connections well before the
/// daemon closes idle ones (`server.header_timeout_ms`, 30 s), so a request
/// never races that close on a connection the daemon is shutting.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(10)).build().unwrap()
}

/// `/metrics`, tried twice: a report must not end a long run on one
/// connection error (the second error says what happened).
pub async fn scrape(client: &reqwest::Client, port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    for attempt in 1..=2 {
        match client.get(&url).send().await {
            Ok(r) => return r.text().await.unwrap(),
            Err(e) if attempt == 2 => panic!("{url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    unreachable!()
}

/// Latencies of acknowledged webhooks and the count of failed ones, taken
/// by whoever reports (so each report covers the time since the last one).
#[derive(Default)]
pub struct Recorder {
    latencies_us: Mutex<Vec<u64>>,
    failed: AtomicU64,
    acked: AtomicU64,
}

impl Recorder {
    /// The latencies since the last call, sorted, and the failures.
    pub fn take(&self) -> (Vec<u64>, u64) {
        let mut l = std::mem::take(&mut *self.latencies_us.lock().unwrap());
        l.sort_unstable();
        (l, self.failed.swap(0, Ordering::Relaxed))
    }

    /// Every webhook acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
}

/// The `q` quantile of sorted microseconds, in milliseconds.
pub fn quantile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    sorted_us[((sorted_us.len() as f64 * q) as usize).min(sorted_us.len() - 1)] as f64 / 1e3
}

/// Posts generic webhooks at `rate` per second (open loop: on schedule,
/// whatever the answers do) over `phones` phones until `until` resolves,
/// each with a unique id under `tag`; waits for the answers of all sent.
pub async fn open_loop(
    client: &reqwest::Client,
    port: u16,
    rate: u64,
    phones: u64,
    tag: &str,
    rec: Arc<Recorder>,
    until: impl std::future::Future<Output = ()>,
) {
    let url = format!("http://127.0.0.1:{port}/webhook/whatsapp/batched");
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    let mut until = std::pin::pin!(until);
    for i in 0u64.. {
        let due = start + Duration::from_micros(i * 1_000_000 / rate);
        tokio::select! {
            _ = &mut until => break,
            _ = tokio::time::sleep_until(due) => {}
        }
        let (client, url, rec) = (client.clone(), url.clone(), rec.clone());
        let body = serde_json::json!({
            "id": format!("{tag}-{i}"),
            "from": format!("7907{:07}", i % phones),
            "message": "Привет, можно записаться на стрижку завтра?",
        });
        tasks.spawn(async move {
            let sent = Instant::now();
            match client.post(url).json(&body).send().await {
                Ok(r) if r.status() == 200 => {
                    rec.latencies_us.lock().unwrap().push(sent.elapsed().as_micros() as u64);
                    rec.acked.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    rec.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        while let Some(done) = tasks.try_join_next() {
            done.unwrap();
        }
    }
    while tasks.join_next().await.is_some() {}
}
