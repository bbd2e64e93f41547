//! The store's own suite: what the rest of the daemon relies on, checked
//! against the store API alone, so another engine would have to pass it too.

use crate::message::Urgency;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex as StdMutex;

use super::*;
use crate::message::unix_ms;

fn conv(phone: &str) -> Conv {
    Conv { phone: phone.into(), company_id: "c1".into() }
}

fn new_message(id: &str, phone: &str, text: &str) -> NewMessage {
    NewMessage {
        id: id.into(),
        conv: conv(phone),
        kind: "text".into(),
        text: text.into(),
        timestamp: None,
        received_at_ms: unix_ms(),
    }
}

/// A store with a sink that records what the writer announced.
fn open(dir: &Path) -> (Store, Arc<StdMutex<Vec<Announce>>>) {
    let store = Store::open(dir).unwrap();
    let heard: Arc<StdMutex<Vec<Announce>>> = Arc::default();
    let h = heard.clone();
    store.set_sink(Some(Arc::new(move |a| {
        h.lock().unwrap().extend(a);
        true
    })));
    (store, heard)
}

async fn insert(store: &Store, id: &str, phone: &str) -> Message {
    match store.accept(vec![new_message(id, phone, id)], Urgency::Debounced).await.unwrap().pop().unwrap() {
        Inserted::New(m) => m,
        Inserted::Duplicate => panic!("{id} was a duplicate"),
    }
}

async fn again(store: &Store, id: &str, phone: &str) -> Inserted {
    store.accept(vec![new_message(id, phone, "again")], Urgency::Debounced).await.unwrap().pop().unwrap()
}

fn turn_of(store: &Store, messages: Vec<Message>) -> TurnRecord {
    TurnRecord {
        turn_id: store.new_turn_id().unwrap(),
        conv: messages[0].conv.clone(),
        messages,
        cut_reason: "quiet".into(),
        cut_at_ms: unix_ms(),
        attempts: 0,
        dead: None,
    }
}

const HOUR: u64 = 3_600_000;

/// A tree's (records, bytes) in a count of `tree_sizes`.
fn size(sizes: &[super::TreeSize], tree: &str) -> (u64, u64) {
    sizes.iter().find(|t| t.tree == tree).map(|t| (t.records, t.bytes)).unwrap_or((0, 0))
}

fn keep() -> ContextUpdate {
    ContextUpdate { dialogue: Part::Keep, cache: Part::Keep, slide: true, ttl_ms: HOUR }
}

fn set(dialogue: &[u8], cache: Option<&[u8]>) -> ContextUpdate {
    ContextUpdate {
        dialogue: Part::Set { bytes: dialogue.to_vec(), raw_len: 10 * dialogue.len() as u64 },
        cache: match cache {
            Some(c) => Part::Set { bytes: c.to_vec(), raw_len: 10 * c.len() as u64 },
            None => Part::Keep,
        },
        slide: true,
        ttl_ms: 12 * HOUR,
    }
}

fn commit_of(
    turn: &TurnRecord,
    context: ContextUpdate,
    outbox: Vec<OutboxItem>,
    limit: usize,
    now_ms: u64,
) -> Commit {
    let summary = TurnSummary {
        turn_id: turn.turn_id.clone(),
        conv: turn.conv.clone(),
        messages: turn.messages.clone(),
        reply: Some("ok".into()),
        cut_reason: turn.cut_reason.clone(),
        cut_at_ms: turn.cut_at_ms,
        started_at_ms: turn.cut_at_ms,
        committed_at_ms: unix_ms(),
        attempts: 1,
    };
    Commit {
        turn: turn.clone(),
        summary,
        context,
        outbox,
        history_limit: limit,
        history_max_bytes: 1 << 20,
        now_ms,
    }
}

fn ids(messages: &[Message]) -> Vec<&str> {
    messages.iter().map(|m| m.id.as_str()).collect()
}

#[tokio::test]
async fn messages_are_deduplicated_announced_and_kept_in_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, heard) = open(dir.path());
    let a1 = insert(&store, "a1", "700000001").await;
    insert(&store, "b1", "700000002").await;
    let a2 = insert(&store, "a2", "700000001").await;
    assert_eq!(again(&store, "a1", "700000001").await, Inserted::Duplicate);
    // An id is global: the same id from another phone is still a duplicate.
    assert_eq!(again(&store, "a1", "700000009").await, Inserted::Duplicate);
    // A duplicate inside one delivery (one group) is a duplicate too.
    let twice = store.accept(
        vec![new_message("c1", "7000003", "x"), new_message("c1", "7000003", "x")],
        Urgency::Immediate,
    );
    let twice = twice.await.unwrap();
    assert!(matches!(twice[..], [Inserted::New(_), Inserted::Duplicate]));
    assert_eq!(ids(&store.pending()), ["a1", "b1", "a2", "c1"]);
    let got = store.messages(&conv("700000001"), &[a2.seq, a1.seq]);
    assert_eq!(got.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["a1", "a2"]);
    // Every new message was announced, once, before its answer; the flag passed through.
    let heard = heard.lock().unwrap().clone();
    assert_eq!(
        heard.iter().map(|a| a.seq).collect::<Vec<_>>(),
        store.pending().iter().map(|m| m.seq).collect::<Vec<_>>()
    );
    assert_eq!(
        heard.iter().map(|a| a.urgency == Urgency::Immediate).collect::<Vec<_>>(),
        [false, false, false, true]
    );
}

#[tokio::test]
async fn without_a_listener_nothing_is_accepted_and_nothing_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let refused = store.accept(vec![new_message("x1", "700000001", "x")], Urgency::Debounced).await;
    assert!(matches!(refused, Err(StoreError::NotAccepting(_))), "{refused:?}");
    assert!(store.pending().is_empty());
    store.set_sink(Some(Arc::new(|_| true)));
    assert!(matches!(again(&store, "x1", "700000001").await, Inserted::New(_)), "x1 was not marked seen");
}

#[tokio::test]
async fn state_survives_reopening_with_claims_pending_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let turn_id = {
        let (store, _) = open(dir.path());
        let m = insert(&store, "m1", "700000001").await;
        insert(&store, "m2", "700000001").await;
        let mut turn = turn_of(&store, vec![m]);
        store.claim(&turn).await.unwrap();
        turn.attempts = 3;
        store.note_attempts(&turn);
        store.close().await.unwrap();
        turn.turn_id
    };
    let (store, _) = open(dir.path());
    let recovered = store.take_recovered().unwrap();
    assert_eq!(recovered.open_turns.len(), 1);
    let open = &recovered.open_turns[0];
    assert_eq!(
        (open.turn_id.as_str(), ids(&open.messages), open.attempts),
        (turn_id.as_str(), vec!["m1"], 3)
    );
    assert_eq!(ids(&recovered.pending), ["m2"], "a claimed message is not pending");
    assert_eq!(store.turn(&turn_id).unwrap().unwrap().messages[0].id, "m1");
    assert_eq!(again(&store, "m1", "700000001").await, Inserted::Duplicate);
    let next = store.new_turn_id().unwrap();
    assert!(next > turn_id, "turn ids are never reused: {next} after {turn_id}");
}

#[tokio::test]
async fn a_commit_retires_the_turn_and_its_messages_and_saves_history_and_context() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let m1 = insert(&store, "m1", "700000001").await;
    let m2 = insert(&store, "m2", "700000001").await;
    let later = insert(&store, "m3", "700000001").await;
    let turn = turn_of(&store, vec![m1, m2]);
    store.claim(&turn).await.unwrap();
    store.commit(commit_of(&turn, set(b"ctx-1", None), vec![], 10, 0)).await.unwrap();

    assert_eq!(store.pending(), vec![later.clone()], "only the turn's messages stop being pending");
    assert!(store.turn(&turn.turn_id).unwrap().is_none());
    assert_eq!(store.context(&turn.conv, 0).unwrap().unwrap().dialogue.as_deref(), Some(&b"ctx-1"[..]));
    assert_eq!(store.history("700000001").unwrap()[0].turn_id, turn.turn_id);
    // A retired id stays a duplicate, also after a restart.
    assert_eq!(again(&store, "m1", "700000001").await, Inserted::Duplicate);
    store.close().await.unwrap();
    let (store, _) = open(dir.path());
    let recovered = store.take_recovered().unwrap();
    assert!(recovered.open_turns.is_empty());
    assert_eq!(recovered.pending, vec![later]);
    assert_eq!(again(&store, "m2", "700000001").await, Inserted::Duplicate);

    // A commit without a context keeps the stored one.
    let m = insert(&store, "m4", "700000001").await;
    let t2 = turn_of(&store, vec![m]);
    store.commit(commit_of(&t2, keep(), vec![], 10, 1)).await.unwrap();
    assert_eq!(store.context(&turn.conv, 1).unwrap().unwrap().dialogue.as_deref(), Some(&b"ctx-1"[..]));
}

#[tokio::test]
async fn history_is_trimmed_to_its_limit_per_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let mut turn_ids = Vec::new();
    for i in 0..5 {
        let m = insert(&store, &format!("h{i}"), "700000001").await;
        let t = turn_of(&store, vec![m]);
        store.commit(commit_of(&t, keep(), vec![], 3, 0)).await.unwrap();
        turn_ids.push(t.turn_id);
    }
    let other = insert(&store, "o1", "700000002").await;
    let t = turn_of(&store, vec![other]);
    store.commit(commit_of(&t, keep(), vec![], 3, 0)).await.unwrap();
    let kept: Vec<String> = store.history("700000001").unwrap().into_iter().map(|t| t.turn_id).collect();
    assert_eq!(kept, turn_ids[2..]);
    assert_eq!(store.history("700000002").unwrap().len(), 1);
    // A phone that is a prefix of another does not see its history.
    assert!(store.history("70000000").unwrap().is_empty());
}

#[tokio::test]
async fn a_dead_turn_keeps_its_messages_out_of_the_pending_ones_and_can_be_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let m = insert(&store, "d1", "700000001").await;
    let mut turn = turn_of(&store, vec![m]);
    store.claim(&turn).await.unwrap();
    turn.dead = Some(DeadInfo { error: "502".into(), died_at_ms: 1 });
    store.park_dead(&turn).await.unwrap();
    assert!(store.pending().is_empty());
    let stored = store.turn(&turn.turn_id).unwrap().unwrap();
    assert_eq!((stored.messages[0].id.as_str(), stored.dead.unwrap().error.as_str()), ("d1", "502"));
    store.close().await.unwrap();

    let (store, _) = open(dir.path());
    let recovered = store.take_recovered().unwrap();
    assert_eq!((recovered.open_turns.len(), recovered.pending.len(), recovered.dead_turns), (0, 0, 1));
    assert_eq!(again(&store, "d1", "700000001").await, Inserted::Duplicate);
    // Re-opened: an open turn again, with its messages, across a restart.
    turn.dead = None;
    store.reopen_dead(&turn).await.unwrap();
    store.close().await.unwrap();
    let (store, _) = open(dir.path());
    let recovered = store.take_recovered().unwrap();
    assert_eq!(recovered.open_turns, vec![turn.clone()]);
    store.commit(commit_of(&turn, keep(), vec![], 10, 0)).await.unwrap();
    assert!(store.turns().unwrap().is_empty());
}

#[tokio::test]
async fn retired_ids_are_forgotten_after_the_window_and_pending_ones_never() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let old = insert(&store, "old", "700000001").await;
    let t = turn_of(&store, vec![old]);
    store.commit(commit_of(&t, keep(), vec![], 10, 0)).await.unwrap();
    insert(&store, "new", "700000001").await;
    store.sync().await.unwrap();
    assert_eq!(store.expire_dedup(0).await.unwrap(), 0, "nothing retired before 0");
    // "old" still sits in a segment that is live (for "new"): forgetting it
    // now would let a restart take it for a new message.
    assert_eq!(store.expire_dedup(unix_ms() + 1).await.unwrap(), 0);
    store.close().await.unwrap();
    let (store, _) = open(dir.path());
    assert_eq!(ids(&store.take_recovered().unwrap().pending), ["new"]);
    let m = store.pending().pop().unwrap();
    let t = turn_of(&store, vec![m]);
    store.commit(commit_of(&t, keep(), vec![], 10, 0)).await.unwrap();
    store.sync().await.unwrap();
    assert_eq!(store.expire_dedup(unix_ms() + 1).await.unwrap(), 2);
    assert!(matches!(again(&store, "new", "700000001").await, Inserted::New(_)));
    assert!(matches!(again(&store, "old", "700000001").await, Inserted::New(_)));
    assert_eq!(store.expire_dedup(unix_ms() + 1).await.unwrap(), 0, "a pending id is never forgotten");
    assert_eq!(again(&store, "old", "700000001").await, Inserted::Duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_marks_are_remembered_across_a_restart_a_backup_and_expire_a_file_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    for i in 0..3 {
        let m = insert(&store, &format!("a{i}"), "700000001").await;
        let t = turn_of(&store, vec![m]);
        store.commit(commit_of(&t, keep(), vec![], 10, 0)).await.unwrap();
    }
    assert_eq!(store.gen().trees.dedup.len(), 3, "a commit writes its mark into sled");
    assert_eq!(store.archive_dedup().await.unwrap(), 3);
    assert_eq!(store.archive_dedup().await.unwrap(), 0, "nothing left to move");
    assert!(store.gen().trees.dedup.is_empty(), "the marks left sled");
    assert_eq!(size(&store.tree_sizes().unwrap(), "dedup_archive"), (3, 48));
    assert_eq!(again(&store, "a1", "700000001").await, Inserted::Duplicate);
    store.close().await.unwrap();

    // A restart reads them back from the files.
    let (store, _) = open(dir.path());
    assert_eq!(again(&store, "a0", "700000001").await, Inserted::Duplicate);
    // An export carries them; an import files them in an archive of its own.
    let exported = tokio::task::block_in_place(|| records(&store));
    let marks: Vec<&Vec<u8>> =
        exported.iter().filter(|((tree, _), _)| tree == "dedup").map(|(_, v)| v).collect();
    assert_eq!(marks.len(), 1, "one chunk, one record");
    assert_eq!(marks[0].len(), 48);
    store.close().await.unwrap();
    let restored = dir.path().join("restored");
    let all = exported.into_iter().map(|((tree, k), v)| Ok::<_, StoreError>((tree, k, v)));
    Store::import_into(&restored, 1 << 20, all).unwrap();
    let (store, _) = open(&restored);
    assert!(store.gen().trees.dedup.is_empty());
    for i in 0..3 {
        assert_eq!(again(&store, &format!("a{i}"), "700000001").await, Inserted::Duplicate, "a{i}");
    }
    // Past the window the whole file goes, and the ids are new again.
    assert_eq!(store.expire_dedup(unix_ms() + 1).await.unwrap(), 1);
    assert_eq!(std::fs::read_dir(restored.join("dedup")).unwrap().count(), 0);
    assert!(matches!(again(&store, "a2", "700000001").await, Inserted::New(_)));
    store.close().await.unwrap();
    let (store, _) = open(&restored);
    assert_eq!(again(&store, "a2", "700000001").await, Inserted::Duplicate, "now pending");
    assert!(matches!(again(&store, "a0", "700000001").await, Inserted::New(_)), "forgotten for good");
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_corrupt_record_is_an_error_for_that_key() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    store.gen().trees.turns.insert("t-bad", &b"\xff\xff\xff"[..]).unwrap();
    match store.turn("t-bad") {
        Err(StoreError::Corrupt { tree: "turns", key, .. }) => assert_eq!(key, "t-bad"),
        other => panic!("expected a corrupt-record error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_damaged_id_floor_or_dedup_record_refuses_to_open_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        store.gen().trees.meta.insert(ID_FLOOR, &b"\x01\x02"[..]).unwrap();
        store.close().await.unwrap();
    }
    match Store::open(dir.path()) {
        Err(StoreError::Corrupt { tree: "meta", key, .. }) => assert_eq!(key, "id_floor"),
        other => panic!("expected the id floor named, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn concurrent_writers_share_log_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let writers: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { insert(&store, &format!("g{i}"), "700000001").await })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(store.pending().len(), 200);
    let syncs = store.stats().log_syncs;
    assert!((1..100).contains(&syncs), "200 writers took {syncs} log syncs");
}

#[tokio::test]
async fn a_failed_log_write_stores_nothing_marks_no_id_and_the_next_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let (store, heard) = open(dir.path());
    insert(&store, "before", "700000001").await;
    store.faults().set_log_writes_failing(true);
    let failed = store.accept(vec![new_message("f1", "700000001", "x")], Urgency::Debounced).await;
    assert!(matches!(failed, Err(StoreError::Write(_))), "{failed:?}");
    assert!(store.failure().is_none(), "an undone write is not a store failure");
    assert_eq!(ids(&store.pending()), ["before"]);
    assert_eq!(heard.lock().unwrap().len(), 1, "nothing announced for the failed write");
    store.faults().set_log_writes_failing(false);
    assert!(matches!(again(&store, "f1", "700000001").await, Inserted::New(_)), "f1 was marked seen");
    store.close().await.unwrap();
    let (store, _) = open(dir.path());
    assert_eq!(ids(&store.take_recovered().unwrap().pending), ["before", "f1"]);
}

#[tokio::test]
async fn a_failed_sync_of_sleds_files_fails_the_store_and_a_reopen_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let m = insert(&store, "s1", "700000001").await;
    store.faults().fail_next_tree_sync();
    let t = turn_of(&store, vec![m]);
    store.commit(commit_of(&t, keep(), vec![], 10, 0)).await.unwrap();
    assert!(matches!(store.sync().await, Err(StoreError::Failed(_))));
    let reason = store.failed().await;
    assert!(reason.contains("syncing sled"), "{reason}");
    assert!(matches!(
        store.accept(vec![new_message("s2", "7000001", "x")], Urgency::Debounced).await,
        Err(StoreError::Failed(_))
    ));
    let _ = store.close().await;
    let (store, _) = open(dir.path());
    assert!(store.failure().is_none());
    insert(&store, "s2", "700000001").await;
}

#[tokio::test]
async fn a_torn_log_tail_is_cut_and_damage_in_a_closed_segment_is_named() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        insert(&store, "t1", "700000001").await;
        insert(&store, "t2", "700000001").await;
        store.close().await.unwrap();
    }
    let log_dir = dir.path().join(log::DIR_NAME);
    let last = *log::segments(&log_dir).unwrap().last().unwrap();
    let path = log::segment_path(&log_dir, last);
    let len = std::fs::metadata(&path).unwrap().len();
    // A crash in the middle of the second record's write.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
    {
        let (store, _) = open(dir.path());
        assert_eq!(
            ids(&store.take_recovered().unwrap().pending),
            ["t1"],
            "the torn record is gone, the rest kept"
        );
        let repairs = store.repairs();
        assert_eq!(repairs.len(), 1, "{repairs:?}");
        assert!(
            repairs[0].contains(&path.display().to_string()) && repairs[0].contains("torn tail"),
            "{repairs:?}"
        );
        insert(&store, "t3", "700000001").await;
        store.close().await.unwrap();
    }
    let (store, _) = open(dir.path());
    assert!(store.repairs().is_empty(), "a clean reopen repairs nothing");
    store.close().await.unwrap();
    // The same damage in a segment that is no longer the newest: corruption.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    match Store::open(dir.path()) {
        Err(StoreError::Corrupt { tree: "log", key, .. }) => assert!(key.contains(".seg@"), "{key}"),
        other => panic!("expected damage named, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn fully_retired_segments_are_deleted_once_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let m = insert(&store, "r1", "700000001").await;
    store.close().await.unwrap();
    let log_dir = dir.path().join(log::DIR_NAME);
    let (store, _) = open(dir.path());
    assert_eq!(log::segments(&log_dir).unwrap().len(), 2, "the old segment holds r1; a new head");
    let t = turn_of(&store, vec![m]);
    store.commit(commit_of(&t, keep(), vec![], 10, 0)).await.unwrap();
    store.sync().await.unwrap();
    assert_eq!(log::segments(&log_dir).unwrap().len(), 1, "r1's segment went once its retirement was synced");
}

#[tokio::test]
async fn a_first_layout_store_is_moved_into_the_log_and_dedup_records() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let (inbox, seen) = (db.open_tree("inbox").unwrap(), db.open_tree("seen").unwrap());
        let m = Message::from_new(5, new_message("p1", "700000001", "pending"));
        inbox.insert(records::seq_key(&m.conv, 5), records::encode(&m)).unwrap();
        seen.insert("p1", &unix_ms().to_be_bytes()[..]).unwrap();
        seen.insert("done1", &unix_ms().to_be_bytes()[..]).unwrap();
        db.open_tree("seen_at").unwrap().insert("x", "y").unwrap();
        db.flush().unwrap();
    }
    let (store, _) = open(dir.path());
    assert_eq!(ids(&store.take_recovered().unwrap().pending), ["p1"]);
    assert_eq!(again(&store, "done1", "700000001").await, Inserted::Duplicate);
    assert_eq!(again(&store, "p1", "700000001").await, Inserted::Duplicate);
    let names = store.gen().db.tree_names();
    assert!(!names.iter().any(|n| n.as_ref() == b"inbox" || n.as_ref() == b"seen"), "old trees dropped");
    store.close().await.unwrap();
    let (store, _) = open(dir.path());
    assert_eq!(ids(&store.take_recovered().unwrap().pending), ["p1"], "moved once");
}

#[tokio::test]
async fn a_context_expires_after_its_ttl_unless_a_turn_touches_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let (idle, busy) = (conv("700000001"), conv("700000002"));
    store.update_context(&idle, set(b"idle", None), 0).await.unwrap();
    store.update_context(&busy, set(b"busy", Some(b"snapshot")), 0).await.unwrap();
    // At 11 h a turn of `busy` returns no new context: it still slides the expiry.
    let m = insert(&store, "t1", "700000002").await;
    let t = turn_of(&store, vec![m]);
    let slide = ContextUpdate { ttl_ms: 12 * HOUR, ..keep() };
    store.commit(commit_of(&t, slide, vec![], 10, 11 * HOUR)).await.unwrap();

    let at_12h = 12 * HOUR;
    assert!(store.context(&idle, at_12h - 1).unwrap().is_some());
    assert!(store.context(&idle, at_12h).unwrap().is_none(), "gone at 12 h, even before the sweep");
    let busy_ctx = store.context(&busy, at_12h).unwrap().unwrap();
    assert_eq!(busy_ctx.dialogue.as_deref(), Some(&b"busy"[..]));
    assert_eq!(busy_ctx.meta.expires_at_ms, 23 * HOUR);

    assert_eq!(store.expire_contexts(at_12h).await.unwrap().removed, 1);
    assert_eq!(store.context_stats().contexts, 1);
    // A Keep on an expired context does not bring it back.
    store.update_context(&busy, keep(), 24 * HOUR).await.unwrap();
    assert!(store.context(&busy, 24 * HOUR).unwrap().is_none());
    assert_eq!(store.expire_contexts(24 * HOUR).await.unwrap().removed, 0, "the Keep already removed it");
    assert_eq!(store.context_stats().contexts, 0);
}

#[tokio::test]
async fn the_sweeper_never_removes_a_context_touched_after_its_index_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let c = conv("700000001");
    store.update_context(&c, ContextUpdate { ttl_ms: HOUR, ..set(b"v1", None) }, 0).await.unwrap();
    store.update_context(&c, ContextUpdate { ttl_ms: HOUR, ..set(b"v2", None) }, HOUR / 2).await.unwrap();
    assert_eq!(store.expire_contexts(HOUR).await.unwrap().removed, 0);
    assert_eq!(store.context(&c, HOUR).unwrap().unwrap().dialogue.as_deref(), Some(&b"v2"[..]));
    assert_eq!(store.expire_contexts(HOUR + HOUR / 2).await.unwrap().removed, 1);
}

#[tokio::test]
async fn invalidate_drops_the_cache_and_keeps_dialogue_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let c = conv("700000001");
    store.update_context(&c, set(b"dialogue", Some(b"cache")), 0).await.unwrap();
    let before = store.context(&c, 1).unwrap().unwrap();
    let invalidate =
        ContextUpdate { dialogue: Part::Keep, cache: Part::Clear, slide: false, ttl_ms: 12 * HOUR };
    let (was, now) = store.update_context(&c, invalidate, 5).await.unwrap();
    assert!(was.unwrap().cache.is_some());
    let after = store.context(&c, 6).unwrap().unwrap();
    assert_eq!(after.dialogue.as_deref(), Some(&b"dialogue"[..]));
    assert_eq!(after.cache, None);
    assert_eq!(now.unwrap().expires_at_ms, before.meta.expires_at_ms, "an invalidation is not a turn");
    let stats = store.context_stats();
    assert_eq!((stats.cache_hits, stats.cache_misses, stats.invalidations), (1, 1, 1));
    assert_eq!((stats.raw_bytes, stats.stored_bytes), (80, 8));
}

#[tokio::test]
async fn context_counters_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        store.update_context(&conv("700000001"), set(b"abc", Some(b"defg")), 0).await.unwrap();
        store.update_context(&conv("700000002"), set(b"x", None), 0).await.unwrap();
        store.close().await.unwrap();
    }
    let (store, _) = open(dir.path());
    let stats = store.context_stats();
    assert_eq!((stats.contexts, stats.stored_bytes, stats.raw_bytes), (2, 8, 80));
    assert_eq!(store.context(&conv("700000001"), 1).unwrap().unwrap().cache.as_deref(), Some(&b"defg"[..]));
}

#[tokio::test]
async fn a_corrupt_context_is_an_error_for_that_conversation_only() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    store.update_context(&conv("700000001"), set(b"fine", None), 0).await.unwrap();
    store.update_context(&conv("700000002"), set(b"fine", None), 0).await.unwrap();
    let key = records::conv_prefix(&conv("700000002"));
    store.gen().trees.ctx_meta.insert(key, &b"\xff\xff\xff\xff"[..]).unwrap();
    assert!(matches!(
        store.context(&conv("700000002"), 1),
        Err(StoreError::Corrupt { tree: "ctx_meta", .. })
    ));
    assert!(store.context(&conv("700000001"), 1).unwrap().is_some());
    // An update that keeps a part cannot know what to keep: an error naming the record.
    let kept = store.update_context(&conv("700000002"), keep(), 2).await;
    assert!(matches!(kept, Err(StoreError::Corrupt { tree: "ctx_meta", .. })), "{kept:?}");
    // Setting both parts repairs it.
    let both = ContextUpdate { cache: Part::Clear, ..set(b"new", None) };
    store.update_context(&conv("700000002"), both, 2).await.unwrap();
    assert!(store.context(&conv("700000002"), 3).unwrap().is_some());
}

#[tokio::test]
async fn a_commit_puts_its_reply_in_the_outbox_sendable_once_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let m = insert(&store, "o1", "700000001").await;
    let turn = turn_of(&store, vec![m]);
    let items: Vec<OutboxItem> = (1..=2)
        .map(|part| OutboxItem {
            seq: store.next_seq().unwrap(),
            turn_id: turn.turn_id.clone(),
            conv: turn.conv.clone(),
            text: format!("part {part}"),
            part,
            parts: 2,
            created_at_ms: 0,
            attempts: 0,
            last_error: None,
            failed: false,
        })
        .collect();
    let ready = store.outbox_ready();
    store.commit(commit_of(&turn, keep(), items.clone(), 10, 0)).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), ready.notified())
        .await
        .expect("told once durable");
    assert_eq!(store.outbox(), items);
    let mut first = items[0].clone();
    first.attempts = 1;
    first.last_error = Some("503".into());
    store.outbox_update(&first).await.unwrap();
    store.outbox_sent(items[1].seq).await.unwrap();
    store.close().await.unwrap();
    let (store, _) = open(dir.path());
    assert_eq!(store.outbox(), vec![first]);
}

#[tokio::test]
async fn an_unfinished_sled_snapshot_does_not_make_the_store_unopenable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(dir.path());
        insert(&store, "u1", "700000001").await;
        store.close().await.unwrap();
    }
    // What a full disk during sled's own snapshot leaves behind.
    std::fs::write(dir.path().join("snap.0000000001637004.generating"), b"").unwrap();
    let (store, _) = open(dir.path());
    assert_eq!(ids(&store.take_recovered().unwrap().pending), ["u1"]);
    assert!(!dir.path().join("snap.0000000001637004.generating").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_is_one_cut_ingest_goes_on_and_commits_wait_for_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let m = insert(&store, "before", "700000001").await;
    let (in_export, wait_in_export) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let exporter = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut first = true;
            store
                .export(|tree, key, _| -> Result<(), StoreError> {
                    if first {
                        first = false;
                        in_export.send(()).unwrap();
                        released.recv().unwrap();
                    }
                    seen.push((tree.to_owned(), key.to_vec()));
                    Ok(())
                })
                .unwrap();
            seen
        })
    };
    wait_in_export.recv().unwrap();
    // Ingest goes on during the export...
    let during =
        tokio::time::timeout(std::time::Duration::from_secs(5), insert(&store, "during", "700000001"));
    let during = during.await.expect("an accept waited for the export");
    // ...while a commit waits for its end.
    let t = turn_of(&store, vec![m]);
    let commit = tokio::spawn({
        let store = store.clone();
        async move { store.commit(commit_of(&t, keep(), vec![], 10, 0)).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!commit.is_finished(), "a commit landed in the middle of an export");
    release.send(()).unwrap();
    let seen = tokio::task::spawn_blocking(move || exporter.join().unwrap()).await.unwrap();
    commit.await.unwrap().unwrap();
    let inbox: Vec<&Vec<u8>> = seen.iter().filter(|(t, _)| t == "inbox").map(|(_, k)| k).collect();
    assert_eq!(inbox.len(), 1, "the export holds the cut: 'before' only");
    assert!(!seen.iter().any(|(t, _)| t == "history"), "nor the commit that came after the cut");
    assert_eq!(ids(&store.pending()), ["during"]);
    let _ = during;
}

#[tokio::test]
async fn tree_sizes_count_live_records_and_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let before = store.tree_sizes().unwrap();
    assert_eq!(size(&before, "ctx_dialogue"), (0, 0));
    let dialogue = vec![7u8; 1000];
    for phone in ["700000001", "700000002", "700000003"] {
        store.update_context(&conv(phone), set(&dialogue, None), 0).await.unwrap();
    }
    let (records, bytes) = size(&store.tree_sizes().unwrap(), "ctx_dialogue");
    assert_eq!(records, 3);
    assert!((3000..3300).contains(&bytes), "three 1000-byte parts and their keys: {bytes}");
    // The metrics' count is reused for a minute: a delete shows in a fresh count only.
    let recent = store.tree_sizes_recent().unwrap();
    store
        .update_context(&conv("700000001"), ContextUpdate { dialogue: Part::Clear, ..keep() }, 0)
        .await
        .unwrap();
    assert_eq!(store.tree_sizes_recent().unwrap(), recent);
    assert_eq!(size(&store.tree_sizes().unwrap(), "ctx_dialogue").0, 2);
}

/// Every record, as an export sees it.
fn records(store: &Store) -> BTreeMap<(String, Vec<u8>), Vec<u8>> {
    let mut all = BTreeMap::new();
    store
        .export(|tree, key, value| -> Result<(), StoreError> {
            all.insert((tree.to_owned(), key.to_vec()), value.to_vec());
            Ok(())
        })
        .unwrap();
    all
}

fn dialogue_of(store: &Store, phone: &str) -> Vec<u8> {
    store.context(&conv(phone), unix_ms()).unwrap().and_then(|c| c.dialogue).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_under_writes_keeps_every_record_and_leaves_the_old_files_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let phone = |i: usize| format!("7{i:08}");
    // 2,000 contexts, the first 100 of them rewritten 20 times over.
    for round in 0..21u8 {
        let mut tasks = tokio::task::JoinSet::new();
        let n = if round == 0 { 2000 } else { 100 };
        for chunk in 0..20 {
            let store = store.clone();
            tasks.spawn(async move {
                for i in (chunk..n).step_by(20) {
                    let body = vec![round; 1000];
                    store.update_context(&conv(&phone(i)), set(&body, None), unix_ms()).await.unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    }
    let m = insert(&store, "m1", &phone(0)).await;
    let t = turn_of(&store, vec![m]);
    store.commit(commit_of(&t, keep(), vec![], 20, unix_ms())).await.unwrap();

    // Writes go on while the rewrite copies: the first 100 contexts are
    // rewritten over and over, each conversation's last write noted. The
    // rewrite is held after its first copy until two rounds of writes have
    // landed, so those must reach the new files by the copies again.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let writes = tokio::spawn({
        let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
        async move {
            let mut last = std::collections::HashMap::new();
            let mut round = 0u32;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                for i in 0..100 {
                    let body = format!("round {round} of {i}").into_bytes();
                    store.update_context(&conv(&phone(i)), set(&body, None), unix_ms()).await.unwrap();
                    last.insert(i, body);
                }
                let m = insert(&store, &format!("w{round}"), &phone(1)).await;
                let t = turn_of(&store, vec![m]);
                store.commit(commit_of(&t, keep(), vec![], 20, unix_ms())).await.unwrap();
                done.store(round, Ordering::SeqCst);
            }
            (round, last)
        }
    });
    let next_dir = generation::dir_of(dir.path(), 1);
    generation::hold::hold(&next_dir);
    let rewrite = tokio::spawn({
        let store = store.clone();
        async move { store.rewrite_now().await }
    });
    while !next_dir.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let started = done.load(Ordering::SeqCst);
    while done.load(Ordering::SeqCst) < started + 2 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(store.stats().rewrites, 0, "the rewrite is held");
    generation::hold::release(&next_dir);
    assert_eq!(rewrite.await.unwrap().unwrap(), 1);
    stop.store(true, Ordering::SeqCst);
    let (rounds, last) = writes.await.unwrap();
    assert_eq!(store.stats().rewrites, 1);

    // Every write is there: the last one of the busy conversations, the
    // churned ones' last round, the history of every committed turn.
    for (i, body) in &last {
        assert_eq!(&dialogue_of(&store, &phone(*i)), body, "conversation {i}");
    }
    for i in [100, 1234, 1999] {
        assert_eq!(dialogue_of(&store, &phone(i)), vec![0u8; 1000], "conversation {i}");
    }
    assert_eq!(store.history(&phone(1)).unwrap().len(), (rounds as usize).min(20));
    assert_eq!(store.context_stats().contexts, 2000);
    let before_close = tokio::task::block_in_place(|| records(&store));

    // The old files are gone; the new generation is all there is. (How much
    // smaller it is depends on sled's page layout: the soak measures it.)
    let data = dir.path();
    assert!(!data.join("db").exists() && !data.join("conf").exists(), "sled's old files were left behind");
    assert_eq!(std::fs::read_to_string(data.join("trees")).unwrap().trim(), "trees.1");
    assert!(generation::file_len(&data.join("trees.1")) > 0);

    store.close().await.unwrap();
    let (store, _) = open(data);
    assert_eq!(
        tokio::task::block_in_place(|| records(&store)),
        before_close,
        "a reopen sees the same records"
    );
    assert_eq!(store.history(&phone(1)).unwrap().len(), (rounds as usize).min(20));
    // And the next rewrite takes over from there.
    assert_eq!(store.rewrite_now().await.unwrap(), 2);
    assert!(!data.join("trees.1").exists());
    assert_eq!(tokio::task::block_in_place(|| records(&store)), before_close);
    store.close().await.unwrap();
}

#[tokio::test]
async fn an_interrupted_rewrite_leaves_nothing_the_next_open_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (store, _) = open(data);
    store.update_context(&conv("700000001"), set(b"kept", None), unix_ms()).await.unwrap();
    assert_eq!(store.rewrite_now().await.unwrap(), 1);
    store.close().await.unwrap();
    // A rewrite that died before its switch: a half-written generation and
    // pointer, and (from an older switch) sled files in the data directory.
    std::fs::create_dir_all(data.join("trees.2")).unwrap();
    std::fs::write(data.join("trees.2/db"), b"half a copy").unwrap();
    std::fs::write(data.join("trees.tmp"), b"trees.2\n").unwrap();
    std::fs::write(data.join("conf"), b"stale").unwrap();
    let (store, _) = open(data);
    assert_eq!(dialogue_of(&store, "700000001"), b"kept");
    for stale in ["trees.2", "trees.tmp", "conf"] {
        assert!(!data.join(stale).exists(), "{stale} was left behind");
    }
    store.close().await.unwrap();
    // A pointer naming a generation that is not there is named, not guessed at.
    std::fs::write(data.join("trees"), b"trees.9\n").unwrap();
    match Store::open(data) {
        Err(StoreError::Corrupt { reason, .. }) => assert!(reason.contains("trees.9"), "{reason}"),
        other => panic!("opened with a pointer to nothing: {:?}", other.err()),
    }
}

#[tokio::test]
async fn a_second_open_of_a_held_directory_is_refused_before_touching_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    assert_eq!(store.rewrite_now().await.unwrap(), 1);
    std::fs::create_dir_all(dir.path().join("trees.5")).unwrap();
    assert!(matches!(Store::open(dir.path()), Err(StoreError::Held { .. })));
    assert!(matches!(Store::probe(dir.path()), Err(StoreError::Held { .. })));
    // Nothing was cleaned up under the running store.
    assert!(dir.path().join("trees.5").exists());
    store.close().await.unwrap();
}

/// The context part files in `dir`.
fn part_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(super::parts::DIR_NAME))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_context_parts_live_in_files_that_go_once_nothing_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (store, _) = open(&data);
    let c = conv("79001112233");
    let big = |tag: u8| vec![tag; super::parts::INLINE_MAX + 1];
    let now = unix_ms();
    store.update_context(&c, set(&big(1), Some(b"small cache")), now).await.unwrap();
    assert_eq!(part_files(&data).len(), 1, "the large dialogue only");
    let read = store.context(&c, now).unwrap().unwrap();
    assert_eq!((read.dialogue.unwrap(), read.cache.unwrap()), (big(1), b"small cache".to_vec()));

    // Replaced: the new file is read, the old one goes once the write is durable.
    store.update_context(&c, set(&big(2), Some(&big(3))), now + 1).await.unwrap();
    store.sync().await.unwrap();
    assert_eq!(part_files(&data).len(), 2, "{:?}", part_files(&data));
    assert_eq!(store.context(&c, now + 1).unwrap().unwrap().dialogue.unwrap(), big(2));
    // Set small again: back into sled, its file goes.
    store.update_context(&c, set(b"small dialogue", None), now + 2).await.unwrap();
    store.sync().await.unwrap();
    assert_eq!(part_files(&data).len(), 1, "the cache's file stays");
    let read = store.context(&c, now + 2).unwrap().unwrap();
    assert_eq!((read.dialogue.unwrap(), read.cache.unwrap()), (b"small dialogue".to_vec(), big(3)));

    // A backup carries the part as a record of its tree; a restore puts it
    // in a file again.
    let exported = tokio::task::block_in_place(|| records(&store));
    assert_eq!(exported.get(&("ctx_cache".to_owned(), super::records::conv_prefix(&c))), Some(&big(3)));
    assert!(!exported.keys().any(|(tree, _)| tree == "ctx_files"), "locations stay in their directory");
    let restored = dir.path().join("restored");
    let all = exported.into_iter().map(|((tree, k), v)| Ok::<_, StoreError>((tree, k, v)));
    Store::import_into(&restored, 1 << 20, all).unwrap();
    assert_eq!(part_files(&restored).len(), 1);
    let (again, _) = open(&restored);
    assert_eq!(again.context(&c, now + 2).unwrap().unwrap().cache.unwrap(), big(3));
    again.close().await.unwrap();

    // Expired and swept: the file goes with it. A file nothing names (a
    // write cut short) goes at the next open.
    let swept = store.expire_contexts(now + 13 * HOUR).await.unwrap();
    assert_eq!(swept.removed, 1);
    store.sync().await.unwrap();
    assert!(part_files(&data).is_empty());
    store.close().await.unwrap();
    std::fs::write(data.join(super::parts::DIR_NAME).join("00000000000000ff.part"), b"TSP1 cut short")
        .unwrap();
    let (store, _) = open(&data);
    assert!(part_files(&data).is_empty(), "{:?}", part_files(&data));
    store.close().await.unwrap();
}
