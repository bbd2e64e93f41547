//! Faults heal, and never strand a message or break a phone's order: a log
//! write that fails (answered 503, nothing stored, healed in place), a
//! commit that fails (retried first, the phone's later messages wait), a
//! driver that dies (503, then a non-zero exit for systemd to restart).
//! The hooks fail the store's real calls, so each fault takes the path a
//! real I/O error takes. A full disk, for real, is in `disk_full.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::{sleep, Instant};

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn a_failed_write_is_a_503_that_stores_nothing_and_the_daemon_heals_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let (d, faults) = Daemon::start_with_faults(config_with(dir.path(), &handler)).await;
    assert_eq!(d.send("w1", "79001234567", "Привет").await.0, 200);

    faults.set_log_writes_failing(true);
    let (status, body) = d.send("w2", "79001234567", "можно").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nothing was stored"), "{body}");
    // Health tells the truth while messages cannot be stored.
    let (status, body) = d.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let metrics = d.client.get(d.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("turnstile_store_ok 0"), "{metrics}");

    // Space again: readyz's probe sees it, and the redelivery is new (no dedup mark was left).
    faults.set_log_writes_failing(false);
    assert_eq!(d.get("/readyz").await.0, 200);
    assert_eq!(d.send("w2", "79001234567", "можно").await, (200, json!({"status": "accepted"})));
    wait_until("the turn", 30 * S, || !handler.calls().is_empty()).await;
    sleep(20 * S).await;
    let calls = handler.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].ids, ["w1", "w2"], "both, once, in order");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_turn_whose_commit_fails_is_retried_first_and_the_phones_later_messages_wait() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::from_millis(100)).await;
    let (d, faults) = Daemon::start_with_faults(config_with(dir.path(), &handler)).await;
    faults.set_commits_failing(true);
    assert_eq!(d.send("a1", "79001234567", "Привет").await.0, 200);
    // The first turn reaches the handler, its commit fails, it is retried.
    wait_until("a retried turn", 60 * S, || handler.calls().len() >= 3).await;
    // The phone writes on: its new batch must wait behind the failed turn.
    assert_eq!(d.send("a2", "79001234567", "можно?").await.0, 200);
    sleep(15 * S).await;
    let first_turn = handler.calls()[0].turn_id.clone();
    assert!(handler.calls().iter().all(|c| c.turn_id == first_turn), "a later turn overtook the failed one");

    faults.set_commits_failing(false);
    wait_until("both turns", 120 * S, || {
        handler.calls().iter().any(|c| c.turn_id != first_turn && c.ids == ["a2"])
    })
    .await;
    sleep(15 * S).await;
    let calls = handler.calls();
    let (first, second): (Vec<&Call>, Vec<&Call>) = calls.iter().partition(|c| c.turn_id == first_turn);
    assert!(first.iter().all(|c| c.ids == ["a1"] && c.seen_count == 0), "the retries re-ran the same turn");
    assert_eq!(second.len(), 1);
    let last_retry_end = first.iter().map(|c| c.ended.unwrap()).max().unwrap();
    assert!(second[0].started >= last_retry_end, "the later turn started before the failed one committed");
    assert_eq!(second[0].seen_count, 1, "the later turn sees the context the retried one saved");
    let history = d.get("/api/conversations/79001234567").await.1;
    let order: Vec<&str> =
        history["turns"].as_array().unwrap().iter().map(|t| t["turn_id"].as_str().unwrap()).collect();
    assert_eq!(order, [first_turn.as_str(), second[0].turn_id.as_str()]);
    let metrics = d.client.get(d.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("turnstile_turn_store_failures_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(failures >= 2.0, "{failures}");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_driver_stops_acknowledgements_and_ends_the_daemon_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // A turn in the handler keeps the daemon in its stop grace a while.
    let slow = TestHandler::start(10 * S).await;
    let (d, faults) = Daemon::start_with_faults(config_with(dir.path(), &slow)).await;
    let body = json!({"id": "k0", "from": "79007654321", "message": "сейчас"});
    assert_eq!(d.post("/webhook/whatsapp", &body).await.0, 200);
    wait_until("the slow turn", 10 * S, || !slow.calls().is_empty()).await;
    assert_eq!(d.send("k1", "79001234567", "Привет").await.0, 200);
    faults.kill_driver();
    // The message whose announcement kills the driver may still be
    // acknowledged (it is on disk); once the death is seen, nothing is.
    let mut acked = vec!["k1".to_owned()];
    let mut refused = false;
    for n in 2..20 {
        let id = format!("k{n}");
        match d.send(&id, "79001234567", "можно").await.0 {
            200 => acked.push(id),
            503 => {
                refused = true;
                break;
            }
            other => panic!("{id}: {other}"),
        }
    }
    assert!(refused, "a dead driver kept the daemon acknowledging");
    let exited = tokio::time::timeout(60 * S, d.exited()).await.expect("the daemon exits");
    let reason = exited.expect_err("a dead driver is an error exit").to_string();
    assert!(reason.contains("driver"), "{reason}");
    // Restarted (as systemd would), every acknowledged message becomes a turn.
    let handler = TestHandler::start(Duration::ZERO).await;
    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    wait_until("the recovered turn", 60 * S, || !handler.calls().is_empty()).await;
    sleep(30 * S).await;
    let seen: Vec<String> = handler
        .calls()
        .iter()
        .flat_map(|c| c.ids.clone())
        .filter(|id| id.starts_with('k') && id != "k0")
        .collect();
    assert_eq!(seen, acked);
    d.stop().await;
}

/// The real binary, its driver killed by the test hook while a sender keeps
/// going: 503s, then a non-zero exit; restarted, every message it
/// acknowledged becomes a turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_exits_non_zero_when_its_driver_dies_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("daemon.log");
    let handler = TestHandler::start(Duration::ZERO).await;
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let mut env = binary_env(ports, &data, Some(&handler.url));
    env.push(("TURNSTILE_BATCHING_DEBOUNCE_MS", "200".into()));
    let mut faulty = env.clone();
    faulty.push((turnstile::config::TEST_FAULTS_ENV, "kill-driver-after-ms=1500".into()));
    let mut child = Spawned(spawn_binary(&faulty, &log));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    wait_ready(&client, &admin).await;

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let (mut refused, mut i) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        assert!(Instant::now() < deadline, "the daemon did not exit after its driver died");
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        let body = json!({"id": format!("d{i}"), "from": "79001234567", "message": format!("m{i}")});
        let sent = post_batched(&client, &base, &body).await;
        match sent.map(|r| r.status().as_u16()) {
            Ok(200) => acked.lock().unwrap().push(format!("d{i}")),
            Ok(503) => refused += 1,
            _ => {}
        }
        i += 1;
        sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "exit status {status}");
    let _ = refused; // 503s or refused connections: the exit can be that quick
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the driver task ended unexpectedly"), "{text}");

    let _restarted = Spawned(spawn_binary(&env, &log));
    wait_ready(&client, &admin).await;
    let acked = acked.lock().unwrap().clone();
    let committed = || async {
        let (_, v) = status_json(client.get(format!("{admin}/api/conversations/79001234567"))).await;
        ids_in_turns(v["turns"].as_array().unwrap())
    };
    let start = Instant::now();
    loop {
        let got = committed().await;
        if acked.iter().all(|id| got.contains(id)) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "acknowledged messages lost: {acked:?} vs {got:?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_store_stops_acknowledging_and_exits_then_a_restart_recovers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let handler = TestHandler::start(Duration::ZERO).await;
    let (d, faults) = Daemon::start_with_faults(config_with(dir.path(), &handler)).await;
    assert_eq!(d.send("f1", "79001234567", "Привет").await.0, 200);
    // sled's next sync fails: the store cannot know what reached the disk.
    // The turn's commit is followed by a sync, which fails; from then on
    // nothing is taken (a 503, or a refused connection once the daemon has
    // gone). How many of the messages sent meanwhile get in depends on when
    // the batch's cut falls against the sends; every one acknowledged must
    // come back.
    faults.fail_next_tree_sync();
    let mut acknowledged = vec!["f1".to_owned()];
    let mut acknowledged_until = 0;
    for n in 2..400 {
        let body = json!({"id": format!("f{n}"), "from": "79001234567", "message": "ещё"});
        let sent = d
            .client
            .post(d.url("/webhook/whatsapp/batched"))
            .bearer_auth(WEBHOOK_TOKEN)
            .json(&body)
            .send()
            .await;
        if !sent.is_ok_and(|r| r.status() == 200) {
            break;
        }
        acknowledged.push(format!("f{n}"));
        acknowledged_until = n;
        sleep(S).await;
    }
    assert!(acknowledged_until < 399, "the failed store kept acknowledging");
    let exited = tokio::time::timeout(60 * S, d.exited()).await.expect("the daemon exits");
    assert!(exited.expect_err("a failed store is an error exit").to_string().contains("store failed"));

    let d = Daemon::start(config_with(dir.path(), &handler)).await;
    assert_eq!(d.send("g1", "79001234567", "снова").await.0, 200);
    wait_until("the recovered turns", 60 * S, || {
        handler.calls().iter().any(|c| c.ids.contains(&"g1".to_owned()))
    })
    .await;
    let history = d.get("/api/conversations/79001234567").await.1;
    let ids: Vec<String> = history["turns"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(ids.first().map(String::as_str), Some("f1"));
    assert_eq!(ids.last().map(String::as_str), Some("g1"));
    for id in &acknowledged {
        assert!(ids.contains(id), "{id} was acknowledged and is lost: {ids:?}");
    }
    let mut sorted = ids.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "a message in two turns: {ids:?}");
    d.stop().await;
}
