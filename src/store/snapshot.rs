//! Whole-store export and import, for backups. The file format belongs to
//! `backup`; here is only what needs sled: every record of every tree, in a
//! consistent cut, and a fresh store built from such records.

use std::path::Path;

use super::{open_db, Store, StoreError, ID_FLOOR, META};

/// sled's own default tree; turnstile keeps nothing there.
const DEFAULT_TREE: &[u8] = b"__sled__default";

impl Store {
    /// Calls `visit(tree, key, value)` for every record, tree by tree, while
    /// holding the write gate alone: writers wait, so the records form one
    /// consistent cut. Returns an id above every id in the cut (for
    /// `import_into`). Run it off the async runtime: writers block meanwhile.
    pub fn export<E>(&self, mut visit: impl FnMut(&str, &[u8], &[u8]) -> Result<(), E>) -> Result<u64, E>
    where
        E: From<StoreError>,
    {
        let _alone = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let next_id = self.next_id()?;
        let mut names: Vec<sled::IVec> =
            self.db.tree_names().into_iter().filter(|n| n.as_ref() != DEFAULT_TREE).collect();
        names.sort();
        for name in names {
            let tree = self.db.open_tree(&name).map_err(StoreError::from)?;
            let name = String::from_utf8_lossy(&name).into_owned();
            for kv in tree.iter() {
                let (k, v) = kv.map_err(StoreError::from)?;
                visit(&name, &k, &v)?;
            }
        }
        Ok(next_id)
    }

    /// Opens the store in `dir` and closes it again: fails with
    /// `StoreError::Held` while another process (a running daemon) has it.
    pub fn probe(dir: &Path) -> Result<(), StoreError> {
        open_db(dir).map(drop)
    }

    /// Builds a new store in `dir` (which must not hold one) from exported
    /// records, so that the ids it generates start above `next_id`. Flushed
    /// when it returns. Needs no runtime.
    pub fn import_into<E>(
        dir: &Path,
        next_id: u64,
        records: impl IntoIterator<Item = Result<(String, Vec<u8>, Vec<u8>), E>>,
    ) -> Result<(), E>
    where
        E: From<StoreError>,
    {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Sled(e.into()))?;
        let db = open_db(dir)?;
        for record in records {
            let (tree, key, value) = record?;
            db.open_tree(tree.as_bytes()).and_then(|t| t.insert(key, value)).map_err(StoreError::from)?;
        }
        // Fresh sled counters start at zero: lift them above every restored id.
        db.open_tree(META)
            .and_then(|t| t.insert(ID_FLOOR, &next_id.to_be_bytes()[..]))
            .map_err(StoreError::from)?;
        db.flush().map_err(StoreError::from)?;
        Ok(())
    }
}
