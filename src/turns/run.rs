//! The life of one turn: record it durably, load the context, call the
//! handler (with retries and backoff), then commit — or park it as dead.
//!
//! Durability points: the turn's claim is synced before the handler first
//! sees its turn_id, so a crash can only ever re-run a turn under the same id
//! (the handler dedupes on it); the commit is one store transaction, and its
//! reply is sent only once that is synced.
//!
//! Every way out is an `Outcome` for the driver: a store failure hands the
//! work back (retried in order after a backoff), never a log line alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use crate::batcher::CutReason;
use crate::clock::{backoff, Clock};
use crate::config::Config;
use crate::context::{self, Encoded};
use crate::feed::Finished;
use crate::gateway::{self, Gateway};
use crate::handler::{Handler, TurnAnswer, TurnRequest};
use crate::message::{mask, mask_always, Conv};
use crate::store::{
    Commit, ContextUpdate, DeadInfo, OutboxItem, Part, Store, StoreError, TurnRecord, TurnSummary,
};

use super::{ContextJob, ContextOp, ContextOutcome, Outcome, Shared, Work};
use crate::metrics::{inc, Metrics};

/// The two stages of stopping, as the runner sees them.
#[derive(Clone, Default)]
pub struct Stopping {
    /// Cancelled on shutdown: no new attempt starts.
    pub shutdown: CancellationToken,
    /// Cancelled when the shutdown grace period is over: a handler call in
    /// progress is abandoned and the turn stays open for the next start.
    pub abort: CancellationToken,
}

pub struct Runner {
    store: Store,
    handler: Handler,
    gateway: Arc<Gateway>,
    max_chars: usize,
    max_attempts: u32,
    backoff: Duration,
    backoff_max: Duration,
    history_limit: usize,
    history_max_bytes: usize,
    context_ttl_ms: u64,
    clock: Clock,
    stopping: Stopping,
    metrics: Arc<Metrics>,
    shared: Shared,
}

impl Runner {
    pub fn new(
        config: &Config,
        store: Store,
        handler: Handler,
        gateway: Arc<Gateway>,
        shared: &Shared,
    ) -> Runner {
        Runner {
            store,
            handler,
            gateway,
            max_chars: config.gateway.max_chars,
            max_attempts: config.handler.max_attempts,
            backoff: Duration::from_millis(config.handler.backoff_ms),
            backoff_max: Duration::from_millis(config.handler.backoff_max_ms),
            history_limit: config.turns.history_limit,
            history_max_bytes: config.turns.history_max_bytes,
            context_ttl_ms: config.context.ttl_hours * 3600 * 1000,
            clock: shared.clock.clone(),
            stopping: shared.stopping.clone(),
            metrics: shared.metrics.clone(),
            shared: shared.clone(),
        }
    }

    /// Runs one piece of work to its outcome; the driver acts on it.
    /// `restart` cancelled: abandon the turn for a re-run, if its handler
    /// has not answered yet.
    pub async fn run(&self, conv: Conv, work: Work, restart: CancellationToken) -> Outcome {
        // Only a batch cut by its timers has a deadline worth measuring from.
        let mut due: Option<Instant> = None;
        let mut waited = Waited::default();
        let turn = match work {
            Work::Fresh { seqs, reason, deadline, cut_at, max_messages, supersedes } => {
                if reason.timed() {
                    due = Some(Instant::from_std(deadline));
                    waited.cut_lag = Some(cut_at.saturating_duration_since(deadline));
                }
                waited.queue = Some(std::time::Instant::now().saturating_duration_since(cut_at));
                match self.record(conv.clone(), &seqs, reason, supersedes.clone()).await {
                    Ok(Some(turn)) => turn,
                    Ok(None) => return Outcome::Done,
                    Err(e) => {
                        // Nothing was recorded: the same batch is tried again.
                        warn!(conv = %conv.masked(), error = %e, "could not record a turn; it is retried after a backoff");
                        let work = Work::Fresh { seqs, reason, deadline, cut_at, max_messages, supersedes };
                        return Outcome::Failed { work, error: e.to_string() };
                    }
                }
            }
            Work::Resume(turn) => *turn,
            Work::Context(job) => return self.apply_context(&conv, job).await,
        };
        let span = info_span!("turn", turn_id = %turn.turn_id, phone = %mask(&turn.conv.phone), company = %turn.conv.company_id);
        let turn_id = turn.turn_id.clone();
        let outcome = self.drive(turn, due, waited, restart).instrument(span).await;
        if matches!(outcome, Outcome::Failed { .. } | Outcome::Abandoned | Outcome::Restarted { .. }) {
            self.shared.feed.left(&turn_id);
        }
        outcome
    }

    /// Claims the batch's messages under a new turn id, durably, before any
    /// handler sees it.
    async fn record(
        &self,
        conv: Conv,
        seqs: &[u64],
        reason: CutReason,
        supersedes: Vec<String>,
    ) -> Result<Option<TurnRecord>, StoreError> {
        let messages = self.store.messages(&conv, seqs);
        if messages.is_empty() {
            warn!(conv = %conv.masked(), "cut batch has no messages left pending");
            return Ok(None);
        }
        let turn = TurnRecord {
            turn_id: self.store.new_turn_id()?,
            conv,
            messages,
            cut_reason: reason.as_str().to_owned(),
            cut_at_ms: self.clock.now_ms(),
            attempts: 0,
            dead: None,
        };
        self.store.claim_superseding(&turn, supersedes).await?;
        Ok(Some(turn))
    }

    /// A store failure after the claim: the turn (same id, same messages)
    /// goes back to the front of its conversation's queue.
    fn failed(turn: TurnRecord, what: &str, e: StoreError) -> Outcome {
        warn!(error = %e, "{what} failed; the turn is retried after a backoff");
        Outcome::Failed { work: Work::Resume(Box::new(turn)), error: format!("{what}: {e}") }
    }

    async fn drive(
        &self,
        mut turn: TurnRecord,
        due: Option<Instant>,
        waited: Waited,
        restart: CancellationToken,
    ) -> Outcome {
        let restarted = |turn: &TurnRecord| {
            info!("restarted: the handler's answer, if it still comes, is discarded");
            Outcome::Restarted {
                seqs: turn.messages.iter().map(|m| m.seq).collect(),
                turn_id: turn.turn_id.clone(),
                reason: CutReason::from_name(&turn.cut_reason).unwrap_or(CutReason::Immediate),
            }
        };
        let started = Instant::now();
        let started_at_ms = self.clock.now_ms();
        info!(messages = turn.messages.len(), reason = %turn.cut_reason, attempts_before = turn.attempts, "turn started");
        let (key, now) = (turn.conv.clone(), self.clock.now_ms());
        let (dialogue, cache) = match self.store.read(move |st| st.context(&key, now)).await {
            Ok(Some(stored)) => (
                self.decode_part("dialogue", stored.dialogue.as_deref()),
                self.decode_part("cache", stored.cache.as_deref()),
            ),
            Ok(None) => (None, None),
            Err(e) => return Self::failed(turn, "reading the context", e),
        };
        // What staff wrote since the conversation's last turn (a takeover).
        let staff = self.store.takeover(&turn.conv).undelivered();
        let staff_up_to = staff.iter().map(|m| m.at_ms).max();
        let request = TurnRequest::new(&turn.turn_id, &turn.conv, &turn.messages, dialogue, cache, &staff);
        let last_id = turn.messages.last().map(|m| m.id.clone()).unwrap_or_default();
        let typing = self.typing(&turn.conv, &last_id);
        if self.gateway.kind() != crate::config::GatewayKind::Log {
            let (gateway, conv, id) = (self.gateway.clone(), turn.conv.clone(), last_id.clone());
            tokio::spawn(async move { gateway.mark_read(&conv, &id).await });
        }
        let mut this_run = 0;
        loop {
            turn.attempts += 1;
            this_run += 1;
            let call = Instant::now();
            self.shared.feed.attempt(
                &turn.turn_id,
                &turn.conv,
                started_at_ms,
                turn.attempts,
                self.handler.kind_name(),
            );
            if let Some(due) = due.filter(|_| this_run == 1) {
                self.metrics.deadline_to_handler.observe_duration(call.saturating_duration_since(due));
            }
            let answer = tokio::select! {
                // An answer that is there wins over a restart asked at the same moment.
                biased;
                answer = self.handler.call(&request) => answer,
                _ = self.stopping.abort.cancelled() => {
                    warn!("grace period over: handler call abandoned, the turn re-runs on the next start");
                    return Outcome::Abandoned;
                }
                _ = restart.cancelled() => {
                    typing.stop();
                    return restarted(&turn);
                }
            };
            self.metrics.handler_latency.observe_duration(call.elapsed());
            match answer {
                Ok(answer) => {
                    info!(
                        handler_ms = call.elapsed().as_millis() as u64,
                        attempt = this_run,
                        "handler answered"
                    );
                    typing.stop();
                    let timing = Timing { waited, handler: call.elapsed(), started };
                    let (conv, outcome) =
                        (turn.conv.clone(), self.commit(turn, answer, started_at_ms, timing).await);
                    if let (Some(up_to), Outcome::Done) = (staff_up_to, &outcome) {
                        // The next turn does not see them again.
                        if let Err(e) = self.store.staff_delivered(&conv, up_to).await {
                            warn!(error = %e, "could not note the staff messages as seen; the next turn sees them again");
                        }
                    }
                    return outcome;
                }
                Err(e) if this_run >= self.max_attempts => {
                    inc(&self.metrics.handler_errors);
                    typing.stop();
                    error!(attempts = this_run, error = %e, "handler failed on every attempt; turn parked as dead");
                    turn.dead = Some(DeadInfo { error: e.to_string(), died_at_ms: self.clock.now_ms() });
                    return match self.store.park_dead(&turn).await {
                        Ok(()) => {
                            inc(&self.metrics.turns_dead);
                            let timing = Timing { waited, handler: call.elapsed(), started };
                            self.shared.feed.finished(self.finished(&turn, &timing, Duration::ZERO, None));
                            Outcome::Parked
                        }
                        Err(e) => {
                            turn.dead = None;
                            Self::failed(turn, "parking the dead turn", e)
                        }
                    };
                }
                Err(e) => {
                    inc(&self.metrics.handler_errors);
                    inc(&self.metrics.handler_retries);
                    let wait = backoff(self.backoff, self.backoff_max, this_run);
                    warn!(attempt = this_run, error = %e, retry_in_ms = wait.as_millis() as u64, "handler failed");
                    // Keep the attempt count across restarts; not waited for.
                    self.store.note_attempts(&turn);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stopping.shutdown.cancelled() => {
                            info!("shutting down: turn left open, it re-runs on the next start");
                            return Outcome::Abandoned;
                        }
                        _ = restart.cancelled() => {
                            typing.stop();
                            return restarted(&turn);
                        }
                    }
                }
            }
        }
    }

    async fn commit(
        &self,
        turn: TurnRecord,
        answer: TurnAnswer,
        started_at_ms: u64,
        timing: Timing,
    ) -> Outcome {
        let started = timing.started;
        let committing = Instant::now();
        let now_ms = self.clock.now_ms();
        let dialogue = answer.context.map(|raw| context::encode_json(raw.get().to_owned()));
        let cache = answer.cache.map(|raw| context::encode_json(raw.get().to_owned()));
        let (dialogue_bytes, cache_bytes) =
            (dialogue.as_ref().map(|e| e.bytes.len()), cache.as_ref().map(|e| e.bytes.len()));
        let update = ContextUpdate {
            dialogue: part(dialogue, Part::Keep),
            cache: part(cache, Part::Keep),
            slide: true,
            ttl_ms: self.context_ttl_ms,
        };
        let mut summary = TurnSummary {
            turn_id: turn.turn_id.clone(),
            conv: turn.conv.clone(),
            messages: turn.messages.clone(),
            reply: answer.reply.clone(),
            cut_reason: turn.cut_reason.clone(),
            cut_at_ms: turn.cut_at_ms,
            started_at_ms,
            committed_at_ms: now_ms,
            attempts: turn.attempts,
        };
        summary.clip_to(self.history_max_bytes);
        let outbox = match self.outbox_items(&turn, answer.reply.as_deref(), now_ms) {
            Ok(items) => items,
            Err(e) => return Self::failed(turn, "numbering the reply's outbox pieces", e),
        };
        let parts = outbox.len();
        let kept = turn.clone();
        let commit = Commit {
            turn,
            summary,
            context: update,
            outbox,
            history_limit: self.history_limit,
            history_max_bytes: self.history_max_bytes,
            now_ms,
        };
        match self.store.commit(commit).await {
            Ok(()) => {
                // A reply is sent once its commit is durable: wait for that
                // here, so the conversation's next turn starts after it.
                if parts > 0 {
                    if let Err(e) = self.store.sync().await {
                        warn!(error = %e, "the commit is applied but could not be synced yet");
                    }
                }
                inc(&self.metrics.turns_committed);
                self.metrics.commit_latency.observe_duration(committing.elapsed());
                self.shared.feed.finished(self.finished(
                    &kept,
                    &timing,
                    committing.elapsed(),
                    answer.reply.clone(),
                ));
                self.metrics.turn_duration.observe_duration(started.elapsed());
                // The reply's text stays out of the log (it can carry what a
                // client typed); the history and the API have it.
                info!(
                    outbox_parts = parts,
                    turn_ms = started.elapsed().as_millis() as u64,
                    dialogue_bytes,
                    cache_bytes,
                    reply_chars = answer.reply.as_deref().map(|r| r.chars().count()),
                    "turn committed"
                );
                tracing::debug!(reply = %crate::message::loggable(answer.reply.as_deref().unwrap_or("")), "the turn's reply");
                Outcome::Done
            }
            Err(e) => Self::failed(kept, "the commit", e),
        }
    }

    /// What the console keeps of a turn that ended.
    fn finished(&self, turn: &TurnRecord, t: &Timing, commit: Duration, reply: Option<String>) -> Finished {
        let ms = |d: Duration| d.as_millis() as u64;
        Finished {
            seq: 0,
            turn_id: turn.turn_id.clone(),
            company_id: turn.conv.company_id.clone(),
            phone: turn.conv.phone.clone(),
            masked: mask_always(&turn.conv.phone),
            outcome: if turn.dead.is_some() { "dead" } else { "committed" },
            cut_reason: turn.cut_reason.clone(),
            messages: turn.messages.len(),
            attempts: turn.attempts,
            finished_at_ms: self.clock.now_ms(),
            cut_lag_ms: t.waited.cut_lag.map(ms),
            queue_wait_ms: t.waited.queue.map(ms),
            handler_ms: ms(t.handler),
            commit_ms: ms(commit),
            turn_ms: ms(t.started.elapsed()),
            reply_chars: reply.as_deref().map(|r| r.chars().count()),
            error: turn.dead.as_ref().map(|d| d.error.clone()),
            texts: turn.messages.iter().map(|m| m.text.clone()).collect(),
            reply,
        }
    }

    /// The reply, split to the gateway's limit, as outbox items (none for the `log` gateway).
    fn outbox_items(
        &self,
        turn: &TurnRecord,
        reply: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let reply = reply.unwrap_or("").trim();
        if !self.gateway.sends() || reply.is_empty() {
            return Ok(Vec::new());
        }
        let parts = gateway::split(reply, self.max_chars);
        let total = parts.len() as u32;
        parts
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                Ok(OutboxItem {
                    seq: self.store.next_seq()?,
                    turn_id: turn.turn_id.clone(),
                    conv: turn.conv.clone(),
                    text,
                    part: i as u32 + 1,
                    parts: total,
                    created_at_ms: now_ms,
                    attempts: 0,
                    last_error: None,
                    failed: false,
                })
            })
            .collect()
    }

    /// Best effort, in the background: a typing indicator never delays a turn.
    /// Shows the client the assistant is answering, now and again every
    /// `gateway.typing_refresh_ms` while the handler runs (Meta's indicator
    /// lasts 25 s at most), until `Typing::stop` (or the turn ends). Best effort.
    fn typing(&self, conv: &Conv, last_message_id: &str) -> Typing {
        let typing = Typing { stop: CancellationToken::new(), off: Arc::new(AtomicBool::new(false)) };
        if !self.gateway.shows_typing() {
            return typing;
        }
        let (stop, off) = (typing.stop.clone(), typing.off.clone());
        let (gateway, conv, id) = (self.gateway.clone(), conv.clone(), last_message_id.to_owned());
        let every = self.gateway.typing_refresh();
        tokio::spawn(async move {
            // Each call on its own clock: Evolution's lasts until just
            // before the next refresh.
            let last = loop {
                let (gateway, conv, id) = (gateway.clone(), conv.clone(), id.clone());
                let call = tokio::spawn(async move { gateway.typing(&conv, &id, true).await });
                tokio::select! {
                    _ = stop.cancelled() => break call,
                    _ = tokio::time::sleep(every), if !every.is_zero() => {}
                }
            };
            if !off.load(Ordering::Relaxed) {
                return;
            }
            // "Off" after the last "on" reached the gateway, not before it
            // (a fast turn): bounded, Evolution's "on" is answered late.
            let _ = tokio::time::timeout(TYPING_OFF_WAIT, last).await;
            gateway.typing(&conv, &id, false).await;
        });
        typing
    }

    /// A stored part the handler gets: unreadable means absent, loudly.
    fn decode_part(&self, which: &str, bytes: Option<&[u8]>) -> Option<Box<serde_json::value::RawValue>> {
        match context::decode_raw(bytes?) {
            Ok(v) => Some(v),
            Err(e) => {
                error!(part = which, error = %e, "stored context part is unreadable; the turn runs without it");
                None
            }
        }
    }

    /// A context write from the API, in the conversation's turn slot. Its
    /// caller hears the result; the conversation goes on either way.
    async fn apply_context(&self, conv: &Conv, job: ContextJob) -> Outcome {
        let update = match &job.op {
            ContextOp::Put { dialogue, cache } => ContextUpdate {
                dialogue: part(dialogue.as_ref().map(context::encode), Part::Clear),
                cache: part(cache.as_ref().map(context::encode), Part::Clear),
                slide: true,
                ttl_ms: self.context_ttl_ms,
            },
            ContextOp::Invalidate => ContextUpdate {
                dialogue: Part::Keep,
                cache: Part::Clear,
                slide: false,
                ttl_ms: self.context_ttl_ms,
            },
            ContextOp::Delete => ContextUpdate {
                dialogue: Part::Clear,
                cache: Part::Clear,
                slide: false,
                ttl_ms: self.context_ttl_ms,
            },
        };
        let outcome = match self.store.update_context(conv, update, self.clock.now_ms()).await {
            Ok((before, after)) => {
                info!(conv = %conv.masked(), op = ?op_name(&job.op), "context written via the API");
                ContextOutcome::Done { before, after }
            }
            Err(e) => {
                error!(conv = %conv.masked(), error = %e, "context write failed");
                ContextOutcome::Failed(e.to_string())
            }
        };
        let _ = job.reply.send(outcome);
        Outcome::Done
    }
}

/// How long a fresh batch waited before its turn started.
#[derive(Default)]
struct Waited {
    /// Deadline → cut, for a batch its timers cut.
    cut_lag: Option<Duration>,
    /// Cut → turn start.
    queue: Option<Duration>,
}

/// A turn's timings, for the console.
struct Timing {
    waited: Waited,
    /// The answering (or last failing) handler call.
    handler: Duration,
    started: Instant,
}

/// `Set` for an encoded part, `otherwise` when there is none.
fn part(encoded: Option<Encoded>, otherwise: Part) -> Part {
    match encoded {
        Some(e) => Part::Set { bytes: e.bytes, raw_len: e.raw_len },
        None => otherwise,
    }
}

fn op_name(op: &ContextOp) -> &'static str {
    match op {
        ContextOp::Put { .. } => "put",
        ContextOp::Invalidate => "invalidate",
        ContextOp::Delete => "delete",
    }
}

/// A turn's typing indicator: refreshed until stopped.
struct Typing {
    stop: CancellationToken,
    /// Stopped by `stop` (the reply is committed): say so to the gateway
    /// (WAHA's stopTyping, Evolution's "paused"). Dropped: just stop.
    off: Arc<AtomicBool>,
}

/// How long the "off" waits for the last "on" to be answered.
const TYPING_OFF_WAIT: Duration = Duration::from_secs(2);

impl Typing {
    fn stop(&self) {
        self.off.store(true, Ordering::Relaxed);
        self.stop.cancel();
    }
}

impl Drop for Typing {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
