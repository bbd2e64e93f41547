//! The turn gate, without IO: at most one turn per conversation in flight,
//! at most `max_concurrent` in all, conversations served in the order their
//! work became ready.
//!
//! Work that arrives for a conversation whose turn is running waits here; a
//! batch cut meanwhile merges into the waiting one when the rules allow, so
//! "the phone's new messages collect into its next batch". Everything here is
//! derivable from disk (open turns and pending messages) and rebuilt on start.
//!
//! Work that failed (the store could not record or commit it) goes back to
//! the front of its conversation's queue and waits out a backoff there: the
//! conversation's later work waits behind it, so per-phone order survives
//! failures by construction.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::Instant;

/// Work that may absorb the next piece of work of the same conversation.
pub trait Merge: Sized {
    /// Absorbs `next` and returns `None`, or gives it back if it cannot.
    fn merge(&mut self, next: Self) -> Option<Self>;

    /// Moves the oldest part of `next` (work that follows this one in its
    /// conversation) into this one, as much as fits; true if `next` is left
    /// empty. Only for work put back in front (`Gate::put_front`).
    fn fill_from(&mut self, _next: &mut Self) -> bool {
        false
    }

    /// Urgent work queues ahead of the conversation's waiting non-urgent work
    /// (but behind earlier urgent work, and never ahead of a running turn).
    fn urgent(&self) -> bool {
        false
    }
}

/// A conversation's failures in a row, and until when it waits (`None`:
/// the backoff is over, the failed work may start).
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Option<Instant>,
    failures: u32,
}

pub struct Gate<K, W> {
    max_concurrent: usize,
    running: HashSet<K>,
    waiting: HashMap<K, VecDeque<W>>,
    /// Conversations with waiting work, no running turn and no backoff, oldest first.
    /// Invariant: `k` is here exactly when `waiting[k]` is non-empty, `k` is
    /// not running and not in `backoff`.
    ready: VecDeque<K>,
    /// Conversations whose work failed, until their next work succeeds.
    backoff: HashMap<K, Backoff>,
}

impl<K: Clone + Eq + Hash, W: Merge> Gate<K, W> {
    pub fn new(max_concurrent: usize) -> Self {
        Gate {
            max_concurrent: max_concurrent.max(1),
            running: HashSet::new(),
            waiting: HashMap::new(),
            ready: VecDeque::new(),
            backoff: HashMap::new(),
        }
    }

    pub fn offer(&mut self, key: K, work: W) {
        let queue = self.waiting.entry(key.clone()).or_default();
        let was_empty = queue.is_empty();
        if work.urgent() {
            let at = queue.iter().take_while(|w| w.urgent()).count();
            queue.insert(at, work);
        } else {
            match queue.back_mut() {
                Some(last) if !last.urgent() => {
                    if let Some(work) = last.merge(work) {
                        queue.push_back(work);
                    }
                }
                _ => queue.push_back(work),
            }
        }
        if was_empty && !self.running.contains(&key) && !self.backing_off(&key) {
            self.ready.push_back(key);
        }
    }

    /// Work that ran and must run again before anything else of its
    /// conversation that is not urgent: it goes in front of the waiting
    /// batches, takes from them what fits (`Merge::fill_from`, so the work
    /// behind moves up in order), and the conversation becomes ready.
    pub fn put_front(&mut self, key: K, work: W) {
        let queue = self.waiting.entry(key.clone()).or_default();
        let was_empty = queue.is_empty();
        let mut at = queue.iter().take_while(|w| w.urgent()).count();
        queue.insert(at, work);
        while at + 1 < queue.len() && !queue[at + 1].urgent() {
            let (head, rest) = queue.make_contiguous().split_at_mut(at + 1);
            if head[at].fill_from(&mut rest[0]) {
                queue.remove(at + 1);
            } else {
                at += 1;
            }
        }
        if was_empty && !self.running.contains(&key) && !self.backing_off(&key) {
            self.ready.push_back(key);
        }
    }

    /// Takes out the waiting work of `key` that `pred` picks, in order.
    pub fn take_waiting(&mut self, key: &K, pred: impl Fn(&W) -> bool) -> Vec<W> {
        let Some(queue) = self.waiting.get_mut(key) else { return Vec::new() };
        let (taken, kept): (Vec<W>, Vec<W>) = queue.drain(..).partition(|w| pred(w));
        queue.extend(kept);
        if queue.is_empty() {
            self.waiting.remove(key);
            self.ready.retain(|k| k != key);
        }
        taken
    }

    /// Whether `key` has waiting work that `pred` picks.
    pub fn has_waiting(&self, key: &K, pred: impl Fn(&W) -> bool) -> bool {
        self.waiting.get(key).is_some_and(|q| q.iter().any(pred))
    }

    /// The next work allowed to start, marking its conversation running.
    pub fn start_next(&mut self) -> Option<(K, W)> {
        if self.running.len() >= self.max_concurrent {
            return None;
        }
        let key = self.ready.pop_front()?;
        let queue = self.waiting.get_mut(&key).expect("ready implies waiting");
        let work = queue.pop_front().expect("ready implies non-empty");
        if queue.is_empty() {
            self.waiting.remove(&key);
        }
        self.running.insert(key.clone());
        Some((key, work))
    }

    /// The running turn of `key` has committed (or was parked, or stopped).
    /// Panics if `key` was not running: the driver's bookkeeping is broken.
    pub fn finished(&mut self, key: &K) {
        assert!(self.running.remove(key), "finished a conversation that was not running");
        self.backoff.remove(key);
        if self.waiting.contains_key(key) {
            self.ready.push_back(key.clone());
        }
    }

    /// The running work of `key` failed: it goes back to the front of the
    /// conversation's queue, and nothing of the conversation starts before
    /// `retry_at`. Returns how many times in a row it has failed.
    pub fn failed(&mut self, key: &K, work: W, retry_at: Instant) -> u32 {
        assert!(self.running.remove(key), "failed a conversation that was not running");
        self.waiting.entry(key.clone()).or_default().push_front(work);
        let b = self.backoff.entry(key.clone()).or_insert(Backoff { until: None, failures: 0 });
        b.until = Some(retry_at);
        b.failures += 1;
        b.failures
    }

    /// How many times in a row the work of `key` has failed so far.
    pub fn failures(&self, key: &K) -> u32 {
        self.backoff.get(key).map_or(0, |b| b.failures)
    }

    fn backing_off(&self, key: &K) -> bool {
        self.backoff.get(key).is_some_and(|b| b.until.is_some())
    }

    /// Conversations whose backoff is over by `now` become ready again.
    pub fn wake(&mut self, now: Instant) {
        for (key, b) in self.backoff.iter_mut() {
            if b.until.is_some_and(|at| at <= now) {
                b.until = None;
                if !self.running.contains(key) && self.waiting.contains_key(key) {
                    self.ready.push_back(key.clone());
                }
            }
        }
    }

    /// The earliest instant a backoff ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.backoff.values().filter_map(|b| b.until).min()
    }

    pub fn is_running(&self, key: &K) -> bool {
        self.running.contains(key)
    }

    pub fn in_flight(&self) -> usize {
        self.running.len()
    }

    pub fn running(&self) -> impl Iterator<Item = &K> {
        self.running.iter()
    }

    pub fn waiting(&self) -> impl Iterator<Item = (&K, &W)> {
        self.waiting.iter().flat_map(|(k, q)| q.iter().map(move |w| (k, w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of message numbers that merges up to 3 messages.
    #[derive(Debug, PartialEq)]
    struct B(Vec<u32>);
    impl Merge for B {
        fn merge(&mut self, next: B) -> Option<B> {
            if self.0.len() + next.0.len() > 3 {
                return Some(next);
            }
            self.0.extend(next.0);
            None
        }
        fn fill_from(&mut self, next: &mut B) -> bool {
            let take = 3usize.saturating_sub(self.0.len()).min(next.0.len());
            self.0.extend(next.0.drain(..take));
            next.0.is_empty()
        }
    }

    #[test]
    fn work_put_back_in_front_takes_from_the_waiting_work_in_order() {
        let mut g = Gate::new(8);
        g.offer("p", B(vec![1]));
        let (_, running) = g.start_next().unwrap();
        g.offer("p", B(vec![2, 3, 4]));
        g.offer("p", B(vec![5]));
        g.finished(&"p");
        // The running batch comes back (a restart): it goes first, and what
        // waited moves up behind it, three at a time.
        let (_, again) = g.start_next().unwrap();
        assert_eq!(again, B(vec![2, 3, 4]));
        g.put_front("p", running);
        g.finished(&"p");
        assert_eq!(g.start_next().unwrap().1, B(vec![1, 5]));
        g.finished(&"p");
        let mut g = Gate::new(8);
        g.offer("p", B(vec![0]));
        let (_, first) = g.start_next().unwrap();
        g.offer("p", B(vec![1, 2, 3]));
        g.offer("p", B(vec![4, 5]));
        g.put_front("p", first);
        g.finished(&"p");
        let order: Vec<B> = std::iter::from_fn(|| {
            let (k, w) = g.start_next()?;
            g.finished(&k);
            Some(w)
        })
        .collect();
        assert_eq!(order, [B(vec![0, 1, 2]), B(vec![3, 4, 5])]);
    }

    #[test]
    fn one_turn_per_conversation_and_the_next_waits_for_the_commit() {
        let mut g = Gate::new(8);
        g.offer("p", B(vec![1]));
        assert_eq!(g.start_next(), Some(("p", B(vec![1]))));
        g.offer("p", B(vec![2]));
        g.offer("p", B(vec![3])); // merges into the waiting batch
        assert_eq!(g.start_next(), None, "p is running");
        g.finished(&"p");
        assert_eq!(g.start_next(), Some(("p", B(vec![2, 3]))));
        assert_eq!(g.start_next(), None);
        g.finished(&"p");
        assert_eq!(g.start_next(), None);
        assert_eq!(g.in_flight(), 0);
    }

    /// Urgent work: `U(n)`, never merging.
    #[derive(Debug, PartialEq)]
    enum W {
        B(Vec<u32>),
        U(u32),
    }
    impl Merge for W {
        fn merge(&mut self, next: W) -> Option<W> {
            match (self, next) {
                (W::B(a), W::B(b)) => {
                    a.extend(b);
                    None
                }
                (_, next) => Some(next),
            }
        }
        fn urgent(&self) -> bool {
            matches!(self, W::U(_))
        }
    }

    #[test]
    fn urgent_work_waits_for_the_running_turn_but_not_for_waiting_batches() {
        let mut g = Gate::new(8);
        g.offer("p", W::B(vec![1]));
        g.start_next(); // turn 1 runs
        g.offer("p", W::B(vec![2]));
        g.offer("p", W::U(1));
        g.offer("p", W::U(2));
        g.offer("p", W::B(vec![3])); // merges with the waiting batch, behind the urgent work
        assert_eq!(g.start_next(), None, "nothing overtakes the running turn");
        g.finished(&"p");
        assert_eq!(g.start_next(), Some(("p", W::U(1))));
        assert_eq!(g.start_next(), None);
        g.finished(&"p");
        assert_eq!(g.start_next(), Some(("p", W::U(2))));
        g.finished(&"p");
        assert_eq!(g.start_next(), Some(("p", W::B(vec![2, 3]))));
    }

    #[test]
    fn failed_work_goes_first_after_its_backoff_and_later_work_waits_behind_it() {
        let t0 = Instant::now();
        let later = |ms| t0 + std::time::Duration::from_millis(ms);
        let mut g = Gate::new(8);
        g.offer("p", B(vec![1, 2, 3]));
        g.offer("q", B(vec![9]));
        let (_, first) = g.start_next().unwrap();
        assert_eq!(first, B(vec![1, 2, 3]));
        g.offer("p", B(vec![4, 5])); // the phone writes on meanwhile
        assert_eq!(g.failed(&"p", first, later(500)), 1);
        assert_eq!(g.next_deadline(), Some(later(500)));
        // Other conversations go on; p waits, its later batch behind the failed one.
        assert_eq!(g.start_next(), Some(("q", B(vec![9]))));
        assert_eq!(g.start_next(), None);
        g.wake(later(499));
        assert_eq!(g.start_next(), None, "still backing off");
        g.wake(later(500));
        assert_eq!(g.next_deadline(), None);
        assert_eq!(g.start_next(), Some(("p", B(vec![1, 2, 3]))));
        // A second failure in a row counts up; success resets the count.
        assert_eq!(g.failed(&"p", B(vec![1, 2, 3]), later(1500)), 2);
        g.wake(later(1500));
        assert_eq!(g.start_next(), Some(("p", B(vec![1, 2, 3]))));
        g.finished(&"p");
        assert_eq!(g.failures(&"p"), 0);
        assert_eq!(g.start_next(), Some(("p", B(vec![4, 5]))));
    }

    #[test]
    fn finishing_a_conversation_that_was_not_running_is_a_bug() {
        let caught = std::panic::catch_unwind(|| {
            let mut g: Gate<&str, B> = Gate::new(1);
            g.finished(&"p");
        });
        let payload = caught.expect_err("finishing an idle conversation must panic");
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(message.contains("not running"), "{message}");
    }

    #[test]
    fn work_that_cannot_merge_queues_in_order() {
        let mut g = Gate::new(8);
        g.offer("p", B(vec![0]));
        g.start_next();
        g.offer("p", B(vec![1, 2]));
        g.offer("p", B(vec![3, 4]));
        g.finished(&"p");
        assert_eq!(g.start_next().unwrap().1, B(vec![1, 2]));
        g.finished(&"p");
        assert_eq!(g.start_next().unwrap().1, B(vec![3, 4]));
    }

    #[test]
    fn max_concurrent_holds_other_conversations_in_fifo_order() {
        let mut g = Gate::new(2);
        for k in ["a", "b", "c", "d"] {
            g.offer(k, B(vec![]));
        }
        assert_eq!(g.start_next().unwrap().0, "a");
        assert_eq!(g.start_next().unwrap().0, "b");
        assert!(g.start_next().is_none());
        g.finished(&"b");
        assert_eq!(g.start_next().unwrap().0, "c");
        g.finished(&"a");
        assert_eq!(g.start_next().unwrap().0, "d");
        assert!(g.is_running(&"c") && g.is_running(&"d"));
    }

    #[test]
    fn a_random_schedule_never_runs_a_conversation_twice() {
        // A small deterministic PRNG drives offers, starts and finishes.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut g = Gate::new(3);
        let mut running: Vec<u64> = Vec::new();
        let (mut offered, mut started) = (0usize, 0usize);
        for _ in 0..10_000 {
            match next() % 3 {
                0 => {
                    g.offer(next() % 5, B(vec![1]));
                    offered += 1;
                }
                1 => {
                    if let Some((k, w)) = g.start_next() {
                        assert!(!running.contains(&k), "{k} started twice");
                        running.push(k);
                        started += w.0.len();
                    }
                }
                _ => {
                    if !running.is_empty() {
                        let k = running.remove((next() % running.len() as u64) as usize);
                        g.finished(&k);
                    }
                }
            }
            assert!(running.len() <= 3);
        }
        for k in running.drain(..) {
            g.finished(&k);
        }
        while let Some((k, w)) = g.start_next() {
            started += w.0.len();
            g.finished(&k);
        }
        assert_eq!(offered, started, "every offered message started exactly once");
    }
}
