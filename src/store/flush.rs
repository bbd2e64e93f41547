//! Group commit: one fsync serves every write that finished before it began.
//!
//! Each acknowledged webhook must be on disk, but one fsync per request would
//! cap ingest at the disk's sync rate. Writers enqueue a waiter after their
//! write; the flusher takes everything queued, runs one `flush`, and answers
//! them all. A waiter queued while a flush runs waits for the next one, so a
//! flush never answers a write it might not include.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), Arc<str>>>;

#[derive(Clone)]
pub(crate) struct Flusher {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl Flusher {
    /// Spawns the flusher task for `db`; it ends when every `Flusher` is dropped.
    pub(crate) fn spawn(db: sled::Db) -> Flusher {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let db = db.clone();
                // spawn_blocking, not a thread of our own: tokio's paused test
                // clock does not jump ahead while a blocking task runs.
                let result = match tokio::task::spawn_blocking(move || db.flush()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(Arc::from(e.to_string())),
                    Err(e) => Err(Arc::from(format!("flush task failed: {e}"))),
                };
                for waiter in batch.drain(..) {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        Flusher { tx }
    }

    /// Resolves once everything written before this call is durable.
    pub(crate) async fn flush(&self) -> Result<(), Arc<str>> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .map_err(|_| Arc::<str>::from("flusher stopped"))?;
        rx.await.map_err(|_| Arc::<str>::from("flusher stopped"))?
    }
}
