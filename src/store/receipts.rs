//! What the client actually received: for every reply piece a gateway took,
//! the message id it gave back, and what WhatsApp later said of it — sent,
//! delivered, read, or failed with a code. Matched by that id; kept for the
//! retention period after the piece left the outbox.
//!
//! A file of its own (`receipts` in the data directory), in the log's
//! framing. Receipts are cheap: appended without a sync each, synced every
//! `SYNC_EVERY` records and when the store closes, so a clean stop loses
//! none (a power cut loses at most the last few, which only means a
//! "delivered" shown as "sent"). Rewritten whole, without what is past its
//! retention, once it holds twice what is kept. Damage keeps the receipts
//! still readable and drops the rest with a warning (`OnDamage::Skip`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::recfile::{OnDamage, RecordFile};
use super::records::OutboxItem;
use super::StoreError;
use crate::message::Conv;

const FILE: &str = "receipts";
/// Receipts kept at most (the oldest go first).
const MAX_KEPT: usize = 200_000;
/// Appended records between two syncs.
const SYNC_EVERY: usize = 64;

/// How far a reply piece got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Delivery {
    /// The gateway took it.
    Sent,
    /// WhatsApp's server has it.
    Server,
    /// The client's phone has it.
    Delivered,
    Read,
    /// A voice note played.
    Played,
    /// WhatsApp refused it (see `failed`).
    Failed,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Sent => "sent",
            Delivery::Server => "server",
            Delivery::Delivered => "delivered",
            Delivery::Read => "read",
            Delivery::Played => "played",
            Delivery::Failed => "failed",
        }
    }

    pub const ALL: [Delivery; 6] = [
        Delivery::Sent,
        Delivery::Server,
        Delivery::Delivered,
        Delivery::Read,
        Delivery::Played,
        Delivery::Failed,
    ];
}

/// One reply piece as the gateway took it, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The gateway's message id (short form, `gateway::short_id`).
    pub id: String,
    pub conv: Conv,
    pub turn_id: String,
    pub part: u32,
    pub parts: u32,
    /// The outbox piece it was (its text, so a retryable failure can go back).
    pub seq: u64,
    pub text: String,
    /// Attempts the piece had taken (a failure after sending counts one more).
    pub attempts: u32,
    pub sent_at_ms: u64,
    pub delivered_at_ms: Option<u64>,
    pub read_at_ms: Option<u64>,
    pub failed: Option<Failure>,
    /// The furthest it got.
    pub state: Delivery,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: Option<i64>,
    pub title: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Record {
    Sent(Receipt),
    Update { id: String, state: Delivery, at_ms: u64, failure: Option<Failure> },
}

pub(crate) struct Receipts {
    state: Mutex<State>,
}

struct State {
    by_id: HashMap<String, Receipt>,
    file: RecordFile,
    unsynced: usize,
}

impl Receipt {
    /// The receipt of a piece the gateway took under `id`, after its
    /// `attempts`-th attempt: sent, nothing heard back yet.
    pub fn sent(id: String, item: &OutboxItem, attempts: u32, sent_at_ms: u64) -> Receipt {
        Receipt {
            id,
            conv: item.conv.clone(),
            turn_id: item.turn_id.clone(),
            part: item.part,
            parts: item.parts,
            seq: item.seq,
            text: item.text.clone(),
            attempts,
            sent_at_ms,
            delivered_at_ms: None,
            read_at_ms: None,
            failed: None,
            state: Delivery::Sent,
        }
    }

    /// Applies what WhatsApp said; false if it says nothing new (an older
    /// state after a newer one, as acks can arrive out of order).
    fn apply(&mut self, state: Delivery, at_ms: u64, failure: Option<Failure>) -> bool {
        match state {
            Delivery::Failed => {
                self.failed = failure.or(Some(Failure { code: None, title: "failed".into(), at_ms }));
                self.state = Delivery::Failed;
                return true;
            }
            Delivery::Delivered => {
                self.delivered_at_ms.get_or_insert(at_ms);
            }
            Delivery::Read | Delivery::Played => {
                self.delivered_at_ms.get_or_insert(at_ms);
                self.read_at_ms.get_or_insert(at_ms);
            }
            Delivery::Sent | Delivery::Server => {}
        }
        if state > self.state && self.state != Delivery::Failed {
            self.state = state;
            return true;
        }
        false
    }
}

impl Receipts {
    pub(crate) fn open(dir: &Path) -> Result<Receipts, StoreError> {
        let (file, records) = RecordFile::open::<Record>(dir, FILE, OnDamage::Skip)?;
        let mut by_id: HashMap<String, Receipt> = HashMap::new();
        for r in records {
            match r {
                Record::Sent(receipt) => {
                    by_id.insert(receipt.id.clone(), receipt);
                }
                Record::Update { id, state, at_ms, failure } => {
                    if let Some(r) = by_id.get_mut(&id) {
                        r.apply(state, at_ms, failure);
                    }
                }
            }
        }
        Ok(Receipts { state: Mutex::new(State { by_id, file, unsynced: 0 }) })
    }

    pub(crate) fn sent(&self, receipt: Receipt) -> Result<(), StoreError> {
        let mut s = self.state.lock().expect("receipts lock");
        s.append(&Record::Sent(receipt.clone()))?;
        s.by_id.insert(receipt.id.clone(), receipt);
        if s.by_id.len() > MAX_KEPT {
            let oldest = s.by_id.values().min_by_key(|r| r.sent_at_ms).map(|r| r.id.clone());
            if let Some(id) = oldest {
                s.by_id.remove(&id);
            }
        }
        s.compact_if_grown()
    }

    /// What WhatsApp said of message `id`; the receipt after it (`None`: not
    /// ours, or past retention), and whether it said anything new.
    pub(crate) fn update(
        &self,
        id: &str,
        state: Delivery,
        at_ms: u64,
        failure: Option<Failure>,
    ) -> Result<Option<(Receipt, bool)>, StoreError> {
        let mut s = self.state.lock().expect("receipts lock");
        let Some(r) = s.by_id.get_mut(id) else { return Ok(None) };
        let changed = r.apply(state, at_ms, failure.clone());
        let after = r.clone();
        if changed {
            s.append(&Record::Update { id: id.to_owned(), state, at_ms, failure })?;
        }
        Ok(Some((after, changed)))
    }

    /// The receipts of a turn's reply, by part.
    pub(crate) fn of_turn(&self, turn_id: &str) -> Vec<Receipt> {
        let s = self.state.lock().expect("receipts lock");
        let mut out: Vec<Receipt> = s.by_id.values().filter(|r| r.turn_id == turn_id).cloned().collect();
        out.sort_by_key(|r| r.part);
        out
    }

    /// Drops receipts sent before `before_ms`; how many.
    pub(crate) fn expire(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut s = self.state.lock().expect("receipts lock");
        let n = s.by_id.len();
        s.by_id.retain(|_, r| r.sent_at_ms >= before_ms);
        let gone = n - s.by_id.len();
        if gone > 0 {
            s.rewrite()?;
        }
        Ok(gone)
    }

    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        let mut s = self.state.lock().expect("receipts lock");
        s.unsynced = 0;
        s.file.sync()
    }
}

impl State {
    fn append(&mut self, r: &Record) -> Result<(), StoreError> {
        self.file.append_unsynced(r)?;
        self.unsynced += 1;
        if self.unsynced >= SYNC_EVERY {
            self.unsynced = 0;
            self.file.sync()?;
        }
        Ok(())
    }

    fn compact_if_grown(&mut self) -> Result<(), StoreError> {
        if self.file.records > 2 * self.by_id.len() + 1_000 {
            self.rewrite()?;
        }
        Ok(())
    }

    fn rewrite(&mut self) -> Result<(), StoreError> {
        let mut kept: Vec<&Receipt> = self.by_id.values().collect();
        kept.sort_by_key(|r| r.sent_at_ms);
        let records: Vec<Record> = kept.into_iter().map(|r| Record::Sent(r.clone())).collect();
        self.unsynced = 0;
        self.file.rewrite(records)
    }
}

/// The name a backup files these records under, as if they were a tree.
pub(crate) const BACKUP_TREE: &str = "receipts";

impl Receipts {
    /// Every receipt kept, as it stands now, oldest first, encoded, for a backup.
    pub(crate) fn export(&self) -> Vec<Vec<u8>> {
        let s = self.state.lock().expect("receipts lock");
        let mut kept: Vec<&Receipt> = s.by_id.values().collect();
        kept.sort_by(|a, b| (a.sent_at_ms, &a.id).cmp(&(b.sent_at_ms, &b.id)));
        kept.into_iter().map(super::records::encode).collect()
    }
}

/// Writes the receipts file of a store being built in `dir` from a backup's
/// records, each checked to decode first (a damaged one names itself).
pub(crate) fn import(dir: &Path, records: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
    let receipts = records
        .iter()
        .map(|(k, v)| super::records::decode::<Receipt>(BACKUP_TREE, k, v).map(Record::Sent))
        .collect::<Result<Vec<Record>, StoreError>>()?;
    RecordFile::open::<Record>(dir, FILE, OnDamage::Refuse)?.0.rewrite(receipts)
}

/// What opening the file would find (see `recfile::check`), changing nothing.
pub(crate) fn check(dir: &Path) -> Result<Vec<String>, StoreError> {
    super::recfile::check::<Record>(dir, FILE, OnDamage::Skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(id: &str, at: u64) -> Receipt {
        Receipt {
            id: id.into(),
            conv: Conv { company_id: "962302".into(), phone: "79001234567".into() },
            turn_id: "t1".into(),
            part: 1,
            parts: 1,
            seq: 7,
            text: "Записала вас на 15:00".into(),
            attempts: 1,
            sent_at_ms: at,
            delivered_at_ms: None,
            read_at_ms: None,
            failed: None,
            state: Delivery::Sent,
        }
    }

    #[test]
    fn receipts_follow_the_furthest_state_survive_a_clean_reopen_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let r = Receipts::open(dir.path()).unwrap();
        r.sent(receipt("wamid.A", 1_000)).unwrap();
        assert_eq!(r.update("wamid.X", Delivery::Read, 2_000, None).unwrap(), None, "not ours");
        let (after, changed) = r.update("wamid.A", Delivery::Read, 3_000, None).unwrap().unwrap();
        assert!(changed);
        assert_eq!(
            (after.state, after.delivered_at_ms, after.read_at_ms),
            (Delivery::Read, Some(3_000), Some(3_000))
        );
        // A late "delivered" changes nothing (acks come out of order).
        assert!(!r.update("wamid.A", Delivery::Delivered, 2_500, None).unwrap().unwrap().1);
        r.sync().unwrap();
        drop(r);
        let r = Receipts::open(dir.path()).unwrap();
        assert_eq!(r.of_turn("t1")[0].state, Delivery::Read, "kept across a clean stop");
        let failure = Failure { code: Some(131047), title: "Re-engagement message".into(), at_ms: 4_000 };
        let (after, _) =
            r.update("wamid.A", Delivery::Failed, 4_000, Some(failure.clone())).unwrap().unwrap();
        assert_eq!(after.failed, Some(failure));
        r.sent(receipt("wamid.B", 9_000)).unwrap();
        assert_eq!(r.expire(5_000).unwrap(), 1);
        assert_eq!(r.of_turn("t1").iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["wamid.B"]);
    }
}
