//! What the adaptive cut policy learned — the population's pauses and each
//! conversation's latest ones — in a file of its own (`rhythms` in the data
//! directory), rewritten whole by the driver every minute and at shutdown.
//! A learned cache, not data: missing or unreadable, the policy starts from
//! its prior; a crash loses at most the last minute of learning; backups
//! carry it (`rhythms`, one record). Checked by a CRC: a damaged file is discarded with a
//! warning naming it (the policy relearns), never read as other pauses.
//! The files written before (`TSR2`, unchecked; before the learned pauses,
//! a mean gap per conversation) still load.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::log;
use crate::message::Conv;

const FILE: &str = "rhythms";

/// Starts the file: then `crc32: u32` (little-endian) of the bincode after it.
const MAGIC: &[u8; 4] = b"TSR3";
/// Started the file from the learned pauses on, without a checksum.
const MAGIC_UNCHECKED: &[u8; 4] = b"TSR2";

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SavedLearning {
    /// The population's spreads (`batcher::learn::Spread` counts).
    pub gaps: Vec<f32>,
    pub resumes: Vec<f32>,
    pub convs: Vec<SavedRhythm>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedRhythm {
    pub conv: Conv,
    /// Its latest pauses, ms: gaps between messages, silences before typing.
    pub gaps: Vec<u32>,
    pub resumes: Vec<u32>,
    /// When the conversation last wrote (unix ms).
    pub last_ms: u64,
}

/// The older file's record.
#[derive(Deserialize)]
struct MeanGap {
    conv: Conv,
    mean_gap_ms: u32,
    samples: u32,
    last_ms: u64,
}

pub(super) fn save(dir: &Path, learned: &SavedLearning) -> std::io::Result<()> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&[0; 4]);
    bincode::serde::encode_into_std_write(learned, &mut bytes, bincode::config::standard())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let crc = crc32fast::hash(&bytes[8..]);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    log::replace_file(dir, FILE, &bytes)?;
    log::sync_dir(dir)
}

/// The name a backup files the saved learning under, as if it were a tree
/// of one record.
pub(crate) const BACKUP_TREE: &str = FILE;

/// Writes a store being built in `dir` the learning a backup saved.
pub(super) fn import(dir: &Path, records: &[(Vec<u8>, Vec<u8>)]) -> Result<(), super::StoreError> {
    for (k, v) in records {
        let saved: SavedLearning = super::records::decode(BACKUP_TREE, k, v)?;
        save(dir, &saved).map_err(|e| log::io_error(dir, e))?;
    }
    Ok(())
}

pub(super) fn load(dir: &Path) -> SavedLearning {
    let path = dir.join(FILE);
    let Ok(bytes) = std::fs::read(&path) else { return SavedLearning::default() };
    decode(&bytes).unwrap_or_else(|e| {
        tracing::warn!(file = %path.display(), error = %e, "the saved rhythms are damaged; discarded, the adaptive policy starts from its prior");
        super::damage::noted(&path, "damaged; discarded (a cache: the adaptive policy starts from its prior)");
        SavedLearning::default()
    })
}

/// Why the file would be discarded (for `verify`); `None` if it is fine or missing.
pub(super) fn check(dir: &Path) -> Option<String> {
    let path = dir.join(FILE);
    let bytes = std::fs::read(&path).ok()?;
    decode(&bytes).err().map(|e| {
        format!(
            "{}: damaged ({e}); discarded on the next start (a cache: the adaptive policy relearns)",
            path.display()
        )
    })
}

/// What the file says, or why it cannot be read.
pub(super) fn decode(bytes: &[u8]) -> Result<SavedLearning, String> {
    let config = super::records::decoding();
    if let Some(rest) = bytes.strip_prefix(MAGIC) {
        let (crc, body) = rest.split_at_checked(4).ok_or("shorter than its header")?;
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(format!("checksum mismatch over {} bytes", body.len()));
        }
        return whole(bincode::serde::decode_from_slice(body, config), body.len());
    }
    // The older files have no checksum: at least every byte must be read.
    let decoded = match bytes.strip_prefix(MAGIC_UNCHECKED) {
        Some(rest) => whole(bincode::serde::decode_from_slice(rest, config), rest.len()),
        None => whole(bincode::serde::decode_from_slice::<Vec<MeanGap>, _>(bytes, config), bytes.len()).map(
            |old| SavedLearning {
                convs: old
                    .into_iter()
                    .filter(|m| m.samples > 0)
                    .map(|m| SavedRhythm {
                        conv: m.conv,
                        gaps: vec![m.mean_gap_ms],
                        resumes: Vec::new(),
                        last_ms: m.last_ms,
                    })
                    .collect(),
                ..SavedLearning::default()
            },
        ),
    };
    decoded
}

/// A decoded value that took all of its `len` bytes.
fn whole<T>(decoded: Result<(T, usize), bincode::error::DecodeError>, len: usize) -> Result<T, String> {
    match decoded {
        Ok((value, read)) if read == len => Ok(value),
        Ok((_, read)) => Err(format!("{} bytes after the saved rhythms", len - read)),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Conv {
        Conv { company_id: "962302".into(), phone: "79001234567".into() }
    }

    #[test]
    fn saved_learning_comes_back_and_a_damaged_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), SavedLearning::default(), "none saved yet");
        let l = SavedLearning {
            gaps: vec![1.5; 32],
            resumes: vec![0.5; 32],
            convs: vec![SavedRhythm {
                conv: conv(),
                gaps: vec![7_000, 8_000],
                resumes: vec![2_000],
                last_ms: 1_763_800_000_000,
            }],
        };
        save(dir.path(), &l).unwrap();
        assert_eq!(load(dir.path()), l);
        std::fs::write(dir.path().join(FILE), b"TSR2\xff\xff\xff").unwrap();
        assert_eq!(load(dir.path()), SavedLearning::default());
        assert!(decode(&[0; 4096]).is_err(), "a zeroed page is no (older) file either");
        // Any one byte flipped, or the file cut short: discarded, not misread.
        save(dir.path(), &l).unwrap();
        let good = std::fs::read(dir.path().join(FILE)).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            assert!(decode(&bad).is_err(), "a flip at {at} read as {:?}", decode(&bad));
            assert!(decode(&good[..at]).is_err(), "cut at {at}");
        }
    }

    #[test]
    fn the_older_file_of_mean_gaps_loads_as_one_gap_each() {
        #[derive(Serialize)]
        struct Old {
            conv: Conv,
            mean_gap_ms: u32,
            samples: u32,
            last_ms: u64,
        }
        let dir = tempfile::tempdir().unwrap();
        let old = vec![
            Old { conv: conv(), mean_gap_ms: 7_000, samples: 3, last_ms: 1_763_800_000_000 },
            Old {
                conv: Conv { phone: "79001234568".into(), ..conv() },
                mean_gap_ms: 0,
                samples: 0,
                last_ms: 1,
            },
        ];
        std::fs::write(
            dir.path().join(FILE),
            bincode::serde::encode_to_vec(&old, bincode::config::standard()).unwrap(),
        )
        .unwrap();
        let l = load(dir.path());
        assert_eq!(
            l.convs,
            vec![SavedRhythm {
                conv: conv(),
                gaps: vec![7_000],
                resumes: vec![],
                last_ms: 1_763_800_000_000
            }]
        );
        assert!(l.gaps.is_empty(), "no population saved: the prior");
    }
}
