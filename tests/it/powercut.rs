//! The power cut: what a host that loses power keeps is what reached the
//! block device, not the page cache. The real binary runs with its data on a
//! loop-mounted ext4 image under mixed load — webhooks, turns committing
//! through the recording handler, context PUTs — and the image is copied at
//! random moments right after answers. Each copy is mounted (its journal
//! replayed, as a reboot would) and the store opened on it: every message
//! answered `accepted` or `duplicate` must be pending or in a committed (or
//! dead) turn, every context write answered 200 must be there.
//!
//! At least 20 cuts (`TURNSTILE_POWERCUT_CUTS` for more); needs root and a
//! loop device, and says so loudly where it cannot run (in CI it must).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use turnstile::message::Urgency;

use serde_json::{json, Value};
use tokio::time::{sleep, Instant};
use turnstile::message::{Conv, NewMessage};
use turnstile::store::{Inserted, Store};

use crate::helpers::*;
use crate::loopfs::{loop_fs_or_skip, LoopFs};

const PHONES: usize = 40;

/// What the clients have been told, per phone.
#[derive(Default, Clone)]
struct Told {
    /// Message ids answered 200.
    acked: Vec<String>,
    /// The last context cache answered 200, and one sent but not answered yet.
    cache: Option<Value>,
    cache_in_flight: Option<Value>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_a_power_cut() {
    let cuts: usize =
        std::env::var("TURNSTILE_POWERCUT_CUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = loop_fs_or_skip(dir.path(), 128, "the power-cut test") else { return };
    let handler = TestHandler::start(Duration::from_millis(5)).await;
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let mut env = binary_env(ports, &fs.mount.join("data"), Some(&handler.url));
    env.extend([
        ("TURNSTILE_BATCHING_DEBOUNCE_MS", "150".into()),
        ("TURNSTILE_BATCHING_MAX_WAIT_MS", "600".into()),
        // The whole history stays, so every committed message can be found.
        ("TURNSTILE_TURNS_HISTORY_LIMIT", "10000".into()),
        ("TURNSTILE_TURNS_HISTORY_MAX_BYTES", "1000000000".into()),
        // Dedup marks move into the archive every second, so cuts land
        // around those moves too.
        ("TURNSTILE_STORE_ARCHIVE_EVERY_S", "1".into()),
    ]);
    let daemon = Spawned(spawn_binary(&env, &dir.path().join("daemon.log")));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    wait_ready(&client, &admin).await;

    let told: Arc<Mutex<HashMap<String, Told>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for p in 0..PHONES {
        let (client, base, admin, told, stop) =
            (client.clone(), base.clone(), admin.clone(), told.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let phone = format!("7904{p:07}");
            let mut rng = Rng(0x5151_7a7a ^ (p as u64 + 1));
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if i % 7 == 3 {
                    // The booking side replaces the cached snapshot.
                    let cache = json!({"version": i, "phone": phone});
                    told.lock().unwrap().entry(phone.clone()).or_default().cache_in_flight =
                        Some(cache.clone());
                    let url = format!("{admin}/api/contexts/default/{phone}");
                    let put = client.put(url).json(&json!({"cache": cache})).send().await;
                    let mut t = told.lock().unwrap();
                    let t = t.entry(phone.clone()).or_default();
                    if put.is_ok_and(|r| r.status() == 200) {
                        t.cache = Some(cache);
                    }
                    t.cache_in_flight = None;
                } else {
                    let id = format!("{phone}-{i}");
                    let body = json!({"id": id, "from": phone, "message": format!("m{i}")});
                    let sent = post_batched(&client, &base, &body).await;
                    if sent.is_ok_and(|r| r.status() == 200) {
                        told.lock().unwrap().entry(phone.clone()).or_default().acked.push(id);
                    }
                }
                i += 1;
                sleep(Duration::from_millis(5 + rng.below(60))).await;
            }
        }));
    }

    // Online rewrites of the store's files back to back, so that cuts land
    // before, during and after their switches.
    let rewriter = tokio::spawn({
        let (client, admin, stop) = (client.clone(), admin.clone(), stop.clone());
        async move {
            let mut done = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Refused while the daemon is stopped for a cut: tried again.
                let sent = client.post(format!("{admin}/api/store/rewrite")).send().await;
                if sent.is_ok_and(|r| r.status() == 200) {
                    done += 1;
                }
                sleep(Duration::from_millis(20)).await;
            }
            done
        }
    });

    // The cuts: at random moments, copy the image with the daemon stopped
    // (nothing can be answered meanwhile), and note what had been answered.
    let mut rng = Rng(0xc0ff_ee00);
    let mut taken = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 0..cuts {
        assert!(Instant::now() < deadline, "cuts took too long");
        sleep(Duration::from_millis(50 + rng.below(250))).await;
        let copy = dir.path().join(format!("cut-{n}.img"));
        let fs_ref = &fs;
        let snapshot = tokio::task::block_in_place(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            // Stop, then read what was answered: every answer read so far was
            // sent before the stop, so after its sync.
            fs_ref.cut_with(&daemon.0, &copy, || {
                let _ = tx.send(told.lock().unwrap().clone());
            });
            rx.recv().unwrap()
        });
        taken.push((copy, snapshot));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let rewrites = rewriter.await.unwrap();
    assert!(rewrites > 0, "no online rewrite of the store's files ran during the cuts");
    drop(daemon);
    let acked: usize = told.lock().unwrap().values().map(|t| t.acked.len()).sum();
    assert!(acked > 200 && handler.calls().len() > 50, "too little load: {acked} acked");

    // Each copy, as the next boot would find it.
    let (mut checked_messages, mut archived) = (0, 0);
    for (n, (copy, snapshot)) in taken.iter().enumerate() {
        let mnt = dir.path().join(format!("cut-{n}"));
        let mounted = LoopFs::attach(copy, &mnt).unwrap_or_else(|e| panic!("cut {n} does not mount: {e}"));
        let store = Store::open(&mnt.join("data"))
            .unwrap_or_else(|e| panic!("cut {n}: the store does not open: {e}"));
        let recovered = store.take_recovered().unwrap();
        let sizes = tokio::task::block_in_place(|| store.tree_sizes()).unwrap();
        archived = sizes.iter().find(|t| t.tree == "dedup_archive").map_or(0, |t| t.records);
        // Still to answer: pending, in an open turn, or dead.
        let mut open: HashSet<String> = recovered.pending.iter().map(|m| m.id.clone()).collect();
        open.extend(recovered.open_turns.iter().flat_map(|t| t.messages.iter().map(|m| m.id.clone())));
        open.extend(store.turns().unwrap().iter().flat_map(|t| t.messages.iter().map(|m| m.id.clone())));
        let mut kept = open.clone();
        for (phone, t) in snapshot {
            for h in store.history(phone).unwrap() {
                // A committed turn's messages are retired for good: one of
                // them to answer again would be a second reply.
                let twice: Vec<&String> =
                    h.messages.iter().map(|m| &m.id).filter(|id| open.contains(*id)).collect();
                assert!(twice.is_empty(), "cut {n}: answered and yet to answer again: {twice:?}");
                kept.extend(h.messages.iter().map(|m| m.id.clone()));
            }
            let missing: Vec<&String> = t.acked.iter().filter(|id| !kept.contains(*id)).collect();
            assert!(missing.is_empty(), "cut {n}: acknowledged messages missing: {missing:?}");
            checked_messages += t.acked.len();
            // And each is still known: a redelivery is a duplicate, whether
            // its mark is in the log, the trees or the archive.
            store.set_sink(Some(Arc::new(|_| true)));
            let again: Vec<NewMessage> = t
                .acked
                .iter()
                .map(|id| NewMessage {
                    id: id.clone(),
                    conv: Conv { phone: phone.clone(), company_id: "default".into() },
                    kind: "text".into(),
                    text: "again".into(),
                    timestamp: None,
                    received_at_ms: 0,
                })
                .collect();
            let forgotten: Vec<&String> = store
                .accept(again, Urgency::Debounced)
                .await
                .unwrap()
                .iter()
                .zip(&t.acked)
                .filter(|(inserted, _)| !matches!(inserted, Inserted::Duplicate))
                .map(|(_, id)| id)
                .collect();
            assert!(forgotten.is_empty(), "cut {n}: acknowledged ids taken for new ones: {forgotten:?}");
            if let Some(expected) = &t.cache {
                let conv = Conv { phone: phone.clone(), company_id: "default".into() };
                let stored = store.context(&conv, turnstile::message::unix_ms()).unwrap();
                let cache: Option<Value> =
                    stored.and_then(|c| c.cache).map(|b| turnstile::context::decode(&b).unwrap());
                let allowed = [Some(expected.clone()), t.cache_in_flight.clone()];
                assert!(
                    allowed.contains(&cache),
                    "cut {n}: {phone}'s acknowledged context write is lost: {cache:?}"
                );
            }
        }
        store.close().await.unwrap();
        drop(mounted);
        let _ = std::fs::remove_file(copy);
    }
    assert!(archived > 0, "no dedup mark had moved into the archive by the last cut");
    eprintln!(
        "power cut: {cuts} cuts, {checked_messages} acknowledged messages checked across them, {} turns run, {rewrites} online rewrites, {archived} dedup marks archived at the last cut",
        handler.calls().len()
    );
}
