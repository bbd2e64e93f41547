//! Debounce, without IO: decides when a conversation's pending messages
//! become a turn. The driver task (`turns::driver`) owns one `Batcher`,
//! passes `now` in, and sleeps until `next_deadline()`; nothing here polls.
//!
//! A batch is cut when it holds `max_messages`, when `max_wait` has passed
//! since its first message, or when its policy (`policy.rs`) says the client
//! is done: `debounce` after the last message (fixed), or what presence,
//! the learned windows and the last message's shape say (adaptive).
//! The batcher holds only sequence numbers and timings: it is rebuilt from
//! the store's pending messages on start, which is why it can live in
//! memory. (What it learns of the clients' pauses is a cache the driver
//! saves and seeds it with: `learn.rs`.)

pub mod learn;
pub mod policy;

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

use learn::{Recent, Spread};
pub use policy::{Adaptive, Policy};
use policy::{Signals, Windows};

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

/// A typing that follows a silence by less than this is the same burst
/// arriving out of order: not learned as a resume.
const MIN_LEARNED_RESUME: Duration = Duration::from_millis(50);

/// Conversations whose learned silences are forgotten after this long without a message.
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
    /// Staff handed the conversation back: what waited during the takeover.
    Resumed,
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
            CutReason::Resumed => "resumed",
        }
    }

    /// The reason `as_str` names.
    pub fn from_name(name: &str) -> Option<CutReason> {
        CutReason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Every reason, for the metrics.
    pub const ALL: [CutReason; 9] = [
        CutReason::Quiet,
        CutReason::Full,
        CutReason::MaxWait,
        CutReason::Immediate,
        CutReason::Rhythm,
        CutReason::Complete,
        CutReason::Paused,
        CutReason::TypingStale,
        CutReason::Resumed,
    ];

    /// Cut by a deadline its timers kept (so it has a lag worth measuring).
    pub fn timed(self) -> bool {
        !matches!(self, CutReason::Full | CutReason::Immediate | CutReason::Resumed)
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

/// Where a restarted turn's messages went (`Batcher::put_back`).
#[derive(Debug, PartialEq, Eq)]
pub enum PutBack<K> {
    /// Into the pending batch, ahead of its messages.
    Merged,
    /// Together they were more than a batch holds: the first ones, cut now.
    Full(Cut<K>),
    /// The conversation has no pending batch.
    NoBatch,
}

#[derive(Debug)]
struct Pending {
    seqs: Vec<u64>,
    signals: Signals,
    deadline: Instant,
    /// The rule that fires at `deadline`.
    reason: CutReason,
    /// `deadline` is its messages' (false only between `push_recovered`
    /// and `schedule_recovered`).
    scheduled: bool,
}

/// What the adaptive policy remembers of a conversation between batches.
#[derive(Debug, Clone, Copy)]
struct Track {
    /// Its latest gaps between two messages of one request…
    gaps: Recent,
    /// …and silences before typing resumed within one.
    resumes: Recent,
    last_msg: Instant,
    /// Its last batch cut by a timer, until the silence before it is learned.
    last_cut: Option<LastCut>,
    /// Its gateway has sent presence for it.
    presence: bool,
    /// It is typing since its last message and `paused`, since.
    typing: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct LastCut {
    /// The batch's last message, and since when the client was silent.
    last_msg: Instant,
    quiet_since: Instant,
    /// When the silence counts as the end of the request: `max_quiet` on.
    closes_at: Instant,
    /// How the silence before the cut ends is still to be learned: by the
    /// next message or typing (it went on), or the answer (it never did).
    gap_open: bool,
    resume_open: bool,
}

/// The two kinds of silence learned (`learn.rs`).
#[derive(Debug, Clone, Copy)]
enum Kind {
    Gap,
    Resume,
}

/// What the adaptive policy learned, to save it and to seed a batcher
/// after a restart: the population's spreads, and each conversation's
/// latest pauses (ms) with when it last wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Learned<K> {
    pub gaps: Vec<f32>,
    pub resumes: Vec<f32>,
    pub convs: Vec<LearnedConv<K>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LearnedConv<K> {
    pub key: K,
    pub gaps: Vec<u32>,
    pub resumes: Vec<u32>,
    pub last_msg: Instant,
}

/// The population's pauses, for the adaptive policy.
#[derive(Debug)]
struct Population {
    gaps: Spread,
    resumes: Spread,
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
    /// Adaptive only: each conversation's pauses, forgotten after a day idle…
    tracks: HashMap<K, Track>,
    /// …and the population's.
    population: Option<Population>,
    /// The silences after cuts still open, by when they close.
    open: BTreeSet<(Instant, K)>,
    /// Forget idle rhythms once this many are kept.
    sweep_tracks_at: usize,
    /// A pause was learned since `take_learned` last said so.
    learned: bool,
    /// Batches `push_recovered` changed, for `schedule_recovered`.
    unscheduled: Vec<K>,
}

impl Track {
    fn new(at: Instant) -> Track {
        Track {
            gaps: Recent::default(),
            resumes: Recent::default(),
            last_msg: at,
            last_cut: None,
            presence: false,
            typing: None,
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> Batcher<K> {
    pub fn new(rules: Rules) -> Self {
        let population = match rules.policy {
            Policy::Adaptive(a) => {
                Some(Population { gaps: Spread::new(a.prior_gap), resumes: Spread::new(a.prior_resume) })
            }
            Policy::Fixed => None,
        };
        Batcher {
            rules,
            pending: HashMap::new(),
            deadlines: BTreeSet::new(),
            tracks: HashMap::new(),
            population,
            open: BTreeSet::new(),
            sweep_tracks_at: 10_000,
            learned: false,
            unscheduled: Vec::new(),
        }
    }

    /// What was learned before a restart (nothing under the fixed policy).
    pub fn seed(&mut self, learned: Learned<K>) {
        let Some(pop) = self.population.as_mut() else { return };
        if let (Some(gaps), Some(resumes)) =
            (Spread::from_counts(&learned.gaps), Spread::from_counts(&learned.resumes))
        {
            *pop = Population { gaps, resumes };
        }
        for c in learned.convs {
            let track = self.tracks.entry(c.key).or_insert_with(|| Track::new(c.last_msg));
            track.gaps = Recent::from_ms(&c.gaps);
            track.resumes = Recent::from_ms(&c.resumes);
            track.last_msg = track.last_msg.max(c.last_msg);
        }
    }

    /// Says again that there is something to save (the last save failed).
    pub fn unsaved(&mut self) {
        self.learned = true;
    }

    /// What was learned, if anything was since the last call.
    pub fn take_learned(&mut self) -> Option<Learned<K>> {
        if !std::mem::take(&mut self.learned) {
            return None;
        }
        let pop = self.population.as_ref()?;
        Some(Learned {
            gaps: pop.gaps.counts().to_vec(),
            resumes: pop.resumes.counts().to_vec(),
            convs: self
                .tracks
                .iter()
                .filter(|(_, t)| !t.gaps.is_empty() || !t.resumes.is_empty())
                .map(|(k, t)| LearnedConv {
                    key: k.clone(),
                    gaps: t.gaps.to_ms(),
                    resumes: t.resumes.to_ms(),
                    last_msg: t.last_msg,
                })
                .collect(),
        })
    }

    /// The adaptive policy's windows for `key` now (the prior's under `fixed`,
    /// which never reads them).
    pub fn windows(&self, key: &K) -> Windows {
        let (Policy::Adaptive(a), Some(pop)) = (self.rules.policy, self.population.as_ref()) else {
            return Windows { gap: self.rules.debounce, resume: self.rules.debounce };
        };
        let q = a.quantile_pct as f32 / 100.0;
        let none = Recent::default();
        let track = self.tracks.get(key);
        Windows {
            gap: a.window(pop.gaps.window(track.map_or(&none, |t| &t.gaps), q)),
            resume: a.window(pop.resumes.window(track.map_or(&none, |t| &t.resumes), q)),
        }
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
        if self.add(&key, seq, at, complete) {
            return self.take(&key, CutReason::Full);
        }
        self.schedule(key);
        None
    }

    /// `push_message` for a message recovered from disk (they come in
    /// arrival order), but its batch's deadline is left for
    /// `schedule_recovered`: with many messages per conversation, moving
    /// the deadline for each is most of a large recovery's cost, and no
    /// deadline is read before the last. Under the fixed policy the result
    /// is the same; under the adaptive one the deadlines then reflect
    /// everything learnt from the recovered messages.
    pub fn push_recovered(&mut self, key: K, seq: u64, at: Instant, complete: bool) -> Option<Cut<K>> {
        let before = self.pending.get(&key).map(|p| (p.scheduled, p.seqs.len()));
        // A batch this message fills keeps the deadline its earlier messages gave it.
        if before.is_some_and(|(scheduled, len)| !scheduled && len + 1 >= self.rules.max_messages) {
            self.schedule(key.clone());
        }
        if self.add(&key, seq, at, complete) {
            return self.take(&key, CutReason::Full);
        }
        if before.is_none_or(|(scheduled, _)| scheduled) {
            self.unscheduled.push(key);
        }
        None
    }

    /// Schedules the batches `push_recovered` left without a deadline.
    pub fn schedule_recovered(&mut self) {
        for key in std::mem::take(&mut self.unscheduled) {
            if self.pending.get(&key).is_some_and(|p| !p.scheduled) {
                self.schedule(key);
            }
        }
    }

    /// Adds a message to its batch without scheduling it; true if the batch is full.
    fn add(&mut self, key: &K, seq: u64, at: Instant, complete: bool) -> bool {
        let rules = self.rules;
        if let Policy::Adaptive(a) = rules.policy {
            self.learn(key, at, &a);
        }
        let presence = self.tracks.get(key).is_some_and(|t| t.presence);
        let add = |p: &mut Pending| {
            p.seqs.push(seq);
            p.scheduled = false;
            let s = &mut p.signals;
            s.presence = presence;
            s.first_at = s.first_at.min(at);
            if at >= s.last_at {
                // A new last message: what the client showed before it is over.
                s.last_at = at;
                s.complete = complete;
                s.typing = None;
                s.paused = None;
            }
            p.seqs.len() >= rules.max_messages
        };
        match self.pending.get_mut(key) {
            Some(p) => add(p),
            None => {
                let signals =
                    Signals { first_at: at, last_at: at, complete, typing: None, paused: None, presence };
                let mut fresh = Pending {
                    seqs: Vec::new(),
                    signals,
                    deadline: at,
                    reason: CutReason::Quiet,
                    scheduled: false,
                };
                let full = add(&mut fresh);
                self.pending.insert(key.clone(), fresh);
                full
            }
        }
    }

    /// A presence event. Only the adaptive policy listens, and only while
    /// the conversation has a batch pending: presence alone is never a turn.
    /// Typing after a silence teaches how long this client pauses within a
    /// request — also right after a cut, when it shows the cut came early.
    pub fn presence(&mut self, key: &K, presence: Presence, at: Instant) {
        let Policy::Adaptive(a) = self.rules.policy else { return };
        let track = self.tracks.entry(key.clone()).or_insert_with(|| Track::new(at));
        track.presence = true;
        if at >= track.last_msg {
            track.typing = (presence == Presence::Typing).then_some(at);
        }
        let resumed = match (self.pending.get(key), presence) {
            (Some(p), Presence::Typing) if p.signals.typing.is_none() && at >= p.signals.last_at => {
                Some(at.saturating_duration_since(p.signals.quiet_since()))
            }
            (None, Presence::Typing) => track.last_cut.as_mut().filter(|c| c.resume_open).map(|c| {
                c.resume_open = false;
                at.saturating_duration_since(c.quiet_since)
            }),
            _ => None,
        };
        if let Some(silence) = resumed.filter(|s| *s >= MIN_LEARNED_RESUME) {
            self.note(key, Kind::Resume, (silence <= a.max_quiet).then_some(silence));
        }
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

    /// The silences after cuts that nobody went on from within `max_quiet`
    /// ended the request: learned as such.
    fn close_silences(&mut self, now: Instant) {
        while let Some((at, key)) = self.open.first().cloned() {
            if at > now {
                break;
            }
            self.open.pop_first();
            let Some(track) = self.tracks.get_mut(&key) else { continue };
            // Only if that silence is still the open one (no message since).
            let Some(cut) = track.last_cut.filter(|c| c.closes_at == at) else { continue };
            track.last_cut = None;
            if cut.gap_open {
                self.note(&key, Kind::Gap, None);
            }
            if cut.resume_open {
                self.note(&key, Kind::Resume, None);
            }
        }
    }

    /// Learns how one silence of `key` ended.
    fn note(&mut self, key: &K, kind: Kind, ended: learn::Ended) {
        let (Some(track), Some(pop)) = (self.tracks.get_mut(key), self.population.as_mut()) else { return };
        match kind {
            Kind::Gap => {
                track.gaps.learn(ended);
                pop.gaps.learn(ended);
            }
            Kind::Resume => {
                track.resumes.learn(ended);
                pop.resumes.learn(ended);
            }
        }
        self.learned = true;
    }

    /// Moves a pending batch's deadline to what its policy says now.
    fn schedule(&mut self, key: K) {
        let windows = self.windows(&key);
        let p = self.pending.get_mut(&key).expect("a pending batch");
        let (deadline, reason) = policy::deadline(
            &self.rules.policy,
            self.rules.debounce,
            self.rules.max_wait,
            &p.signals,
            windows,
        );
        self.deadlines.remove(&(p.deadline, key.clone()));
        (p.deadline, p.reason, p.scheduled) = (deadline, reason, true);
        self.deadlines.insert((deadline, key));
    }

    /// Learns how the silence before a message ended: within a batch, or
    /// after a cut (it came too early, whether the turn was answered or not:
    /// a reply does not tell whether the client had finished).
    /// With presence, a message nobody was seen typing ends a resume too.
    fn learn(&mut self, key: &K, at: Instant, a: &Adaptive) {
        let track = self.tracks.entry(key.clone()).or_insert_with(|| Track::new(at));
        let presence = track.presence;
        let (gap, resume) = match (self.pending.get(key), track.last_cut.take()) {
            (Some(p), _) => (
                Some(at.saturating_duration_since(p.signals.last_at)),
                p.signals.typing.is_none().then(|| at.saturating_duration_since(p.signals.quiet_since())),
            ),
            (None, Some(cut)) => (
                cut.gap_open.then(|| at.saturating_duration_since(cut.last_msg)),
                cut.resume_open.then(|| at.saturating_duration_since(cut.quiet_since)),
            ),
            (None, None) => (None, None),
        };
        track.last_msg = track.last_msg.max(at);
        track.typing = None;
        let ended = |d: Duration| (d <= a.max_quiet).then_some(d);
        if let Some(gap) = gap.filter(|g| *g >= MIN_LEARNED_GAP) {
            self.note(key, Kind::Gap, ended(gap));
        }
        if let Some(resume) = resume.filter(|r| presence && *r >= MIN_LEARNED_RESUME) {
            self.note(key, Kind::Resume, ended(resume));
        }
    }

    /// Puts the messages of a restarted turn (older than anything pending)
    /// in front of the conversation's pending batch, leaving its timing as it
    /// is. If together they overfill it, the first `max_messages` are cut at
    /// once (the restarted turn's first) and the rest stay pending. With no
    /// pending batch but a client typing (the turn was restarted for it),
    /// they become a pending batch again, held while the typing lasts.
    pub fn put_back(&mut self, key: &K, seqs: &[u64]) -> PutBack<K> {
        let max = self.rules.max_messages;
        let Some(p) = self.pending.get_mut(key) else {
            let Some(track) = self.tracks.get(key).filter(|t| t.typing.is_some()) else {
                return PutBack::NoBatch;
            };
            // Held from the typing on (its max wait too: the client is
            // writing the rest of the request now).
            let since = track.typing.unwrap_or(track.last_msg);
            let signals = Signals {
                first_at: since,
                last_at: track.last_msg,
                complete: false,
                typing: track.typing,
                paused: None,
                presence: true,
            };
            let pending = Pending {
                seqs: seqs.to_vec(),
                signals,
                deadline: track.last_msg,
                reason: CutReason::Quiet,
                scheduled: true,
            };
            self.pending.insert(key.clone(), pending);
            self.deadlines.insert((track.last_msg, key.clone()));
            self.schedule(key.clone());
            return PutBack::Merged;
        };
        let mut all = seqs.to_vec();
        all.append(&mut p.seqs);
        all.sort_unstable();
        if all.len() <= max {
            p.seqs = all;
            return PutBack::Merged;
        }
        p.seqs = all.split_off(max);
        let last_at = p.signals.last_at;
        PutBack::Full(Cut {
            key: key.clone(),
            seqs: all,
            reason: CutReason::Full,
            deadline: last_at,
            last_at,
        })
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
        self.close_silences(now);
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
        if let (Some(track), Policy::Adaptive(a)) = (self.tracks.get_mut(key), self.rules.policy) {
            // Only a window the timers closed can be shown too short.
            let quiet_since = p.signals.quiet_since();
            track.last_cut = reason.timed().then(|| LastCut {
                last_msg: last_at,
                quiet_since,
                closes_at: quiet_since + a.max_quiet,
                gap_open: true,
                resume_open: track.presence,
            });
            if reason.timed() {
                self.open.insert((quiet_since + a.max_quiet, key.clone()));
            }
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

    /// Recovered messages batch as pushing them one by one would: the same
    /// batches cut full and left waiting, and under the fixed policy the
    /// same deadlines and later cuts.
    #[test]
    fn recovered_messages_batch_as_if_pushed_one_by_one() {
        let now = Instant::now() + 3600 * S;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..200 {
            let rules = match round % 2 {
                0 => Rules { max_messages: 1 + next(6) as usize, ..rules() },
                _ => Rules { max_messages: 1 + next(6) as usize, ..adaptive() },
            };
            // Up to 40 messages of up to 5 phones, oldest first, some of
            // them past their deadline already.
            let mut at = now - Duration::from_secs(next(120));
            let messages: Vec<(&str, u64, Instant, bool)> = (0..next(40))
                .map(|seq| {
                    at += Duration::from_millis(next(8_000));
                    (["a", "b", "c", "d", "e"][next(5) as usize], seq, at, next(3) == 0)
                })
                .collect();
            let (mut one_by_one, mut recovered) = (Batcher::new(rules), Batcher::new(rules));
            let (mut full_one, mut full_recovered) = (Vec::new(), Vec::new());
            for &(key, seq, at, complete) in &messages {
                full_one.extend(one_by_one.push_message(key, seq, at, complete));
                full_recovered.extend(recovered.push_recovered(key, seq, at, complete));
            }
            recovered.schedule_recovered();
            let fixed = round % 2 == 0;
            // Under the adaptive policy a deadline reflects what was learnt meanwhile.
            let plain = |cuts: &[Cut<&'static str>]| {
                cuts.iter()
                    .map(|c| (c.key, c.seqs.clone(), c.reason, c.last_at, fixed.then_some(c.deadline)))
                    .collect::<Vec<_>>()
            };
            assert_eq!(plain(&full_one), plain(&full_recovered), "round {round}: the batches cut full");
            fn seqs(b: &Batcher<&'static str>) -> Vec<(&'static str, Vec<u64>)> {
                b.page(0, 10).into_iter().map(|p| (p.key, p.seqs)).collect()
            }
            let mut waiting = seqs(&recovered);
            waiting.sort();
            let mut expected = seqs(&one_by_one);
            expected.sort();
            assert_eq!(waiting, expected, "round {round}: what waits");
            if !fixed {
                continue;
            }
            let at_once = &mut recovered;
            assert_eq!(one_by_one.next_deadline(), at_once.next_deadline(), "round {round}");
            assert_eq!(one_by_one.page(0, 10), at_once.page(0, 10), "round {round}: what waits");
            for later in [now, now + 5 * S, now + 60 * S, now + 3600 * S] {
                assert_eq!(one_by_one.due(later), at_once.due(later), "round {round}: the cuts by {later:?}");
            }
        }
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
    fn a_paused_between_fragments_is_not_the_end_of_the_request() {
        let t0 = Instant::now();
        let mut b = Batcher::new(adaptive());
        let resume = b.windows(&"p").resume;
        assert!(resume >= 7 * S, "the prior resume window: {resume:?}");
        b.presence(&"p", Presence::Typing, t0);
        b.push("p", 1, t0 + S);
        b.presence(&"p", Presence::Typing, t0 + 2 * S);
        b.presence(&"p", Presence::Paused, t0 + 3 * S);
        // Typing again 3 s after the paused: still the same request.
        assert!(b.due(t0 + 6 * S).is_empty());
        b.presence(&"p", Presence::Typing, t0 + 6 * S);
        b.push("p", 2, t0 + 9 * S);
        b.presence(&"p", Presence::Typing, t0 + 9 * S + Duration::from_millis(100));
        b.presence(&"p", Presence::Paused, t0 + 10 * S);
        assert_eq!(b.page(0, 1)[0].rule, CutReason::Paused);
        let quiet_since = t0 + 10 * S;
        let window = b.windows(&"p").resume;
        assert!(b.due(quiet_since + window - Duration::from_millis(1)).is_empty());
        let cut = b.due(quiet_since + window);
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].seqs, vec![1, 2], "one turn for the whole request");
    }

    #[test]
    fn typing_soon_after_cuts_teaches_a_longer_window_and_silences_that_end_a_shorter_one() {
        let t0 = Instant::now();
        let prior = Batcher::<u32>::new(adaptive()).windows(&0).resume;
        // 300 conversations each stop for 12 s mid-request and are cut first.
        let mut slow = Batcher::new(adaptive());
        for c in 0..300u32 {
            let at = t0 + Duration::from_secs(100 * c as u64);
            slow.presence(&c, Presence::Typing, at);
            slow.push(c, c as u64, at + S);
            slow.due(at + S + prior);
            slow.presence(&c, Presence::Typing, at + 13 * S);
        }
        let learned = slow.windows(&10_000).resume;
        assert!(learned >= 12 * S, "{learned:?}: a new conversation gets the population's longer window");
        // 300 conversations write one line each and never go on.
        let mut done = Batcher::new(adaptive());
        for c in 0..300u32 {
            let at = t0 + Duration::from_secs(100 * c as u64);
            done.presence(&c, Presence::Typing, at);
            done.push(c, c as u64, at + S);
            done.due(at + 50 * S);
        }
        let learned = done.windows(&10_000).resume;
        assert!(learned < prior && learned <= 2 * S, "{learned:?}: most silences ended their requests");
        let Policy::Adaptive(a) = adaptive().policy else { unreachable!() };
        let at = t0 + Duration::from_secs(100_000);
        done.push(1, 1, at);
        assert_eq!(done.page(0, 1)[0].deadline, at + a.paused_grace, "the grace still holds");
    }

    #[test]
    fn a_restarted_turn_goes_in_front_of_the_pending_batch_or_is_cut_with_its_first_messages() {
        let t0 = Instant::now();
        let mut b = Batcher::new(Rules { max_messages: 3, ..rules() });
        assert_eq!(b.put_back(&"p", &[1]), PutBack::NoBatch);
        b.push("p", 5, t0);
        assert_eq!(b.put_back(&"p", &[1, 2]), PutBack::Merged);
        assert_eq!(b.page(0, 1)[0].seqs, vec![1, 2, 5]);
        assert_eq!(b.page(0, 1)[0].deadline, t0 + 10 * S, "its timing unchanged");
        let mut b = Batcher::new(Rules { max_messages: 3, ..rules() });
        b.push("p", 5, t0);
        b.push("p", 6, t0 + S);
        let PutBack::Full(cut) = b.put_back(&"p", &[0, 1]) else {
            panic!("four messages overfill a batch of three")
        };
        assert_eq!(cut.seqs, vec![0, 1, 5], "the restarted turn's first");
        assert_eq!(b.page(0, 1)[0].seqs, vec![6]);
    }

    #[test]
    fn a_turn_restarted_for_typing_waits_held_for_what_comes() {
        let t0 = Instant::now();
        let mut b = Batcher::new(adaptive());
        b.presence(&"p", Presence::Typing, t0);
        b.push("p", 1, t0 + S);
        let cut = b.due(t0 + 60 * S);
        assert_eq!(cut.len(), 1);
        // The turn runs; the client types again: it comes back, held.
        b.presence(&"p", Presence::Typing, t0 + 62 * S);
        assert_eq!(b.put_back(&"p", &[1]), PutBack::Merged);
        assert_eq!(b.page(0, 1)[0].rule, CutReason::TypingStale);
        b.push("p", 2, t0 + 64 * S);
        let Policy::Adaptive(a) = adaptive().policy else { unreachable!() };
        let cut = b.due(t0 + 64 * S + a.max_quiet);
        assert_eq!(cut[0].seqs, vec![1, 2]);
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
        // Presence was seen: nobody typing after the message means silent since it.
        assert_eq!(b.page(0, 1)[0].rule, CutReason::Paused);
        b.presence(&"p", Presence::Typing, t0 + 2 * S);
        assert_eq!(b.page(0, 1)[0].rule, CutReason::TypingStale);
        b.presence(&"p", Presence::Paused, t0 + 5 * S);
        let window = b.windows(&"p").resume;
        let cut = b.due(t0 + 5 * S + window);
        assert_eq!(cut[0].reason, CutReason::Paused);
        assert_eq!(cut[0].deadline, t0 + 5 * S + window);
    }

    #[test]
    fn what_was_learned_comes_back_in_a_new_batcher() {
        let t0 = Instant::now();
        let mut b = Batcher::new(adaptive());
        for i in 0..4u64 {
            b.push("p", i, t0 + 12 * S * i as u32);
        }
        let before = b.windows(&"p");
        let learned = b.take_learned().expect("gaps were learned");
        assert!(b.take_learned().is_none(), "nothing new since");
        let mut again = Batcher::new(adaptive());
        again.seed(learned);
        assert_eq!(again.windows(&"p"), before);
    }
}
