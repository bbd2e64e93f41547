//! The backup reader, fuzzed: a backup of any records reads back as
//! written, and anything else — arbitrary bytes, a backup with bytes
//! flipped, cut short or followed by more — is refused with an error,
//! never a panic, and never read as other records.

use proptest::prelude::*;

use super::{read, verify_sizes, BackupError, Encoder, Manifest, Record, MAGIC};
use crate::ingest::fuzz::config;

/// Records of the store's trees (and of names it never used).
fn records() -> impl Strategy<Value = Vec<Record>> {
    let tree = prop_oneof![
        4 => proptest::sample::select(&["inbox", "turns", "history", "ctx_dialogue", "outbox", "dedup", "meta"][..])
            .prop_map(str::to_owned),
        1 => "\\PC{0,20}",
    ];
    let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n);
    proptest::collection::vec((tree, bytes(40), bytes(300)), 0..12)
}

/// A backup of `records`, as `write` makes one.
fn backup(records: &[Record], next_id: u64) -> (Vec<u8>, Manifest) {
    let mut encoder = Encoder::new(Vec::new()).expect("a Vec takes writes");
    for (tree, key, value) in records {
        encoder.record(tree, key, value).expect("a Vec takes writes");
    }
    let (manifest, bytes) = encoder.finish(next_id).expect("a Vec takes writes");
    (bytes, manifest)
}

fn read_all(bytes: &[u8]) -> Result<(Manifest, Vec<Record>), BackupError> {
    let mut got = Vec::new();
    let manifest = read(bytes, |r| {
        got.push(r);
        Ok::<(), BackupError>(())
    })?;
    Ok((manifest, got))
}

/// `verify`'s reader, through a file as the command runs it.
fn verify(bytes: &[u8]) -> Result<Manifest, BackupError> {
    let file = tempfile::NamedTempFile::new().expect("a temp file");
    std::fs::write(file.path(), bytes).expect("written");
    verify_sizes(file.path()).map(|(manifest, _)| manifest)
}

/// Bytes that are no backup: anything; the magic line and anything; the
/// magic line and a gzip stream of anything, or of records that stop.
fn not_backups() -> impl Strategy<Value = Vec<u8>> {
    let junk = proptest::collection::vec(any::<u8>(), 0..400);
    let gzip = |content: &[u8]| {
        use std::io::Write;
        let mut z = flate2::write::GzEncoder::new(MAGIC.to_vec(), flate2::Compression::fast());
        z.write_all(content).expect("a Vec takes writes");
        z.finish().expect("a Vec takes writes")
    };
    prop_oneof![
        junk.clone(),
        junk.clone().prop_map(|j| [MAGIC, &j].concat()),
        junk.clone().prop_map(move |j| gzip(&j)),
        (records(), junk).prop_map(move |(rs, j)| {
            let (whole, _) = backup(&rs, 1);
            let mut content = inflate(&whole[MAGIC.len()..]);
            content.truncate(content.len().saturating_sub(j.len() % 64 + 1));
            content.extend_from_slice(&j);
            gzip(&content)
        }),
    ]
}

fn inflate(gzip: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gzip), &mut out).expect("ours inflates");
    out
}

proptest! {
    #![proptest_config(config(1.0))]

    #[test]
    fn a_backup_of_any_records_reads_back_as_written(records in records(), next_id in any::<u64>()) {
        let (bytes, manifest) = backup(&records, next_id);
        let (read_manifest, got) = read_all(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&read_manifest, &manifest);
        prop_assert_eq!(got, records);
        prop_assert_eq!(verify(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?, manifest);
    }

    #[test]
    fn the_backup_reader_refuses_what_is_no_backup(bytes in not_backups()) {
        prop_assert!(read_all(&bytes).is_err());
        prop_assert!(verify(&bytes).is_err());
    }

    #[test]
    fn a_backup_with_bytes_flipped_is_refused_or_reads_as_written(
        records in records(),
        flips in proptest::collection::vec((any::<usize>(), 1..=255u8), 1..4),
    ) {
        let (mut bytes, manifest) = backup(&records, 7);
        let len = bytes.len();
        let flips: Vec<(usize, u8)> = flips.into_iter().map(|(at, x)| (at % len, x)).collect();
        for &(at, x) in &flips {
            bytes[at] ^= x;
        }
        // Read, if at all, as written: a flip in bits no check covers (the
        // gzip header's time and OS, a stored block's padding) changes
        // nothing that is read.
        let read = read_all(&bytes);
        prop_assert_eq!(verify(&bytes).is_ok(), read.is_ok(), "`verify` reads as `restore` does");
        if let Ok((m, got)) = read {
            prop_assert_eq!((m, got), (manifest, records), "flips {:?}", flips);
        }
    }

    #[test]
    fn a_backup_cut_short_or_followed_by_more_is_refused(
        records in records(),
        cut in any::<usize>(),
        more in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let (bytes, _) = backup(&records, 7);
        let short = &bytes[..cut % bytes.len()];
        prop_assert!(read_all(short).is_err(), "cut to {} of {} bytes", short.len(), bytes.len());
        prop_assert!(verify(short).is_err());
        let longer = [&bytes[..], &more].concat();
        prop_assert!(read_all(&longer).is_err(), "{} bytes after it", more.len());
    }
}
