//! Debounce, without IO: decides when a conversation's pending messages
//! become a turn. The driver task (`turns::driver`) owns one `Batcher`,
//! passes `now` in, and sleeps until `next_deadline()`; nothing here polls.
//!
//! A batch is cut when it holds `max_messages`, when `max_wait` has passed
//! since its first message, or when its policy (`policy.rs`) says the client
//! is done: `debounce` after the last message (fixed), or what presence,
//! the conversation's rhythm and the last message's shape say (adaptive).
//! The batcher holds only sequence numbers and timings: it is rebuilt from
//! the store's inbox on start, which is why it can live in memory. (The
//! rhythms it learns start afresh then: the prior until a conversation
//! writes again.)

pub mod policy;

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

pub use policy::{Adaptive, Policy};
use policy::{Rhythm, Signals};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub debounce: Duration,
    pub max_messages: usize,
    pub max_wait: Duration,
    pub policy: Policy,
}

pub use crate::message::Presence;

/// Gaps shorter than this are a gateway delivering a backlog, not typing:
/// not learned.
const MIN_LEARNED_GAP: Duration = Duration::from_millis(300);

/// Conversations whose rhythm is forgotten after this long without a message.
const RHYTHM_IDLE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    /// `debounce` passed since the last message.
    Quiet,
    /// The batch reached `max_messages`.
    Full,
    /// `max_wait` passed since the first message.
    MaxWait,
    /// Cut on request (the non-debounced webhook).
    Immediate,
    /// Adaptive: the conversation's own quiet window passed.
    Rhythm,
    /// Adaptive: the last message looked complete; a shorter window passed.
    Complete,
    /// Adaptive: the client stopped typing.
    Paused,
    /// Adaptive: a typing indicator went unrefreshed for `typing_ttl`.
    TypingStale,
}

impl CutReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CutReason::Quiet => "quiet",
            CutReason::Full => "full",
            CutReason::MaxWait => "max_wait",
            CutReason::Immediate => "immediate",
            CutReason::Rhythm => "rhythm",
            CutReason::Complete => "complete",
            CutReason::Paused => "paused",
            CutReason::TypingStale => "typing_stale",
        }
    }

    /// Every reason, for the metrics.
    pub const ALL: [CutReason; 8] = [
        CutReason::Quiet,
        CutReason::Full,
        CutReason::MaxWait,
        CutReason::Immediate,
        CutReason::Rhythm,
        CutReason::Complete,
        CutReason::Paused,
        CutReason::TypingStale,
    ];

    /// Cut by a deadline its timers kept (so it has a lag worth measuring).
    pub fn timed(self) -> bool {
        !matches!(self, CutReason::Full | CutReason::Immediate)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut<K> {
    pub key: K,
    /// Sequence numbers in arrival order.
    pub seqs: Vec<u64>,
    pub reason: CutReason,
    /// When the batch was due; `now - deadline` is the debounce lag.
    pub deadline: Instant,
    /// When its last message arrived; `now - last_at` is the idle time at the cut.
    pub last_at: Instant,
}

#[derive(Debug)]
struct Pending {
    seqs: Vec<u64>,
    signals: Signals,
    deadline: Instant,
    /// The rule that fires at `deadline`.
    reason: CutReason,
}

/// What the adaptive policy remembers of a conversation between batches.
#[derive(Debug, Clone, Copy)]
struct Track {
    rhythm: Rhythm,
    last_msg: Instant,
    /// When its last batch was cut by a timer, and the window it had.
    last_cut: Option<(Instant, Duration)>,
    /// Its gateway has sent presence for it.
    presence: bool,
}

/// What `GET /api/batches` and the console show of one pending batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingView<K> {
    pub key: K,
    pub seqs: Vec<u64>,
    pub first_at: Instant,
    pub deadline: Instant,
    /// The rule that cuts it at `deadline` unless something else comes
    /// first (a full batch is never pending).
    pub rule: CutReason,
}

pub struct Batcher<K> {
    rules: Rules,
    pending: HashMap<K, Pending>,
    /// Deadlines in order, so the next one and the due ones are found without a scan.
    deadlines: BTreeSet<(Instant, K)>,
    /// Adaptive only: each conversation's rhythm, forgotten after a day idle.
    tracks: HashMap<K, Track>,
    /// Forget idle rhythms once this many are kept.
    sweep_tracks_at: usize,
    /// A rhythm was learned since `take_learned` last said so.
    learned: bool,
}

impl Track {
    fn new(at: Instant) -> Track {
        Track {
            rhythm: Rhythm { mean_gap_ms: 0.0, samples: 0 },
            last_msg: at,
            last_cut: None,
            presence: false,
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> Batcher<K> {
    pub fn new(rules: Rules) -> Self {
        Batcher {
            rules,
            pending: HashMap::new(),
            deadlines: BTreeSet::new(),
            tracks: HashMap::new(),
            sweep_tracks_at: 10_000,
            learned: false,
        }
    }

    /// A rhythm learned before a restart, with when the conversation last wrote.
    pub fn seed(&mut self, key: K, mean_gap_ms: f64, samples: u32, last_msg: Instant) {
        if samples == 0 || !matches!(self.rules.policy, Policy::Adaptive(_)) {
            return;
        }
        let track = self.tracks.entry(key).or_insert_with(|| Track::new(last_msg));
        track.rhythm = Rhythm { mean_gap_ms, samples };
        track.last_msg = track.last_msg.max(last_msg);
    }

    /// Says again that there is something to save (the last save failed).
    pub fn unsaved(&mut self) {
        self.learned = true;
    }

    /// The learned rhythms (mean gap in ms, samples, last message), if any
    /// was learned since the last call.
    pub fn take_learned(&mut self) -> Option<Vec<(K, f64, u32, Instant)>> {
        if !std::mem::take(&mut self.learned) {
            return None;
        }
        Some(
            self.tracks
                .iter()
                .filter(|(_, t)| t.rhythm.samples > 0)
                .map(|(k, t)| (k.clone(), t.rhythm.mean_gap_ms, t.rhythm.samples, t.last_msg))
                .collect(),
        )
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Adds a message received at `at` (normally now; earlier for messages
    /// recovered from disk, whose deadline may already have passed). Returns
    /// the batch at once if this message fills it.
    pub fn push(&mut self, key: K, seq: u64, at: Instant) -> Option<Cut<K>> {
        self.push_message(key, seq, at, false)
    }

    /// `push`, saying whether the message looks complete (`policy::looks_complete`).
    pub fn push_message(&mut self, key: K, seq: u64, at: Instant, complete: bool) -> Option<Cut<K>> {
        let rules = self.rules;
        if let Policy::Adaptive(a) = rules.policy {
            self.learn(&key, at, &a);
        }
        let entry = self.pending.entry(key.clone()).or_insert_with(|| Pending {
            seqs: Vec::new(),
            signals: Signals {
                first_at: at,
                last_at: at,
                complete,
                typing: None,
                paused: None,
                presence: false,
            },
            deadline: at,
            reason: CutReason::Quiet,
        });
        entry.seqs.push(seq);
        let s = &mut entry.signals;
        s.presence = self.tracks.get(&key).is_some_and(|t| t.presence);
        s.first_at = s.first_at.min(at);
        if at >= s.last_at {
            // A new last message: what the client showed before it is over.
            s.last_at = at;
            s.complete = complete;
            s.typing = None;
            s.paused = None;
        }
        if entry.seqs.len() >= rules.max_messages {
            self.deadlines.remove(&(entry.deadline, key.clone()));
            return self.take(&key, CutReason::Full);
        }
        self.schedule(key);
        None
    }

    /// A presence event. Only the adaptive policy listens, and only while
    /// the conversation has a batch pending: presence alone is never a turn.
    pub fn presence(&mut self, key: &K, presence: Presence, at: Instant) {
        if !matches!(self.rules.policy, Policy::Adaptive(_)) {
            return;
        }
        let track = self.tracks.entry(key.clone()).or_insert_with(|| Track::new(at));
        track.presence = true;
        let Some(p) = self.pending.get_mut(key) else { return };
        p.signals.presence = true;
        if at < p.signals.last_at {
            return;
        }
        match presence {
            Presence::Typing => (p.signals.typing, p.signals.paused) = (Some(at), None),
            // Stopping counts only after typing was seen since the last message.
            Presence::Paused if p.signals.typing.is_some() => {
                (p.signals.typing, p.signals.paused) = (None, Some(at))
            }
            Presence::Paused => return,
        }
        self.schedule(key.clone());
    }

    /// Moves a pending batch's deadline to what its policy says now.
    fn schedule(&mut self, key: K) {
        let p = self.pending.get_mut(&key).expect("a pending batch");
        let rhythm = self.tracks.get(&key).map(|t| &t.rhythm);
        let (deadline, reason) = policy::deadline(
            &self.rules.policy,
            self.rules.debounce,
            self.rules.max_wait,
            &p.signals,
            rhythm,
        );
        self.deadlines.remove(&(p.deadline, key.clone()));
        (p.deadline, p.reason) = (deadline, reason);
        self.deadlines.insert((deadline, key));
    }

    /// Learns the gap before a message: within a batch, or after a cut the
    /// client did not wait out (it came back within one more window).
    fn learn(&mut self, key: &K, at: Instant, a: &Adaptive) {
        let pending_last = self.pending.get(key).map(|p| p.signals.last_at);
        let track = self.tracks.entry(key.clone()).or_insert_with(|| Track::new(at));
        let gap = match (pending_last, track.last_cut) {
            (Some(last), _) => at.checked_duration_since(last).filter(|g| *g <= a.max_quiet),
            (None, Some((cut_at, window))) => {
                let since_last = at.saturating_duration_since(track.last_msg);
                let since_cut = at.saturating_duration_since(cut_at);
                a.is_continuation(since_last, since_cut, window).then_some(since_last)
            }
            (None, None) => None,
        };
        if let Some(gap) = gap.filter(|g| *g >= MIN_LEARNED_GAP) {
            track.rhythm.learn(gap);
            self.learned = true;
        }
        track.last_msg = track.last_msg.max(at);
        track.last_cut = None;
    }

    /// Adds the messages of a restarted turn to the conversation's pending
    /// batch, leaving its timing as it is; false if it has none (or they
    /// would overfill it).
    pub fn put_back(&mut self, key: &K, seqs: &[u64]) -> bool {
        let max = self.rules.max_messages;
        match self.pending.get_mut(key) {
            Some(p) if p.seqs.len() + seqs.len() <= max => {
                p.seqs.extend_from_slice(seqs);
                true
            }
            _ => false,
        }
    }

    /// Cuts a conversation's batch now, whatever its deadline.
    pub fn cut_now(&mut self, key: &K) -> Option<Cut<K>> {
        self.take(key, CutReason::Immediate)
    }

    /// The earliest deadline of any pending batch.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Cuts every batch whose deadline is at or before `now`.
    pub fn due(&mut self, now: Instant) -> Vec<Cut<K>> {
        let mut cuts = Vec::new();
        while let Some((deadline, key)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            let reason = self.pending[&key].reason;
            cuts.extend(self.take(&key, reason));
        }
        if self.tracks.len() >= self.sweep_tracks_at {
            self.tracks.retain(|_, t| now.saturating_duration_since(t.last_msg) < RHYTHM_IDLE);
            self.sweep_tracks_at = (self.tracks.len() * 2).max(10_000);
        }
        cuts
    }

    fn view(&self, key: &K) -> PendingView<K> {
        let p = &self.pending[key];
        PendingView {
            key: key.clone(),
            seqs: p.seqs.clone(),
            first_at: p.signals.first_at,
            deadline: p.deadline,
            rule: p.reason,
        }
    }

    /// Every pending batch, the next to be cut first.
    pub fn pending(&self) -> Vec<PendingView<K>> {
        self.page(0, usize::MAX)
    }

    /// `limit` pending batches from the `offset`-th in cut order: work
    /// proportional to the page, not to everything pending (the console
    /// asks for one page every second).
    pub fn page(&self, offset: usize, limit: usize) -> Vec<PendingView<K>> {
        self.deadlines.iter().skip(offset).take(limit).map(|(_, key)| self.view(key)).collect()
    }

    /// Pending batches and messages.
    pub fn len(&self) -> (usize, usize) {
        (self.pending.len(), self.pending.values().map(|p| p.seqs.len()).sum())
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn take(&mut self, key: &K, reason: CutReason) -> Option<Cut<K>> {
        let mut p = self.pending.remove(key)?;
        self.deadlines.remove(&(p.deadline, key.clone()));
        p.seqs.sort_unstable();
        let last_at = p.signals.last_at;
        if let Some(track) = self.tracks.get_mut(key) {
            // Only a window the timers closed can be shown too short.
            track.last_cut =
                reason.timed().then(|| (p.deadline, p.deadline.saturating_duration_since(last_at)));
        }
        Some(Cut { key: key.clone(), seqs: p.seqs, reason, deadline: p.deadline, last_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rules() -> Rules {
        Rules { debounce: 10 * S, max_messages: 10, max_wait: 60 * S, policy: Policy::Fixed }
    }

    #[test]
    fn five_messages_two_seconds_apart_are_one_cut_ten_seconds_after_the_last() {
        let t0 = Instant::now();
        let mut b = Batcher::new(rules());
        for i in 0..5u64 {
            let at = t0 + 2 * S * i as u32;
            assert_eq!(b.push("p", i, at), None);
            assert!(b.due(at).is_empty(), "nothing due while the client types");
        }
        let last = t0 + 8 * S;
        assert_eq!(b.next_deadline(), Some(last + 10 * S));
        assert!(b.due(last + 10 * S - Duration::from_millis(1)).is_empty());
        let cuts = b.due(last + 10 * S);
        assert_eq!(cuts.len(), 1);
        assert_eq!(cuts[0].seqs, vec![0, 1, 2, 3, 4]);
        assert_eq!(cuts[0].reason, CutReason::Quiet);
        assert!(b.is_empty());
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn a_new_message_resets_the_quiet_timer() {
        let t0 = Instant::now();
        let mut b = Batcher::new(rules());
        b.push("p", 1, t0);
        b.push("p", 2, t0 + 9 * S);
        assert!(b.due(t0 + 10 * S).is_empty());
        assert_eq!(b.due(t0 + 19 * S).len(), 1);
    }

    #[test]
    fn the_tenth_message_cuts_at_once_and_the_rest_start_a_new_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(rules());
        let mut cuts = Vec::new();
        for i in 0..12u64 {
            cuts.extend(b.push("p", i, t0 + Duration::from_millis(100 * i)));
        }
        assert_eq!(cuts.len(), 1);
        assert_eq!(cuts[0].seqs, (0..10).collect::<Vec<_>>());
        assert_eq!(cuts[0].reason, CutReason::Full);
        let rest = b.due(t0 + 20 * S);
        assert_eq!(rest[0].seqs, vec![10, 11]);
    }

    #[test]
    fn max_wait_bounds_a_client_who_never_stops() {
        let t0 = Instant::now();
        let mut b = Batcher::new(Rules { max_messages: 100, ..rules() });
        for i in 0..9u32 {
            b.push("p", i as u64, t0 + 8 * S * i); // 0..64 s, always within debounce
        }
        // The 9th push (at 64 s) came after max_wait: the deadline is first + 60 s.
        let cuts = b.due(t0 + 64 * S);
        assert_eq!(cuts.len(), 1);
        assert_eq!(cuts[0].reason, CutReason::MaxWait);
        assert_eq!(cuts[0].deadline, t0 + 60 * S);
    }

    #[test]
    fn recovered_messages_past_their_deadline_are_due_at_once() {
        let now = Instant::now() + 3600 * S;
        let mut b = Batcher::new(rules());
        b.push("p", 7, now - 30 * S);
        b.push("q", 8, now - 2 * S);
        let due = b.due(now);
        assert_eq!(due.iter().map(|c| c.key).collect::<Vec<_>>(), vec!["p"]);
        assert_eq!(b.next_deadline(), Some(now + 8 * S));
    }

    #[test]
    fn phones_are_independent_and_cut_in_deadline_order() {
        let t0 = Instant::now();
        let mut b = Batcher::new(rules());
        b.push("b", 1, t0 + S);
        b.push("a", 2, t0);
        b.push("c", 3, t0 + 5 * S);
        let due = b.due(t0 + 11 * S);
        assert_eq!(due.iter().map(|c| c.key).collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(b.len(), (1, 1));
        assert_eq!(b.cut_now(&"c").unwrap().reason, CutReason::Immediate);
        assert!(b.cut_now(&"c").is_none());
    }

    #[test]
    fn a_page_is_in_cut_order_and_names_the_rule_that_will_fire() {
        let t0 = Instant::now();
        let mut b = Batcher::new(rules());
        // "long" has typed every 8 s for 56 s: max wait (60 s) comes before quiet.
        for i in 0..8u32 {
            b.push("long", i as u64, t0 + 8 * S * i);
        }
        b.push("late", 10, t0 + 51 * S);
        b.push("early", 11, t0 + 40 * S);
        let page = b.page(0, 10);
        let keys: Vec<_> = page.iter().map(|p| p.key).collect();
        assert_eq!(keys, vec!["early", "long", "late"], "next cut first");
        assert_eq!(page[0].rule, CutReason::Quiet);
        assert_eq!(page[0].deadline, t0 + 50 * S);
        assert_eq!(page[1].rule, CutReason::MaxWait);
        assert_eq!(page[1].deadline, t0 + 60 * S);
        assert_eq!(page[1].first_at, t0);
        assert_eq!(page[1].seqs.len(), 8);
        assert_eq!(b.page(1, 1).iter().map(|p| p.key).collect::<Vec<_>>(), vec!["long"]);
        assert!(b.page(3, 10).is_empty());
        // The rule shown is the one that cuts it.
        let cuts = b.due(t0 + 61 * S);
        assert_eq!(
            cuts.iter().map(|c| (c.key, c.reason)).collect::<Vec<_>>(),
            vec![("early", CutReason::Quiet), ("long", CutReason::MaxWait), ("late", CutReason::Quiet)]
        );
    }

    fn adaptive() -> Rules {
        let c = crate::config::BatchingConfig {
            policy: crate::config::CutPolicy::Adaptive,
            ..crate::config::BatchingConfig::default()
        };
        Rules { max_wait: 60 * S, ..c.rules() }
    }

    #[test]
    fn a_client_who_came_back_right_after_a_cut_teaches_a_longer_window() {
        let t0 = Instant::now();
        let mut b = Batcher::new(adaptive());
        b.push("p", 1, t0);
        // The prior window (9 s) passes: cut.
        let first = b.due(t0 + 9 * S);
        assert_eq!((first.len(), first[0].reason), (1, CutReason::Rhythm));
        // The client was not done: 12 s after its message, 3 s after the cut.
        b.push("p", 2, t0 + 12 * S);
        let page = b.page(0, 1);
        assert_eq!(page[0].deadline, t0 + 12 * S + 20 * S, "12 s learned: 36 s, kept at max_quiet");
        // A client who comes back much later taught nothing: a new conversation burst.
        let mut other = Batcher::new(adaptive());
        other.push("q", 1, t0);
        other.due(t0 + 9 * S);
        other.push("q", 2, t0 + 60 * S);
        assert_eq!(other.page(0, 1)[0].deadline, t0 + 69 * S, "still the prior");
    }

    #[test]
    fn presence_moves_only_a_pending_batch_and_only_under_the_adaptive_policy() {
        let t0 = Instant::now();
        let mut fixed = Batcher::new(rules());
        fixed.push("p", 1, t0);
        fixed.presence(&"p", Presence::Typing, t0 + S);
        assert_eq!(fixed.next_deadline(), Some(t0 + 10 * S));
        let mut b = Batcher::new(adaptive());
        b.presence(&"p", Presence::Typing, t0);
        assert_eq!(b.next_deadline(), None, "presence alone is never a batch");
        b.push("p", 1, t0 + S);
        // Presence was seen: nobody typing after the message means done after the grace.
        assert_eq!(b.page(0, 1)[0].rule, CutReason::Paused);
        b.presence(&"p", Presence::Typing, t0 + 2 * S);
        assert_eq!(b.page(0, 1)[0].rule, CutReason::TypingStale);
        b.presence(&"p", Presence::Paused, t0 + 5 * S);
        let cut = b.due(t0 + 10 * S);
        assert_eq!(cut[0].reason, CutReason::Paused);
        assert_eq!(cut[0].deadline, t0 + 5 * S + Duration::from_millis(2500));
    }
}
