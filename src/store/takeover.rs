//! Human takeover: which conversations salon staff have taken over (the
//! assistant steps aside until they resume, by time or by hand), and what
//! staff wrote — kept for the conversation's history and for the next
//! turn, whose handler sees both sides of what happened meanwhile.
//!
//! A file of its own (`takeover` in the data directory), records in the
//! log's framing, each appended and synced before its write is answered: a
//! restart during a pause keeps it paused with the same resume time. The
//! state is rebuilt from the file on open and the file is rewritten whole
//! once it holds twice the records the state needs. Bounded: per
//! conversation the last `STAFF_KEPT` staff messages; conversations with
//! nothing paused and nothing undelivered are forgotten past `CONVS_KEPT`.
//! Damage other than a torn tail refuses the open (`OnDamage::Refuse`): a
//! pause lost without a word would let the assistant talk over staff.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::recfile::{OnDamage, RecordFile};
use super::StoreError;
use crate::message::Conv;

const FILE: &str = "takeover";
/// Staff messages kept per conversation.
pub(crate) const STAFF_KEPT: usize = 20;
/// Conversations remembered that are not paused.
const CONVS_KEPT: usize = 50_000;

/// A pause: who took over, since when, and when the assistant comes back
/// on its own (`None`: only when resumed by hand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub by: String,
    pub since_ms: u64,
    pub resume_at_ms: Option<u64>,
}

/// A message staff wrote from the salon's phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaffMessage {
    pub id: String,
    pub text: String,
    pub at_ms: u64,
    /// The signal it came by (`waha`, `evolution`, `meta`).
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Record {
    Pause {
        conv: Conv,
        paused: Paused,
    },
    Staff {
        conv: Conv,
        message: StaffMessage,
    },
    Resume {
        conv: Conv,
    },
    /// A turn's handler saw the staff messages up to here.
    Delivered {
        conv: Conv,
        up_to_ms: u64,
    },
}

/// What the store knows of one conversation's takeover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Takeover {
    pub paused: Option<Paused>,
    /// The latest staff messages, oldest first.
    pub staff: VecDeque<StaffMessage>,
    /// Staff messages up to this time were in a turn's input already.
    pub delivered_ms: u64,
}

impl Takeover {
    /// Staff messages no turn has seen yet.
    pub fn undelivered(&self) -> Vec<StaffMessage> {
        self.staff.iter().filter(|m| m.at_ms > self.delivered_ms).cloned().collect()
    }

    fn apply(&mut self, record: &Record) {
        match record {
            Record::Pause { paused, .. } => self.paused = Some(paused.clone()),
            Record::Staff { message, .. } => {
                if !self.staff.iter().any(|m| m.id == message.id) {
                    let at =
                        self.staff.iter().position(|m| m.at_ms > message.at_ms).unwrap_or(self.staff.len());
                    self.staff.insert(at, message.clone());
                    while self.staff.len() > STAFF_KEPT {
                        self.staff.pop_front();
                    }
                }
            }
            Record::Resume { .. } => self.paused = None,
            Record::Delivered { up_to_ms, .. } => self.delivered_ms = self.delivered_ms.max(*up_to_ms),
        }
    }

    /// How many records `records` makes.
    fn record_count(&self) -> usize {
        self.staff.len() + (self.delivered_ms > 0) as usize + self.paused.is_some() as usize
    }

    /// The records that rebuild this state.
    fn records(&self, conv: &Conv) -> Vec<Record> {
        let mut out: Vec<Record> =
            self.staff.iter().map(|m| Record::Staff { conv: conv.clone(), message: m.clone() }).collect();
        if self.delivered_ms > 0 {
            out.push(Record::Delivered { conv: conv.clone(), up_to_ms: self.delivered_ms });
        }
        if let Some(paused) = &self.paused {
            out.push(Record::Pause { conv: conv.clone(), paused: paused.clone() });
        }
        out
    }
}

fn conv_of(r: &Record) -> &Conv {
    match r {
        Record::Pause { conv, .. } | Record::Staff { conv, .. } | Record::Resume { conv } => conv,
        Record::Delivered { conv, .. } => conv,
    }
}

pub(crate) struct Takeovers {
    state: Mutex<State>,
}

struct State {
    convs: HashMap<Conv, Takeover>,
    file: RecordFile,
}

impl Takeovers {
    pub(crate) fn open(dir: &Path) -> Result<Takeovers, StoreError> {
        let (file, records) = RecordFile::open::<Record>(dir, FILE, OnDamage::Refuse)?;
        let mut convs: HashMap<Conv, Takeover> = HashMap::new();
        for record in &records {
            convs.entry(conv_of(record).clone()).or_default().apply(record);
        }
        Ok(Takeovers { state: Mutex::new(State { convs, file }) })
    }

    pub(crate) fn get(&self, conv: &Conv) -> Takeover {
        self.state.lock().expect("takeover lock").convs.get(conv).cloned().unwrap_or_default()
    }

    /// Every paused conversation.
    pub(crate) fn paused(&self) -> Vec<(Conv, Paused)> {
        let state = self.state.lock().expect("takeover lock");
        let mut out: Vec<(Conv, Paused)> =
            state.convs.iter().filter_map(|(c, t)| Some((c.clone(), t.paused.clone()?))).collect();
        out.sort_by_key(|(_, p)| p.since_ms);
        out
    }

    pub(crate) fn is_paused(&self, conv: &Conv) -> bool {
        self.state.lock().expect("takeover lock").convs.get(conv).is_some_and(|t| t.paused.is_some())
    }

    pub(crate) fn pause(&self, conv: &Conv, paused: Paused) -> Result<Takeover, StoreError> {
        self.write(Record::Pause { conv: conv.clone(), paused })
    }

    pub(crate) fn staff(&self, conv: &Conv, message: StaffMessage) -> Result<Takeover, StoreError> {
        self.write(Record::Staff { conv: conv.clone(), message })
    }

    pub(crate) fn resume(&self, conv: &Conv) -> Result<Takeover, StoreError> {
        self.write(Record::Resume { conv: conv.clone() })
    }

    pub(crate) fn delivered(&self, conv: &Conv, up_to_ms: u64) -> Result<Takeover, StoreError> {
        self.write(Record::Delivered { conv: conv.clone(), up_to_ms })
    }

    /// Appends and syncs one record, then applies it. Blocking.
    fn write(&self, record: Record) -> Result<Takeover, StoreError> {
        let mut state = self.state.lock().expect("takeover lock");
        state.file.append(&record)?;
        let conv = conv_of(&record).clone();
        let after = {
            let t = state.convs.entry(conv.clone()).or_default();
            t.apply(&record);
            t.clone()
        };
        if state.convs.len() > CONVS_KEPT {
            // Forget conversations with nothing paused and nothing a turn has not seen.
            state.convs.retain(|c, t| *c == conv || t.paused.is_some() || !t.undelivered().is_empty());
        }
        let needed: usize = state.convs.values().map(Takeover::record_count).sum();
        if state.file.records > 2 * needed + 64 {
            let records: Vec<Record> = state.convs.iter().flat_map(|(c, t)| t.records(c)).collect();
            state.file.rewrite(records)?;
        }
        Ok(after)
    }
}

/// The name a backup files these records under, as if they were a tree.
pub(crate) const BACKUP_TREE: &str = "takeover";

impl Takeovers {
    /// The records that rebuild the whole state, encoded, for a backup.
    pub(crate) fn export(&self) -> Vec<Vec<u8>> {
        let state = self.state.lock().expect("takeover lock");
        let mut convs: Vec<(&Conv, &Takeover)> = state.convs.iter().collect();
        convs.sort_by(|a, b| (&a.0.company_id, &a.0.phone).cmp(&(&b.0.company_id, &b.0.phone)));
        convs.into_iter().flat_map(|(c, t)| t.records(c)).map(|r| super::records::encode(&r)).collect()
    }
}

/// Writes the takeover file of a store being built in `dir` from a backup's
/// records, each checked to decode first (a damaged one names itself).
pub(crate) fn import(dir: &Path, records: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
    let decoded = records
        .iter()
        .map(|(k, v)| super::records::decode::<Record>(BACKUP_TREE, k, v))
        .collect::<Result<Vec<Record>, StoreError>>()?;
    let (mut file, existing) = RecordFile::open::<Record>(dir, FILE, OnDamage::Refuse)?;
    debug_assert!(existing.is_empty(), "a store being built has no takeover file yet");
    file.rewrite(decoded)
}

/// What opening the file would find (see `recfile::check`), changing nothing.
pub(crate) fn check(dir: &Path) -> Result<Vec<String>, StoreError> {
    super::recfile::check::<Record>(dir, FILE, OnDamage::Refuse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Conv {
        Conv { company_id: "962302".into(), phone: "79001234567".into() }
    }

    fn staff(id: &str, at_ms: u64) -> StaffMessage {
        StaffMessage { id: id.into(), text: format!("текст {id}"), at_ms, by: "waha".into() }
    }

    #[test]
    fn a_pause_and_staff_messages_survive_a_reopen_and_the_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let t = Takeovers::open(dir.path()).unwrap();
        let paused = Paused { by: "waha".into(), since_ms: 1_000, resume_at_ms: Some(1_801_000) };
        t.pause(&conv(), paused.clone()).unwrap();
        t.staff(&conv(), staff("s1", 1_000)).unwrap();
        t.staff(&conv(), staff("s1", 1_000)).unwrap();
        t.staff(&conv(), staff("s0", 900)).unwrap();
        drop(t);
        let t = Takeovers::open(dir.path()).unwrap();
        let got = t.get(&conv());
        assert_eq!(got.paused, Some(paused), "the same resume time after a restart");
        assert_eq!(
            got.staff.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["s0", "s1"],
            "in time order, once each"
        );
        assert_eq!(t.paused().len(), 1);
        t.delivered(&conv(), 1_000).unwrap();
        t.resume(&conv()).unwrap();
        assert!(!t.is_paused(&conv()));
        assert!(t.get(&conv()).undelivered().is_empty());
        for i in 0..200 {
            t.staff(&conv(), staff(&format!("m{i}"), 2_000 + i)).unwrap();
        }
        assert_eq!(t.get(&conv()).staff.len(), STAFF_KEPT);
        drop(t);
        let records = super::super::log::records(&std::fs::read(dir.path().join(FILE)).unwrap()).0.len();
        assert!(records < 2 * STAFF_KEPT + 64 + 2, "{records} records: rewritten");
        let t = Takeovers::open(dir.path()).unwrap();
        assert_eq!(t.get(&conv()).staff.back().unwrap().id, "m199");
        assert!(t.get(&conv()).paused.is_none());
    }

    #[test]
    fn an_export_imported_into_a_fresh_directory_rebuilds_the_same_state() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let t = Takeovers::open(from.path()).unwrap();
        let paused = Paused { by: "api".into(), since_ms: 5, resume_at_ms: None };
        t.pause(&conv(), paused).unwrap();
        t.staff(&conv(), staff("s1", 6)).unwrap();
        t.delivered(&conv(), 6).unwrap();
        let other = Conv { company_id: "962302".into(), phone: "79007654321".into() };
        t.staff(&other, staff("s2", 7)).unwrap();
        let records: Vec<(Vec<u8>, Vec<u8>)> =
            t.export().into_iter().enumerate().map(|(i, v)| ((i as u64).to_be_bytes().to_vec(), v)).collect();
        import(to.path(), &records).unwrap();
        let back = Takeovers::open(to.path()).unwrap();
        assert_eq!((back.get(&conv()), back.get(&other)), (t.get(&conv()), t.get(&other)));
        let damaged = vec![(b"k".to_vec(), vec![0xff; 3])];
        let e = import(tempfile::tempdir().unwrap().path(), &damaged).unwrap_err().to_string();
        assert!(e.contains("takeover"), "{e}");
    }
}
