//! The disk fills up, for real: the data directory is on a small
//! loop-mounted ext4, and a filler file takes all its free space for 10 s.
//! Webhooks are refused meanwhile (never a 200 that is lost) and `/readyz`
//! says why. Should sled fail too, the daemon exits with an error and the
//! test restarts it the way the unit's `Restart=on-failure` would; a daemon
//! that starts while the disk is full waits in place. Once the space is
//! back, webhooks are accepted again within 15 s with no manual action, and
//! every acknowledged message is in exactly one committed turn, in the order
//! its phone sent it. And a rewrite of the store's files on a disk without
//! room for the copy is abandoned without harm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::helpers::*;
use crate::loopfs::loop_fs_or_skip;

const PHONES: usize = 20;

/// Writes to `path` until the file system has no space left (4 KiB at the end).
pub fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    for chunk in [1 << 20, 4096] {
        let zeros = vec![0u8; chunk];
        loop {
            match f.write(&zeros) {
                Ok(n) if n == chunk => continue,
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
    }
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_refused_then_healed_without_an_operator_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = loop_fs_or_skip(dir.path(), 64, "the disk-full test") else { return };
    let handler = TestHandler::start(Duration::from_millis(5)).await;
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let mut env = binary_env(ports, &fs.mount.join("data"), Some(&handler.url));
    env.extend([
        ("TURNSTILE_BATCHING_DEBOUNCE_MS", "200".into()),
        ("TURNSTILE_BATCHING_MAX_WAIT_MS", "800".into()),
        ("TURNSTILE_TURNS_HISTORY_LIMIT", "1000".into()),
        ("TURNSTILE_TURNS_HISTORY_MAX_BYTES", "1000000000".into()),
        ("TURNSTILE_TURNS_SHUTDOWN_GRACE_MS", "1000".into()),
    ]);
    let log = dir.path().join("daemon.log");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();

    // "systemd": restart the daemon 1 s after it exits, whatever the reason.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let exits: Arc<Mutex<Vec<String>>> = Arc::default();
    let supervisor = {
        let (env, log, done, exits) = (env.clone(), log.clone(), done.clone(), exits.clone());
        tokio::spawn(async move {
            let mut child = Spawned(spawn_binary(&env, &log));
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(status) = child.0.try_wait().unwrap() {
                    exits.lock().unwrap().push(status.to_string());
                    sleep(Duration::from_secs(1)).await;
                    child = Spawned(spawn_binary(&env, &log));
                }
                sleep(Duration::from_millis(50)).await;
            }
            child
        })
    };
    wait_ready(&client, &admin).await;

    // Senders: each phone in order, each message retried until answered 200.
    let acked: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let last_ok: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stop_sending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for p in 0..PHONES {
        let (client, base, acked, last_ok, stop) =
            (client.clone(), base.clone(), acked.clone(), last_ok.clone(), stop_sending.clone());
        senders.push(tokio::spawn(async move {
            let phone = format!("7905{p:07}");
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("{phone}-{i}");
                let body = json!({"id": id, "from": phone, "message": format!("m{i}")});
                loop {
                    let sent = post_batched(&client, &base, &body).await;
                    if sent.is_ok_and(|r| r.status() == 200) {
                        acked.lock().unwrap().entry(phone.clone()).or_default().push(id.clone());
                        *last_ok.lock().unwrap() = Some(Instant::now());
                        break;
                    }
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    sleep(Duration::from_millis(100)).await;
                }
                i += 1;
                sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    sleep(Duration::from_secs(3)).await;
    let acked_before = acked.lock().unwrap().values().map(Vec::len).sum::<usize>();
    // Fill the disk: every free block to one file, written until ENOSPC.
    let filler = fs.mount.join("filler");
    tokio::task::block_in_place(|| fill(&filler));
    let full_at = Instant::now();
    let mut saw_unready = false;
    while full_at.elapsed() < Duration::from_secs(10) {
        if let Ok(r) = client.get(format!("{admin}/readyz")).send().await {
            saw_unready |= r.status() == 503;
        }
        sleep(Duration::from_millis(200)).await;
    }
    std::fs::remove_file(&filler).unwrap();
    let freed_at = Instant::now();

    // Back within 15 s, with nobody touching it.
    loop {
        let ok = last_ok.lock().unwrap().is_some_and(|t| t > freed_at);
        if ok {
            break;
        }
        assert!(
            freed_at.elapsed() < Duration::from_secs(15),
            "webhooks not accepted 15 s after space came back"
        );
        sleep(Duration::from_millis(100)).await;
    }
    let healed_in = freed_at.elapsed();
    sleep(Duration::from_secs(2)).await;
    stop_sending.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }

    // Every acknowledged message, once, in order, in a committed turn.
    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.values().map(Vec::len).sum();
    let phones: Vec<String> = acked.keys().cloned().collect();
    let drain_until = Instant::now() + Duration::from_secs(60);
    let committed = loop {
        let turns = committed_turns(&client, &admin, &phones).await;
        let n: usize = turns.values().map(|t| ids_in_turns(t).len()).sum();
        if n >= total {
            break turns;
        }
        assert!(Instant::now() < drain_until, "{n} of {total} acknowledged messages committed");
        sleep(Duration::from_millis(200)).await;
    };
    for (phone, sent) in &acked {
        assert_eq!(
            &ids_in_turns(&committed[phone]),
            sent,
            "{phone}: not every acknowledged message once, in order"
        );
    }
    assert_eq!(handler.max_in_flight().0, 1, "two turns of one phone overlapped");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(supervisor.await.unwrap());
    let exits = exits.lock().unwrap().clone();
    assert!(saw_unready, "the full disk was never visible on /readyz");
    eprintln!(
        "disk full: {acked_before} acknowledged before, {total} in all; exits {exits:?}; accepting again {:.1} s after space came back",
        healed_in.as_secs_f64()
    );
}

/// A rewrite of the store's files needs room for a copy. On a disk without
/// it the rewrite is abandoned — its half-written copy deleted, the old
/// files still in use, webhooks still accepted — and once there is room
/// again the next one goes through with every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_without_room_is_abandoned_and_the_store_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = loop_fs_or_skip(dir.path(), 64, "the rewrite-on-a-full-disk test") else { return };
    let handler = TestHandler::start(Duration::from_millis(1)).await;
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let data = fs.mount.join("data");
    let mut env = binary_env(ports, &data, Some(&handler.url));
    env.push(("TURNSTILE_BATCHING_DEBOUNCE_MS", "100".into()));
    env.push(("TURNSTILE_TURNS_HISTORY_LIMIT", "1000".into()));
    env.push(("TURNSTILE_TURNS_HISTORY_MAX_BYTES", "1000000000".into()));
    let _daemon = Spawned(spawn_binary(&env, &dir.path().join("daemon.log")));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    wait_ready(&client, &admin).await;

    // A few MB of contexts (of 1,500 phones, hard to compress), and
    // messages of 20 phones committed into turns.
    let phones: Vec<String> = (0..20).map(|p| format!("7900300{p:04}")).collect();
    let mut rng = Rng(7);
    for i in 0..1500u64 {
        let noise: String = (0..300).map(|_| format!("{:x}", rng.below(1 << 40))).collect();
        let url = format!("{admin}/api/contexts/default/7900400{i:04}");
        let cache = json!({"n": i, "staff": noise});
        assert_eq!(client.put(url).json(&json!({"cache": cache})).send().await.unwrap().status(), 200);
    }
    for (i, phone) in phones.iter().cycle().take(600).enumerate() {
        let body = json!({"id": format!("m{i}"), "from": phone, "message": format!("text {i}")});
        assert_eq!(post_batched(&client, &base, &body).await.unwrap().status(), 200);
    }
    wait_until("every message committed", Duration::from_secs(30), || {
        handler.calls().iter().flat_map(|c| c.ids.clone()).collect::<std::collections::HashSet<_>>().len()
            >= 600
    })
    .await;

    // All the room but 1 MiB taken: not enough for a copy of the store.
    let ballast = fs.mount.join("ballast");
    fill(&ballast);
    let full = std::fs::metadata(&ballast).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&ballast).unwrap().set_len(full - (1 << 20)).unwrap();
    let r = client.post(format!("{admin}/api/store/rewrite")).send().await.unwrap();
    let (status, answer) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
    assert_eq!(status, 500, "a rewrite without room: {answer}");
    assert!(answer["error"].as_str().unwrap().contains("abandoned"), "{answer}");
    let leftovers: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("trees"))
        .collect();
    assert!(leftovers.is_empty(), "the abandoned copy was left behind: {leftovers:?}");
    // The store goes on, on its old files.
    let (status, ready) = status_json(client.get(format!("{admin}/readyz"))).await;
    assert_eq!(status, 200, "{ready}");
    let body = json!({"id": "after", "from": phones[0], "message": "after"});
    assert_eq!(post_batched(&client, &base, &body).await.unwrap().status(), 200);

    // Room again: the next rewrite goes through and keeps every record.
    std::fs::remove_file(&ballast).unwrap();
    let r = client.post(format!("{admin}/api/store/rewrite")).send().await.unwrap();
    let (status, answer) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["generation"], 1);
    wait_until("the last message committed", Duration::from_secs(10), || {
        handler.calls().iter().any(|c| c.ids.iter().any(|id| id == "after"))
    })
    .await;
    let turns = committed_turns(&client, &admin, &phones).await;
    let committed: usize = turns.values().map(|t| ids_in_turns(t).len()).sum();
    assert_eq!(committed, 601, "every message in a committed turn");
    for i in [0u64, 777, 1499] {
        let url = format!("{admin}/api/contexts/default/7900400{i:04}");
        let (_, ctx) = status_json(client.get(url)).await;
        assert_eq!(ctx["cache"]["n"], json!(i), "context {i}");
    }
}
