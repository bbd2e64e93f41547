//! What the payloads revealed of clients WhatsApp addresses by LID: the
//! link LID → phone, per company, in a file of its own (`lids` in the data
//! directory), so a chat that moves between LID and phone addressing — and
//! its presence, which Baileys keys by the LID alone — stays one
//! conversation across restarts.
//!
//! A new or changed link is appended (the log's framing) and synced before
//! the message that revealed it is stored: once a message went to the
//! phone's conversation, so do the LID's later events. The file holds at
//! most `MAX_LINKS` (the oldest are forgotten: their next LID-only event
//! makes a conversation of the LID's own until a payload shows the phone
//! again) and is rewritten whole once it has twice that many records. In
//! backups (`lids`), so a restore keeps a LID's chat with its history. Not
//! needed to recover: damage keeps the links still readable and drops
//! the rest with a warning (`OnDamage::Skip`).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::recfile::{OnDamage, RecordFile};
use super::StoreError;

const FILE: &str = "lids";

/// Links kept (and in the file after a rewrite).
pub(crate) const MAX_LINKS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Link {
    company: String,
    lid: String,
    phone: String,
}

type Key = (String, String);

pub(crate) struct Links {
    state: Mutex<State>,
}

struct State {
    map: HashMap<Key, String>,
    /// Keys, oldest link first (a key may be here more than once: only its
    /// last place counts, see `forget_oldest`).
    order: VecDeque<Key>,
    file: RecordFile,
    max: usize,
}

impl Links {
    /// Loads the file (a torn tail is cut off and said so).
    pub(crate) fn open(dir: &Path) -> Result<Links, StoreError> {
        Links::open_with(dir, MAX_LINKS)
    }

    fn open_with(dir: &Path, max: usize) -> Result<Links, StoreError> {
        let (file, links) = RecordFile::open::<Link>(dir, FILE, OnDamage::Skip)?;
        let (mut map, mut order) = (HashMap::new(), VecDeque::new());
        for link in links {
            let k = (link.company, link.lid);
            order.push_back(k.clone());
            map.insert(k, link.phone);
        }
        let mut state = State { map, order, file, max };
        state.forget_oldest();
        Ok(Links { state: Mutex::new(state) })
    }

    pub(crate) fn phone(&self, company: &str, lid: &str) -> Option<String> {
        let state = self.state.lock().expect("links lock");
        state.map.get(&(company.to_owned(), lid.to_owned())).cloned()
    }

    /// Whether the link is known as it is (nothing to write).
    pub(crate) fn known(&self, company: &str, lid: &str, phone: &str) -> bool {
        self.phone(company, lid).is_some_and(|p| p == phone)
    }

    /// Records a link, durably (append + `fdatasync`). Blocking.
    pub(crate) fn put(&self, company: &str, lid: &str, phone: &str) -> Result<(), StoreError> {
        let mut state = self.state.lock().expect("links lock");
        let key = (company.to_owned(), lid.to_owned());
        if state.map.get(&key).is_some_and(|p| p == phone) {
            return Ok(());
        }
        let link = Link { company: company.to_owned(), lid: lid.to_owned(), phone: phone.to_owned() };
        state.file.append(&link)?;
        state.order.push_back(key.clone());
        state.map.insert(key, phone.to_owned());
        state.forget_oldest();
        if state.file.records > 2 * state.max {
            state.compact_order();
            let kept: Vec<Link> = state
                .order
                .iter()
                .map(|k| Link { company: k.0.clone(), lid: k.1.clone(), phone: state.map[k].clone() })
                .collect();
            state.file.rewrite(kept)?;
        }
        Ok(())
    }
}

impl State {
    /// Forgets the oldest links past `max`.
    fn forget_oldest(&mut self) {
        while self.map.len() > self.max {
            let Some(key) = self.order.pop_front() else { break };
            // A key linked again later is still in `order`: only its last place counts.
            if !self.order.contains(&key) {
                self.map.remove(&key);
            }
        }
        // Keep `order` from growing without bound with repeated keys.
        if self.order.len() > 4 * self.max.max(1) {
            self.compact_order();
        }
    }

    /// Each key once, at its last place.
    fn compact_order(&mut self) {
        let mut seen = std::collections::HashSet::new();
        let mut kept = VecDeque::new();
        for key in self.order.iter().rev() {
            if seen.insert(key.clone()) {
                kept.push_front(key.clone());
            }
        }
        self.order = kept;
    }
}

/// The name a backup files these records under, as if they were a tree.
pub(crate) const BACKUP_TREE: &str = "lids";

impl Links {
    /// Every link kept, oldest first, encoded, for a backup.
    pub(crate) fn export(&self) -> Vec<Vec<u8>> {
        let mut state = self.state.lock().expect("links lock");
        state.compact_order();
        let state = &*state;
        let link = |k: &Key| Link { company: k.0.clone(), lid: k.1.clone(), phone: state.map[k].clone() };
        state.order.iter().map(|k| super::records::encode(&link(k))).collect()
    }
}

/// Writes the links file of a store being built in `dir` from a backup's
/// records, each checked to decode first (a damaged one names itself).
pub(crate) fn import(dir: &Path, records: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
    let links = records
        .iter()
        .map(|(k, v)| super::records::decode::<Link>(BACKUP_TREE, k, v))
        .collect::<Result<Vec<Link>, StoreError>>()?;
    RecordFile::open::<Link>(dir, FILE, OnDamage::Refuse)?.0.rewrite(links)
}

/// What opening the file would find (see `recfile::check`), changing nothing.
pub(crate) fn check(dir: &Path) -> Result<Vec<String>, StoreError> {
    super::recfile::check::<Link>(dir, FILE, OnDamage::Skip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn links_survive_a_reopen_a_torn_tail_is_cut_and_the_oldest_go_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let links = Links::open_with(dir.path(), 3).unwrap();
        assert_eq!(links.phone("962302", "111111111111111"), None);
        links.put("962302", "111111111111111", "79001234567").unwrap();
        links.put("962302", "222222222222222", "79001234568").unwrap();
        links.put("777", "111111111111111", "79009999999").unwrap();
        drop(links);
        let links = Links::open_with(dir.path(), 3).unwrap();
        assert_eq!(links.phone("962302", "111111111111111").as_deref(), Some("79001234567"));
        assert_eq!(links.phone("777", "111111111111111").as_deref(), Some("79009999999"), "per company");
        // A fourth link: the oldest is forgotten.
        links.put("962302", "333333333333333", "79001234569").unwrap();
        assert_eq!(links.phone("962302", "111111111111111"), None);
        assert!(links.known("962302", "333333333333333", "79001234569"));
        drop(links);
        // A torn record at the end: cut, the rest kept.
        let path = dir.path().join(FILE);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let links = Links::open_with(dir.path(), 3).unwrap();
        assert_eq!(links.phone("962302", "333333333333333").as_deref(), Some("79001234569"));
        // Past twice the bound the file is rewritten with what is kept.
        for i in 0..10 {
            links.put("962302", &format!("44444444444444{i}"), "79001234560").unwrap();
        }
        let records = super::super::log::records(&std::fs::read(&path).unwrap()).0.len();
        assert!(records <= 6, "{records} records after the rewrites");
        drop(links);
        let links = Links::open_with(dir.path(), 3).unwrap();
        assert_eq!(links.phone("962302", "444444444444449").as_deref(), Some("79001234560"));
    }
}
