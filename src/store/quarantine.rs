//! Inbound quarantine: gateway deliveries that passed their secret check
//! but that this build could not turn into messages (a sender version's new
//! shape). Answering them 4xx would make the sender drop them for good
//! (Evolution gives up at once on 400/401/403/404/422), so each is kept
//! whole, durably, until an operator replays it after an upgrade
//! (`POST /api/quarantine/{id}/replay`) or it expires.
//!
//! One file per delivery in `quarantine/`, `<id hex>.q`, one record in the
//! log's framing; written to a temporary name, synced, renamed and the
//! directory synced before the delivery is answered. Bounded: past
//! `capacity` deliveries a new one is refused (the webhook answers 503 and
//! the sender retries), never dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{log, StoreError};

pub(crate) const DIR_NAME: &str = "quarantine";
const KIND_HELD: u8 = 1;

/// A delivery held: which webhook it came to, when, why it was not taken,
/// and its body as it came.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub id: String,
    pub gateway: String,
    pub received_at_ms: u64,
    pub reason: String,
    pub body: Vec<u8>,
}

pub(crate) struct Quarantine {
    dir: PathBuf,
    next: AtomicU64,
    /// Held deliveries (file count), kept so the bound needs no listing.
    held: Mutex<usize>,
}

fn path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.q"))
}

/// The delivery held in `p` (`None`: no such file), which must be one whole
/// record holding delivery `id`: the file is written aside and renamed, so
/// a crash never leaves part of one, and anything else is damage.
fn read(p: &Path, id: &str) -> Result<Option<Held>, StoreError> {
    let bytes = match std::fs::read(p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(log::io_error(p, e)),
    };
    let key = p.display().to_string();
    let corrupt = |reason: String| StoreError::Corrupt { tree: "quarantine", key: key.clone(), reason };
    let (records, valid) = log::records(&bytes);
    let held: Held = match records.first() {
        Some((_, KIND_HELD, payload)) if valid == bytes.len() && records.len() == 1 => {
            bincode::serde::decode_from_slice(payload, super::records::decoding())
                .map_err(|e| corrupt(e.to_string()))?
                .0
        }
        _ => {
            return Err(corrupt(format!(
                "not one whole record (the first {valid} of {} bytes are)",
                bytes.len()
            )))
        }
    };
    if held.id != id {
        return Err(corrupt(format!("it holds delivery {:?}, not {id:?}: a file from elsewhere", held.id)));
    }
    Ok(Some(held))
}

/// Reads every held delivery: each was acknowledged to its sender, so one
/// that is damaged stops the open (naming its file) rather than vanish.
/// How many there are.
pub(crate) fn check(data_dir: &Path) -> Result<usize, StoreError> {
    let dir = data_dir.join(DIR_NAME);
    let nos = match log::numbered(&dir, ".q") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        listed => listed.map_err(|e| log::io_error(&dir, e))?,
    };
    for no in &nos {
        let id = format!("{no:016x}");
        read(&path(&dir, &id), &id)?;
    }
    Ok(nos.len())
}

impl Quarantine {
    pub(crate) fn open(data_dir: &Path) -> Result<Quarantine, StoreError> {
        let dir = data_dir.join(DIR_NAME);
        std::fs::create_dir_all(&dir).map_err(|e| log::io_error(&dir, e))?;
        let nos = log::numbered(&dir, ".q").map_err(|e| log::io_error(&dir, e))?;
        // Leftovers of a write a crash interrupted: never answered, so the
        // sender delivers them again.
        for entry in std::fs::read_dir(&dir).map_err(|e| log::io_error(&dir, e))? {
            let p = entry.map_err(|e| log::io_error(&dir, e))?.path();
            if p.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&p).map_err(|e| log::io_error(&p, e))?;
            }
        }
        check(data_dir)?;
        let next = nos.last().map_or(1, |n| n + 1);
        Ok(Quarantine { dir, next: AtomicU64::new(next), held: Mutex::new(nos.len()) })
    }

    /// Keeps a delivery; its id, or `None` when `capacity` are held. Blocking.
    pub(crate) fn put(
        &self,
        gateway: &str,
        reason: &str,
        body: &[u8],
        received_at_ms: u64,
        capacity: usize,
    ) -> Result<Option<String>, StoreError> {
        let mut held = self.held.lock().expect("quarantine lock");
        if *held >= capacity {
            return Ok(None);
        }
        let id = format!("{:016x}", self.next.fetch_add(1, Ordering::SeqCst));
        let record = Held {
            id: id.clone(),
            gateway: gateway.to_owned(),
            received_at_ms,
            reason: reason.to_owned(),
            body: body.to_vec(),
        };
        let mut bytes = Vec::new();
        log::frame(KIND_HELD, &record, &mut bytes);
        let name = format!("{id}.q");
        log::replace_file(&self.dir, &name, &bytes)
            .and_then(|_| log::sync_dir(&self.dir))
            .map_err(|e| log::io_error(&path(&self.dir, &id), e))?;
        *held += 1;
        Ok(Some(id))
    }

    pub(crate) fn get(&self, id: &str) -> Result<Option<Held>, StoreError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        read(&path(&self.dir, id), id)
    }

    /// Every held delivery, oldest first.
    pub(crate) fn list(&self) -> Result<Vec<Held>, StoreError> {
        let nos = log::numbered(&self.dir, ".q").map_err(|e| log::io_error(&self.dir, e))?;
        let mut out = Vec::with_capacity(nos.len());
        for no in nos {
            out.extend(self.get(&format!("{no:016x}"))?);
        }
        Ok(out)
    }

    /// Drops a held delivery (replayed, or expired); false if there was none.
    pub(crate) fn remove(&self, id: &str) -> Result<bool, StoreError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(false);
        }
        let p = path(&self.dir, id);
        let mut held = self.held.lock().expect("quarantine lock");
        match std::fs::remove_file(&p) {
            Ok(()) => {
                log::sync_dir(&self.dir).map_err(|e| log::io_error(&self.dir, e))?;
                *held = held.saturating_sub(1);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(log::io_error(&p, e)),
        }
    }

    /// Drops what was received before `before_ms`; how many.
    pub(crate) fn expire(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut gone = 0;
        for held in self.list()? {
            if held.received_at_ms < before_ms && self.remove(&held.id)? {
                gone += 1;
            }
        }
        Ok(gone)
    }

    pub(crate) fn len(&self) -> usize {
        *self.held.lock().expect("quarantine lock")
    }

    /// Calls `visit(id, encoded)` for every held delivery, oldest first,
    /// read one at a time (they are up to `max_body_bytes` each), for a backup.
    pub(crate) fn export<E: From<StoreError>>(
        &self,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let nos = log::numbered(&self.dir, ".q").map_err(|e| log::io_error(&self.dir, e))?;
        for no in nos {
            if let Some(held) = self.get(&format!("{no:016x}"))? {
                visit(held.id.as_bytes(), &super::records::encode(&held))?;
            }
        }
        Ok(())
    }
}

/// The name a backup files held deliveries under, as if they were a tree.
pub(crate) const BACKUP_TREE: &str = DIR_NAME;

/// Writes one held delivery of a store being built in `data_dir` from a
/// backup's record, under the id it had (a damaged record, or one whose key
/// is not its id, names itself). Not synced: `imported` does that.
pub(crate) fn import_one(data_dir: &Path, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
    let dir = data_dir.join(DIR_NAME);
    let held: Held = super::records::decode(BACKUP_TREE, key, value)?;
    if held.id.as_bytes() != key || held.id.len() != 16 || u64::from_str_radix(&held.id, 16).is_err() {
        let reason = format!("holds delivery {:?}, not a 16-digit hex id matching its key", held.id);
        return Err(StoreError::Corrupt { tree: "quarantine", key: format!("{key:?}"), reason });
    }
    std::fs::create_dir_all(&dir).map_err(|e| log::io_error(&dir, e))?;
    let mut bytes = Vec::new();
    log::frame(KIND_HELD, &held, &mut bytes);
    log::replace_file(&dir, &format!("{}.q", held.id), &bytes).map_err(|e| log::io_error(&dir, e))
}

/// Syncs what `import_one` wrote (the store's open finds the directory).
pub(crate) fn imported(data_dir: &Path) -> Result<(), StoreError> {
    let dir = data_dir.join(DIR_NAME);
    std::fs::create_dir_all(&dir).and_then(|_| log::sync_dir(&dir)).map_err(|e| log::io_error(&dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_deliveries_survive_a_reopen_are_bounded_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::open(dir.path()).unwrap();
        let a =
            q.put("evolution", "`data.key.remoteJid` is required", b"{\"a\":1}", 1_000, 2).unwrap().unwrap();
        let b = q.put("waha", "unknown", b"{}", 5_000, 2).unwrap().unwrap();
        assert_eq!(q.put("waha", "x", b"{}", 6_000, 2).unwrap(), None, "full: refused, not dropped");
        drop(q);
        let q = Quarantine::open(dir.path()).unwrap();
        assert_eq!(q.len(), 2);
        let held = q.get(&a).unwrap().unwrap();
        assert_eq!((held.gateway.as_str(), held.body.as_slice()), ("evolution", &b"{\"a\":1}"[..]));
        assert_eq!(
            q.list().unwrap().iter().map(|h| h.id.clone()).collect::<Vec<_>>(),
            [a.clone(), b.clone()]
        );
        assert_eq!(q.get("../../etc/passwd").unwrap(), None, "ids are hex");
        assert_eq!(q.expire(2_000).unwrap(), 1);
        assert_eq!(q.get(&a).unwrap(), None);
        assert!(q.remove(&b).unwrap());
        assert!(!q.remove(&b).unwrap());
        assert_eq!(q.len(), 0);
        // A new one after a reopen never takes an old id.
        let c = q.put("meta", "x", b"{}", 7_000, 2).unwrap().unwrap();
        assert!(c > b, "{c} after {b}");
        // Damage is named, not a panic, and refuses the next open.
        let held = path(&dir.path().join(DIR_NAME), &c);
        let whole = std::fs::read(&held).unwrap();
        std::fs::write(&held, b"\x01\x02").unwrap();
        assert!(matches!(q.get(&c), Err(StoreError::Corrupt { tree: "quarantine", .. })));
        let err = Quarantine::open(dir.path()).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(&format!("{c}.q")), "{err}");
        // Another delivery's file under this name: from elsewhere, refused too.
        let d = q.put("meta", "y", b"{}", 8_000, 2).unwrap().unwrap();
        std::fs::write(&held, std::fs::read(path(&dir.path().join(DIR_NAME), &d)).unwrap()).unwrap();
        assert!(check(dir.path()).unwrap_err().to_string().contains("a file from elsewhere"));
        std::fs::write(&held, whole).unwrap();
        assert_eq!(check(dir.path()).unwrap(), 2);
    }
}
