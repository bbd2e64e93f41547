//! Debounce, without IO: decides when a conversation's pending messages
//! become a turn. The driver task (`turns::driver`) owns one `Batcher`,
//! passes `now` in, and sleeps until `next_deadline()`; nothing here polls.
//!
//! A batch is cut when `debounce` has passed since its last message, when it
//! holds `max_messages`, or when `max_wait` has passed since its first one.
//! The batcher holds only sequence numbers: it is rebuilt from the store's
//! inbox on start, which is why it can live in memory.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub debounce: Duration,
    pub max_messages: usize,
    pub max_wait: Duration,
}

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
}

impl CutReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CutReason::Quiet => "quiet",
            CutReason::Full => "full",
            CutReason::MaxWait => "max_wait",
            CutReason::Immediate => "immediate",
        }
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
    first_at: Instant,
    last_at: Instant,
    deadline: Instant,
}

/// What `GET /api/batches` and the console show of one pending batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingView<K> {
    pub key: K,
    pub seqs: Vec<u64>,
    pub first_at: Instant,
    pub deadline: Instant,
    /// The rule that cuts it at `deadline` unless more messages come:
    /// `Quiet` or `MaxWait` (a full batch is never pending).
    pub rule: CutReason,
}

pub struct Batcher<K> {
    rules: Rules,
    pending: HashMap<K, Pending>,
    /// Deadlines in order, so the next one and the due ones are found without a scan.
    deadlines: BTreeSet<(Instant, K)>,
}

impl<K: Clone + Eq + Hash + Ord> Batcher<K> {
    pub fn new(rules: Rules) -> Self {
        Batcher { rules, pending: HashMap::new(), deadlines: BTreeSet::new() }
    }

    /// Adds a message received at `at` (normally now; earlier for messages
    /// recovered from disk, whose deadline may already have passed). Returns
    /// the batch at once if this message fills it.
    pub fn push(&mut self, key: K, seq: u64, at: Instant) -> Option<Cut<K>> {
        let rules = self.rules;
        let entry = self.pending.entry(key.clone()).or_insert_with(|| Pending {
            seqs: Vec::new(),
            first_at: at,
            last_at: at,
            deadline: at,
        });
        let old_deadline = entry.deadline;
        entry.seqs.push(seq);
        entry.first_at = entry.first_at.min(at);
        entry.last_at = entry.last_at.max(at);
        entry.deadline = (entry.last_at + rules.debounce).min(entry.first_at + rules.max_wait);
        let full = entry.seqs.len() >= rules.max_messages;
        let new_deadline = entry.deadline;
        self.deadlines.remove(&(old_deadline, key.clone()));
        if full {
            return self.take(&key, CutReason::Full);
        }
        self.deadlines.insert((new_deadline, key));
        None
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
            let reason = self.rule(&self.pending[&key]);
            cuts.extend(self.take(&key, reason));
        }
        cuts
    }

    /// Which rule fires at a batch's deadline.
    fn rule(&self, p: &Pending) -> CutReason {
        if p.first_at + self.rules.max_wait <= p.last_at + self.rules.debounce {
            CutReason::MaxWait
        } else {
            CutReason::Quiet
        }
    }

    fn view(&self, key: &K) -> PendingView<K> {
        let p = &self.pending[key];
        PendingView {
            key: key.clone(),
            seqs: p.seqs.clone(),
            first_at: p.first_at,
            deadline: p.deadline,
            rule: self.rule(p),
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
        Some(Cut { key: key.clone(), seqs: p.seqs, reason, deadline: p.deadline, last_at: p.last_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rules() -> Rules {
        Rules { debounce: 10 * S, max_messages: 10, max_wait: 60 * S }
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
}
