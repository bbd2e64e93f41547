//! The durable state of the daemon, and the only module that names sled.
//!
//! Two places on disk, one writer:
//! - the **message log** (`log.rs`, files in `log/`): accepted messages and
//!   turn claims, each group of writes made durable by one `fdatasync`
//!   before anyone is answered. It holds only what no committed turn has
//!   answered yet; a segment is deleted once all of it is retired.
//! - **sled** (the trees below): everything committed — dedup marks,
//!   history, contexts, outbox, dead turns. Written in one transaction per
//!   group, made durable by the syncer (`durable.rs`: sled's flush, then a
//!   real `fdatasync` of its files and `fsync` of new files' directories).
//!
//! One store-writer thread (`writer.rs`) takes every write waiting for it,
//! applies them together and answers every waiter: no sled write and no
//! fsync ever runs on the async workers. Reads go to sled or to memory
//! directly.
//!
//! Memory here (pending messages, open claims, the dedup set, segment
//! counts) is rebuilt from the log, sled and the dedup archive on every
//! open (`recover.rs`).
//!
//! Trees: `dedup` (retired time ‖ id → hashes of the ids a turn answered,
//! until they move into the archive files in `dedup/`: `archive.rs`),
//! `turns` (dead turns, and turns re-opened from dead), `history`, `outbox`,
//! `ctx_meta`, `ctx_dialogue`, `ctx_cache`, `ctx_expiry`, `ctx_totals`,
//! `ctx_files` (contexts, see `contexts.rs`; parts larger than 4 KiB live in
//! files of their own in `contexts/`: `parts.rs`), `meta` (the id floor of a
//! restored store).

mod archive;
mod contexts;
mod damage;
mod dedup;
mod durable;
#[cfg(test)]
mod fuzz;
mod generation;
mod ids;
mod links;
mod log;
mod parts;
mod quarantine;
mod receipts;
mod recfile;
mod records;
mod recover;
mod replay;
mod rhythms;
mod sizes;
mod snapshot;
mod takeover;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::oneshot;

pub use contexts::{
    ContextMeta, ContextStats, ContextStatsSnapshot, ContextUpdate, Part, Sizes, StoredContext,
};
pub use damage::{verify, Finding};
use records::{conv_prefix, decode, decode_all, phone_prefix};
pub use records::{DeadInfo, OutboxItem, TurnRecord, TurnSummary};
pub use recover::Recovered;
pub use sizes::{FileSizes, TreeSize, SIZES_MAX_AGE};

use crate::message::Urgency;
use crate::message::{Conv, Message, NewMessage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("corrupt record in {tree} at key {key:?}: {reason}")]
    Corrupt { tree: &'static str, key: String, reason: String },
    #[error("{dir} is held by a running turnstile (or another process)")]
    Held { dir: String },
    /// A write failed and was undone: nothing of it is stored; try again.
    #[error("write failed, nothing was stored: {0}")]
    Write(Arc<str>),
    /// A failure the store cannot undo: it takes no more writes, and the
    /// daemon restarts to recover from disk.
    #[error("the store has failed and takes no writes until the daemon restarts: {0}")]
    Failed(Arc<str>),
    /// Messages are refused while nothing would turn them into turns.
    #[error("not accepting messages: {0}")]
    NotAccepting(&'static str),
    #[error("the store is closed")]
    Closed,
}

/// What storing a webhook message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Stored under its sequence number.
    New(Message),
    /// The id was accepted before; nothing was written.
    Duplicate,
}

/// A newly stored message, told to the pipeline by the writer itself, after
/// the sync and before the webhook is answered: a message is never stored
/// without being announced, whatever happens to the request that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub conv: Conv,
    pub seq: u64,
    /// Passed through from `accept`.
    pub urgency: Urgency,
    /// Its text's shape, for the cut policy.
    pub shape: crate::message::Shape,
}

/// Where announcements go, a group at a time; returns false once nobody listens.
pub type Sink = dyn Fn(Vec<Announce>) -> bool + Send + Sync;

/// A turn's commit: its messages stop being pending, its summary joins the
/// history (trimmed to `history_limit` turns and `history_max_bytes`; the
/// summary itself is clipped to fit), its context update is applied and
/// its reply enters the outbox — one transaction.
#[derive(Debug, Clone)]
pub struct Commit {
    pub turn: TurnRecord,
    pub summary: TurnSummary,
    pub context: ContextUpdate,
    pub outbox: Vec<OutboxItem>,
    pub history_limit: usize,
    pub history_max_bytes: usize,
    pub now_ms: u64,
}

/// What retention keeps: everything younger than these (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub dead_before: u64,
    pub failed_before: u64,
    pub history_before: u64,
}

/// What a retention sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expired {
    pub dead: usize,
    pub failed: usize,
    pub history: usize,
    /// Where the next chunk of history starts; `None` once the end is reached.
    pub next: Option<Vec<u8>>,
}

/// What a context sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub removed: usize,
    /// Damaged records met (each names its key); they stay until repaired.
    pub errors: Vec<String>,
}

/// Failure hooks for tests. Each fails the very call a real error fails, so
/// what follows is the real error's path, not a simulation of it.
#[derive(Debug, Default)]
pub struct Faults {
    log_writes: AtomicBool,
    commits: AtomicBool,
    tree_sync: AtomicBool,
    tree_syncs_held: AtomicBool,
    driver: AtomicBool,
    shapes: AtomicBool,
}

impl Faults {
    /// Message-log writes fail with ENOSPC ("no space left") while set.
    pub fn set_log_writes_failing(&self, on: bool) {
        self.log_writes.store(on, Ordering::SeqCst);
    }

    /// Turn commits fail while set, as one meeting a damaged record would:
    /// nothing of them is written.
    pub fn set_commits_failing(&self, on: bool) {
        self.commits.store(on, Ordering::SeqCst);
    }

    /// The next sync of sled's files fails with EIO.
    pub fn fail_next_tree_sync(&self) {
        self.tree_sync.store(true, Ordering::SeqCst);
    }

    /// Syncs of sled's files wait while set, as on a disk that takes long
    /// to sync: what was applied stays in the page cache meanwhile.
    pub fn set_tree_syncs_held(&self, on: bool) {
        self.tree_syncs_held.store(on, Ordering::SeqCst);
    }

    /// Gateway deliveries fail to parse while set, as those of a sender
    /// version this build does not know would (the quarantine's tests).
    pub fn set_gateway_shapes_unknown(&self, on: bool) {
        self.shapes.store(on, Ordering::SeqCst);
    }

    pub fn gateway_shapes_unknown(&self) -> bool {
        self.shapes.load(Ordering::SeqCst)
    }

    /// The driver panics at its next event.
    pub fn kill_driver(&self) {
        self.driver.store(true, Ordering::SeqCst);
    }

    /// Whether the driver should die now (read once).
    pub fn driver_killed(&self) -> bool {
        self.driver.swap(false, Ordering::SeqCst)
    }

    fn log_write(&self) -> Option<std::io::Error> {
        self.log_writes.load(Ordering::SeqCst).then(|| std::io::Error::from_raw_os_error(28))
    }

    fn hold_tree_sync(&self) {
        while self.tree_syncs_held.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    fn commit(&self) -> bool {
        self.commits.load(Ordering::SeqCst)
    }

    fn tree_sync(&self) -> Option<std::io::Error> {
        self.tree_sync.swap(false, Ordering::SeqCst).then(|| std::io::Error::from_raw_os_error(5))
    }
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// `fdatasync` calls on the message log: one per group.
    log_syncs: AtomicU64,
    /// Syncs of sled's files (flush + `fdatasync` + directories).
    tree_syncs: AtomicU64,
    /// `fsync` calls on directories and new files (segments, sled's files).
    other_syncs: AtomicU64,
    /// Messages stored (acknowledged as accepted).
    stored: AtomicU64,
    groups: AtomicU64,
    /// Removed by retention: dead turns, given-up outbox pieces, history.
    expired_dead: AtomicU64,
    expired_failed: AtomicU64,
    expired_history: AtomicU64,
    /// Online rewrites of sled's files that completed.
    rewrites: AtomicU64,
    /// When a sync (of the log or of sled's files) last succeeded, Unix ms.
    last_sync_ms: AtomicU64,
}

impl Stats {
    pub(crate) fn synced(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.last_sync_ms.fetch_max(crate::message::unix_ms(), Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub log_syncs: u64,
    pub tree_syncs: u64,
    pub other_syncs: u64,
    pub stored: u64,
    pub groups: u64,
    pub pending: usize,
    pub log_segments: usize,
    pub dead_turns: u64,
    pub expired_dead: u64,
    pub expired_failed: u64,
    pub expired_history: u64,
    pub rewrites: u64,
}

/// A message in the log that no committed turn has answered yet.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    message: Message,
    seg: u64,
}

/// A turn claimed in the log and not yet committed or parked.
#[derive(Debug, Clone)]
pub(crate) struct OpenClaim {
    claim: log::Claim,
    /// The segments holding its claim records (one per attempt count written).
    segs: Vec<u64>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    /// Records in it not yet retired by a synced commit.
    live: u64,
    /// Its oldest record's time: dedup marks younger than the oldest live
    /// segment are never expired, so a restart cannot take a retired message
    /// in a surviving segment for a new one.
    created_ms: u64,
}

/// What the writer, the syncer and readers share.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    pending: BTreeMap<u64, Pending>,
    claims: HashMap<String, OpenClaim>,
    segments: BTreeMap<u64, Segment>,
    head: u64,
}

pub use quarantine::Held;
pub use receipts::{Delivery, Failure, Receipt};
pub use rhythms::{SavedLearning, SavedRhythm};
pub use takeover::{Paused, StaffMessage, Takeover};

pub(crate) struct Shared {
    memory: Mutex<Memory>,
    /// sled's files and trees; replaced by the writer when it rewrites them.
    gen: RwLock<Arc<generation::Gen>>,
    sink: RwLock<Option<Arc<Sink>>>,
    /// Set once the store has failed; the reason.
    failed: Mutex<Option<Arc<str>>>,
    /// Set while message-log writes fail (each undone); the last error.
    /// Cleared by the next write that succeeds.
    trouble: Mutex<Option<Arc<str>>>,
    stats: Stats,
    /// Outbox items with a seq up to this are durable and may be sent.
    durable_outbox: AtomicU64,
    /// Incremented after each applied sled transaction; a sync that starts
    /// at epoch E covers every transaction up to E.
    applied_epoch: AtomicU64,
    faults: Arc<Faults>,
    context_stats: ContextStats,
    /// The context parts kept in files (`contexts/`).
    parts: parts::PartFiles,
    /// Notified when outbox items become durable (sendable).
    outbox_ready: Arc<tokio::sync::Notify>,
    /// The outbox tree, in memory: the sender and the API read it without
    /// decoding the tree (written by the writer, loaded on open).
    outbox: Mutex<BTreeMap<u64, OutboxItem>>,
    /// Dead turns in the `turns` tree.
    dead: AtomicU64,
    /// Notified when the store fails.
    failed_notify: Arc<tokio::sync::Notify>,
}

impl Shared {
    fn fail(&self, reason: &str) -> Arc<str> {
        let mut failed = lock(&self.failed);
        if failed.is_none() {
            tracing::error!(reason, "the store has failed; it takes no more writes");
            self.failed_notify.notify_waiters();
            self.failed_notify.notify_one();
        }
        failed.get_or_insert_with(|| Arc::from(reason)).clone()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The sled trees. The first ten are written in the writer's transaction.
#[derive(Clone)]
pub(crate) struct Trees {
    dedup: sled::Tree,
    turns: sled::Tree,
    history: sled::Tree,
    outbox: sled::Tree,
    ctx_meta: sled::Tree,
    ctx_dialogue: sled::Tree,
    ctx_cache: sled::Tree,
    ctx_expiry: sled::Tree,
    ctx_totals: sled::Tree,
    ctx_files: sled::Tree,
    meta: sled::Tree,
}

impl Trees {
    /// Every tree: the ten the writer's transaction writes, in its order,
    /// then `meta`.
    fn all(&self) -> [&sled::Tree; 11] {
        [
            &self.dedup,
            &self.turns,
            &self.history,
            &self.outbox,
            &self.ctx_meta,
            &self.ctx_dialogue,
            &self.ctx_cache,
            &self.ctx_expiry,
            &self.ctx_totals,
            &self.ctx_files,
            &self.meta,
        ]
    }

    /// The tree that holds `which` part of contexts when it is small.
    fn part(&self, which: parts::Which) -> &sled::Tree {
        match which {
            parts::Which::Dialogue => &self.ctx_dialogue,
            parts::Which::Cache => &self.ctx_cache,
        }
    }

    fn open(db: &sled::Db) -> Result<Trees, StoreError> {
        Ok(Trees {
            dedup: db.open_tree("dedup")?,
            turns: db.open_tree("turns")?,
            history: db.open_tree("history")?,
            outbox: db.open_tree("outbox")?,
            ctx_meta: db.open_tree("ctx_meta")?,
            ctx_dialogue: db.open_tree("ctx_dialogue")?,
            ctx_cache: db.open_tree("ctx_cache")?,
            ctx_expiry: db.open_tree("ctx_expiry")?,
            ctx_totals: db.open_tree("ctx_totals")?,
            ctx_files: db.open_tree("ctx_files")?,
            meta: db.open_tree(META)?,
        })
    }
}

const META: &str = "meta";
const ID_FLOOR: &[u8] = b"id_floor";

/// How a store opens: what the config's `[store]` section sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The most memory sled's page cache may hold (`store.cache_mb`).
    pub cache_bytes: u64,
    /// sled's file is rewritten online once it has grown this much past
    /// its size after the last rewrite, and by half that size
    /// (`store.rewrite_after_mb`); 0: never.
    pub rewrite_after_bytes: u64,
}

/// `store.cache_mb`'s default. sled counts its cache at about a third of
/// what it takes in memory (sled alone, 700,000 dedup marks: 122 MB of RSS
/// at 32 MiB, 60 MB at 8), and while a rewrite runs there are two caches;
/// but in the daemon's soak 8 MiB ended with more RSS than 32 (more pages
/// read back in), so 32 it is.
pub const DEFAULT_CACHE_MB: u64 = 32;

/// sled's segment size. sled counts a page against its cache by what it
/// wrote to its log, and a page over a quarter of a segment goes to a file
/// of its own (`blobs/`) and counts as a pointer: at sled's default 512 KiB
/// (128 KiB pages) a leaf of 16 history records of a few KiB each escaped the
/// cache, and 10,000 messages of 30 KB held 600 MB of heap with a 32 MiB
/// cache. At 8 MiB a page stays counted up to 2 MiB: 16 records of
/// `turns.history_max_bytes`' default (64 KiB) and more.
pub const SEGMENT_BYTES: usize = 4 << 20;
/// sled's default, which stores made before [`SEGMENT_BYTES`] keep (when
/// sled's refusal does not name their size).
const OLD_SEGMENT_BYTES: usize = 512 << 10;

/// `store.rewrite_after_mb`'s default: a rewrite about every 80 s at 400
/// turns/s (sled writes about 2 KB per turn it never reclaims), and a data
/// directory that stays within its live size + half + 64 MB.
pub const DEFAULT_REWRITE_AFTER_MB: u64 = 64;

impl Default for Options {
    fn default() -> Self {
        Options { cache_bytes: DEFAULT_CACHE_MB << 20, rewrite_after_bytes: DEFAULT_REWRITE_AFTER_MB << 20 }
    }
}

fn open_db(dir: &Path, options: Options) -> Result<sled::Db, StoreError> {
    remove_unfinished_snapshots(dir)?;
    // sled's own background flusher is off: the syncer (durable.rs) flushes
    // and really syncs. That thread is also where sled cleans segments, but
    // with it on (once a second) the soak grew just as fast (1.6-1.9 KB per
    // message at 400/s either way), so it would only cost CPU. Space comes
    // back by rewriting the trees (generation.rs) or `turnstile compact`.
    let config = |segment: usize| {
        sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .cache_capacity(options.cache_bytes)
            .segment_size(segment)
    };
    // A store made before SEGMENT_BYTES keeps sled's old default (sled cannot
    // change it in place); its next rewrite (generation.rs) or `compact`
    // moves it to the new size.
    let opened = match config(SEGMENT_BYTES).open() {
        // sled 0.34 says "cannot change the io buffer size across restarts.
        // please change it back to N" and nothing else of it.
        Err(sled::Error::Unsupported(why)) if why.contains("io buffer size") => {
            let old = why.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(OLD_SEGMENT_BYTES);
            config(old).open()
        }
        other => other,
    };
    opened.map_err(|e| match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Held { dir: dir.display().to_string() }
        }
        e => StoreError::Sled(e),
    })
}

/// sled writes a snapshot to `snap.<lsn>.generating` and renames it once
/// written and synced, but when it looks for snapshots it takes the
/// unfinished ones too: one left by a failure (a full disk during an open)
/// makes every later open fail with "corrupted data". Such a file never
/// holds anything sled needs, so it goes before sled opens.
fn remove_unfinished_snapshots(dir: &Path) -> Result<(), StoreError> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing an unfinished sled snapshot left by a failed write");
            std::fs::remove_file(entry.path()).map_err(|e| log::io_error(&entry.path(), e))?;
        }
    }
    Ok(())
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The data directory.
    dir: PathBuf,
    shared: Arc<Shared>,
    tx: mpsc::Sender<writer::Op>,
    ids: Arc<ids::Ids>,
    links: Arc<links::Links>,
    quarantine: Arc<quarantine::Quarantine>,
    takeovers: Arc<takeover::Takeovers>,
    receipts: Arc<receipts::Receipts>,
    /// When each conversation's client last wrote (their own timestamp,
    /// Unix ms): the 24-hour window. Memory derivable from disk: built on
    /// open from the pending messages and the history.
    inbound: Mutex<HashMap<Conv, u64>>,
    recovered: Mutex<Option<Recovered>>,
    /// What the open repaired (damage::collecting), each naming its file.
    repairs: Mutex<Vec<String>>,
    /// The last count of `tree_sizes`, for the metrics.
    sizes: Mutex<sizes::Counted>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Runs a small blocking file operation of the store off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Io {
        path: "(a blocking task)".into(),
        source: std::io::Error::other(e.to_string()),
    })?
}

impl Store {
    /// Opens (or creates) the store in `dir`, recovers the log, and starts
    /// the writer and syncer threads. Needs no async runtime. Fails if
    /// another process holds the directory, or on damage it will not guess
    /// about (naming the file or key).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        recover::open(dir, Options::default())
    }

    /// Whether `dir` holds a store (sled's files, in it or in a generation).
    pub fn exists(dir: &Path) -> bool {
        generation::exists(dir)
    }

    /// `open`, with the config's store settings.
    pub fn open_with(dir: &Path, options: Options) -> Result<Store, StoreError> {
        recover::open(dir, options)
    }

    /// Where announcements of stored messages go. Until it is set, and after
    /// it reports nobody listening, `accept` refuses messages.
    pub fn set_sink(&self, sink: Option<Arc<Sink>>) {
        *self.inner.shared.sink.write().unwrap_or_else(|p| p.into_inner()) = sink;
    }

    /// What recovery found on open: open turns and unclaimed messages. Taken
    /// once (the driver's start); `None` afterwards.
    /// What the open repaired (a torn tail cut, a damaged cache dropped...),
    /// each naming its file: empty after a clean stop.
    pub fn repairs(&self) -> Vec<String> {
        lock(&self.inner.repairs).clone()
    }

    pub fn take_recovered(&self) -> Option<Recovered> {
        lock(&self.inner.recovered).take()
    }

    pub fn faults(&self) -> Arc<Faults> {
        self.inner.shared.faults.clone()
    }

    /// `Some(reason)` once the store has failed and takes no writes.
    pub fn failure(&self) -> Option<Arc<str>> {
        lock(&self.inner.shared.failed).clone()
    }

    /// `Some(error)` while writes to the message log fail (a full disk, say):
    /// nothing is stored meanwhile, the store itself is sound. Probes the
    /// log once to see whether it can be written again.
    pub async fn write_trouble(&self) -> Option<Arc<str>> {
        self.trouble()?;
        let _ = self.call(|reply| writer::Op::Probe { reply }).await;
        self.trouble()
    }

    /// The last failed log write, if the log has not been written since.
    pub fn trouble(&self) -> Option<Arc<str>> {
        lock(&self.inner.shared.trouble).clone()
    }

    /// Resolves once the store has failed; the reason.
    pub async fn failed(&self) -> Arc<str> {
        loop {
            let notified = self.inner.shared.failed_notify.notified();
            if let Some(reason) = self.failure() {
                return reason;
            }
            notified.await;
        }
    }

    /// Notified whenever committed replies become durable, and so sendable.
    pub fn outbox_ready(&self) -> Arc<tokio::sync::Notify> {
        self.inner.shared.outbox_ready.clone()
    }

    async fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> writer::Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner.tx.send(make(tx)).map_err(|_| StoreError::Closed)?;
        // On a current-thread runtime (tests on tokio's paused clock) the
        // wait is a blocking task: a paused clock jumps ahead whenever the
        // runtime looks idle, and a wait for another thread looks idle.
        let current_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if current_thread {
            match tokio::task::spawn_blocking(move || rx.blocking_recv()).await {
                Ok(answer) => answer.map_err(|_| StoreError::Closed)?,
                Err(_) => Err(StoreError::Closed),
            }
        } else {
            rx.await.map_err(|_| StoreError::Closed)?
        }
    }

    /// Stores the messages of one delivery, in order, and answers once they
    /// are durable (a duplicate too: its original is durable). Each new
    /// message is announced to the sink before this returns. If the write
    /// fails, nothing of it is stored and no id is marked seen.
    pub async fn accept(
        &self,
        messages: Vec<NewMessage>,
        urgency: Urgency,
    ) -> Result<Vec<Inserted>, StoreError> {
        let inserted = self.call(|reply| writer::Op::Accept { messages, urgency, reply }).await?;
        self.note_inbound(inserted.iter().filter_map(|i| match i {
            Inserted::New(m) => Some(m),
            Inserted::Duplicate => None,
        }));
        Ok(inserted)
    }

    /// Records a turn before its handler is called; durable when it returns.
    pub async fn claim(&self, turn: &TurnRecord) -> Result<(), StoreError> {
        self.claim_superseding(turn, Vec::new()).await
    }

    /// `claim`, for a turn restarted with more messages: the claims of the
    /// turns it replaces (`supersedes`, abandoned before their handler
    /// answered) leave memory once this one is on disk, so their log
    /// records stop holding segments. (After a crash before the new turn
    /// commits, the log's older claim wins the overlap: the old turn re-runs
    /// and the later messages make a turn of their own.)
    pub async fn claim_superseding(
        &self,
        turn: &TurnRecord,
        supersedes: Vec<String>,
    ) -> Result<(), StoreError> {
        let claim = claim_of(turn);
        self.call(|reply| writer::Op::Claim { claim, supersedes, reply: Some(reply) }).await
    }

    /// Keeps a turn's attempt count across restarts; not waited for.
    pub fn note_attempts(&self, turn: &TurnRecord) {
        let in_log = lock(&self.inner.shared.memory).claims.contains_key(&turn.turn_id);
        let op = if in_log {
            writer::Op::Claim { claim: claim_of(turn), supersedes: Vec::new(), reply: None }
        } else {
            let (reply, _) = oneshot::channel();
            writer::Op::Trees {
                write: writer::TreeWrite::PutTurn(Box::new(turn.clone())),
                durable: false,
                reply,
            }
        };
        let _ = self.inner.tx.send(op);
    }

    async fn trees(&self, write: writer::TreeWrite, durable: bool) -> Result<writer::Outcome, StoreError> {
        self.call(|reply| writer::Op::Trees { write, durable, reply }).await
    }

    /// Commits a turn. Returns once applied: the next turn of the
    /// conversation sees it. Durable at the next sync; its outbox items are
    /// sent only then.
    pub async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        self.trees(writer::TreeWrite::Commit(Box::new(commit)), false).await.map(drop)
    }

    /// Parks a turn as dead (it keeps copies of its messages); applied when
    /// it returns.
    pub async fn park_dead(&self, turn: &TurnRecord) -> Result<(), StoreError> {
        self.trees(writer::TreeWrite::Park(Box::new(turn.clone())), false).await.map(drop)
    }

    /// Marks a dead turn open again (to retry it); durable when it returns.
    pub async fn reopen_dead(&self, turn: &TurnRecord) -> Result<(), StoreError> {
        self.trees(writer::TreeWrite::Reopen(Box::new(turn.clone())), true).await.map(drop)
    }

    /// Removes what retention lets go: dead turns that died before
    /// `rules.dead_before`, given-up outbox pieces created before
    /// `rules.failed_before`, history committed before `rules.history_before`
    /// (one bounded chunk of history from `from`). Returns the counts and
    /// where the next history chunk starts (`None`: the end was reached).
    pub async fn expire_old(&self, rules: Retention, from: Option<Vec<u8>>) -> Result<Expired, StoreError> {
        match self.trees(writer::TreeWrite::Retention { rules, from }, false).await? {
            writer::Outcome::Expired(expired) => Ok(expired),
            other => unreachable!("a retention sweep answered {other:?}"),
        }
    }

    /// Applies a context update outside a turn (the context API), durable
    /// when it returns. Returns the live meta before and the meta after.
    pub async fn update_context(
        &self,
        conv: &Conv,
        update: ContextUpdate,
        now_ms: u64,
    ) -> Result<(Option<ContextMeta>, Option<ContextMeta>), StoreError> {
        let write = writer::TreeWrite::Context { conv: conv.clone(), update, now_ms };
        match self.trees(write, true).await? {
            writer::Outcome::Context(before, after) => {
                Ok((before.filter(|m| m.expires_at_ms > now_ms), after))
            }
            other => unreachable!("a context write answered {other:?}"),
        }
    }

    /// The gateway took this item: it is not sent again.
    pub async fn outbox_sent(&self, seq: u64) -> Result<(), StoreError> {
        self.trees(writer::TreeWrite::OutboxSent(seq), false).await.map(drop)
    }

    /// Records a failed attempt (or that the item was given up).
    pub async fn outbox_update(&self, item: &OutboxItem) -> Result<(), StoreError> {
        self.trees(writer::TreeWrite::OutboxUpdate(Box::new(item.clone())), false).await.map(drop)
    }

    /// Forgets message ids retired before `cutoff_ms` (a bounded chunk per
    /// call); returns how many dedup records and archive files went.
    pub async fn expire_dedup(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        match self.trees(writer::TreeWrite::ExpireDedup { cutoff_ms }, false).await? {
            writer::Outcome::Count(n) => Ok(n),
            other => unreachable!("a dedup sweep answered {other:?}"),
        }
    }

    /// Moves a chunk of the `dedup` tree's records into the archive files
    /// (archive.rs); returns how many records went (0: none were left).
    pub async fn archive_dedup(&self) -> Result<usize, StoreError> {
        match self.trees(writer::TreeWrite::ArchiveDedup, false).await? {
            writer::Outcome::Count(n) => Ok(n),
            other => unreachable!("a dedup archive answered {other:?}"),
        }
    }

    /// Removes contexts expired by `now_ms` (a bounded chunk per call).
    pub async fn expire_contexts(&self, now_ms: u64) -> Result<Swept, StoreError> {
        match self.trees(writer::TreeWrite::ExpireContexts { now_ms }, false).await? {
            writer::Outcome::Swept(swept, _) => Ok(swept),
            other => unreachable!("a context sweep answered {other:?}"),
        }
    }

    /// Rewrites sled's files into a fresh generation now, as the writer
    /// does by itself once they have grown by `Options::rewrite_after_bytes`;
    /// resolves with the new generation's number once it is current.
    pub async fn rewrite_now(&self) -> Result<u64, StoreError> {
        self.call(|reply| writer::Op::Rewrite { reply }).await
    }

    /// Resolves once everything written before the call is durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.call(|reply| writer::Op::Sync { reply }).await
    }

    /// Syncs, stops the threads, and returns once sled has let go of the
    /// directory, so it can be opened again at once (at most 5 s).
    pub async fn close(self) -> Result<(), StoreError> {
        let receipts = self.inner.receipts.clone();
        let receipts = tokio::task::spawn_blocking(move || receipts.sync()).await;
        if let Ok(Err(e)) = receipts {
            tracing::warn!(error = %e, "could not sync the receipts at the stop");
        }
        let synced = self.call(|reply| writer::Op::Close { reply }).await;
        let threads = std::mem::take(&mut *lock(&self.inner.threads));
        let db_dir = self.gen().dir.clone();
        drop(self);
        // Real sleeps on a blocking thread: tokio's paused test clock must
        // not turn this wait into a spin.
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            durable::wait_unlocked(&db_dir.join("db"));
        })
        .await;
        synced
    }

    /// Runs `f` (reads of sled, which may wait for the disk) on a blocking
    /// thread, never on the async workers.
    pub async fn read<T: Send + 'static>(&self, f: impl FnOnce(&Store) -> T + Send + 'static) -> T {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store)).await.expect("a store read panicked")
    }

    /// The given messages of a conversation that are still pending, by arrival.
    pub fn messages(&self, conv: &Conv, seqs: &[u64]) -> Vec<Message> {
        let memory = lock(&self.inner.shared.memory);
        let mut out: Vec<Message> = seqs
            .iter()
            .filter_map(|s| memory.pending.get(s))
            .filter(|p| p.message.conv == *conv)
            .map(|p| p.message.clone())
            .collect();
        out.sort_by_key(|m| m.seq);
        out
    }

    /// Every pending message (accepted, not answered by a committed turn), by arrival.
    pub fn pending(&self) -> Vec<Message> {
        lock(&self.inner.shared.memory).pending.values().map(|p| p.message.clone()).collect()
    }

    /// The phone a LID-addressed client of `company` was last seen with.
    pub fn lid_phone(&self, company: &str, lid: &str) -> Option<String> {
        self.inner.links.phone(company, lid)
    }

    /// Records that `lid` is `phone` for `company`, synced before it returns
    /// (see `links.rs`); nothing to write when it was known.
    pub async fn link_lid(&self, company: &str, lid: &str, phone: &str) -> Result<(), StoreError> {
        if self.inner.links.known(company, lid, phone) {
            return Ok(());
        }
        let (links, company, lid, phone) =
            (self.inner.links.clone(), company.to_owned(), lid.to_owned(), phone.to_owned());
        blocking(move || links.put(&company, &lid, &phone)).await
    }

    /// Keeps a delivery no parser took (see `quarantine.rs`), synced before
    /// it returns; its id, or `None` when `capacity` are held already.
    pub async fn quarantine(
        &self,
        gateway: &str,
        reason: &str,
        body: &[u8],
        received_at_ms: u64,
        capacity: usize,
    ) -> Result<Option<String>, StoreError> {
        let (q, gateway, reason, body) =
            (self.inner.quarantine.clone(), gateway.to_owned(), reason.to_owned(), body.to_vec());
        blocking(move || q.put(&gateway, &reason, &body, received_at_ms, capacity)).await
    }

    /// The held deliveries, oldest first.
    pub async fn quarantined(&self) -> Result<Vec<Held>, StoreError> {
        let q = self.inner.quarantine.clone();
        blocking(move || q.list()).await
    }

    pub async fn quarantined_one(&self, id: &str) -> Result<Option<Held>, StoreError> {
        let (q, id) = (self.inner.quarantine.clone(), id.to_owned());
        blocking(move || q.get(&id)).await
    }

    /// Drops a held delivery; false if there was none by that id.
    pub async fn release_quarantined(&self, id: &str) -> Result<bool, StoreError> {
        let (q, id) = (self.inner.quarantine.clone(), id.to_owned());
        blocking(move || q.remove(&id)).await
    }

    /// Drops held deliveries received before `before_ms` (blocking).
    pub fn expire_quarantined(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.inner.quarantine.expire(before_ms)
    }

    /// How many deliveries are held.
    pub fn quarantine_len(&self) -> usize {
        self.inner.quarantine.len()
    }

    /// A reply piece the gateway took, under the id it gave back.
    pub async fn receipt_sent(&self, receipt: Receipt) -> Result<(), StoreError> {
        let r = self.inner.receipts.clone();
        blocking(move || r.sent(receipt)).await
    }

    /// What WhatsApp said of one of our messages: the receipt after it
    /// (`None`: not one of ours) and whether that was news.
    pub async fn receipt_update(
        &self,
        id: &str,
        state: Delivery,
        at_ms: u64,
        failure: Option<Failure>,
    ) -> Result<Option<(Receipt, bool)>, StoreError> {
        let (r, id) = (self.inner.receipts.clone(), id.to_owned());
        blocking(move || r.update(&id, state, at_ms, failure)).await
    }

    /// A turn's reply, as far as WhatsApp said it got, by part.
    pub fn receipts_of(&self, turn_id: &str) -> Vec<Receipt> {
        self.inner.receipts.of_turn(turn_id)
    }

    /// Drops receipts sent before `before_ms` (blocking).
    pub fn expire_receipts(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.inner.receipts.expire(before_ms)
    }

    /// When the conversation's client last wrote (Unix ms, by their own clock).
    pub fn last_inbound(&self, conv: &Conv) -> Option<u64> {
        lock(&self.inner.inbound).get(conv).copied()
    }

    fn note_inbound<'a>(&self, messages: impl IntoIterator<Item = &'a Message>) {
        let mut map = lock(&self.inner.inbound);
        for m in messages {
            let at = m.timestamp.filter(|t| *t > 0).map_or(m.received_at_ms, |t| t as u64 * 1000);
            match map.get_mut(&m.conv) {
                Some(e) => *e = (*e).max(at),
                None => drop(map.insert(m.conv.clone(), at)),
            }
        }
    }

    /// Builds the last-inbound times from disk: pending messages and the
    /// history (blocking; once, at the start).
    pub fn load_inbound(&self) -> Result<(), StoreError> {
        {
            let memory = lock(&self.inner.shared.memory);
            self.note_inbound(memory.pending.values().map(|p| &p.message));
        }
        let gen = self.gen();
        for kv in gen.trees.history.iter() {
            let (k, v) = kv?;
            let summary: TurnSummary = decode("history", &k, &v)?;
            self.note_inbound(summary.messages.iter());
        }
        Ok(())
    }

    /// A conversation's takeover: paused or not, and what staff wrote.
    pub fn takeover(&self, conv: &Conv) -> Takeover {
        self.inner.takeovers.get(conv)
    }

    /// Whether staff have taken the conversation over (replies are held).
    pub fn is_paused(&self, conv: &Conv) -> bool {
        self.inner.takeovers.is_paused(conv)
    }

    /// Every paused conversation, the longest paused first.
    pub fn paused(&self) -> Vec<(Conv, Paused)> {
        self.inner.takeovers.paused()
    }

    /// Pauses (or re-times the pause of) a conversation; synced when it returns.
    pub async fn pause(&self, conv: &Conv, paused: Paused) -> Result<Takeover, StoreError> {
        let (t, conv) = (self.inner.takeovers.clone(), conv.clone());
        blocking(move || t.pause(&conv, paused)).await
    }

    /// Keeps a staff message (once per id); synced when it returns.
    pub async fn staff_message(&self, conv: &Conv, message: StaffMessage) -> Result<Takeover, StoreError> {
        let (t, conv) = (self.inner.takeovers.clone(), conv.clone());
        blocking(move || t.staff(&conv, message)).await
    }

    pub async fn resume(&self, conv: &Conv) -> Result<Takeover, StoreError> {
        let (t, conv) = (self.inner.takeovers.clone(), conv.clone());
        blocking(move || t.resume(&conv)).await
    }

    /// A turn's handler saw the staff messages up to `up_to_ms`.
    pub async fn staff_delivered(&self, conv: &Conv, up_to_ms: u64) -> Result<(), StoreError> {
        let (t, conv) = (self.inner.takeovers.clone(), conv.clone());
        blocking(move || t.delivered(&conv, up_to_ms)).await.map(drop)
    }

    /// What the adaptive policy saved (see `rhythms.rs`).
    pub fn rhythms(&self) -> SavedLearning {
        let (saved, repairs) = damage::collecting(|| rhythms::load(&self.inner.dir));
        lock(&self.inner.repairs).extend(repairs);
        saved
    }

    /// Replaces the saved rhythms; blocking (a file write and two syncs).
    pub fn save_rhythms(&self, saved: &SavedLearning) -> Result<(), StoreError> {
        rhythms::save(&self.inner.dir, saved).map_err(|e| log::io_error(&self.inner.dir, e))
    }

    /// A fresh, never reused turn id.
    pub fn new_turn_id(&self) -> Result<String, StoreError> {
        Ok(format!("t{:012}", self.next_id()?))
    }

    /// A fresh, never reused sequence number (for outbox items).
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        self.next_id()
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        self.inner.ids.next()
    }

    pub fn turn(&self, turn_id: &str) -> Result<Option<TurnRecord>, StoreError> {
        if let Some(open) = self.open_claims().into_iter().find(|t| t.turn_id == turn_id) {
            return Ok(Some(open));
        }
        match self.gen().trees.turns.get(turn_id.as_bytes())? {
            Some(v) => Ok(Some(decode("turns", turn_id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// All recorded turns: open ones (to re-run) and dead ones (to list).
    pub fn turns(&self) -> Result<Vec<TurnRecord>, StoreError> {
        let mut all = self.open_claims();
        all.extend(decode_all::<TurnRecord>(&self.gen().trees.turns, "turns")?);
        all.sort_by(|a, b| a.turn_id.cmp(&b.turn_id));
        Ok(all)
    }

    /// The sled generation in use now (a rewrite replaces it).
    fn gen(&self) -> Arc<generation::Gen> {
        self.inner.shared.gen.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn open_claims(&self) -> Vec<TurnRecord> {
        let memory = lock(&self.inner.shared.memory);
        memory.claims.values().map(|c| turn_of_claim(&c.claim, &memory.pending)).collect()
    }

    /// Outbox items that are durable (only those may be sent), oldest first.
    pub fn outbox(&self) -> Vec<OutboxItem> {
        let durable = self.inner.shared.durable_outbox.load(Ordering::Acquire);
        lock(&self.inner.shared.outbox).range(..=durable).map(|(_, i)| i.clone()).collect()
    }

    /// A conversation's live context (parts still deflated); `None` if it
    /// has none or it expired by `now_ms`, swept or not. Counts a cache hit
    /// or miss.
    pub fn context(&self, conv: &Conv, now_ms: u64) -> Result<Option<StoredContext>, StoreError> {
        let gen = self.gen();
        let t = &gen.trees;
        let key = conv_prefix(conv);
        let found = match t.ctx_meta.get(&key)? {
            Some(v) => {
                let meta = contexts::decode_meta(&key, &v)?;
                if meta.expires_at_ms <= now_ms {
                    None
                } else {
                    let part = |which: parts::Which, sizes: Option<Sizes>| match sizes {
                        Some(_) => self.read_part(t, which, &key),
                        None => Ok(None),
                    };
                    let dialogue = part(parts::Which::Dialogue, meta.dialogue)?;
                    let cache = part(parts::Which::Cache, meta.cache)?;
                    Some(StoredContext { meta, dialogue, cache })
                }
            }
            None => None,
        };
        let stats = &self.inner.shared.context_stats;
        let counter = match found.as_ref().and_then(|c| c.cache.as_ref()) {
            Some(_) => &stats.cache_hits,
            None => &stats.cache_misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(found)
    }

    /// One part of the context at `key`: in its sled tree, or in the file
    /// `ctx_files` names. A commit may replace the file meanwhile (and the
    /// syncer delete the old one): then the new location is read.
    fn read_part(&self, t: &Trees, which: parts::Which, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = t.part(which).get(key)? {
            return Ok(Some(v.to_vec()));
        }
        let fkey = which.file_key(key);
        let mut tried = None;
        loop {
            let Some(v) = t.ctx_files.get(&fkey)? else { return Ok(None) };
            let loc = contexts::decode_location(&fkey, &v)?;
            match self.inner.shared.parts.read(which, key, &loc) {
                Err(StoreError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && tried != Some(loc) =>
                {
                    tried = Some(loc)
                }
                other => return other.map(Some),
            }
        }
    }

    pub fn context_stats(&self) -> ContextStatsSnapshot {
        self.inner.shared.context_stats.snapshot()
    }

    /// Committed turns of a phone (all companies), oldest first.
    pub fn history(&self, phone: &str) -> Result<Vec<TurnSummary>, StoreError> {
        let mut out: Vec<TurnSummary> = self
            .gen()
            .trees
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

    pub fn stats(&self) -> StoreStats {
        let s = &self.inner.shared.stats;
        let memory = lock(&self.inner.shared.memory);
        StoreStats {
            log_syncs: s.log_syncs.load(Ordering::Relaxed),
            tree_syncs: s.tree_syncs.load(Ordering::Relaxed),
            other_syncs: s.other_syncs.load(Ordering::Relaxed),
            stored: s.stored.load(Ordering::Relaxed),
            groups: s.groups.load(Ordering::Relaxed),
            pending: memory.pending.len(),
            log_segments: memory.segments.len(),
            dead_turns: self.inner.shared.dead.load(Ordering::Relaxed),
            expired_dead: s.expired_dead.load(Ordering::Relaxed),
            expired_failed: s.expired_failed.load(Ordering::Relaxed),
            expired_history: s.expired_history.load(Ordering::Relaxed),
            rewrites: s.rewrites.load(Ordering::Relaxed),
        }
    }

    /// Every sync call the store made: log, sled's files, directories.
    pub fn syncs(&self) -> u64 {
        let s = self.stats();
        s.log_syncs + s.tree_syncs + s.other_syncs
    }

    /// When a sync of the log or of sled's files last succeeded (Unix ms;
    /// the open's own sync counts). An idle store does not sync.
    pub fn last_sync_ms(&self) -> u64 {
        self.inner.shared.stats.last_sync_ms.load(Ordering::Relaxed)
    }

    /// Bytes the store occupies on disk (sled, the log, the dedup archive,
    /// the context part files).
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.file_sizes()?.total())
    }
}

fn claim_of(turn: &TurnRecord) -> log::Claim {
    log::Claim {
        turn_id: turn.turn_id.clone(),
        conv: turn.conv.clone(),
        seqs: turn.messages.iter().map(|m| m.seq).collect(),
        cut_reason: turn.cut_reason.clone(),
        cut_at_ms: turn.cut_at_ms,
        attempts: turn.attempts,
    }
}

/// The turn a claim records, with its messages from the pending ones.
fn turn_of_claim(claim: &log::Claim, pending: &BTreeMap<u64, Pending>) -> TurnRecord {
    TurnRecord {
        turn_id: claim.turn_id.clone(),
        conv: claim.conv.clone(),
        messages: claim.seqs.iter().filter_map(|s| pending.get(s)).map(|p| p.message.clone()).collect(),
        cut_reason: claim.cut_reason.clone(),
        cut_at_ms: claim.cut_at_ms,
        attempts: claim.attempts,
        dead: None,
    }
}
