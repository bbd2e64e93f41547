//! The one task that owns the batcher and the gate. It sleeps until the
//! batcher's next deadline or the next event, cuts what is due, and starts
//! whatever the gate allows. There is no polling loop: with nothing pending
//! it waits on its channel alone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::batcher::{Cut, Learned, LearnedConv, Policy};
use crate::config::Config;
use crate::message::{unix_ms, Conv};
use crate::metrics::Metrics;
use crate::store::{Announce, Recovered, Store, TurnRecord};

use super::schedule::{Ended, Schedule};
use super::{
    DriverReceiver, Event, Outcome, RetryOutcome, Runner, Shared, Snapshot, View, Work, WAITING_SHOWN,
};

/// The adaptive policy's learned rhythms are saved this often (and at the stop).
const RHYTHMS_EVERY: Duration = Duration::from_secs(60);

pub struct Driver {
    schedule: Schedule,
    store: Store,
    runner: Arc<Runner>,
    rx: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::UnboundedSender<Event>,
    tracker: TaskTracker,
    /// Where turns run: the runtime that built the driver, even when the
    /// driver itself runs on a thread of its own (see `server`).
    turns_on: tokio::runtime::Handle,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    /// Dead turns being marked open again, so two retries cannot queue one twice.
    reopening: HashSet<String>,
    /// Per running turn: cancelled when the schedule restarts it (its task
    /// ignores it once the handler has answered).
    restarts: HashMap<Conv, CancellationToken>,
}

impl Driver {
    /// Builds the driver with everything recovered from disk already queued:
    /// open turns first (per conversation they are older than any pending
    /// message), then pending messages at their original receive times, so a
    /// batch whose deadline passed while the daemon was down is cut at once.
    pub fn new(
        config: &Config,
        store: Store,
        runner: Arc<Runner>,
        recovery: Recovered,
        receiver: DriverReceiver,
        tracker: TaskTracker,
        shared: &Shared,
    ) -> Driver {
        let DriverReceiver { rx, tx } = receiver;
        let rules = config.batching.rules();
        let restart = config.turns.on_new_message == crate::config::OnNewMessage::Restart;
        let mut driver = Driver {
            schedule: Schedule::new(rules, config.turns.max_concurrent, restart),
            store,
            runner,
            rx,
            tx,
            tracker,
            turns_on: tokio::runtime::Handle::current(),
            shutdown: shared.stopping.shutdown.clone(),
            metrics: shared.metrics.clone(),
            reopening: HashSet::new(),
            restarts: HashMap::new(),
        };
        // What the adaptive policy learned before the restart (a day's worth).
        if matches!(driver.schedule.batcher().rules().policy, Policy::Adaptive(_)) {
            let (now, now_ms) = (now(), unix_ms());
            let saved = driver.store.rhythms();
            let convs = saved
                .convs
                .into_iter()
                .filter_map(|r| {
                    let age = Duration::from_millis(now_ms.saturating_sub(r.last_ms));
                    (age < Duration::from_secs(24 * 3600)).then(|| LearnedConv {
                        key: r.conv,
                        gaps: r.gaps,
                        resumes: r.resumes,
                        last_msg: now.checked_sub(age).unwrap_or(now),
                    })
                })
                .collect();
            driver.schedule.batcher_mut().seed(Learned { gaps: saved.gaps, resumes: saved.resumes, convs });
        }
        // Conversations staff took over stay so, with the same resume times.
        for (conv, paused) in driver.store.paused() {
            driver.schedule.pause(conv, paused.resume_at_ms.map(instant_of));
        }
        for turn in recovery.open_turns {
            driver.schedule.queue(turn.conv.clone(), Work::Resume(Box::new(turn)));
        }
        let (now, now_ms) = (now(), unix_ms());
        for m in recovery.pending {
            let age = Duration::from_millis(now_ms.saturating_sub(m.received_at_ms));
            let at = now.checked_sub(age).unwrap_or(now);
            let complete = driver.complete(&crate::message::Shape::of(&m.text));
            driver.schedule.recovered(m.conv, m.seq, at, complete);
        }
        driver.schedule.recovered_all();
        driver.note_cuts();
        driver
    }

    pub async fn run(mut self) {
        let mut save = tokio::time::interval(RHYTHMS_EVERY);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.schedule.tick(now());
            self.note_cuts();
            self.record_resumed();
            self.start_ready();
            let deadline = self.schedule.next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                event = self.rx.recv() => match event {
                    Some(event) => self.on_event(event),
                    None => break,
                },
                _ = sleep => {}
                _ = save.tick() => self.save_rhythms().await,
            }
        }
        self.save_rhythms().await;
        let (batches, messages) = self.schedule.batcher().len();
        info!(
            in_flight = self.schedule.gate().in_flight(),
            batches, messages, "driver stopped; pending batches stay on disk"
        );
    }

    fn on_event(&mut self, event: Event) {
        if self.store.faults().driver_killed() {
            panic!("the driver was killed by a test's fault hook");
        }
        match event {
            Event::Ingested(stored) => {
                let now = now();
                for Announce { conv, seq, urgency, shape } in stored {
                    let complete = self.complete(&shape);
                    if let Some(conv) = self.schedule.message(conv, seq, now, complete, urgency) {
                        self.restart(&conv, "a message came while the turn runs");
                    }
                }
            }
            Event::Finished { conv, outcome } => self.finished(conv, outcome),
            Event::Retry { turn_id, reply } => self.retry(turn_id, reply),
            Event::Reopened { turn_id, result, reply } => {
                self.reopening.remove(&turn_id);
                match result {
                    Ok(turn) => {
                        info!(turn_id = %turn.turn_id, conv = %turn.conv.masked(), "dead turn queued for retry");
                        self.schedule.queue(turn.conv.clone(), Work::Resume(turn));
                        let _ = reply.send(RetryOutcome::Queued);
                    }
                    Err(outcome) => {
                        let _ = reply.send(outcome);
                    }
                }
            }
            Event::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Event::View { offset, limit, reply } => {
                let _ = reply.send(self.view(offset, limit));
            }
            Event::Context { conv, job } => self.schedule.queue(conv, Work::Context(job)),
            Event::Presence { conv, presence } => {
                if let Some(conv) = self.schedule.presence(&conv, presence, now()) {
                    self.restart(&conv, "the client is typing again while the turn runs");
                }
            }
            Event::Takeover { conv, resume_at_ms } => {
                info!(conv = %conv.masked(), resume_in_s = resume_at_ms.map(|at| at.saturating_sub(unix_ms()) / 1000), "staff took the conversation over: no turn starts until it resumes");
                self.schedule.pause(conv, resume_at_ms.map(instant_of));
            }
            Event::Resume { conv } => {
                if self.schedule.resume(&conv, now()) {
                    info!(conv = %conv.masked(), "the assistant takes the conversation back");
                }
            }
        }
    }

    /// A turn task ended: free its conversation, put a restarted turn's
    /// messages first in line, or put failed work back at the front of the
    /// conversation's queue until its backoff is over.
    fn finished(&mut self, conv: Conv, outcome: Outcome) {
        self.restarts.remove(&conv);
        let error = match &outcome {
            Outcome::Failed { error, .. } => Some(error.clone()),
            _ => None,
        };
        match self.schedule.finished(conv.clone(), outcome, now()) {
            Ended::Freed => {}
            Ended::Restarted => crate::metrics::inc(&self.metrics.turn_restarts),
            Ended::Failed { failures, retry_in } => {
                crate::metrics::inc(&self.metrics.turn_store_failures);
                warn!(conv = %conv.masked(), failures, retry_in_ms = retry_in.as_millis() as u64, error, "turn work failed in the store; its conversation waits and retries it first");
            }
        }
        self.note_cuts();
    }

    /// Abandons the running turn of `conv` for a re-run with what comes
    /// (it ignores this once its handler has answered).
    fn restart(&self, conv: &Conv, why: &str) {
        if let Some(turn) = self.restarts.get(conv) {
            info!(conv = %conv.masked(), why, "restarting the turn with every message");
            turn.cancel();
        }
    }

    /// Writes down the takeovers the timers ended (off this task; a crash
    /// before it leaves the pause on disk, past its time: it ends again at
    /// the next start).
    fn record_resumed(&mut self) {
        for conv in self.schedule.take_resumed() {
            info!(conv = %conv.masked(), "staff silent long enough: the assistant takes the conversation back");
            let store = self.store.clone();
            self.turns_on.spawn(async move {
                if let Err(e) = store.resume(&conv).await {
                    warn!(conv = %conv.masked(), error = %e, "could not record the end of a takeover");
                }
            });
        }
    }

    /// Counts and logs the batches the schedule cut.
    fn note_cuts(&mut self) {
        let now = now();
        for cut in self.schedule.take_cuts() {
            self.note_cut(&cut, now);
        }
    }

    fn note_cut(&self, cut: &Cut<Conv>, now: Instant) {
        let lag = now.saturating_duration_since(cut.deadline);
        self.metrics.batch_size.observe(cut.seqs.len() as f64);
        if let Some(i) = crate::batcher::CutReason::ALL.iter().position(|r| *r == cut.reason) {
            crate::metrics::inc(&self.metrics.cuts[i]);
        }
        self.metrics.idle_at_cut.observe_duration(now.saturating_duration_since(cut.last_at));
        // Only a deadline that timers kept has a lag; a full batch is cut on arrival.
        if cut.reason.timed() {
            self.metrics.debounce_lag.observe_duration(lag);
        }
        debug!(conv = %cut.key.masked(), messages = cut.seqs.len(), reason = cut.reason.as_str(), lag_ms = lag.as_millis() as u64, "batch cut");
    }

    /// Writes what the adaptive policy learned, if anything, off this thread.
    async fn save_rhythms(&mut self) {
        let Some(learned) = self.schedule.batcher_mut().take_learned() else { return };
        let (now, now_ms) = (now(), unix_ms());
        let saved = crate::store::SavedLearning {
            gaps: learned.gaps,
            resumes: learned.resumes,
            convs: learned
                .convs
                .into_iter()
                .map(|c| crate::store::SavedRhythm {
                    conv: c.key,
                    gaps: c.gaps,
                    resumes: c.resumes,
                    last_ms: now_ms
                        .saturating_sub(now.saturating_duration_since(c.last_msg).as_millis() as u64),
                })
                .collect(),
        };
        let store = self.store.clone();
        let error = match tokio::task::spawn_blocking(move || store.save_rhythms(&saved)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        warn!(error, "could not save the learned rhythms; tried again in a minute");
        self.schedule.batcher_mut().unsaved();
    }

    /// Whether the adaptive policy takes a message of this shape as complete.
    fn complete(&self, shape: &crate::message::Shape) -> bool {
        match self.schedule.batcher().rules().policy {
            Policy::Adaptive(a) => shape.complete(a.complete_min_chars),
            Policy::Fixed => false,
        }
    }

    fn start_ready(&mut self) {
        while let Some((conv, work)) = self.schedule.start_next() {
            let runner = self.runner.clone();
            let report = Report { tx: self.tx.clone(), conv: Some(conv.clone()), replay: work.replay() };
            let restart = CancellationToken::new();
            self.restarts.insert(conv.clone(), restart.clone());
            self.tracker.spawn_on(
                async move {
                    let outcome = runner.run(conv, work, restart).await;
                    report.send(outcome);
                },
                &self.turns_on,
            );
        }
    }

    /// Runs on the driver task, so two retries of one turn cannot both queue
    /// it. The turn is marked open on disk (durably) before it is queued: if
    /// the daemon stops first, it re-runs on the next start.
    fn retry(&mut self, turn_id: String, reply: tokio::sync::oneshot::Sender<RetryOutcome>) {
        if !self.reopening.insert(turn_id.clone()) {
            let _ = reply.send(RetryOutcome::NotDead);
            return;
        }
        // The read and the write run off the driver's thread; the answer
        // comes back as an event.
        let (store, tx) = (self.store.clone(), self.tx.clone());
        self.turns_on.spawn(async move {
            let id = turn_id.clone();
            let result = match store.read(move |st| st.turn(&id)).await {
                Ok(Some(turn)) if turn.dead.is_some() => {
                    let turn = TurnRecord { dead: None, ..turn };
                    match store.reopen_dead(&turn).await {
                        Ok(()) => Ok(Box::new(turn)),
                        Err(e) => Err(RetryOutcome::Failed(e.to_string())),
                    }
                }
                Ok(Some(_)) => Err(RetryOutcome::NotDead),
                Ok(None) => Err(RetryOutcome::NotFound),
                Err(e) => Err(RetryOutcome::Failed(e.to_string())),
            };
            // If the driver has stopped, a re-opened turn is open on disk and
            // re-runs on the next start; the caller hears "shutting down".
            let _ = tx.send(Event::Reopened { turn_id, result, reply });
        });
    }

    fn view(&self, offset: usize, limit: usize) -> View {
        let describe = |work: &Work| match work {
            Work::Fresh { seqs, .. } => (seqs.len(), "batch"),
            Work::Resume(turn) => (turn.messages.len(), "turn"),
            Work::Context(_) => (0, "context write"),
        };
        View {
            now: now(),
            collecting: self.schedule.batcher().len(),
            page: self.schedule.batcher().page(offset, limit),
            waiting: self
                .schedule
                .gate()
                .waiting()
                .take(WAITING_SHOWN)
                .map(|(conv, work)| {
                    let (messages, what) = describe(work);
                    (conv.clone(), messages, what)
                })
                .collect(),
            waiting_total: self.schedule.gate().waiting().count(),
            running: self.schedule.gate().in_flight(),
            paused: self.holds(),
        }
    }

    fn holds(&self) -> Vec<super::Hold> {
        self.schedule
            .paused()
            .map(|(conv, resume_at, messages, since)| super::Hold {
                conv: conv.clone(),
                resume_at,
                messages,
                since,
            })
            .collect()
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            now: now(),
            collecting: self.schedule.batcher().pending(),
            waiting: self
                .schedule
                .gate()
                .waiting()
                .filter_map(|(conv, work)| {
                    let seqs = match work {
                        Work::Fresh { seqs, .. } => seqs.clone(),
                        Work::Resume(turn) => turn.messages.iter().map(|m| m.seq).collect(),
                        Work::Context(_) => return None,
                    };
                    Some((conv.clone(), seqs))
                })
                .collect(),
            running: self.schedule.gate().running().cloned().collect(),
            paused: self.holds(),
        }
    }
}

/// The driver's instant for a wall-clock time (Unix ms), in the past or future.
fn instant_of(at_ms: u64) -> Instant {
    let (now, now_ms) = (now(), unix_ms());
    if at_ms >= now_ms {
        now + Duration::from_millis(at_ms - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - at_ms)).unwrap_or(now)
    }
}

/// The driver's clock: tokio's, so tests can pause and advance it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Tells the driver a turn ended even if the turn's task panicked, so a
/// conversation is never left marked running.
/// Reports a turn task's outcome to the driver — also when the task
/// panicked: then its work (rebuilt from what it was given) is handed back
/// as failed, so a bug in one turn never strands its messages.
struct Report {
    tx: mpsc::UnboundedSender<Event>,
    conv: Option<Conv>,
    replay: Option<Work>,
}

impl Report {
    fn send(mut self, outcome: Outcome) {
        if let Some(conv) = self.conv.take() {
            let _ = self.tx.send(Event::Finished { conv, outcome });
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(conv) = self.conv.take() {
            let outcome = match self.replay.take() {
                Some(work) => Outcome::Failed { work, error: "the turn task panicked".into() },
                None => Outcome::Done,
            };
            let _ = self.tx.send(Event::Finished { conv, outcome });
        }
    }
}
