//! The life of one turn: record it durably, load the context, call the
//! handler (with retries and backoff), then commit — or park it as dead.
//!
//! Durability points: the turn record is flushed before the handler first
//! sees its turn_id, so a crash can only ever re-run a turn under the same id
//! (the handler dedupes on it); the commit is one store transaction.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use crate::batcher::CutReason;
use crate::config::Config;
use crate::context;
use crate::handler::{Handler, TurnAnswer, TurnRequest};
use crate::message::{unix_ms, Conv};
use crate::store::{DeadInfo, Store, StoreError, TurnRecord, TurnSummary};

use super::Work;

pub struct Runner {
    store: Store,
    handler: Handler,
    max_attempts: u32,
    backoff: Duration,
    backoff_max: Duration,
    history_limit: usize,
    /// Cancelled on shutdown: no new attempt starts.
    shutdown: CancellationToken,
    /// Cancelled when the shutdown grace period is over: a handler call in
    /// progress is abandoned and the turn stays open for the next start.
    abort: CancellationToken,
}

impl Runner {
    pub fn new(
        config: &Config,
        store: Store,
        handler: Handler,
        shutdown: CancellationToken,
        abort: CancellationToken,
    ) -> Runner {
        Runner {
            store,
            handler,
            max_attempts: config.handler.max_attempts,
            backoff: Duration::from_millis(config.handler.backoff_ms),
            backoff_max: Duration::from_millis(config.handler.backoff_max_ms),
            history_limit: config.turns.history_limit,
            shutdown,
            abort,
        }
    }

    pub async fn run(&self, conv: Conv, work: Work) {
        let turn = match work {
            Work::Fresh { seqs, reason, .. } => {
                match self.record(conv.clone(), &seqs, reason).await {
                    Ok(Some(turn)) => turn,
                    Ok(None) => return,
                    Err(e) => {
                        // The messages stay in the inbox; the next start recovers them.
                        error!(%conv, error = %e, "could not record a turn; its messages wait for a restart");
                        return;
                    }
                }
            }
            Work::Resume(turn) => *turn,
        };
        let span = info_span!("turn", turn_id = %turn.turn_id, phone = %turn.conv.phone, company = %turn.conv.company_id);
        self.drive(turn).instrument(span).await
    }

    async fn record(
        &self,
        conv: Conv,
        seqs: &[u64],
        reason: CutReason,
    ) -> Result<Option<TurnRecord>, StoreError> {
        let messages = self.store.messages(&conv, seqs)?;
        if messages.is_empty() {
            warn!(%conv, "cut batch has no messages left in the inbox");
            return Ok(None);
        }
        let turn = TurnRecord {
            turn_id: self.store.new_turn_id()?,
            conv,
            messages,
            cut_reason: reason.as_str().to_owned(),
            cut_at_ms: unix_ms(),
            attempts: 0,
            dead: None,
        };
        self.store.put_turn(&turn)?;
        self.store.flush().await?;
        Ok(Some(turn))
    }

    async fn drive(&self, mut turn: TurnRecord) {
        let started = Instant::now();
        let started_at_ms = unix_ms();
        info!(messages = turn.messages.len(), reason = %turn.cut_reason, attempts_before = turn.attempts, "turn started");
        let context = match self.store.context(&turn.conv) {
            Ok(Some(bytes)) => match context::decode(&bytes) {
                Ok(c) => Some(c.dialogue),
                Err(e) => {
                    error!(error = %e, "stored context is unreadable; the turn runs without it");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                error!(error = %e, "cannot read the context; the turn stays open for the next start");
                return;
            }
        };
        let request = TurnRequest::new(&turn.turn_id, &turn.conv, &turn.messages, context);
        let mut this_run = 0;
        loop {
            turn.attempts += 1;
            this_run += 1;
            let call = Instant::now();
            let answer = tokio::select! {
                answer = self.handler.call(&request) => answer,
                _ = self.abort.cancelled() => {
                    warn!("grace period over: handler call abandoned, the turn re-runs on the next start");
                    return;
                }
            };
            match answer {
                Ok(answer) => {
                    info!(
                        handler_ms = call.elapsed().as_millis() as u64,
                        attempt = this_run,
                        "handler answered"
                    );
                    self.commit(&turn, answer, started_at_ms, started).await;
                    return;
                }
                Err(e) if this_run >= self.max_attempts => {
                    error!(attempts = this_run, error = %e, "handler failed on every attempt; turn parked as dead");
                    turn.dead = Some(DeadInfo {
                        error: e.to_string(),
                        died_at_ms: unix_ms(),
                    });
                    let parked = self.store.park_dead(&turn);
                    if let Err(e) = async {
                        parked?;
                        self.store.flush().await
                    }
                    .await
                    {
                        error!(error = %e, "could not park the dead turn; it re-runs on the next start");
                    }
                    return;
                }
                Err(e) => {
                    let wait = self.backoff_for(this_run);
                    warn!(attempt = this_run, error = %e, retry_in_ms = wait.as_millis() as u64, "handler failed");
                    // Keep the attempt count across restarts; not worth a flush.
                    if let Err(e) = self.store.put_turn(&turn) {
                        warn!(error = %e, "could not record the attempt count");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => {
                            info!("shutting down: turn left open, it re-runs on the next start");
                            return;
                        }
                    }
                }
            }
        }
    }

    async fn commit(
        &self,
        turn: &TurnRecord,
        answer: TurnAnswer,
        started_at_ms: u64,
        started: Instant,
    ) {
        let now_ms = unix_ms();
        let context = answer.context.as_ref().map(|c| context::encode(c, now_ms));
        let summary = TurnSummary {
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
        let committed =
            self.store
                .commit_turn(turn, &summary, context.as_deref(), self.history_limit);
        match async {
            committed?;
            self.store.flush().await
        }
        .await
        {
            Ok(()) => {
                // The `log` gateway: replies are recorded in the history, not sent.
                info!(
                    turn_ms = started.elapsed().as_millis() as u64,
                    context_bytes = context.as_ref().map(Vec::len),
                    reply = answer.reply.as_deref().unwrap_or(""),
                    "turn committed"
                );
            }
            Err(e) => {
                error!(error = %e, "commit failed; the turn stays open and re-runs on the next start")
            }
        }
    }

    fn backoff_for(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }
}
