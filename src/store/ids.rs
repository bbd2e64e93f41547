//! Unique ids (message sequence numbers, turn ids, outbox and history keys)
//! that are never handed out twice, across crashes and power cuts.
//!
//! Ids come from a counter in memory. Before the counter passes the reserved
//! mark, a new mark a block ahead is written to `ids` and synced; on open the
//! counter starts at the stored mark. A crash can skip ids, never repeat one.
//! (sled's own generator is not used: it is safe only while every id is
//! followed by a sled sync, and messages never touch sled.)

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::log::{io_error, replace_file, sync_dir};
use super::{lock, StoreError};

/// Ids reserved per write of the mark.
const BLOCK: u64 = 1 << 20;
const FILE: &str = "ids";

pub(crate) struct Ids {
    next: AtomicU64,
    /// Every id below this may have been handed out; it is on disk.
    reserved: AtomicU64,
    writing: Mutex<()>,
    dir: PathBuf,
}

impl Ids {
    /// Starts above the stored mark and above `floor` (ids a first-layout
    /// or restored store already used), and reserves a first block.
    pub(crate) fn open(dir: &Path, floor: u64) -> Result<Ids, StoreError> {
        let stored = check(dir)?;
        let start = stored.unwrap_or(0).max(floor).max(1);
        let ids = Ids {
            next: AtomicU64::new(start),
            reserved: AtomicU64::new(start),
            writing: Mutex::new(()),
            dir: dir.to_owned(),
        };
        ids.reserve(start + BLOCK)?;
        Ok(ids)
    }

    pub(crate) fn next(&self) -> Result<u64, StoreError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if id >= self.reserved.load(Ordering::Acquire) {
            let _writing = lock(&self.writing);
            if id >= self.reserved.load(Ordering::Acquire) {
                self.reserve(id + 1 + BLOCK)?;
            }
        }
        Ok(id)
    }

    /// Makes sure no id up to `used` (the highest the store still holds)
    /// is handed out again: an `ids` file older than the store's records (a
    /// copy put back, or lost and missing) would otherwise repeat them.
    /// True if it had to move the counter (it says so).
    pub(crate) fn ensure_above(&self, used: u64) -> Result<bool, StoreError> {
        let _writing = lock(&self.writing);
        let next = self.next.load(Ordering::Relaxed);
        if used < next {
            return Ok(false);
        }
        tracing::warn!(file = %self.dir.join(FILE).display(), mark = next, used, "the id mark is below ids the store already holds (the file is older than the store, or was missing); new ids start above them");
        super::damage::noted(
            &self.dir.join(FILE),
            &format!("the id mark {next} was below the ids in use ({used}); raised above them"),
        );
        self.reserve(used + 1 + BLOCK)?;
        self.next.store(used + 1, Ordering::Relaxed);
        Ok(true)
    }

    /// The id the next call would return (for a backup's floor).
    pub(crate) fn peek(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Writes `mark` to a temp file, syncs it, renames it over `ids` and
    /// syncs the directory: the old mark or the new one, never neither.
    fn reserve(&self, mark: u64) -> Result<(), StoreError> {
        replace_file(&self.dir, FILE, &encode(mark))
            .and_then(|()| sync_dir(&self.dir))
            .map_err(|e| io_error(&self.dir.join(FILE), e))?;
        self.reserved.store(mark, Ordering::Release);
        Ok(())
    }
}

/// The stored mark (`None`: no file yet). It is replaced by rename, so a
/// crash never leaves part of one: anything but a checked mark is damage,
/// and the open stops rather than guess which ids were handed out.
pub(crate) fn check(dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(decode(&bytes).ok_or_else(|| StoreError::Corrupt {
            tree: "ids",
            key: path.display().to_string(),
            reason: format!("{} bytes that are not a checked id mark", bytes.len()),
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path, e)),
    }
}

fn encode(mark: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&mark.to_le_bytes());
    out[8..].copy_from_slice(&crc32fast::hash(&mark.to_le_bytes()).to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<u64> {
    let bytes: &[u8; 12] = bytes.try_into().ok()?;
    let mark = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    (crc32fast::hash(&bytes[..8]) == u32::from_le_bytes(bytes[8..].try_into().ok()?)).then_some(mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_repeat_across_reopens_and_respect_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ids::open(dir.path(), 0).unwrap();
        let first: Vec<u64> = (0..5).map(|_| a.next().unwrap()).collect();
        drop(a); // as a crash would: no clean close
        let b = Ids::open(dir.path(), 0).unwrap();
        let after = b.next().unwrap();
        assert!(after > *first.last().unwrap(), "{after} after {first:?}");
        let c = Ids::open(dir.path(), u64::MAX / 2).unwrap();
        assert!(c.next().unwrap() >= u64::MAX / 2);
        // An older mark (a copy put back): moved above what is in use.
        std::fs::write(dir.path().join(FILE), encode(10)).unwrap();
        let d = Ids::open(dir.path(), 0).unwrap();
        assert!(!d.ensure_above(9).unwrap());
        assert!(d.ensure_above(5_000).unwrap());
        assert_eq!(d.next().unwrap(), 5_001);
        drop(d);
        assert!(Ids::open(dir.path(), 0).unwrap().next().unwrap() > 5_001, "the new mark is on disk");
        std::fs::write(dir.path().join(FILE), b"garbage").unwrap();
        assert!(matches!(Ids::open(dir.path(), 0), Err(StoreError::Corrupt { tree: "ids", .. })));
    }
}
