//! Offline backup, verify and restore through the real binary; the online
//! snapshot over HTTP. Every kind of record goes through a round trip.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tokio::time::sleep;
use turnstile::store::Store;

use crate::helpers::*;

const S: Duration = Duration::from_secs(1);
type Records = Vec<(String, Vec<u8>, Vec<u8>)>;

/// Runs `turnstile <args>`; returns (success, stdout + stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_turnstile")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Every record of a stopped store, except the id bookkeeping in `meta`;
/// the dedup marks as one sorted list of hashes (a restore or a compaction
/// files them into chunks of its own: which ids, not which chunk, counts).
async fn records(dir: &Path) -> Records {
    let store = Store::open(dir).unwrap();
    let (mut all, mut marks) = (Vec::new(), Vec::new());
    store
        .export(|tree, k, v| {
            match tree {
                "meta" => {}
                "dedup" => marks.extend(v.chunks(16).map(<[u8]>::to_vec)),
                _ => all.push((tree.to_owned(), k.to_vec(), v.to_vec())),
            }
            Ok::<(), turnstile::store::StoreError>(())
        })
        .unwrap();
    store.close().await.unwrap();
    marks.sort();
    all.push(("dedup".into(), b"marks".to_vec(), marks.concat()));
    all
}

/// A store with every kind of record: pending messages, a committed turn
/// with history and context, a context written over the API, an outbox piece
/// the gateway refused, dedup marks, and a conversation staff took over.
async fn populated(dir: &Path, gateway: &FakeServer) -> turnstile::Config {
    let mut c = config(dir);
    http_gateway(&mut c, gateway);
    gateway.set_status(503);
    let d = Daemon::start(c.clone()).await;
    d.put(
        "/api/contexts/default/79001110001",
        &json!({"dialogue": {"name": "Анна"}, "cache": {"slots": [1, 2]}}),
    )
    .await;
    d.post("/webhook/whatsapp", &json!({"id": "b1", "from": "79001110002", "message": "Привет"})).await;
    d.send("c1", "79001110003", "ещё не отвечено").await;
    let (status, paused) = d.post("/api/conversations/79001110004/pause", &json!({"minutes": 0})).await;
    assert_eq!((status, paused["state"].as_str()), (200, Some("paused")), "{paused}");
    sleep(3 * S).await;
    d.stop().await;
    c
}

#[tokio::test(start_paused = true)]
async fn backup_verify_restore_round_trip_keeps_every_record_and_the_daemon_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = FakeServer::start(|_| json!({"ok": true})).await;
    let data = dir.path().join("data");
    let c = populated(&data, &gateway).await;
    let file = dir.path().join("t.backup");
    let (ok, out) = cli(&["backup", "--data", data.to_str().unwrap(), "--out", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("inbox 1") && out.contains("outbox 1") && out.contains("history 1"), "{out}");
    assert!(out.contains("takeover 1"), "the pause is in the backup: {out}");
    let (ok, out) = cli(&["verify", file.to_str().unwrap()]);
    assert!(ok && out.contains("is intact"), "{out}");

    let restored = dir.path().join("restored");
    let (ok, out) = cli(&["restore", "--from", file.to_str().unwrap(), "--data", restored.to_str().unwrap()]);
    assert!(ok, "{out}");
    let original = records(&data).await;
    assert!(original.len() > 10);
    assert_eq!(records(&restored).await, original, "identical contents");

    // The restored directory is a working store: the pending batch fires,
    // the refused reply goes out, and new ids do not collide with old ones.
    gateway.set_status(200);
    let mut rc = c.clone();
    rc.server.data_dir = restored.clone();
    let d = Daemon::start(rc).await;
    assert_eq!(d.get("/api/contexts/default/79001110001").await.1["cache"], json!({"slots": [1, 2]}));
    let (_, takeovers) = d.get("/api/takeovers").await;
    assert_eq!(takeovers["paused"][0]["phone"], "79001110004", "still paused after the restore: {takeovers}");
    sleep(12 * S).await;
    let (_, conv) = d.get("/api/conversations/79001110003").await;
    assert_eq!(conv["turns"][0]["text"], "ещё не отвечено");
    let old_turn = d.get("/api/conversations/79001110002").await.1["turns"][0]["turn_id"].clone();
    assert_ne!(conv["turns"][0]["turn_id"], old_turn);
    wait_until("both replies", 60 * S, || gateway.delivered("/send").len() == 2).await;
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_damaged_or_truncated_backup_is_caught_and_restore_leaves_the_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = FakeServer::start(|_| json!({"ok": true})).await;
    let data = dir.path().join("data");
    populated(&data, &gateway).await;
    let good = dir.path().join("good.backup");
    assert!(cli(&["backup", "--data", data.to_str().unwrap(), "--out", good.to_str().unwrap()]).0);
    let bytes = std::fs::read(&good).unwrap();

    let flipped = dir.path().join("flipped.backup");
    let mut b = bytes.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&flipped, &b).unwrap();
    let truncated = dir.path().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() * 7 / 10]).unwrap();
    let not_a_backup = dir.path().join("other.backup");
    std::fs::write(&not_a_backup, b"hello").unwrap();

    let before = records(&data).await;
    for bad in [&flipped, &truncated, &not_a_backup] {
        let (ok, out) = cli(&["verify", bad.to_str().unwrap()]);
        assert!(!ok && out.contains("turnstile:"), "{}: {out}", bad.display());
        // Over an existing store, with --force: refused, the store unchanged.
        let (ok, out) =
            cli(&["restore", "--from", bad.to_str().unwrap(), "--data", data.to_str().unwrap(), "--force"]);
        assert!(!ok, "{out}");
        // Into a new directory: nothing is created.
        let fresh = dir.path().join("fresh");
        assert!(!cli(&["restore", "--from", bad.to_str().unwrap(), "--data", fresh.to_str().unwrap()]).0);
        assert!(!fresh.exists());
    }
    assert_eq!(records(&data).await, before, "the target is untouched");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A good file over a non-empty directory needs --force.
    let (ok, out) = cli(&["restore", "--from", good.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert!(!ok && out.contains("--force"), "{out}");
    assert!(
        cli(&["restore", "--from", good.to_str().unwrap(), "--data", data.to_str().unwrap(), "--force"]).0
    );
    assert_eq!(records(&data).await, before);
}

#[tokio::test(start_paused = true)]
async fn offline_commands_refuse_a_data_dir_a_running_daemon_holds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("t.backup");
    let d = Daemon::start(config(&data)).await;
    d.send("m1", "79001234567", "Привет").await;
    let (ok, out) = cli(&["backup", "--data", data.to_str().unwrap(), "--out", file.to_str().unwrap()]);
    assert!(!ok && out.contains("held by a running turnstile"), "{out}");
    assert!(!file.exists());

    // A backup taken online, restored over the held directory: refused.
    let r = d.client.post(d.url("/api/backup")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    std::fs::write(&file, r.bytes().await.unwrap()).unwrap();
    let (ok, out) = cli(&["verify", file.to_str().unwrap()]);
    assert!(ok && out.contains("inbox 1"), "the online snapshot holds the pending message: {out}");
    let (ok, out) =
        cli(&["restore", "--from", file.to_str().unwrap(), "--data", data.to_str().unwrap(), "--force"]);
    assert!(!ok && out.contains("held by a running turnstile"), "{out}");
    d.stop().await;

    // Restored elsewhere, the online snapshot is a working store.
    let elsewhere = dir.path().join("copy");
    assert!(cli(&["restore", "--from", file.to_str().unwrap(), "--data", elsewhere.to_str().unwrap()]).0);
    let d = Daemon::start(config(&elsewhere)).await;
    sleep(11 * S).await;
    let (_, conv) = d.get("/api/conversations/79001234567").await;
    assert_eq!(conv["turns"][0]["reply"], "received: Привет");
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn compact_keeps_every_record_shrinks_the_directory_and_refuses_a_held_one() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = FakeServer::start(|_| json!({"ok": true})).await;
    let data = dir.path().join("data");
    let arg = data.to_str().unwrap();
    let c = populated(&data, &gateway).await;
    // Space the store's engine keeps: one context rewritten many times.
    let d = Daemon::start(c.clone()).await;
    for i in 0..300u64 {
        let noise: String = (0..400).map(|j| format!("{:x}", (i * 7919 + j * 104_729) % 4093)).collect();
        let body = json!({"dialogue": {"turn": i, "notes": noise}});
        assert_eq!(d.put("/api/contexts/default/79001110009", &body).await.0, 200);
    }
    let (ok, out) = cli(&["compact", "--data", arg]);
    assert!(!ok && out.contains("held by a running turnstile"), "{out}");
    d.stop().await;

    let original = records(&data).await;
    let before = turnstile::backup::dir_size(&data);
    let (ok, out) = cli(&["compact", "--data", arg]);
    assert!(ok && out.contains("compacted"), "{out}");
    let after = turnstile::backup::dir_size(&data);
    assert!(after < before, "{before} bytes before, {after} after: {out}");
    assert_eq!(records(&data).await, original, "every record kept");

    // `verify` on a backup of the compacted store finds the same counts.
    let file = dir.path().join("after.backup");
    let (ok, out) = cli(&["backup", "--data", arg, "--out", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, report) = cli(&["verify", file.to_str().unwrap()]);
    assert!(ok && report.contains("is intact"), "{report}");
    assert!(report.contains("ctx_dialogue") && report.contains("history 1"), "{report}");

    // And it is a working store.
    let d = Daemon::start(c).await;
    let (_, ctx) = d.get("/api/contexts/default/79001110009").await;
    assert_eq!(ctx["dialogue"]["turn"], 299);
    d.stop().await;
}
