//! The store-writer thread: group commit.
//!
//! It blocks for the first waiting write, takes every other one already
//! queued, and handles them as one group: the message-log part (accepted
//! messages, turn claims) is appended with one `write` and one `fdatasync`,
//! then announced and answered; the sled part (commits, dead turns,
//! contexts, outbox, sweeps) is applied in one transaction and answered
//! once applied — or, for writes that promise durability, once the syncer
//! has synced it. A group grows with load: the longer a group takes, the
//! more is waiting for the next.
//!
//! Only this thread writes: dedup is exact (a duplicate inside the same
//! group is a duplicate) and reads inside the transaction see the group's
//! earlier writes.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use super::contexts::{self, TxResult};
use super::dedup::{self, IdHash, IdSet};
use super::durable::Syncer;
use super::generation::{self, Noted, Rewrite};
use super::log::{self, Head};
use super::parts::Which;
use super::records::{conv_prefix, encode, seq_key};
use super::{
    lock, Announce, Commit, ContextMeta, ContextUpdate, Inserted, OpenClaim, OutboxItem, Pending, Reply,
    Segment, Shared, StoreError, Swept, Trees, TurnRecord,
};
use crate::message::Urgency;
use crate::message::{unix_ms, Conv, Message, NewMessage};

/// Sled is synced at least this often while it has unsynced writes (and at
/// once when a write waits for durability).
pub(crate) const SYNC_EVERY: Duration = Duration::from_millis(20);
/// Most writes taken into one group.
const MAX_GROUP: usize = 4096;
/// Most records one sweep call removes, so a sweep never makes a long group.
const SWEEP_CHUNK: usize = 500;
/// How many `dedup` records one archive step moves: one chunk, one sync,
/// and a transaction short enough not to hold up the acknowledgements.
const ARCHIVE_CHUNK: usize = 4096;

pub(crate) enum Op {
    Accept {
        messages: Vec<NewMessage>,
        urgency: Urgency,
        reply: Reply<Vec<Inserted>>,
    },
    /// A probe record: can the log be written again?
    Probe {
        reply: Reply<()>,
    },
    /// `reply: None`: an attempt count, not waited for. `supersedes`: claims
    /// of restarted turns this one replaces (dropped from memory once it is
    /// written).
    Claim {
        claim: log::Claim,
        supersedes: Vec<String>,
        reply: Option<Reply<()>>,
    },
    Trees {
        write: TreeWrite,
        durable: bool,
        reply: Reply<Outcome>,
    },
    Sync {
        reply: Reply<()>,
    },
    /// Begin a consistent export: the cut of memory is sent back, and sled
    /// writes wait (the message log goes on) until `EndExport`.
    Export {
        cut: mpsc::Sender<Cut>,
    },
    EndExport,
    /// Rewrite sled's files now, whatever their size; answered with the new
    /// generation's number once it is current.
    Rewrite {
        reply: Reply<u64>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// Sled writes and syncs held while an export runs.
#[derive(Default)]
pub(crate) struct Deferred(Vec<(TreeWrite, bool, Reply<Outcome>)>, Vec<Reply<()>>);

/// What an export reads from memory, taken at the moment of its cut.
pub(crate) struct Cut {
    pub pending: Vec<Message>,
    pub claims: Vec<TurnRecord>,
    pub next_id: u64,
}

pub(crate) enum TreeWrite {
    Commit(Box<Commit>),
    Park(Box<TurnRecord>),
    PutTurn(Box<TurnRecord>),
    /// A dead turn open again (the record without `dead`).
    Reopen(Box<TurnRecord>),
    Retention {
        rules: super::Retention,
        from: Option<Vec<u8>>,
    },
    Context {
        conv: Conv,
        update: ContextUpdate,
        now_ms: u64,
    },
    OutboxSent(u64),
    OutboxUpdate(Box<OutboxItem>),
    ExpireDedup {
        cutoff_ms: u64,
    },
    /// Moves the `dedup` tree's records into the archive (archive.rs).
    ArchiveDedup,
    ExpireContexts {
        now_ms: u64,
    },
}

#[derive(Debug)]
pub(crate) enum Outcome {
    Done,
    Context(Option<ContextMeta>, Option<ContextMeta>),
    Count(usize),
    /// The sweep's report, and the metas it removed (for the counters).
    Swept(Swept, Vec<ContextMeta>),
    Expired(super::Expired),
}

pub(crate) struct Writer {
    pub rx: mpsc::Receiver<Op>,
    pub log_dir: std::path::PathBuf,
    pub head: Head,
    pub trees: Trees,
    pub shared: Arc<Shared>,
    pub syncer: Syncer,
    /// Every accepted id still remembered: pending in the log, or retired
    /// by a turn within the dedup window. Only this thread reads it.
    pub seen: IdSet,
    pub ids: Arc<super::ids::Ids>,
    /// Sled has writes no sync was asked for yet.
    pub dirty: bool,
    pub last_sync: Instant,
    /// Exports in progress: sled writes (and syncs asked for) wait in
    /// `deferred` meanwhile, so the trees an export reads do not move.
    pub exporting: usize,
    pub deferred: Deferred,
    /// The data directory (sled's files are in a generation of it).
    pub data_dir: std::path::PathBuf,
    pub options: super::Options,
    /// A rewrite of sled's files in progress (generation.rs).
    pub rewrite: Option<Rewrite>,
    /// sled's file size after the last rewrite (or at open).
    pub rewrite_base: u64,
    pub next_rewrite_check: Instant,
    /// Waiting for a rewrite asked for (`Op::Rewrite`).
    pub rewrite_waiters: Vec<Reply<u64>>,
    /// Dedup marks moved out of sled (archive.rs).
    pub archive: super::archive::Archive,
    /// How far sled's writes are sealed outside sled (damage.rs).
    pub seal: super::damage::Seal,
    /// The data directory's lock, held as long as this thread runs.
    pub _lock: std::fs::File,
}

/// What a retention sweep removes: dead turns' keys, outbox seqs, history
/// keys, and where the next history chunk starts.
#[derive(Default)]
struct Expiring(Vec<sled::IVec>, Vec<u64>, Vec<sled::IVec>, Option<Vec<u8>>);

/// A commit's history change: the records that go (over the bounds), and
/// the new one, encoded once (its size decides what goes).
#[derive(Default)]
struct HistoryWrite {
    drop: Vec<sled::IVec>,
    key: Vec<u8>,
    value: Vec<u8>,
}

/// A sled write, with what the writer worked out before the transaction.
struct Prepared {
    write: TreeWrite,
    /// Pending messages this write retires (commit or park), and their hashes.
    retire: Vec<(u64, IdHash)>,
    /// The `dedup` record that remembers them.
    dedup_record: Option<(Vec<u8>, Vec<u8>)>,
    /// Commit: what changes in the conversation's history.
    history: HistoryWrite,
    /// Dedup sweep or archive: the records to remove.
    expired: Vec<(sled::IVec, Vec<IdHash>)>,
    /// Dedup sweep: the archive files to delete, and their marks.
    expired_files: Vec<(u64, Vec<IdHash>)>,
    /// Context sweep: the index entries due.
    due: Vec<sled::IVec>,
    /// Retention: what to remove.
    expiring: Expiring,
    /// Context write: the parts put in files for it (`parts.rs`).
    spilled: contexts::Spilled,
    /// A damaged record met while preparing: the write fails with it.
    error: Option<StoreError>,
}

impl Writer {
    pub(crate) fn run(mut self) {
        loop {
            let first = if self.dirty || self.rewrite.is_some() || self.seal_wait().is_some() {
                let wait = match self.dirty {
                    true => SYNC_EVERY.saturating_sub(self.last_sync.elapsed()),
                    false if self.rewrite.is_some() => generation::REWRITE_TICK,
                    false => self.seal_wait().unwrap_or(generation::REWRITE_TICK),
                };
                match self.rx.recv_timeout(wait) {
                    Ok(op) => Some(op),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                super::durable::free_deferred();
                match self.rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                }
            };
            let mut group: Vec<Op> = first.into_iter().collect();
            while group.len() < MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(op) => group.push(op),
                    Err(_) => break,
                }
            }
            if let Some(close) = self.handle(group) {
                self.cancel_rewrite("the store closes");
                self.seal(true);
                let result = self.syncer.sync_now(&self.shared);
                self.syncer.stop();
                let _ = close.send(result);
                return;
            }
            self.tend_rewrite();
            self.seal(false);
        }
        // Every handle is gone: a last sync, then stop.
        self.cancel_rewrite("the store closes");
        self.seal(true);
        let _ = self.syncer.sync_now(&self.shared);
        self.syncer.stop();
    }

    /// Handles one group; returns the close request if there was one.
    fn handle(&mut self, group: Vec<Op>) -> Option<Reply<()>> {
        let (mut log_ops, mut tree_ops, mut syncs, mut close) = (Vec::new(), Vec::new(), Vec::new(), None);
        let (mut exports, mut ended) = (Vec::new(), 0);
        for op in group {
            match op {
                Op::Accept { .. } | Op::Claim { .. } | Op::Probe { .. } => log_ops.push(op),
                Op::Trees { write, durable, reply } => tree_ops.push((write, durable, reply)),
                Op::Sync { reply } => syncs.push(reply),
                Op::Export { cut } => exports.push(cut),
                Op::EndExport => ended += 1,
                Op::Rewrite { reply } => self.rewrite_waiters.push(reply),
                Op::Close { reply } => close = Some(reply),
            }
        }
        if self.exporting > 0 {
            // The trees must hold still for an export in progress.
            self.deferred.0.append(&mut tree_ops);
            self.deferred.1.append(&mut syncs);
        }
        self.exporting = self.exporting.saturating_sub(ended);
        if self.exporting == 0 && close.is_none() || close.is_some() {
            let Deferred(t, s) = std::mem::take(&mut self.deferred);
            tree_ops.splice(0..0, t);
            syncs.splice(0..0, s);
            if close.is_some() {
                self.exporting = 0;
            }
        }
        if !log_ops.is_empty() || !tree_ops.is_empty() {
            self.shared.stats.groups.fetch_add(1, Ordering::Relaxed);
        }
        self.write_log(log_ops);
        // A reply waits for a sync before it may be sent: sync at once.
        let replies =
            tree_ops.iter().any(|(w, _, _)| matches!(w, TreeWrite::Commit(c) if !c.outbox.is_empty()));
        let mut waiters = self.write_trees(tree_ops);
        waiters.extend(syncs.into_iter().map(|reply| -> super::durable::Waiter {
            Box::new(move |result: Result<(), StoreError>| {
                let _ = reply.send(result);
            })
        }));
        let due = self.dirty && (replies || self.last_sync.elapsed() >= SYNC_EVERY);
        if !waiters.is_empty() || due {
            self.syncer.request(&self.shared, waiters);
            self.dirty = false;
            self.last_sync = Instant::now();
        }
        // An export's cut: after everything of this group is applied.
        for cut in exports {
            let memory = lock(&self.shared.memory);
            let taken = Cut {
                pending: memory.pending.values().map(|p| p.message.clone()).collect(),
                claims: memory
                    .claims
                    .values()
                    .map(|c| super::turn_of_claim(&c.claim, &memory.pending))
                    .collect(),
                next_id: self.ids.peek(),
            };
            drop(memory);
            if cut.send(taken).is_ok() {
                self.exporting += 1;
            }
        }
        close
    }

    pub(super) fn failed(&self) -> Option<Arc<str>> {
        lock(&self.shared.failed).clone()
    }

    /// Accepted messages and claims: one append, one `fdatasync`.
    fn write_log(&mut self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        if let Some(reason) = self.failed() {
            for op in ops {
                refuse(op, || StoreError::Failed(reason.clone()));
            }
            return;
        }
        let sink = self.shared.sink.read().unwrap_or_else(|p| p.into_inner()).clone();
        let now = unix_ms();
        let mut buf = Vec::new();
        let mut fresh: Vec<IdHash> = Vec::new();
        let mut stored: Vec<Message> = Vec::new();
        let mut claims: Vec<log::Claim> = Vec::new();
        let mut superseded: Vec<String> = Vec::new();
        let mut answers: Vec<(Reply<Vec<Inserted>>, Vec<Inserted>, Urgency)> = Vec::new();
        let mut claim_replies: Vec<Reply<()>> = Vec::new();
        for op in ops {
            match op {
                Op::Accept { messages, urgency, reply } => {
                    if sink.is_none() {
                        let _ = reply.send(Err(StoreError::NotAccepting("the turn pipeline is not running")));
                        continue;
                    }
                    let mut out = Vec::with_capacity(messages.len());
                    for new in messages {
                        let hash = dedup::id_hash(&new.id);
                        if !self.seen.insert(hash) {
                            out.push(Inserted::Duplicate);
                            continue;
                        }
                        fresh.push(hash);
                        let seq = match self.ids.next() {
                            Ok(id) => id,
                            Err(e) => {
                                let reason = self.shared.fail(&format!("cannot number a message: {e}"));
                                for h in fresh.drain(..) {
                                    self.seen.remove(&h);
                                }
                                let _ = reply.send(Err(StoreError::Failed(reason)));
                                return;
                            }
                        };
                        let message = Message::from_new(seq, new);
                        log::frame_message(&message, &mut buf);
                        out.push(Inserted::New(message.clone()));
                        stored.push(message);
                    }
                    answers.push((reply, out, urgency));
                }
                Op::Probe { reply } => {
                    log::frame_probe(&mut buf);
                    claim_replies.push(reply);
                }
                Op::Claim { claim, supersedes, reply } => {
                    if self.claim_is_live(&claim) {
                        log::frame_claim(&claim, &mut buf);
                        claims.push(claim);
                        superseded.extend(supersedes);
                    }
                    claim_replies.extend(reply);
                }
                _ => unreachable!("only log writes here"),
            }
        }
        if !buf.is_empty() {
            if let Err(e) = self.roll_if_due() {
                let reason: Arc<str> = Arc::from(format!("cannot start a new log segment: {e}"));
                self.undo(&fresh, answers, claim_replies, || StoreError::Write(reason.clone()));
                return;
            }
            match self.head.append(&buf, self.shared.faults.log_write()) {
                Ok(()) => {
                    self.shared.stats.synced(&self.shared.stats.log_syncs);
                    *lock(&self.shared.trouble) = None;
                }
                Err(failed) => {
                    let path = log::segment_path(&self.log_dir, self.head.no);
                    let reason: Arc<str> = Arc::from(format!("{}: {}", path.display(), failed.error));
                    *lock(&self.shared.trouble) = Some(reason.clone());
                    if failed.rolled_back {
                        tracing::warn!(error = %reason, "message log write failed and was undone; senders get 503");
                        self.undo(&fresh, answers, claim_replies, || StoreError::Write(reason.clone()));
                    } else {
                        let reason =
                            self.shared.fail(&format!("message log write failed, undo failed too: {reason}"));
                        self.undo(&fresh, answers, claim_replies, || StoreError::Failed(reason.clone()));
                    }
                    return;
                }
            }
        }
        {
            let mut memory = lock(&self.shared.memory);
            let head = self.head.no;
            let added = (stored.len() + claims.len()) as u64;
            if added > 0 {
                memory.segments.entry(head).or_insert(Segment { live: 0, created_ms: now }).live += added;
            }
            self.shared.stats.stored.fetch_add(stored.len() as u64, Ordering::Relaxed);
            for message in stored {
                let seq = message.seq;
                let old = memory.pending.insert(seq, Pending { message, seg: head });
                debug_assert!(old.is_none(), "sequence number {seq} handed out twice");
            }
            for claim in claims {
                let entry = memory
                    .claims
                    .entry(claim.turn_id.clone())
                    .or_insert_with(|| OpenClaim { claim: claim.clone(), segs: Vec::new() });
                entry.claim = claim;
                entry.segs.push(head);
            }
        }
        // The replacing claims are synced: the replaced ones stop holding their segments.
        let released: Vec<u64> = {
            let mut memory = lock(&self.shared.memory);
            superseded.iter().filter_map(|id| memory.claims.remove(id)).flat_map(|c| c.segs).collect()
        };
        super::durable::count_down(&self.shared, &self.log_dir, &released);
        // Announced before answered, the whole group at once: an "accepted"
        // message is always known to the pipeline, whatever happens to the
        // request afterwards.
        let announced: Vec<Announce> = answers
            .iter()
            .flat_map(|(_, out, urgency)| {
                out.iter().filter_map(move |i| match i {
                    Inserted::New(m) => Some(Announce {
                        conv: m.conv.clone(),
                        seq: m.seq,
                        urgency: *urgency,
                        shape: crate::message::Shape::of(&m.text),
                    }),
                    Inserted::Duplicate => None,
                })
            })
            .collect();
        let heard = announced.is_empty() || sink.as_ref().is_some_and(|sink| sink(announced));
        for (reply, out, _) in answers {
            // Nobody listens (stopping): the messages are on disk and the
            // next start batches them; the sender is told to retry.
            let answer = if heard { Ok(out) } else { Err(StoreError::NotAccepting("shutting down")) };
            let _ = reply.send(answer);
        }
        for reply in claim_replies {
            let _ = reply.send(Ok(()));
        }
    }

    /// A claim is written only for a turn whose messages are still pending
    /// (an attempt count that arrives after its commit is dropped).
    fn claim_is_live(&self, claim: &log::Claim) -> bool {
        let memory = lock(&self.shared.memory);
        claim.seqs.iter().all(|s| memory.pending.contains_key(s))
    }

    /// A failed log write: forget the group's ids and tell every sender.
    fn undo(
        &mut self,
        fresh: &[IdHash],
        answers: Vec<(Reply<Vec<Inserted>>, Vec<Inserted>, Urgency)>,
        claims: Vec<Reply<()>>,
        error: impl Fn() -> StoreError,
    ) {
        for h in fresh {
            self.seen.remove(h);
        }
        for (reply, _, _) in answers {
            let _ = reply.send(Err(error()));
        }
        for reply in claims {
            let _ = reply.send(Err(error()));
        }
    }

    /// Starts a new segment when the head is full, or when it holds nothing
    /// live and has grown past the idle size (an idle daemon's log shrinks).
    fn roll_if_due(&mut self) -> std::io::Result<()> {
        let idle = {
            let memory = lock(&self.shared.memory);
            memory.segments.get(&self.head.no).is_none_or(|s| s.live == 0)
        };
        if self.head.len < log::ROLL_BYTES && !(idle && self.head.len >= log::ROLL_IDLE_BYTES) {
            return Ok(());
        }
        let next = Head::create(&self.log_dir, self.head.no + 1)?;
        self.shared.stats.other_syncs.fetch_add(1, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.head, next);
        let mut memory = lock(&self.shared.memory);
        memory.head = self.head.no;
        // A closed segment with nothing live goes now; others when retired.
        if memory.segments.get(&old.no).is_none_or(|s| s.live == 0) {
            memory.segments.remove(&old.no);
            let _ = std::fs::remove_file(log::segment_path(&self.log_dir, old.no));
        }
        Ok(())
    }

    /// Sled writes: one transaction; returns the waiters for durability.
    fn write_trees(&mut self, ops: Vec<(TreeWrite, bool, Reply<Outcome>)>) -> Vec<super::durable::Waiter> {
        let mut waiters = Vec::new();
        if ops.is_empty() {
            return waiters;
        }
        if let Some(reason) = self.failed() {
            for (_, _, reply) in ops {
                let _ = reply.send(Err(StoreError::Failed(reason.clone())));
            }
            return waiters;
        }
        let now = unix_ms();
        let mut prepared = Vec::with_capacity(ops.len());
        let mut replies = Vec::with_capacity(ops.len());
        for (write, durable, reply) in ops {
            prepared.push(self.prepare(write, now));
            replies.push((durable, reply));
        }
        // The new part files' directory entries, before anything refers to them.
        if prepared.iter().any(|p| p.spilled.files().next().is_some()) {
            if let Err(e) = self.shared.parts.sync_dir() {
                for p in prepared.iter_mut().filter(|p| p.spilled.files().next().is_some()) {
                    p.error = Some(StoreError::Write(Arc::from(e.to_string())));
                }
            }
        }
        let spilled: Vec<u64> = prepared.iter().flat_map(|p| p.spilled.files()).collect();
        let all = self.trees.all();
        // A rewrite in progress copies again every key written meanwhile.
        let noting = self.rewrite.is_some();
        let noted = std::cell::RefCell::new(Vec::new());
        let applied = all[..10].transaction(|views: &Vec<TransactionalTree>| {
            noted.borrow_mut().clear();
            let views: Vec<Noted<'_>> = views
                .iter()
                .enumerate()
                .map(|(no, tree)| Noted { tree, no: no as u8, noted: noting.then_some(&noted) })
                .collect();
            let v = Views::of(&views);
            let mut outcomes = Vec::with_capacity(prepared.len());
            for p in &prepared {
                let mut dropped = Vec::new();
                let outcome = apply(&v, p, &mut dropped)?;
                outcomes.push(outcome.map(|o| (o, dropped)));
            }
            Ok::<_, ConflictableTransactionError<()>>(outcomes)
        });
        let outcomes = match applied {
            Ok(outcomes) => outcomes,
            Err(e) => {
                self.shared.parts.remove(&spilled);
                let reason = self.shared.fail(&format!("sled transaction failed: {e:?}"));
                for (_, reply) in replies {
                    let _ = reply.send(Err(StoreError::Failed(reason.clone())));
                }
                return waiters;
            }
        };
        if let Some(rewrite) = self.rewrite.as_mut() {
            rewrite.touched.extend(noted.into_inner());
        }
        let epoch = self.shared.applied_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.dirty = true;
        let mut retired_segs = Vec::new();
        let mut outbox_max = 0;
        let mut unreferenced = Vec::new();
        for ((p, outcome), (durable, reply)) in prepared.into_iter().zip(outcomes).zip(replies) {
            let outcome = match outcome {
                Ok((outcome, dropped)) => {
                    unreferenced.extend(dropped);
                    outcome
                }
                Err(e) => {
                    // Nothing refers to the files it wrote.
                    self.shared.parts.remove(&p.spilled.files().collect::<Vec<_>>());
                    let _ = reply.send(Err(e));
                    continue;
                }
            };
            self.after(&p, &outcome, &mut retired_segs, &mut outbox_max);
            if durable {
                waiters.push(Box::new(move |result: Result<(), StoreError>| {
                    let _ = reply.send(result.map(|_| outcome));
                }));
            } else {
                let _ = reply.send(Ok(outcome));
            }
        }
        self.syncer.note(epoch, retired_segs, outbox_max, unreferenced);
        waiters
    }

    /// What a write needs read before the transaction: which pending
    /// messages it retires, the history keys to trim, the sweep's due keys.
    fn prepare(&mut self, write: TreeWrite, now_ms: u64) -> Prepared {
        let mut p = Prepared {
            write,
            retire: Vec::new(),
            dedup_record: None,
            history: HistoryWrite::default(),
            expired: Vec::new(),
            expired_files: Vec::new(),
            due: Vec::new(),
            expiring: Default::default(),
            spilled: Default::default(),
            error: None,
        };
        match &mut p.write {
            TreeWrite::Commit(c) => {
                let key = conv_prefix(&c.turn.conv);
                self.spill(&key, &mut c.context, &mut p.spilled, &mut p.error);
            }
            TreeWrite::Context { conv, update, .. } => {
                self.spill(&conv_prefix(conv), update, &mut p.spilled, &mut p.error)
            }
            _ => {}
        }
        let fail = |e: sled::Error| Some(StoreError::Sled(e));
        match &p.write {
            TreeWrite::Commit(c) => {
                if self.shared.faults.commit() {
                    p.error = Some(StoreError::Write(Arc::from("commit failed (injected fault)")));
                }
                p.retire = self.retiring(&c.turn);
                // One turn of a conversation at a time: these keys cannot
                // change before the transaction.
                let prefix = conv_prefix(&c.turn.conv);
                p.history.value = encode(&c.summary);
                let sizes = self.trees.history.scan_prefix(&prefix).map(|kv| kv.map(|(k, v)| (k, v.len())));
                match sizes.collect::<Result<Vec<_>, _>>() {
                    Ok(existing) => {
                        p.history.drop =
                            trimmed(existing, p.history.value.len(), c.history_limit, c.history_max_bytes)
                    }
                    Err(e) => p.error = fail(e),
                }
                match self.ids.next() {
                    Ok(id) => p.history.key = seq_key(&c.turn.conv, id),
                    Err(e) => p.error = Some(e),
                }
            }
            TreeWrite::Park(turn) => p.retire = self.retiring(turn),
            TreeWrite::ExpireDedup { cutoff_ms } => {
                // Never forget an id whose message may still sit in a live
                // segment: a restart would take it for a new one.
                let oldest = lock(&self.shared.memory)
                    .segments
                    .values()
                    .filter(|s| s.live > 0)
                    .map(|s| s.created_ms)
                    .min();
                let cutoff = oldest.map_or(*cutoff_ms, |o| o.min(*cutoff_ms));
                match self.dedup_records(..cutoff.to_be_bytes().to_vec(), SWEEP_CHUNK) {
                    Ok(expired) => p.expired = expired,
                    Err(e) => p.error = Some(e),
                }
                match self.archive.expiring(cutoff) {
                    Ok(files) => p.expired_files = files,
                    Err(e) => p.error = Some(e),
                }
            }
            // The archive's file is synced as it is written, sled by the
            // syncer: a mark filed before its turn is synced would, after a
            // power cut, retire messages whose turn sled never kept. So sled
            // is synced first (once per archive step).
            TreeWrite::ArchiveDedup => match self
                .syncer
                .sync_now(&self.shared)
                .and_then(|()| self.dedup_records(.., ARCHIVE_CHUNK))
            {
                // The chunk is durable before the records leave sled.
                Ok(records) if !records.is_empty() => {
                    let newest = records.iter().map(|(k, _)| record_time(k)).max().expect("not empty");
                    let hashes: Vec<IdHash> = records.iter().flat_map(|(_, h)| h.iter().copied()).collect();
                    match self.archive.append(newest, &hashes) {
                        Ok(()) => p.expired = records,
                        Err(e) => {
                            p.error = Some(log::io_error(&self.data_dir.join(super::archive::DIR_NAME), e))
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => p.error = Some(e),
            },
            TreeWrite::ExpireContexts { now_ms } => {
                for kv in self.trees.ctx_expiry.range(..(now_ms + 1).to_be_bytes().to_vec()).take(SWEEP_CHUNK)
                {
                    match kv {
                        Ok((k, _)) => p.due.push(k),
                        Err(e) => {
                            p.error = fail(e);
                            break;
                        }
                    }
                }
            }
            TreeWrite::Retention { rules, from } => {
                if let Err(e) = self.prepare_retention(rules, from.as_deref(), &mut p.expiring) {
                    p.error = Some(e);
                }
            }
            _ => {}
        }
        if !p.retire.is_empty() {
            let hashes: Vec<IdHash> = p.retire.iter().map(|(_, h)| *h).collect();
            let mut key = now_ms.to_be_bytes().to_vec();
            key.extend_from_slice(&p.retire[0].0.to_be_bytes());
            p.dedup_record = Some((key, dedup::pack(&hashes)));
        }
        p
    }

    /// Puts the parts of `update` larger than `parts::INLINE_MAX` in files
    /// of their own (synced; their directory entries are synced for the
    /// whole group by `write_trees`), leaving their bytes out of the update.
    fn spill(
        &self,
        key: &[u8],
        update: &mut ContextUpdate,
        spilled: &mut contexts::Spilled,
        error: &mut Option<StoreError>,
    ) {
        let files = &self.shared.parts;
        for (which, part, slot) in [
            (Which::Dialogue, &mut update.dialogue, &mut spilled.dialogue),
            (Which::Cache, &mut update.cache, &mut spilled.cache),
        ] {
            let super::Part::Set { bytes, .. } = part else { continue };
            if bytes.len() <= super::parts::INLINE_MAX || error.is_some() {
                continue;
            }
            match files.write(which, key, bytes) {
                Ok(loc) => {
                    *slot = Some(loc);
                    *bytes = Vec::new();
                }
                Err(e) => *error = Some(e),
            }
        }
        if error.is_some() {
            files.remove(&spilled.files().collect::<Vec<_>>());
            *spilled = Default::default();
        }
    }

    /// Finds what retention removes. Dead turns and given-up pieces are few
    /// (the `turns` tree holds only dead and re-opened turns; given-up
    /// pieces are found in memory); history is read a chunk at a time.
    fn prepare_retention(
        &self,
        rules: &super::Retention,
        from: Option<&[u8]>,
        out: &mut Expiring,
    ) -> Result<(), StoreError> {
        for kv in self.trees.turns.iter() {
            let (k, v) = kv?;
            let turn: TurnRecord = super::records::decode("turns", &k, &v)?;
            if turn.dead.is_some_and(|d| d.died_at_ms < rules.dead_before) {
                out.0.push(k);
            }
        }
        out.1 = lock(&self.shared.outbox)
            .values()
            .filter(|i| i.failed && i.created_at_ms < rules.failed_before)
            .map(|i| i.seq)
            .collect();
        let start = match from {
            Some(key) => std::ops::Bound::Excluded(key.to_vec()),
            None => std::ops::Bound::Unbounded,
        };
        let mut last = None;
        for kv in
            self.trees.history.range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded)).take(SWEEP_CHUNK)
        {
            let (k, v) = kv?;
            let summary: super::TurnSummary = super::records::decode("history", &k, &v)?;
            if summary.committed_at_ms < rules.history_before {
                out.2.push(k.clone());
            }
            last = Some(k.to_vec());
        }
        out.3 = last;
        Ok(())
    }

    /// The turn's messages that are still pending in the log.
    fn retiring(&self, turn: &TurnRecord) -> Vec<(u64, IdHash)> {
        let memory = lock(&self.shared.memory);
        turn.messages
            .iter()
            .filter(|m| memory.pending.contains_key(&m.seq))
            .map(|m| (m.seq, dedup::id_hash(&m.id)))
            .collect()
    }

    /// Memory follows an applied write: retired messages and claims leave
    /// the pending state now; their segments count down once synced.
    fn after(&mut self, p: &Prepared, outcome: &Outcome, segs: &mut Vec<u64>, outbox_max: &mut u64) {
        let stats = &self.shared.context_stats;
        match (&p.write, outcome) {
            (TreeWrite::Commit(c), Outcome::Context(before, after)) => {
                stats.add(before.as_ref(), after.as_ref());
                self.retire(&c.turn.turn_id, &p.retire, segs);
                *outbox_max = c.outbox.iter().map(|o| o.seq).fold(*outbox_max, u64::max);
                lock(&self.shared.outbox).extend(c.outbox.iter().map(|o| (o.seq, o.clone())));
            }
            (TreeWrite::Park(turn), _) => {
                self.retire(&turn.turn_id, &p.retire, segs);
                self.shared.dead.fetch_add(1, Ordering::Relaxed);
            }
            (TreeWrite::Reopen(_), _) => {
                let _ =
                    self.shared.dead.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
            (TreeWrite::OutboxSent(seq), _) => {
                lock(&self.shared.outbox).remove(seq);
            }
            (TreeWrite::OutboxUpdate(item), _) => {
                lock(&self.shared.outbox).insert(item.seq, item.as_ref().clone());
            }
            (TreeWrite::Retention { .. }, Outcome::Expired(e)) => {
                let s = &self.shared.stats;
                s.expired_dead.fetch_add(e.dead as u64, Ordering::Relaxed);
                s.expired_failed.fetch_add(e.failed as u64, Ordering::Relaxed);
                s.expired_history.fetch_add(e.history as u64, Ordering::Relaxed);
                let _ = self
                    .shared
                    .dead
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(e.dead as u64));
                let mut outbox = lock(&self.shared.outbox);
                for seq in &p.expiring.1 {
                    outbox.remove(seq);
                }
            }
            (TreeWrite::Context { update, now_ms, .. }, Outcome::Context(before, after)) => {
                stats.add(before.as_ref(), after.as_ref());
                let had_cache =
                    before.as_ref().is_some_and(|m| m.cache.is_some() && m.expires_at_ms > *now_ms);
                if matches!(update.cache, super::Part::Clear) && had_cache {
                    stats.invalidations.fetch_add(1, Ordering::Relaxed);
                }
            }
            (TreeWrite::ExpireContexts { .. }, Outcome::Swept(_, gone)) => {
                for meta in gone {
                    stats.add(Some(meta), None);
                }
            }
            (TreeWrite::ExpireDedup { .. }, _) => {
                let sled = p.expired.iter().map(|(_, h)| h);
                for hashes in sled.chain(p.expired_files.iter().map(|(_, h)| h)) {
                    for h in hashes {
                        self.seen.remove(h);
                    }
                }
                self.archive.remove(&p.expired_files.iter().map(|(no, _)| *no).collect::<Vec<_>>());
            }
            _ => {}
        }
    }

    /// The first `limit` `dedup` records in `range`, with their hashes.
    fn dedup_records(
        &self,
        range: impl std::ops::RangeBounds<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<(sled::IVec, Vec<IdHash>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.trees.dedup.range(range).take(limit) {
            let (k, v) = kv?;
            let hashes = dedup::unpack_record(&k, &v)?;
            out.push((k, hashes));
        }
        Ok(out)
    }

    fn retire(&mut self, turn_id: &str, retire: &[(u64, IdHash)], segs: &mut Vec<u64>) {
        let mut memory = lock(&self.shared.memory);
        for (seq, _) in retire {
            if let Some(p) = memory.pending.remove(seq) {
                segs.push(p.seg);
            }
        }
        if let Some(claim) = memory.claims.remove(turn_id) {
            segs.extend(claim.segs);
        }
    }
}

/// When a `dedup` record's marks were retired: its key's first 8 bytes.
fn record_time(key: &[u8]) -> u64 {
    key.get(..8).map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

/// The same error again, for a transaction closure that may run twice.
fn again(e: &StoreError) -> StoreError {
    match e {
        StoreError::Corrupt { tree, key, reason } => {
            StoreError::Corrupt { tree, key: key.clone(), reason: reason.clone() }
        }
        other => StoreError::Write(Arc::from(other.to_string())),
    }
}

/// Answers a log write that will not be attempted.
fn refuse(op: Op, error: impl Fn() -> StoreError) {
    match op {
        Op::Accept { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Op::Claim { reply: Some(reply), .. } | Op::Probe { reply } => {
            let _ = reply.send(Err(error()));
        }
        _ => {}
    }
}

/// Which of a conversation's history records (oldest first, with their
/// sizes) go when one of `new_bytes` joins them: the oldest, until at most
/// `limit` turns and `max_bytes` remain — the new one always stays.
fn trimmed<K>(existing: Vec<(K, usize)>, new_bytes: usize, limit: usize, max_bytes: usize) -> Vec<K> {
    let (mut count, mut bytes) =
        (existing.len() + 1, new_bytes + existing.iter().map(|e| e.1).sum::<usize>());
    let mut gone = Vec::new();
    for (key, len) in existing {
        if count <= limit.max(1) && bytes <= max_bytes {
            break;
        }
        count -= 1;
        bytes -= len;
        gone.push(key);
    }
    gone
}

/// The transaction's trees by name.
struct Views<'a> {
    dedup: &'a Noted<'a>,
    turns: &'a Noted<'a>,
    history: &'a Noted<'a>,
    outbox: &'a Noted<'a>,
    ctx: contexts::Trees<'a>,
}

impl<'a> Views<'a> {
    fn of(v: &'a [Noted<'a>]) -> Views<'a> {
        Views {
            dedup: &v[0],
            turns: &v[1],
            history: &v[2],
            outbox: &v[3],
            ctx: contexts::Trees {
                meta: &v[4],
                dialogue: &v[5],
                cache: &v[6],
                expiry: &v[7],
                totals: &v[8],
                files: &v[9],
            },
        }
    }
}

/// Clears the damaged parts `damaged` (conversation key, part) in one
/// transaction, at the open before the writer runs: their files are gone
/// or wrong, so what they held is lost (the caller says so).
pub(super) fn clear_parts(
    trees: &Trees,
    damaged: &[(Vec<u8>, Which)],
    now_ms: u64,
) -> Result<(), StoreError> {
    let all = trees.all();
    let cleared = all[..10].transaction(|views: &Vec<TransactionalTree>| {
        let views: Vec<Noted<'_>> =
            views.iter().enumerate().map(|(no, tree)| Noted { tree, no: no as u8, noted: None }).collect();
        let v = Views::of(&views);
        for (key, which) in damaged {
            let part = |w: Which| if w == *which { super::Part::Clear } else { super::Part::Keep };
            let update = ContextUpdate {
                dialogue: part(Which::Dialogue),
                cache: part(Which::Cache),
                slide: false,
                ttl_ms: 0,
            };
            if let Err(e) = contexts::apply(&v.ctx, key, &update, &Default::default(), now_ms)? {
                return Err(ConflictableTransactionError::Abort(e));
            }
        }
        Ok(())
    });
    cleared.map_err(|e| match e {
        sled::transaction::TransactionError::Abort(e) => e,
        sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
    })
}

/// One prepared write inside the transaction. Reads and checks come before
/// writes, so a write that fails leaves nothing of itself behind.
fn apply(v: &Views<'_>, p: &Prepared, dropped: &mut Vec<u64>) -> TxResult<Outcome> {
    if let Some(e) = &p.error {
        return Ok(Err(again(e)));
    }
    let remember = |v: &Views<'_>| -> Result<(), sled::transaction::UnabortableTransactionError> {
        if let Some((k, val)) = &p.dedup_record {
            v.dedup.insert(k.as_slice(), val.as_slice())?;
        }
        Ok(())
    };
    match &p.write {
        TreeWrite::Commit(c) => {
            let key = conv_prefix(&c.turn.conv);
            let change = match contexts::apply(&v.ctx, &key, &c.context, &p.spilled, c.now_ms)? {
                Ok(change) => change,
                Err(e) => return Ok(Err(e)),
            };
            dropped.extend(change.dropped);
            remember(v)?;
            for item in &c.outbox {
                v.outbox.insert(item.seq.to_be_bytes(), encode(item))?;
            }
            v.turns.remove(c.turn.turn_id.as_bytes())?;
            for old in &p.history.drop {
                v.history.remove(old)?;
            }
            v.history.insert(p.history.key.as_slice(), p.history.value.as_slice())?;
            Ok(Ok(Outcome::Context(change.before, change.after)))
        }
        TreeWrite::Park(turn) => {
            remember(v)?;
            v.turns.insert(turn.turn_id.as_bytes(), encode(turn.as_ref()))?;
            Ok(Ok(Outcome::Done))
        }
        TreeWrite::Retention { .. } => {
            let Expiring(dead, failed, history, next) = &p.expiring;
            for k in dead {
                v.turns.remove(k)?;
            }
            for seq in failed {
                v.outbox.remove(seq.to_be_bytes())?;
            }
            for k in history {
                v.history.remove(k)?;
            }
            Ok(Ok(Outcome::Expired(super::Expired {
                dead: dead.len(),
                failed: failed.len(),
                history: history.len(),
                next: next.clone(),
            })))
        }
        TreeWrite::PutTurn(turn) | TreeWrite::Reopen(turn) => {
            v.turns.insert(turn.turn_id.as_bytes(), encode(turn.as_ref()))?;
            Ok(Ok(Outcome::Done))
        }
        TreeWrite::Context { conv, update, now_ms } => {
            Ok(contexts::apply(&v.ctx, &conv_prefix(conv), update, &p.spilled, *now_ms)?.map(|change| {
                dropped.extend(change.dropped);
                Outcome::Context(change.before, change.after)
            }))
        }
        TreeWrite::OutboxSent(seq) => {
            v.outbox.remove(seq.to_be_bytes())?;
            Ok(Ok(Outcome::Done))
        }
        TreeWrite::OutboxUpdate(item) => {
            v.outbox.insert(item.seq.to_be_bytes(), encode(item.as_ref()))?;
            Ok(Ok(Outcome::Done))
        }
        TreeWrite::ExpireDedup { .. } | TreeWrite::ArchiveDedup => {
            for (k, _) in &p.expired {
                v.dedup.remove(k)?;
            }
            Ok(Ok(Outcome::Count(p.expired.len() + p.expired_files.len())))
        }
        TreeWrite::ExpireContexts { now_ms } => {
            let (mut swept, mut gone) = (Swept::default(), Vec::new());
            for index_key in &p.due {
                if index_key.len() <= 8 {
                    swept
                        .errors
                        .push(format!("ctx_expiry key {index_key:?} is shorter than its 8-byte time"));
                    continue;
                }
                let at = u64::from_be_bytes(index_key[..8].try_into().expect("8 bytes"));
                match contexts::expire(&v.ctx, &index_key[8..], at, *now_ms)? {
                    Ok(Some(change)) => {
                        swept.removed += 1;
                        dropped.extend(change.dropped);
                        gone.extend(change.before);
                    }
                    Ok(None) => {}
                    Err(e) => swept.errors.push(e.to_string()),
                }
            }
            Ok(Ok(Outcome::Swept(swept, gone)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::trimmed;

    #[test]
    fn history_keeps_the_newest_turns_within_both_bounds() {
        let old = vec![("a", 100), ("b", 300), ("c", 200)];
        assert_eq!(trimmed(old.clone(), 50, 20, 10_000), Vec::<&str>::new(), "within both: nothing goes");
        assert_eq!(trimmed(old.clone(), 50, 2, 10_000), vec!["a", "b"], "the turn count");
        assert_eq!(
            trimmed(old.clone(), 50, 20, 400),
            vec!["a", "b"],
            "the bytes: 200 + 50 fit, 500 + 50 do not"
        );
        assert_eq!(
            trimmed(old, 5_000, 20, 400),
            vec!["a", "b", "c"],
            "the new one stays, alone, even when over"
        );
    }
}
