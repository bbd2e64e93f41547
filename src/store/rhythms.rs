//! The rhythms the adaptive cut policy learned, per conversation, in a file
//! of their own (`rhythms` in the data directory), rewritten whole by the
//! driver every minute and at shutdown. A learned cache, not data: missing
//! or unreadable, the policy starts from its prior; a crash loses at most
//! the last minute of learning; backups leave it out.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::log;
use crate::message::Conv;

const FILE: &str = "rhythms";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedRhythm {
    pub conv: Conv,
    pub mean_gap_ms: u32,
    pub samples: u32,
    /// When the conversation last wrote (unix ms).
    pub last_ms: u64,
}

pub(super) fn save(dir: &Path, rhythms: &[SavedRhythm]) -> std::io::Result<()> {
    let bytes = bincode::serde::encode_to_vec(rhythms, bincode::config::standard())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    log::replace_file(dir, FILE, &bytes)?;
    log::sync_dir(dir)
}

pub(super) fn load(dir: &Path) -> Vec<SavedRhythm> {
    let Ok(bytes) = std::fs::read(dir.join(FILE)) else { return Vec::new() };
    match bincode::serde::decode_from_slice(&bytes, bincode::config::standard()) {
        Ok((rhythms, _)) => rhythms,
        Err(e) => {
            tracing::warn!(error = %e, "the saved rhythms are unreadable; the adaptive policy starts from its prior");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_rhythms_come_back_and_a_damaged_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_empty(), "none saved yet");
        let r = vec![SavedRhythm {
            conv: Conv { company_id: "962302".into(), phone: "79001234567".into() },
            mean_gap_ms: 7_000,
            samples: 3,
            last_ms: 1_763_800_000_000,
        }];
        save(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path()), r);
        std::fs::write(dir.path().join(FILE), b"\xff\xff\xff").unwrap();
        assert!(load(dir.path()).is_empty());
    }
}
