//! Which message ids were accepted: a set of 128-bit hashes in memory, for
//! the ids in the log (not yet answered) and those retired by a turn within
//! `ingest.dedup_days`. The retired ones are also on disk: in sled, one
//! record per retiring turn (`dedup` tree: retired time ‖ unique id → the
//! hashes), until the minute's sweep moves them into the archive files
//! (`archive.rs`); the set is rebuilt from both on open.
//!
//! Hash, not id: 16 bytes per message whatever the id's length. Two ids are
//! taken for one only if their SHA-256 agrees in the first 128 bits; among a
//! billion ids the odds of that are below 10^-20.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use sha2::{Digest, Sha256};

pub(crate) type IdHash = u128;

pub(crate) fn id_hash(id: &str) -> IdHash {
    let digest = Sha256::digest(id.as_bytes());
    u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"))
}

/// The value of a `dedup` record: the hashes, 16 bytes each.
pub(crate) fn pack(hashes: &[IdHash]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.to_be_bytes()).collect()
}

/// `None` if the length is not a multiple of 16 (a damaged record).
pub(crate) fn unpack(bytes: &[u8]) -> Option<Vec<IdHash>> {
    if !bytes.len().is_multiple_of(16) {
        return None;
    }
    Some(bytes.chunks_exact(16).map(|c| u128::from_be_bytes(c.try_into().expect("16 bytes"))).collect())
}

/// A `dedup` record's hashes, or the error that names it as damaged.
pub(crate) fn unpack_record(key: &[u8], value: &[u8]) -> Result<Vec<IdHash>, super::StoreError> {
    unpack(value).ok_or_else(|| super::StoreError::Corrupt {
        tree: "dedup",
        key: format!("{key:?}"),
        reason: format!("{} bytes is not a list of 16-byte hashes", value.len()),
    })
}

/// The hashes are already uniform: hashing them again is wasted work.
#[derive(Default)]
pub(crate) struct Passthrough(u64);

impl Hasher for Passthrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ *b as u64;
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

pub(crate) type IdSet = HashSet<IdHash, BuildHasherDefault<Passthrough>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_and_pack_round_trips() {
        // Stable across builds and restarts: the set is rebuilt from stored hashes.
        assert_eq!(id_hash("wamid.1"), id_hash("wamid.1"));
        assert_ne!(id_hash("wamid.1"), id_hash("wamid.2"));
        assert_eq!(format!("{:032x}", id_hash("")), "e3b0c44298fc1c149afbf4c8996fb924");
        let hashes = vec![id_hash("a"), id_hash("b")];
        assert_eq!(unpack(&pack(&hashes)), Some(hashes));
        assert_eq!(unpack(&[0u8; 17]), None);
        let mut set = IdSet::default();
        assert!(set.insert(id_hash("a")) && !set.insert(id_hash("a")));
    }
}
