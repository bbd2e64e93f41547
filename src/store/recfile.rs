//! A small file of records in the log's framing, for the store's own side
//! files (the LID links, the takeovers): loaded whole on open (a torn tail —
//! a record a crash cut short — is cut off and said so), appended and synced
//! one record at a time, and rewritten whole (temporary file, rename,
//! directory sync) when its owner says it has grown.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{log, StoreError};

/// Every record of these files has this kind.
const KIND: u8 = 1;

pub(crate) struct RecordFile {
    dir: PathBuf,
    name: &'static str,
    file: File,
    /// Records in the file now.
    pub records: usize,
}

impl RecordFile {
    /// Opens (or creates) `dir/name`; its records, decoded, in order.
    pub(crate) fn open<T: DeserializeOwned>(
        dir: &Path,
        name: &'static str,
    ) -> Result<(RecordFile, Vec<T>), StoreError> {
        let path = dir.join(name);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(|e| log::io_error(&path, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(log::io_error(&path, e)),
        }
        let (found, valid) = log::records(&bytes);
        let mut out = Vec::with_capacity(found.len());
        for (at, kind, payload) in &found {
            let key = format!("{name}@{at}");
            if *kind != KIND {
                return Err(StoreError::Corrupt {
                    tree: name,
                    key,
                    reason: format!("unknown record kind {kind}"),
                });
            }
            let (record, _) = bincode::serde::decode_from_slice(payload, bincode::config::standard())
                .map_err(|e| StoreError::Corrupt { tree: name, key, reason: e.to_string() })?;
            out.push(record);
        }
        if valid < bytes.len() {
            tracing::warn!(file = %path.display(), offset = valid, cut = bytes.len() - valid, "a torn record at the end of the file; cut off");
            log::truncate(&path, valid as u64)?;
        }
        let file =
            OpenOptions::new().create(true).append(true).open(&path).map_err(|e| log::io_error(&path, e))?;
        Ok((RecordFile { dir: dir.to_owned(), name, file, records: out.len() }, out))
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
