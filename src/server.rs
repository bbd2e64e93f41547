//! Wiring, in one place and in order: open the store, rebuild batches and
//! turns from it, serve; on shutdown stop accepting, give running turns a
//! grace period, flush the store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::handler::Handler;
use crate::http::{self, AppState};
use crate::ingest::Ingest;
use crate::message::unix_ms;
use crate::store::{Store, StoreError};
use crate::turns::{Driver, Recovery, Runner};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store in {dir}: {source}")]
    Open { dir: String, source: StoreError },
    #[error("cannot recover from the store: {0}")]
    Recover(StoreError),
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// How often expired message ids are forgotten.
const DEDUP_SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Runs the daemon on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let dir = config.server.data_dir.display().to_string();
    let store =
        Store::open(&config.server.data_dir).map_err(|source| ServerError::Open { dir, source })?;
    let recovery = Recovery::load(&store).map_err(ServerError::Recover)?;
    info!(
        open_turns = recovery.open_turns.len(),
        pending_messages = recovery.inbox.len(),
        dead_turns = recovery.dead_turns,
        "recovered state from disk"
    );

    // `token`: stop accepting and starting; `abort`: the grace period is over.
    let token = CancellationToken::new();
    let abort = CancellationToken::new();
    let turns = TaskTracker::new();
    let handler = Handler::from_config(&config.handler);
    let runner = Runner::new(
        &config,
        store.clone(),
        handler,
        token.clone(),
        abort.clone(),
    );
    let runner = Arc::new(runner);
    let (driver, handle) = Driver::new(
        &config,
        store.clone(),
        runner,
        recovery,
        turns.clone(),
        token.clone(),
    );
    let driver = tokio::spawn(driver.run());
    let sweeper = tokio::spawn(sweep_dedup(
        store.clone(),
        config.ingest.dedup_days,
        token.clone(),
    ));

    let state = Arc::new(AppState {
        ingest: Ingest::new(store.clone(), handle.clone()),
        store: store.clone(),
        driver: handle,
        max_body_bytes: config.ingest.max_body_bytes,
        default_company_id: config.ingest.default_company_id.clone(),
    });
    {
        let token = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
    }
    info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving");
    let served = axum::serve(listener, http::router(state))
        .with_graceful_shutdown(token.clone().cancelled_owned())
        .await;
    // Whatever ended serving, everything below must stop too.
    token.cancel();
    info!("shutting down: no new turns start; waiting for running turns");

    let _ = driver.await;
    let _ = sweeper.await;
    turns.close();
    let grace = Duration::from_millis(config.turns.shutdown_grace_ms);
    if tokio::time::timeout(grace, turns.wait()).await.is_err() {
        warn!(
            still_running = turns.len(),
            "grace period over; unfinished turns re-run on the next start"
        );
        abort.cancel();
        turns.wait().await;
    }
    if let Err(e) = store.close().await {
        error!(error = %e, "final flush failed");
    }
    info!("stopped");
    served.map_err(ServerError::Serve)
}

/// Forgets message ids older than `dedup_days`, once an hour.
async fn sweep_dedup(store: Store, dedup_days: u64, token: CancellationToken) {
    let keep = Duration::from_secs(dedup_days * 24 * 3600);
    loop {
        let cutoff = unix_ms().saturating_sub(keep.as_millis() as u64);
        match store.expire_seen(cutoff) {
            Ok(0) => {}
            Ok(n) => info!(
                forgotten = n,
                "expired message ids removed from the dedup index"
            ),
            Err(e) => warn!(error = %e, "dedup sweep failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(DEDUP_SWEEP_EVERY) => {}
            _ = token.cancelled() => return,
        }
    }
}
