//! When a pending batch is due, and why: the fixed quiet window, or the
//! adaptive policy that listens to what the gateway and the client's own
//! rhythm say. Pure functions of the batch's signals; no clock, no IO.
//!
//! Adaptive, in order of precedence (always capped at first message +
//! `max_wait`):
//! - the client **stopped typing** (`paused` after the last message): cut
//!   `paused_grace` later, but never sooner than `floor` after the last
//!   message;
//! - the client **is typing** (or recording): wait — until `typing_ttl`
//!   after the last typing event, when an unrefreshed indicator counts as
//!   gone;
//! - the gateway reports presence for this conversation and nobody has
//!   typed since the last message: cut `paused_grace` after it;
//! - no presence (Meta sends none): the quiet window is the conversation's
//!   own **rhythm** — `gap_factor` × its mean gap between messages of one
//!   burst, learned as it writes (`prior_gap` before it has shown any), kept
//!   within `min_quiet`..`max_quiet`; a last message that **looks complete**
//!   (`message::Shape::complete`: at least `complete_min_chars` and ending
//!   in sentence punctuation, in any script) shortens it by `complete_pct` %, never below `floor`.

use std::time::{Duration, Instant};

use super::CutReason;

/// The adaptive policy's knobs (`[batching.adaptive]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptive {
    pub min_quiet: Duration,
    pub max_quiet: Duration,
    pub prior_gap: Duration,
    /// The quiet window is this many hundredths of the mean gap.
    pub gap_factor_pct: u32,
    /// A complete-looking last message keeps this share of the window.
    pub complete_pct: u32,
    pub complete_min_chars: usize,
    /// Never cut sooner than this after the last message.
    pub floor: Duration,
    pub paused_grace: Duration,
    pub typing_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Last message + `debounce`: today's rule, exactly.
    Fixed,
    Adaptive(Adaptive),
}

/// What a pending batch knows besides its messages' numbers.
#[derive(Debug, Clone, Copy)]
pub struct Signals {
    pub first_at: Instant,
    pub last_at: Instant,
    /// The last message looks like a complete request.
    pub complete: bool,
    /// A typing (or recording) indicator since the last message, at.
    pub typing: Option<Instant>,
    /// A stopped-typing indicator since the last message, at.
    pub paused: Option<Instant>,
    /// The conversation's gateway reports presence (it has sent some).
    pub presence: bool,
}

/// A conversation's writing rhythm, learned from its gaps between messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rhythm {
    /// Exponentially weighted mean gap within a burst, in ms.
    pub mean_gap_ms: f64,
    pub samples: u32,
}

/// Weight of the newest gap in the mean.
const LEARN: f64 = 0.3;

impl Rhythm {
    pub fn learn(&mut self, gap: Duration) {
        let gap = gap.as_secs_f64() * 1000.0;
        self.mean_gap_ms =
            if self.samples == 0 { gap } else { (1.0 - LEARN) * self.mean_gap_ms + LEARN * gap };
        self.samples = self.samples.saturating_add(1);
    }
}

impl Adaptive {
    /// The quiet window for a conversation with this rhythm (none yet: the prior).
    pub fn quiet(&self, rhythm: Option<&Rhythm>) -> Duration {
        let gap_ms = match rhythm {
            Some(r) if r.samples > 0 => r.mean_gap_ms,
            _ => self.prior_gap.as_secs_f64() * 1000.0,
        };
        let quiet = Duration::from_secs_f64(gap_ms * self.gap_factor_pct as f64 / 100_000.0);
        quiet.clamp(self.min_quiet, self.max_quiet)
    }

    /// Whether a gap this long after a cut means the client had not finished:
    /// it came back before another window had passed.
    pub fn is_continuation(&self, since_last: Duration, since_cut: Duration, window: Duration) -> bool {
        since_last <= self.max_quiet && since_cut <= window
    }
}

/// `debounce` and `max_wait` from the rules; the rest from the policy.
pub fn deadline(
    policy: &Policy,
    debounce: Duration,
    max_wait: Duration,
    s: &Signals,
    rhythm: Option<&Rhythm>,
) -> (Instant, CutReason) {
    let cap = s.first_at + max_wait;
    let (at, reason) = match policy {
        Policy::Fixed => (s.last_at + debounce, CutReason::Quiet),
        Policy::Adaptive(a) => {
            if let Some(paused) = s.paused {
                ((paused + a.paused_grace).max(s.last_at + a.floor), CutReason::Paused)
            } else if let Some(typing) = s.typing {
                (typing + a.typing_ttl, CutReason::TypingStale)
            } else if s.presence {
                // Presence is reported, and nobody has typed since the message.
                (s.last_at + a.paused_grace.max(a.floor), CutReason::Paused)
            } else {
                let quiet = a.quiet(rhythm);
                if s.complete {
                    let shorter = (quiet * a.complete_pct / 100).max(a.floor);
                    (s.last_at + shorter, CutReason::Complete)
                } else {
                    (s.last_at + quiet, CutReason::Rhythm)
                }
            }
        }
    };
    if cap <= at {
        (cap, CutReason::MaxWait)
    } else {
        (at, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn adaptive() -> Adaptive {
        Adaptive {
            min_quiet: 2 * S,
            max_quiet: 20 * S,
            prior_gap: 3 * S,
            gap_factor_pct: 200,
            complete_pct: 50,
            complete_min_chars: 12,
            floor: S,
            paused_grace: S,
            typing_ttl: 15 * S,
        }
    }

    fn signals(t0: Instant) -> Signals {
        Signals {
            first_at: t0,
            last_at: t0 + 4 * S,
            complete: false,
            typing: None,
            paused: None,
            presence: false,
        }
    }

    #[test]
    fn fixed_is_last_message_plus_debounce_capped_by_max_wait() {
        let t0 = Instant::now();
        let s = signals(t0);
        assert_eq!(deadline(&Policy::Fixed, 10 * S, 60 * S, &s, None), (t0 + 14 * S, CutReason::Quiet));
        assert_eq!(deadline(&Policy::Fixed, 10 * S, 12 * S, &s, None), (t0 + 12 * S, CutReason::MaxWait));
        // Presence and completeness change nothing under the fixed rule.
        let loud = Signals { complete: true, paused: Some(t0 + 5 * S), ..s };
        assert_eq!(deadline(&Policy::Fixed, 10 * S, 60 * S, &loud, None), (t0 + 14 * S, CutReason::Quiet));
    }

    #[test]
    fn presence_decides_first_typing_holds_and_paused_releases_after_the_grace() {
        let (t0, p) = (Instant::now(), Policy::Adaptive(adaptive()));
        let typing = Signals { typing: Some(t0 + 5 * S), ..signals(t0) };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &typing, None), (t0 + 20 * S, CutReason::TypingStale));
        assert_eq!(deadline(&p, 10 * S, 18 * S, &typing, None), (t0 + 18 * S, CutReason::MaxWait));
        let paused = Signals { paused: Some(t0 + 6 * S), ..signals(t0) };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &paused, None), (t0 + 7 * S, CutReason::Paused));
        // A paused that comes with the message still leaves the floor.
        let at_once = Signals { paused: Some(t0 + 4 * S), ..signals(t0) };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &at_once, None).0, t0 + 5 * S);
        // A conversation that reports presence and shows no typing after its
        // message is done after the grace, whatever its rhythm.
        let idle = Signals { presence: true, ..signals(t0) };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &idle, None), (t0 + 5 * S, CutReason::Paused));
    }

    #[test]
    fn without_presence_the_window_follows_the_rhythm_within_its_bounds() {
        let a = adaptive();
        assert_eq!(a.quiet(None), 6 * S, "the prior: 2 x 3 s");
        let mut r = Rhythm { mean_gap_ms: 0.0, samples: 0 };
        r.learn(8 * S);
        assert_eq!(a.quiet(Some(&r)), 16 * S, "a slow typist gets a longer window");
        r.learn(30 * S);
        assert_eq!(a.quiet(Some(&r)), 20 * S, "never past max_quiet");
        let mut fast = Rhythm { mean_gap_ms: 0.0, samples: 0 };
        for _ in 0..10 {
            fast.learn(Duration::from_millis(500));
        }
        assert_eq!(a.quiet(Some(&fast)), 2 * S, "never under min_quiet");
        let (t0, p) = (Instant::now(), Policy::Adaptive(a));
        assert_eq!(deadline(&p, 10 * S, 60 * S, &signals(t0), Some(&r)).1, CutReason::Rhythm);
        let done = Signals { complete: true, ..signals(t0) };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &done, None), (t0 + 7 * S, CutReason::Complete));
        assert_eq!(
            deadline(&p, 10 * S, 60 * S, &done, Some(&fast)).0,
            t0 + 5 * S,
            "half of 2 s, but the 1 s floor"
        );
    }
}
