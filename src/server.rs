//! Wiring, in one place and in order: open the store, rebuild batches and
//! turns from it, serve; on shutdown stop accepting, give running turns a
//! grace period, flush the store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::handler::Handler;
use crate::http::{self, AppState};
use crate::ingest::Ingest;
use crate::outbox::Outbox;
use crate::store::{Store, StoreError};
use crate::turns::{Driver, Recovery, Runner, Stopping};

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
    run_with_clock(config, listener, shutdown, Clock::system()).await
}

/// `run` with an injected wall clock (tests move it hours ahead).
pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    clock: Clock,
) -> Result<(), ServerError> {
    let dir = config.server.data_dir.display().to_string();
    let store = Store::open(&config.server.data_dir).map_err(|source| ServerError::Open { dir, source })?;
    let recovery = Recovery::load(&store).map_err(ServerError::Recover)?;
    info!(
        open_turns = recovery.open_turns.len(),
        pending_messages = recovery.inbox.len(),
        dead_turns = recovery.dead_turns,
        "recovered state from disk"
    );

    // `shutdown`: stop accepting and starting; `abort`: the grace period is over.
    let stopping = Stopping::default();
    let token = stopping.shutdown.clone();
    let turns = TaskTracker::new();
    let gateway = Arc::new(Gateway::from_config(&config));
    let outbox_wake = Arc::new(Notify::new());
    let handler = Handler::from_config(&config);
    let runner = Runner::new(
        &config,
        store.clone(),
        handler,
        gateway.clone(),
        outbox_wake.clone(),
        clock.clone(),
        stopping.clone(),
    );
    let runner = Arc::new(runner);
    let outbox = Outbox::new(&config, store.clone(), gateway, outbox_wake);
    let outbox = tokio::spawn(outbox.run(token.clone()));
    let (driver, handle) =
        Driver::new(&config, store.clone(), runner, recovery, turns.clone(), token.clone());
    let driver = tokio::spawn(driver.run());
    let sweepers = [
        tokio::spawn(sweep_dedup(store.clone(), clock.clone(), config.ingest.dedup_days, token.clone())),
        tokio::spawn(sweep_contexts(
            store.clone(),
            clock.clone(),
            config.context.sweep_interval_ms,
            token.clone(),
        )),
    ];

    let state = Arc::new(AppState {
        ingest: Ingest::new(store.clone(), handle.clone()),
        store: store.clone(),
        driver: handle,
        clock,
        meta: config.meta.clone(),
        waha: config.waha.clone(),
        max_body_bytes: config.ingest.max_body_bytes,
        context_max_bytes: config.context.max_bytes,
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
    for sweeper in sweepers {
        let _ = sweeper.await;
    }
    turns.close();
    let grace = Duration::from_millis(config.turns.shutdown_grace_ms);
    if tokio::time::timeout(grace, turns.wait()).await.is_err() {
        warn!(still_running = turns.len(), "grace period over; unfinished turns re-run on the next start");
        stopping.abort.cancel();
        turns.wait().await;
    }
    // Replies committed but not sent stay in the outbox for the next start.
    let _ = outbox.await;
    if let Err(e) = store.close().await {
        error!(error = %e, "final flush failed");
    }
    info!("stopped");
    served.map_err(ServerError::Serve)
}

/// Forgets message ids older than `dedup_days`, once an hour.
async fn sweep_dedup(store: Store, clock: Clock, dedup_days: u64, token: CancellationToken) {
    let keep_ms = dedup_days * 24 * 3600 * 1000;
    every(DEDUP_SWEEP_EVERY, token, || match store.expire_seen(clock.now_ms().saturating_sub(keep_ms)) {
        Ok(0) => {}
        Ok(n) => info!(forgotten = n, "expired message ids removed from the dedup index"),
        Err(e) => warn!(error = %e, "dedup sweep failed"),
    })
    .await
}

/// Removes expired contexts from disk (reads already ignore them).
async fn sweep_contexts(store: Store, clock: Clock, interval_ms: u64, token: CancellationToken) {
    every(Duration::from_millis(interval_ms), token, || match store.expire_contexts(clock.now_ms()) {
        Ok(0) => {}
        Ok(n) => info!(removed = n, "expired contexts removed"),
        Err(e) => warn!(error = %e, "context sweep failed"),
    })
    .await
}

/// Runs `job` now and then every `period` until `token` is cancelled.
async fn every(period: Duration, token: CancellationToken, mut job: impl FnMut()) {
    loop {
        job();
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = token.cancelled() => return,
        }
    }
}
