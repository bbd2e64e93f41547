//! Synthetic traces for `turnstile replay`: how salon clients write on
//! WhatsApp, as distributions one can tune (`turnstile gen-trace --help`
//! lists them with their defaults). The model, per conversation:
//!
//! - it comes through a gateway that reports presence (WAHA, Evolution)
//!   with probability `presence_share`, otherwise none (Meta);
//! - a typist profile: **fast** (gaps between the messages of one request
//!   log-normal around `fast_gap_ms`), **slow** (around `slow_gap_ms`: slow
//!   typists, voice-to-text, people who write a line, think, write the
//!   next) or **one-liner** (each request one complete sentence), with the
//!   shares `slow_share` and `one_liner_share`;
//! - 1 to `max_thoughts` requests ("thoughts"), `thought_gap_ms` apart
//!   (log-normal: reading the reply, thinking, coming back);
//! - a request of a fast or slow typist is 1 message with probability
//!   `single_share`, else 2 to `max_messages`; its last message looks
//!   complete (long, ending in `?` or `.`) with probability
//!   `complete_last_share`, and a message before the last with
//!   `complete_early_share` (a complete greeting, then the request);
//! - with presence: typing starts `think_ms` (log-normal) after the previous
//!   message and lasts until the message is sent (refreshed every 10 s); a
//!   typist stops and goes on mid-message with probability
//!   `hesitate_share` (paused for 1–4 s); after the request's last message
//!   the app reports paused with probability `paused_share`, 0.3–1.5 s
//!   later (otherwise presence is silent).
//!
//! - variations for the corpus family (docs/batching.md, "What it buys, replayed"): a paused after
//!   every message with `paused_after_each`; instead of the gap model, the
//!   next message's typing starting `resume_ms` after the previous message
//!   (or its paused) and lasting `typing_ms`; the profile drawn per request
//!   instead of per conversation with `mix_styles`.
//!
//! These are assumptions, not measurements; the replay's figures hold for
//! traces like these, and a real trace (same format) can replace them.

use super::{Event, Kind};

/// The distributions; every field is a flag of `gen-trace`.
#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// Seed of the random generator (same seed, same trace).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 3000)]
    pub conversations: usize,
    /// Conversations start uniformly over this span.
    #[arg(long, default_value_t = 3_600_000)]
    pub span_ms: u64,
    #[arg(long, default_value_t = 0.5)]
    pub presence_share: f64,
    #[arg(long, default_value_t = 0.25)]
    pub slow_share: f64,
    #[arg(long, default_value_t = 0.2)]
    pub one_liner_share: f64,
    /// Median gap between a fast typist's messages (log-normal, sigma 0.5).
    #[arg(long, default_value_t = 2500)]
    pub fast_gap_ms: u64,
    /// Median gap between a slow typist's messages (log-normal, sigma 0.35).
    #[arg(long, default_value_t = 9000)]
    pub slow_gap_ms: u64,
    #[arg(long, default_value_t = 4)]
    pub max_thoughts: u64,
    /// Median gap between requests (log-normal, sigma 0.6).
    #[arg(long, default_value_t = 45_000)]
    pub thought_gap_ms: u64,
    #[arg(long, default_value_t = 0.3)]
    pub single_share: f64,
    #[arg(long, default_value_t = 5)]
    pub max_messages: u64,
    #[arg(long, default_value_t = 0.7)]
    pub complete_last_share: f64,
    #[arg(long, default_value_t = 0.1)]
    pub complete_early_share: f64,
    /// Median pause before typing the next message (log-normal, sigma 0.6).
    #[arg(long, default_value_t = 700)]
    pub think_ms: u64,
    #[arg(long, default_value_t = 0.1)]
    pub hesitate_share: f64,
    #[arg(long, default_value_t = 0.8)]
    pub paused_share: f64,
    /// With presence: the app reports paused after each message before a
    /// request's last too, with this probability (0.3–1.5 s after it).
    #[arg(long, default_value_t = 0.0)]
    pub paused_after_each: f64,
    /// Instead of the gap model above: the next message's typing starts
    /// this long (uniform, ms: `300-6000`) after the previous message or
    /// its paused, and the message goes `--typing-ms` later.
    #[arg(long)]
    pub resume_ms: Option<Range>,
    /// How long typing a message takes, with `--resume-ms` (uniform, ms).
    #[arg(long, default_value = "1000-6000")]
    pub typing_ms: Range,
    /// Draw the typist profile per request instead of per conversation
    /// (one client: a one-liner, then fragments, then slow lines).
    #[arg(long)]
    pub mix_styles: bool,
}

/// A uniform range of ms, `A-B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub lo: u64,
    pub hi: u64,
}

impl std::str::FromStr for Range {
    type Err = String;
    fn from_str(s: &str) -> Result<Range, String> {
        let l = s.parse::<super::Latency>()?;
        Ok(Range { lo: l.min_ms, hi: l.max_ms })
    }
}

/// splitmix64: small, seedable, good enough for a workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// Log-normal with this median and sigma, in ms.
    fn lognormal(&mut self, median_ms: u64, sigma: f64) -> u64 {
        let (u1, u2) = (self.unit().max(1e-12), self.unit());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (median_ms as f64 * (sigma * z).exp()) as u64
    }
}

const FRAGMENTS: &[&str] =
    &["Привет", "можно", "записаться", "на стрижку", "к Анне", "в субботу", "утром", "или вечером"];
const GREETINGS: &[&str] = &["Здравствуйте, это Мария.", "Добрый день, хочу записаться."];
const REQUESTS: &[&str] = &[
    "Можно записаться на стрижку завтра?",
    "Есть свободное окно в субботу утром?",
    "Сколько стоит окрашивание у Анны?",
    "Перенесите, пожалуйста, мою запись на пятницу.",
];

#[derive(Clone, Copy, PartialEq)]
enum Profile {
    Fast,
    Slow,
    OneLiner,
}

fn draw_profile(rng: &mut Rng, p: &Params) -> Profile {
    let roll = rng.unit();
    if roll < p.one_liner_share {
        Profile::OneLiner
    } else if roll < p.one_liner_share + p.slow_share {
        Profile::Slow
    } else {
        Profile::Fast
    }
}

/// A trace with these parameters, in time order.
pub fn generate(p: &Params) -> Vec<Event> {
    let mut rng = Rng(p.seed);
    let mut out = Vec::new();
    for c in 0..p.conversations {
        let conv = format!("c{c:05}");
        let presence = rng.chance(p.presence_share);
        let mut profile = draw_profile(&mut rng, p);
        let mut t = rng.range(0, p.span_ms);
        let mut emit = |at: u64, kind: Kind, text: &str, thought: Option<u64>| {
            out.push(Event { conv: conv.clone(), at_ms: at, kind, text: text.to_owned(), thought });
        };
        for thought in 0..rng.range(1, p.max_thoughts.max(1)) {
            if p.mix_styles && thought > 0 {
                profile = draw_profile(&mut rng, p);
            }
            let n = if profile == Profile::OneLiner || rng.chance(p.single_share) {
                1
            } else {
                rng.range(2, p.max_messages.max(2))
            };
            // When the previous message's paused came (`--resume-ms` counts from it).
            let mut quiet_from = t;
            for i in 0..n {
                let last = i + 1 == n;
                let text = if profile == Profile::OneLiner || (last && rng.chance(p.complete_last_share)) {
                    REQUESTS[rng.range(0, REQUESTS.len() as u64 - 1) as usize]
                } else if !last && rng.chance(p.complete_early_share) {
                    GREETINGS[rng.range(0, GREETINGS.len() as u64 - 1) as usize]
                } else {
                    FRAGMENTS[rng.range(0, FRAGMENTS.len() as u64 - 1) as usize]
                };
                // When the message goes, and when typing it started (if known yet).
                let (sent, typing_from, gap) = match p.resume_ms {
                    Some(resume) if i > 0 => {
                        let start = quiet_from + rng.range(resume.lo, resume.hi);
                        (start + rng.range(p.typing_ms.lo, p.typing_ms.hi), Some(start), 0)
                    }
                    _ => {
                        // The gap before this message (none before a request's first).
                        let gap = if i == 0 {
                            0
                        } else {
                            match profile {
                                Profile::Slow => rng.lognormal(p.slow_gap_ms, 0.35),
                                _ => rng.lognormal(p.fast_gap_ms, 0.5),
                            }
                        };
                        (t + gap.max(300), None, gap)
                    }
                };
                if presence {
                    // Typing starts after a pause for thought (within the gap)
                    // and is refreshed every 10 s until the message goes.
                    let mut at = typing_from.unwrap_or_else(|| {
                        let think = rng.lognormal(p.think_ms, 0.6).min(gap.saturating_sub(200));
                        if i == 0 {
                            sent.saturating_sub(rng.range(1_000, 6_000))
                        } else {
                            t + think
                        }
                    });
                    while at < sent {
                        emit(at, Kind::Typing, "", None);
                        if rng.chance(p.hesitate_share) && at + 5_000 < sent {
                            emit(at + 1_000, Kind::Paused, "", None);
                            at += rng.range(2_000, 5_000);
                            continue;
                        }
                        at += 10_000;
                    }
                }
                emit(sent, Kind::Message, text, Some(thought));
                t = sent;
                quiet_from = t;
                if presence && !last && p.paused_after_each > 0.0 && rng.chance(p.paused_after_each) {
                    quiet_from = t + rng.range(300, 1_500);
                    emit(quiet_from, Kind::Paused, "", None);
                }
            }
            if presence && rng.chance(p.paused_share) {
                emit(t + rng.range(300, 1_500), Kind::Paused, "", None);
            }
            t += rng.lognormal(p.thought_gap_ms, 0.6).max(5_000);
        }
    }
    out.sort_by_key(|e| e.at_ms);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        p: Params,
    }

    #[test]
    fn the_same_seed_gives_the_same_trace_and_every_message_has_a_thought() {
        let p = Cli::parse_from(["x", "--conversations", "200"]).p;
        let (a, b) = (generate(&p), generate(&p));
        assert_eq!(a, b);
        assert!(a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        let messages = a.iter().filter(|e| e.kind == Kind::Message).count();
        assert!(messages > 200, "{messages}");
        assert!(a.iter().filter(|e| e.kind == Kind::Message).all(|e| e.thought.is_some()));
        assert!(a.iter().any(|e| e.kind == Kind::Typing) && a.iter().any(|e| e.kind == Kind::Paused));
        let other = generate(&Cli::parse_from(["x", "--conversations", "200", "--seed", "2"]).p);
        assert_ne!(a, other);
    }
}
