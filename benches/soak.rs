//! The footprint over a long run (issue 15): the release binary on its
//! defaults (echo handler, a 1 s quiet window), webhooks at a steady `RATE`
//! per second over `PHONES` phones for `SOAK_SECONDS`; every `REPORT_SECONDS`
//! a line with the daemon's RSS, the data directory's size, the bytes it
//! grew per message since the last line, sled's per-tree sizes and the
//! acknowledgement p99 of the interval; then the figures of the whole run.
//!
//! ```text
//! cargo bench --bench soak                        # 30 minutes, 400/s, 1,000 phones
//! SOAK_SECONDS=60 cargo bench --bench soak        # what CI runs: reporting, not asserting
//! ```
//!
//! Loopback only; the data lives in a temporary directory under `target/`
//! and goes when the bench ends.

#[path = "support/daemon.rs"]
mod daemon;

use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon::{free_ports, open_loop, quantile_ms, rss_kb, scrape, wait_ready, Recorder};
use turnstile::backup::dir_size;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One report line's figures.
struct Sample {
    at: Duration,
    acked: u64,
    rss_kb: u64,
    disk: u64,
    p99_ms: f64,
}

/// `turnstile_tree_bytes{tree="..."}` of a scrape, as "name size" pairs.
fn trees(metrics: &str) -> String {
    let mut out: Vec<(String, u64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("turnstile_tree_bytes{tree=\""))
        .filter_map(|rest| {
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .filter(|(_, bytes)| *bytes > 0)
        .collect();
    out.sort_by_key(|t| std::cmp::Reverse(t.1));
    out.iter().map(|(n, b)| format!("{n} {:.1}M", *b as f64 / 1048576.0)).collect::<Vec<_>>().join(", ")
}

/// A gauge's value in a scrape.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn main() {
    let seconds = env_or("SOAK_SECONDS", 1800);
    let rate = env_or("RATE", 400);
    let phones = env_or("PHONES", 1000);
    let every = Duration::from_secs(env_or("REPORT_SECONDS", 30));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        std::fs::create_dir_all("target").unwrap();
        let dir = tempfile::tempdir_in("target").unwrap();
        let data = dir.path().join("data");
        let ports = free_ports();
        // The bench's own TURNSTILE_* variables reach the daemon (to try
        // other settings: TURNSTILE_STORE_CACHE_MB=32 cargo bench --bench soak).
        let mut env: Vec<(&str, String)> = vec![("TURNSTILE_BATCHING_DEBOUNCE_MS", "1000".into())];
        let passed: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("TURNSTILE_")).collect();
        env.extend(passed.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let child = daemon::spawn(&data, ports, &env);
        let pid = child.id();
        let client = daemon::client();
        wait_ready(&client, ports.public).await;
        let idle = Sample { at: Duration::ZERO, acked: 0, rss_kb: rss_kb(pid), disk: dir_size(&data), p99_ms: 0.0 };
        println!(
            "== soak: {rate} webhooks/s over {phones} phones for {seconds} s; idle RSS {:.1} MB, data {:.1} MB",
            idle.rss_kb as f64 / 1024.0,
            mb(idle.disk)
        );
        println!("  {:>6} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8}  trees",
            "t", "acked", "RSS MB", "heap MB", "data MB", "B/msg", "p99 ms"
        );

        let rec = Arc::new(Recorder::default());
        let started = Instant::now();
        let reporter = {
            let (rec, client, data) = (rec.clone(), client.clone(), data.clone());
            async move {
                let mut samples = vec![idle];
                let mut all = Vec::new();
                loop {
                    let left = Duration::from_secs(seconds).saturating_sub(started.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    tokio::time::sleep(left.min(every)).await;
                    let (latencies, failed) = rec.take();
                    let s = Sample {
                        at: started.elapsed(),
                        acked: rec.acked(),
                        rss_kb: rss_kb(pid),
                        disk: dir_size(&data),
                        p99_ms: quantile_ms(&latencies, 0.99),
                    };
                    let last = samples.last().unwrap();
                    let per_message =
                        (s.disk as f64 - last.disk as f64) / (s.acked.saturating_sub(last.acked).max(1)) as f64;
                    let metrics = scrape(&client, ports.admin).await;
                    println!(
                        "  {:>5.0}s {:>9} {:>8.1} {:>8.1} {:>9.1} {:>8.0} {:>8.2}  {}{}",
                        s.at.as_secs_f64(),
                        s.acked,
                        s.rss_kb as f64 / 1024.0,
                        gauge(&metrics, "turnstile_heap_bytes") / 1048576.0,
                        mb(s.disk),
                        per_message,
                        s.p99_ms,
                        trees(&metrics),
                        if failed > 0 { format!("  FAILED {failed}") } else { String::new() }
                    );
                    all.extend(latencies);
                    samples.push(s);
                }
                (samples, all)
            }
        };
        let load = open_loop(&client, ports.public, rate, phones, "soak", rec.clone(), async {
            tokio::time::sleep(Duration::from_secs(seconds)).await
        });
        let ((samples, mut all), ()) = tokio::join!(reporter, load);
        all.extend(rec.take().0);
        all.sort_unstable();

        // Growth once history is at its cap: from the first line past two
        // minutes (or half the run, for a short one) to the last.
        let settle = Duration::from_secs(120.min(seconds / 2));
        let from = samples.iter().find(|s| s.at >= settle).unwrap_or(&samples[0]);
        let to = samples.last().unwrap();
        let grown = to.disk as f64 - from.disk as f64;
        let messages = to.acked.saturating_sub(from.acked).max(1);
        // The data directory is a sawtooth once the store rewrites its
        // files: the trend is the least-squares slope over those lines.
        let late: Vec<&Sample> = samples.iter().filter(|s| s.at >= from.at).collect();
        let slope = {
            let n = late.len().max(1) as f64;
            let (mx, my) = (
                late.iter().map(|s| s.acked as f64).sum::<f64>() / n,
                late.iter().map(|s| s.disk as f64).sum::<f64>() / n,
            );
            let sxy: f64 = late.iter().map(|s| (s.acked as f64 - mx) * (s.disk as f64 - my)).sum();
            let sxx: f64 = late.iter().map(|s| (s.acked as f64 - mx).powi(2)).sum();
            if sxx > 0.0 { sxy / sxx } else { 0.0 }
        };
        let peak_disk = late.iter().map(|s| s.disk).max().unwrap_or(0);
        let rewrites = scrape(&client, ports.admin)
            .await
            .lines()
            .find_map(|l| l.strip_prefix("turnstile_store_rewrites_total ").map(|n| n.trim().to_owned()))
            .unwrap_or_default();
        let peak_rss = samples.iter().map(|s| s.rss_kb).max().unwrap_or(0);
        let worst_p99 = samples.iter().map(|s| s.p99_ms).fold(0.0, f64::max);
        println!("== after {} s: {} webhooks acknowledged", seconds, rec.acked());
        println!(
            "  RSS: {:.1} MB idle, {:.1} MB at the end, {:.1} MB at most",
            samples[0].rss_kb as f64 / 1024.0,
            to.rss_kb as f64 / 1024.0,
            peak_rss as f64 / 1024.0
        );
        println!(
            "  data: {:.1} MB at the end, {:.1} MB at most from {:.0} s on; growth per message from then ({} messages): {:.0} B end to end, {:.0} B trend (least squares); {} online rewrites",
            mb(to.disk),
            mb(peak_disk),
            from.at.as_secs_f64(),
            messages,
            grown / messages as f64,
            slope,
            rewrites
        );
        println!(
            "  ack latency: p50 {:.2} ms, p99 {:.2} ms over the run; worst 30 s p99 {:.2} ms; max {:.2} ms",
            quantile_ms(&all, 0.5),
            quantile_ms(&all, 0.99),
            worst_p99,
            quantile_ms(&all, 1.0)
        );
        daemon::stop(child);

        // What an offline compaction gives back afterwards.
        let t = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .args(["compact", "--data"])
            .arg(&data)
            .output()
            .expect("turnstile compact");
        let said = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr });
        let said = said.split(" records").next().unwrap_or_default().to_owned();
        println!("  turnstile compact: {said} records, in {:.1} s", t.elapsed().as_secs_f64());
    });
}
