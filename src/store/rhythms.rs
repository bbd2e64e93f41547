//! What the adaptive cut policy learned — the population's pauses and each
//! conversation's latest ones — in a file of its own (`rhythms` in the data
//! directory), rewritten whole by the driver every minute and at shutdown.
//! A learned cache, not data: missing or unreadable, the policy starts from
//! its prior; a crash loses at most the last minute of learning; backups
//! leave it out. The file written before the learned pauses existed (a mean
//! gap per conversation) still loads: each mean becomes one learned gap.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::log;
use crate::message::Conv;

const FILE: &str = "rhythms";

/// Starts the file since the learned pauses (the older file has none).
const MAGIC: &[u8; 4] = b"TSR2";

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
    bincode::serde::encode_into_std_write(learned, &mut bytes, bincode::config::standard())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    log::replace_file(dir, FILE, &bytes)?;
    log::sync_dir(dir)
}

pub(super) fn load(dir: &Path) -> SavedLearning {
    let Ok(bytes) = std::fs::read(dir.join(FILE)) else { return SavedLearning::default() };
    let config = bincode::config::standard();
    let decoded = match bytes.strip_prefix(MAGIC) {
        Some(rest) => bincode::serde::decode_from_slice(rest, config).map(|(l, _)| l),
        None => bincode::serde::decode_from_slice::<Vec<MeanGap>, _>(&bytes, config).map(|(old, _)| {
            SavedLearning {
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
            }
        }),
    };
    decoded.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the saved rhythms are unreadable; the adaptive policy starts from its prior");
        SavedLearning::default()
    })
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
