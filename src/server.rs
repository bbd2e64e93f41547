//! Wiring, in one place and in order.
//!
//! Start: open the store, serve at once on both listeners (`/healthz`
//! answers; webhooks and `/readyz` answer 503), rebuild batches and turns
//! from disk, then turn ready and tell systemd `READY=1`.
//!
//! A fatal fault (the store failed, the driver or the outbox task ended)
//! stops acknowledging at once (the store refuses messages, `/readyz` says
//! why), then takes the stop path below and exits non-zero: systemd restarts
//! the daemon, which recovers from disk as on every start.
//!
//! Stop (first signal): webhooks answer 503 and `STOPPING=1` goes to systemd;
//! no new turn starts; running turns get `turns.shutdown_grace_ms`, then their
//! handler calls are abandoned (they stay open on disk and re-run on the next
//! start); the listeners close; the outbox finishes its sends in flight; the
//! store is flushed and closed.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::handler::Handler;
use crate::http::serve::Listeners;
use crate::http::{self, AppState};
use crate::ingest::Ingest;
use crate::message::{set_log_text, set_mask_phones};
use crate::ops;
use crate::outbox::Outbox;
use crate::store::{Announce, Store, StoreError};
use crate::sweep;
use crate::turns::{self, Driver, Runner, Shared};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Bind(#[from] http::serve::BindError),
    #[error("cannot open the store in {dir}: {source}")]
    Open { dir: String, source: StoreError },
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
    /// The store failed or a task the daemon cannot run without ended: it
    /// stopped taking messages and exits non-zero, for systemd to restart it
    /// (recovery from disk is the one well-trodden way back).
    #[error("stopped after a fatal fault: {0}")]
    Fatal(String),
}

/// What `run` is handed besides its config: `Deps::default()` is the
/// daemon as it ships (the system clock, the store of `server.data_dir`, no
/// faults); tests replace a part.
#[derive(Default)]
pub struct Deps {
    pub clock: Clock,
    /// A store the caller opened (tests reach its fault hooks); `None`: open
    /// `server.data_dir`, waiting in place while it cannot be opened.
    pub store: Option<Store>,
    pub faults: TestFaults,
}

/// Faults for tests of the real binary, which `main` reads from
/// `TURNSTILE_TEST_FAULTS` (`config::env::TEST_FAULTS_ENV`): never a
/// configuration key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TestFaults {
    /// `kill-driver-after-ms=N`: the driver dies N ms after start, so a test
    /// can watch the daemon notice a dead task.
    pub kill_driver_after: Option<Duration>,
    /// `store-open-fails=N`: the first N opens of the store fail as an I/O
    /// error would, so a test can watch the daemon wait in place.
    pub store_open_fails: u32,
}

impl TestFaults {
    /// Reads `key=value` items separated by commas; unknown ones are ignored.
    pub fn parse(spec: &str) -> TestFaults {
        let mut faults = TestFaults::default();
        for item in spec.split(',') {
            match item.trim().split_once('=') {
                Some(("kill-driver-after-ms", ms)) => {
                    faults.kill_driver_after = ms.parse().ok().map(Duration::from_millis)
                }
                Some(("store-open-fails", n)) => faults.store_open_fails = n.parse().unwrap_or(0),
                _ => {}
            }
        }
        faults
    }
}

/// Runs the daemon on `listeners` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    deps: Deps,
) -> Result<(), ServerError> {
    let Deps { clock, store, faults } = deps;
    if let Some(store) = store {
        return run_on(config, listeners, shutdown, clock, store).await;
    }
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    let (store, listeners) = match open_patiently(&config, listeners, &stop, faults.store_open_fails).await? {
        Some(opened) => opened,
        None => return Ok(()), // stopped while waiting for the store
    };
    let shutdown = stop.cancelled_owned();
    if let Some(after) = faults.kill_driver_after {
        warn!(after_ms = after.as_millis() as u64, "test fault hook: the driver will be killed");
        let faults = store.faults();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            faults.kill_driver();
        });
    }
    run_on(config, listeners, shutdown, clock, store).await
}

/// The limits both listeners serve with, from `[server]`.
fn connection_limits(config: &Config) -> http::serve::Limits {
    http::serve::Limits {
        header_timeout: Duration::from_millis(config.server.header_timeout_ms),
        max_connections: config.server.max_connections,
    }
}

/// Opens the store. While it cannot be opened for a reason that can pass (a
/// full disk, an I/O error) the daemon waits in place — `/healthz` 200,
/// everything else 503 with the reason — and retries with a backoff, rather
/// than exiting into a restart loop that would spend systemd's start limit.
/// A store held by another process or damaged is an error exit at once.
async fn open_patiently(
    config: &Config,
    listeners: Listeners,
    stop: &CancellationToken,
    failing: u32,
) -> Result<Option<(Store, Listeners)>, ServerError> {
    let dir = config.server.data_dir.clone();
    let options = config.store.options();
    // Test hook: the first `failing` opens fail as an I/O error would.
    let opens = std::sync::atomic::AtomicU32::new(0);
    let open = || {
        let dir = dir.clone();
        let injected = opens.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < failing;
        async move {
            if injected {
                let e = std::io::Error::other("injected by a test hook");
                return Err(StoreError::Io { path: dir.display().to_string(), source: e });
            }
            tokio::task::spawn_blocking(move || Store::open_with(&dir, options))
                .await
                .unwrap_or_else(|e| Err(StoreError::Failed(e.to_string().into())))
        }
    };
    let fatal = |source| ServerError::Open { dir: dir.display().to_string(), source };
    let first = match open().await {
        Ok(store) => return Ok(Some((store, listeners))),
        Err(e @ (StoreError::Held { .. } | StoreError::Corrupt { .. })) => return Err(fatal(e)),
        Err(e) => e,
    };
    let reason = Arc::new(Mutex::new(first.to_string()));
    let limits = connection_limits(config);
    let waiting = crate::http::unavailable(listeners, reason.clone(), limits).map_err(ServerError::Serve)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let wait = crate::clock::backoff(Duration::from_secs(1), Duration::from_secs(10), attempt);
        // Still starting, as systemd sees it: keep its start timeout and
        // watchdog from ending a daemon that is waiting on purpose.
        ops::notify(&format!("EXTEND_TIMEOUT_USEC={}", (wait + Duration::from_secs(30)).as_micros()));
        ops::notify("WATCHDOG=1");
        ops::notify("STATUS=waiting for the store to open");
        warn!(error = %reason.lock().unwrap_or_else(|p| p.into_inner()), retry_in_ms = wait.as_millis() as u64, "the store cannot be opened; waiting (health 200, everything else 503)");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => {
                waiting.stop().await;
                return Ok(None);
            }
        }
        match open().await {
            Ok(store) => {
                info!(attempts = attempt + 1, "the store opened");
                return Ok(Some((store, waiting.stop().await)));
            }
            Err(e @ (StoreError::Held { .. } | StoreError::Corrupt { .. })) => {
                waiting.stop().await;
                return Err(fatal(e));
            }
            Err(e) => *reason.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string(),
        }
    }
}

/// `run` on an open store.
async fn run_on(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    clock: Clock,
    store: Store,
) -> Result<(), ServerError> {
    let mut running = start(config, listeners, shutdown, clock, store).await;
    let ended = running.until_stop().await;
    running.stop(ended).await
}

/// A started daemon: every task and handle the stop ends, in its order.
struct Running {
    stop_timeout_ms: u64,
    shutdown_grace_ms: u64,
    store: Store,
    stopping: turns::Stopping,
    /// The stop request only; the stop itself (`stopping.shutdown`) follows
    /// once the store refuses messages, so none is written and then refused.
    requested: CancellationToken,
    fatal: Arc<Mutex<Option<String>>>,
    driver: tokio::sync::oneshot::Receiver<()>,
    outbox: tokio::task::JoinHandle<()>,
    background: Vec<tokio::task::JoinHandle<()>>,
    turns: TaskTracker,
    server: tokio::task::JoinSet<()>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    http_stop: http::serve::Stop,
}

/// Why the daemon stops: asked to (`failure` is `None`), or a fatal fault,
/// and which of the tasks that end only at a stop has ended already.
struct Ended {
    failure: Option<String>,
    driver_done: bool,
    outbox_done: bool,
}

/// Opens for business on an open store: serves at once on both listeners
/// (webhooks refused until recovery is done), recovers what the store held
/// into the driver, starts the outbox and the sweeps, and says ready.
async fn start(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    clock: Clock,
    store: Store,
) -> Running {
    set_mask_phones(config.log.mask_phones);
    set_log_text(config.log.message_text);
    let shared = Shared { clock, ..Shared::default() };
    let stopping = shared.stopping.clone();
    let requested = CancellationToken::new();
    {
        let requested = requested.clone();
        tokio::spawn(async move {
            shutdown.await;
            requested.cancel();
        });
    }

    // Serve before recovery, refusing webhooks until it is done.
    let ready = Arc::new(AtomicBool::new(false));
    let fatal = Arc::new(Mutex::new(None));
    let (handle, driver_rx) = turns::channel();
    let gateway = Arc::new(Gateway::from_config(&config));
    let handover = Arc::new(crate::takeover::Handover::new(
        store.clone(),
        handle.clone(),
        gateway.sent(),
        config.takeover.clone(),
        shared.metrics.clone(),
        Duration::from_millis(config.gateway.timeout_ms),
    ));
    let deliveries = crate::delivery::Deliveries::new(&config, store.clone(), shared.metrics.clone());
    load_inbound(&store).await;
    let state =
        app_state(&config, &store, &shared, deliveries.clone(), handover, handle.clone(), &ready, &fatal);
    warn_unauthenticated(&config);
    let http_stop = http::serve::Stop::default();
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(listen = %addr(&listeners.public), admin_listen = %addr(&listeners.admin), "serving");
    info!(cutting = %config.batching.effective(config.turns.on_new_message), "how batches are cut");
    if config.batching.kept_fixed {
        warn!("batching.debounce_ms is set and batching.policy is not: keeping the fixed window (and turns.on_new_message = \"queue\" unless set), as before the adaptive default; set batching.policy to choose");
    }
    let limits = connection_limits(&config);
    let mut server = tokio::task::JoinSet::new();
    for (listener, router, counts) in [
        (listeners.public, http::public_router(state.clone()), state.connections[0].clone()),
        (listeners.admin, http::admin_router(state.clone()), state.connections[1].clone()),
    ] {
        server.spawn(http::serve::serve(listener, router, limits, counts, http_stop.clone()));
    }
    // The routers hold the state (and the store) from here; the store closes
    // only once they are gone.
    drop(state);

    let recovery = store.take_recovered().unwrap_or_default();
    info!(
        open_turns = recovery.open_turns.len(),
        pending_messages = recovery.pending.len(),
        dead_turns = recovery.dead_turns,
        "recovered state from disk"
    );

    let turns = TaskTracker::new();
    let handler = Handler::from_config(&config);
    let runner = Arc::new(Runner::new(&config, store.clone(), handler, gateway.clone(), &shared));
    let driver = Driver::new(&config, store.clone(), runner, recovery, driver_rx, turns.clone(), &shared);
    let driver = spawn_driver(driver);
    let outbox = Outbox::new(&config, store.clone(), gateway, deliveries, shared.metrics.clone());
    let outbox = tokio::spawn(outbox.run(stopping.shutdown.clone()));
    let background = spawn_sweeps(&config, &store, &shared);
    let watchdog =
        ops::watchdog_interval().map(|every| tokio::spawn(ops::watchdog(every, http_stop.kill.clone())));

    // The writer announces every stored message to the driver, from now on.
    store.set_sink(Some(Arc::new(move |stored: Vec<Announce>| handle.ingested(stored))));
    ready.store(true, Ordering::Release);
    ops::notify("READY=1");
    info!("ready");
    Running {
        stop_timeout_ms: config.server.stop_timeout_ms,
        shutdown_grace_ms: config.turns.shutdown_grace_ms,
        store,
        stopping,
        requested,
        fatal,
        driver,
        outbox,
        background,
        turns,
        server,
        watchdog,
        http_stop,
    }
}

impl Running {
    /// Runs until asked to stop, or a fatal fault.
    async fn until_stop(&mut self) -> Ended {
        // The driver and the outbox end only after `stopping.shutdown`: an end before it is a fault.
        let (mut driver_done, mut outbox_done) = (false, false);
        let failure = tokio::select! {
            biased;
            _ = self.requested.cancelled() => None,
            reason = self.store.failed() => Some(format!("the store failed: {reason}")),
            _ = &mut self.driver => {
                driver_done = true;
                Some("the driver task ended unexpectedly".to_owned())
            }
            _ = &mut self.outbox => {
                outbox_done = true;
                Some("the outbox task ended unexpectedly".to_owned())
            }
        };
        Ended { failure, driver_done, outbox_done }
    }

    /// Stops in order within one deadline (`server.stop_timeout_ms`),
    /// whatever clients or the handler do: the store refuses messages, the
    /// driver and the sweeps stop, running turns get their grace, the outbox
    /// its last sends, then the listeners close and the store syncs last.
    async fn stop(self, ended: Ended) -> Result<(), ServerError> {
        let Running {
            stop_timeout_ms,
            shutdown_grace_ms,
            store,
            stopping,
            requested: _,
            fatal,
            driver,
            mut outbox,
            background,
            turns,
            mut server,
            watchdog,
            http_stop,
        } = self;
        let Ended { failure, driver_done, outbox_done } = ended;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(stop_timeout_ms);
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        // From here nothing more is acknowledged (the writer refuses messages
        // before writing them): what would not become a turn now is not taken.
        store.set_sink(None);
        // A group the writer took up before that announces to the driver still:
        // one round trip through the writer waits it out, before the driver stops.
        let _ = tokio::time::timeout(Duration::from_secs(1), store.sync()).await;
        if let Some(reason) = &failure {
            *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
            error!(reason, "fatal fault: refusing webhooks and exiting for a restart");
        }
        stopping.shutdown.cancel();
        ops::notify("STOPPING=1");
        info!(
            stop_timeout_ms,
            "shutting down: webhooks get 503, no new turns start; waiting for running turns"
        );

        if !driver_done {
            let _ = tokio::time::timeout(left(), driver).await;
        }
        for task in background {
            let _ = tokio::time::timeout(left(), task).await;
        }
        // Running turns get their grace, within the deadline and its reserve.
        turns.close();
        let reserve = Duration::from_millis(crate::config::STOP_RESERVE_MS);
        let grace = Duration::from_millis(shutdown_grace_ms).min(left().saturating_sub(reserve));
        if tokio::time::timeout(grace, turns.wait()).await.is_err() {
            warn!(
                still_running = turns.len(),
                "grace period over; unfinished turns re-run on the next start"
            );
            stopping.abort.cancel();
            let _ = tokio::time::timeout(left(), turns.wait()).await;
        }
        // Replies committed but not sent stay in the outbox for the next start.
        if !outbox_done
            && tokio::time::timeout(left().saturating_sub(reserve / 2), &mut outbox).await.is_err()
        {
            warn!("sends still in flight at the stop deadline; their pieces are sent after the next start");
            outbox.abort();
        }
        // The listeners close only now: until here gateways got 503, not refusals.
        http_stop.close.cancel();
        // Clients that do not finish (a half-sent request) are dropped after this.
        let closing = async { while server.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(left().saturating_sub(reserve / 4).min(Duration::from_secs(1)), closing)
            .await;
        http_stop.kill.cancel();
        while server.join_next().await.is_some() {}
        if let Some(w) = watchdog {
            let _ = w.await;
        }
        match tokio::time::timeout(left().max(Duration::from_millis(200)), store.close()).await {
            Ok(Err(e)) => error!(error = %e, "final sync failed"),
            Err(_) => error!("the store's last sync did not end before the stop deadline"),
            Ok(Ok(())) => {}
        }
        info!("stopped");
        match failure {
            Some(reason) => Err(ServerError::Fatal(reason)),
            None => Ok(()),
        }
    }
}

/// When each client last wrote (the 24-hour window), from disk.
async fn load_inbound(store: &Store) {
    let store = store.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || store.load_inbound()).await.expect("a blocking task")
    {
        warn!(error = %e, "could not read when the clients last wrote; replies to them wait for their next message");
    }
}

/// What the routers share: the store, the driver's handle, the settings
/// the handlers read, and the flags `start` and `stop` set.
#[allow(clippy::too_many_arguments)]
fn app_state(
    config: &Config,
    store: &Store,
    shared: &Shared,
    deliveries: Arc<crate::delivery::Deliveries>,
    handover: Arc<crate::takeover::Handover>,
    driver: turns::DriverHandle,
    ready: &Arc<AtomicBool>,
    fatal: &Arc<Mutex<Option<String>>>,
) -> Arc<AppState> {
    Arc::new(AppState {
        deliveries,
        handover,
        ingest: Ingest::new(store.clone()),
        store: store.clone(),
        driver,
        clock: shared.clock.clone(),
        ready: ready.clone(),
        body_timeout: Duration::from_millis(config.server.body_timeout_ms),
        connections: [Arc::default(), Arc::default()],
        fatal: fatal.clone(),
        draining: shared.stopping.shutdown.clone(),
        metrics: shared.metrics.clone(),
        feed: shared.feed.clone(),
        cutting: config.batching.effective(config.turns.on_new_message),
        quarantine_max: config.ingest.quarantine_max,
        quarantine_log: Default::default(),
        presence: crate::gateway::PresenceSubscriptions::from_config(config),
        admin_token: config.server.admin_token.clone(),
        webhook_token: config.ingest.webhook_token.clone(),
        generic_webhooks: config.ingest.generic_webhooks,
        meta: config.meta.clone(),
        waha: config.waha.clone(),
        evolution: config.evolution.clone(),
        max_body_bytes: config.ingest.max_body_bytes,
        context_max_bytes: config.context.max_bytes,
        default_company_id: config.ingest.default_company_id.clone(),
        caps: crate::ingest::caps::Caps { max_text_bytes: config.ingest.max_text_bytes },
        batch_max_wait_ms: config.batching.max_wait_ms,
    })
}

/// The tasks that run beside the driver until the stop: the console's rate
/// sampler, and the dedup, retention and context sweeps.
fn spawn_sweeps(config: &Config, store: &Store, shared: &Shared) -> Vec<tokio::task::JoinHandle<()>> {
    let stopping = &shared.stopping;
    let totals = {
        let (metrics, store) = (shared.metrics.clone(), store.clone());
        move || crate::feed::Totals { webhooks: metrics.webhooks_total(), syncs: store.syncs() }
    };
    vec![
        tokio::spawn(crate::feed::sampler(
            shared.feed.clone(),
            totals,
            shared.clock.clone(),
            stopping.shutdown.clone(),
        )),
        tokio::spawn(sweep::dedup(
            store.clone(),
            shared.clock.clone(),
            config.ingest.dedup_days,
            std::time::Duration::from_secs(config.store.archive_every_s),
            stopping.shutdown.clone(),
        )),
        tokio::spawn(sweep::retention(
            store.clone(),
            shared.clock.clone(),
            sweep::RetentionDays {
                dead: config.turns.dead_retention_days,
                failed: config.gateway.failed_retention_days,
                history: config.turns.history_days,
                quarantine: config.ingest.quarantine_days,
            },
            stopping.shutdown.clone(),
        )),
        tokio::spawn(sweep::contexts(
            store.clone(),
            shared.clock.clone(),
            config.context.sweep_interval_ms,
            stopping.shutdown.clone(),
        )),
    ]
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
/// The receiver resolves when the driver ends — or dies: a panic drops the
/// sender, which resolves it too.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_faults_read_each_item_and_ignore_what_they_do_not_know() {
        assert_eq!(TestFaults::parse(""), TestFaults::default());
        let both = TestFaults::parse("kill-driver-after-ms=1500, store-open-fails=2");
        assert_eq!(both.kill_driver_after, Some(Duration::from_millis(1500)));
        assert_eq!(both.store_open_fails, 2);
        assert_eq!(TestFaults::parse("store-open-fails=x,unknown=1,kill"), TestFaults::default());
    }
}
