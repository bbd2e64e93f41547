//! What the operator console shows that the driver does not hold: the turns
//! running now (attempt, handler kind), the last 100 finished turns with
//! their timings, and a sample of the rates every 5 s over the last 15
//! minutes. Turn tasks write it as they go; the event stream
//! (`http::console`) reads it. It is a view, not state: nothing here is
//! needed to recover, and a restart starts it empty.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::message::{mask_always, Conv};

/// Finished turns kept for the console.
pub const RECENT: usize = 100;
/// One chart point per this…
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// …over this.
pub const SAMPLES: usize = 180;

/// A turn running now.
#[derive(Debug, Clone, Serialize)]
pub struct Running {
    pub turn_id: String,
    pub company_id: String,
    pub phone: String,
    pub masked: String,
    pub started_at_ms: u64,
    /// The attempt in progress (1 on the first call; counts earlier runs of a resumed turn).
    pub attempt: u32,
    pub handler: &'static str,
}

/// A turn that ended: committed, or parked dead.
#[derive(Debug, Clone, Serialize)]
pub struct Finished {
    /// Order of finishing in this process; the event stream's id.
    pub seq: u64,
    pub turn_id: String,
    pub company_id: String,
    pub phone: String,
    pub masked: String,
    /// "committed" or "dead".
    pub outcome: &'static str,
    pub cut_reason: String,
    pub messages: usize,
    pub attempts: u32,
    pub finished_at_ms: u64,
    /// Batch deadline → cut (timer lag); only for a batch its timers cut.
    pub cut_lag_ms: Option<u64>,
    /// Cut → turn start (waiting for the conversation or a free slot).
    pub queue_wait_ms: Option<u64>,
    /// The answering call (the last attempt).
    pub handler_ms: u64,
    /// Commit until durable (zero for a dead turn).
    pub commit_ms: u64,
    /// Turn start → committed or parked.
    pub turn_ms: u64,
    pub reply_chars: Option<usize>,
    pub error: Option<String>,
    /// Texts stay out of the stream; `GET /api/console/turns/{id}` gives them.
    #[serde(skip)]
    pub texts: Vec<String>,
    #[serde(skip)]
    pub reply: Option<String>,
}

/// One chart point: rates over the `SAMPLE_EVERY` before `at_ms`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub webhooks_per_s: f64,
    pub syncs_per_s: f64,
    pub turns: u64,
    pub turn_p50_ms: Option<u64>,
    pub turn_p99_ms: Option<u64>,
}

/// Totals the sampler reads each time; rates are their differences.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub webhooks: u64,
    pub syncs: u64,
}

#[derive(Default)]
struct Inner {
    running: HashMap<String, Running>,
    recent: VecDeque<Finished>,
    next_seq: u64,
    samples: VecDeque<Sample>,
    last_totals: Option<(u64, Totals)>,
    /// Turn times (ms) finished since the last sample.
    since_sample: Vec<u64>,
}

pub struct Feed {
    /// When this process's feed began (unix ms): stream ids carry it, so a
    /// console reconnecting after a restart is not resumed from another
    /// process's numbering.
    pub epoch: u64,
    inner: Mutex<Inner>,
    /// Bumped on every change a console should see at once (a turn started
    /// or finished, a new sample); the event stream waits on it.
    changed: watch::Sender<u64>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed { epoch: crate::message::unix_ms(), inner: Mutex::default(), changed: watch::channel(0).0 }
    }
}

impl Feed {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A turn's handler call starts (each attempt).
    pub fn attempt(
        &self,
        turn_id: &str,
        conv: &Conv,
        started_at_ms: u64,
        attempt: u32,
        handler: &'static str,
    ) {
        let entry = Running {
            turn_id: turn_id.to_owned(),
            company_id: conv.company_id.clone(),
            phone: conv.phone.clone(),
            masked: mask_always(&conv.phone),
            started_at_ms,
            attempt,
            handler,
        };
        self.inner().running.insert(turn_id.to_owned(), entry);
        self.bump();
    }

    /// A turn left its task without finishing (a store failure hands it
    /// back, a shutdown abandons it): no longer running.
    pub fn left(&self, turn_id: &str) {
        if self.inner().running.remove(turn_id).is_some() {
            self.bump();
        }
    }

    /// A turn committed or was parked dead.
    pub fn finished(&self, mut turn: Finished) {
        {
            let mut inner = self.inner();
            inner.running.remove(&turn.turn_id);
            turn.seq = inner.next_seq;
            inner.next_seq += 1;
            if turn.outcome == "committed" {
                inner.since_sample.push(turn.turn_ms);
            }
            inner.recent.push_back(turn);
            while inner.recent.len() > RECENT {
                inner.recent.pop_front();
            }
        }
        self.bump();
    }

    pub fn running(&self) -> Vec<Running> {
        let mut v: Vec<Running> = self.inner().running.values().cloned().collect();
        v.sort_by_key(|r| r.started_at_ms);
        v
    }

    /// Finished turns with a seq above `after` (all kept ones for `None`), oldest first.
    pub fn recent_after(&self, after: Option<u64>) -> Vec<Finished> {
        self.inner().recent.iter().filter(|t| after.is_none_or(|a| t.seq > a)).cloned().collect()
    }

    /// Whether turns after `seq` are all still kept (a resumed stream can
    /// then send just those).
    pub fn can_resume_after(&self, seq: u64) -> bool {
        let inner = self.inner();
        seq < inner.next_seq && inner.recent.front().is_none_or(|t| t.seq <= seq + 1)
    }

    pub fn turn(&self, turn_id: &str) -> Option<Finished> {
        self.inner().recent.iter().rev().find(|t| t.turn_id == turn_id).cloned()
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.inner().samples.iter().cloned().collect()
    }

    /// Takes one chart point from the totals read at `now_ms`; the first
    /// call only sets the baseline.
    pub fn sample(&self, now_ms: u64, totals: Totals) -> Option<Sample> {
        let sample = {
            let mut inner = self.inner();
            let last = inner.last_totals.replace((now_ms, totals));
            let mut times = std::mem::take(&mut inner.since_sample);
            let (at, before) = last?;
            let secs = (now_ms.saturating_sub(at) as f64 / 1000.0).max(0.001);
            times.sort_unstable();
            let sample = Sample {
                at_ms: now_ms,
                webhooks_per_s: totals.webhooks.saturating_sub(before.webhooks) as f64 / secs,
                syncs_per_s: totals.syncs.saturating_sub(before.syncs) as f64 / secs,
                turns: times.len() as u64,
                turn_p50_ms: quantile(&times, 0.5),
                turn_p99_ms: quantile(&times, 0.99),
            };
            inner.samples.push_back(sample.clone());
            while inner.samples.len() > SAMPLES {
                inner.samples.pop_front();
            }
            sample
        };
        self.bump();
        Some(sample)
    }
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Samples every `SAMPLE_EVERY` until `stop`.
pub async fn sampler(
    feed: Arc<Feed>,
    read: impl Fn() -> Totals + Send,
    clock: crate::clock::Clock,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => { feed.sample(clock.now_ms(), read()); }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(id: &str, turn_ms: u64) -> Finished {
        Finished {
            seq: 0,
            turn_id: id.into(),
            company_id: "c".into(),
            phone: "79001234567".into(),
            masked: mask_always("79001234567"),
            outcome: "committed",
            cut_reason: "quiet".into(),
            messages: 2,
            attempts: 1,
            finished_at_ms: 0,
            cut_lag_ms: Some(1),
            queue_wait_ms: Some(0),
            handler_ms: turn_ms,
            commit_ms: 1,
            turn_ms,
            reply_chars: Some(5),
            error: None,
            texts: vec!["hi".into()],
            reply: Some("hello".into()),
        }
    }

    #[test]
    fn a_running_turn_leaves_when_it_finishes_and_recent_keeps_the_last_hundred() {
        let feed = Feed::default();
        let conv = Conv { company_id: "c".into(), phone: "79001234567".into() };
        feed.attempt("t1", &conv, 10, 1, "echo");
        feed.attempt("t1", &conv, 10, 2, "echo");
        let running = feed.running();
        assert_eq!(running.len(), 1, "one entry per turn, not per attempt");
        assert_eq!(running[0].attempt, 2);
        assert_eq!(running[0].masked, "7900*****67");
        feed.finished(finished("t1", 5));
        assert!(feed.running().is_empty());
        for i in 0..150 {
            feed.finished(finished(&format!("u{i}"), 5));
        }
        let recent = feed.recent_after(None);
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent.first().unwrap().turn_id, "u50");
        assert_eq!(recent.last().unwrap().seq, 150);
        // A stream that saw seq 140 resumes with the ten after it; one that
        // saw seq 10 cannot (those turns are gone) and gets a snapshot.
        assert!(feed.can_resume_after(140));
        assert_eq!(feed.recent_after(Some(140)).len(), 10);
        assert!(!feed.can_resume_after(10));
        assert!(!feed.can_resume_after(151), "an id this process never gave");
        assert_eq!(feed.turn("u149").unwrap().texts, vec!["hi"]);
    }

    #[test]
    fn a_sample_is_the_rate_since_the_last_one_and_the_turn_quantiles_in_between() {
        let feed = Feed::default();
        assert_eq!(feed.sample(1_000, Totals { webhooks: 100, syncs: 10 }), None, "baseline only");
        for ms in [10, 20, 30, 40, 1000] {
            feed.finished(finished("t", ms));
        }
        let s = feed.sample(6_000, Totals { webhooks: 600, syncs: 60 }).unwrap();
        assert_eq!(s.webhooks_per_s, 100.0);
        assert_eq!(s.syncs_per_s, 10.0);
        assert_eq!((s.turns, s.turn_p50_ms, s.turn_p99_ms), (5, Some(30), Some(1000)));
        let quiet = feed.sample(11_000, Totals { webhooks: 600, syncs: 60 }).unwrap();
        assert_eq!((quiet.webhooks_per_s, quiet.turns, quiet.turn_p99_ms), (0.0, 0, None));
        for i in 0..(SAMPLES as u64 + 5) {
            feed.sample(20_000 + i * 5_000, Totals::default());
        }
        assert_eq!(feed.samples().len(), SAMPLES, "15 minutes kept, no more");
    }
}
