//! The store's promises through its public API alone, under a power-cut
//! model — the safety net a new storage engine must pass unchanged (issue
//! 24): nothing here names sled, a tree or a file of the store.
//!
//! The model: the store runs in this process on a loop-mounted ext4 image;
//! its background syncs are held (`Faults::set_tree_syncs_held`, a slow
//! disk), so what was applied but not yet made durable sits in the page
//! cache; the image is then copied — what a power cut leaves — and opened as
//! the next boot would. Every call is either answered or blocked on a held
//! sync when the copy is taken, so each case is deterministic. What is
//! promised is what today's store keeps: an answered message or claim is
//! durable; a commit or context write is whole or absent at a cut, and a
//! reply becomes sendable only once its commit is durable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use turnstile::message::Urgency;

use tokio::time::{sleep, Instant};
use turnstile::message::{Conv, Message, NewMessage};
use turnstile::store::{Commit, ContextUpdate, Inserted, OutboxItem, Part, Store, TurnRecord, TurnSummary};

use crate::loopfs::{loop_fs_or_skip, LoopFs};

const HOUR: u64 = 3_600_000;

/// Fields drop in order: the store, then the mount, then the directory.
struct Bench {
    store: Store,
    fs: LoopFs,
    dir: tempfile::TempDir,
    cuts: usize,
}

/// A copy of the image opened as the next boot would find it.
struct Cut {
    store: Store,
    _mounted: LoopFs,
}

impl Bench {
    fn start(test: &str) -> Option<Bench> {
        let dir = tempfile::tempdir().unwrap();
        let fs = loop_fs_or_skip(dir.path(), 64, test)?;
        let store = Store::open(&fs.mount.join("data")).unwrap();
        store.set_sink(Some(Arc::new(|_| true)));
        Some(Bench { store, fs, dir, cuts: 0 })
    }

    /// What a power cut now would leave.
    fn cut(&mut self) -> PathBuf {
        self.cuts += 1;
        let copy = self.dir.path().join(format!("cut-{}.img", self.cuts));
        self.fs.cut_here(&copy);
        copy
    }

    fn open(&self, copy: &Path) -> Cut {
        let mnt = copy.with_extension("mnt");
        let mounted = LoopFs::attach(copy, &mnt).unwrap();
        let store = Store::open(&mnt.join("data")).unwrap();
        store.set_sink(Some(Arc::new(|_| true)));
        Cut { store, _mounted: mounted }
    }

    fn hold_syncs(&self, on: bool) {
        self.store.faults().set_tree_syncs_held(on);
    }
}

fn conv() -> Conv {
    Conv { phone: "79050000002".into(), company_id: "default".into() }
}

fn new(id: &str) -> NewMessage {
    NewMessage {
        id: id.into(),
        conv: conv(),
        kind: "text".into(),
        text: format!("text of {id}"),
        timestamp: None,
        received_at_ms: turnstile::message::unix_ms(),
    }
}

fn ids(messages: &[Message]) -> Vec<&str> {
    messages.iter().map(|m| m.id.as_str()).collect()
}

fn turn_of(store: &Store, messages: Vec<Message>) -> TurnRecord {
    TurnRecord {
        turn_id: store.new_turn_id().unwrap(),
        conv: conv(),
        messages,
        cut_reason: "quiet".into(),
        cut_at_ms: turnstile::message::unix_ms(),
        attempts: 0,
        dead: None,
    }
}

fn part(text: &str) -> Part {
    Part::Set { bytes: text.as_bytes().to_vec(), raw_len: text.len() as u64 }
}

/// `text` made larger than a few pages (a real context is ~300 KB of JSON,
/// tens of KB deflated): the store may keep such a part apart from small ones.
fn large(text: &str) -> String {
    format!("{text} {}", "· ".repeat(6_000))
}

fn set(dialogue: &str, cache: &str) -> ContextUpdate {
    ContextUpdate { dialogue: part(dialogue), cache: part(cache), slide: true, ttl_ms: 12 * HOUR }
}

fn commit_of(store: &Store, turn: &TurnRecord, reply: &str) -> Commit {
    let now = turnstile::message::unix_ms();
    Commit {
        turn: turn.clone(),
        summary: TurnSummary {
            turn_id: turn.turn_id.clone(),
            conv: conv(),
            messages: turn.messages.clone(),
            reply: Some(reply.into()),
            cut_reason: turn.cut_reason.clone(),
            cut_at_ms: turn.cut_at_ms,
            started_at_ms: turn.cut_at_ms,
            committed_at_ms: now,
            attempts: 1,
        },
        context: set(&large("dialogue after the turn"), "cache after the turn"),
        outbox: vec![OutboxItem {
            seq: store.next_seq().unwrap(),
            turn_id: turn.turn_id.clone(),
            conv: conv(),
            text: reply.into(),
            part: 1,
            parts: 1,
            created_at_ms: now,
            attempts: 0,
            last_error: None,
            failed: false,
        }],
        history_limit: 50,
        history_max_bytes: 1 << 20,
        now_ms: now,
    }
}

/// Until `done` holds (an applied write shows in memory), at most 10 s.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

/// The context's two parts as text, as a store holds them now.
fn context_of(store: &Store) -> Option<(String, String)> {
    let c = store.context(&conv(), turnstile::message::unix_ms()).unwrap()?;
    let text = |p: Option<Vec<u8>>| String::from_utf8(p.unwrap_or_default()).unwrap();
    Some((text(c.dialogue), text(c.cache)))
}

async fn redelivered(store: &Store, id: &str) -> bool {
    matches!(store.accept(vec![new(id)], Urgency::Immediate).await.unwrap()[..], [Inserted::Duplicate])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_and_claims_survive_a_cut_while_nothing_else_is_synced() {
    let Some(mut b) = Bench::start("the store API power-cut suite") else { return };
    b.hold_syncs(true);
    let accepted =
        b.store.accept(vec![new("a-1"), new("a-2"), new("a-3")], Urgency::Immediate).await.unwrap();
    assert!(accepted.iter().all(|i| matches!(i, Inserted::New(_))), "{accepted:?}");
    let first_two: Vec<Message> = b.store.pending().into_iter().take(2).collect();
    let turn = turn_of(&b.store, first_two);
    b.store.claim(&turn).await.unwrap();
    let copy = b.cut();
    b.hold_syncs(false);
    b.store.clone().close().await.unwrap();

    let after = b.open(&copy);
    let recovered = after.store.take_recovered().unwrap();
    assert_eq!(ids(&recovered.pending), ["a-3"], "answered 200, so kept, in order");
    assert_eq!(recovered.open_turns.len(), 1);
    assert_eq!(recovered.open_turns[0].turn_id, turn.turn_id, "the claim re-runs under its id");
    assert_eq!(ids(&recovered.open_turns[0].messages), ["a-1", "a-2"]);
    assert!(redelivered(&after.store, "a-1").await, "a redelivery is a duplicate");
    after.store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_before_it_is_durable_re_runs_its_turn_and_after_it_is_answered_for_good() {
    let Some(mut b) = Bench::start("the store API power-cut suite") else { return };
    b.store.accept(vec![new("c-1"), new("c-2")], Urgency::Immediate).await.unwrap();
    let turn = turn_of(&b.store, b.store.pending());
    b.store.claim(&turn).await.unwrap();

    b.hold_syncs(true);
    let commit = commit_of(&b.store, &turn, "Записала вас на завтра в 15:00");
    let committing = tokio::spawn({
        let store = b.store.clone();
        async move { store.commit(commit).await }
    });
    until("the commit is applied", || b.store.pending().is_empty()).await;
    assert!(b.store.outbox().is_empty(), "a reply is never sendable before its commit is durable");
    let before = b.cut();
    b.hold_syncs(false);
    committing.await.unwrap().unwrap();
    // Answered once applied (today's store makes it durable at the next
    // sync); its reply becomes sendable once it is durable.
    until("the reply is sendable", || b.store.outbox().len() == 1).await;
    let after = b.cut();
    b.store.clone().close().await.unwrap();

    // Cut before the sync: as if the commit never happened — the turn
    // re-runs under its id (its reply was never sent), nothing is lost.
    let cut = b.open(&before);
    let recovered = cut.store.take_recovered().unwrap();
    assert_eq!(recovered.open_turns.len(), 1, "the turn is open again");
    assert_eq!(recovered.open_turns[0].turn_id, turn.turn_id);
    assert_eq!(ids(&recovered.open_turns[0].messages), ["c-1", "c-2"]);
    assert!(cut.store.history(&conv().phone).unwrap().is_empty(), "no half commit");
    assert_eq!(context_of(&cut.store), None, "no half commit");
    assert!(cut.store.outbox().is_empty(), "no reply without its turn");
    assert!(redelivered(&cut.store, "c-1").await);
    cut.store.close().await.unwrap();

    // Cut after it was answered: retired for good, with everything it wrote.
    let cut = b.open(&after);
    let recovered = cut.store.take_recovered().unwrap();
    assert!(recovered.open_turns.is_empty() && recovered.pending.is_empty(), "answered once");
    let history = cut.store.history(&conv().phone).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(ids(&history[0].messages), ["c-1", "c-2"]);
    let expected = (large("dialogue after the turn"), "cache after the turn".to_owned());
    assert_eq!(context_of(&cut.store), Some(expected));
    assert_eq!(cut.store.outbox().len(), 1, "the reply is still to send");
    assert!(redelivered(&cut.store, "c-2").await, "and its ids are remembered");
    cut.store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_write_is_whole_or_absent_at_a_cut() {
    // Small parts, large ones, and one of each, replaced by their like and
    // by the other size: (dialogue large, cache large) before and after.
    let shapes = [
        ("small", (false, false), (false, false)),
        ("large", (true, true), (true, true)),
        ("large dialogue, small cache", (true, false), (true, false)),
        ("small, then large", (false, false), (true, true)),
    ];
    let sized = |text: &str, is_large: bool| if is_large { large(text) } else { text.to_owned() };
    for (shape, before, after) in shapes {
        let Some(mut b) = Bench::start("the store API power-cut suite") else { return };
        let v1 = (sized("dialogue v1", before.0), sized("cache v1", before.1));
        let v2 = (sized("dialogue v2", after.0), sized("cache v2", after.1));
        let now = turnstile::message::unix_ms();
        b.store.update_context(&conv(), set(&v1.0, &v1.1), now).await.unwrap();
        b.hold_syncs(true);
        let writing = tokio::spawn({
            let (store, v2) = (b.store.clone(), v2.clone());
            async move { store.update_context(&conv(), set(&v2.0, &v2.1), now + 1).await }
        });
        until("the write is applied", || context_of(&b.store).is_some_and(|c| c.0 == v2.0)).await;
        // A message meanwhile: its sync commits the file system's journal,
        // and with it whatever else the store did to its directories.
        b.store.accept(vec![new(&format!("{shape}: meanwhile"))], Urgency::Immediate).await.unwrap();
        let during = b.cut();
        b.hold_syncs(false);
        writing.await.unwrap().unwrap();
        let answered = b.cut();
        // What the first version needed may go once the second is durable:
        // the store goes on reading the second.
        sleep(Duration::from_millis(100)).await;
        assert_eq!(context_of(&b.store).as_ref(), Some(&v2), "{shape}: read after the write");
        b.store.clone().close().await.unwrap();

        let cut = b.open(&during);
        let found = context_of(&cut.store);
        assert!(
            found.as_ref() == Some(&v1) || found.as_ref() == Some(&v2),
            "{shape}: one write or the other, never a mix: {:?}",
            found.map(|(d, c)| (d.len(), c.len()))
        );
        cut.store.close().await.unwrap();
        let cut = b.open(&answered);
        assert_eq!(context_of(&cut.store).as_ref(), Some(&v2), "{shape}: answered, so kept");
        cut.store.close().await.unwrap();
    }
}

/// The dedup archive (where a committed turn's ids move to be remembered)
/// is written and synced apart from the commit that retired them. A cut
/// between the two must not find the marks without the turn: its messages
/// would count as answered, with no history and no reply (found by the
/// black-box power-cut test; the archive step now syncs the commit first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_while_a_commit_is_not_durable_never_finds_its_ids_archived_without_it() {
    let Some(mut b) = Bench::start("the store API power-cut suite") else { return };
    b.store.accept(vec![new("r-1"), new("r-2")], Urgency::Immediate).await.unwrap();
    let turn = turn_of(&b.store, b.store.pending());
    b.store.claim(&turn).await.unwrap();
    b.hold_syncs(true);
    let committing = tokio::spawn({
        let (store, commit) = (b.store.clone(), commit_of(&b.store, &turn, "ok"));
        async move { store.commit(commit).await }
    });
    until("the commit is applied", || b.store.pending().is_empty()).await;
    let archiving = tokio::spawn({
        let store = b.store.clone();
        async move { store.archive_dedup().await }
    });
    // Time for the archive step to reach its file, if it would.
    sleep(Duration::from_millis(500)).await;
    let copy = b.cut();
    b.hold_syncs(false);
    committing.await.unwrap().unwrap();
    archiving.await.unwrap().unwrap();
    b.store.clone().close().await.unwrap();

    let cut = b.open(&copy);
    let recovered = cut.store.take_recovered().unwrap();
    let mut kept: Vec<&str> = ids(&recovered.pending);
    kept.extend(recovered.open_turns.iter().flat_map(|t| ids(&t.messages)));
    let history = cut.store.history(&conv().phone).unwrap();
    kept.extend(history.iter().flat_map(|h| ids(&h.messages)));
    kept.sort();
    assert_eq!(kept, ["r-1", "r-2"], "after the cut, the turn's messages are neither to answer nor answered");
    cut.store.close().await.unwrap();
}
