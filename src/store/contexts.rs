//! Contexts in the store: per conversation a small meta record (sizes,
//! updated_at, expires_at), the deflated `dialogue` and `cache` parts —
//! small ones in their sled trees, larger ones in files of their own whose
//! locations `ctx_files` holds (`parts.rs`) — and an expiry index keyed by
//! expiry time so the sweeper never scans them all.
//!
//! `apply` runs inside a caller's transaction, so a turn's commit updates its
//! context atomically with the rest of the commit. It reads and checks
//! everything before it writes anything: a damaged record fails the one
//! update that met it, with nothing of that update written, and the rest of
//! the transaction goes on.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sled::transaction::UnabortableTransactionError;

use super::generation::Noted;
use super::parts::{Location, Which};

use super::records::{decode, encode};
use super::StoreError;

/// What to do with one part of a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Keep,
    Clear,
    /// Deflated bytes, and the size of the JSON they hold.
    Set {
        bytes: Vec<u8>,
        raw_len: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextUpdate {
    pub dialogue: Part,
    pub cache: Part,
    /// Restart the idle timer (a turn or a PUT); an invalidation does not.
    pub slide: bool,
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    pub raw: u64,
    pub stored: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextMeta {
    pub updated_at_ms: u64,
    pub expires_at_ms: u64,
    pub dialogue: Option<Sizes>,
    pub cache: Option<Sizes>,
}

impl ContextMeta {
    fn total(&self) -> (i64, i64) {
        [self.dialogue, self.cache]
            .iter()
            .flatten()
            .fold((0, 0), |(r, s), z| (r + z.raw as i64, s + z.stored as i64))
    }
}

/// A live (unexpired) context as stored: the parts are still deflated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredContext {
    pub meta: ContextMeta,
    pub dialogue: Option<Vec<u8>>,
    pub cache: Option<Vec<u8>>,
}

/// Counters for the metrics endpoint. Bytes are of what is stored now,
/// including expired contexts the sweeper has not removed yet.
#[derive(Debug, Default)]
pub struct ContextStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub invalidations: AtomicU64,
    pub contexts: AtomicI64,
    pub raw_bytes: AtomicI64,
    pub stored_bytes: AtomicI64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextStatsSnapshot {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub invalidations: u64,
    pub contexts: i64,
    pub raw_bytes: i64,
    pub stored_bytes: i64,
}

impl ContextStats {
    pub(crate) fn set_totals(&self, t: Totals) {
        self.contexts.store(t.contexts, Ordering::Relaxed);
        self.raw_bytes.store(t.raw_bytes, Ordering::Relaxed);
        self.stored_bytes.store(t.stored_bytes, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, before: Option<&ContextMeta>, after: Option<&ContextMeta>) {
        let (r0, s0) = before.map(ContextMeta::total).unwrap_or((0, 0));
        let (r1, s1) = after.map(ContextMeta::total).unwrap_or((0, 0));
        let n = after.is_some() as i64 - before.is_some() as i64;
        self.contexts.fetch_add(n, Ordering::Relaxed);
        self.raw_bytes.fetch_add(r1 - r0, Ordering::Relaxed);
        self.stored_bytes.fetch_add(s1 - s0, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ContextStatsSnapshot {
        ContextStatsSnapshot {
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            contexts: self.contexts.load(Ordering::Relaxed),
            raw_bytes: self.raw_bytes.load(Ordering::Relaxed),
            stored_bytes: self.stored_bytes.load(Ordering::Relaxed),
        }
    }
}

pub(crate) fn expiry_key(expires_at_ms: u64, key: &[u8]) -> Vec<u8> {
    let mut k = expires_at_ms.to_be_bytes().to_vec();
    k.extend_from_slice(key);
    k
}

pub(crate) fn decode_meta(key: &[u8], bytes: &[u8]) -> Result<ContextMeta, StoreError> {
    decode("ctx_meta", key, bytes)
}

/// The context trees inside a transaction.
pub(crate) struct Trees<'t> {
    pub meta: &'t Noted<'t>,
    pub dialogue: &'t Noted<'t>,
    pub cache: &'t Noted<'t>,
    pub expiry: &'t Noted<'t>,
    pub totals: &'t Noted<'t>,
    /// Where the parts kept in files are: `Which` tag ‖ key → `Location`.
    pub files: &'t Noted<'t>,
}

impl<'t> Trees<'t> {
    fn of(&self, which: Which) -> &'t Noted<'t> {
        match which {
            Which::Dialogue => self.dialogue,
            Which::Cache => self.cache,
        }
    }
}

/// The parts of an update that the writer put in files before the
/// transaction (`parts.rs`); a `Part::Set` without one stays in sled.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spilled {
    pub dialogue: Option<Location>,
    pub cache: Option<Location>,
}

impl Spilled {
    pub(crate) fn of(&self, which: Which) -> Option<Location> {
        match which {
            Which::Dialogue => self.dialogue,
            Which::Cache => self.cache,
        }
    }

    pub(crate) fn files(&self) -> impl Iterator<Item = u64> {
        [self.dialogue, self.cache].into_iter().flatten().map(|l| l.file)
    }
}

/// What an update or an expiry changed: the meta before and after (for the
/// counters), and the part files nothing refers to once it is durable.
#[derive(Debug, Default)]
pub(crate) struct Change {
    pub before: Option<ContextMeta>,
    pub after: Option<ContextMeta>,
    pub dropped: Vec<u64>,
}

pub(crate) fn decode_location(key: &[u8], bytes: &[u8]) -> Result<Location, StoreError> {
    decode("ctx_files", key, bytes)
}

/// The file locations of both parts of the context at `key` (`None`: kept
/// in sled, or absent).
fn read_locations(t: &Trees<'_>, key: &[u8]) -> TxResult<[Option<Location>; 2]> {
    let mut out = [None, None];
    for (slot, which) in out.iter_mut().zip(Which::BOTH) {
        let fkey = which.file_key(key);
        if let Some(v) = t.files.get(&fkey)? {
            match decode_location(&fkey, &v) {
                Ok(loc) => *slot = Some(loc),
                Err(e) => return Ok(Err(e)),
            }
        }
    }
    Ok(Ok(out))
}

/// Persisted totals, in `TOTAL_SHARDS` keys so that concurrent commits of
/// different conversations rarely touch the same one (sled transactions are
/// optimistic). Reading them back on open costs 64 gets, not a scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Totals {
    pub contexts: i64,
    pub raw_bytes: i64,
    pub stored_bytes: i64,
}

pub(crate) const TOTAL_SHARDS: u8 = 64;

fn shard_of(key: &[u8]) -> [u8; 1] {
    // FNV-1a: stable across builds, unlike the std hasher.
    let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3));
    [(h % TOTAL_SHARDS as u64) as u8]
}

pub(crate) fn decode_totals(key: &[u8], bytes: &[u8]) -> Result<Totals, StoreError> {
    decode("ctx_totals", key, bytes)
}

/// A shard's totals moved by the difference between two metas.
fn moved(mut totals: Totals, before: Option<&ContextMeta>, after: Option<&ContextMeta>) -> Totals {
    let (r0, s0) = before.map(ContextMeta::total).unwrap_or((0, 0));
    let (r1, s1) = after.map(ContextMeta::total).unwrap_or((0, 0));
    totals.contexts += after.is_some() as i64 - before.is_some() as i64;
    totals.raw_bytes += r1 - r0;
    totals.stored_bytes += s1 - s0;
    totals
}

/// Sled failures end the transaction; `Err` inside `Ok` fails one update.
pub(crate) type TxResult<T> = Result<Result<T, StoreError>, UnabortableTransactionError>;

/// The totals shard of `key`, read inside the transaction.
fn read_totals(t: &Trees<'_>, key: &[u8]) -> TxResult<([u8; 1], Totals)> {
    let shard = shard_of(key);
    Ok(match t.totals.get(shard)? {
        Some(v) => decode_totals(&shard, &v).map(|totals| (shard, totals)),
        None => Ok((shard, Totals::default())),
    })
}

/// Applies `update` to the context at `key` (its large parts already in the
/// files `spilled` names). An expired context counts as absent: `Keep`
/// never resurrects it. A meta or location record that does not decode
/// fails an update that keeps a part (what it would keep is unknown); one
/// that sets or clears both parts replaces it, which is how an operator
/// repairs it.
pub(crate) fn apply(
    t: &Trees<'_>,
    key: &[u8],
    update: &ContextUpdate,
    spilled: &Spilled,
    now_ms: u64,
) -> TxResult<Change> {
    let keeps = matches!(update.dialogue, Part::Keep) || matches!(update.cache, Part::Keep);
    let before = match t.meta.get(key)?.map(|v| decode_meta(key, &v)).transpose() {
        Ok(meta) => meta,
        Err(e) if keeps => return Ok(Err(e)),
        Err(e) => {
            tracing::warn!(error = %e, "a damaged context meta record is replaced by a write");
            None
        }
    };
    let files = match read_locations(t, key)? {
        Ok(files) => files,
        Err(e) if keeps => return Ok(Err(e)),
        Err(e) => {
            tracing::warn!(error = %e, "a damaged context part location is replaced by a write");
            [None, None]
        }
    };
    let (shard, totals) = match read_totals(t, key)? {
        Ok(found) => found,
        Err(e) => return Ok(Err(e)),
    };
    // Everything is read and checked: from here on, only writes.
    let live = before.as_ref().filter(|m| m.expires_at_ms > now_ms);
    let mut dropped = Vec::new();
    let mut part = |which: Which,
                    part: &Part,
                    old: Option<Sizes>,
                    old_file: Option<Location>|
     -> Result<Option<Sizes>, UnabortableTransactionError> {
        let tree = t.of(which);
        let fkey = which.file_key(key);
        let unfile = |dropped: &mut Vec<u64>| -> Result<(), UnabortableTransactionError> {
            if let Some(old) = old_file {
                t.files.remove(fkey.as_slice())?;
                dropped.push(old.file);
            }
            Ok(())
        };
        match part {
            Part::Keep if live.is_some() => Ok(old),
            Part::Keep | Part::Clear => {
                tree.remove(key)?;
                unfile(&mut dropped)?;
                Ok(None)
            }
            Part::Set { bytes, raw_len } => match spilled.of(which) {
                Some(loc) => {
                    tree.remove(key)?;
                    unfile(&mut dropped)?;
                    t.files.insert(fkey.as_slice(), encode(&loc))?;
                    Ok(Some(Sizes { raw: *raw_len, stored: loc.len as u64 }))
                }
                None => {
                    unfile(&mut dropped)?;
                    tree.insert(key, bytes.as_slice())?;
                    Ok(Some(Sizes { raw: *raw_len, stored: bytes.len() as u64 }))
                }
            },
        }
    };
    let dialogue = part(Which::Dialogue, &update.dialogue, live.and_then(|m| m.dialogue), files[0])?;
    let cache = part(Which::Cache, &update.cache, live.and_then(|m| m.cache), files[1])?;
    if let Some(old) = &before {
        t.expiry.remove(expiry_key(old.expires_at_ms, key))?;
    }
    let after = if dialogue.is_none() && cache.is_none() {
        t.meta.remove(key)?;
        None
    } else {
        let expires_at_ms = match live {
            Some(m) if !update.slide => m.expires_at_ms,
            _ => now_ms + update.ttl_ms,
        };
        let after = ContextMeta { updated_at_ms: now_ms, expires_at_ms, dialogue, cache };
        t.meta.insert(key, encode(&after))?;
        t.expiry.insert(expiry_key(expires_at_ms, key), &[][..])?;
        Some(after)
    };
    t.totals.insert(shard, encode(&moved(totals, before.as_ref(), after.as_ref())))?;
    Ok(Ok(Change { before, after, dropped }))
}

/// Removes the context at `key` if it is still the one the expiry index
/// entry `(expires_at_ms, key)` points at and it has expired by `now_ms`.
/// A damaged meta or totals record is an error naming it; the index entry
/// then stays, so the sweeper reports it again until it is repaired.
pub(crate) fn expire(t: &Trees<'_>, key: &[u8], expires_at_ms: u64, now_ms: u64) -> TxResult<Option<Change>> {
    let meta = match t.meta.get(key)?.map(|v| decode_meta(key, &v)).transpose() {
        Ok(meta) => meta,
        Err(e) => return Ok(Err(e)),
    };
    let Some(meta) = meta.filter(|m| m.expires_at_ms == expires_at_ms && m.expires_at_ms <= now_ms) else {
        // Touched since (its new index entry stands), or already gone.
        t.expiry.remove(expiry_key(expires_at_ms, key))?;
        return Ok(Ok(None));
    };
    let (shard, totals) = match read_totals(t, key)? {
        Ok(found) => found,
        Err(e) => return Ok(Err(e)),
    };
    // A damaged location loses only its file, which the next open deletes.
    let files = read_locations(t, key)?.unwrap_or_default();
    t.expiry.remove(expiry_key(expires_at_ms, key))?;
    t.meta.remove(key)?;
    t.dialogue.remove(key)?;
    t.cache.remove(key)?;
    for which in Which::BOTH {
        t.files.remove(which.file_key(key))?;
    }
    t.totals.insert(shard, encode(&moved(totals, Some(&meta), None)))?;
    let dropped = files.iter().flatten().map(|l| l.file).collect();
    Ok(Ok(Some(Change { before: Some(meta), after: None, dropped })))
}
