//! Ingest during an online backup (issue 11), on the release binary as a
//! separate process:
//!
//! 1. a store holding `CONTEXTS` contexts (default 1,000,000) is written
//!    through the library, then the daemon opens it;
//! 2. a steady webhook load (`RATE` per second over 1,000 phones, open loop)
//!    runs for `SECONDS` without a backup, then for as long again while
//!    `POST /api/backup` streams the whole store, back to back;
//! 3. the acknowledgement latencies of both phases are compared (p50, p99,
//!    max), and systemd's watchdog is played by this process: the daemon
//!    pings a notify socket of ours, and every gap between two pings is
//!    checked against `WATCHDOG_USEC`.
//!
//! ```text
//! cargo bench --bench backup
//! CONTEXTS=100000 SECONDS=10 cargo bench --bench backup
//! ```
//!
//! Loopback only; the data lives in a temporary directory under `target/`
//! (a real disk, as the appliance's) and goes when the bench ends.

#[path = "support/daemon.rs"]
mod daemon;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::{free_ports, open_loop, quantile_ms, wait_ready, Recorder};
use turnstile::backup::dir_size;

use serde_json::json;
use turnstile::context;
use turnstile::message::{unix_ms, Conv};
use turnstile::store::{ContextUpdate, Part, Store};

const PHONES: u64 = 1_000;
/// What the daemon is told systemd expects; it pings every half of it.
const WATCHDOG_USEC: u64 = 2_000_000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A conversation's context as a handler leaves it: a short dialogue and a
/// small client card (the salon snapshot is shared, not per conversation).
fn context_of(i: u64) -> ContextUpdate {
    let dialogue = json!([
        {"role": "user", "content": format!("Здравствуйте! Можно записаться на стрижку в четверг? ({i})")},
        {"role": "assistant", "content": "Добрый день! В четверг свободно в 12:00, 15:30 и 18:00. Какое время удобно?"},
        {"role": "user", "content": "15:30, к Анне"},
        {"role": "assistant", "content": "Записала вас на четверг, 15:30, стрижка женская у Анны. До встречи!"},
    ]);
    let cache =
        json!({"client": {"id": i, "name": "Клиент", "visits": i % 17, "last_service": "Стрижка женская"}});
    let part = |v: &serde_json::Value| {
        let e = context::encode(v);
        Part::Set { bytes: e.bytes, raw_len: e.raw_len }
    };
    ContextUpdate { dialogue: part(&dialogue), cache: part(&cache), slide: true, ttl_ms: 7 * 24 * 3_600_000 }
}

async fn fill(data: &Path, contexts: u64) {
    let store = Arc::new(Store::open(data).unwrap());
    let now = unix_ms();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..contexts {
        let store = store.clone();
        tasks.spawn(async move {
            let conv = Conv { phone: format!("7906{i:07}"), company_id: "default".into() };
            store.update_context(&conv, context_of(i), now).await.unwrap();
        });
        while tasks.len() >= 2048 {
            tasks.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    Arc::into_inner(store).expect("every writer done").close().await.unwrap();
}

/// One phase's latencies: its line of the report, and its p99.
fn line(what: &str, rec: &Recorder) -> f64 {
    let (l, failed) = rec.take();
    println!(
        "  {what:<22} n={:<7} p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  failed {failed}",
        l.len(),
        quantile_ms(&l, 0.50),
        quantile_ms(&l, 0.99),
        quantile_ms(&l, 1.0)
    );
    quantile_ms(&l, 0.99)
}

/// The watchdog's side: the time of every `WATCHDOG=1` the daemon sends.
fn watch(socket: UnixDatagram) -> Arc<Mutex<Vec<Instant>>> {
    let pings = Arc::new(Mutex::new(Vec::new()));
    let seen = pings.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = socket.recv(&mut buf) {
            if buf[..n].split(|b| *b == b'\n').any(|l| l == b"WATCHDOG=1") {
                seen.lock().unwrap().push(Instant::now());
            }
        }
    });
    pings
}

/// Streams one online backup into nothing; its size and duration.
async fn backup(client: &reqwest::Client, port: u16) -> (u64, Duration) {
    let start = Instant::now();
    let mut r = client.post(format!("http://127.0.0.1:{port}/api/backup")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the backup was refused");
    let mut bytes = 0;
    while let Some(chunk) = r.chunk().await.unwrap() {
        bytes += chunk.len() as u64;
    }
    (bytes, start.elapsed())
}

fn main() {
    let contexts = env_or("CONTEXTS", 1_000_000);
    let rate = env_or("RATE", 1_000);
    let seconds = env_or("SECONDS", 20);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        std::fs::create_dir_all("target").unwrap();
        let dir = tempfile::tempdir_in("target").unwrap();
        let data = dir.path().join("data");

        let t = Instant::now();
        fill(&data, contexts).await;
        println!(
            "== {contexts} contexts written in {:.0} s; data dir {:.0} MiB",
            t.elapsed().as_secs_f64(),
            dir_size(&data) as f64 / 1048576.0
        );

        let notify_path = dir.path().join("notify.sock");
        let pings = watch(UnixDatagram::bind(&notify_path).unwrap());
        let ports = free_ports();
        let env = [
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
            ("WATCHDOG_USEC", WATCHDOG_USEC.to_string()),
        ];
        let child = daemon::spawn(&data, ports, &env);
        let client = daemon::client();
        let ready = wait_ready(&client, ports.public).await;
        println!("  start to ready: {:.1} s", ready.as_secs_f64());

        println!("== ingest at {rate}/s over {PHONES} phones, {seconds} s each phase");
        let rec = Arc::new(Recorder::default());
        let quiet = tokio::time::sleep(Duration::from_secs(seconds));
        open_loop(&client, ports.public, rate, PHONES, "quiet", rec.clone(), quiet).await;
        let base = line("without a backup", &rec);

        let backups = Arc::new(Mutex::new(Vec::new()));
        let done = {
            let (client, backups) = (client.clone(), backups.clone());
            async move {
                // Whole backups only, back to back, for at least `seconds`.
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(seconds) {
                    let b = backup(&client, ports.admin).await;
                    backups.lock().unwrap().push(b);
                }
            }
        };
        open_loop(&client, ports.public, rate, PHONES, "backup", rec.clone(), done).await;
        let during = line("during online backups", &rec);
        let backups = backups.lock().unwrap().clone();
        let took: Vec<f64> = backups.iter().map(|b| b.1.as_secs_f64()).collect();
        println!(
            "  {} backups of {:.1} MiB each, {:.1}-{:.1} s each",
            backups.len(),
            backups.last().map_or(0, |b| b.0) as f64 / 1048576.0,
            took.iter().cloned().fold(f64::MAX, f64::min),
            took.iter().cloned().fold(0.0, f64::max)
        );
        println!("  p99 during / without: {:.2}x", during / base);

        let pings = pings.lock().unwrap().clone();
        let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
        let longest = gaps.iter().max().copied().unwrap_or_default();
        let missed = gaps.iter().filter(|g| g.as_micros() as u64 > WATCHDOG_USEC).count();
        println!(
            "  watchdog: {} pings, longest gap {:.0} ms (limit {} ms), missed {missed}",
            pings.len(),
            longest.as_secs_f64() * 1e3,
            WATCHDOG_USEC / 1000
        );

        daemon::stop(child);
    });
}
