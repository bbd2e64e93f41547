//! The durable state of the daemon, and the only module that names sled.
//!
//! Trees:
//! - `inbox`: messages not yet answered by a committed turn, per conversation in arrival order
//! - `seen`, `seen_at`: message ids already accepted (dedup), and their time index for expiry
//! - `turns`: turns cut but not committed (re-run on start) and dead turns (kept for retry)
//! - `history`: the last committed turns of each conversation
//! - `outbox`: reply pieces to send, in order, written in the turn's commit
//! - `ctx_meta`, `ctx_dialogue`, `ctx_cache`, `ctx_expiry`: each conversation's
//!   context, in two deflated parts, with its expiry index (see `contexts.rs`)
//!
//! Every write that must be atomic is one sled transaction; durability is a
//! separate, shared step (`flush`, see `flush.rs`), so callers decide when to
//! wait for the disk.

mod contexts;
mod flush;
mod records;
#[cfg(test)]
mod tests;

mod snapshot;

use std::path::Path;
use std::sync::{Arc, RwLock};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

pub use contexts::{
    ContextMeta, ContextStats, ContextStatsSnapshot, ContextUpdate, Part, Sizes, StoredContext,
};
use records::{conv_prefix, decode, decode_all, encode, phone_prefix, seen_at_key, seq_key};
pub use records::{DeadInfo, OutboxItem, TurnRecord, TurnSummary};

use crate::message::{Conv, Message, NewMessage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("flush to disk failed: {0}")]
    Flush(Arc<str>),
    #[error("corrupt record in {tree} at key {key:?}: {reason}")]
    Corrupt { tree: &'static str, key: String, reason: String },
    #[error("{dir} is held by a running turnstile (or another process)")]
    Held { dir: String },
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

const META: &str = "meta";
const ID_FLOOR: &[u8] = b"id_floor";

fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    sled::Config::new().path(dir).open().map_err(|e| match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Held { dir: dir.display().to_string() }
        }
        e => StoreError::Sled(e),
    })
}

/// What storing a webhook message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Stored under this sequence number.
    New(Message),
    /// The id was seen before; nothing was written.
    Duplicate,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    inbox: sled::Tree,
    seen: sled::Tree,
    seen_at: sled::Tree,
    turns: sled::Tree,
    history: sled::Tree,
    outbox: sled::Tree,
    ctx_meta: sled::Tree,
    ctx_dialogue: sled::Tree,
    ctx_cache: sled::Tree,
    ctx_expiry: sled::Tree,
    ctx_totals: sled::Tree,
    context_stats: Arc<ContextStats>,
    dir: std::path::PathBuf,
    /// Added to sled's id counter: a restored store starts above every id it holds.
    id_floor: u64,
    /// Writes hold it shared; an online backup holds it alone, so the
    /// snapshot is one consistent cut. Never held across an await.
    gate: Arc<RwLock<()>>,
    flusher: flush::Flusher,
}

impl Store {
    /// Opens (or creates) the store in `dir`. Must be called inside a tokio
    /// runtime: it starts the group-commit task. Fails if another process
    /// holds the directory.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Sled(e.into()))?;
        let db = open_db(dir)?;
        let id_floor = match db.open_tree(META)?.get(ID_FLOOR)? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
            None => 0,
        };
        let store = Store {
            dir: dir.to_owned(),
            id_floor,
            gate: Arc::default(),
            inbox: db.open_tree("inbox")?,
            seen: db.open_tree("seen")?,
            seen_at: db.open_tree("seen_at")?,
            turns: db.open_tree("turns")?,
            history: db.open_tree("history")?,
            outbox: db.open_tree("outbox")?,
            ctx_meta: db.open_tree("ctx_meta")?,
            ctx_dialogue: db.open_tree("ctx_dialogue")?,
            ctx_cache: db.open_tree("ctx_cache")?,
            ctx_expiry: db.open_tree("ctx_expiry")?,
            ctx_totals: db.open_tree("ctx_totals")?,
            context_stats: Arc::default(),
            flusher: flush::Flusher::spawn(db.clone()),
            db,
        };
        // The byte counters start from the persisted totals; writes keep both exact.
        let mut totals = contexts::Totals::default();
        for kv in store.ctx_totals.iter() {
            let (k, v) = kv?;
            let shard = contexts::decode_totals(&k, &v)?;
            totals.contexts += shard.contexts;
            totals.raw_bytes += shard.raw_bytes;
            totals.stored_bytes += shard.stored_bytes;
        }
        store.context_stats.set_totals(totals);
        Ok(store)
    }

    /// Resolves when every write made before the call is on disk. Concurrent
    /// callers share one fsync.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.flusher.flush().await.map_err(StoreError::Flush)
    }

    /// Flushes, stops the group-commit task, and — when this was the last
    /// clone — returns only once sled has let go of the directory (its I/O
    /// threads can hold the files a moment after the last handle is gone), so
    /// the same directory can be opened again at once. Waits at most 5 s.
    pub async fn close(self) -> Result<(), StoreError> {
        let flushed = self.flusher.close().await.map_err(StoreError::Flush);
        let lock_file = self.dir.join("db");
        drop(self);
        // Real sleeps on a blocking thread: tokio's paused test clock must
        // not turn this wait into a spin.
        let _ = tokio::task::spawn_blocking(move || {
            use fs2::FileExt;
            for _ in 0..500 {
                match std::fs::File::open(&lock_file).map(|f| f.try_lock_exclusive().map(|_| f)) {
                    Ok(Ok(file)) => {
                        let _ = file.unlock();
                        return;
                    }
                    Ok(Err(_)) => std::thread::sleep(std::time::Duration::from_millis(10)),
                    Err(_) => return,
                }
            }
            tracing::warn!(path = %lock_file.display(), "store still locked 5 s after closing");
        })
        .await;
        flushed
    }

    /// Stores a message and marks its id seen, in one transaction: a failed
    /// write never leaves the id marked, so a redelivery is not mistaken for a
    /// duplicate. Not durable until `flush`.
    pub fn insert_message(&self, new: NewMessage) -> Result<Inserted, StoreError> {
        let _write = self.write_gate();
        let seq = self.next_id()?;
        let message = Message::from_new(seq, new);
        let record = encode(&message);
        let key = seq_key(&message.conv, seq);
        let stamp = message.received_at_ms.to_be_bytes();
        let inserted = (&self.seen, &self.seen_at, &self.inbox).transaction(|(seen, seen_at, inbox)| {
            if seen.get(message.id.as_bytes())?.is_some() {
                return Ok(false);
            }
            seen.insert(message.id.as_bytes(), &stamp[..])?;
            seen_at.insert(seen_at_key(message.received_at_ms, &message.id), &[][..])?;
            inbox.insert(key.as_slice(), record.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(true)
        })?;
        Ok(if inserted { Inserted::New(message) } else { Inserted::Duplicate })
    }

    /// Every message still in the inbox, in key order (per conversation, by arrival).
    pub fn inbox(&self) -> Result<Vec<Message>, StoreError> {
        decode_all(&self.inbox, "inbox")
    }

    /// The given messages of a conversation that are still in the inbox, by arrival.
    pub fn messages(&self, conv: &Conv, seqs: &[u64]) -> Result<Vec<Message>, StoreError> {
        let mut seqs = seqs.to_vec();
        seqs.sort_unstable();
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let key = seq_key(conv, seq);
            if let Some(v) = self.inbox.get(&key)? {
                out.push(decode("inbox", &key, &v)?);
            }
        }
        Ok(out)
    }

    /// Shared hold of the write gate (see `gate`).
    fn write_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()? + self.id_floor)
    }

    /// A fresh, never reused turn id.
    pub fn new_turn_id(&self) -> Result<String, StoreError> {
        Ok(format!("t{:012}", self.next_id()?))
    }

    /// Records a turn before its handler is called (not durable until `flush`).
    pub fn put_turn(&self, turn: &TurnRecord) -> Result<(), StoreError> {
        let _write = self.write_gate();
        self.turns.insert(turn.turn_id.as_bytes(), encode(turn))?;
        Ok(())
    }

    pub fn turn(&self, turn_id: &str) -> Result<Option<TurnRecord>, StoreError> {
        match self.turns.get(turn_id.as_bytes())? {
            Some(v) => Ok(Some(decode("turns", turn_id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// All recorded turns: open ones (to re-run) and dead ones (to list).
    pub fn turns(&self) -> Result<Vec<TurnRecord>, StoreError> {
        decode_all(&self.turns, "turns")
    }

    /// A fresh, never reused sequence number (for outbox items).
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        self.next_id()
    }

    /// The commit of a turn, in one transaction: its messages leave the inbox,
    /// its record is removed, its summary joins the history (trimmed to
    /// `history_limit`), its context update is applied and its reply enters
    /// the outbox. Not durable until `flush`.
    pub fn commit_turn(
        &self,
        turn: &TurnRecord,
        summary: &TurnSummary,
        context: &ContextUpdate<'_>,
        outbox: &[OutboxItem],
        history_limit: usize,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let _write = self.write_gate();
        let outbox: Vec<([u8; 8], Vec<u8>)> =
            outbox.iter().map(|o| (o.seq.to_be_bytes(), encode(o))).collect();
        let prefix = conv_prefix(&turn.conv);
        // Only one turn of a conversation runs at a time, so the history keys
        // read here cannot change before the transaction below.
        let existing: Vec<sled::IVec> = self.history.scan_prefix(&prefix).keys().collect::<Result<_, _>>()?;
        let excess = (existing.len() + 1).saturating_sub(history_limit.max(1));
        let history_key = seq_key(&turn.conv, self.next_id()?);
        let summary = encode(summary);
        let trees = (
            &self.inbox,
            &self.turns,
            &self.history,
            &self.ctx_meta,
            &self.ctx_dialogue,
            &self.ctx_cache,
            &self.ctx_expiry,
            &self.ctx_totals,
            &self.outbox,
        );
        let (before, after) =
            trees.transaction(|(inbox, turns, history, meta, dialogue, cache, expiry, totals, out)| {
                for (key, item) in &outbox {
                    out.insert(&key[..], item.as_slice())?;
                }
                for m in &turn.messages {
                    inbox.remove(seq_key(&m.conv, m.seq))?;
                }
                turns.remove(turn.turn_id.as_bytes())?;
                for old in &existing[..excess] {
                    history.remove(old)?;
                }
                history.insert(history_key.as_slice(), summary.as_slice())?;
                let t = contexts::Trees { meta, dialogue, cache, expiry, totals };
                contexts::apply(&t, &prefix, context, now_ms)
            })?;
        self.context_stats.add(before.as_ref(), after.as_ref());
        Ok(())
    }

    /// Parks a turn as dead: its messages leave the inbox (the record keeps
    /// copies) so the conversation's next batch does not include them.
    pub fn park_dead(&self, turn: &TurnRecord) -> Result<(), StoreError> {
        let _write = self.write_gate();
        let record = encode(turn);
        (&self.inbox, &self.turns).transaction(|(inbox, turns)| {
            for m in &turn.messages {
                inbox.remove(seq_key(&m.conv, m.seq))?;
            }
            turns.insert(turn.turn_id.as_bytes(), record.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        Ok(())
    }

    /// Every outbox item, oldest first.
    pub fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        decode_all(&self.outbox, "outbox")
    }

    /// The gateway took this item: it is never sent again (once flushed).
    pub fn outbox_sent(&self, seq: u64) -> Result<(), StoreError> {
        let _write = self.write_gate();
        self.outbox.remove(seq.to_be_bytes())?;
        Ok(())
    }

    /// Records a failed attempt (or that the item was given up).
    pub fn outbox_update(&self, item: &OutboxItem) -> Result<(), StoreError> {
        let _write = self.write_gate();
        self.outbox.insert(item.seq.to_be_bytes(), encode(item))?;
        Ok(())
    }

    /// A conversation's live context (parts still deflated); `None` if it
    /// has none or it expired by `now_ms`, swept or not. Counts a cache hit
    /// or miss.
    pub fn context(&self, conv: &Conv, now_ms: u64) -> Result<Option<StoredContext>, StoreError> {
        let key = conv_prefix(conv);
        let found = match self.ctx_meta.get(&key)? {
            Some(v) => {
                let meta = contexts::decode_meta(&key, &v)?;
                if meta.expires_at_ms <= now_ms {
                    None
                } else {
                    let part = |tree: &sled::Tree, sizes: Option<Sizes>| -> Result<_, StoreError> {
                        Ok(match sizes {
                            Some(_) => tree.get(&key)?.map(|v| v.to_vec()),
                            None => None,
                        })
                    };
                    let dialogue = part(&self.ctx_dialogue, meta.dialogue)?;
                    let cache = part(&self.ctx_cache, meta.cache)?;
                    Some(StoredContext { meta, dialogue, cache })
                }
            }
            None => None,
        };
        let counter = match found.as_ref().and_then(|c| c.cache.as_ref()) {
            Some(_) => &self.context_stats.cache_hits,
            None => &self.context_stats.cache_misses,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(found)
    }

    /// Applies a context update outside a turn (the context API). Returns the
    /// live meta before and the meta after (`None`: no context).
    pub fn update_context(
        &self,
        conv: &Conv,
        update: &ContextUpdate<'_>,
        now_ms: u64,
    ) -> Result<(Option<ContextMeta>, Option<ContextMeta>), StoreError> {
        let _write = self.write_gate();
        let key = conv_prefix(conv);
        let trees = (&self.ctx_meta, &self.ctx_dialogue, &self.ctx_cache, &self.ctx_expiry, &self.ctx_totals);
        let (before, after) = trees.transaction(|(meta, dialogue, cache, expiry, totals)| {
            contexts::apply(&contexts::Trees { meta, dialogue, cache, expiry, totals }, &key, update, now_ms)
        })?;
        let had_cache = before.as_ref().is_some_and(|m| m.cache.is_some() && m.expires_at_ms > now_ms);
        if matches!(update.cache, Part::Clear) && had_cache {
            self.context_stats.invalidations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.context_stats.add(before.as_ref(), after.as_ref());
        let live_before = before.filter(|m| m.expires_at_ms > now_ms);
        Ok((live_before, after))
    }

    /// Removes contexts that expired by `now_ms`; returns how many. A range
    /// scan over the expiry index, never a scan of all contexts.
    pub fn expire_contexts(&self, now_ms: u64) -> Result<usize, StoreError> {
        let _write = self.write_gate();
        let mut removed = 0;
        let trees = (&self.ctx_meta, &self.ctx_dialogue, &self.ctx_cache, &self.ctx_expiry, &self.ctx_totals);
        // Keys are `expires_at ‖ conversation`: everything below `now + 1` is due.
        for kv in self.ctx_expiry.range(..(now_ms + 1).to_be_bytes().to_vec()) {
            let (index_key, _) = kv?;
            let at = u64::from_be_bytes(index_key[..8].try_into().expect("8-byte prefix"));
            let key = &index_key[8..];
            let gone = trees.transaction(|(meta, dialogue, cache, expiry, totals)| {
                contexts::expire(&contexts::Trees { meta, dialogue, cache, expiry, totals }, key, at, now_ms)
            })?;
            if let Some(meta) = gone {
                self.context_stats.add(Some(&meta), None);
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn context_stats(&self) -> ContextStatsSnapshot {
        self.context_stats.snapshot()
    }

    /// Committed turns of a phone (all companies), oldest first.
    pub fn history(&self, phone: &str) -> Result<Vec<TurnSummary>, StoreError> {
        let mut out: Vec<TurnSummary> = self
            .history
            .scan_prefix(phone_prefix(phone))
            .map(|kv| {
                let (k, v) = kv?;
                decode("history", &k, &v)
            })
            .collect::<Result<_, _>>()?;
        out.sort_by_key(|t| (t.committed_at_ms, t.turn_id.clone()));
        Ok(out)
    }

    /// Forgets message ids received before `cutoff_ms`; returns how many.
    /// A range scan over the time index, never a scan of all ids.
    pub fn expire_seen(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let _write = self.write_gate();
        let mut removed = 0;
        for kv in self.seen_at.range(..cutoff_ms.to_be_bytes().to_vec()) {
            let (key, _) = kv?;
            let id = &key[8..];
            (&self.seen, &self.seen_at).transaction(|(seen, seen_at)| {
                // The id may have been stored again later (after an earlier
                // expiry); only drop it if this index entry is its current one.
                if seen.get(id)?.as_deref() == Some(&key[..8]) {
                    seen.remove(id)?;
                }
                seen_at.remove(&key)?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })?;
            removed += 1;
        }
        Ok(removed)
    }

    /// How many fsyncs the group commit has done since the store was opened.
    pub fn syncs(&self) -> u64 {
        self.flusher.syncs()
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}
