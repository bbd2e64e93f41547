//! The turn gate, without IO: at most one turn per conversation in flight,
//! at most `max_concurrent` in all, conversations served in the order their
//! work became ready.
//!
//! Work that arrives for a conversation whose turn is running waits here; a
//! batch cut meanwhile merges into the waiting one when the rules allow, so
//! "the phone's new messages collect into its next batch". Everything here is
//! derivable from disk (open turns and inbox) and rebuilt on start.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

/// Work that may absorb the next piece of work of the same conversation.
pub trait Merge: Sized {
    /// Absorbs `next` and returns `None`, or gives it back if it cannot.
    fn merge(&mut self, next: Self) -> Option<Self>;

    /// Urgent work queues ahead of the conversation's waiting non-urgent work
    /// (but behind earlier urgent work, and never ahead of a running turn).
    fn urgent(&self) -> bool {
        false
    }
}

pub struct Gate<K, W> {
    max_concurrent: usize,
    running: HashSet<K>,
    waiting: HashMap<K, VecDeque<W>>,
    /// Conversations with waiting work and no running turn, oldest first.
    /// Invariant: `k` is here exactly when `waiting[k]` is non-empty and `k` is not running.
    ready: VecDeque<K>,
}

impl<K: Clone + Eq + Hash, W: Merge> Gate<K, W> {
    pub fn new(max_concurrent: usize) -> Self {
        Gate {
            max_concurrent: max_concurrent.max(1),
            running: HashSet::new(),
            waiting: HashMap::new(),
            ready: VecDeque::new(),
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
        if was_empty && !self.running.contains(&key) {
            self.ready.push_back(key);
        }
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
    pub fn finished(&mut self, key: &K) {
        if self.running.remove(key) && self.waiting.contains_key(key) {
            self.ready.push_back(key.clone());
        }
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
