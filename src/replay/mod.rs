//! `turnstile replay`: a trace of messages and presence events run through
//! the daemon's own schedule (batcher, cut policy, gate, restart policy) on
//! simulated time, with a handler that takes as long as `--handler-ms` says,
//! and what the clients would have lived through: how long each answered
//! turn waited after its last message before its handler call started, how
//! many intended requests ("thoughts") were split over two or more answered
//! turns, and how many handler calls a restart threw away.
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

use crate::batcher::{CutReason, Policy, Presence, Rules};
use crate::message::{Conv, Shape, Urgency};
use crate::turns::schedule::Schedule;
use crate::turns::{Outcome, Work};

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

/// How long the handler takes in the replay: a fixed time, or uniformly
/// drawn from a range (`"5000-35000"`, the default: the old system's AI
/// turns took 5–35 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    pub min_ms: u64,
    pub max_ms: u64,
}

impl std::str::FromStr for Latency {
    type Err = String;
    fn from_str(s: &str) -> Result<Latency, String> {
        let ms = |v: &str| v.trim().parse::<u64>().map_err(|_| format!("{v:?} is not a number of ms"));
        let (min_ms, max_ms) = match s.split_once('-') {
            Some((a, b)) => (ms(a)?, ms(b)?),
            None => (ms(s)?, ms(s)?),
        };
        if min_ms > max_ms {
            return Err(format!("{s:?}: the range runs backwards"));
        }
        Ok(Latency { min_ms, max_ms })
    }
}

impl Default for Latency {
    fn default() -> Latency {
        Latency { min_ms: 5_000, max_ms: 35_000 }
    }
}

/// What is replayed besides the trace: the rules the daemon would run.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub rules: Rules,
    /// `turns.on_new_message = "restart"`.
    pub restart: bool,
    pub handler: Latency,
    /// Seeds the handler latencies (same seed, same run).
    pub seed: u64,
}

/// One handler call the replay made.
#[derive(Debug, Clone)]
pub struct Call {
    pub conv: usize,
    pub seqs: Vec<u64>,
    pub started: Instant,
    /// Committed (and replied); false: abandoned by a restart.
    pub committed: bool,
}

/// A replay's raw result: every handler call in start order, and per
/// message (by seq) its conversation, thought and arrival.
pub struct Run {
    pub calls: Vec<Call>,
    pub messages: Vec<(usize, u64, Instant)>,
    pub with_presence: HashSet<usize>,
    pub cut_reasons: BTreeMap<&'static str, u64>,
}

/// A running handler call: when it answers, and its index in `calls`.
struct Running {
    answers_at: Instant,
    call: usize,
    turn_id: String,
    reason: CutReason,
}

/// Runs `events` through the daemon's own `Schedule` (batcher, gate and
/// restart policy) on simulated time: every cut batch becomes a handler call
/// that takes `setup.handler`; a message that arrives before the call
/// answered queues for the next turn, or restarts the call (`restart`).
pub fn simulate(events: &[Event], setup: &Setup) -> Run {
    let mut order: Vec<&Event> = events.iter().collect();
    order.sort_by_key(|e| e.at_ms);
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let min_chars = match setup.rules.policy {
        Policy::Adaptive(a) => a.complete_min_chars,
        Policy::Fixed => usize::MAX,
    };
    let mut rng = setup.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut latency = move || {
        // xorshift64*: a latency per call, reproducible from the seed.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        let r = rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let span = setup.handler.max_ms - setup.handler.min_ms;
        Duration::from_millis(setup.handler.min_ms + if span == 0 { 0 } else { r % (span + 1) })
    };
    let mut convs: HashMap<&str, usize> = HashMap::new();
    let mut keys: Vec<Conv> = Vec::new();
    let mut run = Run {
        calls: Vec::new(),
        messages: Vec::new(),
        with_presence: HashSet::new(),
        cut_reasons: BTreeMap::new(),
    };
    let mut schedule = Schedule::new(setup.rules, usize::MAX, setup.restart);
    let mut running: HashMap<Conv, Running> = HashMap::new();
    let index = |conv: &Conv| conv.phone.parse::<usize>().expect("replay keys are indices");
    let mut events = order.into_iter().peekable();
    let mut restarted: Vec<Conv> = Vec::new();
    loop {
        let answer = running.values().map(|r| r.answers_at).min();
        let next_event = events.peek().map(|e| at(e.at_ms));
        let Some(now) = [answer, schedule.next_deadline(), next_event].into_iter().flatten().min() else {
            break;
        };
        // An answer that is there wins over a message at the same instant.
        let answered: Vec<Conv> =
            running.iter().filter(|(_, r)| r.answers_at <= now).map(|(c, _)| c.clone()).collect();
        for conv in answered {
            let r = running.remove(&conv).expect("running");
            run.calls[r.call].committed = true;
            schedule.finished(conv, Outcome::Done, now);
        }
        schedule.tick(now);
        if next_event == Some(now) {
            let e = events.next().expect("peeked");
            let next = convs.len();
            let conv = *convs.entry(e.conv.as_str()).or_insert(next);
            if conv == keys.len() {
                keys.push(Conv { phone: conv.to_string(), company_id: "replay".into() });
            }
            let key = keys[conv].clone();
            match e.kind {
                Kind::Message => {
                    let seq = run.messages.len() as u64;
                    run.messages.push((conv, e.thought.unwrap_or(0), now));
                    let complete = Shape::of(&e.text).complete(min_chars);
                    if let Some(conv) = schedule.message(key, seq, now, complete, Urgency::Debounced) {
                        restarted.push(conv);
                    }
                }
                Kind::Typing | Kind::Paused => {
                    run.with_presence.insert(conv);
                    let p = if e.kind == Kind::Typing { Presence::Typing } else { Presence::Paused };
                    if let Some(conv) = schedule.presence(&key, p, now) {
                        restarted.push(conv);
                    }
                }
            }
        }
        for conv in restarted.drain(..) {
            // Restarted before it answered: its call is wasted.
            let r = running.remove(&conv).expect("a restartable turn runs");
            let seqs = run.calls[r.call].seqs.clone();
            let outcome = Outcome::Restarted { seqs, turn_id: r.turn_id, reason: r.reason };
            schedule.finished(conv, outcome, now);
        }
        for cut in schedule.take_cuts() {
            *run.cut_reasons.entry(cut.reason.as_str()).or_default() += 1;
        }
        while let Some((conv, work)) = schedule.start_next() {
            let Work::Fresh { seqs, reason, .. } = work else {
                unreachable!("the replay makes fresh work only")
            };
            let call = run.calls.len();
            run.calls.push(Call { conv: index(&conv), seqs, started: now, committed: false });
            let turn_id = format!("t{call}");
            running.insert(conv, Running { answers_at: now + latency(), call, turn_id, reason });
        }
    }
    run
}

/// Runs `events` under `setup`; the report as JSON.
pub fn run(events: &[Event], setup: &Setup) -> Value {
    report(setup, &simulate(events, setup))
}

fn report(setup: &Setup, run: &Run) -> Value {
    let messages = &run.messages;
    let mut waits: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    // (conversation, thought) → the committed turns it landed in.
    let mut thought_turns: HashMap<(usize, u64), HashSet<usize>> = HashMap::new();
    let committed: Vec<&Call> = run.calls.iter().filter(|c| c.committed).collect();
    for (i, c) in committed.iter().enumerate() {
        let last = c.seqs.iter().map(|s| messages[*s as usize].2).max().expect("a turn has messages");
        waits[run.with_presence.contains(&c.conv) as usize]
            .push(c.started.saturating_duration_since(last).as_millis() as u64);
        for s in &c.seqs {
            let (conv, thought, _) = messages[*s as usize];
            thought_turns.entry((conv, thought)).or_default().insert(i);
        }
    }
    // Every message of a thought seen by some turn (none may be lost).
    for (conv, thought, _) in messages {
        thought_turns.entry((*conv, *thought)).or_default();
    }
    let split = thought_turns.values().filter(|t| t.len() > 1).count();
    let split_with_presence =
        thought_turns.iter().filter(|((conv, _), t)| t.len() > 1 && run.with_presence.contains(conv)).count();
    let quantiles = |v: &mut Vec<u64>| {
        v.sort_unstable();
        let q = |p: f64| v.get(((p * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1).copied();
        json!({ "p50": q(0.5), "p90": q(0.9), "p99": q(0.99) })
    };
    let (mut without, mut with) = (waits[0].clone(), waits[1].clone());
    let mut all: Vec<u64> = waits.concat();
    let thoughts = thought_turns.len();
    json!({
        "policy": match setup.rules.policy { Policy::Fixed => "fixed", Policy::Adaptive(_) => "adaptive" },
        "on_new_message": if setup.restart { "restart" } else { "queue" },
        "turns": committed.len(),
        "messages": messages.len(),
        "wait_after_last_ms": quantiles(&mut all),
        "split_thoughts": split,
        "split_pct": if thoughts == 0 { 0.0 } else { split as f64 * 100.0 / thoughts as f64 },
        "thoughts": thoughts,
        "wasted_calls": run.calls.len() - committed.len(),
        "cut_reasons": run.cut_reasons,
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

    /// The rules of `c`, with a handler that answers at once.
    fn instant(c: BatchingConfig) -> Setup {
        Setup { rules: c.rules(), restart: false, handler: Latency { min_ms: 0, max_ms: 0 }, seed: 1 }
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
        let r =
            run(&trace, &instant(BatchingConfig { policy: CutPolicy::Fixed, ..BatchingConfig::default() }));
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
        let window = crate::batcher::Batcher::<u8>::new(c.rules()).windows(&0).resume;
        let r = run(&trace, &instant(c));
        assert_eq!((r["turns"].as_u64(), r["split_thoughts"].as_u64()), (Some(1), Some(0)), "{r}");
        assert_eq!(
            r["with_presence"]["wait_after_last_ms"]["p50"],
            window.as_millis() as u64,
            "silent since the message (the paused after it follows no typing): {r}"
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
