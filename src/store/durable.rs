//! The syncer thread: makes sled's state durable, for real.
//!
//! sled 0.34's `flush` writes its buffers and ends in `sync_file_range`,
//! which neither writes file metadata nor flushes the disk's cache, and its
//! blob files (values too large for its log) are never synced at all. So a
//! sync here is: sled's flush, `fdatasync` of its log file, `fsync` of every
//! file that appeared since the last sync (blobs, snapshots) and of the
//! directories that gained or lost entries.
//!
//! It runs beside the writer, so a slow flush never holds up the message
//! log. A sync that starts at epoch E covers every transaction applied up
//! to E: only then are the waiters for those answered, the log records they
//! retired counted down (and fully retired segments deleted), the context
//! part files they replaced deleted, and their outbox items released to the
//! sender.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

use super::log;
use super::{lock, Shared, StoreError};

/// Told the result of the sync that covers its write.
pub(crate) type Waiter = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

#[derive(Default)]
struct Queue {
    /// Syncs asked for and done (counters): the thread runs while they differ.
    asked: u64,
    done: u64,
    /// Everything applied up to this epoch is durable.
    synced_epoch: u64,
    waiters: Vec<(u64, Waiter)>,
    /// Segments whose records a transaction of that epoch retired.
    retired: Vec<(u64, Vec<u64>)>,
    /// The largest outbox seq a transaction of that epoch wrote.
    outbox: Vec<(u64, u64)>,
    /// Context part files a transaction of that epoch stopped referring to.
    unreferenced: Vec<(u64, Vec<u64>)>,
    /// A new generation's files, taken before the next sync.
    replace: Option<Files>,
    stop: bool,
}

pub(crate) struct Syncer {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the thread needs to sync sled's files.
pub(crate) struct Files {
    db: sled::Db,
    /// The directory of sled's files (the data directory, or a generation's).
    dir: PathBuf,
    log_dir: PathBuf,
    /// sled's log file, opened once.
    db_file: File,
    /// Entries of `dir` and of `blobs/` already synced.
    known: HashSet<OsString>,
    known_blobs: HashSet<OsString>,
}

impl Files {
    pub(crate) fn open(db: sled::Db, dir: &Path, log_dir: &Path) -> Result<Files, StoreError> {
        let path = dir.join("db");
        Ok(Files {
            db_file: File::open(&path).map_err(|e| log::io_error(&path, e))?,
            db,
            dir: dir.to_owned(),
            log_dir: log_dir.to_owned(),
            known: HashSet::new(),
            known_blobs: HashSet::new(),
        })
    }

    /// `fdatasync` of sled's log file, `fsync` of the files and directory
    /// entries that appeared since the last call (sled's own flush comes
    /// first, by the caller). Returns the extra syncs made.
    pub(crate) fn sync_all_now(&mut self) -> std::io::Result<u64> {
        let step = |what: &'static str| {
            move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        self.db_file.sync_data().map_err(step("fdatasync of db"))?;
        let mut extra =
            sync_new_entries(&self.dir, &mut self.known, &["db", log::DIR_NAME, "ids", "ids.tmp"])
                .map_err(step("new files of the data directory"))?;
        let blobs = self.dir.join("blobs");
        if blobs.is_dir() {
            extra += sync_new_entries(&blobs, &mut self.known_blobs, &[]).map_err(step("new blob files"))?;
        }
        Ok(extra)
    }
}

impl Syncer {
    pub(crate) fn spawn(files: Files, shared: Arc<Shared>) -> std::io::Result<Syncer> {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let q = queue.clone();
        let thread =
            std::thread::Builder::new().name("turnstile-sync".into()).spawn(move || run(files, shared, q))?;
        Ok(Syncer { queue, thread: Some(thread) })
    }

    /// Records what a transaction of `epoch` retired, wrote to the outbox
    /// and stopped referring to.
    pub(crate) fn note(&self, epoch: u64, retired: Vec<u64>, outbox_max: u64, unreferenced: Vec<u64>) {
        let mut q = lock(&self.queue.0);
        if !unreferenced.is_empty() {
            q.unreferenced.push((epoch, unreferenced));
        }
        if !retired.is_empty() {
            q.retired.push((epoch, retired));
        }
        if outbox_max > 0 {
            q.outbox.push((epoch, outbox_max));
        }
    }

    /// Asks for a sync of everything applied so far; `waiters` are answered
    /// when it is done (at once if nothing needs syncing).
    pub(crate) fn request(&self, shared: &Shared, waiters: Vec<Waiter>) {
        let epoch = shared.applied_epoch.load(Ordering::Acquire);
        let mut q = lock(&self.queue.0);
        if epoch <= q.synced_epoch && q.retired.is_empty() && q.outbox.is_empty() && q.unreferenced.is_empty()
        {
            drop(q);
            for w in waiters {
                w(Ok(()));
            }
            return;
        }
        q.waiters.extend(waiters.into_iter().map(|w| (epoch, w)));
        q.asked += 1;
        self.queue.1.notify_one();
    }

    /// A sync, waited for on this thread.
    pub(crate) fn sync_now(&self, shared: &Shared) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.request(
            shared,
            vec![Box::new(move |r| {
                let _ = tx.send(r);
            })],
        );
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Syncs `files` from now on (a rewrite's new generation). Called by the
    /// writer right after `sync_now`, so no sync is under way.
    pub(crate) fn replace(&self, files: Files) {
        lock(&self.queue.0).replace = Some(files);
    }

    pub(crate) fn stop(&mut self) {
        lock(&self.queue.0).stop = true;
        self.queue.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut files: Files, shared: Arc<Shared>, queue: Arc<(Mutex<Queue>, Condvar)>) {
    let (mutex, cv) = &*queue;
    loop {
        let asked = {
            let mut q = lock(mutex);
            if q.asked == q.done && !q.stop {
                drop(q);
                free_deferred();
                q = lock(mutex);
            }
            while q.asked == q.done && !q.stop {
                q = cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.asked == q.done {
                return;
            }
            if let Some(next) = q.replace.take() {
                files = next;
            }
            q.asked
        };
        let epoch = shared.applied_epoch.load(Ordering::Acquire);
        let result = sync_files(&mut files, &shared);
        let mut q = lock(mutex);
        q.done = asked;
        let (ready, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut q.waiters).into_iter().partition(|w| w.0 <= epoch);
        q.waiters = rest;
        match result {
            Ok(()) => {
                shared.stats.synced(&shared.stats.tree_syncs);
                q.synced_epoch = q.synced_epoch.max(epoch);
                let (retired, later): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut q.retired).into_iter().partition(|r| r.0 <= epoch);
                q.retired = later;
                let (outbox, later): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut q.outbox).into_iter().partition(|o| o.0 <= epoch);
                q.outbox = later;
                let (unreferenced, later): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut q.unreferenced).into_iter().partition(|u| u.0 <= epoch);
                q.unreferenced = later;
                drop(q);
                shared.parts.remove(&unreferenced.into_iter().flat_map(|u| u.1).collect::<Vec<_>>());
                if let Some(max) = outbox.iter().map(|o| o.1).max() {
                    shared.durable_outbox.fetch_max(max, Ordering::AcqRel);
                    shared.outbox_ready.notify_one();
                }
                let segs: Vec<u64> = retired.into_iter().flat_map(|r| r.1).collect();
                count_down(&shared, &files.log_dir, &segs);
                for (_, w) in ready {
                    w(Ok(()));
                }
            }
            Err(e) => {
                let reason = shared.fail(&format!("syncing sled's files failed: {e}"));
                let rest = std::mem::take(&mut q.waiters);
                drop(q);
                for (_, w) in ready.into_iter().chain(rest) {
                    w(Err(StoreError::Failed(reason.clone())));
                }
            }
        }
    }
}

/// Frees what sled let go of but left to its epoch-based collector: the
/// calling thread's deferred drops are handed over and whatever every
/// thread is done with runs. sled 0.34 drops each filled io buffer
/// (`store::SEGMENT_BYTES`) that way, in the bag of whichever thread filled
/// it, and a bag is emptied only when that thread's later work fills it: a
/// storm that ends left 24 of them (96 MiB) live on an idle daemon. A few
/// rounds, as a bag runs only two epochs after it was handed over. Called
/// by the writer and the syncer each time they fall idle.
pub(crate) fn free_deferred() {
    for _ in 0..3 {
        sled::pin().flush();
    }
}

fn sync_files(files: &mut Files, shared: &Shared) -> std::io::Result<()> {
    shared.faults.hold_tree_sync();
    if let Some(e) = shared.faults.tree_sync() {
        return Err(e);
    }
    // Each step names itself in the error: the operator reads which one failed.
    files.db.flush().map_err(|e| std::io::Error::other(format!("sled's flush: {e}")))?;
    let extra = files.sync_all_now()?;
    shared.stats.other_syncs.fetch_add(extra, Ordering::Relaxed);
    Ok(())
}

/// fsyncs every file of `dir` not seen by the last call, then `dir` itself
/// if any entry came or went. Returns how many fsyncs it made.
pub(crate) fn sync_new_entries(
    dir: &Path,
    known: &mut HashSet<OsString>,
    skip: &[&str],
) -> std::io::Result<u64> {
    let mut now = HashSet::new();
    let mut syncs = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        if !known.contains(&name) {
            // A file removed between the listing and here is no loss: skip it.
            let synced = (|| {
                if !entry.file_type()?.is_file() {
                    return Ok(false);
                }
                File::open(entry.path())?.sync_all().map(|()| true)
            })();
            match synced {
                Ok(true) => syncs += 1,
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        now.insert(name);
    }
    if now != *known {
        log::sync_dir(dir)?;
        syncs += 1;
        *known = now;
    }
    Ok(syncs)
}

/// Retired records are counted down; a segment with nothing live left, other
/// than the one being written, is deleted.
pub(super) fn count_down(shared: &Shared, log_dir: &Path, segs: &[u64]) {
    if segs.is_empty() {
        return;
    }
    let mut memory = lock(&shared.memory);
    for no in segs {
        if let Some(s) = memory.segments.get_mut(no) {
            s.live = s.live.saturating_sub(1);
        }
    }
    let head = memory.head;
    let empty: Vec<u64> =
        memory.segments.iter().filter(|(no, s)| s.live == 0 && **no != head).map(|(no, _)| *no).collect();
    for no in empty {
        memory.segments.remove(&no);
        let path = log::segment_path(log_dir, no);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not delete a retired log segment");
        }
    }
}

/// Waits until sled has let go of its lock on `lock_file` (its I/O threads
/// can hold it a moment after the last handle is gone). At most 5 s.
pub(crate) fn wait_unlocked(lock_file: &Path) {
    use fs2::FileExt;
    for _ in 0..500 {
        match File::open(lock_file).map(|f| f.try_lock_exclusive().map(|_| f)) {
            Ok(Ok(file)) => {
                let _ = file.unlock();
                return;
            }
            Ok(Err(_)) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(_) => return,
        }
    }
    tracing::warn!(path = %lock_file.display(), "store still locked 5 s after closing");
}
