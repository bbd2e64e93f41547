//! The durability claim, tested the hard way: the real binary is SIGKILLed at
//! random moments while 200 phones send 2,000 messages, and restarted on the
//! same data dir each time. Afterwards every acknowledged message must be in
//! exactly one committed turn, in order, and no phone may ever have had two
//! turns at the AI service at once. Loopback only; bounded in count and time.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::helpers::*;

const PHONES: usize = 200;
const PER_PHONE: usize = 10;
const MIN_KILLS: usize = 5;

fn spawn_daemon(dir: &Path, ports: Ports, handler_url: &str, log: &Path) -> Child {
    let mut env = binary_env(ports, dir, Some(handler_url));
    env.extend([
        ("TURNSTILE_HANDLER_BACKOFF_MS", "50".into()),
        ("TURNSTILE_HANDLER_MAX_ATTEMPTS", "1000".into()),
        ("TURNSTILE_BATCHING_DEBOUNCE_MS", "400".into()),
        ("TURNSTILE_BATCHING_MAX_WAIT_MS", "1500".into()),
        ("TURNSTILE_TURNS_HISTORY_LIMIT", "100".into()),
        ("TURNSTILE_TURNS_HISTORY_MAX_BYTES", "1000000000".into()),
    ]);
    spawn_binary(&env, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_repeated_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("daemon.log");
    let handler = TestHandler::start(Duration::from_millis(5)).await;
    let ports = Ports::free();
    let base = ports.base();
    let daemon = Arc::new(Mutex::new(spawn_daemon(&data, ports, &handler.url, &log)));
    let deadline = Instant::now() + Duration::from_secs(120);

    // Senders: each phone sends its messages in order, retrying each until
    // it is answered 200 ("accepted", or "duplicate" when an earlier attempt
    // was stored but its answer was lost in a kill).
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut senders = Vec::new();
    for p in 0..PHONES {
        let (client, base, acked) = (client.clone(), base.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            let phone = format!("7901{p:07}");
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (p as u64 + 1));
            for i in 0..PER_PHONE {
                let id = format!("{phone}-{i}");
                let body = json!({"id": id, "from": format!("{phone}@c.us"), "message": format!("msg {i}")});
                loop {
                    assert!(Instant::now() < deadline, "{id} was never acknowledged");
                    let sent = post_batched(&client, &base, &body).await;
                    if let Ok(r) = sent {
                        if r.status() == 200 {
                            acked.lock().unwrap().push((phone.clone(), id.clone()));
                            break;
                        }
                    }
                    sleep(Duration::from_millis(50)).await;
                }
                // Gaps around the debounce: some messages merge, some do not.
                sleep(Duration::from_millis(100 + rng.below(1000))).await;
            }
        }));
    }

    // The killer: SIGKILL at random moments, restart on the same data dir.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut kills, mut kills_while_sending) = (0, 0);
    while kills < MIN_KILLS || senders.iter().any(|s| !s.is_finished()) {
        assert!(Instant::now() < deadline, "the crash run took too long");
        sleep(Duration::from_millis(300 + rng.below(600))).await;
        if senders.iter().any(|s| !s.is_finished()) {
            kills_while_sending += 1;
        }
        let mut child = daemon.lock().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        *child = spawn_daemon(&data, ports, &handler.url, &log);
    }
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), PHONES * PER_PHONE);
    assert!(kills_while_sending >= MIN_KILLS, "only {kills_while_sending} kills landed while sending");

    // Let the last daemon drain, then read what it committed.
    let mut committed: HashMap<String, Vec<Value>> = HashMap::new();
    let mut in_turns = 0;
    let drained = async {
        loop {
            committed.clear();
            for p in 0..PHONES {
                let phone = format!("7901{p:07}");
                if let Ok(r) =
                    client.get(format!("{}/api/conversations/{phone}", ports.admin_base())).send().await
                {
                    if let Ok(v) = r.json::<Value>().await {
                        committed.insert(phone, v["turns"].as_array().cloned().unwrap_or_default());
                    }
                }
            }
            let n: usize =
                committed.values().flatten().map(|t| t["messages"].as_array().unwrap().len()).sum();
            in_turns = n;
            if n >= acked.len() {
                break;
            }
            sleep(Duration::from_millis(200)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), drained).await.is_err() {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: String = tail.lines().rev().take(40).collect::<Vec<_>>().join("\n");
        panic!(
            "{in_turns} of {} acknowledged messages were committed; daemon log (last lines, newest first):\n{tail}",
            acked.len()
        );
    }

    // Stop the last daemon gracefully: SIGTERM, exit code 0.
    let mut child = Arc::into_inner(daemon).unwrap().into_inner().unwrap();
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "graceful stop exit status: {status}");

    // 1. Every acknowledged message is in exactly one committed turn, and a
    //    phone's turns hold its messages in the order they were sent.
    let mut seen = HashSet::new();
    for p in 0..PHONES {
        let phone = format!("7901{p:07}");
        let turns = &committed[&phone];
        let ids: Vec<String> = turns
            .iter()
            .flat_map(|t| {
                t["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned())
            })
            .collect();
        let sent: Vec<String> = (0..PER_PHONE).map(|i| format!("{phone}-{i}")).collect();
        assert_eq!(ids, sent, "{phone}: committed turns do not hold its messages exactly once, in order");
        for t in turns {
            assert!(seen.insert(t["turn_id"].as_str().unwrap().to_owned()), "turn committed twice");
        }
    }

    // 2. The AI service's view: a turn id always carries the same messages
    //    (re-runs after a crash), and no message went out under two turn ids.
    let calls = handler.calls();
    let mut by_turn: HashMap<&str, &Vec<String>> = HashMap::new();
    let mut turn_of: HashMap<&str, &str> = HashMap::new();
    for c in &calls {
        let ids = by_turn.entry(&c.turn_id).or_insert(&c.ids);
        assert_eq!(*ids, &c.ids, "turn {} re-ran with other messages", c.turn_id);
        for id in &c.ids {
            let t = turn_of.entry(id).or_insert(&c.turn_id);
            assert_eq!(*t, c.turn_id, "message {id} was sent under two turn ids");
        }
    }
    assert!(seen.iter().all(|t| by_turn.contains_key(t.as_str())));

    // 3. No two calls of one phone overlapped, and every call of a phone's
    //    k-th turn saw the context its k earlier turns saved.
    let mut per_phone: HashMap<&str, Vec<&Call>> = HashMap::new();
    for c in &calls {
        per_phone.entry(&c.phone).or_default().push(c);
    }
    for (phone, mut cs) in per_phone {
        cs.sort_by_key(|c| c.started);
        for w in cs.windows(2) {
            assert!(
                w[0].ended.unwrap() <= w[1].started,
                "{phone}: turns {} and {} overlapped",
                w[0].turn_id,
                w[1].turn_id
            );
        }
        let mut order: Vec<&str> = Vec::new();
        for c in &cs {
            if !order.contains(&c.turn_id.as_str()) {
                order.push(&c.turn_id);
            }
            let k = order.iter().position(|t| *t == c.turn_id).unwrap() as u64;
            assert_eq!(c.seen_count, k, "{phone}: turn {} saw a stale context", c.turn_id);
        }
    }
    assert_eq!(handler.max_in_flight().0, 1);
    eprintln!("crash test: {kills} SIGKILLs ({kills_while_sending} while sending), {} messages, {} turns, {} handler calls", acked.len(), seen.len(), calls.len());
}
