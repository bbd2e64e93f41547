//! The cut policy's bar, on the corpus family in `benches/corpus/` (each a
//! `gen-trace` command, docs/batching.md): replayed through the daemon's own
//! schedule with the default handler times, the shipped defaults split no
//! more requests than `fixed` 10 s (+0.5 point) — under either
//! `on_new_message` — and wait less at the median. On the traces of the
//! independent generator (`benches/corpus/independent/`, written without
//! the policy's code), the split bar holds too.

use std::path::{Path, PathBuf};

use serde_json::Value;
use turnstile::config::{BatchingConfig, Config, CutPolicy, OnNewMessage};
use turnstile::replay::{self, Latency, Setup};

fn corpora(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.gz"))
        .collect();
    found.sort();
    found
}

/// (the defaults, fixed 10 s queue, fixed 10 s restart) on one trace.
fn replay_three(trace: &Path) -> [Value; 3] {
    let events = replay::read(trace).unwrap();
    let defaults = Config::default();
    let fixed = BatchingConfig { policy: CutPolicy::Fixed, debounce_ms: 10_000, ..defaults.batching.clone() };
    let setup = |b: &BatchingConfig, restart| Setup {
        rules: b.rules(),
        restart,
        handler: Latency::default(),
        seed: 1,
    };
    let restart = defaults.turns.on_new_message == OnNewMessage::Restart;
    [
        replay::run(&events, &setup(&defaults.batching, restart)),
        replay::run(&events, &setup(&fixed, false)),
        replay::run(&events, &setup(&fixed, true)),
    ]
}

fn in_parallel(traces: Vec<PathBuf>) -> Vec<(PathBuf, [Value; 3])> {
    std::thread::scope(|s| {
        let running: Vec<_> = traces
            .into_iter()
            .map(|t| {
                s.spawn(move || {
                    let r = replay_three(&t);
                    (t, r)
                })
            })
            .collect();
        running.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn split(r: &Value) -> f64 {
    r["split_pct"].as_f64().unwrap()
}

fn p50(r: &Value) -> u64 {
    r["wait_after_last_ms"]["p50"].as_u64().unwrap()
}

#[test]
fn on_every_corpus_of_the_family_the_defaults_split_no_more_than_fixed_10_s_and_wait_less() {
    let family = corpora("benches/corpus");
    assert!(family.len() >= 6, "the family: {family:?}");
    for (trace, [default, queue, restart]) in in_parallel(family) {
        let name = trace.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(default["messages"], queue["messages"], "{name}");
        for fixed in [&queue, &restart] {
            assert!(
                split(&default) <= split(fixed) + 0.5,
                "{name}: the defaults split {:.2} %, fixed 10 s ({}) {:.2} %",
                split(&default),
                fixed["on_new_message"],
                split(fixed)
            );
        }
        assert!(
            p50(&default) < p50(&queue),
            "{name}: p50 {} ms vs fixed 10 s {} ms",
            p50(&default),
            p50(&queue)
        );
    }
}

#[test]
fn on_the_independent_traces_the_defaults_split_no_more_than_fixed_10_s() {
    let traces = corpora("benches/corpus/independent");
    assert_eq!(traces.len(), 3, "{traces:?}");
    for (trace, [default, queue, restart]) in in_parallel(traces) {
        let name = trace.file_name().unwrap().to_string_lossy().into_owned();
        for fixed in [&queue, &restart] {
            assert!(split(&default) <= split(fixed) + 0.5, "{name}: {} vs {}", split(&default), split(fixed));
        }
    }
}
