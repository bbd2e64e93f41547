//! The operator console in a real headless Chromium (Debian's `chromium`
//! and `chromium-driver`, driven over the WebDriver protocol) against the
//! real binary: pending batches with moving countdowns, a turn appearing
//! with its timings, a dead turn retried by a click, and the token prompt.
//! Without `chromedriver` the tests say so and skip — except in CI (`CI`
//! set), where `.ci/run` installs it and a missing browser is a failure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use crate::helpers::{
    binary_env, free_port, post_batched, skip_outside_ci, spawn_binary, wait_ready, FakeServer, Ports,
    Spawned, TestHandler, WEBHOOK_TOKEN,
};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser session through chromedriver. Its profile directory is its
/// own, so a test that fails before `quit` still ends exactly the browser
/// it started (by that directory) and nothing else.
struct Browser {
    http: reqwest::Client,
    session: String,
    profile: tempfile::TempDir,
    _driver: Spawned,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill").args(["-KILL", "-f"]).arg(self.profile.path()).status();
    }
}

impl Browser {
    /// `None` (with the reason) when chromedriver is not installed outside CI.
    async fn start(test: &str) -> Option<Browser> {
        let found = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let Some(driver) = found else {
            let why = "chromedriver is not installed (Debian: apt-get install chromium chromium-driver)";
            return skip_outside_ci(test, why);
        };
        let port = free_port();
        let child = std::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Spawned(child);
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while http.get(format!("{root}/status")).send().await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1250", "--lang=en-GB",
                     format!("--user-data-dir={}", profile.path().display())],
        }}}});
        let answer: Value =
            http.post(format!("{root}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let id = answer["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {answer}"));
        Some(Browser { http, session: format!("{root}/session/{id}"), profile, _driver: driver })
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        if answer["value"]["error"].is_string() {
            panic!("webdriver {path}: {}", answer["value"]);
        }
        answer["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    /// Runs `body` (a function body that returns a value) in the page.
    async fn script(&self, body: &str) -> Value {
        self.command(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": body, "args": [] })))
            .await
    }

    /// Waits (wall clock) until `body` returns something other than null/false.
    async fn wait_for(&self, what: &str, limit: Duration, body: &str) -> Value {
        let started = Instant::now();
        loop {
            let v = self.script(body).await;
            if !v.is_null() && v != json!(false) {
                return v;
            }
            if started.elapsed() > limit {
                let page = self.script("return document.body.innerText").await;
                panic!("the console never showed {what}; the page reads:\n{}", page.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .command(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css})))
            .await;
        found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}")).to_owned()
    }

    /// A real click (WebDriver's), not a script calling `click()`.
    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.command(reqwest::Method::POST, &format!("/element/{id}/clear"), Some(json!({}))).await;
        self.command(reqwest::Method::POST, &format!("/element/{id}/value"), Some(json!({ "text": text })))
            .await;
    }

    async fn screenshot(&self, path: &std::path::Path) {
        let b64 = self.command(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session (and the browser); chromedriver goes with `_driver`.
    async fn quit(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
    // (Dropped without `quit`, e.g. on a failed assertion: see `Drop`.)
}

/// "27 s" → 27.
fn seconds(countdown: &Value) -> u64 {
    countdown
        .as_str()
        .and_then(|s| s.strip_suffix(" s"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a countdown: {countdown}"))
}

async fn send_now(client: &reqwest::Client, base: &str, id: &str, phone: &str, text: &str) {
    let r = client
        .post(format!("{base}/webhook/whatsapp"))
        .header("x-webhook-token", WEBHOOK_TOKEN)
        .json(&json!({"id": id, "from": phone, "message": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

const PENDING_ROWS: &str = "const rows = [...document.querySelectorAll('#pending tbody tr[data-phone]')];
    return rows.length === 3 ? rows.map(r => [r.querySelector('.phone').textContent,
        r.querySelector('.countdown').textContent, r.cells[5].textContent]) : null;";

#[tokio::test]
async fn the_console_shows_batches_counting_down_turns_with_timings_and_retries_a_dead_turn() {
    let Some(browser) = Browser::start("the console test").await else { return };
    let handler = TestHandler::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let mut env = binary_env(ports, &dir.path().join("data"), Some(&handler.url));
    env.extend([
        ("TURNSTILE_BATCHING_DEBOUNCE_MS", "30000".to_owned()),
        ("TURNSTILE_HANDLER_MAX_ATTEMPTS", "2".to_owned()),
        ("TURNSTILE_HANDLER_BACKOFF_MS", "100".to_owned()),
    ]);
    let _daemon = Spawned(spawn_binary(&env, &dir.path().join("daemon.log")));
    let client = reqwest::Client::new();
    let (base, admin) = (ports.base(), ports.admin_base());
    wait_ready(&client, &base).await;

    // Three clients start writing; the quiet window is 30 s.
    for i in 1..=3 {
        let body = json!({"id": format!("p{i}"), "from": format!("7900123450{i}"), "message": format!("Можно на стрижку {i}?")});
        assert_eq!(post_batched(&client, &base, &body).await.unwrap().status(), 200);
    }
    browser.goto(&format!("{admin}/ui")).await;
    let first = browser.wait_for("three pending batches", Duration::from_secs(15), PENDING_ROWS).await;
    let phones: Vec<&str> = first.as_array().unwrap().iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(phones, ["7900*****01", "7900*****02", "7900*****03"], "masked, next cut first");
    assert!(first.as_array().unwrap().iter().all(|r| r[2] == "quiet window"), "{first}");
    let page = browser.script("return document.body.innerText").await;
    assert!(!page.as_str().unwrap().contains("79001234501"), "no full phone until asked");
    assert!(!page.as_str().unwrap().contains("стрижку"), "no text until asked");
    // The rows stay the same elements while their batches do not change
    // (the page patches rows, it does not re-render them under the pointer).
    browser.script("window.held = document.querySelector(\"#pending tbody tr[data-phone='79001234502']\"); return true").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = browser.script(PENDING_ROWS).await;
    let kept = browser.script("return window.held.isConnected").await;
    assert_eq!(kept, json!(true), "an unchanged pending row was re-rendered by the state events");
    for (a, b) in first.as_array().unwrap().iter().zip(second.as_array().unwrap()) {
        let (before, after) = (seconds(&a[1]), seconds(&b[1]));
        assert!((20..=30).contains(&before), "{a}");
        assert!(after < before, "the countdown moves: {before} s, then {after} s");
    }
    // The texts come on a click.
    browser.click("#pending tbody tr[data-phone='79001234502']").await;
    let detail = browser
        .wait_for(
            "a batch's texts",
            Duration::from_secs(10),
            "const d = document.querySelector('#pending-detail'); return !d.hidden && d.textContent.includes('стрижку 2') ? d.textContent : null",
        )
        .await;
    assert!(detail.as_str().unwrap().contains("79001234502"), "{detail}");

    // A sender without its secret: the badge says so.
    let refused = client
        .post(format!("{base}/webhook/whatsapp/batched"))
        .json(&json!({"id": "x", "from": "79001234599", "message": "?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let badge = browser
        .wait_for(
            "the refused-for-secret badge",
            Duration::from_secs(10),
            "const b = document.querySelector('#refused'); return b && !b.hidden ? b.textContent : null",
        )
        .await;
    assert!(badge.as_str().unwrap().contains('1'), "{badge}");

    // An immediate webhook: its turn shows under recent turns with timings.
    send_now(&client, &base, "n1", "79001234504", "Запишите меня на завтра").await;
    let row = browser
        .wait_for(
            "the immediate turn",
            Duration::from_secs(15),
            "const r = [...document.querySelectorAll('#recent tbody tr[data-turn]')]
                .find(r => r.querySelector('.phone').textContent === '7900*****04');
            return r ? [...r.cells].map(c => c.textContent) : null",
        )
        .await;
    let cells: Vec<&str> = row.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(&cells[2..5], ["committed", "immediate", "1"], "{cells:?}");
    for (i, what) in [(6, "queue wait"), (7, "handler"), (8, "commit")] {
        assert!(cells[i].ends_with(" ms") || cells[i].ends_with(" s"), "{what}: {cells:?}");
    }
    assert!(cells[9].ends_with(" chars"), "reply length: {cells:?}");

    // A turn dies (the handler fails twice), is retried by a click, and commits.
    handler.fail_with(Some(500));
    send_now(&client, &base, "d1", "79001234505", "Отмените запись").await;
    let turn_id = browser
        .wait_for(
            "a dead turn with a Retry button",
            Duration::from_secs(15),
            "const b = document.querySelector('#dead button.retry'); return b ? b.dataset.turn : null",
        )
        .await;
    let turn_id = turn_id.as_str().unwrap().to_owned();
    let dead_row = browser.script("return document.querySelector('#dead tbody tr').innerText").await;
    assert!(dead_row.as_str().unwrap().contains("500"), "the last error is shown: {dead_row}");
    // Another turn dies while the operator is about to click: the first
    // row's button stays the very element under the pointer.
    browser.script("window.button = document.querySelector('#dead button.retry'); return true").await;
    send_now(&client, &base, "d2", "79001234506", "И ещё одна отмена").await;
    browser
        .wait_for(
            "a second dead turn",
            Duration::from_secs(15),
            "return document.querySelectorAll('#dead button.retry').length === 2",
        )
        .await;
    let kept = browser.script("return window.button.isConnected").await;
    assert_eq!(kept, json!(true), "the dead list re-rendered a row that did not change");
    handler.fail_with(None);
    browser.click(&format!("#dead button.retry[data-turn='{turn_id}']")).await;
    let outcome = browser
        .wait_for(
            "the retried turn committed",
            Duration::from_secs(15),
            &format!(
                "const r = document.querySelector(\"#recent tbody tr[data-turn='{turn_id}'] .outcome.committed\");
                return r && !document.querySelector(\"#dead button.retry[data-turn='{turn_id}']\") ? r.textContent : null"
            ),
        )
        .await;
    assert_eq!(outcome, "committed");
    let calls = handler.calls();
    assert!(
        calls.iter().filter(|c| c.phone == "79001234505").count() >= 3,
        "two failed attempts and the retry"
    );

    // For the picture: the charts have two points (a sample every 5 s) and
    // the pending batches are still there.
    browser
        .wait_for(
            "two chart points",
            Duration::from_secs(20),
            "return samples.length >= 2 && document.querySelector('#chart-webhooks polyline') !== null",
        )
        .await;
    browser.wait_for("the pending batches", Duration::from_secs(5), PENDING_ROWS).await;
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console.png");
    browser.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    browser.quit().await;
}

#[tokio::test]
async fn with_an_admin_token_the_console_shows_only_the_prompt_and_the_stream_answers_401() {
    let Some(browser) = Browser::start("the console token test").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let mut env = binary_env(ports, &dir.path().join("data"), None);
    let token = "console-admin-token-0001";
    env.push(("TURNSTILE_SERVER_ADMIN_TOKEN", token.to_owned()));
    let _daemon = Spawned(spawn_binary(&env, &dir.path().join("daemon.log")));
    let client = reqwest::Client::new();
    let admin = ports.admin_base();
    wait_ready(&client, &ports.base()).await;

    let refused = client.get(format!("{admin}/api/events")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    let wrong = client.get(format!("{admin}/api/events")).bearer_auth("not-the-token").send().await.unwrap();
    assert_eq!(wrong.status(), 401);

    browser.goto(&format!("{admin}/ui")).await;
    let only_prompt = "const p = document.querySelector('#prompt'), a = document.querySelector('#app');
        return getComputedStyle(p).display !== 'none' && getComputedStyle(a).display === 'none'";
    browser.wait_for("the token prompt alone", Duration::from_secs(10), only_prompt).await;
    let text = browser.script("return document.body.innerText").await;
    assert!(!text.as_str().unwrap().contains("Pending batches"), "nothing but the prompt: {text}");

    browser.type_into("#token", "not-the-token").await;
    browser.click("#token-form button").await;
    browser
        .wait_for(
            "the refusal",
            Duration::from_secs(10),
            "return document.querySelector('#prompt-error').textContent.includes('refused')",
        )
        .await;
    browser.wait_for("the token prompt alone", Duration::from_secs(5), only_prompt).await;

    browser.type_into("#token", token).await;
    browser.click("#token-form button").await;
    let status = browser
        .wait_for(
            "the console, once the token is given",
            Duration::from_secs(10),
            "const a = document.querySelector('#app'); const s = document.querySelector('#status').textContent;
            return getComputedStyle(a).display !== 'none' && s === 'ready' ? s : null",
        )
        .await;
    assert_eq!(status, "ready");
    // The token travels in a header only, never in the page's address.
    let url = browser.command(reqwest::Method::GET, "/url", None).await;
    assert!(!url.as_str().unwrap().contains(token), "{url}");
    browser.quit().await;
}

/// An event stream read one event at a time: (event, id, data).
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    fn new(response: reqwest::Response) -> Events {
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Events { response, buffer: String::new() }
    }

    async fn next(&mut self) -> (String, Option<String>, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), None, Value::Null);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(v).unwrap();
                    }
                }
                return (event, id, data);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
                .await
                .expect("an event within 30 s")
                .unwrap()
                .expect("the stream stays open");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The opening snapshot's data.
    async fn snapshot(response: reqwest::Response) -> Value {
        let (event, _, data) = Events::new(response).next().await;
        assert_eq!(event, "snapshot");
        data
    }
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_pending_batches_reach_the_console_one_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = crate::helpers::config(dir.path());
    c.batching.debounce_ms = 3_600_000;
    c.batching.max_wait_ms = 7_200_000;
    let d = crate::helpers::Daemon::start(c).await;
    let mut sends = tokio::task::JoinSet::new();
    for worker in 0..20u64 {
        let (client, url) = (d.client.clone(), format!("{}/webhook/whatsapp/batched", d.base));
        sends.spawn(async move {
            for i in (worker..10_000).step_by(20) {
                let body = json!({"id": format!("m{i}"), "from": format!("7900{i:07}"), "message": "Привет"});
                let r = client.post(&url).bearer_auth(WEBHOOK_TOKEN).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        });
    }
    while let Some(done) = sends.join_next().await {
        done.unwrap();
    }
    let open = |query: &str| d.client.get(format!("{}/api/events{query}", d.admin)).send();

    let snapshot = Events::snapshot(open("").await.unwrap()).await;
    let pending = &snapshot["state"]["pending"];
    assert_eq!((pending["batches"].as_u64(), pending["messages"].as_u64()), (Some(10_000), Some(10_000)));
    let page = pending["page"].as_array().unwrap();
    assert_eq!(page.len(), 50, "one page, not ten thousand rows");
    let due: Vec<u64> = page.iter().map(|b| b["fires_at_ms"].as_u64().unwrap()).collect();
    assert!(due.windows(2).all(|w| w[0] <= w[1]), "next cut first: {due:?}");
    assert!(
        snapshot.to_string().len() < 64 * 1024,
        "the snapshot stays small: {} bytes",
        snapshot.to_string().len()
    );

    let last = Events::snapshot(open("?offset=9990&limit=20").await.unwrap()).await;
    let pending = &last["state"]["pending"];
    assert_eq!(pending["page"].as_array().unwrap().len(), 10, "the last page holds what is left");
    assert_eq!(pending["offset"], 9990);

    let refused = open("?limit=5000").await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reconnecting_console_gets_the_turns_it_missed_and_a_new_one_everything() {
    let dir = tempfile::tempdir().unwrap();
    let d = crate::helpers::Daemon::start(crate::helpers::config(dir.path())).await;
    for i in 0..3 {
        let body =
            json!({"id": format!("r{i}"), "from": format!("790012345{i:02}"), "message": "Когда свободно?"});
        assert_eq!(d.post("/webhook/whatsapp", &body).await.0, 200);
    }
    let open = |last_id: Option<String>| {
        let mut r = d.client.get(format!("{}/api/events", d.admin));
        if let Some(id) = last_id {
            r = r.header("last-event-id", id);
        }
        r.send()
    };
    // Wait until the three turns are in.
    let mut snapshot = Value::Null;
    for _ in 0..200 {
        snapshot = Events::snapshot(open(None).await.unwrap()).await;
        if snapshot["recent"].as_array().unwrap().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recent = snapshot["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 3, "{snapshot}");
    assert!(recent.iter().all(|t| t["outcome"] == "committed" && t["cut_reason"] == "immediate"));
    let epoch = snapshot["epoch"].as_u64().unwrap();
    assert_eq!(snapshot["last_turn_id"], format!("{epoch}.2"));

    // Seen up to the first turn: the snapshot resumes with the other two.
    let resumed = Events::snapshot(open(Some(format!("{epoch}.0"))).await.unwrap()).await;
    assert_eq!(resumed["resumed"], true);
    let seqs: Vec<u64> =
        resumed["recent"].as_array().unwrap().iter().map(|t| t["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2]);
    // An id from another process (an older epoch): everything, not a resume.
    let fresh = Events::snapshot(open(Some(format!("{}.1", epoch - 1))).await.unwrap()).await;
    assert_eq!((fresh["resumed"].as_bool(), fresh["recent"].as_array().unwrap().len()), (Some(false), 3));

    // A turn that finishes while a console is connected arrives as its own event, with its id.
    let mut live = Events::new(open(None).await.unwrap());
    assert_eq!(live.next().await.0, "snapshot");
    let body = json!({"id": "r9", "from": "79001234599", "message": "Спасибо"});
    assert_eq!(d.post("/webhook/whatsapp", &body).await.0, 200);
    let (id, turn) = loop {
        let (event, id, data) = live.next().await;
        if event == "turn" {
            break (id, data);
        }
        assert_eq!(event, "state", "only state events in between");
    };
    assert_eq!(id, Some(format!("{epoch}.3")));
    assert_eq!(turn["masked"], "7900*****99");
    assert!(turn.get("texts").is_none() && turn.get("reply").is_none(), "texts only when asked: {turn}");
    let (status, detail) = d.get(&format!("/api/console/turns/{}", turn["turn_id"].as_str().unwrap())).await;
    assert_eq!(status, 200);
    assert_eq!(detail["texts"], json!(["Спасибо"]));
    assert!(detail["reply"].as_str().unwrap().contains("Спасибо"), "{detail}");
    // An open console does not hold up a stop: its stream ends cleanly.
    d.stop().await;
    loop {
        match live.response.chunk().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) => panic!("the stream broke instead of ending: {e}"),
        }
    }
}

#[tokio::test]
async fn a_conversation_staff_took_over_shows_its_resume_countdown_and_resume_starts_its_turn() {
    let Some(browser) = Browser::start("the console takeover test").await else { return };
    let handler = TestHandler::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let env = binary_env(ports, &dir.path().join("data"), Some(&handler.url));
    let _daemon = Spawned(spawn_binary(&env, &dir.path().join("daemon.log")));
    let client = reqwest::Client::new();
    let (base, admin) = (ports.base(), ports.admin_base());
    wait_ready(&client, &base).await;
    let phone = "79001234507";
    let r = client
        .post(format!("{admin}/api/conversations/{phone}/pause"))
        .json(&json!({"minutes": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // Its client writes: stored, cut at once, held — no turn.
    send_now(&client, &base, "t1", phone, "Можно перенести запись?").await;
    browser.goto(&format!("{admin}/ui")).await;
    let row = "const r = document.querySelector(\"#takeover tbody tr[data-phone='79001234507']\");
        return r && r.cells[5].textContent === '1' ? [r.cells[2].textContent, r.cells[4].textContent] : null";
    let first = browser.wait_for("the paused conversation", Duration::from_secs(15), row).await;
    assert_eq!(first[0], "api", "{first}");
    let countdown = |v: &Value| -> u64 {
        let t = v[1].as_str().unwrap();
        let (m, s) = t.strip_suffix(" s").unwrap().split_once(" min ").unwrap_or_else(|| panic!("{t}"));
        m.parse::<u64>().unwrap() * 60 + s.parse::<u64>().unwrap()
    };
    assert!((28 * 60..=30 * 60).contains(&countdown(&first)), "{first}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = browser.script(row).await;
    assert!(countdown(&second) < countdown(&first), "the countdown moves: {first} then {second}");
    assert!(handler.calls().is_empty(), "no turn while paused");
    browser.click("#takeover button.resume[data-phone='79001234507']").await;
    browser
        .wait_for(
            "the resumed turn",
            Duration::from_secs(15),
            "const r = [...document.querySelectorAll('#recent tbody tr[data-turn]')]
                .find(r => r.querySelector('.phone').textContent === '7900*****07');
            return r && !document.querySelector(\"#takeover tbody tr[data-phone='79001234507']\") ? r.cells[3].textContent : null",
        )
        .await;
    let calls = handler.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].ids, ["t1"]);
    browser.quit().await;
}

#[tokio::test]
async fn a_replys_delivery_state_moves_from_sent_to_read_in_recent_turns() {
    let Some(browser) = Browser::start("the console delivery test").await else { return };
    let handler = TestHandler::start(Duration::ZERO).await;
    // WAHA NOWEB as the gateway: sendText answers the key of what it sent;
    // the ack names that id (tests/fixtures/waha/noweb/).
    let waha = FakeServer::start(|body| {
        if body["text"].is_null() {
            return json!({});
        }
        json!({"key": {"remoteJid": "79001234567@s.whatsapp.net", "fromMe": true, "id": "3EB0C4D5E6F708192A3B4C"}})
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let mut env = binary_env(ports, &dir.path().join("data"), Some(&handler.url));
    env.extend([
        ("TURNSTILE_BATCHING_DEBOUNCE_MS", "300".to_owned()),
        ("TURNSTILE_GATEWAY_KIND", "waha".to_owned()),
        ("TURNSTILE_GATEWAY_URL", waha.base.clone()),
        ("TURNSTILE_WAHA_ALLOW_UNAUTHENTICATED", "true".to_owned()),
    ]);
    let _daemon = Spawned(spawn_binary(&env, &dir.path().join("daemon.log")));
    let client = reqwest::Client::new();
    let (base, admin) = (ports.base(), ports.admin_base());
    wait_ready(&client, &base).await;
    let fixture = |name: &str| -> Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/waha/noweb").join(name);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let r =
        client.post(format!("{base}/webhook/waha")).json(&fixture("message.pn.json")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    browser.goto(&format!("{admin}/ui")).await;
    let cell = |want: &str| {
        format!(
            "const r = [...document.querySelectorAll('#recent tbody tr[data-turn]')]
                .find(r => r.querySelector('.phone').textContent === '7900*****67');
            const d = r && r.querySelector('.delivery').textContent;
            return d === '{want}' ? d : null"
        )
    };
    browser.wait_for("the reply shown as sent", Duration::from_secs(20), &cell("sent")).await;
    assert_eq!(waha.delivered("/api/sendText").len(), 1);
    // WhatsApp says the client read it: the same row changes, live.
    let r = client
        .post(format!("{base}/webhook/waha"))
        .json(&fixture("message-ack.read.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    browser.wait_for("the reply shown as read", Duration::from_secs(15), &cell("read")).await;
    browser.quit().await;
}
