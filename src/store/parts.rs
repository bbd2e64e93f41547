//! Context parts kept out of sled: each part larger than `INLINE_MAX` is a
//! file of its own in `contexts/`, and sled's `ctx_files` tree holds only
//! where it is (`Location`). sled 0.34 keeps a value it wrote in its page
//! cache until enough later accesses reach the same cache shard, whatever
//! `store.cache_mb` says, so a burst of large contexts held all of them in
//! memory (docs/operating.md, "Disk and memory"); read from a file, a part
//! is in memory only while a turn or a request uses it.
//!
//! A file is written and synced, and its directory entry too, before the
//! transaction that refers to it is applied, so sled never holds a location
//! whose file a power cut can take. A file is deleted once the transaction
//! that stopped referring to it is durable (the syncer), or, if nothing
//! ever came to refer to it (a commit cut short), at the next open. Files
//! are never rewritten: a new version of a part is a new file.
//!
//! A file names what it holds (`PART_MAGIC`, the part, the conversation's
//! key) and checks it (CRC-32 of all of it), so a damaged or swapped file is
//! found at the open, which drops that part and says so.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::{log, StoreError};

pub(crate) const DIR_NAME: &str = "contexts";
const SUFFIX: &str = ".part";
/// A stored (deflated) part larger than this goes to a file; a smaller one
/// stays in sled, where it costs a file, a sync and an unlink less.
pub(crate) const INLINE_MAX: usize = 4096;
const PART_MAGIC: &[u8; 4] = b"TSP1";
/// Magic, part, key length (u16), payload length (u32), CRC-32 (u32).
const HEADER: usize = 4 + 1 + 2 + 4 + 4;

/// Which part of a context a file holds; the first byte of its `ctx_files` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Dialogue,
    Cache,
}

impl Which {
    pub(crate) const BOTH: [Which; 2] = [Which::Dialogue, Which::Cache];

    fn tag(self) -> u8 {
        match self {
            Which::Dialogue => b'd',
            Which::Cache => b'c',
        }
    }

    pub(crate) fn of_tag(tag: u8) -> Option<Which> {
        Which::BOTH.into_iter().find(|w| w.tag() == tag)
    }

    /// The part's name, as the API calls it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Which::Dialogue => "dialogue",
            Which::Cache => "cache",
        }
    }

    /// The sled tree that holds this part when it is small.
    pub(crate) fn tree_name(self) -> &'static str {
        match self {
            Which::Dialogue => "ctx_dialogue",
            Which::Cache => "ctx_cache",
        }
    }

    /// The `ctx_files` key of this part of the context at `key`.
    pub(crate) fn file_key(self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(key.len() + 1);
        k.push(self.tag());
        k.extend_from_slice(key);
        k
    }
}

/// Where a part is: its file's number, and what the file must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Location {
    pub file: u64,
    pub len: u32,
    pub crc: u32,
}

/// The `contexts/` directory and the next file number.
#[derive(Debug)]
pub(crate) struct PartFiles {
    dir: PathBuf,
    next: AtomicU64,
}

impl PartFiles {
    /// Opens (creating) `contexts/` in `data_dir`; numbers go on above the
    /// highest file there.
    pub(crate) fn open(data_dir: &Path) -> Result<PartFiles, StoreError> {
        let dir = data_dir.join(DIR_NAME);
        std::fs::create_dir_all(&dir).map_err(|e| log::io_error(&dir, e))?;
        let files = log::numbered(&dir, SUFFIX).map_err(|e| log::io_error(&dir, e))?;
        let next = files.last().map_or(1, |n| n + 1);
        Ok(PartFiles { dir, next: AtomicU64::new(next) })
    }

    /// The part files of `data_dir` as they are, for a check that changes
    /// nothing (`turnstile verify`); not for writing.
    pub(crate) fn at(data_dir: &Path) -> PartFiles {
        PartFiles { dir: data_dir.join(DIR_NAME), next: AtomicU64::new(u64::MAX) }
    }

    pub(crate) fn path(&self, file: u64) -> PathBuf {
        self.dir.join(format!("{file:016x}{SUFFIX}"))
    }

    /// Every file number in the directory, ascending.
    pub(crate) fn files(&self) -> Result<Vec<u64>, StoreError> {
        log::numbered(&self.dir, SUFFIX).map_err(|e| log::io_error(&self.dir, e))
    }

    /// Writes `bytes` as `which` part of the context at `key` into a new
    /// file, synced; the directory entry is synced by `sync_dir`, which the
    /// caller runs once for all the files of a group before it refers to
    /// any of them.
    pub(crate) fn write(&self, which: Which, key: &[u8], bytes: &[u8]) -> Result<Location, StoreError> {
        let no = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.path(no);
        let file_bytes = frame(which, key, bytes);
        let crc = u32::from_le_bytes(file_bytes[11..15].try_into().expect("4 bytes"));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
            f.write_all(&file_bytes)?;
            f.sync_data()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(log::io_error(&path, e));
        }
        Ok(Location { file: no, len: bytes.len() as u32, crc })
    }

    pub(crate) fn sync_dir(&self) -> Result<(), StoreError> {
        log::sync_dir(&self.dir).map_err(|e| log::io_error(&self.dir, e))
    }

    /// The part at `loc`, checked against what its location and its own
    /// header say.
    pub(crate) fn read(&self, which: Which, key: &[u8], loc: &Location) -> Result<Vec<u8>, StoreError> {
        let path = self.path(loc.file);
        let bytes = std::fs::read(&path).map_err(|e| log::io_error(&path, e))?;
        unframe(which, key, loc, bytes).map_err(|(at, reason)| StoreError::Corrupt {
            tree: "contexts",
            key: format!("{}@{at}", path.display()),
            reason,
        })
    }

    /// Deletes files nothing refers to any more (a failed delete is logged:
    /// the next open deletes the file).
    pub(crate) fn remove(&self, files: &[u64]) {
        for no in files {
            let path = self.path(*no);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not delete a context part file")
                }
            }
        }
    }
}

/// A part whose file is damaged, gone, or not the one its location names.
pub(crate) struct Damaged {
    /// The conversation's key.
    pub key: Vec<u8>,
    pub which: Which,
    pub path: PathBuf,
    /// Where in the file, and what is wrong.
    pub at: u64,
    pub reason: String,
}

impl PartFiles {
    /// Reads and checks every file `ctx_files` refers to: the files in use,
    /// and the parts whose file failed.
    pub(crate) fn check_all(
        &self,
        ctx_files: &sled::Tree,
    ) -> Result<(HashSet<u64>, Vec<Damaged>), StoreError> {
        let (mut used, mut damaged) = (HashSet::new(), Vec::new());
        for kv in ctx_files.iter() {
            let (k, v) = kv?;
            let which = k.first().and_then(|t| Which::of_tag(*t));
            let (Some(which), Ok(loc)) = (which, super::contexts::decode_location(&k, &v)) else {
                let reason = "not a part's location".to_string();
                return Err(StoreError::Corrupt {
                    tree: "ctx_files",
                    key: String::from_utf8_lossy(&k).into(),
                    reason,
                });
            };
            let key = k[1..].to_vec();
            let path = self.path(loc.file);
            let read = std::fs::read(&path).map_err(|e| (0, e.to_string()));
            match read.and_then(|bytes| unframe(which, &key, &loc, bytes)) {
                Ok(_) => {
                    used.insert(loc.file);
                }
                Err((at, reason)) => damaged.push(Damaged { key, which, path, at, reason }),
            }
        }
        Ok((used, damaged))
    }

    /// Deletes the files in the directory that are not in `used` (left by
    /// a write cut short, or by a delete that did not happen); how many.
    pub(crate) fn remove_unused(&self, used: &HashSet<u64>) -> Result<usize, StoreError> {
        let unused: Vec<u64> = self.files()?.into_iter().filter(|no| !used.contains(no)).collect();
        self.remove(&unused);
        Ok(unused.len())
    }
}

/// What `turnstile verify` says of the part files of `data_dir`: each
/// damaged one, as the open would drop it.
pub(crate) fn verify(data_dir: &Path, ctx_files: &sled::Tree) -> Result<Vec<String>, StoreError> {
    let (_, damaged) = PartFiles::at(data_dir).check_all(ctx_files)?;
    Ok(damaged
        .iter()
        .map(|d| {
            format!(
                "{}@{}: {}; the context's {} is dropped on the next start",
                d.path.display(),
                d.at,
                d.reason,
                d.which.name()
            )
        })
        .collect())
}

/// The file's bytes: header, key, payload.
fn frame(which: Which, key: &[u8], bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + key.len() + bytes.len());
    out.extend_from_slice(PART_MAGIC);
    out.push(which.tag());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(key);
    out.extend_from_slice(bytes);
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..11]);
    h.update(&out[HEADER..]);
    let crc = h.finalize();
    out[11..15].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The payload of a file's `bytes`, or where and what is wrong with them.
fn unframe(which: Which, key: &[u8], loc: &Location, mut bytes: Vec<u8>) -> Result<Vec<u8>, (u64, String)> {
    if bytes.len() < HEADER || &bytes[..4] != PART_MAGIC {
        return Err((0, format!("not a context part file ({} bytes)", bytes.len())));
    }
    let key_len = u16::from_le_bytes([bytes[5], bytes[6]]) as usize;
    let len = u32::from_le_bytes(bytes[7..11].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[11..15].try_into().expect("4 bytes"));
    let whole = HEADER + key_len + len;
    if bytes.len() != whole {
        return Err((
            bytes.len().min(whole) as u64,
            format!("{} bytes where its header says {whole}", bytes.len()),
        ));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..11]);
    h.update(&bytes[HEADER..]);
    if h.finalize() != crc {
        return Err((0, "its checksum does not match what it holds".into()));
    }
    if bytes[4] != which.tag() || &bytes[HEADER..HEADER + key_len] != key {
        return Err((0, "it holds another context's part".into()));
    }
    if crc != loc.crc || len != loc.len as usize {
        return Err((0, "it is not the version the store refers to".into()));
    }
    bytes.drain(..HEADER + key_len);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_reads_back_only_from_the_file_and_version_it_was_written_as() {
        let dir = tempfile::tempdir().unwrap();
        let files = PartFiles::open(dir.path()).unwrap();
        let key = b"c\0p\0".as_slice();
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let loc = files.write(Which::Dialogue, key, &payload).unwrap();
        files.sync_dir().unwrap();
        assert_eq!(files.read(Which::Dialogue, key, &loc).unwrap(), payload);
        assert!(files.read(Which::Cache, key, &loc).is_err(), "the other part");
        assert!(files.read(Which::Dialogue, b"c\0q\0", &loc).is_err(), "another conversation");
        let stale = Location { crc: loc.crc ^ 1, ..loc };
        assert!(files.read(Which::Dialogue, key, &stale).is_err(), "another version");

        let path = files.path(loc.file);
        let good = std::fs::read(&path).unwrap();
        for at in [0, 5, HEADER + 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let e = files.read(Which::Dialogue, key, &loc).unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        assert!(files.read(Which::Dialogue, key, &loc).is_err(), "cut short");
        std::fs::write(&path, &good).unwrap();

        // Numbers go on above the files there after a reopen.
        let again = PartFiles::open(dir.path()).unwrap();
        assert!(again.write(Which::Cache, key, b"x").unwrap().file > loc.file);
        files.remove(&[loc.file, loc.file]);
        assert!(!path.exists());
    }
}
