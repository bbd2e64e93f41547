//! The chaos run: a mixed load (debounced and immediate webhooks, context
//! writes) while the real binary is SIGKILLed and restarted at random, its
//! disk fills up for a second or two now and then (its data on a small
//! loop-mounted ext4: real write errors; a daemon that exits over them is
//! restarted, as systemd would), and the AI service fails or hangs for a
//! share of calls. Afterwards: no
//! acknowledged message lost, none in two committed turns, no two turns of
//! one phone overlapping, and every dead turn listed and retryable.
//!
//! The short run is part of `cargo test`; the long one:
//!     TURNSTILE_CHAOS_SECONDS=600 cargo test --release --test it chaos -- --nocapture
//! Loopback only; bounded in time.

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_keeps_every_invariant() {
    let seconds: u64 =
        std::env::var("TURNSTILE_CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let phones: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("daemon.log");
    // Store errors need a file system that can fill up: a loop mount (root).
    let fs = crate::loopfs::loop_fs_or_skip(dir.path(), 128, "chaos's store-error faults");
    let data = fs.as_ref().map_or_else(|| dir.path().join("data"), |fs| fs.mount.join("data"));
    let handler = TestHandler::start(Duration::from_millis(5)).await;
    handler.set_chaos(Some(Chaos {
        seed: 0x5eed,
        fail: 0.15,
        hang: 0.05,
        hang_for: Duration::from_millis(1500),
    }));
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let mut env = binary_env(ports, &data, Some(&handler.url));
    env.extend([
        ("TURNSTILE_HANDLER_TIMEOUT_MS", "500".into()),
        ("TURNSTILE_HANDLER_MAX_ATTEMPTS", "3".into()),
        ("TURNSTILE_HANDLER_BACKOFF_MS", "30".into()),
        ("TURNSTILE_BATCHING_DEBOUNCE_MS", "300".into()),
        ("TURNSTILE_BATCHING_MAX_WAIT_MS", "1200".into()),
        ("TURNSTILE_TURNS_HISTORY_LIMIT", "1000".into()),
        ("TURNSTILE_TURNS_HISTORY_MAX_BYTES", "1000000000".into()),
        ("TURNSTILE_TURNS_SHUTDOWN_GRACE_MS", "1000".into()),
    ]);
    let daemon: Arc<Mutex<Child>> = Arc::new(Mutex::new(spawn_binary(&env, &log)));
    let until = Instant::now() + Duration::from_secs(seconds);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();

    // Senders: each phone sends in order until time is up, each message
    // retried until answered 200; one in five skips the debounce, and now and
    // then the booking side writes or invalidates the phone's context.
    let acked: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let mut senders = Vec::new();
    for p in 0..phones {
        let (client, base, admin, acked) = (client.clone(), base.clone(), admin.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            let phone = format!("7902{p:07}");
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (p as u64 + 1));
            let mut i = 0;
            while Instant::now() < until {
                let id = format!("{phone}-{i}");
                let path = if rng.below(5) == 0 { "/webhook/whatsapp" } else { "/webhook/whatsapp/batched" };
                let body = json!({"id": id, "from": phone, "message": format!("m{i}")});
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    assert!(Instant::now() < deadline, "{id} never acknowledged");
                    let sent = client.post(format!("{base}{path}")).bearer_auth(WEBHOOK_TOKEN).json(&body);
                    if let Ok(r) = sent.send().await {
                        if r.status() == 200 {
                            acked.lock().unwrap().entry(phone.clone()).or_default().push(id.clone());
                            break;
                        }
                    }
                    sleep(Duration::from_millis(50)).await;
                }
                if rng.below(10) == 0 {
                    let ctx = format!("{admin}/api/contexts/default/{phone}");
                    let _ = if rng.below(2) == 0 {
                        client.post(format!("{ctx}/invalidate")).send().await
                    } else {
                        client.put(&ctx).json(&json!({"dialogue": {"count": 1000}})).send().await
                    };
                }
                i += 1;
                sleep(Duration::from_millis(50 + rng.below(700))).await;
            }
        }));
    }

    // SIGKILL and restart at random while the load runs; one round in three
    // fills the disk instead. A daemon that exited by itself is restarted.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut kills, mut disk_fulls, mut exits) = (0, 0, 0);
    while Instant::now() < until {
        sleep(Duration::from_millis(400 + rng.below(1600))).await;
        exits += restart_if_exited(&daemon, &env, &log);
        match &fs {
            Some(fs) if rng.below(3) == 0 => {
                let filler = fs.mount.join("filler");
                tokio::task::block_in_place(|| crate::disk_full::fill(&filler));
                sleep(Duration::from_millis(1000 + rng.below(1000))).await;
                std::fs::remove_file(&filler).unwrap();
                disk_fulls += 1;
            }
            _ => {
                let mut child = daemon.lock().unwrap();
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                *child = spawn_binary(&env, &log);
            }
        }
    }
    for s in senders {
        if s.await.is_err() {
            panic!("a sender failed; the daemon's log, newest first:\n{}", log_tail(&log, 60));
        }
    }
    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.values().map(Vec::len).sum();

    // Calm down: no more chaos; wait until every message is committed or dead,
    // then retry every dead turn through the API.
    handler.set_chaos(None);
    let committed = |client: reqwest::Client, admin: String, phones: Vec<String>| async move {
        let mut all = HashMap::new();
        for phone in phones {
            if let Ok(r) = client.get(format!("{admin}/api/conversations/{phone}")).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    all.insert(phone, v["turns"].as_array().cloned().unwrap_or_default());
                }
            }
        }
        all
    };
    let dead = |client: reqwest::Client, admin: String| async move {
        match client.get(format!("{admin}/api/dead")).send().await {
            Ok(r) => {
                r.json::<Value>().await.ok().and_then(|v| v["dead"].as_array().cloned()).unwrap_or_default()
            }
            Err(_) => Vec::new(),
        }
    };
    let phone_list: Vec<String> = acked.keys().cloned().collect();
    let settle = Instant::now() + Duration::from_secs(90);
    let mut retried = HashSet::new();
    let final_turns = loop {
        exits += restart_if_exited(&daemon, &env, &log);
        let turns = committed(client.clone(), admin.clone(), phone_list.clone()).await;
        let in_turns: usize = turns.values().flatten().map(|t| t["messages"].as_array().unwrap().len()).sum();
        let dead_now = dead(client.clone(), admin.clone()).await;
        if Instant::now() >= settle {
            let phones_short: Vec<String> = acked
                .iter()
                .filter(|(phone, sent)| {
                    let got: usize = turns
                        .get(*phone)
                        .map_or(0, |ts| ts.iter().map(|t| t["messages"].as_array().unwrap().len()).sum());
                    got < sent.len()
                })
                .map(|(phone, _)| phone.clone())
                .collect();
            let stats = client.get(format!("{admin}/api/batches")).send().await;
            let stats = match stats {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => format!("no batches: {e}"),
            };
            panic!(
                "the pipeline never settled: {in_turns} of {total} messages in committed turns, {} dead now \
                 ({} retried); phones short: {phones_short:?}\npending batches: {stats}\nthe daemon's log, newest first:\n{}",
                dead_now.len(),
                retried.len(),
                log_tail(&log, 80)
            );
        }
        for d in &dead_now {
            let id = d["turn_id"].as_str().unwrap().to_owned();
            assert!(!d["messages"].as_array().unwrap().is_empty(), "a dead turn keeps its messages");
            if retried.insert(id.clone()) {
                let r = client.post(format!("{admin}/api/dead/{id}/retry")).send().await.unwrap();
                assert_eq!(r.status(), 202, "dead turn {id} is retryable");
            }
        }
        if in_turns >= total && dead_now.is_empty() {
            break turns;
        }
        sleep(Duration::from_millis(300)).await;
    };

    // 1. Every acknowledged message in exactly one committed turn, in order.
    let mut turn_ids = HashSet::new();
    for (phone, sent) in &acked {
        let turns = &final_turns[phone];
        let ids: Vec<String> = turns
            .iter()
            .flat_map(|t| {
                t["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned())
            })
            .collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| id.rsplit('-').next().unwrap().parse::<u64>().unwrap());
        assert_eq!(sorted, *sent, "{phone}: every acknowledged message exactly once");
        for t in turns {
            assert!(turn_ids.insert(t["turn_id"].as_str().unwrap().to_owned()), "a turn committed twice");
        }
        // 2. Committed turns of a phone never overlapped (daemon's clock, ms).
        let mut spans: Vec<(u64, u64)> = turns
            .iter()
            .map(|t| (t["started_at"].as_u64().unwrap(), t["committed_at"].as_u64().unwrap()))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{phone}: turns overlapped: {w:?}");
        }
    }
    // 3. The AI service's view: of the calls the daemon got answers to, no two
    //    turns of one phone overlapped, and a turn id always meant the same messages.
    let calls = handler.calls();
    let mut by_turn: HashMap<&str, &Vec<String>> = HashMap::new();
    for c in &calls {
        assert_eq!(
            *by_turn.entry(&c.turn_id).or_insert(&c.ids),
            &c.ids,
            "turn {} changed its messages",
            c.turn_id
        );
    }
    let mut per_phone: HashMap<&str, Vec<&Call>> = HashMap::new();
    for c in calls.iter().filter(|c| c.answered) {
        per_phone.entry(&c.phone).or_default().push(c);
    }
    for (phone, mut cs) in per_phone {
        cs.sort_by_key(|c| c.started);
        for w in cs.windows(2) {
            if w[0].turn_id != w[1].turn_id {
                assert!(
                    w[0].ended.unwrap() <= w[1].started,
                    "{phone}: {} and {} overlapped",
                    w[0].turn_id,
                    w[1].turn_id
                );
            }
        }
    }
    let mut child = Arc::into_inner(daemon).unwrap().into_inner().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!(
        "chaos: {seconds} s, {kills} SIGKILLs, {disk_fulls} full disks ({exits} exits over them), {total} messages, {} turns, {} handler calls, {} dead turns retried",
        turn_ids.len(),
        calls.len(),
        retried.len()
    );
}

/// What systemd's Restart=on-failure does: a daemon that exited is started
/// again. Returns 1 if it had exited.
fn restart_if_exited(daemon: &Mutex<Child>, env: &[(&str, String)], log: &std::path::Path) -> usize {
    let mut child = daemon.lock().unwrap();
    match child.try_wait().unwrap() {
        Some(_) => {
            *child = spawn_binary(env, log);
            1
        }
        None => 0,
    }
}
