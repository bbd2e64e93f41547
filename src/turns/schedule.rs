//! What the driver decides, without IO: the batcher and the gate together,
//! and the restart policy's bookkeeping. The driver feeds it events with
//! `now`, starts the work it hands out and reports how each ended;
//! `turnstile replay` drives the very same struct on simulated time, so what
//! the replay reports is what the daemon would have done.
//!
//! Everything here is memory derivable from disk: pending messages, open
//! turns and re-opened dead turns are pushed in again on start.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::batcher::{Batcher, Cut, CutReason, PutBack, Rules};
use crate::message::Urgency;
use crate::message::{Conv, Presence};

use super::gate::Gate;
use super::{Outcome, Work};

/// Backoff of a conversation whose work failed in the store: doubling from
/// this, up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub struct Schedule {
    batcher: Batcher<Conv>,
    gate: Gate<Conv, Work>,
    max_messages: usize,
    /// `turns.on_new_message = "restart"`.
    restart: bool,
    /// Running turns cut from fresh messages, which a new message of their
    /// conversation restarts (restart policy only). A resumed turn (recovered,
    /// or a dead turn retried) may have a record of its own in the store that
    /// only its own commit removes, so it is never restarted.
    restartable: HashSet<Conv>,
    /// Restarted turns whose messages wait in a pending batch: the next cut
    /// of the conversation replaces them.
    superseded: HashMap<Conv, Vec<String>>,
    /// Batches cut since the last `take_cuts`, for the driver's metrics.
    cuts: Vec<Cut<Conv>>,
    /// Conversations staff took over: their cut batches are held here (no
    /// turn starts) until they resume — at `resume_at`, or by hand.
    paused: HashMap<Conv, Hold>,
    /// Conversations the timers resumed since the last `take_resumed`.
    resumed: Vec<Conv>,
}

#[derive(Debug, Default)]
struct Hold {
    resume_at: Option<Instant>,
    seqs: Vec<u64>,
    since: Option<Instant>,
}

/// What became of work that ended, for the driver's log and metrics.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The conversation's next work may start.
    Freed,
    /// Restarted: its messages go first in the conversation's next turn.
    Restarted,
    /// Failed in the store: retried first, after `retry_in`.
    Failed { failures: u32, retry_in: Duration },
}

impl Schedule {
    pub fn new(rules: Rules, max_concurrent: usize, restart: bool) -> Schedule {
        Schedule {
            batcher: Batcher::new(rules),
            gate: Gate::new(max_concurrent),
            max_messages: rules.max_messages,
            restart,
            restartable: HashSet::new(),
            superseded: HashMap::new(),
            cuts: Vec::new(),
            paused: HashMap::new(),
            resumed: Vec::new(),
        }
    }

    /// Staff took `conv` over (or wrote again): no turn of it starts until
    /// `resume_at` (`None`: until resumed by hand). Batches already cut and
    /// waiting are held with what comes; a turn running finishes.
    pub fn pause(&mut self, conv: Conv, resume_at: Option<Instant>) {
        let waiting = self.gate.take_waiting(&conv, |w| matches!(w, Work::Fresh { .. }));
        let hold = self.paused.entry(conv).or_default();
        hold.resume_at = resume_at;
        for work in waiting {
            if let Work::Fresh { seqs, cut_at, .. } = work {
                hold.since = Some(hold.since.map_or(cut_at, |s| s.min(cut_at)));
                hold.seqs.extend(seqs);
            }
        }
    }

    /// The assistant takes `conv` back: what waited becomes one turn, with
    /// every message (however many), at once. False if it was not paused.
    pub fn resume(&mut self, conv: &Conv, now: Instant) -> bool {
        let Some(mut hold) = self.paused.remove(conv) else { return false };
        // A batch still collecting joins it: the client's messages of the pause, together.
        if let Some(cut) = self.batcher.cut_now(conv) {
            hold.seqs.extend(cut.seqs);
        }
        if !hold.seqs.is_empty() {
            hold.seqs.sort_unstable();
            hold.seqs.dedup();
            let work = Work::Fresh {
                max_messages: hold.seqs.len().max(self.max_messages),
                supersedes: self.superseded.remove(conv).unwrap_or_default(),
                seqs: hold.seqs,
                reason: CutReason::Resumed,
                deadline: now,
                cut_at: now,
            };
            self.gate.offer(conv.clone(), work);
        }
        true
    }

    /// Paused conversations: when each resumes, messages held, since when
    /// the oldest of them waits.
    pub fn paused(&self) -> impl Iterator<Item = (&Conv, Option<Instant>, usize, Option<Instant>)> {
        self.paused.iter().map(|(c, h)| (c, h.resume_at, h.seqs.len(), h.since))
    }

    /// The conversations the timers resumed since the last call (the driver
    /// records it on disk).
    pub fn take_resumed(&mut self) -> Vec<Conv> {
        std::mem::take(&mut self.resumed)
    }

    pub fn batcher(&self) -> &Batcher<Conv> {
        &self.batcher
    }

    pub fn batcher_mut(&mut self) -> &mut Batcher<Conv> {
        &mut self.batcher
    }

    pub fn gate(&self) -> &Gate<Conv, Work> {
        &self.gate
    }

    /// A message is stored. Returns the conversation whose running turn the
    /// restart policy abandons for it (the driver cancels that turn; a turn
    /// whose handler has answered ignores it and commits).
    pub fn message(
        &mut self,
        conv: Conv,
        seq: u64,
        at: Instant,
        complete: bool,
        urgency: Urgency,
    ) -> Option<Conv> {
        // A turn of a conversation staff took over is left to finish.
        let restart =
            (!self.paused.contains_key(&conv) && self.restartable.remove(&conv)).then(|| conv.clone());
        if let Some(cut) = self.batcher.push_message(conv.clone(), seq, at, complete) {
            self.offer(cut, at);
        } else if urgency == Urgency::Immediate {
            if let Some(cut) = self.batcher.cut_now(&conv) {
                self.offer(cut, at);
            }
        }
        restart
    }

    /// A message recovered from disk (they come in arrival order; see
    /// `Batcher::push_recovered`); `recovered_all` once they are in.
    /// Nothing runs yet, so nothing restarts.
    pub fn recovered(&mut self, conv: Conv, seq: u64, at: Instant, complete: bool) {
        if let Some(cut) = self.batcher.push_recovered(conv, seq, at, complete) {
            self.offer(cut, at);
        }
    }

    pub fn recovered_all(&mut self) {
        self.batcher.schedule_recovered();
    }

    /// A client's presence. Returns the conversation whose running turn the
    /// restart policy abandons for it: typing before the answer is the
    /// request going on (its messages wait, held, for what comes).
    pub fn presence(&mut self, conv: &Conv, presence: Presence, at: Instant) -> Option<Conv> {
        self.batcher.presence(conv, presence, at);
        // Only the adaptive policy holds a batch for typing.
        let listens = matches!(self.batcher.rules().policy, crate::batcher::Policy::Adaptive(_))
            && !self.paused.contains_key(conv);
        (listens && presence == Presence::Typing && self.restartable.remove(conv)).then(|| conv.clone())
    }

    /// Work that is already a turn (recovered, a dead turn retried) or a
    /// context write: queued in the gate as it is.
    pub fn queue(&mut self, conv: Conv, work: Work) {
        self.gate.offer(conv, work);
    }

    /// Cuts what is due and ends the backoffs that are over.
    pub fn tick(&mut self, now: Instant) {
        for cut in self.batcher.due(now) {
            self.offer(cut, now);
        }
        let due: Vec<Conv> = self
            .paused
            .iter()
            .filter(|(_, h)| h.resume_at.is_some_and(|at| at <= now))
            .map(|(c, _)| c.clone())
            .collect();
        for conv in due {
            self.resume(&conv, now);
            self.resumed.push(conv);
        }
        self.gate.wake(now);
    }

    /// The next work to start, if the gate allows one.
    pub fn start_next(&mut self) -> Option<(Conv, Work)> {
        let (conv, work) = self.gate.start_next()?;
        if self.restart && matches!(work, Work::Fresh { .. }) {
            self.restartable.insert(conv.clone());
        }
        Some((conv, work))
    }

    /// The running work of `conv` ended with `outcome`.
    pub fn finished(&mut self, conv: Conv, outcome: Outcome, now: Instant) -> Ended {
        self.restartable.remove(&conv);
        match outcome {
            Outcome::Done | Outcome::Parked | Outcome::Abandoned => {
                self.gate.finished(&conv);
                Ended::Freed
            }
            Outcome::Restarted { seqs, turn_id, reason } => {
                self.gate.finished(&conv);
                self.put_back(conv, seqs, turn_id, reason, now);
                Ended::Restarted
            }
            Outcome::Failed { work, .. } => {
                let failures = self.gate.failures(&conv) + 1;
                let retry_in = crate::clock::backoff(RETRY_FIRST, RETRY_MAX, failures);
                self.gate.failed(&conv, work, now + retry_in);
                Ended::Failed { failures, retry_in }
            }
        }
    }

    /// A restarted turn's messages are the oldest of its conversation, so
    /// they go first: in front of cut batches already waiting (which move up
    /// into the re-run as far as `max_messages` allows), else in front of
    /// the pending batch (which goes on collecting: the client may still be
    /// writing; cut at once if together they fill it), else a turn of their own.
    fn put_back(&mut self, conv: Conv, seqs: Vec<u64>, turn_id: String, reason: CutReason, now: Instant) {
        let work = |seqs: Vec<u64>, supersedes: Vec<String>| Work::Fresh {
            seqs,
            reason,
            deadline: now,
            cut_at: now,
            max_messages: self.max_messages,
            supersedes,
        };
        if let Some(hold) = self.paused.get_mut(&conv) {
            hold.seqs.extend(seqs);
            self.superseded.entry(conv).or_default().push(turn_id);
            return;
        }
        if self.gate.has_waiting(&conv, |w| matches!(w, Work::Fresh { .. })) {
            let supersedes = self.superseded.remove(&conv).unwrap_or_default();
            let work = work(seqs, [supersedes, vec![turn_id]].concat());
            self.gate.put_front(conv, work);
            return;
        }
        match self.batcher.put_back(&conv, &seqs) {
            PutBack::Merged => self.superseded.entry(conv).or_default().push(turn_id),
            PutBack::Full(cut) => {
                self.superseded.entry(conv).or_default().push(turn_id);
                self.offer(Cut { reason, ..cut }, now);
            }
            PutBack::NoBatch => {
                let supersedes = self.superseded.remove(&conv).unwrap_or_default();
                let work = work(seqs, [supersedes, vec![turn_id]].concat());
                self.gate.put_front(conv, work);
            }
        }
    }

    fn offer(&mut self, cut: Cut<Conv>, now: Instant) {
        if let Some(hold) = self.paused.get_mut(&cut.key) {
            let first = cut.last_at.min(cut.deadline);
            hold.since = Some(hold.since.map_or(first, |s| s.min(first)));
            hold.seqs.extend(cut.seqs.iter().copied());
            self.cuts.push(cut);
            return;
        }
        let work = Work::Fresh {
            supersedes: self.superseded.remove(&cut.key).unwrap_or_default(),
            seqs: cut.seqs.clone(),
            reason: cut.reason,
            deadline: cut.deadline,
            cut_at: now,
            max_messages: self.max_messages,
        };
        self.gate.offer(cut.key.clone(), work);
        self.cuts.push(cut);
    }

    /// The batches cut since the last call (for metrics and the log).
    pub fn take_cuts(&mut self) -> Vec<Cut<Conv>> {
        std::mem::take(&mut self.cuts)
    }

    /// When something is next due: a batch's cut or a backoff's end.
    pub fn next_deadline(&self) -> Option<Instant> {
        let resume = self.paused.values().filter_map(|h| h.resume_at).min();
        [self.batcher.next_deadline(), self.gate.next_deadline(), resume].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::config::{BatchingConfig, CutPolicy};
    use crate::replay::{simulate, Event, Kind, Latency, Setup};

    /// xorshift64: random schedules, reproducible from their seed.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn trace(rng: &mut Rng) -> Vec<Event> {
        let mut out = Vec::new();
        for conv in 0..1 + rng.below(4) {
            let mut t = rng.below(5_000);
            for i in 0..1 + rng.below(25) {
                // Bursts, pauses, and now and then a long silence.
                t += [rng.below(1_500), rng.below(12_000), rng.below(60_000)][rng.below(3) as usize];
                if rng.below(3) == 0 {
                    let kind = if rng.below(2) == 0 { Kind::Typing } else { Kind::Paused };
                    out.push(Event {
                        conv: format!("c{conv}"),
                        at_ms: t,
                        kind,
                        text: String::new(),
                        thought: None,
                    });
                    t += rng.below(4_000);
                }
                let text = if rng.below(3) == 0 {
                    "Можно записаться завтра?"
                } else {
                    "можно"
                };
                out.push(Event {
                    conv: format!("c{conv}"),
                    at_ms: t,
                    kind: Kind::Message,
                    text: text.into(),
                    thought: Some(i),
                });
            }
        }
        out
    }

    /// Over random arrivals, presence, batch sizes and handler times, under
    /// both policies and both `on_new_message`: every message is in exactly
    /// one answered turn, a conversation's answered turns hold its messages
    /// in order, and a restart's abandoned call is never the answer.
    #[test]
    fn every_message_in_exactly_one_answered_turn_in_order_whatever_the_schedule() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..400 {
            let events = trace(&mut rng);
            let policy = if rng.below(2) == 0 { CutPolicy::Fixed } else { CutPolicy::Adaptive };
            let batching = BatchingConfig {
                policy,
                max_messages: 1 + rng.below(5) as usize,
                debounce_ms: 500 + rng.below(10_000),
                ..BatchingConfig::default()
            };
            let lo = rng.below(20_000);
            let setup = Setup {
                rules: batching.rules(),
                restart: rng.below(2) == 0,
                handler: Latency { min_ms: lo, max_ms: lo + rng.below(20_000) },
                seed: round,
            };
            let run = simulate(&events, &setup);
            let mut seen: HashMap<u64, usize> = HashMap::new();
            let mut last: HashMap<usize, u64> = HashMap::new();
            for call in run.calls.iter().filter(|c| c.committed) {
                assert!(call.seqs.windows(2).all(|w| w[0] < w[1]), "round {round}: {:?}", call.seqs);
                for s in &call.seqs {
                    *seen.entry(*s).or_default() += 1;
                }
                let first = call.seqs[0];
                if let Some(before) = last.get(&call.conv) {
                    assert!(*before < first, "round {round}: an answered turn went before an older one");
                }
                last.insert(call.conv, *call.seqs.last().unwrap());
            }
            assert_eq!(seen.len(), run.messages.len(), "round {round}: every message answered");
            assert!(seen.values().all(|n| *n == 1), "round {round}: no message answered twice");
            if !setup.restart {
                assert!(run.calls.iter().all(|c| c.committed), "round {round}: queue never abandons a call");
            }
        }
    }
}
