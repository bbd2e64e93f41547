//! What the adaptive policy learns: how the clients' silences end. Two
//! kinds — after a message, until the next message (what a conversation
//! without presence shows); after a message or a `paused`, until typing
//! starts again (what presence shows). Each silence either ends within the
//! request (the client went on: a pause of some length) or **never** (the
//! turn was answered first, or it lasted past the horizon). Learned for the
//! population of conversations (`Spread`, a decayed histogram) and per
//! conversation (`Recent`, its last few silences).
//!
//! A window is the least time after which no more than `1 - q` of the
//! silences still went on — so a cut at it splits at most that share of
//! them — over the conversation's own silences mixed with the population's,
//! the population weighing as `PRIOR_WEIGHT` of them: before a conversation
//! has shown one its window is the population's, and the more it shows, the
//! more its own. Pure data; no clock, no IO.

use std::time::Duration;

/// Buckets of a `Spread`: bucket `i` holds pauses up to `edge(i)`, growing
/// by 20 % from 200 ms; the last one takes everything longer (~56 s up).
/// One more, `NEVER`, counts the silences that did not end in more.
pub const BUCKETS: usize = 32;
const NEVER: usize = BUCKETS;

/// The population counts as this many samples in a conversation's mix.
const PRIOR_WEIGHT: f32 = 3.0;

/// The population's histogram forgets: each sample weighs this much less
/// than the next (a half-life of ~350 samples).
const FORGET: f32 = 1.0 / 512.0;

/// The prior, before the population has shown anything, counts as this
/// many samples (it fades as real ones come).
const PRIOR_SAMPLES: f32 = 20.0;

/// A conversation keeps this many of its latest pauses of each kind.
pub const RECENT: usize = 8;

fn edge(i: usize) -> Duration {
    Duration::from_secs_f64(0.2 * 1.2f64.powi(i as i32))
}

fn bucket(d: Duration) -> usize {
    (0..BUCKETS).find(|i| d <= edge(*i)).unwrap_or(BUCKETS - 1)
}

/// How a silence ended: the client went on after this long, or never.
pub type Ended = Option<Duration>;

fn slot(ended: Ended) -> usize {
    ended.map_or(NEVER, bucket)
}

/// The population's silences of one kind: a histogram that forgets slowly.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    counts: [f32; BUCKETS + 1],
}

impl Spread {
    /// A spread that knows only a `prior` pause, each silence ending in it.
    pub fn new(prior: Duration) -> Spread {
        let mut counts = [0.0; BUCKETS + 1];
        counts[bucket(prior)] = PRIOR_SAMPLES;
        Spread { counts }
    }

    /// A spread saved earlier; `None` if it is not one.
    pub fn from_counts(counts: &[f32]) -> Option<Spread> {
        let counts: [f32; BUCKETS + 1] = counts.try_into().ok()?;
        let sane = counts.iter().all(|c| c.is_finite() && *c >= 0.0) && counts.iter().sum::<f32>() > 0.0;
        sane.then_some(Spread { counts })
    }

    pub fn counts(&self) -> &[f32; BUCKETS + 1] {
        &self.counts
    }

    pub fn learn(&mut self, ended: Ended) {
        for c in self.counts.iter_mut() {
            *c *= 1.0 - FORGET;
        }
        self.counts[slot(ended)] += 1.0;
    }

    /// The least bucket edge after which at most `1 - q` of the silences
    /// (this spread, weighing `PRIOR_WEIGHT`, mixed with `own`) went on.
    pub fn window(&self, own: &Recent, q: f32) -> Duration {
        let total: f32 = self.counts.iter().sum();
        let mut mix = [0.0f32; BUCKETS + 1];
        for (m, c) in mix.iter_mut().zip(self.counts.iter()) {
            *m = PRIOR_WEIGHT * c / total;
        }
        for ended in own.iter() {
            mix[slot(ended)] += 1.0;
        }
        let want = q * mix.iter().sum::<f32>();
        // Silences that never went on are covered by any window.
        let mut covered = mix[NEVER];
        for (i, m) in mix[..BUCKETS].iter().enumerate() {
            covered += m;
            if covered >= want {
                return edge(i);
            }
        }
        edge(BUCKETS - 1)
    }
}

/// A conversation's latest silences of one kind, in 10 ms units
/// (`u16::MAX`: it never went on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recent {
    cs: [u16; RECENT],
    len: u8,
    next: u8,
}

impl Recent {
    pub fn learn(&mut self, ended: Ended) {
        let cs = ended.map_or(u16::MAX, |pause| (pause.as_millis() / 10).min(u16::MAX as u128 - 1) as u16);
        self.cs[self.next as usize] = cs;
        self.next = (self.next + 1) % RECENT as u8;
        self.len = (self.len + 1).min(RECENT as u8);
    }

    pub fn iter(&self) -> impl Iterator<Item = Ended> + '_ {
        self.cs[..self.len as usize]
            .iter()
            .map(|cs| (*cs != u16::MAX).then(|| Duration::from_millis(*cs as u64 * 10)))
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The silences in ms, oldest first (for saving; `u32::MAX`: never).
    pub fn to_ms(&self) -> Vec<u32> {
        let start = if (self.len as usize) < RECENT { 0 } else { self.next as usize };
        (0..self.len as usize)
            .map(|i| match self.cs[(start + i) % RECENT] {
                u16::MAX => u32::MAX,
                cs => cs as u32 * 10,
            })
            .collect()
    }

    pub fn from_ms(ms: &[u32]) -> Recent {
        let mut r = Recent::default();
        for m in ms.iter().rev().take(RECENT).rev() {
            r.learn((*m != u32::MAX).then(|| Duration::from_millis(*m as u64)));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_prior_rules_until_silences_are_seen_and_fades_as_they_come() {
        let mut s = Spread::new(6 * S);
        let none = Recent::default();
        let w = s.window(&none, 0.9);
        assert!(w >= 6 * S && w < 7 * S, "{w:?}: the bucket holding the prior");
        for _ in 0..2_000 {
            s.learn(Some(S));
        }
        let w = s.window(&none, 0.9);
        assert!(w >= S && w < S * 6 / 5, "{w:?}: the population's own pauses now");
    }

    #[test]
    fn silences_that_never_went_on_need_no_window() {
        let mut s = Spread::new(6 * S);
        // Nine of ten silences end the request; one goes on after 8 s.
        for i in 0..2_000 {
            s.learn(if i % 10 == 0 { Some(8 * S) } else { None });
        }
        let none = Recent::default();
        assert!(s.window(&none, 0.8) < S, "80 %: the silences that never went on already");
        let w = s.window(&none, 0.95);
        assert!(w >= 8 * S && w < 10 * S, "{w:?}: 95 % needs the 8 s ones");
    }

    #[test]
    fn a_conversation_that_pauses_longer_than_the_population_gets_its_own_window() {
        let mut s = Spread::new(S);
        for _ in 0..1_000 {
            s.learn(Some(2 * S));
        }
        let mut slow = Recent::default();
        assert!(s.window(&slow, 0.9) < 3 * S);
        for _ in 0..3 {
            slow.learn(Some(9 * S));
        }
        let w = s.window(&slow, 0.9);
        assert!(w >= 9 * S && w < 11 * S, "{w:?}");
        // One long pause among short ones moves the window less.
        let mut fast = Recent::default();
        fast.learn(Some(9 * S));
        assert!(s.window(&fast, 0.5) < 3 * S);
    }

    #[test]
    fn recent_keeps_the_latest_silences_and_round_trips() {
        let mut r = Recent::default();
        for i in 1..=10u64 {
            r.learn(Some(Duration::from_millis(i * 1000)));
        }
        r.learn(None);
        let mut want: Vec<u32> = (4..=10).map(|i| i * 1000).collect();
        want.push(u32::MAX);
        assert_eq!(r.to_ms(), want);
        assert_eq!(Recent::from_ms(&r.to_ms()).to_ms(), r.to_ms());
        assert!(Spread::from_counts(&[1.0; 3]).is_none(), "a spread of the wrong size is not one");
        assert!(Spread::from_counts(&[f32::NAN; BUCKETS + 1]).is_none());
    }
}
