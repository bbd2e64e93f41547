//! Who answers a conversation: the assistant, or salon staff who took it
//! over from the salon's own WhatsApp. `Handover` turns the gateways'
//! signals (and the API's pause and resume) into the durable takeover state
//! (`store::takeover`) and tells the driver, which holds the conversation's
//! batches meanwhile; the outbox holds back what the assistant still had to
//! say (`outbox`), and the next turn's handler sees what staff wrote
//! (`turns::run`).
//!
//! Our own sends echo back on WAHA's `message.any`: an event is ours when
//! the sender says so (`source: "api"`) or when its id is one a send of ours
//! got back (`gateway::Sent`) — waiting, while a send to that chat is in
//! flight, for its answer; never decided by timing alone.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::config::TakeoverConfig;
use crate::gateway::Sent;
use crate::ingest::Staff;
use crate::message::{unix_ms, Conv};
use crate::metrics::Metrics;
use crate::store::{Paused, StaffMessage, Store, StoreError};
use crate::turns::DriverHandle;

/// What a staff-side message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// An echo of our own send, or takeover is off: nothing.
    Ignored,
    /// The conversation is (still) taken over, until later.
    Paused,
    /// The keyword: the assistant takes the conversation back.
    Resumed,
}

pub struct Handover {
    store: Store,
    driver: DriverHandle,
    sent: Arc<Sent>,
    config: TakeoverConfig,
    metrics: Arc<Metrics>,
    /// How long an echo waits for our send's answer (the gateway's timeout).
    echo_wait: Duration,
}

impl Handover {
    pub fn new(
        store: Store,
        driver: DriverHandle,
        sent: Arc<Sent>,
        config: TakeoverConfig,
        metrics: Arc<Metrics>,
        echo_wait: Duration,
    ) -> Handover {
        Handover { store, driver, sent, config, metrics, echo_wait }
    }

    fn resume_after_ms(&self) -> u64 {
        self.config.resume_after_min * 60_000
    }

    /// A message from the salon's side of a client's chat (its `conv`
    /// already resolved).
    pub async fn staff(&self, staff: Staff) -> Result<Handled, StoreError> {
        if !self.config.enabled {
            return Ok(Handled::Ignored);
        }
        let conv = staff.conv.clone();
        let ours = staff.source.as_deref() == Some("api")
            || self.sent.is_ours(&conv, &staff.id, self.echo_wait).await;
        if ours {
            return Ok(Handled::Ignored);
        }
        let keyword = self.config.keyword.trim();
        if !keyword.is_empty() && staff.text.trim().eq_ignore_ascii_case(keyword) {
            info!(conv = %conv.masked(), "staff sent the keyword: the assistant takes the conversation back");
            self.resume(&conv).await?;
            return Ok(Handled::Resumed);
        }
        let known = self.store.takeover(&conv);
        if known.staff.iter().any(|m| m.id == staff.id) {
            // Redelivered: already counted.
            return Ok(if known.paused.is_some() { Handled::Paused } else { Handled::Ignored });
        }
        let now = unix_ms();
        let message = StaffMessage { id: staff.id, text: staff.text, at_ms: now, by: staff.by.to_owned() };
        self.store.staff_message(&conv, message).await?;
        let resume_at = now + self.resume_after_ms();
        let paused = match known.paused {
            // Staff wrote again: the silence counts from now (a pause set
            // by hand until resumed stays so).
            Some(p) => Paused { resume_at_ms: p.resume_at_ms.map(|at| at.max(resume_at)), ..p },
            None => {
                self.metrics.takeover(staff.by);
                info!(conv = %conv.masked(), by = staff.by, "staff answered from the salon's phone: the assistant steps aside");
                Paused { by: staff.by.to_owned(), since_ms: now, resume_at_ms: Some(resume_at) }
            }
        };
        self.store.pause(&conv, paused.clone()).await?;
        self.driver.takeover(conv, paused.resume_at_ms);
        Ok(Handled::Paused)
    }

    /// Pauses from the API or console: for `minutes` (default
    /// `takeover.resume_after_min`; 0: until resumed).
    pub async fn pause(&self, conv: &Conv, minutes: Option<u64>) -> Result<Paused, StoreError> {
        let now = unix_ms();
        let resume_at_ms = match minutes.unwrap_or(self.config.resume_after_min) {
            0 => None,
            m => Some(now + m * 60_000),
        };
        let since_ms = self.store.takeover(conv).paused.map_or(now, |p| p.since_ms);
        if !self.store.is_paused(conv) {
            self.metrics.takeover("api");
        }
        let paused = Paused { by: "api".into(), since_ms, resume_at_ms };
        self.store.pause(conv, paused.clone()).await?;
        self.driver.takeover(conv.clone(), paused.resume_at_ms);
        Ok(paused)
    }

    /// The assistant takes the conversation back now; false if it was not paused.
    pub async fn resume(&self, conv: &Conv) -> Result<bool, StoreError> {
        let was = self.store.is_paused(conv);
        if was {
            self.store.resume(conv).await?;
        }
        self.driver.resume(conv.clone());
        Ok(was)
    }
}
