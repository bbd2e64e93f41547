//! `turnstile replay`: a trace of messages and presence events run through
//! the real batcher and cut policy on simulated time, and what the clients
//! would have lived through: how long each turn waited after its last
//! message, and how many intended requests ("thoughts") were split over
//! two or more turns.
//!
//! A trace is JSON lines, in any order (sorted by time here):
//! `{"conv": "...", "at_ms": 1200, "kind": "message" | "typing" | "paused",
//! "text": "...", "thought": 3}` — `text` and `thought` on messages only;
//! `thought` labels the messages one request is made of. `generate` writes
//! synthetic ones.

pub mod generate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::batcher::{Batcher, Cut, Policy, Presence, Rules};
use crate::message::Shape;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Message,
    Typing,
    Paused,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub conv: String,
    pub at_ms: u64,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thought: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("line {line}: {error}")]
    Line { line: usize, error: String },
    #[error("reading the trace: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a trace (`.gz` is inflated).
pub fn read(path: &std::path::Path) -> Result<Vec<Event>, TraceError> {
    let file = std::fs::File::open(path)?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut events = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line)
            .map_err(|e| TraceError::Line { line: i + 1, error: e.to_string() })?;
        if event.kind == Kind::Message && event.thought.is_none() {
            return Err(TraceError::Line { line: i + 1, error: "a message needs its \"thought\"".into() });
        }
        events.push(event);
    }
    Ok(events)
}

/// One turn the batcher cut.
struct Turn {
    conv: usize,
    seqs: Vec<u64>,
    at: Instant,
    reason: &'static str,
}

/// Runs `events` through a batcher with `rules`; the report as JSON.
pub fn run(events: &[Event], rules: Rules) -> Value {
    let mut order: Vec<&Event> = events.iter().collect();
    order.sort_by_key(|e| e.at_ms);
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let min_chars = match rules.policy {
        Policy::Adaptive(a) => a.complete_min_chars,
        Policy::Fixed => usize::MAX,
    };
    let mut convs: HashMap<&str, usize> = HashMap::new();
    let mut with_presence: HashSet<usize> = HashSet::new();
    // Per message seq: (conversation, thought, received at).
    let mut messages: Vec<(usize, u64, Instant)> = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    let mut batcher: Batcher<usize> = Batcher::new(rules);
    let record = |turns: &mut Vec<Turn>, cut: Cut<usize>, at: Instant| {
        turns.push(Turn { conv: cut.key, seqs: cut.seqs, at, reason: cut.reason.as_str() });
    };
    for e in order {
        let now = at(e.at_ms);
        for cut in batcher.due(now) {
            let when = cut.deadline;
            record(&mut turns, cut, when);
        }
        let next = convs.len();
        let conv = *convs.entry(e.conv.as_str()).or_insert(next);
        match e.kind {
            Kind::Message => {
                let seq = messages.len() as u64;
                messages.push((conv, e.thought.unwrap_or(0), now));
                let complete = Shape::of(&e.text).complete(min_chars);
                if let Some(cut) = batcher.push_message(conv, seq, now, complete) {
                    record(&mut turns, cut, now);
                }
            }
            Kind::Typing | Kind::Paused => {
                with_presence.insert(conv);
                let p = if e.kind == Kind::Typing { Presence::Typing } else { Presence::Paused };
                batcher.presence(&conv, p, now);
            }
        }
    }
    for cut in batcher.due(at(u64::MAX / 4)) {
        let when = cut.deadline;
        record(&mut turns, cut, when);
    }
    report(&rules, &messages, &turns, &with_presence)
}

fn report(
    rules: &Rules,
    messages: &[(usize, u64, Instant)],
    turns: &[Turn],
    with_presence: &HashSet<usize>,
) -> Value {
    let mut waits: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
    // (conversation, thought) → the turns it landed in.
    let mut thought_turns: HashMap<(usize, u64), HashSet<usize>> = HashMap::new();
    for (i, t) in turns.iter().enumerate() {
        let last = t.seqs.iter().map(|s| messages[*s as usize].2).max().expect("a turn has messages");
        waits[with_presence.contains(&t.conv) as usize]
            .push(t.at.saturating_duration_since(last).as_millis() as u64);
        *reasons.entry(t.reason).or_default() += 1;
        for s in &t.seqs {
            let (conv, thought, _) = messages[*s as usize];
            thought_turns.entry((conv, thought)).or_default().insert(i);
        }
    }
    let split = thought_turns.values().filter(|t| t.len() > 1).count();
    let split_with_presence =
        thought_turns.iter().filter(|((conv, _), t)| t.len() > 1 && with_presence.contains(conv)).count();
    let quantiles = |v: &mut Vec<u64>| {
        v.sort_unstable();
        let q = |p: f64| v.get(((p * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1).copied();
        json!({ "p50": q(0.5), "p90": q(0.9), "p99": q(0.99) })
    };
    let (mut without, mut with) = (waits[0].clone(), waits[1].clone());
    let mut all: Vec<u64> = waits.concat();
    json!({
        "policy": match rules.policy { Policy::Fixed => "fixed", Policy::Adaptive(_) => "adaptive" },
        "turns": turns.len(),
        "messages": messages.len(),
        "wait_after_last_ms": quantiles(&mut all),
        "split_thoughts": split,
        "thoughts": thought_turns.len(),
        "cut_reasons": reasons,
        "with_presence": {
            "turns": with.len(),
            "wait_after_last_ms": quantiles(&mut with),
            "split_thoughts": split_with_presence,
        },
        "without_presence": {
            "turns": without.len(),
            "wait_after_last_ms": quantiles(&mut without),
            "split_thoughts": split - split_with_presence,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BatchingConfig, CutPolicy};

    fn msg(conv: &str, at_ms: u64, text: &str, thought: u64) -> Event {
        Event { conv: conv.into(), at_ms, kind: Kind::Message, text: text.into(), thought: Some(thought) }
    }

    fn presence(conv: &str, at_ms: u64, kind: Kind) -> Event {
        Event { conv: conv.into(), at_ms, kind, text: String::new(), thought: None }
    }

    #[test]
    fn fixed_waits_its_window_and_splits_a_slow_thought() {
        let trace = vec![
            msg("a", 0, "Привет", 1),
            msg("a", 4_000, "можно на стрижку", 1),
            // 12 s later: past the 10 s window, the same request.
            msg("a", 16_000, "завтра?", 1),
            msg("b", 1_000, "Здравствуйте, можно записаться на маникюр?", 1),
        ];
        let r = run(&trace, BatchingConfig { policy: CutPolicy::Fixed, ..BatchingConfig::default() }.rules());
        assert_eq!(r["policy"], "fixed");
        assert_eq!((r["turns"].as_u64(), r["messages"].as_u64()), (Some(3), Some(4)));
        assert_eq!((r["split_thoughts"].as_u64(), r["thoughts"].as_u64()), (Some(1), Some(2)));
        assert_eq!(r["wait_after_last_ms"]["p50"], 10_000);
        assert_eq!(r["cut_reasons"]["quiet"], 3);
    }

    #[test]
    fn adaptive_cuts_on_presence_and_holds_while_typing() {
        let mut c = BatchingConfig { policy: CutPolicy::Adaptive, ..BatchingConfig::default() };
        c.paused_grace_ms = 1_000;
        let trace = vec![
            presence("a", 0, Kind::Typing),
            msg("a", 2_000, "Привет", 1),
            presence("a", 2_500, Kind::Typing),
            // Typing for 14 s: held, not cut.
            presence("a", 9_000, Kind::Typing),
            msg("a", 16_500, "хочу записаться на стрижку на завтра", 1),
            presence("a", 17_000, Kind::Paused),
        ];
        let r = run(&trace, c.rules());
        assert_eq!((r["turns"].as_u64(), r["split_thoughts"].as_u64()), (Some(1), Some(0)), "{r}");
        assert_eq!(
            r["with_presence"]["wait_after_last_ms"]["p50"], 1_000,
            "the grace after the last message: {r}"
        );
        assert_eq!(r["cut_reasons"]["paused"], 1);
    }

    #[test]
    fn a_trace_line_without_a_thought_is_refused_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, "{\"conv\":\"a\",\"at_ms\":0,\"kind\":\"typing\"}\n{\"conv\":\"a\",\"at_ms\":1,\"kind\":\"message\",\"text\":\"x\"}\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.starts_with("line 2:"), "{e}");
    }
}
