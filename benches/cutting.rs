//! The cut policies on the corpus family, one table: every corpus in
//! `benches/corpus/` (and, below them, the independent generator's in
//! `benches/corpus/independent/`) replayed (`turnstile::replay`, the
//! daemon's own schedule on simulated time, handler 5–35 s) under `fixed`
//! windows of 2–12 s and every shipped policy/restart combination, and the
//! defaults. Per row: the wait after the last message before the answering
//! call started (p50/p90), the requests split over two or more answered
//! turns, and the handler calls a restart threw away.
//!
//!   cargo bench --bench cutting                                  # the table
//!   CUTTING_CORPUS=FILE cargo bench --bench cutting              # a trace of your own
//!   CUTTING_HANDLER_MS=2000-10000 cargo bench --bench cutting    # another handler

use std::path::{Path, PathBuf};

use serde_json::Value;
use turnstile::config::{BatchingConfig, Config, CutPolicy, OnNewMessage};
use turnstile::replay::{self, Latency, Setup};

struct Row {
    name: String,
    batching: BatchingConfig,
    restart: bool,
}

fn rows() -> Vec<Row> {
    let defaults = Config::default();
    let fixed = |s: u64| BatchingConfig {
        policy: CutPolicy::Fixed,
        debounce_ms: s * 1000,
        ..defaults.batching.clone()
    };
    let adaptive = BatchingConfig { policy: CutPolicy::Adaptive, ..defaults.batching.clone() };
    let mut rows: Vec<Row> = [2, 4, 6, 8, 10, 12]
        .into_iter()
        .map(|s| Row { name: format!("fixed {s} s, queue"), batching: fixed(s), restart: false })
        .collect();
    rows.push(Row { name: "fixed 10 s, restart".into(), batching: fixed(10), restart: true });
    rows.push(Row { name: "adaptive, queue".into(), batching: adaptive.clone(), restart: false });
    rows.push(Row { name: "adaptive, restart".into(), batching: adaptive, restart: true });
    rows.push(Row {
        name: "**default**".into(),
        batching: defaults.batching.clone(),
        restart: defaults.turns.on_new_message == OnNewMessage::Restart,
    });
    rows
}

fn corpora() -> Vec<PathBuf> {
    if let Ok(one) = std::env::var("CUTTING_CORPUS") {
        return vec![PathBuf::from(one)];
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/corpus");
    let list = |dir: &Path| {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("benches/corpus")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
            .collect();
        found.sort();
        found
    };
    [list(&root), list(&root.join("independent"))].concat()
}

fn secs(v: &Value) -> String {
    v.as_u64().map_or("–".into(), |ms| format!("{:.1}", ms as f64 / 1000.0))
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let handler: Latency = std::env::var("CUTTING_HANDLER_MS")
        .ok()
        .map(|v| v.parse().expect("CUTTING_HANDLER_MS: ms or A-B"))
        .unwrap_or_default();
    println!(
        "handler {}–{} ms; wait = last message → the answering call's start\n",
        handler.min_ms, handler.max_ms
    );
    println!("| corpus | setting | wait p50 s | wait p90 s | split % | wasted calls |");
    println!("|---|---|---|---|---|---|");
    for corpus in corpora() {
        let events = replay::read(&corpus).expect("a readable trace");
        let name = corpus.file_name().expect("a file").to_string_lossy().replace(".jsonl.gz", "");
        for row in rows() {
            let setup = Setup { rules: row.batching.rules(), restart: row.restart, handler, seed: 1 };
            let r = replay::run(&events, &setup);
            println!(
                "| {name} | {} | {} | {} | {:.1} | {} |",
                row.name,
                secs(&r["wait_after_last_ms"]["p50"]),
                secs(&r["wait_after_last_ms"]["p90"]),
                r["split_pct"].as_f64().unwrap_or(0.0),
                r["wasted_calls"],
            );
        }
    }
}
