//! The store's own suite: what the rest of the daemon relies on, checked
//! against the store API alone, so another engine would have to pass it too.

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

fn insert(store: &Store, id: &str, phone: &str) -> Message {
    match store.insert_message(new_message(id, phone, id)).unwrap() {
        Inserted::New(m) => m,
        Inserted::Duplicate => panic!("{id} was a duplicate"),
    }
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

const KEEP: ContextUpdate<'static> =
    ContextUpdate { dialogue: Part::Keep, cache: Part::Keep, slide: true, ttl_ms: HOUR };
const HOUR: u64 = 3_600_000;

fn set<'a>(dialogue: &'a [u8], cache: Option<&'a [u8]>) -> ContextUpdate<'a> {
    ContextUpdate {
        dialogue: Part::Set { bytes: dialogue, raw_len: 10 * dialogue.len() as u64 },
        cache: match cache {
            Some(c) => Part::Set { bytes: c, raw_len: 10 * c.len() as u64 },
            None => Part::Keep,
        },
        slide: true,
        ttl_ms: 12 * HOUR,
    }
}

fn summary_of(turn: &TurnRecord) -> TurnSummary {
    TurnSummary {
        turn_id: turn.turn_id.clone(),
        conv: turn.conv.clone(),
        messages: turn.messages.clone(),
        reply: Some("ok".into()),
        cut_reason: turn.cut_reason.clone(),
        cut_at_ms: turn.cut_at_ms,
        started_at_ms: turn.cut_at_ms,
        committed_at_ms: unix_ms(),
        attempts: 1,
    }
}

#[tokio::test]
async fn messages_are_deduplicated_and_kept_in_arrival_order_per_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a1 = insert(&store, "a1", "700000001");
    insert(&store, "b1", "700000002");
    let a2 = insert(&store, "a2", "700000001");
    assert_eq!(store.insert_message(new_message("a1", "700000001", "again")).unwrap(), Inserted::Duplicate);
    // An id is global: the same id from another phone is still a duplicate.
    assert_eq!(store.insert_message(new_message("a1", "700000009", "x")).unwrap(), Inserted::Duplicate);
    let inbox: Vec<String> = store.inbox().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(inbox, ["a1", "a2", "b1"]);
    let got = store.messages(&conv("700000001"), &[a2.seq, a1.seq]).unwrap();
    assert_eq!(got.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["a1", "a2"]);
}

#[tokio::test]
async fn state_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let turn_id = {
        let store = Store::open(dir.path()).unwrap();
        let m = insert(&store, "m1", "700000001");
        insert(&store, "m2", "700000001");
        let turn = turn_of(&store, vec![m]);
        store.put_turn(&turn).unwrap();
        store.close().await.unwrap();
        turn.turn_id
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.inbox().unwrap().len(), 2);
    assert_eq!(store.turn(&turn_id).unwrap().unwrap().messages[0].id, "m1");
    assert_eq!(store.insert_message(new_message("m1", "700000001", "x")).unwrap(), Inserted::Duplicate);
    let next = store.new_turn_id().unwrap();
    assert!(next > turn_id, "turn ids are never reused: {next} after {turn_id}");
}

#[tokio::test]
async fn a_commit_removes_the_turn_and_its_messages_and_saves_history_and_context() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let m1 = insert(&store, "m1", "700000001");
    let m2 = insert(&store, "m2", "700000001");
    let later = insert(&store, "m3", "700000001");
    let turn = turn_of(&store, vec![m1, m2]);
    store.put_turn(&turn).unwrap();
    store.commit_turn(&turn, &summary_of(&turn), &set(b"ctx-1", None), &[], 10, 0).unwrap();

    assert_eq!(store.inbox().unwrap(), vec![later], "only the turn's messages leave the inbox");
    assert!(store.turn(&turn.turn_id).unwrap().is_none());
    assert_eq!(store.context(&turn.conv, 0).unwrap().unwrap().dialogue.as_deref(), Some(&b"ctx-1"[..]));
    assert_eq!(store.history("700000001").unwrap()[0].turn_id, turn.turn_id);

    // A commit without a context keeps the stored one.
    let m = insert(&store, "m4", "700000001");
    let t2 = turn_of(&store, vec![m]);
    store.commit_turn(&t2, &summary_of(&t2), &KEEP, &[], 10, 1).unwrap();
    assert_eq!(store.context(&turn.conv, 1).unwrap().unwrap().dialogue.as_deref(), Some(&b"ctx-1"[..]));
}

#[tokio::test]
async fn history_is_trimmed_to_its_limit_per_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let m = insert(&store, &format!("h{i}"), "700000001");
        let t = turn_of(&store, vec![m]);
        store.commit_turn(&t, &summary_of(&t), &KEEP, &[], 3, 0).unwrap();
        ids.push(t.turn_id);
    }
    let other = insert(&store, "o1", "700000002");
    let t = turn_of(&store, vec![other]);
    store.commit_turn(&t, &summary_of(&t), &KEEP, &[], 3, 0).unwrap();
    let kept: Vec<String> = store.history("700000001").unwrap().into_iter().map(|t| t.turn_id).collect();
    assert_eq!(kept, ids[2..]);
    assert_eq!(store.history("700000002").unwrap().len(), 1);
    // A phone that is a prefix of another does not see its history.
    assert!(store.history("70000000").unwrap().is_empty());
}

#[tokio::test]
async fn a_dead_turn_keeps_its_messages_out_of_the_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let m = insert(&store, "d1", "700000001");
    let mut turn = turn_of(&store, vec![m]);
    turn.dead = Some(DeadInfo { error: "502".into(), died_at_ms: 1 });
    store.park_dead(&turn).unwrap();
    assert!(store.inbox().unwrap().is_empty());
    let stored = store.turn(&turn.turn_id).unwrap().unwrap();
    assert_eq!(stored.messages[0].id, "d1");
    assert_eq!(stored.dead.unwrap().error, "502");
}

#[tokio::test]
async fn expired_ids_are_forgotten_and_recent_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut old = new_message("old", "700000001", "x");
    old.received_at_ms = 1_000;
    store.insert_message(old).unwrap();
    insert(&store, "new", "700000001");
    assert_eq!(store.expire_seen(2_000).unwrap(), 1);
    assert!(matches!(store.insert_message(new_message("old", "700000001", "x")).unwrap(), Inserted::New(_)));
    assert_eq!(store.insert_message(new_message("new", "700000001", "x")).unwrap(), Inserted::Duplicate);
    // The re-stored "old" has a fresh entry: a sweep at the same cutoff keeps it.
    assert_eq!(store.expire_seen(2_000).unwrap(), 0);
    assert_eq!(store.insert_message(new_message("old", "700000001", "x")).unwrap(), Inserted::Duplicate);
}

#[tokio::test]
async fn a_corrupt_record_is_an_error_for_that_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.turns.insert("t-bad", &b"\xff\xff\xff"[..]).unwrap();
    match store.turn("t-bad") {
        Err(StoreError::Corrupt { tree: "turns", key, .. }) => assert_eq!(key, "t-bad"),
        other => panic!("expected a corrupt-record error, got {other:?}"),
    }
}

#[tokio::test]
async fn concurrent_writers_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let writers: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                insert(&store, &format!("g{i}"), "700000001");
                store.flush().await.unwrap();
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(store.inbox().unwrap().len(), 200);
    let syncs = store.syncs();
    assert!((1..20).contains(&syncs), "200 writers took {syncs} fsyncs");
}

#[tokio::test]
async fn a_context_expires_after_its_ttl_unless_a_turn_touches_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (idle, busy) = (conv("700000001"), conv("700000002"));
    store.update_context(&idle, &set(b"idle", None), 0).unwrap();
    store.update_context(&busy, &set(b"busy", Some(b"snapshot")), 0).unwrap();
    // At 11 h a turn of `busy` returns no new context: it still slides the expiry.
    let m = insert(&store, "t1", "700000002");
    let t = turn_of(&store, vec![m]);
    store
        .commit_turn(&t, &summary_of(&t), &ContextUpdate { ttl_ms: 12 * HOUR, ..KEEP }, &[], 10, 11 * HOUR)
        .unwrap();

    let at_12h = 12 * HOUR;
    assert!(store.context(&idle, at_12h - 1).unwrap().is_some());
    assert!(store.context(&idle, at_12h).unwrap().is_none(), "gone at 12 h, even before the sweep");
    let busy_ctx = store.context(&busy, at_12h).unwrap().unwrap();
    assert_eq!(busy_ctx.dialogue.as_deref(), Some(&b"busy"[..]));
    assert_eq!(busy_ctx.meta.expires_at_ms, 23 * HOUR);

    assert_eq!(store.expire_contexts(at_12h).unwrap(), 1);
    assert_eq!(store.context_stats().contexts, 1);
    // A Keep on an expired context does not bring it back.
    store.update_context(&busy, &KEEP, 24 * HOUR).unwrap();
    assert!(store.context(&busy, 24 * HOUR).unwrap().is_none());
    assert_eq!(store.expire_contexts(24 * HOUR).unwrap(), 0, "the Keep already removed it");
    assert_eq!(store.context_stats().contexts, 0);
}

#[tokio::test]
async fn the_sweeper_never_removes_a_context_touched_after_its_index_entry() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let c = conv("700000001");
    store.update_context(&c, &ContextUpdate { ttl_ms: HOUR, ..set(b"v1", None) }, 0).unwrap();
    store.update_context(&c, &ContextUpdate { ttl_ms: HOUR, ..set(b"v2", None) }, HOUR / 2).unwrap();
    assert_eq!(store.expire_contexts(HOUR).unwrap(), 0);
    assert_eq!(store.context(&c, HOUR).unwrap().unwrap().dialogue.as_deref(), Some(&b"v2"[..]));
    assert_eq!(store.expire_contexts(HOUR + HOUR / 2).unwrap(), 1);
}

#[tokio::test]
async fn invalidate_drops_the_cache_and_keeps_dialogue_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let c = conv("700000001");
    store.update_context(&c, &set(b"dialogue", Some(b"cache")), 0).unwrap();
    let before = store.context(&c, 1).unwrap().unwrap();
    let invalidate =
        ContextUpdate { dialogue: Part::Keep, cache: Part::Clear, slide: false, ttl_ms: 12 * HOUR };
    let (was, now) = store.update_context(&c, &invalidate, 5).unwrap();
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
        let store = Store::open(dir.path()).unwrap();
        store.update_context(&conv("700000001"), &set(b"abc", Some(b"defg")), 0).unwrap();
        store.update_context(&conv("700000002"), &set(b"x", None), 0).unwrap();
        store.close().await.unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let stats = store.context_stats();
    assert_eq!((stats.contexts, stats.stored_bytes, stats.raw_bytes), (2, 8, 80));
    assert_eq!(store.context(&conv("700000001"), 1).unwrap().unwrap().cache.as_deref(), Some(&b"defg"[..]));
}

#[tokio::test]
async fn a_corrupt_context_is_an_error_for_that_conversation_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.update_context(&conv("700000001"), &set(b"fine", None), 0).unwrap();
    store.update_context(&conv("700000002"), &set(b"fine", None), 0).unwrap();
    store.ctx_meta.insert(records::conv_prefix(&conv("700000002")), &b"\xff\xff\xff\xff"[..]).unwrap();
    assert!(matches!(
        store.context(&conv("700000002"), 1),
        Err(StoreError::Corrupt { tree: "ctx_meta", .. })
    ));
    assert!(store.context(&conv("700000001"), 1).unwrap().is_some());
    // A write repairs it.
    store.update_context(&conv("700000002"), &set(b"new", None), 2).unwrap();
    assert!(store.context(&conv("700000002"), 3).unwrap().is_some());
}

#[tokio::test]
async fn a_commit_puts_its_reply_in_the_outbox_in_order_until_sent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let m = insert(&store, "o1", "700000001");
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
    store.commit_turn(&turn, &summary_of(&turn), &KEEP, &items, 10, 0).unwrap();
    assert_eq!(store.outbox().unwrap(), items);
    let mut first = items[0].clone();
    first.attempts = 1;
    first.last_error = Some("503".into());
    store.outbox_update(&first).unwrap();
    store.outbox_sent(items[1].seq).unwrap();
    store.close().await.unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.outbox().unwrap(), vec![first]);
}
