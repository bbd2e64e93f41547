//! Where sled's files are, and how the store rewrites them online.
//!
//! sled 0.34 never reclaims space: every rewritten page stays in its file
//! for good (measured: a thousand 1 KB values rewritten 400,000 times grow
//! the file to 280 MB). So the writer rewrites the trees into a fresh sled
//! directory — a *generation* — once the file has grown enough
//! (`store.rewrite_after_mb`), and switches to it:
//!
//! 1. a copier thread (nice 10) copies every record of the current
//!    generation into the next one, while the writer goes on and notes the
//!    key of every record it writes meanwhile;
//! 2. the noted keys are copied again, in rounds, until few are left;
//! 3. between two groups, the writer copies the last few, syncs both
//!    generations, names the new one in the `trees` file (written aside,
//!    synced, renamed, directory synced) and lets the old one go.
//!
//! The `trees` file is the switch: a crash before its rename leaves the old
//! generation in charge, after it the new one, complete and synced either
//! way; whatever is not named is deleted on the next open. Without a
//! `trees` file, sled's files are in the data directory itself (every store
//! starts that way).

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};

use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::writer::Writer;
use super::{log, StoreError, Trees};

/// Names the directory sled's files are in, relative to the data directory.
const POINTER: &str = "trees";
const PREFIX: &str = "trees.";
/// sled's own entries in a directory it opened.
const SLED_ENTRIES: [&str; 3] = ["db", "conf", "blobs"];

/// One open sled directory and its trees.
pub(crate) struct Gen {
    /// Its number: 0 is the data directory itself.
    pub no: u64,
    pub dir: PathBuf,
    pub db: sled::Db,
    pub trees: Trees,
}

/// Where the current generation's sled files are, and its number.
pub(super) fn current(data: &Path) -> Result<(u64, PathBuf), StoreError> {
    let pointer = data.join(POINTER);
    let name = match std::fs::read(&pointer) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, data.to_owned())),
        Err(e) => return Err(log::io_error(&pointer, e)),
    };
    let no =
        name.strip_prefix(PREFIX).and_then(|n| n.parse::<u64>().ok()).ok_or_else(|| StoreError::Corrupt {
            tree: "trees",
            key: pointer.display().to_string(),
            reason: format!("{name:?} does not name a generation (trees.N)"),
        })?;
    let dir = data.join(&name);
    if !dir.join("db").is_file() {
        return Err(StoreError::Corrupt {
            tree: "trees",
            key: pointer.display().to_string(),
            reason: format!("it names {name}, which holds no sled files"),
        });
    }
    Ok((no, dir))
}

/// Whether `data` holds a store.
pub(super) fn exists(data: &Path) -> bool {
    data.join("db").is_file() || data.join(POINTER).is_file()
}

/// Deletes what an interrupted rewrite left: generations other than the
/// current one, and sled's files in the data directory once a generation
/// directory is current. Run on open, with the directory locked.
pub(super) fn remove_stale(data: &Path, current: u64) -> Result<(), StoreError> {
    let mut removed = false;
    for entry in std::fs::read_dir(data).map_err(|e| log::io_error(data, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = match name.strip_prefix(PREFIX).and_then(|n| n.parse::<u64>().ok()) {
            Some(no) => no != current,
            None => name == format!("{POINTER}.tmp"),
        };
        if stale {
            tracing::warn!(path = %entry.path().display(), "removing what an interrupted store rewrite left");
            super::damage::noted(
                &entry.path(),
                "left by an interrupted rewrite of the store's files; removed",
            );
            remove(&entry.path())?;
            removed = true;
        }
    }
    if current > 0 {
        removed |= remove_sled_files(data)?;
    }
    if removed {
        log::sync_dir(data).map_err(|e| log::io_error(data, e))?;
    }
    Ok(())
}

/// Removes sled's own files from `dir` (not the message log, ids or
/// anything else of ours). Returns whether there were any.
fn remove_sled_files(dir: &Path) -> Result<bool, StoreError> {
    let mut any = false;
    for entry in std::fs::read_dir(dir).map_err(|e| log::io_error(dir, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if SLED_ENTRIES.contains(&name.as_str()) || name.starts_with("snap.") {
            remove(&entry.path())?;
            any = true;
        }
    }
    Ok(any)
}

fn remove(path: &Path) -> Result<(), StoreError> {
    let result = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(log::io_error(path, e)),
        _ => Ok(()),
    }
}

/// The directory of generation `no` under `data`.
pub(super) fn dir_of(data: &Path, no: u64) -> PathBuf {
    if no == 0 {
        data.to_owned()
    } else {
        data.join(format!("{PREFIX}{no}"))
    }
}

/// Makes `next` the current generation: its files are synced, the pointer
/// is written aside, synced and renamed, and the data directory synced.
/// An error before the rename leaves `old` current; after it, the caller
/// must not trust either (the store fails).
pub(super) fn switch(data: &Path, next: &Gen) -> Result<(), SwitchError> {
    next.db.flush().map_err(|e| SwitchError::Before(e.into()))?;
    sync_all_under(&next.dir).map_err(|e| SwitchError::Before(log::io_error(&next.dir, e)))?;
    log::sync_dir(data).map_err(|e| SwitchError::Before(log::io_error(data, e)))?;
    let name = format!("{PREFIX}{}\n", next.no);
    log::replace_file(data, POINTER, name.as_bytes())
        .map_err(|e| SwitchError::Before(log::io_error(&data.join(POINTER), e)))?;
    log::sync_dir(data).map_err(|e| SwitchError::After(log::io_error(data, e)))
}

pub(super) enum SwitchError {
    /// The old generation is still the current one.
    Before(StoreError),
    /// The pointer may or may not have reached the disk.
    After(StoreError),
}

/// Lets the old generation's files go, once the new one is current.
pub(super) fn discard(data: &Path, old: &Gen) -> Result<(), StoreError> {
    if old.no == 0 {
        remove_sled_files(data)?;
    } else {
        remove(&old.dir)?;
    }
    log::sync_dir(data).map_err(|e| log::io_error(data, e))
}

/// fsyncs every file under `dir` and every directory, bottom up.
pub(super) fn sync_all_under(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_all_under(&entry.path())?;
        } else {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    log::sync_dir(dir)
}

/// The size of sled's log file in `dir`.
pub(super) fn file_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("db")).map(|m| m.len()).unwrap_or(0)
}

/// The keys written since a rewrite began: (tree number in `Trees::all`, key).
pub(super) type Touched = HashSet<(u8, sled::IVec)>;

/// Copies every record of `from` into `to` (fresh), in batches. Stops
/// with `Closed` once `cancel` is set.
pub(super) fn copy_all(from: &Trees, to: &Trees, cancel: &AtomicBool) -> Result<u64, StoreError> {
    let mut copied = 0;
    for (src, dst) in from.all().into_iter().zip(to.all()) {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in src.iter() {
            let (k, v) = kv?;
            batch.insert(k, v);
            n += 1;
            if n % 1024 == 0 {
                if cancel.load(Ordering::Relaxed) {
                    return Err(StoreError::Closed);
                }
                dst.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        dst.apply_batch(batch)?;
        copied += n;
    }
    Ok(copied)
}

/// Copies the current value of each key (or its absence) from `from` to `to`.
pub(super) fn copy_keys(from: &Trees, to: &Trees, keys: &Touched) -> Result<u64, StoreError> {
    let (src, dst) = (from.all(), to.all());
    let mut batches: Vec<sled::Batch> = (0..dst.len()).map(|_| sled::Batch::default()).collect();
    for (tree, key) in keys {
        let i = *tree as usize;
        match src[i].get(key)? {
            Some(v) => batches[i].insert(key.clone(), v),
            None => batches[i].remove(key.clone()),
        }
    }
    for (dst, batch) in dst.iter().zip(batches) {
        dst.apply_batch(batch)?;
    }
    Ok(keys.len() as u64)
}

/// A rewrite in progress, owned by the writer.
pub(crate) struct Rewrite {
    pub next: Arc<Gen>,
    /// Keys written since the copy in flight began.
    pub touched: Touched,
    /// The copy in flight: the bulk copy, then rounds of noted keys.
    pub copier: Option<std::thread::JoinHandle<Result<u64, StoreError>>>,
    pub rounds: u32,
    /// Records copied, by the bulk copy and the rounds.
    pub copied: u64,
    pub started: std::time::Instant,
    pub size_before: u64,
    /// Set to stop the copy in flight (the store closes or fails).
    pub cancel: Arc<AtomicBool>,
}

/// Runs `f` on a thread of its own at a low priority, so a copy never takes
/// a core from ingest.
pub(super) fn spawn_copier(
    f: impl FnOnce() -> Result<u64, StoreError> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Result<u64, StoreError>>> {
    std::thread::Builder::new().name("turnstile-rewrite".into()).spawn(move || {
        crate::ops::background_priority();
        f()
    })
}

/// A tree inside the writer's transaction that notes the key of each write
/// while a rewrite runs (`noted` is then `Some`).
pub(crate) struct Noted<'a> {
    pub tree: &'a TransactionalTree,
    pub no: u8,
    pub noted: Option<&'a RefCell<Vec<(u8, sled::IVec)>>>,
}

type TxResult<T> = Result<T, UnabortableTransactionError>;

impl Noted<'_> {
    pub fn get(&self, key: impl AsRef<[u8]>) -> TxResult<Option<sled::IVec>> {
        self.tree.get(key)
    }

    pub fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<sled::IVec>,
    ) -> TxResult<Option<sled::IVec>> {
        self.note(key.as_ref());
        self.tree.insert(key.as_ref(), value)
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> TxResult<Option<sled::IVec>> {
        self.note(key.as_ref());
        self.tree.remove(key.as_ref())
    }

    fn note(&self, key: &[u8]) {
        if let Some(noted) = self.noted {
            noted.borrow_mut().push((self.no, sled::IVec::from(key)));
        }
    }
}

/// How often the writer looks at sled's file size, and how often it looks
/// after a rewrite in progress while nothing else wakes it.
const REWRITE_CHECK: Duration = Duration::from_secs(1);
pub(super) const REWRITE_TICK: Duration = Duration::from_millis(50);
/// After a rewrite fails (a full disk, say), the next try waits this long.
const REWRITE_BACKOFF: Duration = Duration::from_secs(600);
/// A rewrite switches once at most this many keys are left to copy again
/// (copied between two groups), or after this many rounds.
const FINAL_KEYS: usize = 512;
const MAX_ROUNDS: u32 = 8;

/// The rewrite, driven by the writer between its groups.
impl Writer {
    /// Starts a rewrite of sled's files when they have grown enough, and
    /// moves one along: the next round of keys, or the switch.
    pub(super) fn tend_rewrite(&mut self) {
        if let Some(reason) = self.failed() {
            self.abandon_rewrite(&reason);
            return;
        }
        let Some(rewrite) = self.rewrite.as_mut() else {
            let now = Instant::now();
            let asked = !self.rewrite_waiters.is_empty();
            if !asked && (self.options.rewrite_after_bytes == 0 || now < self.next_rewrite_check) {
                return;
            }
            self.next_rewrite_check = now + REWRITE_CHECK;
            let current = self.shared.gen.read().unwrap_or_else(|p| p.into_inner()).clone();
            let len = file_len(&current.dir);
            let growth = self.options.rewrite_after_bytes.max(self.rewrite_base / 2);
            if asked || len >= self.rewrite_base.saturating_add(growth) {
                if let Err(e) = self.start_rewrite(current, len) {
                    tracing::warn!(error = %e, "could not start rewriting the store's files; trying again later");
                    self.next_rewrite_check = now + REWRITE_BACKOFF;
                    for reply in self.rewrite_waiters.drain(..) {
                        let _ = reply.send(Err(StoreError::Write(Arc::from(e.to_string()))));
                    }
                }
            }
            return;
        };
        if let Some(copier) = rewrite.copier.take_if(|c| c.is_finished()) {
            match copier.join() {
                Ok(Ok(n)) => rewrite.copied += n,
                Ok(Err(e)) => return self.abandon_rewrite(&e.to_string()),
                Err(_) => return self.abandon_rewrite("the copy thread panicked"),
            }
        }
        if rewrite.copier.is_some() {
            return;
        }
        if rewrite.touched.len() > FINAL_KEYS && rewrite.rounds < MAX_ROUNDS {
            rewrite.rounds += 1;
            let keys = std::mem::take(&mut rewrite.touched);
            let (from, to) = (self.trees.clone(), rewrite.next.trees.clone());
            match spawn_copier(move || copy_keys(&from, &to, &keys)) {
                Ok(copier) => rewrite.copier = Some(copier),
                Err(e) => self.abandon_rewrite(&e.to_string()),
            }
        } else if self.exporting == 0 {
            self.finish_rewrite();
        }
    }

    fn start_rewrite(&mut self, current: Arc<Gen>, len: u64) -> Result<(), StoreError> {
        let no = current.no + 1;
        let dir = dir_of(&self.data_dir, no);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| log::io_error(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| log::io_error(&dir, e))?;
        let db = super::open_db(&dir, self.options)?;
        let trees = Trees::open(&db)?;
        let next = Arc::new(Gen { no, dir, db, trees });
        let cancel = Arc::new(AtomicBool::new(false));
        let (from, to, stop) = (current.trees.clone(), next.trees.clone(), cancel.clone());
        #[cfg(test)]
        let held = next.dir.clone();
        let copier = spawn_copier(move || {
            let copied = copy_all(&from, &to, &stop);
            #[cfg(test)]
            hold::wait(&held, &stop);
            copied
        })
        .map_err(|e| log::io_error(&next.dir, e))?;
        tracing::info!(
            size_bytes = len,
            since_last_bytes = len - self.rewrite_base.min(len),
            generation = no,
            "rewriting the store's files"
        );
        self.rewrite = Some(Rewrite {
            next,
            touched: Default::default(),
            copier: Some(copier),
            rounds: 0,
            copied: 0,
            started: Instant::now(),
            size_before: len,
            cancel,
        });
        Ok(())
    }

    /// Between two groups: the last keys, both generations synced, the
    /// pointer switched; the old files go.
    fn finish_rewrite(&mut self) {
        let Some(mut rewrite) = self.rewrite.take() else { return };
        let pause = Instant::now();
        let keys = std::mem::take(&mut rewrite.touched);
        let next = rewrite.next.clone();
        let prepared = copy_keys(&self.trees, &next.trees, &keys)
            .and_then(|_| super::durable::Files::open(next.db.clone(), &next.dir, &self.log_dir));
        let files = match prepared {
            Ok(files) => files,
            Err(e) => {
                self.rewrite = Some(rewrite);
                return self.abandon_rewrite(&e.to_string());
            }
        };
        // Everything applied so far durable in the old generation, and its
        // waiters answered, before the new one takes over.
        if self.syncer.sync_now(&self.shared).is_err() {
            self.rewrite = Some(rewrite);
            return self.abandon_rewrite("the store failed");
        }
        match switch(&self.data_dir, &next) {
            Ok(()) => {}
            Err(SwitchError::Before(e)) => {
                self.rewrite = Some(rewrite);
                return self.abandon_rewrite(&e.to_string());
            }
            Err(SwitchError::After(e)) => {
                self.shared.fail(&format!("switching to the rewritten store files: {e}"));
                return;
            }
        }
        self.syncer.replace(files);
        self.trees = next.trees.clone();
        let old =
            std::mem::replace(&mut *self.shared.gen.write().unwrap_or_else(|p| p.into_inner()), next.clone());
        if let Err(e) = discard(&self.data_dir, &old) {
            tracing::warn!(error = %e, "could not delete the old store files; the next start deletes them");
        }
        drop(old);
        self.rewrite_base = file_len(&next.dir);
        self.shared.stats.rewrites.fetch_add(1, Ordering::Relaxed);
        for reply in self.rewrite_waiters.drain(..) {
            let _ = reply.send(Ok(next.no));
        }
        tracing::info!(
            generation = next.no,
            size_before_bytes = rewrite.size_before,
            size_after_bytes = self.rewrite_base,
            records = rewrite.copied + keys.len() as u64,
            rounds = rewrite.rounds,
            took_ms = rewrite.started.elapsed().as_millis() as u64,
            paused_ms = pause.elapsed().as_millis() as u64,
            "rewrote the store's files"
        );
    }

    /// Gives up a rewrite that failed: what it wrote goes, the current
    /// generation stays, and the next try waits `REWRITE_BACKOFF`.
    pub(super) fn abandon_rewrite(&mut self, reason: &str) {
        if self.rewrite.is_none() {
            return;
        }
        tracing::warn!(reason, "abandoned a rewrite of the store's files; trying again later");
        self.next_rewrite_check = Instant::now() + REWRITE_BACKOFF;
        self.cancel_rewrite(reason);
    }

    /// Stops a rewrite in progress (the store closes, or it failed), deletes
    /// what it wrote and tells whoever asked for it why.
    pub(super) fn cancel_rewrite(&mut self, reason: &str) {
        let Some(rewrite) = self.rewrite.take() else { return };
        rewrite.cancel.store(true, Ordering::Relaxed);
        if let Some(copier) = rewrite.copier {
            let _ = copier.join();
        }
        let dir = rewrite.next.dir.clone();
        drop(rewrite.next);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(path = %dir.display(), error = %e, "could not delete an abandoned store rewrite");
        }
        for reply in self.rewrite_waiters.drain(..) {
            let _ =
                reply.send(Err(StoreError::Write(Arc::from(format!("the rewrite was abandoned: {reason}")))));
        }
    }
}

/// Tests hold a rewrite of one directory after its first copy, so that
/// writes land while it runs (and must be copied again), however fast the
/// machine copies.
#[cfg(test)]
pub(super) mod hold {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// Holds the rewrite into `dir` (a generation's directory) until
    /// `release`.
    pub fn hold(dir: &Path) {
        HELD.lock().unwrap().push(dir.to_path_buf());
    }

    pub fn release(dir: &Path) {
        HELD.lock().unwrap().retain(|d| d != dir);
    }

    pub(super) fn wait(dir: &Path, cancel: &AtomicBool) {
        while HELD.lock().unwrap().iter().any(|d| d == dir) && !cancel.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}
