//! The message log: accepted messages and turn claims, appended to segment
//! files in `log/` and made durable by one `fdatasync` per group of writes.
//!
//! Why a log of our own: an acknowledged webhook must survive a power cut,
//! and sled's flush is not an fsync (it ends in `sync_file_range`). An append
//! and an `fdatasync` of one file is the cheapest honest durability point,
//! and it costs the same for one message or a hundred, which is what group
//! commit needs. sled keeps everything committed; the log only what is not
//! yet answered by a committed turn. A segment is deleted once every record
//! in it is retired by a commit (or a dead-lettering) that sled has synced.
//!
//! Record framing, little-endian: `len: u32` (kind + payload), `crc32: u32`
//! (of kind + payload), `kind: u8`, payload (bincode). A record that is short
//! or fails its checksum at the end of the newest segment is the torn tail of
//! a crash and is cut off on open; anywhere else it is corruption.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::records::decode;
use super::StoreError;
use crate::message::{Conv, Message};

/// The log's directory, inside the data directory.
pub(crate) const DIR_NAME: &str = "log";
/// A segment is closed and a new one started past this size.
pub(crate) const ROLL_BYTES: u64 = 32 << 20;
/// A fully retired head segment is replaced by a new one past this size, so
/// that an idle daemon does not keep an old file around.
pub(crate) const ROLL_IDLE_BYTES: u64 = 1 << 20;
const HEADER: usize = 9;
/// Larger than any record turnstile writes (a 64 KiB webhook, or a claim of a
/// few hundred sequence numbers): a longer length field is damage.
const MAX_RECORD: u32 = 16 << 20;

const KIND_MESSAGE: u8 = 1;
const KIND_CLAIM: u8 = 2;
/// A probe: written to learn whether the log can be written again; read as nothing.
const KIND_PROBE: u8 = 3;

/// A turn as the log knows it: which messages it answers, so that after a
/// restart it re-runs with the same id and the same input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Claim {
    pub turn_id: String,
    pub conv: Conv,
    pub seqs: Vec<u64>,
    pub cut_reason: String,
    pub cut_at_ms: u64,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    Message(Message),
    Claim(Claim),
}

/// Appends one framed message record to `out`.
pub(crate) fn frame_message(m: &Message, out: &mut Vec<u8>) {
    frame(KIND_MESSAGE, m, out)
}

/// Appends one framed claim record to `out`.
pub(crate) fn frame_claim(c: &Claim, out: &mut Vec<u8>) {
    frame(KIND_CLAIM, c, out)
}

/// Appends one framed probe record (no payload) to `out`.
pub(crate) fn frame_probe(out: &mut Vec<u8>) {
    frame(KIND_PROBE, &(), out)
}

/// The record is encoded in place after a header that is filled in last:
/// `len u32, crc32 u32` over `kind u8, bincode payload`. The one framing of
/// the store's own files (the log, the LID links).
pub(crate) fn frame<T: Serialize>(kind: u8, value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.push(kind);
    bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
        .expect("bincode encodes our records into a Vec");
    let body = &out[start + 8..];
    let (len, crc) = (body.len() as u32, crc32fast::hash(body));
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One framed record: its offset, kind and payload.
pub(crate) type Record<'a> = (usize, u8, &'a [u8]);

/// Every whole record of `bytes` from the start, as (offset, kind, payload),
/// up to the first one that is short or fails its checksum; and the length
/// of the whole ones (what follows is a torn tail, or damage).
pub(crate) fn records(bytes: &[u8]) -> (Vec<Record<'_>>, usize) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD || bytes.len() - at - 8 < len as usize {
            break;
        }
        let body = &bytes[at + 8..at + 8 + len as usize];
        if crc32fast::hash(body) != crc {
            break;
        }
        out.push((at, body[0], &body[1..]));
        at += 8 + len as usize;
    }
    (out, at)
}

pub(crate) fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016x}.seg"))
}

/// Segment numbers in `dir`, oldest first. Other files are left alone.
pub(crate) fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    numbered(dir, ".seg")
}

/// The numbers of the files in `dir` named `<hex number><suffix>`, sorted.
pub(crate) fn numbered(dir: &Path, suffix: &str) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(no) = name.strip_suffix(suffix).and_then(|h| u64::from_str_radix(h, 16).ok()) {
            out.push(no);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// What reading a segment found.
pub(crate) struct SegmentRead {
    pub entries: Vec<Entry>,
    /// Bytes of whole, valid records from the start.
    pub valid_len: u64,
    /// Bytes after them (a torn tail, or damage).
    pub trailing: u64,
}

/// Reads every whole record of a segment. Stops at the first record that is
/// short or fails its checksum; what follows is reported as `trailing`.
pub(crate) fn read_segment(path: &Path) -> Result<SegmentRead, StoreError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| io_error(path, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut entries = Vec::new();
    let (found, valid) = records(&bytes);
    for (at, kind, payload) in found {
        let key = format!("{name}@{at}");
        entries.push(match kind {
            KIND_MESSAGE => Entry::Message(decode("log", key.as_bytes(), payload)?),
            KIND_CLAIM => Entry::Claim(decode("log", key.as_bytes(), payload)?),
            KIND_PROBE => continue,
            kind => {
                return Err(StoreError::Corrupt {
                    tree: "log",
                    key,
                    reason: format!("unknown record kind {kind}"),
                })
            }
        });
    }
    Ok(SegmentRead { entries, valid_len: valid as u64, trailing: (bytes.len() - valid) as u64 })
}

/// The segment being appended to.
pub(crate) struct Head {
    pub no: u64,
    file: File,
    /// Bytes durably written (everything below is synced).
    pub len: u64,
}

/// An append that failed. `rolled_back`: the segment was cut back to where
/// the group began and synced, so nothing of the group remains; otherwise
/// the segment's state is unknown and the log must not be written again.
#[derive(Debug)]
pub(crate) struct AppendError {
    pub error: io::Error,
    pub rolled_back: bool,
}

impl Head {
    /// Creates segment `no` in `dir` and makes its directory entry durable.
    pub(crate) fn create(dir: &Path, no: u64) -> io::Result<Head> {
        let path = segment_path(dir, no);
        let file = OpenOptions::new().write(true).create_new(true).open(&path)?;
        sync_dir(dir)?;
        Ok(Head { no, file, len: 0 })
    }

    /// Writes `buf` at the end and syncs it. `fault` stands in for the
    /// write's own result, so an injected error takes the real error's path.
    pub(crate) fn append(&mut self, buf: &[u8], fault: Option<io::Error>) -> Result<(), AppendError> {
        let written = match fault {
            Some(e) => Err(e),
            None => self.file.write_all_at(buf, self.len).and_then(|_| self.file.sync_data()),
        };
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(error) => {
                // After a failed write or sync the page cache may hold part
                // of the group, or may later write it: cut the file back and
                // sync, so the group is surely gone before anyone is told.
                let rolled_back = self.file.set_len(self.len).and_then(|_| self.file.sync_data()).is_ok();
                Err(AppendError { error, rolled_back })
            }
        }
    }
}

/// Cuts a segment back to its valid records and syncs it (a torn tail).
pub(crate) fn truncate(path: &Path, len: u64) -> Result<(), StoreError> {
    let f = OpenOptions::new().write(true).open(path).map_err(|e| io_error(path, e))?;
    f.set_len(len).and_then(|_| f.sync_all()).map_err(|e| io_error(path, e))
}

/// Replaces `dir/name` with `bytes` whole: written to `name.tmp`, synced,
/// renamed over it. The caller syncs `dir` to make the rename durable.
pub(crate) fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

/// fsync of a directory: makes the creation, rename or removal of its
/// entries durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(crate) fn io_error(path: &Path, e: io::Error) -> StoreError {
    StoreError::Io { path: path.display().to_string(), source: e }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64) -> Message {
        Message {
            seq,
            id: format!("id-{seq}"),
            conv: Conv { phone: "79001234567".into(), company_id: "c".into() },
            kind: "text".into(),
            text: "Привет".into(),
            timestamp: None,
            received_at_ms: 1_763_800_000_000 + seq,
        }
    }

    #[test]
    fn records_read_back_and_a_torn_tail_is_reported_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut head = Head::create(dir.path(), 1).unwrap();
        let mut buf = Vec::new();
        frame_message(&message(1), &mut buf);
        let claim = Claim {
            turn_id: "t1".into(),
            conv: message(1).conv,
            seqs: vec![1],
            cut_reason: "quiet".into(),
            cut_at_ms: 5,
            attempts: 0,
        };
        frame_claim(&claim, &mut buf);
        head.append(&buf, None).unwrap();
        let whole = head.len;
        // Half of a third record: what a crash mid-write leaves.
        let mut third = Vec::new();
        frame_message(&message(2), &mut third);
        head.append(&third[..third.len() / 2], None).unwrap();

        let path = segment_path(dir.path(), 1);
        let read = read_segment(&path).unwrap();
        assert_eq!(read.entries, vec![Entry::Message(message(1)), Entry::Claim(claim)]);
        assert_eq!((read.valid_len, read.trailing), (whole, third.len() as u64 / 2));
        // A flipped byte inside a record ends the valid part there.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 2] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_segment(&path).unwrap().valid_len, 0);
        assert_eq!(segments(dir.path()).unwrap(), vec![1]);
    }

    #[test]
    fn a_failed_append_leaves_nothing_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut head = Head::create(dir.path(), 7).unwrap();
        let mut buf = Vec::new();
        frame_message(&message(1), &mut buf);
        head.append(&buf, None).unwrap();
        let mut more = Vec::new();
        frame_message(&message(2), &mut more);
        let failed = head.append(&more, Some(io::Error::from_raw_os_error(28))).unwrap_err();
        assert!(failed.rolled_back);
        assert_eq!(failed.error.raw_os_error(), Some(28));
        head.append(&more, None).unwrap();
        let read = read_segment(&segment_path(dir.path(), 7)).unwrap();
        assert_eq!(read.entries, vec![Entry::Message(message(1)), Entry::Message(message(2))]);
    }
}
