//! The message log's replay at open: every segment read in order into the
//! writer's memory — pending messages, open claims, each segment's live
//! count — with what a synced commit retired left out. Segments are read
//! and decoded on a thread of their own, one ahead of the replay.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use super::dedup::{self, IdSet};
use super::log::{self, Entry, SegmentRead};
use super::{damage, Memory, OpenClaim, Pending, Segment, StoreError};
use crate::message::unix_ms;

/// A segment as the reading thread hands it over: its number, its path,
/// and what it holds with the hash of each message's id, in order.
type Decoded = (u64, PathBuf, Result<(SegmentRead, Vec<dedup::IdHash>), StoreError>);

/// Reads every segment: pending messages, open claims, live counts. A torn
/// tail of the newest segment is cut off; damage anywhere else is an error.
/// Segments with nothing live are deleted. Returns the pending ids' hashes.
pub(super) fn replay(log_dir: &Path, retired: &IdSet) -> Result<(Memory, Vec<dedup::IdHash>), StoreError> {
    let mut memory = Memory::default();
    let mut hashes = Vec::new();
    let numbers = log::segments(log_dir).map_err(|e| log::io_error(log_dir, e))?;
    // Segments are read and decoded, and their ids hashed, on a thread of
    // their own, one segment ahead of the replay (two cores: the replay of
    // a large log takes about half as long).
    let (tx, rx) = mpsc::sync_channel(1);
    let count = numbers.len();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for no in numbers {
                let path = log::segment_path(log_dir, no);
                let read = log::read_segment(&path).map(|read| {
                    let hashes: Vec<dedup::IdHash> = read
                        .entries
                        .iter()
                        .filter_map(|e| match e {
                            Entry::Message(m) => Some(dedup::id_hash(&m.id)),
                            Entry::Claim(_) => None,
                        })
                        .collect();
                    (read, hashes)
                });
                if tx.send((no, path, read)).is_err() {
                    break; // the replay stopped at an error
                }
            }
        });
        replay_segments(rx, count, retired, &mut memory, &mut hashes)
    })?;
    // A message claimed twice (a claim whose write failed but reached the
    // disk, then a new claim): the older turn keeps it.
    let mut owner: BTreeMap<u64, String> = BTreeMap::new();
    let mut turn_ids: Vec<String> = memory.claims.keys().cloned().collect();
    turn_ids.sort();
    for turn_id in turn_ids {
        let seqs = memory.claims[&turn_id].claim.seqs.clone();
        if seqs.iter().any(|s| owner.contains_key(s)) {
            tracing::warn!(turn_id, "a claim overlaps an older turn's; the older turn keeps the messages");
            memory.claims.remove(&turn_id);
            continue;
        }
        for s in seqs {
            owner.insert(s, turn_id.clone());
        }
    }
    Ok((memory, hashes))
}

/// The replay of the segments `rx` hands over, decoded, in order.
fn replay_segments(
    rx: mpsc::Receiver<Decoded>,
    count: usize,
    retired: &IdSet,
    memory: &mut Memory,
    hashes: &mut Vec<dedup::IdHash>,
) -> Result<(), StoreError> {
    for (i, (no, path, read)) in rx.into_iter().enumerate() {
        let (read, ids) = read?;
        let mut ids = ids.into_iter();
        if let Some((at, bytes)) = log::check_tail("log", &path, read.tail, i + 1 == count)? {
            tracing::warn!(file = %path.display(), offset = at, bytes, "cut off a torn tail of the message log: what a crash in the middle of a write leaves");
            damage::noted(&path, &format!("a torn tail of {bytes} bytes cut at offset {at}"));
            log::truncate(&path, read.valid_len)?;
        }
        let mut seg = Segment { live: 0, created_ms: u64::MAX };
        let mut claims: HashMap<String, log::Claim> = HashMap::new();
        for entry in read.entries {
            match entry {
                Entry::Message(m) => {
                    seg.created_ms = seg.created_ms.min(m.received_at_ms);
                    let hash = ids.next().expect("a hash per message");
                    // Retired by a synced commit, or a second copy (a
                    // first-layout move that ran twice): not live.
                    if retired.contains(&hash) || memory.pending.contains_key(&m.seq) {
                        if let Some(p) = memory.pending.get(&m.seq).filter(|p| p.message.id != m.id) {
                            tracing::error!(seq = m.seq, kept = %p.message.id, dropped = %m.id, "two messages in the log share a sequence number");
                        }
                        continue;
                    }
                    hashes.push(hash);
                    seg.live += 1;
                    memory.pending.insert(m.seq, Pending { message: m, seg: no });
                }
                Entry::Claim(c) => {
                    // Later claim records of a turn (attempt counts) replace
                    // earlier ones; the segment holds it once.
                    if c.seqs.iter().any(|s| memory.pending.contains_key(s))
                        && claims.insert(c.turn_id.clone(), c).is_none()
                    {
                        seg.live += 1;
                    }
                }
            }
        }
        for (turn_id, claim) in claims {
            let open = memory
                .claims
                .entry(turn_id)
                .or_insert_with(|| OpenClaim { claim: claim.clone(), segs: Vec::new() });
            open.claim = claim;
            open.segs.push(no);
        }
        if seg.live == 0 {
            std::fs::remove_file(&path).map_err(|e| log::io_error(&path, e))?;
        } else {
            seg.created_ms = seg.created_ms.min(unix_ms());
            memory.segments.insert(no, seg);
        }
    }
    Ok(())
}
