//! The store's record readers, fuzzed: the log's framing (`log::records`,
//! read by the log's segments and by every record file), the dedup
//! archive's chunks and the record files of the small stores. Whatever
//! bytes a crash or a disk leaves, a reader stops at the first record that
//! is not whole and never panics; what was written reads back as written;
//! a file with its end cut off reads as the records before the cut — never
//! a wrong one.

use std::path::Path;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::archive::{self, Archive, Chunk};
use super::dedup::IdSet;
use super::log::{self, Claim, Entry, Tail};
use super::recfile::{OnDamage, RecordFile};
use super::StoreError;
use crate::ingest::fuzz::config;
use crate::message::{Conv, Message};

/// One record in the log's framing, built from the format's own words:
/// `len u32, crc32 u32` over `kind u8, payload`, little-endian.
fn framed(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![kind];
    body.extend_from_slice(payload);
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Any payload, and some whose first fields claim a long string, as a
/// message's or a record file's would: `0` (a one-byte number) then
/// `253` and a u64 length. Behind a checksum that holds, such a claim is
/// what bincode allocates before it reads: up to 2^64 bytes, an abort (no
/// panic) without the limit the store's decoders take (`records::decoding`).
fn payload_of_any_lengths() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(len, rest)| [
            &[0, 253][..],
            &len.to_le_bytes(),
            &rest
        ]
        .concat()),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(len, rest)| [
            &[253][..],
            &len.to_le_bytes(),
            &rest
        ]
        .concat()),
    ]
    .boxed()
}

/// Bytes a segment may hold after a crash or damage: noise; whole records
/// (of kinds 0–3 mostly, and any) and then noise; whole records with a few
/// bytes flipped.
fn log_bytes(payload: BoxedStrategy<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let noise = proptest::collection::vec(any::<u8>(), 0..300);
    let kind = prop_oneof![3 => 0..4u8, 1 => any::<u8>()];
    let records = proptest::collection::vec((kind, payload), 0..8)
        .prop_map(|rs| rs.iter().flat_map(|(k, p)| framed(*k, p)).collect::<Vec<u8>>());
    prop_oneof![
        noise.clone(),
        (records.clone(), noise).prop_map(|(r, n)| [r, n].concat()),
        (records, proptest::collection::vec((any::<usize>(), 1..=255u8), 1..4)).prop_map(|(mut r, flips)| {
            for (at, xor) in flips {
                if !r.is_empty() {
                    let len = r.len();
                    r[at % len] ^= xor;
                }
            }
            r
        }),
    ]
}

/// Strings a record may carry; with `records`, some that hold the bytes of
/// a whole record (a client's text may hold anything: `"\u0003\u0000…"`).
fn string(records: bool) -> BoxedStrategy<String> {
    let plain = prop_oneof![Just(String::new()), any::<String>(), "\\PC{0,200}"];
    if !records {
        return plain.boxed();
    }
    // A numbered text makes the checksum valid UTF-8 within a few tries.
    let a_record = (any::<u8>(), "[ -~]{1,40}").prop_map(|(kind, text)| {
        (0u32..)
            .find_map(|n| String::from_utf8(framed(kind % 4, format!("{text}{n}").as_bytes())).ok())
            .expect("one of them is UTF-8")
    });
    prop_oneof![plain, (a_record, "\\PC{0,40}").prop_map(|(record, tail)| format!("{record}{tail}"))].boxed()
}

fn message(records: bool) -> impl Strategy<Value = Message> {
    let s = || string(records);
    (any::<u64>(), s(), s(), s(), s(), s(), any::<Option<i64>>(), any::<u64>()).prop_map(
        |(seq, id, phone, company_id, kind, text, timestamp, received_at_ms)| Message {
            seq,
            id,
            conv: Conv { phone, company_id },
            kind,
            text,
            timestamp,
            received_at_ms,
        },
    )
}

fn claim(records: bool) -> impl Strategy<Value = Claim> {
    let s = || string(records);
    (s(), s(), proptest::collection::vec(any::<u64>(), 0..20), s(), any::<u64>(), any::<u32>()).prop_map(
        |(turn_id, phone, seqs, cut_reason, cut_at_ms, attempts)| Claim {
            turn_id,
            conv: Conv { phone, company_id: "c".into() },
            seqs,
            cut_reason,
            cut_at_ms,
            attempts,
        },
    )
}

/// What a segment holds: messages, claims, and probes (`None`, read as nothing).
fn entries(records: bool) -> impl Strategy<Value = Vec<Option<Entry>>> {
    let entry = prop_oneof![
        message(records).prop_map(|m| Some(Entry::Message(m))),
        claim(records).prop_map(|c| Some(Entry::Claim(c))),
        Just(None),
    ];
    proptest::collection::vec(entry, 0..10)
}

/// The segment's bytes, and where each record ends.
fn segment(entries: &[Option<Entry>]) -> (Vec<u8>, Vec<usize>) {
    let (mut bytes, mut ends) = (Vec::new(), Vec::new());
    for e in entries {
        match e {
            Some(Entry::Message(m)) => log::frame_message(m, &mut bytes),
            Some(Entry::Claim(c)) => log::frame_claim(c, &mut bytes),
            None => log::frame_probe(&mut bytes),
        }
        ends.push(bytes.len());
    }
    (bytes, ends)
}

fn read_segment(bytes: &[u8]) -> Result<log::SegmentRead, StoreError> {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = log::segment_path(dir.path(), 1);
    std::fs::write(&path, bytes).expect("written");
    log::read_segment(&path)
}

fn err(e: StoreError) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// `entries` framed, cut at `cut`: the records wholly before the cut, and
/// after them a torn tail — never taken for damage.
fn assert_cut_segment_reads_as_before_the_cut(
    entries: Vec<Option<Entry>>,
    cut: usize,
) -> Result<(), TestCaseError> {
    let (bytes, ends) = segment(&entries);
    let cut = cut % (bytes.len() + 1);
    let whole = ends.iter().take_while(|&&end| end <= cut).count();
    let valid = if whole == 0 { 0 } else { ends[whole - 1] };
    let read = read_segment(&bytes[..cut]).map_err(err)?;
    prop_assert_eq!(read.entries, entries.into_iter().take(whole).flatten().collect::<Vec<_>>());
    prop_assert_eq!(read.valid_len, valid as u64);
    let tail =
        if cut == valid { Tail::Clean } else { Tail::Torn { at: valid as u64, bytes: (cut - valid) as u64 } };
    prop_assert_eq!(read.tail, tail);
    Ok(())
}

proptest! {
    #![proptest_config(config(1.0))]

    #[test]
    fn log_framing_reads_whole_records_up_to_the_first_that_is_not(bytes in log_bytes(payload_of_any_lengths())) {
        let (found, valid) = log::records(&bytes);
        prop_assert!(valid <= bytes.len());
        // The records are the valid part, back to back, each as framed.
        let mut at = 0;
        for (offset, kind, payload) in &found {
            prop_assert_eq!(*offset, at);
            let again = framed(*kind, payload);
            prop_assert_eq!(&bytes[at..at + again.len()], &again[..]);
            at += again.len();
        }
        prop_assert_eq!(at, valid);
        // What follows does not start with a whole record.
        prop_assert!(log::records(&bytes[valid..]).0.is_empty());
    }

    #[test]
    fn log_segments_read_back_as_written(entries in entries(true)) {
        let (bytes, _) = segment(&entries);
        let read = read_segment(&bytes).map_err(err)?;
        prop_assert_eq!(read.entries, entries.into_iter().flatten().collect::<Vec<_>>());
        prop_assert_eq!((read.valid_len, read.tail), (bytes.len() as u64, Tail::Clean));
    }

    #[test]
    fn a_cut_log_segment_reads_as_the_records_before_the_cut(entries in entries(false), cut in any::<usize>()) {
        assert_cut_segment_reads_as_before_the_cut(entries, cut)?;
    }

    /// Fails: a torn record whose text holds a whole record is taken for
    /// damage (`log::Tail::of` resumes inside it), so the open of the newest
    /// segment refuses instead of cutting the tail. Reported to the store's
    /// owner; run with `--ignored` once fixed.
    #[test]
    fn a_cut_log_segment_whose_texts_hold_records_reads_as_the_records_before_the_cut(
        entries in entries(true),
        cut in any::<usize>(),
    ) {
        assert_cut_segment_reads_as_before_the_cut(entries, cut)?;
    }

    #[test]
    fn log_segments_of_any_bytes_read_or_name_the_damage(bytes in log_bytes(payload_of_any_lengths())) {
        match read_segment(&bytes) {
            Ok(read) => {
                let valid = read.valid_len as usize;
                prop_assert_eq!(log::records(&bytes).1, valid);
                prop_assert_eq!(read.tail, Tail::of(&bytes, valid));
                match read.tail {
                    Tail::Clean => prop_assert_eq!(valid, bytes.len()),
                    Tail::Torn { at, bytes: n } => prop_assert_eq!((at as usize, at as usize + n as usize), (valid, bytes.len())),
                    // Damage resumes at a whole record.
                    Tail::Damaged { at, resumes } => {
                        prop_assert!(at as usize == valid && resumes > at);
                        prop_assert!(!log::records(&bytes[resumes as usize..]).0.is_empty());
                    }
                }
            }
            Err(StoreError::Corrupt { tree: "log", .. }) => {}
            Err(e) => return Err(err(e)),
        }
    }
}

/// Chunks of marks as the sweep appends them: a few hours of retirements.
fn chunks() -> impl Strategy<Value = Vec<Chunk>> {
    let chunk = (0..4 * 3_600_000u64, proptest::collection::vec(any::<u128>(), 1..20))
        .prop_map(|(newest_ms, hashes)| Chunk { newest_ms, hashes });
    proptest::collection::vec(chunk, 0..8)
}

const ARCHIVE_FILE: &str = "0000000000000001.ids";

/// A data directory whose archive is one file of these bytes.
fn archive_of(bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::create_dir(dir.path().join(archive::DIR_NAME)).expect("created");
    std::fs::write(dir.path().join(archive::DIR_NAME).join(ARCHIVE_FILE), bytes).expect("written");
    dir
}

fn archive_bytes(data: &Path) -> Vec<u8> {
    std::fs::read(data.join(archive::DIR_NAME).join(ARCHIVE_FILE)).unwrap_or_default()
}

fn marks_of(chunks: &[Chunk]) -> IdSet {
    chunks.iter().flat_map(|c| c.hashes.iter().copied()).collect()
}

proptest! {
    #![proptest_config(config(0.5))]

    #[test]
    fn archive_chunks_read_back_as_appended(chunks in chunks()) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut archive = Archive::unsynced(dir.path()).map_err(err)?;
        for c in &chunks {
            archive.append(c.newest_ms, &c.hashes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        prop_assert_eq!(&archive::read_all(dir.path()).map_err(err)?, &chunks);
        let total: usize = chunks.iter().map(|c| c.hashes.len()).sum();
        prop_assert_eq!(archive::marks(dir.path()).map_err(err)?, total as u64);
        let mut seen = IdSet::default();
        Archive::open(dir.path(), &mut seen).map_err(err)?;
        prop_assert_eq!(seen, marks_of(&chunks));
    }

    #[test]
    fn a_cut_archive_file_reads_as_the_chunks_before_the_cut(chunks in chunks(), cut in any::<usize>()) {
        // One file: every chunk within its hour.
        let chunks: Vec<Chunk> = chunks.into_iter().map(|c| Chunk { newest_ms: c.newest_ms % 3_600_000, ..c }).collect();
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut archive = Archive::unsynced(dir.path()).map_err(err)?;
        for c in &chunks {
            archive.append(c.newest_ms, &c.hashes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let bytes = archive_bytes(dir.path());
        let cut = cut % (bytes.len() + 1);
        let mut end = 0;
        let whole: Vec<Chunk> = chunks.iter().take_while(|c| { end += 16 + 16 * c.hashes.len(); end <= cut }).cloned().collect();
        let dir = archive_of(&bytes[..cut]);
        prop_assert_eq!(&archive::read_all(dir.path()).map_err(err)?, &whole);
        let total: usize = whole.iter().map(|c| c.hashes.len()).sum();
        prop_assert_eq!(archive::marks(dir.path()).map_err(err)?, total as u64);
        let mut seen = IdSet::default();
        Archive::open(dir.path(), &mut seen).map_err(err)?;
        prop_assert_eq!(seen, marks_of(&whole));
        let kept: usize = whole.iter().map(|c| 16 + 16 * c.hashes.len()).sum();
        prop_assert_eq!(archive_bytes(dir.path()).len(), kept, "the torn tail cut off");
    }

    #[test]
    fn an_archive_file_of_any_bytes_opens_with_its_whole_chunks(bytes in log_bytes(payload_of_any_lengths())) {
        let dir = archive_of(&bytes);
        let chunks = archive::read_all(dir.path()).map_err(err)?;
        let _ = archive::marks(dir.path()).map_err(err)?;
        // A torn tail of the newest file is cut off, the rest kept; damage
        // with whole chunks after it refuses the open, naming it.
        let mut seen = IdSet::default();
        match Archive::open(dir.path(), &mut seen) {
            Ok(_) => {
                prop_assert_eq!(seen, marks_of(&chunks));
                prop_assert_eq!(&archive::read_all(dir.path()).map_err(err)?, &chunks);
                let kept: usize = chunks.iter().map(|c| 16 + 16 * c.hashes.len()).sum();
                prop_assert_eq!(archive_bytes(dir.path()).len(), kept);
            }
            Err(StoreError::Corrupt { tree: "dedup", .. }) => prop_assert!(archive::check(dir.path()).is_err()),
            Err(e) => return Err(err(e)),
        }
    }
}

/// A record of a small store's file (as `links` and `takeover` keep theirs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note {
    key: String,
    value: Option<String>,
    at_ms: u64,
}

fn notes(records: bool) -> impl Strategy<Value = Vec<Note>> {
    let note = (string(records), proptest::option::of(string(records)), any::<u64>())
        .prop_map(|(key, value, at_ms)| Note { key, value, at_ms });
    proptest::collection::vec(note, 0..10)
}

const RECORD_FILE: &str = "notes";

/// `notes` appended, read back whole; then cut at `cut`: the records wholly
/// before the cut, and the file cut back to them.
fn assert_record_file_reads_back_and_cut_as_before_the_cut(
    notes: &[Note],
    cut: usize,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (mut file, none) =
        RecordFile::open::<Note>(dir.path(), RECORD_FILE, OnDamage::Refuse).map_err(err)?;
    prop_assert!(none.is_empty());
    let mut ends = Vec::new();
    for n in notes {
        file.append_unsynced(n).map_err(err)?;
        ends.push(std::fs::metadata(dir.path().join(RECORD_FILE)).expect("there").len() as usize);
    }
    drop(file);
    let (_, read) = RecordFile::open::<Note>(dir.path(), RECORD_FILE, OnDamage::Refuse).map_err(err)?;
    prop_assert_eq!(&read[..], notes);

    let bytes = std::fs::read(dir.path().join(RECORD_FILE)).expect("there");
    let cut = cut % (bytes.len() + 1);
    std::fs::write(dir.path().join(RECORD_FILE), &bytes[..cut]).expect("written");
    let whole = ends.iter().take_while(|&&end| end <= cut).count();
    let (_, read) = RecordFile::open::<Note>(dir.path(), RECORD_FILE, OnDamage::Refuse).map_err(err)?;
    prop_assert_eq!(&read[..], &notes[..whole]);
    let kept = if whole == 0 { 0 } else { ends[whole - 1] };
    prop_assert_eq!(std::fs::read(dir.path().join(RECORD_FILE)).expect("there").len(), kept);
    Ok(())
}

proptest! {
    #![proptest_config(config(0.5))]

    #[test]
    fn record_files_read_back_as_appended_and_cut_to_the_records_before_a_cut(
        notes in notes(false),
        cut in any::<usize>(),
    ) {
        assert_record_file_reads_back_and_cut_as_before_the_cut(&notes, cut)?;
    }

    /// Fails as the log's does (the same `Tail::of`): a torn record whose
    /// strings hold a whole record refuses the open (`OnDamage::Refuse`,
    /// the takeovers) or drops a record it need not (`Skip`). Reported.
    #[test]
    fn record_files_whose_strings_hold_records_cut_to_the_records_before_a_cut(
        notes in notes(true),
        cut in any::<usize>(),
    ) {
        assert_record_file_reads_back_and_cut_as_before_the_cut(&notes, cut)?;
    }

    #[test]
    fn record_files_of_any_bytes_open_or_name_the_damage(bytes in log_bytes(payload_of_any_lengths())) {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(dir.path().join(RECORD_FILE), &bytes).expect("written");
        match RecordFile::open::<Note>(dir.path(), RECORD_FILE, OnDamage::Refuse) {
            Ok(_) | Err(StoreError::Corrupt { tree: RECORD_FILE, .. }) => {}
            Err(e) => return Err(err(e)),
        }
        // Skipping damage keeps what reads, and leaves a file of just that.
        std::fs::write(dir.path().join(RECORD_FILE), &bytes).expect("written");
        let (_, kept) = RecordFile::open::<Note>(dir.path(), RECORD_FILE, OnDamage::Skip).map_err(err)?;
        let (_, again) = RecordFile::open::<Note>(dir.path(), RECORD_FILE, OnDamage::Refuse).map_err(err)?;
        prop_assert_eq!(again, kept);
    }
}

/// The smallest case of the two ignored properties above: one message
/// whose text is a whole record (`len 2, crc, kind 0, "0"`: valid UTF-8),
/// its frame's last byte lost in a crash.
#[test]
fn a_torn_message_whose_text_is_a_record_is_a_torn_tail() {
    let inner = (0u32..)
        .map(|n| framed(0, format!("{n}").as_bytes()))
        .find_map(|r| String::from_utf8(r).ok())
        .expect("one is UTF-8");
    let message = Message {
        seq: 0,
        id: String::new(),
        conv: Conv { phone: String::new(), company_id: String::new() },
        kind: String::new(),
        text: inner,
        timestamp: None,
        received_at_ms: 0,
    };
    let (bytes, _) = segment(&[Some(Entry::Message(message))]);
    let torn = &bytes[..bytes.len() - 1];
    eprintln!("segment: {torn:02x?}");
    let read = read_segment(torn).unwrap();
    assert_eq!(read.tail, Tail::Torn { at: 0, bytes: torn.len() as u64 });
}
