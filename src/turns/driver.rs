//! The one task that owns the batcher and the gate. It sleeps until the
//! batcher's next deadline or the next event, cuts what is due, and starts
//! whatever the gate allows. There is no polling loop: with nothing pending
//! it waits on its channel alone.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::batcher::{Batcher, Cut, CutReason, Rules};
use crate::config::Config;
use crate::message::{unix_ms, Conv, Message};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, TurnRecord};

use super::gate::Gate;
use super::{DriverInbox, Event, RetryOutcome, Runner, Shared, Snapshot, Work};

/// What the store holds that the driver must pick up on start.
pub struct Recovery {
    /// Turns recorded but not committed, oldest first: they re-run with their turn_id.
    pub open_turns: Vec<TurnRecord>,
    /// Inbox messages not claimed by an open turn, in arrival order per conversation.
    pub inbox: Vec<Message>,
    pub dead_turns: usize,
}

impl Recovery {
    pub fn load(store: &Store) -> Result<Recovery, StoreError> {
        let mut open_turns = Vec::new();
        let mut dead_turns = 0;
        for turn in store.turns()? {
            if turn.dead.is_some() {
                dead_turns += 1;
            } else {
                open_turns.push(turn);
            }
        }
        open_turns.sort_by(|a, b| a.turn_id.cmp(&b.turn_id));
        let claimed: HashSet<(&Conv, u64)> =
            open_turns.iter().flat_map(|t| t.messages.iter().map(|m| (&m.conv, m.seq))).collect();
        let inbox = store.inbox()?.into_iter().filter(|m| !claimed.contains(&(&m.conv, m.seq))).collect();
        Ok(Recovery { open_turns, inbox, dead_turns })
    }
}

pub struct Driver {
    batcher: Batcher<Conv>,
    gate: Gate<Conv, Work>,
    max_messages: usize,
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
}

impl Driver {
    /// Builds the driver with everything recovered from disk already queued:
    /// open turns first (per conversation they are older than any inbox
    /// message), then inbox messages at their original receive times, so a
    /// batch whose deadline passed while the daemon was down is cut at once.
    pub fn new(
        config: &Config,
        store: Store,
        runner: Arc<Runner>,
        recovery: Recovery,
        inbox: DriverInbox,
        tracker: TaskTracker,
        shared: &Shared,
    ) -> Driver {
        let DriverInbox { rx, tx } = inbox;
        let rules = Rules {
            debounce: Duration::from_millis(config.batching.debounce_ms),
            max_messages: config.batching.max_messages,
            max_wait: Duration::from_millis(config.batching.max_wait_ms),
        };
        let mut driver = Driver {
            batcher: Batcher::new(rules),
            gate: Gate::new(config.turns.max_concurrent),
            max_messages: config.batching.max_messages,
            store,
            runner,
            rx,
            tx,
            tracker,
            turns_on: tokio::runtime::Handle::current(),
            shutdown: shared.stopping.shutdown.clone(),
            metrics: shared.metrics.clone(),
        };
        for turn in recovery.open_turns {
            driver.gate.offer(turn.conv.clone(), Work::Resume(Box::new(turn)));
        }
        let now = now();
        let now_ms = unix_ms();
        for m in recovery.inbox {
            let age = Duration::from_millis(now_ms.saturating_sub(m.received_at_ms));
            let at = now.checked_sub(age).unwrap_or(now);
            if let Some(cut) = driver.batcher.push(m.conv, m.seq, at) {
                driver.offer(cut);
            }
        }
        driver
    }

    pub async fn run(mut self) {
        loop {
            let now = now();
            for cut in self.batcher.due(now) {
                self.offer(cut);
            }
            self.start_ready();
            let deadline = self.batcher.next_deadline();
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
            }
        }
        let (batches, messages) = self.batcher.len();
        info!(
            in_flight = self.gate.in_flight(),
            batches, messages, "driver stopped; pending batches stay on disk"
        );
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ingested { conv, seq, at, immediate } => {
                let cut = self.batcher.push(conv.clone(), seq, at);
                if let Some(cut) = cut {
                    self.offer(cut);
                } else if immediate {
                    if let Some(cut) = self.batcher.cut_now(&conv) {
                        self.offer(cut);
                    }
                }
            }
            Event::Finished { conv } => self.gate.finished(&conv),
            Event::Retry { turn_id, reply } => {
                let _ = reply.send(self.retry(&turn_id));
            }
            Event::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Event::Context { conv, job } => self.gate.offer(conv, Work::Context(job)),
        }
    }

    fn offer(&mut self, cut: Cut<Conv>) {
        let now = now();
        let lag = now.saturating_duration_since(cut.deadline);
        self.metrics.batch_size.observe(cut.seqs.len() as f64);
        self.metrics.idle_at_cut.observe_duration(now.saturating_duration_since(cut.last_at));
        // Only a deadline that timers kept has a lag; a full batch is cut on arrival.
        if matches!(cut.reason, CutReason::Quiet | CutReason::MaxWait) {
            self.metrics.debounce_lag.observe_duration(lag);
        }
        debug!(conv = %cut.key.masked(), messages = cut.seqs.len(), reason = cut.reason.as_str(), lag_ms = lag.as_millis() as u64, "batch cut");
        let work = Work::Fresh {
            seqs: cut.seqs,
            reason: cut.reason,
            deadline: cut.deadline,
            max_messages: self.max_messages,
        };
        self.gate.offer(cut.key, work);
    }

    fn start_ready(&mut self) {
        while let Some((conv, work)) = self.gate.start_next() {
            let runner = self.runner.clone();
            let finished = Finished { tx: self.tx.clone(), conv: Some(conv.clone()) };
            self.tracker.spawn_on(
                async move {
                    runner.run(conv, work).await;
                    drop(finished);
                },
                &self.turns_on,
            );
        }
    }

    /// Runs on the driver task, so two retries of one turn cannot both queue it.
    fn retry(&mut self, turn_id: &str) -> RetryOutcome {
        let mut turn = match self.store.turn(turn_id) {
            Ok(Some(turn)) => turn,
            Ok(None) => return RetryOutcome::NotFound,
            Err(e) => return RetryOutcome::Failed(e.to_string()),
        };
        if turn.dead.take().is_none() {
            return RetryOutcome::NotDead;
        }
        // Marked open on disk: if the daemon stops first, it re-runs on start.
        if let Err(e) = self.store.put_turn(&turn) {
            return RetryOutcome::Failed(e.to_string());
        }
        info!(turn_id, conv = %turn.conv.masked(), "dead turn queued for retry");
        self.gate.offer(turn.conv.clone(), Work::Resume(Box::new(turn)));
        RetryOutcome::Queued
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            now: now(),
            collecting: self
                .batcher
                .pending()
                .into_iter()
                .map(|p| (p.key, p.seqs, p.first_at, p.deadline))
                .collect(),
            waiting: self
                .gate
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
            running: self.gate.running().cloned().collect(),
        }
    }
}

/// The driver's clock: tokio's, so tests can pause and advance it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Tells the driver a turn ended even if the turn's task panicked, so a
/// conversation is never left marked running.
struct Finished {
    tx: mpsc::UnboundedSender<Event>,
    conv: Option<Conv>,
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(conv) = self.conv.take() {
            let _ = self.tx.send(Event::Finished { conv });
        }
    }
}
