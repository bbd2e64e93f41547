//! The real binary as systemd runs it: notifications on a fake notify
//! socket, and what a second stop signal does. Loopback only, bounded.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_and_stopping_reach_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let ports = Ports::free();
    let mut env = binary_env(ports, &dir.path().join("data"), None);
    env.extend([("NOTIFY_SOCKET", socket_path.display().to_string()), ("WATCHDOG_USEC", "200000".into())]);
    let mut child = spawn_binary(&env, &dir.path().join("daemon.log"));
    let read = move |want: &'static str| -> Vec<String> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no {want} (got {seen:?}): {e}"));
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if seen.last().unwrap() == want {
                return seen;
            }
        }
    };
    let socket_reader = std::sync::Arc::new(std::sync::Mutex::new(read));
    let next = |want: &'static str| {
        let r = socket_reader.clone();
        tokio::task::spawn_blocking(move || (r.lock().unwrap())(want))
    };
    let first = next("READY=1").await.unwrap();
    assert!(first.iter().all(|m| m != "STOPPING=1"), "{first:?}");
    // Ready means ready: the webhook takes messages now.
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/webhook/whatsapp/batched", ports.base()))
        .json(&json!({"id": "n1", "from": "79001234567", "message": "Привет"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Pings at half of WATCHDOG_USEC (0.1 s): several within a second.
    next("WATCHDOG=1").await.unwrap();
    next("WATCHDOG=1").await.unwrap();
    signal(&child, "TERM");
    next("STOPPING=1").await.unwrap();
    let status = exited_within(&mut child, Duration::from_secs(20)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_the_turn_re_runs_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_secs(60)).await;
    let ports = Ports::free();
    let base = ports.base();
    let env = binary_env(ports, &dir.path().join("data"), Some(&handler.url));
    let log = dir.path().join("daemon.log");
    let mut child = spawn_binary(&env, &log);
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let send = |id: &str| {
        client
            .post(format!("{base}/webhook/whatsapp"))
            .bearer_auth(WEBHOOK_TOKEN)
            .json(&json!({"id": id, "from": "79001234567", "message": "Привет"}))
            .send()
    };
    assert_eq!(send("x1").await.unwrap().status(), 200);
    let start = Instant::now();
    while handler.calls().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "turn never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    signal(&child, "TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(child.try_wait().unwrap().is_none(), "the first signal waits for the running turn");
    assert_eq!(send("x2").await.unwrap().status(), 503, "draining");
    signal(&child, "TERM");
    let status = exited_within(&mut child, Duration::from_secs(3)).expect("the second signal exits at once");
    assert!(status.success(), "{status}");

    handler.set_delay(Duration::ZERO);
    let mut child = spawn_binary(&env, &log);
    wait_ready(&client, &base).await;
    let start = Instant::now();
    while handler.calls().len() < 2 || handler.calls()[1].ended.is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "turn never re-ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = handler.calls();
    assert_eq!(calls[1].turn_id, calls[0].turn_id);
    let conv: serde_json::Value = client
        .get(format!("{}/api/conversations/79001234567", ports.admin_base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let turns = conv["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 1);
    assert_eq!(turns[0]["messages"][0]["id"], "x1", "acknowledged before the signals, committed after");
    signal(&child, "TERM");
    assert!(exited_within(&mut child, Duration::from_secs(20)).is_some());
}

/// The unit gives the daemon longer to stop than the daemon gives itself,
/// so a stop ends in the daemon's own clean exit, not in SIGKILL.
#[test]
fn the_units_stop_timeout_leaves_room_for_the_daemons_own_deadline() {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/turnstile.service")).unwrap();
    let stop_sec: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("the unit sets TimeoutStopSec")
        .trim()
        .parse()
        .unwrap();
    let defaults = turnstile::Config::default();
    // The daemon's backstop exits 0.7 s after its deadline; a second more for the process to go.
    assert!(
        defaults.server.stop_timeout_ms + 1_700 <= stop_sec * 1000,
        "server.stop_timeout_ms {} does not fit the unit's TimeoutStopSec={stop_sec}",
        defaults.server.stop_timeout_ms
    );
    assert!(
        defaults.turns.shutdown_grace_ms + turnstile::config::STOP_RESERVE_MS
            <= defaults.server.stop_timeout_ms,
        "turns.shutdown_grace_ms does not fit server.stop_timeout_ms"
    );
}
