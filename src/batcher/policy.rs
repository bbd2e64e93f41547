//! When a pending batch is due, and why: the fixed quiet window, or the
//! adaptive policy that listens to what the gateway and the clients' own
//! pauses say. Pure functions of the batch's signals and the learned
//! windows (`learn.rs`); no clock, no IO.
//!
//! Adaptive, in order of precedence (always capped at first message +
//! `max_wait`):
//! - the client **is typing** (or recording) since the last message, with
//!   no `paused` after it: wait — until `typing_ttl` after the last typing
//!   event, when an unrefreshed indicator counts as gone;
//! - the gateway reports presence for this conversation and nobody is
//!   typing: `paused` means "not typing now", nothing more — WhatsApp sends
//!   it whenever typing stops, between the fragments of one request too. The
//!   batch is cut once the client has been **silent** (no typing, no
//!   message, since the last message or the last `paused`) for longer than
//!   this conversation — or, before it has shown one, the population —
//!   takes to start typing again within one request, at a high quantile
//!   (`resume` window, at least `paused_grace`);
//! - no presence (Meta sends none): the quiet window after the last message
//!   is the same high quantile of the gaps between the messages of one
//!   request (`gap` window); a last message that **looks complete**
//!   (`message::Shape::complete`: at least `complete_min_chars` and ending
//!   in sentence punctuation, in any script) keeps `complete_pct` % of it,
//!   never below `floor`.
//!
//! Both windows are kept within `min_quiet`..`max_quiet`.

use std::time::{Duration, Instant};

use super::CutReason;

/// The adaptive policy's knobs (`[batching.adaptive]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptive {
    pub min_quiet: Duration,
    pub max_quiet: Duration,
    /// The gap between two messages of one request assumed before any is seen.
    pub prior_gap: Duration,
    /// The silence before typing resumes within one request, assumed before any is seen.
    pub prior_resume: Duration,
    /// Which quantile of the learned pauses a window covers (percent).
    pub quantile_pct: u32,
    /// A window is this many hundredths of that quantile.
    pub gap_factor_pct: u32,
    /// A complete-looking last message keeps this share of the window.
    pub complete_pct: u32,
    pub complete_min_chars: usize,
    /// Never cut sooner than this after the last message.
    pub floor: Duration,
    /// With presence, never cut sooner than this after the silence began.
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
    /// A typing (or recording) indicator since the last message and since
    /// the last `paused`, at.
    pub typing: Option<Instant>,
    /// A stopped-typing indicator after typing since the last message, at.
    pub paused: Option<Instant>,
    /// The conversation's gateway reports presence (it has sent some).
    pub presence: bool,
}

impl Signals {
    /// Since when the client has shown nothing: the last message, or the
    /// `paused` after it.
    pub fn quiet_since(&self) -> Instant {
        self.paused.map_or(self.last_at, |p| p.max(self.last_at))
    }
}

/// The learned windows for one conversation (already its quantile of its
/// own pauses mixed with the population's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Between two messages of one request.
    pub gap: Duration,
    /// From a message or `paused` until typing starts again.
    pub resume: Duration,
}

impl Adaptive {
    /// A learned quantile, with the margin, within the bounds.
    pub fn window(&self, quantile: Duration) -> Duration {
        (quantile * self.gap_factor_pct / 100).clamp(self.min_quiet, self.max_quiet)
    }

    /// The windows before anything is learned.
    pub fn prior(&self) -> Windows {
        Windows { gap: self.window(self.prior_gap), resume: self.window(self.prior_resume) }
    }
}

/// `debounce` and `max_wait` from the rules; the rest from the policy.
pub fn deadline(
    policy: &Policy,
    debounce: Duration,
    max_wait: Duration,
    s: &Signals,
    windows: Windows,
) -> (Instant, CutReason) {
    let cap = s.first_at + max_wait;
    let (at, reason) = match policy {
        Policy::Fixed => (s.last_at + debounce, CutReason::Quiet),
        Policy::Adaptive(a) => {
            if let Some(typing) = s.typing {
                (typing + a.typing_ttl, CutReason::TypingStale)
            } else if s.presence {
                let silent = windows.resume.max(a.paused_grace);
                ((s.quiet_since() + silent).max(s.last_at + a.floor), CutReason::Paused)
            } else if s.complete {
                let shorter = (windows.gap * a.complete_pct / 100).max(a.floor);
                (s.last_at + shorter, CutReason::Complete)
            } else {
                (s.last_at + windows.gap, CutReason::Rhythm)
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
            prior_resume: 6 * S,
            quantile_pct: 90,
            gap_factor_pct: 100,
            complete_pct: 50,
            complete_min_chars: 12,
            floor: S,
            paused_grace: 2 * S,
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

    const W: Windows = Windows { gap: Duration::from_secs(8), resume: Duration::from_secs(6) };

    #[test]
    fn fixed_is_last_message_plus_debounce_capped_by_max_wait() {
        let t0 = Instant::now();
        let s = signals(t0);
        assert_eq!(deadline(&Policy::Fixed, 10 * S, 60 * S, &s, W), (t0 + 14 * S, CutReason::Quiet));
        assert_eq!(deadline(&Policy::Fixed, 10 * S, 12 * S, &s, W), (t0 + 12 * S, CutReason::MaxWait));
        // Presence and completeness change nothing under the fixed rule.
        let loud = Signals { complete: true, paused: Some(t0 + 5 * S), presence: true, ..s };
        assert_eq!(deadline(&Policy::Fixed, 10 * S, 60 * S, &loud, W), (t0 + 14 * S, CutReason::Quiet));
    }

    #[test]
    fn typing_holds_and_a_paused_starts_the_silence_not_the_cut() {
        let (t0, p) = (Instant::now(), Policy::Adaptive(adaptive()));
        let typing = Signals { typing: Some(t0 + 5 * S), presence: true, ..signals(t0) };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &typing, W), (t0 + 20 * S, CutReason::TypingStale));
        assert_eq!(deadline(&p, 10 * S, 18 * S, &typing, W), (t0 + 18 * S, CutReason::MaxWait));
        // Paused at 6 s: silent since then, cut once the resume window (6 s) passed.
        let paused = Signals { paused: Some(t0 + 6 * S), presence: true, ..signals(t0) };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &paused, W), (t0 + 12 * S, CutReason::Paused));
        // Nobody typed after the message: silent since the message.
        let idle = Signals { presence: true, ..signals(t0) };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &idle, W), (t0 + 10 * S, CutReason::Paused));
        // A conversation that resumes fast still waits out the grace.
        let fast = Windows { resume: Duration::from_millis(500), ..W };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &idle, fast).0, t0 + 6 * S);
    }

    #[test]
    fn without_presence_the_window_is_the_learned_gap_and_completeness_shortens_it() {
        let a = adaptive();
        assert_eq!(a.prior(), Windows { gap: 3 * S, resume: 6 * S });
        assert_eq!(a.window(30 * S), 20 * S, "never past max_quiet");
        assert_eq!(a.window(Duration::from_millis(300)), 2 * S, "never under min_quiet");
        let (t0, p) = (Instant::now(), Policy::Adaptive(a));
        assert_eq!(deadline(&p, 10 * S, 60 * S, &signals(t0), W), (t0 + 12 * S, CutReason::Rhythm));
        let done = Signals { complete: true, ..signals(t0) };
        assert_eq!(deadline(&p, 10 * S, 60 * S, &done, W), (t0 + 8 * S, CutReason::Complete));
        let short = Windows { gap: 2 * S, ..W };
        assert_eq!(
            deadline(&p, 10 * S, 60 * S, &done, short).0,
            t0 + 5 * S,
            "half of 2 s, but the 1 s floor"
        );
    }
}
