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
use crate::delivery::{self, Deliveries};
use crate::gateway::{refusal_of, Delivery, Gateway, GatewayError, Refusal};
use crate::message::{mask, Conv};
use crate::metrics::{inc, Metrics};
use crate::store::{OutboxItem, Store};

/// Sends in flight at once (across conversations).
const MAX_PARALLEL: usize = 16;

/// The reply cap counts the replies sent in this window.
const CAP_WINDOW: Duration = Duration::from_secs(3600);

/// What became of a reply piece, as `GET /api/outbox` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxState {
    /// Waiting for the gateway, maybe backing off.
    Pending,
    /// Held back while staff have taken the conversation over.
    Suppressed,
    /// Parked: the client's 24-hour window is closed…
    OutsideWindow,
    /// …and the re-engagement template went: it waits for the client's answer.
    AwaitingClient,
    /// WhatsApp said it cannot be delivered.
    Undeliverable,
    /// Parked by the reply cap.
    RateLimited,
    /// Given up after `gateway.max_attempts`.
    Failed,
}

impl OutboxState {
    /// Of a stored piece. A parked piece is one given up without a single
    /// attempt — a failed send always counts one — or with the reason its
    /// `last_error` starts with, so the state needs no field of its own on disk.
    pub fn of(item: &OutboxItem) -> OutboxState {
        if !item.failed {
            return OutboxState::Pending;
        }
        let parked = [
            (SUPPRESSED, OutboxState::Suppressed),
            (delivery::OUTSIDE_WINDOW, OutboxState::OutsideWindow),
            (delivery::AWAITING_CLIENT, OutboxState::AwaitingClient),
            (delivery::UNDELIVERABLE, OutboxState::Undeliverable),
        ];
        let reason = item.last_error.as_deref().unwrap_or("");
        match parked.iter().find(|(prefix, _)| reason.starts_with(prefix)) {
            Some((_, state)) => *state,
            None if item.attempts == 0 => OutboxState::RateLimited,
            None => OutboxState::Failed,
        }
    }

    /// Its name in the API's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Suppressed => "suppressed",
            OutboxState::OutsideWindow => "outside_window",
            OutboxState::AwaitingClient => "awaiting_client",
            OutboxState::Undeliverable => "undeliverable",
            OutboxState::RateLimited => "rate_limited",
            OutboxState::Failed => "failed",
        }
    }
}

/// How a reply held back by a human takeover starts its `last_error`.
const SUPPRESSED: &str = "suppressed:";

pub struct Outbox {
    store: Store,
    gateway: Arc<Gateway>,
    deliveries: Arc<Deliveries>,
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
        deliveries: Arc<Deliveries>,
        metrics: Arc<Metrics>,
    ) -> Outbox {
        Outbox {
            wake: store.outbox_ready(),
            deliveries,
            store,
            metrics,
            gateway,
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
            // Meta's 24-hour window: a reply past it is refused, so it is
            // never tried — parked, or a template asks the client back.
            let now_ms = self.deliveries.now_ms();
            self.reopen(&items, now_ms).await;
            let closed: HashSet<Conv> = heads
                .iter()
                .filter(|i| !taken.contains(&i.conv) && !self.deliveries.window_open(&i.conv, now_ms))
                .map(|i| i.conv.clone())
                .collect();
            for conv in &closed {
                self.window_closed(&items, conv).await;
            }
            let capped: HashSet<Conv> = capped.union(&taken).chain(closed.iter()).cloned().collect();
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
                    Ok(id) => {
                        inc(&self.metrics.replies_sent);
                        if item.part == 1 {
                            sent.entry(item.conv.clone()).or_default().push_back(Instant::now());
                        }
                        info!(part = item.part, parts = item.parts, "reply sent");
                        if let Some(id) = id {
                            self.metrics.receipt("sent");
                            let receipt = crate::store::Receipt::sent(
                                id,
                                &item,
                                item.attempts + 1,
                                crate::message::unix_ms(),
                            );
                            if let Err(e) = self.store.receipt_sent(receipt).await {
                                warn!(error = %e, "cannot keep the reply's receipt; its delivery will not be shown");
                            }
                        }
                        self.store.outbox_sent(item.seq).await
                    }
                    Err(GatewayError::Refused { code, title, .. })
                        if refusal_of(Some(code)) != Refusal::Retry =>
                    {
                        self.metrics.delivery_failure(Some(code));
                        if refusal_of(Some(code)) == Refusal::OutsideWindow {
                            // Next round: parked, or the template.
                            self.deliveries.close_window(&item.conv);
                            info!(code, "WhatsApp says the 24-hour window is closed");
                            continue;
                        }
                        error!(code, title = %title, "WhatsApp cannot deliver to this number; reply parked");
                        item.attempts += 1;
                        item.failed = true;
                        item.last_error = Some(format!(
                            "{} WhatsApp cannot deliver to this number (code {code}): {title}",
                            delivery::UNDELIVERABLE
                        ));
                        self.store.outbox_update(&item).await
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

    /// Pieces that waited for the client's answer go out once the client
    /// wrote (the window is open again).
    async fn reopen(&self, items: &[OutboxItem], now_ms: u64) {
        for item in items.iter().filter(|i| OutboxState::of(i) == OutboxState::AwaitingClient) {
            if self.deliveries.window_open(&item.conv, now_ms) {
                let again = OutboxItem { failed: false, attempts: 0, last_error: None, ..item.clone() };
                match self.store.outbox_update(&again).await {
                    Ok(()) => {
                        info!(turn_id = %item.turn_id, phone = %mask(&item.conv.phone), "the client wrote again: the waiting reply goes out")
                    }
                    Err(e) => error!(error = %e, "cannot put a waiting reply back in line"),
                }
            }
        }
    }

    /// The window of `conv` is closed: the template goes once, and its
    /// pieces wait for the client's answer; without a template, they are parked.
    async fn window_closed(&self, items: &[OutboxItem], conv: &Conv) {
        // One template a day at most: if one went already, the pieces wait
        // for the answer to it.
        let template = self.gateway.has_template()
            && if self.deliveries.take_template(conv, self.deliveries.now_ms()) {
                match self.gateway.send_template(conv).await {
                    Ok(_) => {
                        info!(phone = %mask(&conv.phone), "the 24-hour window closed: re-engagement template sent");
                        true
                    }
                    Err(e) => {
                        self.deliveries.untake_template(conv);
                        warn!(phone = %mask(&conv.phone), error = %e, "the re-engagement template was refused");
                        false
                    }
                }
            } else {
                true
            };
        let reason = if template {
            format!("{} the 24-hour window closed; the re-engagement template went, the reply waits for the client's answer", delivery::AWAITING_CLIENT)
        } else {
            format!(
                "{} more than the window (gateway.window_hours) since the client last wrote; not sent",
                delivery::OUTSIDE_WINDOW
            )
        };
        let convs = HashSet::from([conv.clone()]);
        for item in self.give_up_unsent(items, &convs, &reason).await {
            warn!(turn_id = %item.turn_id, phone = %mask(&item.conv.phone), "reply not sent: outside the 24-hour window; listed in GET /api/outbox");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Conv;

    fn item(failed: bool, attempts: u32, last_error: Option<&str>) -> OutboxItem {
        OutboxItem {
            seq: 1,
            turn_id: "t1".into(),
            conv: Conv { phone: "79001234567".into(), company_id: "default".into() },
            text: "Записала вас".into(),
            part: 1,
            parts: 1,
            created_at_ms: 0,
            attempts,
            last_error: last_error.map(str::to_owned),
            failed,
        }
    }

    /// The state comes from what is stored (no field of its own), and its
    /// name is what `GET /api/outbox` has always shown.
    #[test]
    fn a_pieces_state_is_read_from_what_is_stored_under_the_apis_names() {
        let cases = [
            (item(false, 3, Some("gateway answered 502")), "pending"),
            (item(true, 0, Some("suppressed: staff took the conversation over")), "suppressed"),
            (item(true, 0, Some("outside_window: the client wrote 26 h ago")), "outside_window"),
            (item(true, 0, Some("awaiting_client: a template is needed")), "awaiting_client"),
            (item(true, 1, Some("undeliverable: 131026")), "undeliverable"),
            (item(true, 0, Some("the reply cap: 20 this hour")), "rate_limited"),
            (item(true, 5, Some("gateway answered 400")), "failed"),
        ];
        for (item, name) in cases {
            assert_eq!(OutboxState::of(&item).as_str(), name, "{:?}", item.last_error);
        }
    }
}
