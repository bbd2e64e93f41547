//! Shared test helpers: a real daemon on a temp data dir behind its two real
//! listeners, a recording HTTP handler standing in for the AI service, and
//! small HTTP utilities. Everything talks over 127.0.0.1.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use turnstile::clock::Clock;
use turnstile::config::HandlerKind;
use turnstile::{Config, Listeners};

pub const BURST: [&str; 5] = ["Привет", "можно", "записаться", "на стрижку", "завтра?"];

/// `ingest.webhook_token` wherever something leaves the machine (a real
/// handler or gateway): the daemon refuses to start without one.
pub const WEBHOOK_TOKEN: &str = "test-webhook-token-0001";
/// `meta.app_secret` and `waha.hmac_key` for tests that configure those webhooks.
pub const META_SECRET: &str = "meta-app-secret-0001";
pub const WAHA_KEY: &str = "waha-hmac-key-0001";

/// Defaults, on `dir`, on ports the OS picks.
pub fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.data_dir = dir.to_owned();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.log.filter = "warn".into();
    // Paused-clock tests jump minutes ahead: idle keep-alive connections
    // would be closed under the client's feet. The limits have their own test.
    c.server.header_timeout_ms = 24 * 3_600_000;
    c.server.body_timeout_ms = 24 * 3_600_000;
    // The tests of the pipeline's mechanics time their batches by the fixed
    // window (`batching.debounce_ms`) and queue late messages; the adaptive
    // policy and the restart policy have their own (`cutting.rs`).
    c.batching.policy = turnstile::config::CutPolicy::Fixed;
    c.turns.on_new_message = turnstile::config::OnNewMessage::Queue;
    c
}

/// The same, with the recording handler answering turns (and so the
/// webhook token a real handler requires).
pub fn config_with(dir: &Path, handler: &TestHandler) -> Config {
    let mut c = config(dir);
    c.handler.kind = HandlerKind::Http;
    c.handler.url = handler.url.clone();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c
}

/// The http gateway sending replies to `hook`'s `/send`, and the webhook
/// token a gateway that leaves the machine requires.
pub fn http_gateway(c: &mut Config, hook: &FakeServer) {
    c.gateway.kind = turnstile::config::GatewayKind::Http;
    c.gateway.url = format!("{}/send", hook.base);
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
}

/// An in-process daemon. `get`, `post`, `put`, `delete` and `url` send
/// `/api/...` and `/metrics` to the admin listener and everything else to
/// the public one, as a deployment's clients would, and the generic
/// webhooks get the configured `ingest.webhook_token`, as a gateway would
/// send it; a test that means one listener in particular, or a request
/// without the token, builds its URL from `base` or `admin`.
pub struct Daemon {
    /// The public listener: webhooks and health.
    pub base: String,
    /// The admin listener: API, metrics and health.
    pub admin: String,
    pub client: reqwest::Client,
    webhook_token: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), turnstile::server::ServerError>>,
}

impl Daemon {
    pub async fn start(config: Config) -> Daemon {
        Daemon::start_with_clock(config, Clock::system()).await
    }

    /// With a wall clock the test can move ahead (context expiry).
    pub async fn start_with_clock(config: Config, clock: Clock) -> Daemon {
        Daemon::start_inner(config, clock, None).await
    }

    /// On a store the test opened, so it holds the store's fault hooks.
    pub async fn start_with_faults(config: Config) -> (Daemon, Arc<turnstile::store::Faults>) {
        let dir = config.server.data_dir.clone();
        let store =
            tokio::task::spawn_blocking(move || turnstile::store::Store::open(&dir).unwrap()).await.unwrap();
        let faults = store.faults();
        (Daemon::start_inner(config, Clock::system(), Some(store)).await, faults)
    }

    async fn start_inner(config: Config, clock: Clock, store: Option<turnstile::store::Store>) -> Daemon {
        // What the binary would refuse, a test does not run either.
        config.validate().expect("a valid test config");
        let webhook_token = config.ingest.webhook_token.clone();
        let listeners = Listeners::bind(&config.server).await.unwrap();
        let base = format!("http://{}", listeners.public.local_addr().unwrap());
        let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        let deps = turnstile::Deps { clock, store, ..Default::default() };
        let task = tokio::spawn(turnstile::run(config, listeners, stopped, deps));
        let client = reqwest::Client::new();
        let d = Daemon { base, admin, client, webhook_token, stop: Some(stop), task };
        // Serving starts before recovery; webhooks are taken once /readyz says so.
        let start = Instant::now();
        while d.get("/readyz").await.0 != 200 {
            assert!(start.elapsed() < Duration::from_secs(60), "daemon never became ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        d
    }

    /// Graceful stop; returns once the daemon has flushed and exited.
    pub async fn stop(mut self) {
        self.begin_stop();
        self.stopped().await;
    }

    /// Sends the stop signal without waiting (the daemon drains meanwhile).
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until the daemon has exited.
    pub async fn stopped(self) {
        self.task.await.unwrap().unwrap();
    }

    /// Waits until the daemon has exited by itself; what `run` returned.
    pub async fn exited(self) -> Result<(), turnstile::server::ServerError> {
        self.task.await.unwrap()
    }

    /// POSTs a message to the debounced webhook.
    pub async fn send(&self, id: &str, from: &str, text: &str) -> (u16, Value) {
        let body = json!({"id": id, "from": from, "message": text, "timestamp": 1763800000});
        self.post("/webhook/whatsapp/batched", &body).await
    }

    /// `path` on the listener that serves it: admin for `/api/...` and
    /// `/metrics`, public for the rest.
    pub fn url(&self, path: &str) -> String {
        let admin = path.starts_with("/api/") || path == "/metrics";
        format!("{}{path}", if admin { &self.admin } else { &self.base })
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut request = self.client.post(self.url(path)).json(body);
        if path.starts_with("/webhook/whatsapp") && !self.webhook_token.is_empty() {
            request = request.bearer_auth(&self.webhook_token);
        }
        status_json(request).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        status_json(self.client.put(self.url(path)).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        status_json(self.client.delete(self.url(path))).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        status_json(self.client.get(self.url(path))).await
    }
}

/// Status and JSON body (null when there is none).
pub async fn status_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// One call the recording handler received.
#[derive(Debug, Clone)]
pub struct Call {
    pub turn_id: String,
    pub idempotency_key: String,
    pub phone: String,
    pub ids: Vec<String>,
    pub text: String,
    /// The counter the previous turns of this phone left in the context.
    pub seen_count: u64,
    /// The cache the turn was given (null when none or invalidated).
    pub seen_cache: Value,
    pub started: Instant,
    pub ended: Option<Instant>,
    /// Answered 200 with a reply (not failed, not left hanging by chaos).
    pub answered: bool,
    /// Both sides of a takeover, when the request carried them.
    pub transcript: Value,
}

/// Chaos for the recording handler: shares of calls that fail or hang.
#[derive(Clone, Copy, Debug)]
pub struct Chaos {
    pub seed: u64,
    pub fail: f64,
    pub hang: f64,
    pub hang_for: Duration,
}

#[derive(Default)]
struct Recorded {
    calls: Vec<Call>,
    in_flight: HashMap<String, usize>,
    max_in_flight_per_phone: usize,
    global_in_flight: usize,
    max_global_in_flight: usize,
}

#[derive(Clone)]
struct Shared {
    recorded: Arc<Mutex<Recorded>>,
    delay: Arc<Mutex<Duration>>,
    delay_for: Arc<Mutex<HashMap<String, Duration>>>,
    fail_with: Arc<Mutex<Option<u16>>>,
    chaos: Arc<Mutex<Option<Chaos>>>,
}

/// A stand-in for the AI service: records every call, sleeps `delay`,
/// keeps a per-phone counter in the context, and can be told to fail.
pub struct TestHandler {
    pub url: String,
    shared: Shared,
}

impl TestHandler {
    pub async fn start(delay: Duration) -> TestHandler {
        let shared = Shared {
            recorded: Arc::default(),
            delay: Arc::new(Mutex::new(delay)),
            delay_for: Arc::default(),
            fail_with: Arc::default(),
            chaos: Arc::default(),
        };
        let app = Router::new().route("/turn", axum::routing::post(answer)).with_state(shared.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/turn", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestHandler { url, shared }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.recorded.lock().unwrap().calls.clone()
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }

    /// A delay for one phone's calls only.
    pub fn set_delay_for(&self, phone: &str, delay: Duration) {
        self.shared.delay_for.lock().unwrap().insert(phone.to_owned(), delay);
    }

    /// Fail or hang a share of calls (None: stop).
    pub fn set_chaos(&self, chaos: Option<Chaos>) {
        *self.shared.chaos.lock().unwrap() = chaos;
    }

    /// Answer every call with this HTTP status (None: answer normally).
    pub fn fail_with(&self, status: Option<u16>) {
        *self.shared.fail_with.lock().unwrap() = status;
    }

    /// Most turns of one phone ever in flight at once, and of all phones.
    pub fn max_in_flight(&self) -> (usize, usize) {
        let r = self.shared.recorded.lock().unwrap();
        (r.max_in_flight_per_phone, r.max_global_in_flight)
    }
}

/// Marks a call ended when dropped: also when the caller (a daemon being
/// killed) disconnects and the server drops this handler mid-call.
struct InFlight {
    shared: Shared,
    phone: String,
    index: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut r = self.shared.recorded.lock().unwrap();
        *r.in_flight.get_mut(&self.phone).unwrap() -= 1;
        r.global_in_flight -= 1;
        r.calls[self.index].ended = Some(Instant::now());
    }
}

async fn answer(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<Value>,
) -> axum::response::Response {
    let phone = req["phone"].as_str().unwrap().to_owned();
    let seen_count = req["context"]["count"].as_u64().unwrap_or(0);
    let guard = {
        let mut r = s.recorded.lock().unwrap();
        let n = r.in_flight.entry(phone.clone()).or_default();
        *n += 1;
        let n = *n;
        r.max_in_flight_per_phone = r.max_in_flight_per_phone.max(n);
        r.global_in_flight += 1;
        r.max_global_in_flight = r.max_global_in_flight.max(r.global_in_flight);
        r.calls.push(Call {
            turn_id: req["turn_id"].as_str().unwrap().to_owned(),
            idempotency_key: headers
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            phone: phone.clone(),
            transcript: req["transcript"].clone(),
            ids: req["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect(),
            text: req["text"].as_str().unwrap().to_owned(),
            seen_count,
            seen_cache: req["cache"].clone(),
            started: Instant::now(),
            ended: None,
            answered: false,
        });
        InFlight { shared: s.clone(), phone: phone.clone(), index: r.calls.len() - 1 }
    };
    let mut delay = s.delay_for.lock().unwrap().get(&phone).copied().unwrap_or(*s.delay.lock().unwrap());
    let mut fail = *s.fail_with.lock().unwrap();
    let mut hung = false;
    if let Some(chaos) = s.chaos.lock().unwrap().as_mut() {
        chaos.seed ^= chaos.seed << 13;
        chaos.seed ^= chaos.seed >> 7;
        chaos.seed ^= chaos.seed << 17;
        let roll = (chaos.seed % 10_000) as f64 / 10_000.0;
        if roll < chaos.fail {
            fail = Some(500);
        } else if roll < chaos.fail + chaos.hang {
            // Longer than the daemon's timeout: it gives up on this call.
            delay = chaos.hang_for;
            hung = true;
        }
    }
    tokio::time::sleep(delay).await;
    if fail.is_none() && !hung {
        s.recorded.lock().unwrap().calls[guard.index].answered = true;
    }
    drop(guard);
    if let Some(status) = fail {
        return (StatusCode::from_u16(status).unwrap(), "handler told to fail").into_response();
    }
    // Like the real assistant: rebuild the cache when it was not given one.
    let cache = if req["cache"].is_null() { json!({"built_by": req["turn_id"]}) } else { Value::Null };
    Json(json!({
        "reply": format!("turn {} for {phone}", seen_count + 1),
        "context": {"count": seen_count + 1},
        "cache": cache,
    }))
    .into_response()
}

/// xorshift: deterministic load and kill schedules, so a failing run replays.
pub struct Rng(pub u64);

/// `n` random base64 characters: text that deflates to about 3/4 of itself.
pub fn incompressible(n: usize) -> String {
    let mut rng = Rng(0xdead_beef);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..n).map(|_| ALPHABET[rng.below(64) as usize] as char).collect()
}

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Polls `cond` every 10 ms of (possibly paused) time, panicking after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts the real `turnstile serve` binary with only `env` (plus an info
/// log filter) in its environment, stdout and stderr appended to `log`.
pub fn spawn_binary(env: &[(&str, String)], log: &Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("serve")
        .env_clear()
        .env("TURNSTILE_LOG_FILTER", "info")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the turnstile binary")
}

/// For a test that needs what this machine lacks (root, a browser, a
/// server): in CI a failure; elsewhere it says so loudly and skips.
pub fn skip_outside_ci<T>(test: &str, why: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("{test} must run in CI but cannot: {why}");
    }
    eprintln!("\n*** {test} SKIPPED: {why} ***\n");
    None
}

/// A port the OS picks for a server the test starts (free when returned).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A spawned binary that is SIGKILLed if the test ends with it still
/// running: a failed assertion leaves no daemon behind.
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits up to `limit` (wall-clock) for the child to exit.
/// One generic debounced webhook to the real binary at `base`, with the
/// test token, as a gateway sends it.
pub async fn post_batched(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
) -> reqwest::Result<reqwest::Response> {
    client.post(format!("{base}/webhook/whatsapp/batched")).bearer_auth(WEBHOOK_TOKEN).json(body).send().await
}

pub fn exited_within(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Waits (wall-clock, up to 30 s) until the binary at `base` answers /readyz 200.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let start = std::time::Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "daemon never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The two ports of a binary-level daemon, free on 127.0.0.1.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub public: u16,
    pub admin: u16,
}

impl Ports {
    /// Two distinct ports the OS picks (both held while picking, then released).
    pub fn free() -> Ports {
        let public = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Ports { public: public.local_addr().unwrap().port(), admin: admin.local_addr().unwrap().port() }
    }

    /// The public listener's base URL: webhooks and health.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.public)
    }

    /// The admin listener's base URL: API, metrics and health.
    pub fn admin_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }
}

/// The environment every binary-level test starts from: where to listen and
/// store, and (when given) the recording handler to call.
pub fn binary_env(ports: Ports, data: &Path, handler_url: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("TURNSTILE_SERVER_LISTEN", format!("127.0.0.1:{}", ports.public)),
        ("TURNSTILE_SERVER_ADMIN_LISTEN", format!("127.0.0.1:{}", ports.admin)),
        ("TURNSTILE_SERVER_DATA_DIR", data.display().to_string()),
        // Batches timed by `batching.debounce_ms`, as the tests set it.
        ("TURNSTILE_BATCHING_POLICY", "fixed".into()),
        ("TURNSTILE_TURNS_ON_NEW_MESSAGE", "queue".into()),
        // Long waits in some tests: keep pooled connections (the limits have their own test).
        ("TURNSTILE_SERVER_HEADER_TIMEOUT_MS", "600000".into()),
    ];
    if let Some(url) = handler_url {
        env.push(("TURNSTILE_HANDLER_KIND", "http".into()));
        env.push(("TURNSTILE_HANDLER_URL", url.into()));
        // A real handler: the generic webhooks need their token.
        env.push(("TURNSTILE_INGEST_WEBHOOK_TOKEN", WEBHOOK_TOKEN.into()));
    }
    env
}

/// One request a `FakeServer` received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
    /// The status it was answered with.
    pub status: u16,
}

type Responder = Box<dyn Fn(&Value) -> Value + Send + Sync>;

struct FakeState {
    seen: Vec<Seen>,
    status: u16,
    delay: Duration,
    respond: Responder,
}

/// A stand-in for Meta's Graph API, WAHA, an HTTP gateway or an
/// OpenAI-compatible server: records every request, answers `status` with
/// what `respond` makes of the body, after `delay`.
pub struct FakeServer {
    pub base: String,
    state: Arc<Mutex<FakeState>>,
}

impl FakeServer {
    pub async fn start(respond: impl Fn(&Value) -> Value + Send + Sync + 'static) -> FakeServer {
        let state = Arc::new(Mutex::new(FakeState {
            seen: Vec::new(),
            status: 200,
            delay: Duration::ZERO,
            respond: Box::new(respond),
        }));
        let app = Router::new().fallback(fake_answer).with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeServer { base, state }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Requests to `path` that were answered 2xx.
    pub fn delivered(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path && s.status < 300).collect()
    }

    pub fn set_status(&self, status: u16) {
        self.state.lock().unwrap().status = status;
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }
}

async fn fake_answer(
    State(state): State<Arc<Mutex<FakeState>>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let delay = state.lock().unwrap().delay;
    tokio::time::sleep(delay).await;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut s = state.lock().unwrap();
    let mut status = s.status;
    let mut answer = (s.respond)(&body);
    // A responder may answer one request with a status of its own.
    if let Some(own) = answer.get("__status").and_then(Value::as_u64) {
        status = own as u16;
        answer.as_object_mut().unwrap().remove("__status");
    }
    s.seen.push(Seen {
        method: method.to_string(),
        path: uri.path().to_owned(),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect(),
        body,
        status,
    });
    (StatusCode::from_u16(status).unwrap(), Json(answer)).into_response()
}

/// Each phone's committed turns, as `GET /api/conversations/{phone}` lists
/// them (a phone that does not answer is left out).
pub async fn committed_turns(
    client: &reqwest::Client,
    admin: &str,
    phones: &[String],
) -> HashMap<String, Vec<Value>> {
    let mut all = HashMap::new();
    for phone in phones {
        if let Ok(r) = client.get(format!("{admin}/api/conversations/{phone}")).send().await {
            if let Ok(v) = r.json::<Value>().await {
                all.insert(phone.clone(), v["turns"].as_array().cloned().unwrap_or_default());
            }
        }
    }
    all
}

/// The message ids of committed turns, turn by turn, in order.
pub fn ids_in_turns(turns: &[Value]) -> Vec<String> {
    turns
        .iter()
        .flat_map(|t| t["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()))
        .collect()
}

/// The last `n` lines of a daemon's log, newest first (for failure messages).
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().take(n).collect::<Vec<_>>().join("\n")
}

/// A payload from `tests/fixtures/` (see PROVENANCE.md there), as JSON.
pub fn fixture(path: &str) -> Value {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path);
    serde_json::from_slice(&std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// Posts `body` to `/webhook/meta`, signed with `META_SECRET` as Meta signs;
/// the status.
pub async fn post_meta(d: &Daemon, body: &Value) -> u16 {
    let bytes = serde_json::to_vec(body).unwrap();
    let sig = format!("sha256={}", turnstile::ingest::signature::sign_hex(META_SECRET, &bytes, false));
    let r = d
        .client
        .post(format!("{}/webhook/meta", d.base))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sig)
        .body(bytes)
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

/// Every Rust file under `dir`, recursively (the source checks).
pub fn rust_sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether a file under `src/` (path relative to it) holds tests only: a
/// module's `tests.rs`, the fuzz properties.
pub fn test_only_source(file: &str) -> bool {
    file.ends_with("tests.rs") || file.ends_with("fuzz.rs") || file.contains("/fuzz/")
}

/// A copy of a data directory, without the lock file its store held.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "lock" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
