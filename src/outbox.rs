//! Delivery of replies: one task that takes the outbox (written in each
//! turn's commit), sends every conversation's oldest piece through the
//! gateway, and removes it once the gateway took it.
//!
//! Order: a conversation's next piece is sent only after the previous one
//! went through, so one phone's replies arrive in order. A conversation whose
//! send failed waits out a backoff; others go on. A piece is removed (and the
//! removal flushed) only after the gateway answered 2xx, so a restart never
//! loses a reply; a crash in the instant between the two may send it twice,
//! which is why the http gateway carries an idempotency key.
//!
//! The reply cap: at most `gateway.max_replies_per_conversation_per_hour`
//! replies go to one conversation in any hour. A reply whose turn comes while
//! its conversation is at the cap is parked — every piece marked given up
//! with the reason, listed by `GET /api/outbox` as `rate_limited`, counted —
//! and never sent: a brake on a bot loop or a flood must not leave a backlog
//! that keeps sending for hours, and a reply an hour late answers nothing.
//! Replies committed after the hour frees up go out again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::backoff;
use crate::config::Config;
use crate::gateway::{Delivery, Gateway};
use crate::message::{mask, Conv};
use crate::metrics::{inc, Metrics};
use crate::store::{OutboxItem, Store};

/// Sends in flight at once (across conversations).
const MAX_PARALLEL: usize = 16;

/// The reply cap counts the replies sent in this window.
const CAP_WINDOW: Duration = Duration::from_secs(3600);

/// A piece as `GET /api/outbox` shows it: `pending` (waiting for the
/// gateway, maybe backing off), `failed` (given up after
/// `gateway.max_attempts`) or `rate_limited` (parked by the reply cap). A
/// parked piece is one given up without a single attempt — a failed send
/// always counts one — so the state needs no field of its own on disk.
pub fn state(item: &OutboxItem) -> &'static str {
    match (item.failed, item.attempts) {
        (false, _) => "pending",
        (true, 0) if item.last_error.as_deref().is_some_and(|e| e.starts_with(SUPPRESSED)) => "suppressed",
        (true, 0) => "rate_limited",
        (true, _) => "failed",
    }
}

/// How a reply held back by a human takeover starts its `last_error`.
const SUPPRESSED: &str = "suppressed:";

pub struct Outbox {
    store: Store,
    gateway: Arc<Gateway>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    backoff: Duration,
    backoff_max: Duration,
    max_attempts: u32,
    max_replies_per_hour: usize,
}

impl Outbox {
    pub fn new(
        config: &Config,
        store: Store,
        gateway: Arc<Gateway>,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Outbox {
        Outbox {
            store,
            metrics,
            gateway,
            wake,
            backoff: Duration::from_millis(config.gateway.backoff_ms),
            backoff_max: Duration::from_millis(config.gateway.backoff_max_ms),
            max_attempts: config.gateway.max_attempts,
            max_replies_per_hour: config.gateway.max_replies_per_conversation_per_hour as usize,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut not_before: HashMap<Conv, Instant> = HashMap::new();
        // When each conversation's replies of the last hour went out, oldest
        // first: the reply cap's count. In memory only — a piece leaves the
        // store once sent, so the disk cannot tell — and a restart starts
        // every hour afresh: at most one more hour's worth per restart, which
        // is enough for a brake.
        let mut sent: HashMap<Conv, VecDeque<Instant>> = HashMap::new();
        // Sends in flight finish (within the gateway timeout); no new round starts.
        while !shutdown.is_cancelled() {
            // The store keeps the outbox in memory: no tree is decoded per round.
            let items = self.store.outbox();
            let now = Instant::now();
            not_before.retain(|_, t| *t > now);
            sent.retain(|_, at| {
                while at.front().is_some_and(|t| now.duration_since(*t) >= CAP_WINDOW) {
                    at.pop_front();
                }
                !at.is_empty()
            });
            // Each conversation's oldest live piece.
            let mut seen = HashSet::new();
            let heads: Vec<&OutboxItem> =
                items.iter().filter(|i| !i.failed).filter(|i| seen.insert(i.conv.clone())).collect();
            // A conversation at the cap whose oldest piece starts a reply:
            // that reply and every later one waiting are parked. (A piece
            // after the first goes on: its reply was counted when it began.)
            let at_cap = |conv: &Conv| sent.get(conv).map_or(0, VecDeque::len) >= self.max_replies_per_hour;
            let capped: HashSet<Conv> =
                heads.iter().filter(|i| i.part == 1 && at_cap(&i.conv)).map(|i| i.conv.clone()).collect();
            if !capped.is_empty() {
                self.park(&items, &capped).await;
            }
            // Staff took the conversation over: what the assistant had still
            // to say is never delivered late over the human.
            let taken: HashSet<Conv> =
                heads.iter().filter(|i| self.store.is_paused(&i.conv)).map(|i| i.conv.clone()).collect();
            if !taken.is_empty() {
                self.suppress(&items, &taken).await;
            }
            let capped: HashSet<Conv> = capped.union(&taken).cloned().collect();
            // The rest, unless backing off.
            let ready: Vec<OutboxItem> = heads
                .into_iter()
                .filter(|i| !capped.contains(&i.conv) && !not_before.contains_key(&i.conv))
                .take(MAX_PARALLEL)
                .cloned()
                .collect();
            if ready.is_empty() {
                let next = not_before.values().min().copied();
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = sleep_until(next) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            let mut sends = JoinSet::new();
            for item in ready {
                let gateway = self.gateway.clone();
                sends.spawn(async move {
                    let d = Delivery {
                        turn_id: &item.turn_id,
                        conv: &item.conv,
                        text: &item.text,
                        part: item.part,
                        parts: item.parts,
                    };
                    let result = gateway.send(&d).await;
                    (item, result)
                });
            }
            while let Some(joined) = sends.join_next().await {
                let Ok((mut item, result)) = joined else { continue };
                let span =
                    tracing::info_span!("send", turn_id = %item.turn_id, phone = %mask(&item.conv.phone));
                let _enter = span.enter();
                let written = match result {
                    Ok(_id) => {
                        inc(&self.metrics.replies_sent);
                        if item.part == 1 {
                            sent.entry(item.conv.clone()).or_default().push_back(Instant::now());
                        }
                        info!(part = item.part, parts = item.parts, "reply sent");
                        self.store.outbox_sent(item.seq).await
                    }
                    Err(e) => {
                        inc(&self.metrics.send_failures);
                        item.attempts += 1;
                        item.last_error = Some(e.to_string());
                        if item.attempts >= self.max_attempts {
                            item.failed = true;
                            error!(attempts = item.attempts, error = %e, "reply given up; listed in GET /api/outbox");
                        } else {
                            let wait = backoff(self.backoff, self.backoff_max, item.attempts);
                            warn!(attempt = item.attempts, error = %e, retry_in_ms = wait.as_millis() as u64, "send failed");
                            not_before.insert(item.conv.clone(), Instant::now() + wait);
                        }
                        self.store.outbox_update(&item).await
                    }
                };
                if let Err(e) = written {
                    error!(error = %e, "cannot record the send in the outbox");
                }
            }
        }
    }

    /// Holds back every live piece of the conversations staff took over:
    /// given up without an attempt, `suppressed`, never sent later.
    async fn suppress(&self, items: &[OutboxItem], taken: &HashSet<Conv>) {
        let reason =
            format!("{SUPPRESSED} staff took the conversation over (a human answered meanwhile); not sent");
        for item in self.give_up_unsent(items, taken, &reason).await {
            inc(&self.metrics.replies_suppressed);
            info!(turn_id = %item.turn_id, phone = %mask(&item.conv.phone), "reply not sent: staff took the conversation over; listed in GET /api/outbox as suppressed");
        }
    }

    /// Parks every live piece of the `capped` conversations: given up, with
    /// the reason, without an attempt (`state` tells them apart by that).
    async fn park(&self, items: &[OutboxItem], capped: &HashSet<Conv>) {
        let reason = format!(
            "rate limited: {} replies already sent to this conversation in the last hour \
             (gateway.max_replies_per_conversation_per_hour); not sent",
            self.max_replies_per_hour
        );
        for item in self.give_up_unsent(items, capped, &reason).await {
            inc(&self.metrics.replies_rate_limited);
            warn!(
                turn_id = %item.turn_id,
                phone = %mask(&item.conv.phone),
                cap = self.max_replies_per_hour,
                "reply not sent: the conversation reached its replies per hour; listed in GET /api/outbox as rate_limited"
            );
        }
    }

    /// Gives up, without an attempt and with `reason`, every live piece of
    /// `convs`; the first piece of each reply so given up (to count and log).
    async fn give_up_unsent<'a>(
        &self,
        items: &'a [OutboxItem],
        convs: &HashSet<Conv>,
        reason: &str,
    ) -> Vec<&'a OutboxItem> {
        let (mut replies, mut first) = (HashSet::new(), Vec::new());
        for item in items.iter().filter(|i| !i.failed && convs.contains(&i.conv)) {
            let given_up = OutboxItem { failed: true, last_error: Some(reason.to_owned()), ..item.clone() };
            if let Err(e) = self.store.outbox_update(&given_up).await {
                error!(error = %e, "cannot hold back a reply in the outbox");
                continue;
            }
            if replies.insert(&item.turn_id) {
                first.push(item);
            }
        }
        first
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
