//! Context storage benchmark (issue 3): save and load of a realistic ~300 KB
//! booking context (p50/p99, compressed size), then 1,000,000 small contexts
//! (get p99, data directory size, reopen time).
//!
//!     cargo bench --bench context
//!     TURNSTILE_BENCH_CONTEXTS=100000 cargo bench --bench context   # quicker
//!
//! Single-threaded by construction (one current-thread runtime, one loop), so
//! the figures are "on one core". Everything runs through the daemon's own
//! `Store` and `context` code, on a temp dir.

#[path = "support/sample.rs"]
mod sample;

use std::path::Path;
use std::time::{Duration, Instant};

use turnstile::context;
use turnstile::message::Conv;
use turnstile::store::{ContextUpdate, Part, Store};

const TTL_MS: u64 = 12 * 3600 * 1000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "  {what:<38} p50 {:>8.3} ms   p99 {:>8.3} ms   max {:>8.3} ms   (n={})",
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
        samples.len()
    );
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_size(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

fn conv(i: u64) -> Conv {
    Conv { phone: format!("7900{i:07}"), company_id: "962302".into() }
}

fn set(encoded: &context::Encoded) -> ContextUpdate {
    ContextUpdate {
        dialogue: Part::Keep,
        cache: Part::Set { bytes: encoded.bytes.clone(), raw_len: encoded.raw_len },
        slide: true,
        ttl_ms: TTL_MS,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        large_contexts().await;
        small_contexts().await;
    });
}

async fn large_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let samples: Vec<serde_json::Value> = (0..20).map(sample::booking_context).collect();
    let json_len = samples[0].to_string().len();
    let encoded = context::encode(&samples[0]);
    println!("== large context (company, 50 services, 20 staff, 14 days of slots, client history)");
    println!(
        "  JSON {json_len} B -> stored {} B: {:.1}x smaller",
        encoded.bytes.len(),
        json_len as f64 / encoded.bytes.len() as f64
    );
    let rounds = 500u64;
    let (mut save, mut load, mut load_parse) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let c = conv(i % 50);
        let value = &samples[(i % 20) as usize];
        let t = Instant::now();
        let e = context::encode(value);
        store.update_context(&c, set(&e), i).await.unwrap();
        save.push(t.elapsed());
    }
    for i in 0..rounds {
        let c = conv(i % 50);
        // What a turn and GET do: read, inflate, check the JSON (not parse it).
        let t = Instant::now();
        let stored = store.context(&c, rounds).unwrap().unwrap();
        let raw = context::decode_raw(stored.cache.as_deref().unwrap()).unwrap();
        load.push(t.elapsed());
        std::hint::black_box(raw);
        // For reference: building the JSON tree as well.
        let t = Instant::now();
        let stored = store.context(&c, rounds).unwrap().unwrap();
        let value = context::decode(stored.cache.as_deref().unwrap()).unwrap();
        load_parse.push(t.elapsed());
        std::hint::black_box(value);
    }
    report("save (serialize, deflate, write, sync)", save);
    report("load (read, inflate, check JSON)", load);
    report("load + parse into a JSON tree", load_parse);
}

async fn small_contexts() {
    let n: u64 =
        std::env::var("TURNSTILE_BENCH_CONTEXTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    println!("== {n} small contexts");
    let t = Instant::now();
    // 256 writers at a time, as many conversations' turns would be: their
    // writes share the writer's transactions and syncs.
    for chunk in (0..n).collect::<Vec<_>>().chunks(256) {
        let writers: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let e = context::encode(&sample::small_dialogue(i));
                    let update = ContextUpdate {
                        dialogue: Part::Set { bytes: e.bytes, raw_len: e.raw_len },
                        cache: Part::Keep,
                        slide: true,
                        ttl_ms: TTL_MS,
                    };
                    store.update_context(&conv(i), update, 0).await.unwrap();
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
    }
    let took = t.elapsed();
    println!(
        "  written in {:.1} s ({:.0} contexts/s, each durable when answered, 256 writers at a time)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );

    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut gets = Vec::new();
    for _ in 0..20_000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let c = conv(rng % n);
        let t = Instant::now();
        let stored = store.context(&c, 1).unwrap().unwrap();
        let value = context::decode_raw(stored.dialogue.as_deref().unwrap()).unwrap();
        gets.push(t.elapsed());
        std::hint::black_box(value);
    }
    report("get (read, inflate, check JSON)", gets);
    let stats = store.context_stats();
    store.close().await.unwrap();
    println!(
        "  data dir {:.1} MiB on disk for {} contexts ({} B JSON, {} B stored)",
        dir_size(dir.path()) as f64 / (1 << 20) as f64,
        stats.contexts,
        stats.raw_bytes,
        stats.stored_bytes
    );
    let t = Instant::now();
    let store = Store::open(dir.path()).unwrap();
    println!("  reopen (sled recovery + 64 counter shards) {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    assert_eq!(store.context_stats().contexts, n as i64);
}
