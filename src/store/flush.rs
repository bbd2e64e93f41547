//! Group commit: one fsync serves every write that finished before it began.
//!
//! Each acknowledged webhook must be on disk, but one fsync per request would
//! cap ingest at the disk's sync rate. Writers enqueue a waiter after their
//! write; the flusher takes everything queued, runs one `flush`, and answers
//! them all. A waiter queued while a flush runs waits for the next one, so a
//! flush never answers a write it might not include.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), Arc<str>>>;

enum Request {
    Flush(Waiter),
    /// Flush once more, then end the task (and drop its handle on the database).
    Close(Waiter),
}

#[derive(Clone)]
pub(crate) struct Flusher {
    tx: mpsc::UnboundedSender<Request>,
    /// fsyncs done so far; with group commit, fewer than the flush requests.
    syncs: Arc<AtomicU64>,
}

impl Flusher {
    /// Spawns the flusher task for `db`; it ends when every `Flusher` is dropped.
    pub(crate) fn spawn(db: sled::Db) -> Flusher {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let syncs = Arc::new(AtomicU64::new(0));
        let counter = syncs.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut closing = false;
            while let Some(first) = rx.recv().await {
                for request in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                    match request {
                        Request::Flush(w) => batch.push(w),
                        Request::Close(w) => {
                            batch.push(w);
                            closing = true;
                        }
                    }
                }
                let db = db.clone();
                // spawn_blocking, not a thread of our own: tokio's paused test
                // clock does not jump ahead while a blocking task runs.
                let result = match tokio::task::spawn_blocking(move || db.flush()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(Arc::from(e.to_string())),
                    Err(e) => Err(Arc::from(format!("flush task failed: {e}"))),
                };
                counter.fetch_add(1, Ordering::Relaxed);
                for waiter in batch.drain(..) {
                    let _ = waiter.send(result.clone());
                }
                if closing {
                    return;
                }
            }
        });
        Flusher { tx, syncs }
    }

    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Resolves once everything written before this call is durable.
    pub(crate) async fn flush(&self) -> Result<(), Arc<str>> {
        self.request(Request::Flush).await
    }

    /// A last flush; the task ends after it, so the database can close.
    pub(crate) async fn close(&self) -> Result<(), Arc<str>> {
        self.request(Request::Close).await
    }

    async fn request(&self, make: fn(Waiter) -> Request) -> Result<(), Arc<str>> {
        let (tx, rx) = oneshot::channel();
        let stopped = || Arc::<str>::from("flusher stopped");
        self.tx.send(make(tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}
