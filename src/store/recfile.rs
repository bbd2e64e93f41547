//! A small file of records in the log's framing, for the store's own side
//! files (the LID links, the takeovers, the receipts): loaded whole on open
//! (a torn tail — a record a crash cut short — is cut off and said so),
//! appended and synced one record at a time, and rewritten whole (temporary
//! file, rename, directory sync) when its owner says it has grown.
//!
//! Damage that is not a torn tail — a bad record with whole records after
//! it, or a record that does not decode — is the owner's call (`OnDamage`):
//! a file the daemon needs to behave (the takeovers) stops the open, naming
//! the file and offset; one it can do without (links, receipts: neither is
//! needed to recover) keeps every record it can still read, says which
//! bytes it dropped, and is rewritten without them.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::log::{self, Tail};
use super::StoreError;

/// Every record of these files has this kind.
const KIND: u8 = 1;

/// What the open does with damage that is not a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnDamage {
    /// Stop the open: the error names the file and offset.
    Refuse,
    /// Keep what can be read, warn, and rewrite the file without the rest.
    Skip,
}

pub(crate) struct RecordFile {
    dir: PathBuf,
    name: &'static str,
    file: File,
    /// Records in the file now.
    pub records: usize,
}

/// What reading a file found.
pub(crate) struct Parsed<T> {
    pub records: Vec<T>,
    /// The frames of the records kept, as they are in the file.
    kept: Vec<u8>,
    /// Damaged stretches skipped (`OnDamage::Skip`): offset and length.
    pub dropped: Vec<(usize, usize)>,
    /// A torn tail: offset and length.
    pub torn: Option<(u64, u64)>,
}

/// Reads `dir/name` (missing: empty) by the rules above, changing nothing.
pub(crate) fn parse<T: DeserializeOwned>(
    dir: &Path,
    name: &'static str,
    on_damage: OnDamage,
) -> Result<Parsed<T>, StoreError> {
    let path = dir.join(name);
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(|e| log::io_error(&path, e))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(log::io_error(&path, e)),
    }
    let mut parsed = Parsed { records: Vec::new(), kept: Vec::new(), dropped: Vec::new(), torn: None };
    let mut from = 0usize;
    loop {
        let (found, valid) = log::records(&bytes[from..]);
        for (at, kind, payload) in found {
            let at = from + at;
            let decoded = match kind {
                KIND => bincode::serde::decode_from_slice(payload, super::records::decoding())
                    .map(|(r, _)| r)
                    .map_err(|e| e.to_string()),
                kind => Err(format!("unknown record kind {kind}")),
            };
            let frame = &bytes[at..at + 9 + payload.len()];
            match (decoded, on_damage) {
                (Ok(record), _) => {
                    parsed.records.push(record);
                    parsed.kept.extend_from_slice(frame);
                }
                (Err(reason), OnDamage::Refuse) => {
                    return Err(StoreError::Corrupt {
                        tree: name,
                        key: format!("{}@{at}", path.display()),
                        reason,
                    })
                }
                (Err(_), OnDamage::Skip) => parsed.dropped.push((at, frame.len())),
            }
        }
        let end = from + valid;
        match Tail::of(&bytes, end) {
            Tail::Clean => break,
            Tail::Torn { at, bytes } => {
                parsed.torn = Some((at, bytes));
                break;
            }
            Tail::Damaged { at, resumes } => match on_damage {
                OnDamage::Refuse => return Err(log::damaged(name, &path, at, resumes)),
                OnDamage::Skip => {
                    parsed.dropped.push((at as usize, (resumes - at) as usize));
                    from = resumes as usize;
                }
            },
        }
    }
    Ok(parsed)
}

/// What opening `dir/name` would repair and say (for `verify`), changing nothing.
pub(crate) fn check<T: DeserializeOwned>(
    dir: &Path,
    name: &'static str,
    on_damage: OnDamage,
) -> Result<Vec<String>, StoreError> {
    let parsed = parse::<T>(dir, name, on_damage)?;
    let path = dir.join(name).display().to_string();
    let mut notes: Vec<String> = parsed
        .dropped
        .iter()
        .map(|(at, n)| {
            format!(
                "{path}@{at}: {n} damaged bytes; dropped on the next start (the records after them are kept)"
            )
        })
        .collect();
    if let Some((at, n)) = parsed.torn {
        notes.push(format!("{path}@{at}: a torn record of {n} bytes at the end; cut off on the next start"));
    }
    Ok(notes)
}

impl RecordFile {
    /// Opens (or creates) `dir/name`; its records, decoded, in order.
    pub(crate) fn open<T: DeserializeOwned>(
        dir: &Path,
        name: &'static str,
        on_damage: OnDamage,
    ) -> Result<(RecordFile, Vec<T>), StoreError> {
        let path = dir.join(name);
        let parsed = parse::<T>(dir, name, on_damage)?;
        if !parsed.dropped.is_empty() {
            let bytes: usize = parsed.dropped.iter().map(|(_, n)| n).sum();
            let offsets: Vec<usize> = parsed.dropped.iter().map(|(at, _)| *at).collect();
            tracing::warn!(file = %path.display(), ?offsets, bytes, kept = parsed.records.len(), "damaged records in the file dropped; the file is rewritten with the records still readable");
            super::damage::noted(
                &path,
                &format!("damaged records at offsets {offsets:?} dropped ({bytes} bytes)"),
            );
            log::replace_file(dir, name, &parsed.kept)
                .and_then(|_| log::sync_dir(dir))
                .map_err(|e| log::io_error(&path, e))?;
        } else if let Some((at, bytes)) = parsed.torn {
            tracing::warn!(file = %path.display(), offset = at, bytes, "cut off a torn record at the end of the file: what a crash in the middle of an append leaves");
            super::damage::noted(&path, &format!("a torn record of {bytes} bytes cut at offset {at}"));
            log::truncate(&path, at)?;
        }
        let file =
            OpenOptions::new().create(true).append(true).open(&path).map_err(|e| log::io_error(&path, e))?;
        Ok((RecordFile { dir: dir.to_owned(), name, file, records: parsed.records.len() }, parsed.records))
    }

    /// Appends one record and syncs it. Blocking.
    pub(crate) fn append<T: Serialize>(&mut self, record: &T) -> Result<(), StoreError> {
        self.append_unsynced(record)?;
        self.sync()
    }

    /// Appends one record; durable at the next `sync`.
    pub(crate) fn append_unsynced<T: Serialize>(&mut self, record: &T) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        log::frame(KIND, record, &mut bytes);
        self.file.write_all(&bytes).map_err(|e| log::io_error(&self.dir.join(self.name), e))?;
        self.records += 1;
        Ok(())
    }

    pub(crate) fn sync(&mut self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(|e| log::io_error(&self.dir.join(self.name), e))
    }

    /// Replaces the file with these records, atomically. Blocking.
    pub(crate) fn rewrite<T: Serialize>(
        &mut self,
        records: impl IntoIterator<Item = T>,
    ) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        let mut n = 0;
        for r in records {
            log::frame(KIND, &r, &mut bytes);
            n += 1;
        }
        let path = self.dir.join(self.name);
        log::replace_file(&self.dir, self.name, &bytes)
            .and_then(|_| log::sync_dir(&self.dir))
            .map_err(|e| log::io_error(&path, e))?;
        self.file = OpenOptions::new().append(true).open(&path).map_err(|e| log::io_error(&path, e))?;
        self.records = n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "things";

    /// Four records; the offset each starts at.
    fn four(dir: &Path) -> Vec<usize> {
        let (mut f, _) = RecordFile::open::<String>(dir, NAME, OnDamage::Refuse).unwrap();
        let mut at = vec![0];
        for i in 0..4 {
            f.append(&format!("record {i}")).unwrap();
            at.push(std::fs::metadata(dir.join(NAME)).unwrap().len() as usize);
        }
        at
    }

    fn flip(dir: &Path, at: usize) {
        let mut b = std::fs::read(dir.join(NAME)).unwrap();
        b[at] ^= 0x08;
        std::fs::write(dir.join(NAME), b).unwrap();
    }

    #[test]
    fn damage_in_the_middle_refuses_or_is_dropped_and_said_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let at = four(dir.path());
        flip(dir.path(), at[1] + 10);
        let err = RecordFile::open::<String>(dir.path(), NAME, OnDamage::Refuse).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains(&format!("things@{}", at[1])), "{err}");
        assert_eq!(
            check::<String>(dir.path(), NAME, OnDamage::Refuse).unwrap_err().to_string(),
            err.to_string()
        );
        let notes = check::<String>(dir.path(), NAME, OnDamage::Skip).unwrap();
        assert!(notes.len() == 1 && notes[0].contains(&format!("things@{}", at[1])), "{notes:?}");
        let (_, kept) = RecordFile::open::<String>(dir.path(), NAME, OnDamage::Skip).unwrap();
        assert_eq!(kept, ["record 0", "record 2", "record 3"], "the records after the damage are kept");
        let (mut f, again) = RecordFile::open::<String>(dir.path(), NAME, OnDamage::Refuse).unwrap();
        assert_eq!(again, kept, "rewritten without the damage");
        f.append(&"record 4".to_owned()).unwrap();
        drop(f);
        // The last record damaged: a torn tail, cut off in either mode.
        let len = std::fs::metadata(dir.path().join(NAME)).unwrap().len() as usize;
        flip(dir.path(), len - 2);
        let (_, kept) = RecordFile::open::<String>(dir.path(), NAME, OnDamage::Refuse).unwrap();
        assert_eq!(kept, ["record 0", "record 2", "record 3"]);
        // A record that does not decode as what the file holds.
        let (mut f, _) = RecordFile::open::<String>(dir.path(), NAME, OnDamage::Refuse).unwrap();
        f.append(&7u64).unwrap();
        f.append(&"record 5".to_owned()).unwrap();
        drop(f);
        assert!(RecordFile::open::<String>(dir.path(), NAME, OnDamage::Refuse).is_err());
        let (_, kept) = RecordFile::open::<String>(dir.path(), NAME, OnDamage::Skip).unwrap();
        assert_eq!(kept.last().map(String::as_str), Some("record 5"));
    }
}
