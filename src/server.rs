//! Wiring, in one place and in order.
//!
//! Start: open the store, serve at once on both listeners (`/healthz`
//! answers; webhooks and `/readyz` answer 503), rebuild batches and turns
//! from disk, then turn ready and tell systemd `READY=1`.
//!
//! Stop (first signal): webhooks answer 503 and `STOPPING=1` goes to systemd;
//! no new turn starts; running turns get `turns.shutdown_grace_ms`, then their
//! handler calls are abandoned (they stay open on disk and re-run on the next
//! start); the listeners close; the outbox finishes its sends in flight; the
//! store is flushed and closed.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::config::{Config, ServerConfig};
use crate::gateway::Gateway;
use crate::handler::Handler;
use crate::http::{self, AppState};
use crate::ingest::Ingest;
use crate::message::set_mask_phones;
use crate::ops;
use crate::outbox::Outbox;
use crate::store::{Store, StoreError};
use crate::turns::{self, Driver, Recovery, Runner, Shared};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot open the store in {dir}: {source}")]
    Open { dir: String, source: StoreError },
    #[error("cannot recover from the store: {0}")]
    Recover(StoreError),
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// How often expired message ids are forgotten.
const DEDUP_SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// The daemon's two sockets: the public one (webhooks, health) and the admin
/// one (API, metrics, health). Bound before `run`, so tests can bind port 0
/// and read the addresses.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `server.listen` and `server.admin_listen`.
    pub async fn bind(server: &ServerConfig) -> Result<Listeners, ServerError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })
        };
        Ok(Listeners { public: bind(server.listen).await?, admin: bind(server.admin_listen).await? })
    }
}

/// Runs the daemon on `listeners` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with_clock(config, listeners, shutdown, Clock::system()).await
}

/// `run` with an injected wall clock (tests move it hours ahead).
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    clock: Clock,
) -> Result<(), ServerError> {
    set_mask_phones(config.log.mask_phones);
    let dir = config.server.data_dir.display().to_string();
    let store = Store::open(&config.server.data_dir).map_err(|source| ServerError::Open { dir, source })?;
    let shared = Shared { clock, ..Shared::default() };
    let stopping = shared.stopping.clone();
    {
        let shutdown_token = stopping.shutdown.clone();
        tokio::spawn(async move {
            shutdown.await;
            shutdown_token.cancel();
        });
    }

    // Serve before recovery, refusing webhooks until it is done.
    let ready = Arc::new(AtomicBool::new(false));
    let (handle, driver_inbox) = turns::channel();
    let state = Arc::new(AppState {
        ingest: Ingest::new(store.clone(), handle.clone()),
        store: store.clone(),
        driver: handle,
        clock: shared.clock.clone(),
        ready: ready.clone(),
        draining: stopping.shutdown.clone(),
        metrics: shared.metrics.clone(),
        admin_token: config.server.admin_token.clone(),
        webhook_token: config.ingest.webhook_token.clone(),
        generic_webhooks: config.ingest.generic_webhooks,
        meta: config.meta.clone(),
        waha: config.waha.clone(),
        max_body_bytes: config.ingest.max_body_bytes,
        context_max_bytes: config.context.max_bytes,
        default_company_id: config.ingest.default_company_id.clone(),
    });
    warn_unauthenticated(&config);
    let http_stop = CancellationToken::new();
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(listen = %addr(&listeners.public), admin_listen = %addr(&listeners.admin), "serving");
    let mut server = {
        let public = axum::serve(listeners.public, http::public_router(state.clone()))
            .with_graceful_shutdown(http_stop.clone().cancelled_owned());
        let admin = axum::serve(listeners.admin, http::admin_router(state))
            .with_graceful_shutdown(http_stop.clone().cancelled_owned());
        // Either failing stops both: the daemon then shuts down.
        tokio::spawn(async move { tokio::try_join!(public.into_future(), admin.into_future()).map(|_| ()) })
    };

    let recovery = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || Recovery::load(&store)).await.expect("recovery task")
    };
    let recovery = match recovery {
        Ok(r) => r,
        Err(e) => {
            http_stop.cancel();
            let _ = server.await;
            return Err(ServerError::Recover(e));
        }
    };
    info!(
        open_turns = recovery.open_turns.len(),
        pending_messages = recovery.inbox.len(),
        dead_turns = recovery.dead_turns,
        "recovered state from disk"
    );

    let turns = TaskTracker::new();
    let gateway = Arc::new(Gateway::from_config(&config));
    let outbox_wake = Arc::new(Notify::new());
    let handler = Handler::from_config(&config);
    let runner =
        Arc::new(Runner::new(&config, store.clone(), handler, gateway.clone(), outbox_wake.clone(), &shared));
    let driver = Driver::new(&config, store.clone(), runner, recovery, driver_inbox, turns.clone(), &shared);
    let driver = spawn_driver(driver);
    let outbox = Outbox::new(&config, store.clone(), gateway, outbox_wake, shared.metrics.clone());
    let outbox = tokio::spawn(outbox.run(stopping.shutdown.clone()));
    let background = [
        tokio::spawn(sweep_dedup(
            store.clone(),
            shared.clock.clone(),
            config.ingest.dedup_days,
            stopping.shutdown.clone(),
        )),
        tokio::spawn(sweep_contexts(
            store.clone(),
            shared.clock.clone(),
            config.context.sweep_interval_ms,
            stopping.shutdown.clone(),
        )),
    ];
    let watchdog =
        ops::watchdog_interval().map(|every| tokio::spawn(ops::watchdog(every, http_stop.clone())));

    ready.store(true, Ordering::Release);
    ops::notify("READY=1");
    info!("ready");

    // Run until asked to stop, or until a listener fails.
    let served_early = tokio::select! {
        _ = stopping.shutdown.cancelled() => None,
        served = &mut server => Some(served),
    };
    stopping.shutdown.cancel();
    ops::notify("STOPPING=1");
    info!("shutting down: webhooks get 503, no new turns start; waiting for running turns");

    let _ = driver.await;
    for task in background {
        let _ = task.await;
    }
    turns.close();
    let grace = Duration::from_millis(config.turns.shutdown_grace_ms);
    if tokio::time::timeout(grace, turns.wait()).await.is_err() {
        warn!(still_running = turns.len(), "grace period over; unfinished turns re-run on the next start");
        stopping.abort.cancel();
        turns.wait().await;
    }
    http_stop.cancel();
    let served = match served_early {
        Some(served) => served,
        None => server.await,
    };
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    // Replies committed but not sent stay in the outbox for the next start.
    let _ = outbox.await;
    if let Err(e) = store.close().await {
        error!(error = %e, "final flush failed");
    }
    info!("stopped");
    match served {
        Ok(result) => result.map_err(ServerError::Serve),
        Err(e) => Err(ServerError::Serve(std::io::Error::other(e))),
    }
}

/// Names, at every start, each webhook served without a secret: a warning
/// when something leaves the machine (allowed by `allow_unauthenticated`),
/// a note on the trial defaults.
fn warn_unauthenticated(config: &Config) {
    for w in config.unauthenticated_webhooks() {
        match config.leaves_the_machine() {
            Some(reason) => warn!(
                webhook = w.path,
                "{} takes unauthenticated requests although {reason}: anyone who can reach it \
                 can make turnstile send; set {}",
                w.path,
                w.key
            ),
            None => info!(
                webhook = w.path,
                "{} takes unauthenticated requests (trial: nothing leaves the machine); set {} \
                 before configuring a gateway or handler",
                w.path,
                w.key
            ),
        }
    }
}

/// Runs the driver. On a multi-threaded runtime (the daemon) it gets a thread
/// and a runtime of its own, so its timers never wait behind turn tasks or
/// HTTP handlers for a worker; turns still run on the main runtime. On a
/// current-thread runtime (tests on tokio's paused clock) it stays there.
fn spawn_driver(driver: Driver) -> tokio::sync::oneshot::Receiver<()> {
    let (done, finished) = tokio::sync::oneshot::channel();
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        std::thread::Builder::new()
            .name("turnstile-driver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the driver's runtime");
                runtime.block_on(driver.run());
                let _ = done.send(());
            })
            .expect("the driver's thread");
    } else {
        tokio::spawn(async move {
            driver.run().await;
            let _ = done.send(());
        });
    }
    finished
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
