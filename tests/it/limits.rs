//! Clients that misbehave, against the real binary: slow headers and slow
//! bodies are cut off at their timeouts while everyone else is served, and a
//! stop ends within `server.stop_timeout_ms` whatever they and the handler
//! do — answering 503 while it drains, losing nothing acknowledged.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, Instant};

use crate::helpers::*;

/// Opens a connection and sends `bytes`, leaving the request unfinished.
async fn half_request(port: u16, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// Whether the server has closed `s` (reads to EOF, or an error), within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 512];
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // an answer (408) before the close
            Err(_) => return false,
        }
    }
}

fn slow_body_head(len: usize) -> Vec<u8> {
    format!(
        "POST /webhook/whatsapp/batched HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         authorization: Bearer {WEBHOOK_TOKEN}\r\ncontent-length: {len}\r\n\r\n{{\"id\":\"slow\","
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_bodies_are_cut_off_while_everyone_else_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let ports = Ports::free();
    let (base, admin, port) = (ports.base(), ports.admin_base(), ports.public);
    let mut env = binary_env(ports, &dir.path().join("data"), Some(&handler.url));
    env.extend([
        ("TURNSTILE_SERVER_HEADER_TIMEOUT_MS", "1500".into()),
        ("TURNSTILE_SERVER_BODY_TIMEOUT_MS", "1500".into()),
    ]);
    let _daemon = Spawned(spawn_binary(&env, &dir.path().join("daemon.log")));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    wait_ready(&client, &admin).await;

    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..300 {
        slow.push(
            half_request(port, b"POST /webhook/whatsapp/batched HTTP/1.1\r\nhost: x\r\ncontent-ty").await,
        );
    }
    for _ in 0..50 {
        slow.push(half_request(port, &slow_body_head(400)).await);
    }
    // Everyone else is served meanwhile, promptly.
    let mut worst = Duration::ZERO;
    for i in 0..40 {
        let t = Instant::now();
        let body = json!({"id": format!("ok{i}"), "from": "79001234567", "message": "Привет"});
        assert_eq!(post_batched(&client, &base, &body).await.unwrap().status(), 200);
        worst = worst.max(t.elapsed());
        sleep(Duration::from_millis(25)).await;
    }
    // Every slow connection is closed once its timeout (1.5 s) has passed.
    let mut still_open = 0;
    for s in &mut slow {
        let left = Duration::from_millis(3000).saturating_sub(opened.elapsed());
        if !closed_within(s, left.max(Duration::from_millis(50))).await {
            still_open += 1;
        }
    }
    let all_closed = opened.elapsed();
    assert_eq!(still_open, 0, "slow connections left open 3 s after they stalled");
    // The figures docs/performance.md quotes (`-- --nocapture`); the client's 3 s
    // timeout above is the only time bound on normal webhooks.
    eprintln!(
        "300 slow-header + 50 slow-body connections, timeouts 1.5 s: all closed {:.2} s after they \
         stalled; 40 normal webhooks meanwhile, slowest answer {:.1} ms",
        all_closed.as_secs_f64(),
        worst.as_secs_f64() * 1e3
    );
    let metrics = client.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_connections{listener=\"public\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_in_time_with_stalled_clients_and_a_silent_handler_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("daemon.log");
    // A handler that never answers (within the test).
    let silent = TestHandler::start(Duration::from_secs(3600)).await;
    let ports = Ports::free();
    let (base, admin, port) = (ports.base(), ports.admin_base(), ports.public);
    let mut env = binary_env(ports, &data, Some(&silent.url));
    env.extend([
        ("TURNSTILE_SERVER_STOP_TIMEOUT_MS", "3000".into()),
        ("TURNSTILE_TURNS_SHUTDOWN_GRACE_MS", "1000".into()),
        ("TURNSTILE_BATCHING_DEBOUNCE_MS", "100".into()),
    ]);
    let mut daemon = Spawned(spawn_binary(&env, &log));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    wait_ready(&client, &admin).await;
    let mut acked = Vec::new();
    for i in 0..5 {
        let id = format!("s{i}");
        let body = json!({"id": id, "from": format!("7900123456{i}"), "message": "Привет"});
        let r = client.post(format!("{base}/webhook/whatsapp")).bearer_auth(WEBHOOK_TOKEN).json(&body);
        assert_eq!(r.send().await.unwrap().status(), 200);
        acked.push(id);
    }
    wait_until("turns at the silent handler", Duration::from_secs(10), || silent.calls().len() == 5).await;
    let mut stalled = Vec::new();
    for n in 0..100 {
        let bytes: Vec<u8> = if n % 2 == 0 {
            b"POST /webhook/whatsapp HTTP/1.1\r\nhost: x\r\n".to_vec()
        } else {
            slow_body_head(400)
        };
        stalled.push(half_request(port, &bytes).await);
    }

    let term =
        std::process::Command::new("kill").args(["-TERM", &daemon.0.id().to_string()]).status().unwrap();
    assert!(term.success());
    let signalled = Instant::now();
    // Once it drains (the turns' 1 s grace at least), webhooks are answered
    // 503 until the listener closes. One sent before the daemon saw the
    // signal may still be accepted: then it must survive like any other.
    let mut refused = 0;
    let mut n = 0;
    loop {
        let id = format!("late{n}");
        n += 1;
        let body = json!({"id": id, "from": "79001234567", "message": "ещё"});
        match post_batched(&client, &base, &body).await.map(|r| r.status().as_u16()) {
            Ok(503) => refused += 1,
            Ok(200) if refused == 0 => acked.push(id),
            Ok(200) => panic!("a webhook was accepted after the drain had begun"),
            Ok(other) => panic!("during the drain: {other}"),
            Err(_) => break, // the listener closed: the drain is over
        }
        sleep(Duration::from_millis(50)).await;
    }
    let drained = signalled.elapsed();
    assert!(drained >= Duration::from_millis(900), "the listener closed after only {drained:?}");
    assert!(refused >= 10, "{refused} webhooks answered during the drain");
    let status = exited_within(&mut daemon.0, Duration::from_millis(3000 + 1000 + 200) - signalled.elapsed())
        .expect("the daemon did not exit within stop_timeout_ms + 1 s");
    assert!(status.success(), "{status}");
    let took = signalled.elapsed();
    assert!(took <= Duration::from_millis(4000), "stopped after {took:?}");
    eprintln!(
        "SIGTERM with 100 stalled clients and a silent handler (stop_timeout_ms 3000): {refused} \
         webhooks answered 503 for {:.2} s, exit 0 after {:.2} s",
        drained.as_secs_f64(),
        took.as_secs_f64()
    );
    drop(stalled);

    // Afterwards nothing acknowledged is lost: the turns cut short re-run.
    let handler = TestHandler::start(Duration::ZERO).await;
    let mut env = binary_env(Ports { public: port, admin: admin_port(&admin) }, &data, Some(&handler.url));
    env.push(("TURNSTILE_BATCHING_DEBOUNCE_MS", "100".into()));
    let _restarted = Spawned(spawn_binary(&env, &log));
    wait_ready(&client, &admin).await;
    acked.sort();
    let all_seen = || {
        let mut seen: Vec<String> = handler.calls().iter().flat_map(|c| c.ids.clone()).collect();
        seen.sort();
        seen.dedup();
        seen
    };
    wait_until("the re-run turns", Duration::from_secs(20), || all_seen() == acked).await;
    let _: Value = client.get(format!("{admin}/api/dead")).send().await.unwrap().json().await.unwrap();
}

fn admin_port(admin: &str) -> u16 {
    admin.rsplit(':').next().unwrap().parse().unwrap()
}
