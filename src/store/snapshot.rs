//! Whole-store export and import, for backups. The file format belongs to
//! `backup`; here is only what needs the store's insides: every record, in a
//! consistent cut, and a fresh store built from such records.
//!
//! The cut: the writer holds its sled writes while the records are read,
//! so no commit lands halfway; messages go on into the log meanwhile. Pending messages and open claims live in the log; they are
//! exported as the trees the first layout had (`inbox`, open `turns`), and
//! an import writes them there, so that opening the restored store moves
//! them into a log of its own like any first-layout store.

use std::path::Path;

use super::archive::{self, Archive};
use super::dedup;
use super::parts::{PartFiles, Which, INLINE_MAX};
use super::records::{encode, seq_key};
use super::{log, open_db, writer, Store, StoreError, ID_FLOOR, META};

/// An import puts the marks retired within this long of each other, up to
/// this many, into one archive chunk.
const IMPORT_CHUNK_MS: u64 = 60 * 1000;
const IMPORT_CHUNK_MARKS: usize = 1 << 16;

/// The marks an import gathers for one archive chunk.
#[derive(Default)]
struct ImportChunk {
    first_ms: u64,
    newest_ms: u64,
    hashes: Vec<dedup::IdHash>,
}

impl ImportChunk {
    fn write_to(&mut self, archive: &mut Archive, dir: &Path) -> Result<(), StoreError> {
        let hashes = std::mem::take(&mut self.hashes);
        archive.append(self.newest_ms, &hashes).map_err(|e| log::io_error(dir, e))
    }
}

/// What writes a store's file beside the engine from a backup's records.
type Import = fn(&Path, &[KeyValue]) -> Result<(), StoreError>;

/// A backup's record: key and value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// The small files beside the engine a backup carries, by the tree name it
/// files their records under (see `Store::export_side`); the held
/// deliveries, large, are written one by one.
const SIDE: [(&str, Import); 4] = [
    (super::takeover::BACKUP_TREE, super::takeover::import),
    (super::links::BACKUP_TREE, super::links::import),
    (super::receipts::BACKUP_TREE, super::receipts::import),
    (super::rhythms::BACKUP_TREE, super::rhythms::import),
];

/// sled's own default tree; turnstile keeps nothing there.
pub(super) const DEFAULT_TREE: &[u8] = b"__sled__default";

impl Store {
    /// Calls `visit(tree, key, value)` for every record, tree by tree, as
    /// one consistent cut: the writer hands over its memory (pending
    /// messages, open claims) and holds its sled writes until the export is
    /// done, while it goes on taking messages into the log — ingest does not
    /// stop for a backup. Returns an id above every id in the cut (for
    /// `import_into`). Blocking: run it off the async runtime.
    pub fn export<E>(&self, mut visit: impl FnMut(&str, &[u8], &[u8]) -> Result<(), E>) -> Result<u64, E>
    where
        E: From<StoreError>,
    {
        let (cut_tx, cut_rx) = std::sync::mpsc::channel();
        self.inner.tx.send(writer::Op::Export { cut: cut_tx }).map_err(|_| StoreError::Closed)?;
        let cut = cut_rx.recv().map_err(|_| StoreError::Closed)?;
        // However the export ends, the writer's sled writes resume.
        struct End<'a>(&'a std::sync::mpsc::Sender<writer::Op>);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                let _ = self.0.send(writer::Op::EndExport);
            }
        }
        let _end = End(&self.inner.tx);
        for m in &cut.pending {
            visit("inbox", &seq_key(&m.conv, m.seq), &encode(m))?;
        }
        for t in &cut.claims {
            visit("turns", t.turn_id.as_bytes(), &encode(t))?;
        }
        let gen = self.gen();
        let db = &gen.db;
        let mut names: Vec<sled::IVec> =
            db.tree_names().into_iter().filter(|n| n.as_ref() != DEFAULT_TREE).collect();
        names.sort();
        for name in names {
            let tree = db.open_tree(&name).map_err(StoreError::from)?;
            let name = String::from_utf8_lossy(&name).into_owned();
            if name == "dedup" {
                // The archived marks first, a record per chunk, in the
                // format of the tree's own records (time ‖ a unique tail).
                for (i, chunk) in archive::read_all(&self.inner.dir)?.into_iter().enumerate() {
                    let mut key = chunk.newest_ms.to_be_bytes().to_vec();
                    key.extend_from_slice(&(u64::MAX - i as u64).to_be_bytes());
                    visit(&name, &key, &dedup::pack(&chunk.hashes))?;
                }
            }
            if name == "ctx_files" {
                continue; // locations in this directory: their parts go with their trees
            }
            for kv in tree.iter() {
                let (k, v) = kv.map_err(StoreError::from)?;
                // The seal is this directory's bookkeeping, not data (damage.rs).
                if name == super::META && k.as_ref() == super::damage::SEAL_KEY {
                    continue;
                }
                visit(&name, &k, &v)?;
            }
            // Parts kept in files go into the backup as records of their
            // tree, as a store before `parts.rs` held them.
            if let Some(which) = Which::BOTH.into_iter().find(|w| w.tree_name() == name) {
                for kv in gen.trees.ctx_files.scan_prefix(which.file_key(b"")) {
                    let (k, v) = kv.map_err(StoreError::from)?;
                    let loc = super::contexts::decode_location(&k, &v)?;
                    let bytes = self.inner.shared.parts.read(which, &k[1..], &loc)?;
                    visit(&name, &k[1..], &bytes)?;
                }
            }
        }
        self.export_side(&mut visit)?;
        Ok(cut.next_id)
    }

    /// The records of the files beside the engine, each filed under a tree
    /// name of its own: who has taken which conversation over (so the
    /// assistant does not talk over staff after a restore), the deliveries
    /// held for a replay (acknowledged to their senders), the LID links
    /// (else a LID-addressed client's chat splits from its history), the
    /// receipts and the learned rhythms — so a backup, and `compact` that
    /// goes through one, keeps everything the directory held.
    fn export_side<E: From<StoreError>>(
        &self,
        visit: &mut impl FnMut(&str, &[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut numbered = |tree: &str, records: Vec<Vec<u8>>| {
            records.iter().enumerate().try_for_each(|(i, r)| visit(tree, &(i as u64).to_be_bytes(), r))
        };
        numbered(super::takeover::BACKUP_TREE, self.inner.takeovers.export())?;
        numbered(super::links::BACKUP_TREE, self.inner.links.export())?;
        numbered(super::receipts::BACKUP_TREE, self.inner.receipts.export())?;
        let saved = self.rhythms();
        if saved != super::SavedLearning::default() {
            visit(super::rhythms::BACKUP_TREE, b"saved", &encode(&saved))?;
        }
        self.inner.quarantine.export(|id, held| visit(super::quarantine::BACKUP_TREE, id, held))
    }

    /// Opens the store in `dir` and closes it again: fails with
    /// `StoreError::Held` while another process (a running daemon) has it.
    pub fn probe(dir: &Path) -> Result<(), StoreError> {
        super::recover::lock_dir(dir).map(drop)
    }

    /// Builds a new store in `dir` (which must not hold one) from exported
    /// records, so that the ids it generates start above `next_id`. Synced
    /// (files and directory entries) when it returns. Needs no runtime.
    pub fn import_into<E>(
        dir: &Path,
        next_id: u64,
        records: impl IntoIterator<Item = Result<(String, Vec<u8>, Vec<u8>), E>>,
    ) -> Result<(), E>
    where
        E: From<StoreError>,
    {
        std::fs::create_dir_all(dir).map_err(|e| log::io_error(dir, e))?;
        let db = open_db(dir, super::Options::default())?;
        // Dedup marks go straight into the archive, an hour's worth of
        // records to a chunk; the rest into sled's trees.
        let mut archive = Archive::unsynced(dir)?;
        let mut chunk = ImportChunk::default();
        let mut side: [(&str, Vec<KeyValue>); 4] = SIDE.map(|(tree, _)| (tree, Vec::new()));
        let parts = PartFiles::open(dir)?;
        for record in records {
            let (tree, key, value) = record?;
            if tree == super::quarantine::BACKUP_TREE {
                super::quarantine::import_one(dir, &key, &value)?;
                continue;
            }
            if let Some((_, records)) = side.iter_mut().find(|(name, _)| *name == tree) {
                records.push((key, value));
                continue;
            }
            if tree == "dedup" {
                let hashes = dedup::unpack_record(&key, &value)?;
                let Some(at) = key.get(..8) else {
                    let reason = format!("a {}-byte key has no retirement time", key.len());
                    return Err(StoreError::Corrupt { tree: "dedup", key: format!("{key:?}"), reason }.into());
                };
                let at = u64::from_be_bytes(at.try_into().expect("8 bytes"));
                if !chunk.hashes.is_empty()
                    && (at >= chunk.first_ms + IMPORT_CHUNK_MS || chunk.hashes.len() >= IMPORT_CHUNK_MARKS)
                {
                    chunk.write_to(&mut archive, dir)?;
                }
                if chunk.hashes.is_empty() {
                    chunk.first_ms = at;
                }
                chunk.newest_ms = chunk.newest_ms.max(at);
                chunk.hashes.extend(hashes);
                continue;
            }
            // Large parts into files of their own, as a commit puts them.
            let large = Which::BOTH.into_iter().find(|w| w.tree_name() == tree && value.len() > INLINE_MAX);
            let (tree, key, value) = match large {
                Some(which) => {
                    let loc = parts.write(which, &key, &value)?;
                    ("ctx_files".to_owned(), which.file_key(&key), encode(&loc))
                }
                None => (tree, key, value),
            };
            db.open_tree(tree.as_bytes()).and_then(|t| t.insert(key, value)).map_err(StoreError::from)?;
        }
        chunk.write_to(&mut archive, dir)?;
        for ((_, records), (_, import)) in side.iter().zip(SIDE) {
            import(dir, records)?;
        }
        super::quarantine::imported(dir)?;
        // Fresh sled counters start at zero: lift them above every restored id.
        db.open_tree(META)
            .and_then(|t| t.insert(ID_FLOOR, &next_id.to_be_bytes()[..]))
            .map_err(StoreError::from)?;
        db.flush().map_err(StoreError::from)?;
        drop(db);
        super::generation::sync_all_under(dir).map_err(|e| log::io_error(dir, e))?;
        Ok(())
    }
}
