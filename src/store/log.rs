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
//! or fails its checksum at the end of the newest segment, with no whole
//! record after it, is the torn tail of a crash and is cut off on open;
//! anywhere else — in a closed segment, or followed by whole records — it is
//! damage, and the open stops there (`tail`).

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

/// What follows the whole records at the start of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Nothing: the file is whole records.
    Clean,
    /// Bytes from `at` to the end, from no point of which whole records run
    /// to the end: what a crash in the middle of an append leaves.
    Torn { at: u64, bytes: u64 },
    /// A damaged record at `at`, and whole records again from `resumes` to
    /// the end: no crash leaves that (a group is written in order and
    /// synced before the next), so it is damage.
    Damaged { at: u64, resumes: u64 },
}

impl Tail {
    /// Of `bytes` whose first `valid` bytes are whole records.
    pub(crate) fn of(bytes: &[u8], valid: usize) -> Tail {
        if valid >= bytes.len() {
            return Tail::Clean;
        }
        match resumes_after(bytes, valid) {
            Some(at) => Tail::Damaged { at: valid as u64, resumes: at as u64 },
            None => Tail::Torn { at: valid as u64, bytes: (bytes.len() - valid) as u64 },
        }
    }
}

/// The first offset after `from` from which whole records with good
/// checksums, of kinds the store writes, run to the very end. Only such a
/// run tells damage from a torn append: a record cut short may hold, in its
/// text, bytes that frame a record (a client can send them), but a crash
/// cuts it at a point of its own, seldom at the end of one (and such bytes
/// would have to frame a kind the store writes, too). Cheap in practice: at most offsets the
/// length field is out of range or past the end, and a checksum is
/// computed only for the few that are not.
pub(crate) fn resumes_after(bytes: &[u8], from: usize) -> Option<usize> {
    // A record whose length runs past the end is what a cut append leaves,
    // whatever its text holds: nothing inside it counts as a resumption.
    // (The price: a flip in such a record's length field reads as a torn
    // tail, and what follows it is cut, with the warning naming the offset.)
    if let Some(header) = bytes.get(from..from + 4) {
        let len = u32::from_le_bytes(header.try_into().expect("4 bytes")) as usize;
        if (1..=MAX_RECORD as usize).contains(&len) && from + 8 + len > bytes.len() {
            return None;
        }
    }
    let runs_to_end = |mut at: usize| {
        while at < bytes.len() {
            match whole_record_at(bytes, at) {
                Some(len) => at += len,
                None => return false,
            }
        }
        true
    };
    (from + 1..bytes.len().saturating_sub(HEADER - 1))
        .find(|&at| whole_record_at(bytes, at).is_some() && runs_to_end(at))
}

/// The length of the whole, checked record at `at`, if one starts there.
fn whole_record_at(bytes: &[u8], at: usize) -> Option<usize> {
    let header = bytes.get(at..at + 8)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_RECORD || bytes.len() - at - 8 < len as usize {
        return None;
    }
    let body = &bytes[at + 8..at + 8 + len as usize];
    (KINDS.contains(&body[0]) && crc32fast::hash(body) == crc).then_some(8 + len as usize)
}

/// The kinds of record the store's files in this framing hold (the log's;
/// the side files' 1).
const KINDS: [u8; 3] = [KIND_MESSAGE, KIND_CLAIM, KIND_PROBE];

/// What the open may do with a file's `tail`: nothing (`None`), cut off
/// the torn tail of the file appended to last (`Some((at, bytes))`), or
/// stop with the error naming the file and the offset of the damage.
pub(crate) fn check_tail(
    tree: &'static str,
    file: &Path,
    tail: Tail,
    appended_last: bool,
) -> Result<Option<(u64, u64)>, StoreError> {
    let key = |at: u64| format!("{}@{at}", file.display());
    match tail {
        Tail::Clean => Ok(None),
        Tail::Torn { at, bytes } if appended_last => Ok(Some((at, bytes))),
        Tail::Torn { at, bytes } => Err(StoreError::Corrupt {
            tree,
            key: key(at),
            reason: format!("{bytes} damaged bytes at the end of a file no longer appended to"),
        }),
        Tail::Damaged { at, resumes } => Err(damaged(tree, file, at, resumes)),
    }
}

/// A damaged record at `at` in `file`, whole records again from `resumes`.
pub(crate) fn damaged(tree: &'static str, file: &Path, at: u64, resumes: u64) -> StoreError {
    StoreError::Corrupt {
        tree,
        key: format!("{}@{at}", file.display()),
        reason: format!(
            "a damaged record, then whole records again from offset {resumes}: damage, not the torn tail a crash leaves"
        ),
    }
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
    /// What follows them (a torn tail, or damage).
    pub tail: Tail,
}

/// Reads every whole record of a segment. Stops at the first record that is
/// short or fails its checksum; what follows is reported as `tail`.
pub(crate) fn read_segment(path: &Path) -> Result<SegmentRead, StoreError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| io_error(path, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut entries = Vec::new();
    let (found, valid) = records(&bytes);
    for (at, kind, payload) in found {
        // The record's name (file@offset) is made only for an error.
        let named = |e: StoreError| match e {
            StoreError::Corrupt { tree, reason, .. } => {
                StoreError::Corrupt { tree, key: format!("{name}@{at}"), reason }
            }
            other => other,
        };
        entries.push(match kind {
            KIND_MESSAGE => Entry::Message(decode("log", &[], payload).map_err(named)?),
            KIND_CLAIM => Entry::Claim(decode("log", &[], payload).map_err(named)?),
            KIND_PROBE => continue,
            kind => {
                return Err(StoreError::Corrupt {
                    tree: "log",
                    key: format!("{name}@{at}"),
                    reason: format!("unknown record kind {kind}"),
                })
            }
        });
    }
    Ok(SegmentRead { entries, valid_len: valid as u64, tail: Tail::of(&bytes, valid) })
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
        assert_eq!(
            (read.valid_len, read.tail),
            (whole, Tail::Torn { at: whole, bytes: third.len() as u64 / 2 })
        );
        // A flipped byte inside a record ends the valid part there.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 2] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_segment(&path).unwrap().valid_len, 0);
        assert_eq!(segments(dir.path()).unwrap(), vec![1]);
    }

    #[test]
    fn damage_followed_by_whole_records_is_told_from_a_torn_tail() {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=3 {
            starts.push(bytes.len());
            frame_message(&message(seq), &mut bytes);
        }
        let tail = |b: &[u8]| Tail::of(b, records(b).1);
        assert_eq!(tail(&bytes), Tail::Clean);
        // A byte of the second record flipped (checksum or payload): damage.
        for at in [starts[1] + 4, starts[1] + 5, starts[1] + HEADER + 3] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            let found = tail(&b);
            assert_eq!(
                found,
                Tail::Damaged { at: starts[1] as u64, resumes: starts[2] as u64 },
                "flip at {at}"
            );
            let err = check_tail("log", Path::new("/d/log/1.seg"), found, true).unwrap_err().to_string();
            assert!(err.contains(&format!("1.seg@{}", starts[1])), "{err}");
        }
        // Its length flipped so that it runs past the end: that reads as a
        // cut append (the price of never taking a cut record's text for
        // records), and the open cuts from there, naming the offset.
        let mut b = bytes.clone();
        b[starts[1]] ^= 0x40;
        assert_eq!(tail(&b), Tail::Torn { at: starts[1] as u64, bytes: (bytes.len() - starts[1]) as u64 });
        // The last record flipped, cut short, or zeroed: what a crash leaves.
        let mut b = bytes.clone();
        b[starts[2] + HEADER + 1] ^= 1;
        assert_eq!(tail(&b), Tail::Torn { at: starts[2] as u64, bytes: (bytes.len() - starts[2]) as u64 });
        assert_eq!(
            tail(&bytes[..bytes.len() - 3]),
            Tail::Torn { at: starts[2] as u64, bytes: (bytes.len() - 3 - starts[2]) as u64 }
        );
        let mut b = bytes.clone();
        b[starts[2]..].fill(0);
        assert!(matches!(tail(&b), Tail::Torn { .. }));
        assert_eq!(
            check_tail("log", Path::new("x"), tail(&b), true).unwrap(),
            Some((starts[2] as u64, (bytes.len() - starts[2]) as u64))
        );
        // ... but not in a file no longer appended to.
        assert!(check_tail("log", Path::new("x"), tail(&b), false).is_err());
        // A zeroed page in the middle, whole records after it: damage.
        let mut b = bytes.clone();
        b[..starts[2]].fill(0);
        assert_eq!(tail(&b), Tail::Damaged { at: 0, resumes: starts[2] as u64 });
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
