//! Opening the store: sled, a one-time move of the first layout's trees,
//! the dedup set, the message log replayed into memory, then the threads.
//!
//! Order matters for power loss: sled's recovered state is synced before
//! anything is deleted on its word (a message in the log counts as retired
//! only if sled durably says so), and a torn log tail is cut off and synced
//! before a new segment is started after it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, RwLock};

use super::dedup::{self, IdSet};
use super::durable::{self, Files, Syncer};
use super::generation::{self, Gen};
use super::log::{self, Entry, Head};
use super::parts::PartFiles;
use super::records::decode_all;
use super::writer::Writer;
use super::{
    contexts, damage, open_db, turn_of_claim, Inner, Memory, OutboxItem, Shared, Store, StoreError, Trees,
    TurnRecord, ID_FLOOR,
};
use crate::message::Message;

/// What the driver picks up on start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Turns recorded but not committed, oldest first: they re-run with their turn_id.
    pub open_turns: Vec<TurnRecord>,
    /// Pending messages not claimed by an open turn, in arrival order.
    pub pending: Vec<Message>,
    pub dead_turns: usize,
}

pub(super) fn open(dir: &Path, options: super::Options) -> Result<Store, StoreError> {
    let (store, repairs) = damage::collecting(|| open_repairing(dir, options));
    let store = store?;
    *store.inner.repairs.lock().unwrap_or_else(|p| p.into_inner()) = repairs;
    Ok(store)
}

fn open_repairing(dir: &Path, options: super::Options) -> Result<Store, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| log::io_error(dir, e))?;
    let log_dir = dir.join(log::DIR_NAME);
    std::fs::create_dir_all(&log_dir).map_err(|e| log::io_error(&log_dir, e))?;
    let lock = lock_dir(dir)?;
    let (gen_no, db_dir) = generation::current(dir)?;
    // Before anything is deleted on the word of `trees`: a missing `db`
    // there may mean the pointer is what is damaged.
    for note in damage::check_sled_files(dir, &db_dir, true)? {
        tracing::warn!("{note}");
    }
    generation::remove_stale(dir, gen_no)?;
    // Every page sled holds is read once here, where damage refuses the open.
    let (db, trees, (_, in_trees)) = damage::guarded(&db_dir, || {
        let db = open_db(&db_dir, options)?;
        let trees = Trees::open(&db)?;
        let walked = super::sizes::walk(&db)?;
        Ok((db, trees, walked))
    })?;
    // sled cut short at damage it took for a crash's torn tail has lost
    // the seal: refused before anything is deleted on its word.
    let mut seal = damage::Seal::check(dir, &db_dir, &trees.meta)?;
    let staged = seal.stage(&trees.meta)?;
    let id_floor = match trees.meta.get(ID_FLOOR)? {
        None => 0,
        Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
            tree: "meta",
            key: "id_floor".into(),
            reason: format!("{} bytes where 8 were written", v.len()),
        })?),
    };
    // sled's counter only matters for a store it numbered (the first
    // layout); from here on ids come from `ids`.
    let ids = Arc::new(super::ids::Ids::open(dir, id_floor.max(db.generate_id()? + id_floor))?);
    let links = Arc::new(super::links::Links::open(dir)?);
    let quarantine = Arc::new(super::quarantine::Quarantine::open(dir)?);
    let takeovers = Arc::new(super::takeover::Takeovers::open(dir)?);
    let receipts = Arc::new(super::receipts::Receipts::open(dir)?);
    migrate_first_layout(dir, &db_dir, &db, &trees, &ids)?;
    let parts = PartFiles::open(dir)?;
    let (used_parts, damaged_parts) = parts.check_all(&trees.ctx_files)?;
    if !damaged_parts.is_empty() {
        for d in &damaged_parts {
            let what = format!(
                "{}: the context's {} is lost (its file is damaged: {})",
                String::from_utf8_lossy(&d.key).trim_end_matches('\0').replace('\0', " "),
                d.which.name(),
                d.reason
            );
            tracing::warn!("{}@{}: {what}", d.path.display(), d.at);
            damage::noted(&d.path, &what);
        }
        let cleared: Vec<_> = damaged_parts.iter().map(|d| (d.key.clone(), d.which)).collect();
        super::writer::clear_parts(&trees, &cleared, crate::message::unix_ms())?;
    }

    // Whatever sled recovered (possibly from the page cache after a kill)
    // is made durable before the log is trimmed on its word.
    let mut files = Files::open(db.clone(), &db_dir, &log_dir)?;
    db.flush()?;
    files.sync_all_now().map_err(|e| log::io_error(&db_dir, e))?;
    seal.publish(staged)?;
    // Now that sled's state is durable: files it does not refer to go.
    let unused = parts.remove_unused(&used_parts)?;
    if unused > 0 {
        tracing::info!(files = unused, "deleted context part files nothing refers to (a write cut short)");
    }
    if gen_no > 0 {
        // The data directory's own entries (the log, `ids`, `trees`).
        durable::sync_new_entries(dir, &mut HashSet::new(), &[]).map_err(|e| log::io_error(dir, e))?;
    }

    let context_stats = contexts::ContextStats::default();
    let mut totals = contexts::Totals::default();
    for kv in trees.ctx_totals.iter() {
        let (k, v) = kv?;
        let shard = contexts::decode_totals(&k, &v)?;
        totals.contexts += shard.contexts;
        totals.raw_bytes += shard.raw_bytes;
        totals.stored_bytes += shard.stored_bytes;
    }
    context_stats.set_totals(totals);

    let mut seen = IdSet::default();
    for kv in trees.dedup.iter() {
        let (k, v) = kv?;
        seen.extend(dedup::unpack_record(&k, &v)?);
    }
    let archive = super::archive::Archive::open(dir, &mut seen)?;
    let (memory, replayed_ids) = super::replay::replay(&log_dir, &seen)?;
    seen.extend(replayed_ids);
    ids.ensure_above(in_trees.max(highest_id(&memory)))?;

    // Turns re-opened from dead (and open turns of the first layout) live in sled.
    let mut open_turns: Vec<TurnRecord> =
        memory.claims.values().map(|c| turn_of_claim(&c.claim, &memory.pending)).collect();
    let mut dead_turns = 0;
    for turn in decode_all::<TurnRecord>(&trees.turns, "turns")? {
        match turn.dead {
            Some(_) => dead_turns += 1,
            None => open_turns.push(turn),
        }
    }
    open_turns.sort_by(|a, b| a.turn_id.cmp(&b.turn_id));
    let claimed: HashSet<u64> = open_turns.iter().flat_map(|t| t.messages.iter().map(|m| m.seq)).collect();
    let pending = memory
        .pending
        .values()
        .filter(|p| !claimed.contains(&p.message.seq))
        .map(|p| p.message.clone())
        .collect();
    let recovered = Recovered { open_turns, pending, dead_turns };

    let head_no = memory.segments.keys().next_back().map_or(1, |n| n + 1);
    let head_no = head_no
        .max(log::segments(&log_dir).map_err(|e| log::io_error(&log_dir, e))?.last().map_or(1, |n| n + 1));
    let head = Head::create(&log_dir, head_no).map_err(|e| log::io_error(&log_dir, e))?;
    let mut memory = memory;
    memory.head = head_no;

    let gen = Arc::new(Gen { no: gen_no, dir: db_dir.clone(), db, trees: trees.clone() });
    let shared = Arc::new(Shared {
        memory: Mutex::new(memory),
        gen: RwLock::new(gen.clone()),
        sink: RwLock::new(None),
        failed: Mutex::new(None),
        trouble: Mutex::new(None),
        stats: Default::default(),
        durable_outbox: Default::default(),
        applied_epoch: Default::default(),
        faults: Default::default(),
        context_stats,
        parts,
        outbox_ready: Default::default(),
        failed_notify: Default::default(),
        outbox: Mutex::new(
            decode_all::<OutboxItem>(&trees.outbox, "outbox")?.into_iter().map(|i| (i.seq, i)).collect(),
        ),
        dead: std::sync::atomic::AtomicU64::new(dead_turns as u64),
    });
    // The open synced everything (above).
    shared.stats.last_sync_ms.store(crate::message::unix_ms(), Ordering::Relaxed);
    // Outbox items on disk at open are durable (synced above), and so is
    // every seq handed out before it: a piece put back under its old seq (a
    // late failure receipt) is not hidden as if it waited for a sync.
    let top = trees.outbox.last()?.map(|(k, _)| u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8])));
    shared.durable_outbox.store(top.unwrap_or(0).max(ids.peek().saturating_sub(1)), Ordering::Release);

    let syncer = Syncer::spawn(files, shared.clone()).map_err(|e| log::io_error(dir, e))?;
    let (tx, rx) = mpsc::channel();
    let writer = Writer {
        rx,
        log_dir,
        head,
        trees: trees.clone(),
        shared: shared.clone(),
        syncer,
        seen,
        ids: ids.clone(),
        dirty: false,
        last_sync: std::time::Instant::now(),
        exporting: 0,
        deferred: Default::default(),
        data_dir: dir.to_owned(),
        options,
        rewrite: None,
        rewrite_base: generation::file_len(&db_dir),
        next_rewrite_check: std::time::Instant::now(),
        rewrite_waiters: Vec::new(),
        archive,
        seal,
        _lock: lock,
    };
    let thread = std::thread::Builder::new()
        .name("turnstile-store".into())
        .spawn(move || writer.run())
        .map_err(|e| log::io_error(dir, e))?;
    Ok(Store {
        inner: Arc::new(Inner {
            dir: dir.to_owned(),
            shared,
            tx,
            ids,
            links,
            quarantine,
            takeovers,
            receipts,
            inbound: Mutex::new(HashMap::new()),
            recovered: Mutex::new(Some(recovered)),
            repairs: Mutex::new(Vec::new()),
            sizes: Mutex::new(None),
            threads: Mutex::new(vec![thread]),
        }),
    })
}

/// The highest id the log holds: pending messages' and claims' turn ids.
fn highest_id(memory: &Memory) -> u64 {
    let seqs = memory.pending.keys().next_back().copied().unwrap_or(0);
    let turns = memory.claims.keys().filter_map(|t| t.strip_prefix('t')?.parse::<u64>().ok()).max();
    seqs.max(turns.unwrap_or(0))
}

/// What opening the log would cut or refuse (for `verify`), changing
/// nothing; and the highest id it holds.
pub(super) fn check_log(dir: &Path) -> Result<(Vec<String>, u64), StoreError> {
    let log_dir = dir.join(log::DIR_NAME);
    let numbers = match log::segments(&log_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        listed => listed.map_err(|e| log::io_error(&log_dir, e))?,
    };
    let (mut notes, mut used) = (Vec::new(), 0);
    for (i, &no) in numbers.iter().enumerate() {
        let path = log::segment_path(&log_dir, no);
        let read = log::read_segment(&path)?;
        if let Some((at, bytes)) = log::check_tail("log", &path, read.tail, i + 1 == numbers.len())? {
            notes.push(format!(
                "{}@{at}: a torn tail of {bytes} bytes; cut off on the next start",
                path.display()
            ));
        }
        for entry in &read.entries {
            used = used.max(match entry {
                Entry::Message(m) => m.seq,
                Entry::Claim(c) => c.turn_id.strip_prefix('t').and_then(|n| n.parse().ok()).unwrap_or(0),
            });
        }
    }
    Ok((notes, used))
}

/// Takes the data directory's lock file for as long as the store is open
/// (the writer thread holds it): a second daemon, a backup or a restore is
/// refused while one runs, before it touches anything.
pub(super) fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use fs2::FileExt;
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| log::io_error(&path, e))?;
    match file.try_lock_exclusive() {
        Ok(()) => Ok(file),
        Err(_) => Err(StoreError::Held { dir: dir.display().to_string() }),
    }
}

/// The data directory's lock file.
pub(super) const LOCK: &str = "lock";

/// The first layout kept pending messages in a sled `inbox` tree and every
/// id in `seen` (+ `seen_at`). Moved once: messages into the log (synced),
/// then ids into `dedup` records, then the old trees dropped. Each step can
/// be repeated after a crash without harm.
fn migrate_first_layout(
    dir: &Path,
    db_dir: &Path,
    db: &sled::Db,
    trees: &Trees,
    ids: &super::ids::Ids,
) -> Result<(), StoreError> {
    let names: Vec<sled::IVec> = db.tree_names();
    let has = |n: &str| names.iter().any(|t| t.as_ref() == n.as_bytes());
    if !has("inbox") && !has("seen") && !has("seen_at") {
        return Ok(());
    }
    let inbox_tree = db.open_tree("inbox")?;
    let seen_tree = db.open_tree("seen")?;
    let inbox: Vec<Message> = decode_all(&inbox_tree, "inbox")?;
    if !inbox.is_empty() {
        let log_dir = dir.join(log::DIR_NAME);
        let next =
            log::segments(&log_dir).map_err(|e| log::io_error(&log_dir, e))?.last().map_or(1, |n| n + 1);
        let mut head = Head::create(&log_dir, next).map_err(|e| log::io_error(&log_dir, e))?;
        let mut buf = Vec::new();
        for m in &inbox {
            log::frame_message(m, &mut buf);
        }
        head.append(&buf, None).map_err(|e| log::io_error(&log_dir, e.error))?;
    }
    let pending: HashSet<dedup::IdHash> = inbox.iter().map(|m| dedup::id_hash(&m.id)).collect();
    let mut batch = sled::Batch::default();
    let mut moved = 0u64;
    for kv in seen_tree.iter() {
        let (id, stamp) = kv?;
        let id = String::from_utf8_lossy(&id).into_owned();
        let hash = dedup::id_hash(&id);
        if pending.contains(&hash) {
            continue;
        }
        let at: u64 = u64::from_be_bytes(stamp.as_ref().try_into().unwrap_or([0; 8]));
        let mut key = at.to_be_bytes().to_vec();
        key.extend_from_slice(&ids.next()?.to_be_bytes());
        batch.insert(key, dedup::pack(&[hash]));
        moved += 1;
    }
    trees.dedup.apply_batch(batch)?;
    db.flush()?;
    std::fs::File::open(db_dir.join("db"))
        .and_then(|f| f.sync_data())
        .map_err(|e| log::io_error(db_dir, e))?;
    for name in ["inbox", "seen", "seen_at"] {
        db.drop_tree(name)?;
    }
    db.flush()?;
    tracing::info!(messages = inbox.len(), ids = moved, "moved the first store layout's inbox and dedup ids");
    // Open turns of the first layout stay in `turns`, where re-opened turns live.
    Ok(())
}
