//! Where the bytes go: records and key + value bytes per sled tree, beside
//! the files on disk (sled's and the message log's). Counting walks every
//! record, so `/metrics` reuses one count for `SIZES_MAX_AGE`.

use std::time::{Duration, Instant};

use super::{Store, StoreError};

/// How long `/metrics` reuses a count: a walk of a million contexts takes
/// about a second of one core.
pub const SIZES_MAX_AGE: Duration = Duration::from_secs(60);

/// One sled tree: its live records and their key + value bytes (what the
/// data needs; the `db` file's size beyond their sum is sled's overhead and
/// space it has not reclaimed yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSize {
    pub tree: String,
    pub records: u64,
    pub bytes: u64,
}

/// A count, and when it was taken.
pub(super) type Counted = Option<(Instant, Vec<TreeSize>)>;

impl Store {
    /// Walks every tree. Blocking: run it off the async runtime.
    pub fn tree_sizes(&self) -> Result<Vec<TreeSize>, StoreError> {
        let (mut out, _) = walk(&self.gen().db)?;
        let marks = super::archive::marks(&self.inner.dir)?;
        out.push(TreeSize { tree: "dedup_archive".into(), records: marks, bytes: marks * 16 });
        out.sort_by(|a, b| a.tree.cmp(&b.tree));
        Ok(out)
    }

    /// The last count if it is younger than `SIZES_MAX_AGE`, else a new one.
    /// Blocking, like `tree_sizes`.
    pub fn tree_sizes_recent(&self) -> Result<Vec<TreeSize>, StoreError> {
        let mut counted = self.inner.sizes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, sizes)) = counted.as_ref() {
            if at.elapsed() < SIZES_MAX_AGE {
                return Ok(sizes.clone());
            }
        }
        let sizes = self.tree_sizes()?;
        *counted = Some((Instant::now(), sizes.clone()));
        Ok(sizes)
    }

    /// Bytes of each kind of the store's files.
    pub fn file_sizes(&self) -> Result<FileSizes, StoreError> {
        let log_dir = self.inner.dir.join(super::log::DIR_NAME);
        let mut log = 0;
        for no in super::log::segments(&log_dir).map_err(|e| super::log::io_error(&log_dir, e))? {
            log += std::fs::metadata(super::log::segment_path(&log_dir, no)).map(|m| m.len()).unwrap_or(0);
        }
        let parts = &self.inner.shared.parts;
        let contexts = parts
            .files()?
            .into_iter()
            .filter_map(|no| std::fs::metadata(parts.path(no)).ok())
            .map(|m| m.len())
            .sum();
        Ok(FileSizes {
            trees: self.gen().db.size_on_disk()?,
            log,
            dedup_archive: super::archive::bytes(&self.inner.dir)?,
            contexts,
        })
    }
}

/// Bytes on disk, by kind of file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileSizes {
    /// sled's files (`db`, blobs).
    pub trees: u64,
    /// The message log's segments.
    pub log: u64,
    pub dedup_archive: u64,
    /// The context part files (`contexts/`).
    pub contexts: u64,
}

impl FileSizes {
    pub fn total(&self) -> u64 {
        self.trees + self.log + self.dedup_archive + self.contexts
    }
}

/// Reads every record of every tree: each tree's size, and the highest id
/// the records hold (in the keys of `history`, `dedup`, `outbox` and
/// `turns`). The open walks it all once, so that a damaged page of sled's
/// is found then, not by a turn later.
pub(super) fn walk(db: &sled::Db) -> Result<(Vec<TreeSize>, u64), StoreError> {
    let mut out = Vec::new();
    let mut used = 0;
    for name in db.tree_names() {
        if name.as_ref() == super::snapshot::DEFAULT_TREE {
            continue;
        }
        let tree = db.open_tree(&name)?;
        let (mut records, mut bytes) = (0u64, 0u64);
        for kv in tree.iter() {
            let (k, v) = kv?;
            records += 1;
            bytes += (k.len() + v.len()) as u64;
            used = used.max(id_in(&name, &k));
        }
        out.push(TreeSize { tree: String::from_utf8_lossy(&name).into_owned(), records, bytes });
    }
    Ok((out, used))
}

/// The id a key holds: a history key's and a `dedup` record's last 8
/// bytes, an outbox seq, a turn id (`t` and digits).
fn id_in(tree: &[u8], key: &[u8]) -> u64 {
    let last8 = || {
        key.len().checked_sub(8).map_or(0, |at| u64::from_be_bytes(key[at..].try_into().expect("8 bytes")))
    };
    match tree {
        b"history" | b"dedup" | b"outbox" => last8(),
        b"turns" => {
            std::str::from_utf8(key).ok().and_then(|k| k.strip_prefix('t')?.parse().ok()).unwrap_or(0)
        }
        _ => 0,
    }
}
