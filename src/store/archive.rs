//! Dedup marks that left sled: the hashes of retired message ids, appended
//! a chunk at a time to files in `dedup/`, one file per hour of retirements.
//!
//! Why: a mark must be kept `ingest.dedup_days`, and in sled it costs far
//! more than its 16 bytes — measured, about 130 B of file and 170 B of
//! memory per message (sled's decoded pages are not bounded by its cache
//! figure), growing for the whole window. Here a mark costs 16 bytes of
//! file, and the memory of the writer's set.
//!
//! A commit still writes its mark into sled's `dedup` tree, in the same
//! transaction as the turn, so a crash can never separate the two. Every
//! minute the sweep moves what is there into the newest file: the chunk is
//! written and `fdatasync`ed first, then the records leave sled. A crash
//! between the two leaves a mark in both places, which is harmless: the
//! set takes it once. Whole files go when their newest mark is past the
//! window.
//!
//! Chunk framing, little-endian: `count: u32`, `crc32: u32` (of what
//! follows), `newest_ms: u64` (the latest retirement in the chunk), then
//! `count` hashes of 16 bytes (big-endian, as in sled's records). A short or
//! damaged chunk at the end of the newest file, with no whole chunk after
//! it, is the torn tail of a crash (its marks are still in sled) and is cut
//! off on open; anywhere else it is damage, and the open stops there.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::dedup::{self, IdHash, IdSet};
use super::log::{check_tail, io_error, sync_dir, Tail};
use super::StoreError;

/// The archive's directory, inside the data directory.
pub(crate) const DIR_NAME: &str = "dedup";
/// A file takes the chunks of this long, from its first chunk's time on.
const FILE_SPAN_MS: u64 = 3600 * 1000;
const HEADER: usize = 16;
/// More hashes than one chunk ever holds: a larger count is damage.
const MAX_COUNT: u32 = 1 << 24;

/// One chunk of marks, and the latest time any of them was retired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub newest_ms: u64,
    pub hashes: Vec<IdHash>,
}

#[derive(Debug, Clone, Copy)]
struct FileInfo {
    no: u64,
    first_ms: u64,
    newest_ms: u64,
    len: u64,
}

/// The files, as the store writer appends to and expires them.
pub(crate) struct Archive {
    dir: PathBuf,
    files: Vec<FileInfo>,
    /// The newest file, open for appends; `None` until the first append
    /// after an open, a roll or an expiry of it.
    head: Option<File>,
    /// A failed append may have left bytes past the newest file's length.
    torn: bool,
    /// Each append is `fdatasync`ed (off only for an import, which syncs
    /// the whole directory at the end).
    sync: bool,
}

fn file_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016x}.ids"))
}

/// File numbers in `dir`, oldest first; none if there is no directory.
fn file_nos(dir: &Path) -> io::Result<Vec<u64>> {
    match super::log::numbered(dir, ".ids") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        listed => listed,
    }
}

fn frame(newest_ms: u64, hashes: &[IdHash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + hashes.len() * 16);
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&newest_ms.to_le_bytes());
    out.extend_from_slice(&dedup::pack(hashes));
    let crc = crc32fast::hash(&out[8..]);
    out[..4].copy_from_slice(&(hashes.len() as u32).to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The end of the whole, checked chunk at `at`, if one starts there.
fn chunk_at(bytes: &[u8], at: usize) -> Option<usize> {
    let header = bytes.get(at..at + HEADER)?;
    let count = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let end = at + HEADER + count as usize * 16;
    let whole = count != 0 && count <= MAX_COUNT && end <= bytes.len();
    (whole && crc32fast::hash(&bytes[at + 8..end]) == crc).then_some(end)
}

/// Every whole chunk of a file, how many bytes they take from its start,
/// and what follows them: a torn chunk (no whole chunk after it) or damage.
fn read_file(path: &Path) -> Result<(Vec<Chunk>, u64, Tail), StoreError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| io_error(path, e))?;
    let mut chunks = Vec::new();
    let mut at = 0usize;
    while let Some(end) = chunk_at(&bytes, at) {
        let newest_ms = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes"));
        let hashes = dedup::unpack(&bytes[at + HEADER..end]).expect("a multiple of 16 bytes");
        chunks.push(Chunk { newest_ms, hashes });
        at = end;
    }
    let tail = if at == bytes.len() {
        Tail::Clean
    } else {
        // Whole chunks from some offset to the very end: damage, not the
        // torn chunk of a crash (as the log's `resumes_after`).
        let runs_to_end = |mut next: usize| {
            while next < bytes.len() {
                match chunk_at(&bytes, next) {
                    Some(end) => next = end,
                    None => return false,
                }
            }
            true
        };
        match (at + 1..bytes.len()).find(|&next| chunk_at(&bytes, next).is_some() && runs_to_end(next)) {
            Some(next) => Tail::Damaged { at: at as u64, resumes: next as u64 },
            None => Tail::Torn { at: at as u64, bytes: (bytes.len() - at) as u64 },
        }
    };
    Ok((chunks, at as u64, tail))
}

/// Every chunk of every file, oldest file first (for an export; a torn
/// tail is left out, its marks are still in sled).
pub(crate) fn read_all(data_dir: &Path) -> Result<Vec<Chunk>, StoreError> {
    let mut out = Vec::new();
    for path in files(data_dir)? {
        out.extend(read_file(&path)?.0);
    }
    Ok(out)
}

/// How many marks the files hold (for the per-tree sizes): walks the chunk
/// headers only, so a week of marks costs a read per chunk, not the marks.
pub(crate) fn marks(data_dir: &Path) -> Result<u64, StoreError> {
    let mut marks = 0;
    for path in files(data_dir)? {
        let counted = File::open(&path).and_then(|f| {
            let len = f.metadata()?.len();
            let (mut at, mut header) = (0u64, [0u8; 4]);
            while at + HEADER as u64 <= len {
                f.read_exact_at(&mut header, at)?;
                let count = u32::from_le_bytes(header) as u64;
                let end = at + HEADER as u64 + count * 16;
                if count == 0 || end > len {
                    break;
                }
                marks += count;
                at = end;
            }
            Ok(())
        });
        // A file expired and deleted since the listing counts as empty.
        if let Err(e) = counted.or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        {
            return Err(io_error(&path, e));
        }
    }
    Ok(marks)
}

/// Bytes of the files on disk.
pub(crate) fn bytes(data_dir: &Path) -> Result<u64, StoreError> {
    Ok(files(data_dir)?.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum())
}

/// The archive's files, oldest first.
fn files(data_dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let dir = data_dir.join(DIR_NAME);
    Ok(file_nos(&dir).map_err(|e| io_error(&dir, e))?.into_iter().map(|no| file_path(&dir, no)).collect())
}

/// What opening the archive would cut (for `verify`), changing nothing;
/// the error the open would stop with.
pub(crate) fn check(data_dir: &Path) -> Result<Vec<String>, StoreError> {
    let dir = data_dir.join(DIR_NAME);
    let nos = file_nos(&dir).map_err(|e| io_error(&dir, e))?;
    let mut notes = Vec::new();
    for (i, &no) in nos.iter().enumerate() {
        let path = file_path(&dir, no);
        let (_, _, tail) = read_file(&path)?;
        if let Some((at, bytes)) = check_tail("dedup", &path, tail, i + 1 == nos.len())? {
            notes.push(format!(
                "{}@{at}: a torn chunk of {bytes} bytes at the end; cut off on the next start",
                path.display()
            ));
        }
    }
    Ok(notes)
}

impl Archive {
    /// Reads every file's marks into `seen`; a torn tail of the newest file
    /// is cut off, damage elsewhere refuses the open.
    pub(crate) fn open(data_dir: &Path, seen: &mut IdSet) -> Result<Archive, StoreError> {
        let dir = data_dir.join(DIR_NAME);
        let nos = file_nos(&dir).map_err(|e| io_error(&dir, e))?;
        let mut files = Vec::with_capacity(nos.len());
        for (i, &no) in nos.iter().enumerate() {
            let path = file_path(&dir, no);
            let (chunks, valid, tail) = read_file(&path)?;
            if let Some((at, bytes)) = check_tail("dedup", &path, tail, i + 1 == nos.len())? {
                tracing::warn!(file = %path.display(), offset = at, bytes, "cut a torn chunk off the dedup archive: what a crash in the middle of an append leaves");
                super::damage::noted(&path, &format!("a torn chunk of {bytes} bytes cut at offset {at}"));
                super::log::truncate(&path, valid)?;
            }
            for c in &chunks {
                seen.extend(c.hashes.iter().copied());
            }
            match (chunks.first(), chunks.iter().map(|c| c.newest_ms).max()) {
                (Some(first), Some(newest_ms)) => {
                    files.push(FileInfo { no, first_ms: first.newest_ms, newest_ms, len: valid })
                }
                // Empty (a crash right after its creation): the next append
                // starts a file of its own.
                _ => std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?,
            }
        }
        Ok(Archive { dir, files, head: None, torn: false, sync: true })
    }

    /// An archive written by an import: appends are not synced one by one.
    pub(crate) fn unsynced(data_dir: &Path) -> Result<Archive, StoreError> {
        let mut archive = Archive::open(data_dir, &mut IdSet::default())?;
        archive.sync = false;
        Ok(archive)
    }

    /// Appends one chunk to the newest file (a new one once the newest
    /// spans an hour) and syncs it: durable when this returns `Ok`.
    pub(crate) fn append(&mut self, newest_ms: u64, hashes: &[IdHash]) -> io::Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let roll = self.files.last().is_none_or(|f| newest_ms >= f.first_ms.saturating_add(FILE_SPAN_MS));
        if roll || self.head.is_none() {
            self.open_head(roll, newest_ms)?;
        }
        let buf = frame(newest_ms, hashes);
        let (head, info) =
            (self.head.as_ref().expect("opened above"), self.files.last_mut().expect("opened above"));
        let mut written = head.write_all_at(&buf, info.len);
        if written.is_ok() && self.torn {
            written = head.set_len(info.len + buf.len() as u64);
        }
        if written.is_ok() && self.sync {
            written = head.sync_data();
        }
        match written {
            Ok(()) => {
                self.torn = false;
                info.len += buf.len() as u64;
                info.newest_ms = info.newest_ms.max(newest_ms);
                Ok(())
            }
            Err(e) => {
                // Whatever reached the file past `len` is overwritten (and
                // cut) by the next append, or cut off on the next open.
                self.torn = true;
                Err(e)
            }
        }
    }

    fn open_head(&mut self, roll: bool, newest_ms: u64) -> io::Result<()> {
        if !roll {
            let info = self.files.last().expect("not a roll: there is a file");
            self.head = Some(OpenOptions::new().write(true).open(file_path(&self.dir, info.no))?);
            return Ok(());
        }
        if self.torn {
            // A failed append left bytes past the end of the file being
            // left behind: cut them now, or the next open would find damage
            // in a file no longer appended to.
            if let (Some(head), Some(info)) = (self.head.as_ref(), self.files.last()) {
                head.set_len(info.len)?;
                if self.sync {
                    head.sync_data()?;
                }
            }
        }
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir)?;
            if self.sync {
                sync_dir(self.dir.parent().expect("the archive is inside the data directory"))?;
            }
        }
        let no = self.files.last().map_or(1, |f| f.no + 1);
        let file = OpenOptions::new().write(true).create_new(true).open(file_path(&self.dir, no))?;
        if self.sync {
            sync_dir(&self.dir)?;
        }
        self.files.push(FileInfo { no, first_ms: newest_ms, newest_ms, len: 0 });
        self.head = Some(file);
        self.torn = false;
        Ok(())
    }

    /// The files whose every mark was retired before `cutoff_ms`, with
    /// their marks (to forget them in memory once the files are gone).
    pub(crate) fn expiring(&self, cutoff_ms: u64) -> Result<Vec<(u64, Vec<IdHash>)>, StoreError> {
        let mut out = Vec::new();
        for f in self.files.iter().filter(|f| f.newest_ms < cutoff_ms && f.len > 0) {
            let (chunks, _, _) = read_file(&file_path(&self.dir, f.no))?;
            out.push((f.no, chunks.into_iter().flat_map(|c| c.hashes).collect()));
        }
        Ok(out)
    }

    /// Deletes expired files. A deletion a crash undoes is done again by
    /// the next sweep.
    pub(crate) fn remove(&mut self, nos: &[u64]) {
        if self.files.last().is_some_and(|f| nos.contains(&f.no)) {
            self.head = None;
        }
        for no in nos {
            let path = file_path(&self.dir, *no);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete an expired dedup archive file");
            }
        }
        self.files.retain(|f| !nos.contains(&f.no));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes_of(range: std::ops::Range<u128>) -> Vec<IdHash> {
        range.map(|i| i * 0x1_0000_0001).collect()
    }

    #[test]
    fn chunks_come_back_files_roll_by_the_hour_and_expire_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Archive::open(dir.path(), &mut IdSet::default()).unwrap();
        a.append(1_000, &hashes_of(0..3)).unwrap();
        a.append(2_000, &hashes_of(3..5)).unwrap();
        a.append(1_000 + FILE_SPAN_MS, &hashes_of(5..6)).unwrap();
        assert_eq!(file_nos(&dir.path().join(DIR_NAME)).unwrap(), [1, 2]);
        assert_eq!(
            read_all(dir.path()).unwrap(),
            vec![
                Chunk { newest_ms: 1_000, hashes: hashes_of(0..3) },
                Chunk { newest_ms: 2_000, hashes: hashes_of(3..5) },
                Chunk { newest_ms: 1_000 + FILE_SPAN_MS, hashes: hashes_of(5..6) },
            ]
        );
        assert_eq!((marks(dir.path()).unwrap(), bytes(dir.path()).unwrap()), (6, 3 * 16 + 6 * 16));

        let mut seen = IdSet::default();
        let mut a = Archive::open(dir.path(), &mut seen).unwrap();
        assert_eq!(seen.len(), 6);
        assert!(a.expiring(2_000).unwrap().is_empty(), "the first file's newest mark is at 2,000");
        let gone = a.expiring(2_001).unwrap();
        assert_eq!(gone, vec![(1, hashes_of(0..5))]);
        a.remove(&[1]);
        a.append(2 * FILE_SPAN_MS, &hashes_of(6..7)).unwrap();
        let mut seen = IdSet::default();
        Archive::open(dir.path(), &mut seen).unwrap();
        assert_eq!(seen, hashes_of(5..7).into_iter().collect());
    }

    #[test]
    fn a_torn_tail_of_the_newest_file_is_cut_off_and_damage_elsewhere_refuses_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Archive::open(dir.path(), &mut IdSet::default()).unwrap();
        a.append(1_000, &hashes_of(0..2)).unwrap();
        a.append(1_000 + FILE_SPAN_MS, &hashes_of(2..4)).unwrap();
        let newest = file_path(&dir.path().join(DIR_NAME), 2);
        let whole = std::fs::metadata(&newest).unwrap().len();
        // Half a chunk after the last whole one: a crash in an append.
        let mut torn = std::fs::read(&newest).unwrap();
        torn.extend_from_slice(&frame(9_999_999, &hashes_of(4..8))[..40]);
        std::fs::write(&newest, &torn).unwrap();
        let mut seen = IdSet::default();
        let mut a = Archive::open(dir.path(), &mut seen).unwrap();
        assert_eq!(seen.len(), 4);
        assert_eq!(std::fs::metadata(&newest).unwrap().len(), whole, "cut back to its whole chunks");
        a.append(2_000 + FILE_SPAN_MS, &hashes_of(4..5)).unwrap();
        assert_eq!(read_all(dir.path()).unwrap().len(), 3);

        let oldest = file_path(&dir.path().join(DIR_NAME), 1);
        let mut bytes = std::fs::read(&oldest).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&oldest, &bytes).unwrap();
        match Archive::open(dir.path(), &mut IdSet::default()) {
            Err(StoreError::Corrupt { tree: "dedup", .. }) => {}
            other => panic!("expected the damaged file named, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_damaged_chunk_with_whole_chunks_after_it_refuses_the_open_even_in_the_newest_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Archive::open(dir.path(), &mut IdSet::default()).unwrap();
        for i in 0..3 {
            a.append(1_000 + i, &hashes_of(i as u128 * 2..i as u128 * 2 + 2)).unwrap();
        }
        let path = file_path(&dir.path().join(DIR_NAME), 1);
        let good = std::fs::read(&path).unwrap();
        let chunk = HEADER + 2 * 16;
        let mut bad = good.clone();
        bad[chunk + 20] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let err = Archive::open(dir.path(), &mut IdSet::default()).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(&format!("0000000000000001.ids@{chunk}")), "{err}");
        assert_eq!(check(dir.path()).unwrap_err().to_string(), err, "verify says the same");
        assert_eq!(std::fs::read(&path).unwrap(), bad, "nothing cut");
        // The last chunk damaged: a torn tail, cut off.
        let mut torn = good.clone();
        torn[2 * chunk + 20] ^= 0x01;
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(check(dir.path()).unwrap().len(), 1);
        let mut seen = IdSet::default();
        Archive::open(dir.path(), &mut seen).unwrap();
        assert_eq!((seen.len(), std::fs::metadata(&path).unwrap().len()), (4, 2 * chunk as u64));
    }

    #[test]
    fn a_failed_append_leaves_nothing_the_next_one_or_an_open_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Archive::open(dir.path(), &mut IdSet::default()).unwrap();
        a.append(1_000, &hashes_of(0..2)).unwrap();
        // As if a write had reached the file in part and then failed.
        let path = file_path(&dir.path().join(DIR_NAME), 1);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&[0xAB; 300], len).unwrap();
        a.torn = true;
        a.append(2_000, &hashes_of(2..3)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len + 16 + 16, "the leftover bytes were cut");
        let mut seen = IdSet::default();
        Archive::open(dir.path(), &mut seen).unwrap();
        assert_eq!(seen, hashes_of(0..3).into_iter().collect());
    }
}
