//! A data directory and a backup written by an earlier release, kept as
//! fixtures (`tests/fixtures/store/`), open and restore with every record
//! they hold — the promise a new storage engine must keep to the stores
//! already in the field (issue 24). Through the `Store` API alone.
//!
//! `write_recipe` wrote the fixtures with the release they are named for
//! (`TURNSTILE_WRITE_STORE_FIXTURES=1` writes them again, from the code of
//! the day: only ever at a release, before the store's format changes);
//! `holds_the_recipe` says what opening them must find. The recipe is also
//! written and checked fresh on every run, so the check is known to see
//! what today's store keeps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use turnstile::message::Urgency;

use crate::helpers::copy_dir;

use turnstile::message::{Conv, Message, NewMessage};
use turnstile::store::{
    Commit, ContextUpdate, DeadInfo, Delivery, Inserted, OutboxItem, Part, Paused, Receipt, SavedLearning,
    SavedRhythm, StaffMessage, Store, TurnRecord, TurnSummary,
};

/// The recipe's clock: every time it writes is an offset from here
/// (2026-12-02 10:00 UTC), so what it wrote can be read back exactly.
const T0: u64 = 1_796_205_600_000;
const HOUR: u64 = 3_600_000;

/// The release whose store the committed fixtures are.
const RELEASE: &str = "0.1.0";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store").join(RELEASE)
}

fn conv(n: u8) -> Conv {
    let company = if n == 2 { "salon-2" } else { "default" };
    Conv { phone: format!("7905000000{n}"), company_id: company.into() }
}

fn new(n: u8, id: &str, at: u64) -> NewMessage {
    NewMessage {
        id: id.into(),
        conv: conv(n),
        kind: if id.ends_with("-img") { "image" } else { "text" }.into(),
        text: format!("текст {id}"),
        timestamp: Some((T0 / 1000) as i64),
        received_at_ms: T0 + at,
    }
}

fn turn(store: &Store, n: u8, messages: Vec<Message>, at: u64) -> TurnRecord {
    TurnRecord {
        turn_id: store.new_turn_id().unwrap(),
        conv: conv(n),
        messages,
        cut_reason: "quiet".into(),
        cut_at_ms: T0 + at,
        attempts: 1,
        dead: None,
    }
}

/// A part as the context module would hand it over (the store does not
/// look inside); `large` ones are kept apart from small ones by today's store.
fn part(text: &str) -> Part {
    Part::Set { bytes: text.as_bytes().to_vec(), raw_len: text.len() as u64 + 7 }
}

fn large(text: &str) -> String {
    // Not compressible and over a few pages, as a deflated 300 KB context is.
    let mut x: u32 = 0x2545_f491;
    let noise: String = (0..12_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect();
    format!("{text} {noise}")
}

fn update(dialogue: &str, cache: &str) -> ContextUpdate {
    ContextUpdate { dialogue: part(dialogue), cache: part(cache), slide: true, ttl_ms: 12 * HOUR }
}

fn piece(seq: u64, turn: &TurnRecord, text: &str, part: u32, parts: u32, at: u64) -> OutboxItem {
    OutboxItem {
        seq,
        turn_id: turn.turn_id.clone(),
        conv: turn.conv.clone(),
        text: text.into(),
        part,
        parts,
        created_at_ms: T0 + at,
        attempts: 0,
        last_error: None,
        failed: false,
    }
}

fn commit(
    turn: &TurnRecord,
    reply: &str,
    context: ContextUpdate,
    outbox: Vec<OutboxItem>,
    at: u64,
) -> Commit {
    Commit {
        turn: turn.clone(),
        summary: TurnSummary {
            turn_id: turn.turn_id.clone(),
            conv: turn.conv.clone(),
            messages: turn.messages.clone(),
            reply: Some(reply.into()),
            cut_reason: turn.cut_reason.clone(),
            cut_at_ms: turn.cut_at_ms,
            started_at_ms: turn.cut_at_ms + 1,
            committed_at_ms: T0 + at,
            attempts: turn.attempts,
        },
        context,
        outbox,
        history_limit: 50,
        history_max_bytes: 1 << 20,
        now_ms: T0 + at,
    }
}

async fn accept(store: &Store, messages: Vec<NewMessage>) -> Vec<Message> {
    let inserted = store.accept(messages, Urgency::Debounced).await.unwrap();
    inserted
        .into_iter()
        .map(|i| match i {
            Inserted::New(m) => m,
            Inserted::Duplicate => panic!("the recipe writes each id once"),
        })
        .collect()
}

const LID: &str = "204961273819350";
const QUARANTINED: &[u8] = br#"{"event":"messages.edited","data":{"shape":"new"}}"#;

fn rhythms() -> SavedLearning {
    SavedLearning {
        gaps: vec![1.0, 2.5, 4.0],
        resumes: vec![0.5, 1.5],
        convs: vec![SavedRhythm { conv: conv(1), gaps: vec![800, 1_900], resumes: vec![3_000], last_ms: T0 }],
    }
}

/// One of every kind of record the store keeps, in `dir`, closed cleanly.
async fn write_recipe(dir: &Path) {
    let store = Store::open(dir).unwrap();
    store.set_sink(Some(Arc::new(|_| true)));
    // Phone 1: two committed turns. The first's reply went out in two
    // pieces (one sent, one still to send), its ids moved to the archive;
    // the second's reply failed for good, its ids still in the live set.
    let first = accept(&store, vec![new(1, "m1-a", 0), new(1, "m1-b", 800), new(1, "m1-img", 1_900)]).await;
    let t1 = turn(&store, 1, first, 5_000);
    store.claim(&t1).await.unwrap();
    let reply = "Здравствуйте! Записала вас на стрижку.";
    let pieces = vec![
        piece(store.next_seq().unwrap(), &t1, "Здравствуйте!", 1, 2, 20_000),
        piece(store.next_seq().unwrap(), &t1, "Записала вас на стрижку.", 2, 2, 20_000),
    ];
    let ctx = update(&large("диалог после первого хода"), "кэш после первого хода");
    store.commit(commit(&t1, reply, ctx, pieces.clone(), 20_000)).await.unwrap();
    store.sync().await.unwrap();
    store.outbox_sent(pieces[0].seq).await.unwrap();
    store.receipt_sent(Receipt::sent("3EB0A1".into(), &pieces[0], 1, T0 + 40_000)).await.unwrap();
    store.receipt_update("3EB0A1", Delivery::Read, T0 + 45_000, None).await.unwrap();
    assert!(store.archive_dedup().await.unwrap() > 0, "the first turn's ids go to the archive");

    let second = accept(&store, vec![new(1, "m1-c", 60_000)]).await;
    let t2 = turn(&store, 1, second, 62_000);
    store.claim(&t2).await.unwrap();
    let mut failed = piece(store.next_seq().unwrap(), &t2, "Ждём вас завтра в 15:00", 1, 1, 70_000);
    let ctx = update(&large("диалог после второго хода"), "кэш после второго хода");
    store.commit(commit(&t2, "Ждём вас завтра в 15:00", ctx, vec![failed.clone()], 70_000)).await.unwrap();
    store.sync().await.unwrap();
    (failed.attempts, failed.failed, failed.last_error) = (5, true, Some("gateway answered 400".into()));
    store.outbox_update(&failed).await.unwrap();

    // Phone 2 (another company): two messages waiting for their turn.
    accept(&store, vec![new(2, "m2-a", 80_000), new(2, "m2-b", 81_000)]).await;
    // Phone 3: a turn claimed and not committed (a stop during its handler).
    let third = accept(&store, vec![new(3, "m3-a", 82_000), new(3, "m3-b", 83_000)]).await;
    store.claim(&turn(&store, 3, third, 85_000)).await.unwrap();
    // Phone 4: a turn parked dead, its handler failing every attempt.
    let fourth = accept(&store, vec![new(4, "m4-a", 86_000)]).await;
    let mut dead = turn(&store, 4, fourth, 87_000);
    store.claim(&dead).await.unwrap();
    dead.attempts = 5;
    dead.dead = Some(DeadInfo { error: "handler answered 500".into(), died_at_ms: T0 + 90_000 });
    store.park_dead(&dead).await.unwrap();
    // Phone 5: a small context written through the context API.
    store.update_context(&conv(5), update("диалог 5", "кэш 5"), T0 + 91_000).await.unwrap();
    // Phone 6, taken over by staff, seen behind a LID.
    store.link_lid("default", LID, &conv(6).phone).await.unwrap();
    let paused = Paused { by: "admin".into(), since_ms: T0 + 92_000, resume_at_ms: Some(T0 + 2 * HOUR) };
    store.pause(&conv(6), paused).await.unwrap();
    let staff = StaffMessage {
        id: "staff-1".into(),
        text: "Сейчас уточню".into(),
        at_ms: T0 + 93_000,
        by: "waha".into(),
    };
    store.staff_message(&conv(6), staff).await.unwrap();
    // A delivery no parser took, and what the adaptive policy learned.
    store.quarantine("evolution", "unknown event", QUARANTINED, T0 + 94_000, 100).await.unwrap().unwrap();
    store.save_rhythms(&rhythms()).unwrap();
    store.close().await.unwrap();
}

/// Where the store being checked came from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// A data directory, a backup of today, or a compacted directory: everything.
    Whole,
    /// A backup written by release 0.1.0, which left out the LID links, the
    /// receipts, the held deliveries and the learned rhythms.
    Backup010,
}

fn ids(messages: &[Message]) -> Vec<&str> {
    messages.iter().map(|m| m.id.as_str()).collect()
}

fn text(part: Option<Vec<u8>>) -> String {
    String::from_utf8(part.expect("the part is there")).unwrap()
}

/// Opens `dir` and finds in it every record `write_recipe` wrote.
async fn holds_the_recipe(dir: &Path, source: Source) {
    let store = Store::open(dir).unwrap();
    store.set_sink(Some(Arc::new(|_| true)));
    let recovered = store.take_recovered().unwrap();
    assert_eq!(ids(&recovered.pending), ["m2-a", "m2-b"], "waiting messages, in order");
    let m = &recovered.pending[1];
    assert_eq!((m.conv.clone(), m.text.as_str(), m.received_at_ms), (conv(2), "текст m2-b", T0 + 81_000));
    assert_eq!(m.timestamp, Some((T0 / 1000) as i64));
    assert_eq!(recovered.open_turns.len(), 1, "the claimed turn re-runs");
    let open = &recovered.open_turns[0];
    assert_eq!((open.conv.clone(), ids(&open.messages)), (conv(3), vec!["m3-a", "m3-b"]));
    assert_eq!(recovered.dead_turns, 1);

    let history = store.history(&conv(1).phone).unwrap();
    let turns: Vec<(Vec<&str>, Option<&str>)> =
        history.iter().map(|h| (ids(&h.messages), h.reply.as_deref())).collect();
    assert_eq!(
        turns,
        [
            (vec!["m1-a", "m1-b", "m1-img"], Some("Здравствуйте! Записала вас на стрижку.")),
            (vec!["m1-c"], Some("Ждём вас завтра в 15:00")),
        ]
    );
    assert_eq!(history[0].messages[2].kind, "image");
    assert_eq!((history[1].committed_at_ms, history[1].cut_reason.as_str()), (T0 + 70_000, "quiet"));

    let now = T0 + 100_000;
    let c1 = store.context(&conv(1), now).unwrap().expect("phone 1's context");
    assert_eq!(text(c1.dialogue), large("диалог после второго хода"), "the large part, whole");
    assert_eq!(text(c1.cache), "кэш после второго хода");
    assert_eq!(c1.meta.expires_at_ms, T0 + 70_000 + 12 * HOUR);
    let c5 = store.context(&conv(5), now).unwrap().expect("phone 5's context");
    assert_eq!((text(c5.dialogue), text(c5.cache)), ("диалог 5".into(), "кэш 5".into()));
    assert!(store.context(&conv(5), T0 + 91_000 + 12 * HOUR).unwrap().is_none(), "and it expires");

    let outbox = store.outbox();
    let outbox: Vec<(&str, u32, bool, Option<&str>)> =
        outbox.iter().map(|i| (i.text.as_str(), i.attempts, i.failed, i.last_error.as_deref())).collect();
    assert_eq!(
        outbox,
        [
            ("Записала вас на стрижку.", 0, false, None),
            ("Ждём вас завтра в 15:00", 5, true, Some("gateway answered 400"))
        ],
        "the unsent piece, and the given-up one"
    );
    let dead: Vec<TurnRecord> = store.turns().unwrap().into_iter().filter(|t| t.dead.is_some()).collect();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].conv.clone(), ids(&dead[0].messages), dead[0].attempts), (conv(4), vec!["m4-a"], 5));
    assert_eq!(dead[0].dead.as_ref().unwrap().error, "handler answered 500");

    let takeover = store.takeover(&conv(6));
    assert_eq!(
        takeover.paused.map(|p| p.resume_at_ms),
        Some(Some(T0 + 2 * HOUR)),
        "still paused, same resume"
    );
    assert_eq!(takeover.staff.iter().map(|s| s.text.as_str()).collect::<Vec<_>>(), ["Сейчас уточню"]);

    match source {
        Source::Whole => {
            assert_eq!(store.lid_phone("default", LID), Some(conv(6).phone));
            let read = store.receipts_of(&history[0].turn_id);
            assert_eq!(read.iter().map(|r| (r.part, r.state)).collect::<Vec<_>>(), [(1, Delivery::Read)]);
            let held = store.quarantined().await.unwrap();
            assert_eq!(held.len(), 1);
            assert_eq!((held[0].gateway.as_str(), held[0].body.as_slice()), ("evolution", QUARANTINED));
            assert_eq!(store.rhythms(), rhythms());
        }
        Source::Backup010 => {}
    }

    // Ids already answered or waiting are duplicates — the archived, the
    // live and the pending ones; new ids, turn ids and sequence numbers
    // never reuse an old one.
    for id in ["m1-a", "m1-c", "m2-a", "m3-b", "m4-a"] {
        let n = id.as_bytes()[1] - b'0';
        let again = store.accept(vec![new(n, id, 200_000)], Urgency::Debounced).await.unwrap();
        assert!(matches!(again[..], [Inserted::Duplicate]), "{id} is remembered: {again:?}");
    }
    let fresh = store.accept(vec![new(2, "m2-new", 200_000)], Urgency::Debounced).await.unwrap();
    assert!(matches!(fresh[..], [Inserted::New(_)]), "{fresh:?}");
    let old_turns =
        history.iter().map(|h| h.turn_id.clone()).chain([open.turn_id.clone(), dead[0].turn_id.clone()]);
    let new_turn = store.new_turn_id().unwrap();
    assert!(old_turns.clone().all(|t| t < new_turn), "{new_turn} after every recorded turn");
    let old_seqs = recovered.pending.iter().chain(&open.messages).map(|m| m.seq);
    let next_seq = store.next_seq().unwrap();
    assert!(old_seqs.chain(store.outbox().iter().map(|i| i.seq)).all(|s| s < next_seq));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todays_store_holds_the_recipe_in_its_data_directory_its_backup_and_after_a_compact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_recipe(&data).await;
    let backup = tmp.path().join("store.backup");
    turnstile::backup::backup_offline(&data, &backup).await.unwrap();
    if std::env::var_os("TURNSTILE_WRITE_STORE_FIXTURES").is_some() {
        let out = fixtures();
        let _ = std::fs::remove_dir_all(&out);
        copy_dir(&data, &out.join("data"));
        std::fs::copy(&backup, out.join("store.backup")).unwrap();
    }
    let restored = tmp.path().join("restored");
    turnstile::backup::restore(&backup, &restored, false).unwrap();
    let compacted = tmp.path().join("compacted");
    copy_dir(&data, &compacted);
    turnstile::backup::compact(&compacted).await.unwrap();
    holds_the_recipe(&data, Source::Whole).await;
    holds_the_recipe(&restored, Source::Whole).await;
    holds_the_recipe(&compacted, Source::Whole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_written_by_the_last_release_opens_with_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("data"), &tmp.path().join("data"));
    holds_the_recipe(&tmp.path().join("data"), Source::Whole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_written_by_the_last_release_restores_with_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let restored = tmp.path().join("restored");
    turnstile::backup::restore(&fixtures().join("store.backup"), &restored, false).unwrap();
    holds_the_recipe(&restored, Source::Backup010).await;
}
