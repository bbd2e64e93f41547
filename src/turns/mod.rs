//! Turns: the gate that keeps one turn per conversation in flight, the one
//! task that drives the batcher's and the gate's timers (`driver`), and the
//! life of a single turn from record to commit (`run`).
//!
//! Only this module commits turns. The batcher's and gate's state is memory
//! only and is rebuilt from the store's pending messages and open turns on start.

mod driver;
pub mod gate;
mod run;
pub mod schedule;

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use serde_json::Value;

use crate::batcher::CutReason;
use crate::message::Conv;
use crate::store::{Announce, ContextMeta, TurnRecord};

pub use driver::Driver;
pub use run::{Runner, Stopping};

use std::sync::Arc;

use crate::clock::Clock;
use crate::metrics::Metrics;

/// What every task of one daemon shares: its clock, its metrics, the
/// console's feed, and the two stages of stopping.
#[derive(Clone, Default)]
pub struct Shared {
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    pub feed: Arc<crate::feed::Feed>,
    pub stopping: Stopping,
}

/// The driver's channel, made before the driver so the HTTP side can hold a
/// handle while recovery runs.
pub fn channel() -> (DriverHandle, DriverReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (DriverHandle { tx: tx.clone() }, DriverReceiver { rx, tx })
}

pub struct DriverReceiver {
    rx: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::UnboundedSender<Event>,
}

/// What the gate hands to a turn.
#[derive(Debug)]
pub enum Work {
    /// A batch just cut: its messages are still only pending.
    /// `cut_at`: when the driver cut it (the console's cut lag and queue wait).
    /// `supersedes`: turns restarted into this one (their claims go once it is claimed).
    Fresh {
        seqs: Vec<u64>,
        reason: CutReason,
        deadline: Instant,
        cut_at: Instant,
        max_messages: usize,
        supersedes: Vec<String>,
    },
    /// A turn already recorded on disk: recovered after a restart, or a dead
    /// turn being retried. It keeps its turn_id and messages.
    Resume(Box<TurnRecord>),
    /// A write to the conversation's context from the context API. It takes
    /// the conversation's turn slot, so it never interleaves with a turn.
    Context(ContextJob),
}

/// A context write requested over the API, and where to report it.
#[derive(Debug)]
pub struct ContextJob {
    pub op: ContextOp,
    pub reply: oneshot::Sender<ContextOutcome>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ContextOp {
    /// Replace both parts (`None` removes a part).
    Put { dialogue: Option<Value>, cache: Option<Value> },
    /// Drop the cache, keep the dialogue.
    Invalidate,
    /// Drop both parts.
    Delete,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ContextOutcome {
    /// The write is on disk; the meta after it (`None`: no context left).
    Done {
        before: Option<ContextMeta>,
        after: Option<ContextMeta>,
    },
    Failed(String),
}

impl Work {
    /// The same work again, for a turn task that died without reporting;
    /// a context write (its caller waits on a channel) cannot be replayed.
    fn replay(&self) -> Option<Work> {
        match self {
            Work::Fresh { seqs, reason, deadline, cut_at, max_messages, supersedes } => Some(Work::Fresh {
                seqs: seqs.clone(),
                reason: *reason,
                deadline: *deadline,
                cut_at: *cut_at,
                max_messages: *max_messages,
                supersedes: supersedes.clone(),
            }),
            Work::Resume(turn) => Some(Work::Resume(turn.clone())),
            Work::Context(_) => None,
        }
    }
}

impl gate::Merge for Work {
    /// Context writes go ahead of batches still waiting: they wait only for
    /// the running turn, and the next turn sees them (a booking change
    /// invalidates the cache before the client's next turn reads it).
    fn urgent(&self) -> bool {
        matches!(self, Work::Context(_))
    }

    fn fill_from(&mut self, next: &mut Work) -> bool {
        let (
            Work::Fresh { seqs, max_messages, supersedes, .. },
            Work::Fresh { seqs: more, supersedes: replaced, .. },
        ) = (self, next)
        else {
            return false;
        };
        let take = max_messages.saturating_sub(seqs.len()).min(more.len());
        if take > 0 {
            seqs.extend(more.drain(..take));
            // A replaced turn whose messages are now in both keeps being
            // replaced by both: dropping its claim twice is harmless.
            supersedes
                .extend(replaced.iter().filter(|id| !supersedes.contains(id)).cloned().collect::<Vec<_>>());
        }
        more.is_empty()
    }

    fn merge(&mut self, next: Work) -> Option<Work> {
        match (self, next) {
            (
                Work::Fresh { seqs, max_messages, supersedes, .. },
                Work::Fresh { seqs: more, supersedes: replaced, .. },
            ) if seqs.len() + more.len() <= *max_messages => {
                seqs.extend(more);
                seqs.sort_unstable();
                supersedes.extend(replaced);
                None
            }
            (_, next) => Some(next),
        }
    }
}

/// How the work a turn task was given ended. Every way out of a turn task
/// is one of these, reported to the driver, so no failure ends in a log
/// line alone.
#[derive(Debug)]
pub enum Outcome {
    /// Committed (or a context write answered, or a cut batch that had
    /// nothing left): the conversation's next work may start.
    Done,
    /// Parked as dead after its last attempt; the conversation goes on.
    Parked,
    /// The store could not record, read or commit it: the work goes back to
    /// the front of the conversation's queue and is retried after a backoff.
    Failed { work: Work, error: String },
    /// Cut short by shutdown; it stays open on disk for the next start.
    Abandoned,
    /// Abandoned for a re-run with the messages that came meanwhile
    /// (`turns.on_new_message = "restart"`): its messages, the turn it was,
    /// and why it had been cut.
    Restarted { seqs: Vec<u64>, turn_id: String, reason: CutReason },
}

/// Events the driver reacts to, besides its own timers.
pub(crate) enum Event {
    /// Messages are durably stored (told by the store's writer, a group at a time).
    Ingested(Vec<Announce>),
    /// The running work of `conv` ended.
    Finished {
        conv: Conv,
        outcome: Outcome,
    },
    /// Re-run a dead turn.
    Retry {
        turn_id: String,
        reply: oneshot::Sender<RetryOutcome>,
    },
    /// A dead turn was marked open again on disk (queue it), or why not.
    Reopened {
        turn_id: String,
        result: Result<Box<TurnRecord>, RetryOutcome>,
        reply: oneshot::Sender<RetryOutcome>,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    /// One page of the console's pending list, and counts.
    View {
        offset: usize,
        limit: usize,
        reply: oneshot::Sender<View>,
    },
    /// A client's presence, from a gateway.
    Presence {
        conv: Conv,
        presence: crate::message::Presence,
    },
    /// A context write from the API.
    Context {
        conv: Conv,
        job: ContextJob,
    },
    /// Staff took the conversation over (or wrote again): paused until
    /// `resume_at_ms` (Unix ms; `None`: until resumed).
    Takeover {
        conv: Conv,
        resume_at_ms: Option<u64>,
    },
    /// The assistant takes the conversation back now.
    Resume {
        conv: Conv,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    Queued,
    NotFound,
    NotDead,
    Failed(String),
}

/// The driver's memory, for `GET /api/batches`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub now: Instant,
    /// Collecting messages, the next cut first, each with the rule that cuts it.
    pub collecting: Vec<crate::batcher::PendingView<Conv>>,
    /// Cut, waiting for the conversation's running turn or a free slot.
    pub waiting: Vec<(Conv, Vec<u64>)>,
    pub running: Vec<Conv>,
    /// Conversations staff took over.
    pub paused: Vec<Hold>,
}

/// A conversation staff took over, as the driver holds it.
#[derive(Debug, Clone)]
pub struct Hold {
    pub conv: Conv,
    pub resume_at: Option<Instant>,
    /// Client messages cut and held meanwhile.
    pub messages: usize,
    /// When the oldest of them came (about).
    pub since: Option<Instant>,
}

/// What the console shows of the driver's memory: one page of the pending
/// batches in cut order (built from the page alone, however many are
/// pending), the work waiting behind running turns, and the counts.
#[derive(Debug, Clone)]
pub struct View {
    pub now: Instant,
    /// Batches collecting messages, and the messages in them.
    pub collecting: (usize, usize),
    pub page: Vec<crate::batcher::PendingView<Conv>>,
    /// Work queued behind a running turn or a free slot: the first
    /// `WAITING_SHOWN` (conversation, messages, what), and how many in all.
    pub waiting: Vec<(Conv, usize, &'static str)>,
    pub waiting_total: usize,
    pub running: usize,
    pub paused: Vec<Hold>,
}

/// Waiting work listed in a `View` (the rest is counted).
pub const WAITING_SHOWN: usize = 100;

/// How other tasks talk to the driver. Cheap to clone.
#[derive(Clone)]
pub struct DriverHandle {
    tx: mpsc::UnboundedSender<Event>,
}

impl DriverHandle {
    /// Tells the driver messages are on disk (the driver stamps their
    /// arrival on its own clock). Returns false once the driver has stopped:
    /// the messages stay pending on disk for the next start.
    pub fn ingested(&self, stored: Vec<Announce>) -> bool {
        self.tx.send(Event::Ingested(stored)).is_ok()
    }

    pub async fn retry(&self, turn_id: String) -> RetryOutcome {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Event::Retry { turn_id, reply }).is_err() {
            return RetryOutcome::Failed("shutting down".into());
        }
        rx.await.unwrap_or(RetryOutcome::Failed("shutting down".into()))
    }

    /// Applies a context write once no turn of `conv` is running; resolves
    /// when it is on disk.
    pub async fn context(&self, conv: Conv, op: ContextOp) -> ContextOutcome {
        let (reply, rx) = oneshot::channel();
        let job = ContextJob { op, reply };
        if self.tx.send(Event::Context { conv, job }).is_err() {
            return ContextOutcome::Failed("shutting down".into());
        }
        rx.await.unwrap_or(ContextOutcome::Failed("shutting down".into()))
    }

    /// Staff took `conv` over; no turn of it starts until `resume_at_ms`.
    pub fn takeover(&self, conv: Conv, resume_at_ms: Option<u64>) {
        let _ = self.tx.send(Event::Takeover { conv, resume_at_ms });
    }

    /// The assistant takes `conv` back: what waited becomes a turn.
    pub fn resume(&self, conv: Conv) {
        let _ = self.tx.send(Event::Resume { conv });
    }

    /// A client's presence: moves its pending batch's cut (adaptive policy only).
    pub fn presence(&self, conv: Conv, presence: crate::message::Presence) {
        let _ = self.tx.send(Event::Presence { conv, presence });
    }

    pub async fn view(&self, offset: usize, limit: usize) -> Option<View> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Event::View { offset, limit, reply }).ok()?;
        rx.await.ok()
    }

    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Event::Snapshot { reply }).ok()?;
        rx.await.ok()
    }
}
