//! Damaged files never panic and never pass silently. A store is populated
//! through the real binary — pending messages in two log segments, committed
//! turns with receipts, contexts (one whose parts are large enough for
//! files of their own in `contexts/`), a dead turn large enough for sled's
//! `blobs/`,
//! dedup marks in the archive, a LID link, two quarantined deliveries, two
//! paused conversations, a turn left open, learned rhythms, sled's files
//! rewritten once into `trees.1/` (and its snapshot), the seal — and
//! stopped. Then each case damages one
//! file of a copy (a byte flipped at seeded offsets, cut short, a 4 KiB
//! page zeroed, or swapped for the file of an older copy of the directory
//! or a sibling of the same kind), runs `turnstile verify` on it and starts
//! `turnstile serve`. Exactly two outcomes pass:
//!
//! - refused: a non-zero exit whose message names the file (and offset
//!   where the format has one), and `verify` fails naming it too; or
//! - recovered: the daemon serves, stops cleanly, and the store holds every
//!   message, turn, context, mark, pause, link, held delivery and receipt
//!   it held before — unless the damage is in the very file that held it
//!   and a warning naming the file says so (a swapped file cannot be told
//!   apart: its losses are reported as undetected, and ARCHITECTURE.md says
//!   so); ids never go back.
//!
//! Never a panic (`panicked at`), a signal, or a daemon that waits forever.

use crate::helpers::copy_dir;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use turnstile::store::{Store, TurnSummary};

use crate::helpers::*;

const A: &str = "79005550001"; // a context written over the API
const B: &str = "79005550003"; // committed turns, both phases
const C: &str = "79005550004"; // a committed turn
const P: &str = "79005550002"; // paused: its messages stay pending
const Q: &str = "79005550009"; // paused, nothing pending
const H: &str = "79005550005"; // a turn whose handler never answers: left open
const BIG: &str = "79005550006"; // a context whose parts live in `contexts/`
const DEAD: &str = "79005550007"; // a dead turn of 80 long messages: a sled blob
const LID_PHONE: &str = "79007654321";
const COMPANY: &str = "default";

/// Cases run at once: each starts a daemon.
const PARALLEL: usize = 3;

fn daemon_env(
    ports: Ports,
    data: &Path,
    handler: &TestHandler,
    gateway: &FakeServer,
) -> Vec<(&'static str, String)> {
    let mut env = binary_env(ports, data, Some(&handler.url));
    env.extend([
        ("TURNSTILE_BATCHING_POLICY", "adaptive".into()),
        ("TURNSTILE_BATCHING_MAX_WAIT_MS", "1500".into()),
        ("TURNSTILE_BATCHING_MAX_MESSAGES", "100".into()),
        ("TURNSTILE_HANDLER_BACKOFF_MS", "20".into()),
        ("TURNSTILE_HANDLER_BACKOFF_MAX_MS", "40".into()),
        ("TURNSTILE_TURNS_SHUTDOWN_GRACE_MS", "200".into()),
        ("TURNSTILE_STORE_ARCHIVE_EVERY_S", "1".into()),
        ("TURNSTILE_GATEWAY_KIND", "http".into()),
        ("TURNSTILE_GATEWAY_URL", format!("{}/send", gateway.base)),
        ("TURNSTILE_WAHA_HMAC_KEY", WAHA_KEY.into()),
    ]);
    env
}

fn sigterm(child: &std::process::Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

/// Stops a fixture daemon: SIGTERM, exit 0.
fn stop(mut daemon: Spawned, log: &Path) {
    sigterm(&daemon.0);
    let status = exited_within(&mut daemon.0, Duration::from_secs(20)).expect("the daemon stops");
    assert!(status.success(), "{status}\n{}", log_tail(log, 30));
}

async fn ok(request: reqwest::RequestBuilder, what: &str) -> Value {
    let r = request.send().await.unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{what}: {status} {body}");
    body
}

/// A WAHA delivery, signed as WAHA signs it.
async fn waha(client: &reqwest::Client, base: &str, body: &Value) -> Value {
    let bytes = serde_json::to_vec(body).unwrap();
    let sig = turnstile::ingest::signature::sign_hex(WAHA_KEY, &bytes, true);
    let request = client
        .post(format!("{base}/webhook/waha"))
        .header("content-type", "application/json")
        .header("x-webhook-hmac", sig)
        .header("x-webhook-hmac-algorithm", "sha512")
        .body(bytes);
    ok(request, "a WAHA delivery").await
}

async fn committed(client: &reqwest::Client, admin: &str, phone: &str) -> usize {
    let v = ok(client.get(format!("{admin}/api/conversations/{phone}")), "a conversation").await;
    v["turns"].as_array().map_or(0, Vec::len)
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A text of about 1 KB, so that the log's segments span several pages.
fn long(tag: &str) -> String {
    format!("{tag}: {}", "запись на стрижку в субботу, ".repeat(20))
}

/// Bytes deflate cannot shrink much, as base64 text.
struct Fixture {
    _dir: tempfile::TempDir,
    current: PathBuf,
    older: PathBuf,
    handler: TestHandler,
    gateway: FakeServer,
    expected: Content,
}

/// Two runs of the daemon on one data directory; a copy after the first
/// is the older fixture.
async fn populate() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (current, older) = (dir.path().join("current"), dir.path().join("older"));
    let handler = TestHandler::start(Duration::from_millis(5)).await;
    handler.set_delay_for(H, Duration::from_secs(3600));
    let gateway = FakeServer::start(
        |body| json!({"id": format!("gw-{}-{}", body["turn_id"].as_str().unwrap_or(""), body["part"])}),
    )
    .await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let log = dir.path().join("fixture.log");
    let post = |base: &str, path: &str, body: Value| {
        client.post(format!("{base}{path}")).bearer_auth(WEBHOOK_TOKEN).json(&body)
    };

    // The first run: a context, a pause with messages pending, a turn.
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let daemon = Spawned(spawn_binary(&daemon_env(ports, &current, &handler, &gateway), &log));
    wait_ready(&client, &admin).await;
    let ctx = json!({"dialogue": {"name": "Анна"}, "cache": {"slots": [1, 2, 3]}});
    ok(client.put(format!("{admin}/api/contexts/{COMPANY}/{A}")).json(&ctx), "a context").await;
    for phone in [P] {
        let pause =
            client.post(format!("{admin}/api/conversations/{phone}/pause")).json(&json!({"minutes": 0}));
        ok(pause, "a pause").await;
    }
    for i in 0..4 {
        let body = json!({"id": format!("p1-{i}"), "from": P, "message": long(&format!("p1-{i}"))});
        ok(post(&base, "/webhook/whatsapp/batched", body), "a pending message").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    ok(post(&base, "/webhook/whatsapp", json!({"id": "b-0", "from": B, "message": long("b-0")})), "b-0")
        .await;
    wait_for("b-0's turn", async || committed(&client, &admin, B).await == 1).await;
    wait_for("its reply", async || gateway.delivered("/send").len() == 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // the archive's sweep
    stop(daemon, &log);
    copy_dir(&current, &older);

    // The second run: more of everything, then a rewrite of sled's files.
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let daemon = Spawned(spawn_binary(&daemon_env(ports, &current, &handler, &gateway), &log));
    wait_ready(&client, &admin).await;
    ok(post(&base, "/webhook/whatsapp", json!({"id": "b-1", "from": B, "message": long("b-1")})), "b-1")
        .await;
    ok(post(&base, "/webhook/whatsapp", json!({"id": "c-0", "from": C, "message": long("c-0")})), "c-0")
        .await;
    let lid = fixture("waha/noweb/message.lid-with-alt.json");
    assert_eq!(waha(&client, &base, &lid).await["status"], "accepted");
    let unknown = json!({"event": "presence.update", "session": "default", "payload": {
        "id": format!("{P}@c.us"), "presences": [{"lastKnownPresence": "dancing"}]}});
    for _ in 0..2 {
        assert_eq!(waha(&client, &base, &unknown).await["status"], "quarantined");
    }
    let pause = client.post(format!("{admin}/api/conversations/{Q}/pause")).json(&json!({"minutes": 0}));
    ok(pause, "a second pause").await;
    for i in 0..6 {
        let body = json!({"id": format!("p2-{i}"), "from": P, "message": long(&format!("p2-{i}"))});
        ok(post(&base, "/webhook/whatsapp/batched", body), "a pending message").await;
        tokio::time::sleep(Duration::from_millis(100 + 60 * i)).await;
    }
    let big =
        json!({"dialogue": {"n": incompressible(20_000)}, "cache": {"blob": incompressible(3_000_000)}});
    ok(client.put(format!("{admin}/api/contexts/{COMPANY}/{BIG}")).json(&big), "a large context").await;
    // A turn of 80 texts of 16,000 bytes that fails every attempt: parked
    // dead with copies of its messages, over 1 MiB, which sled keeps in a
    // blob of its own.
    handler.fail_with(Some(500));
    let text = "я".repeat(8000);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..80 {
        let body = json!({"id": format!("d-{i}"), "from": DEAD, "message": format!("d-{i} {text}")});
        let request = post(&base, "/webhook/whatsapp/batched", body);
        sends.spawn(async move { ok(request, "a long message").await });
    }
    while let Some(sent) = sends.join_next().await {
        sent.unwrap();
    }
    wait_for("the dead turn", async || {
        let dead = ok(client.get(format!("{admin}/api/dead")), "the dead").await;
        dead["dead"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    handler.fail_with(None);
    ok(post(&base, "/webhook/whatsapp", json!({"id": "h-0", "from": H, "message": long("h-0")})), "h-0")
        .await;
    wait_for("the turns", async || {
        committed(&client, &admin, B).await == 2
            && committed(&client, &admin, C).await == 1
            && committed(&client, &admin, LID_PHONE).await == 1
    })
    .await;
    wait_for("the replies", async || gateway.delivered("/send").len() == 4).await;
    wait_for("h-0's turn to start", async || handler.calls().iter().any(|c| c.phone == H)).await;
    let rewrite = ok(client.post(format!("{admin}/api/store/rewrite")), "a rewrite").await;
    assert_eq!(rewrite["generation"], 1, "{rewrite}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // the archive's sweep
    stop(daemon, &log);

    // The third run: sled recovers `trees.1/` (and writes its snapshot);
    // more pending messages, in the newest segment.
    let ports = Ports::free();
    let (base, admin) = (ports.base(), ports.admin_base());
    let daemon = Spawned(spawn_binary(&daemon_env(ports, &current, &handler, &gateway), &log));
    wait_ready(&client, &admin).await;
    for i in 0..6 {
        let body = json!({"id": format!("p3-{i}"), "from": P, "message": long(&format!("p3-{i}"))});
        ok(post(&base, "/webhook/whatsapp/batched", body), "a pending message").await;
    }
    stop(daemon, &log);

    for file in [
        "log/0000000000000001.seg",
        "log/0000000000000002.seg",
        "log/0000000000000003.seg",
        "seal",
        "ids",
        "lids",
        "takeover",
        "receipts",
        "rhythms",
        "trees",
        "trees.1/db",
        "trees.1/conf",
    ] {
        assert!(current.join(file).is_file(), "the fixture has no {file}");
    }
    for (dir, what) in
        [("dedup", "archive files"), ("quarantine", "held deliveries"), ("contexts", "context part files")]
    {
        assert!(!files_in(&current.join(dir)).is_empty(), "the fixture has no {what}");
    }
    let expected =
        content(&copy_of(&current, &dir.path().join("expected"))).await.expect("the fixture opens");
    assert_eq!(expected.quarantined.len(), 2);
    assert_eq!(expected.paused, BTreeSet::from([P.to_owned(), Q.to_owned()]));
    assert!(
        expected.lid.is_some() && expected.receipts.len() >= 4 && expected.contexts.len() >= 2,
        "{expected:?}"
    );
    Fixture { _dir: dir, current, older, handler, gateway, expected }
}

fn copy_of(from: &Path, to: &Path) -> PathBuf {
    copy_dir(from, to);
    to.to_owned()
}

/// Files in `dir`, by name.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A context's stored parts: dialogue, cache.
type Parts = (Option<Vec<u8>>, Option<Vec<u8>>);

/// What the store holds, as far as damage may not silently take it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Content {
    /// Message ids pending, in open turns or in committed ones.
    messages: BTreeSet<String>,
    /// Committed turns.
    turns: BTreeSet<String>,
    /// Each context's parts, by conversation key.
    contexts: BTreeMap<Vec<u8>, Parts>,
    /// The dedup marks, wherever kept.
    marks: BTreeSet<Vec<u8>>,
    paused: BTreeSet<String>,
    lid: Option<String>,
    quarantined: BTreeSet<String>,
    /// Gateway ids of the receipts of committed turns.
    receipts: BTreeSet<String>,
    /// The highest id in use, and the next one handed out.
    max_used: u64,
    next: u64,
}

fn id_number(turn_id: &str) -> u64 {
    turn_id.strip_prefix('t').and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Opens the store in `dir` in this process and reads what it holds.
async fn content(dir: &Path) -> Result<Content, String> {
    let d = dir.to_owned();
    let store =
        tokio::task::spawn_blocking(move || Store::open(&d)).await.unwrap().map_err(|e| e.to_string())?;
    let mut c = Content::default();
    let (mut parts, mut history) = (BTreeMap::<Vec<u8>, Parts>::new(), Vec::new());
    store
        .export(|tree, k, v| {
            match tree {
                "ctx_dialogue" => parts.entry(k.to_vec()).or_default().0 = Some(v.to_vec()),
                "ctx_cache" => parts.entry(k.to_vec()).or_default().1 = Some(v.to_vec()),
                "ctx_meta" => {
                    parts.entry(k.to_vec()).or_default();
                }
                "dedup" => c.marks.extend(v.chunks(16).map(<[u8]>::to_vec)),
                "history" => history.push(
                    bincode::serde::decode_from_slice::<TurnSummary, _>(v, bincode::config::standard())
                        .unwrap()
                        .0,
                ),
                _ => {}
            }
            Ok::<(), turnstile::store::StoreError>(())
        })
        .map_err(|e| e.to_string())?;
    c.contexts = parts;
    for m in store.pending() {
        c.max_used = c.max_used.max(m.seq);
        c.messages.insert(m.id);
    }
    for t in store.turns().map_err(|e| e.to_string())? {
        c.max_used = c.max_used.max(id_number(&t.turn_id));
        for m in t.messages {
            c.max_used = c.max_used.max(m.seq);
            c.messages.insert(m.id);
        }
    }
    for t in history {
        c.max_used = c.max_used.max(id_number(&t.turn_id));
        c.receipts.extend(store.receipts_of(&t.turn_id).into_iter().map(|r| r.id));
        for m in &t.messages {
            c.max_used = c.max_used.max(m.seq);
            c.messages.insert(m.id.clone());
        }
        c.turns.insert(t.turn_id);
    }
    c.paused = store.paused().into_iter().map(|(conv, _)| conv.phone).collect();
    c.lid =
        store.lid_phone(COMPANY, "98765432109876@lid").or_else(|| store.lid_phone(COMPANY, "98765432109876"));
    c.quarantined = store.quarantined().await.map_err(|e| e.to_string())?.into_iter().map(|h| h.id).collect();
    c.next = store.next_seq().map_err(|e| e.to_string())?;
    store.close().await.map_err(|e| e.to_string())?;
    Ok(c)
}

/// What `expected` held that `actual` does not: (what, the bytes that would
/// name it in the file that held it).
fn lost(expected: &Content, actual: &Content) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut gone = |what: &str, items: Vec<String>| {
        out.extend(items.into_iter().map(|i| (format!("{what} {i}"), i.into_bytes())));
    };
    gone("message", expected.messages.difference(&actual.messages).cloned().collect());
    gone("turn", expected.turns.difference(&actual.turns).cloned().collect());
    gone("pause of", expected.paused.difference(&actual.paused).cloned().collect());
    gone("held delivery", expected.quarantined.difference(&actual.quarantined).cloned().collect());
    gone("receipt", expected.receipts.difference(&actual.receipts).cloned().collect());
    if expected.lid.is_some() && actual.lid != expected.lid {
        gone("LID link to", vec![expected.lid.clone().unwrap_or_default()]);
    }
    let marks = expected.marks.difference(&actual.marks).count();
    if marks > 0 {
        out.push((format!("{marks} dedup marks"), Vec::new()));
    }
    for (key, parts) in &expected.contexts {
        if actual.contexts.get(key) != Some(parts) {
            out.push((
                format!("the context of {}", String::from_utf8_lossy(key).replace('\0', " ")),
                key.clone(),
            ));
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// One byte flipped: at this fraction of the file, or at a seeded offset.
    Flip(f64),
    FlipSeeded(u64),
    /// Cut to this fraction of its length (at least one byte shorter).
    Truncate(f64),
    /// The 4 KiB page at this fraction of the file zeroed (the whole file if smaller).
    ZeroPage(f64),
    /// Replaced by the file of the same name in the older copy (none there: removed).
    SwapOlder,
    /// Replaced by this file of the older copy (`*` as in `Case::file`).
    SwapOlderAt(&'static str),
    /// Replaced by another file of the same kind of this store.
    SwapSibling(&'static str),
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Refuse,
    Recover,
    Either,
}

#[derive(Clone, Copy)]
struct Case {
    /// The file, relative to the data directory (`*` stands for the first
    /// file of its directory: `trees.1/snap.*`, `contexts/*`).
    file: &'static str,
    damage: Damage,
    expect: Expect,
    /// Whether the file's format has offsets that a refusal names.
    offsets: bool,
}

fn case(file: &'static str, damage: Damage, expect: Expect) -> Case {
    let offsets = file.starts_with("log/") || file.starts_with("dedup/") || file == "takeover";
    Case { file, damage, expect, offsets }
}

fn cases() -> Vec<Case> {
    use Damage::*;
    use Expect::*;
    let mut all = vec![case("", Flip(0.0), Recover)]; // the control: nothing damaged
    for file in ["log/0000000000000001.seg", "log/0000000000000002.seg"] {
        for d in [Flip(0.1), Flip(0.9), FlipSeeded(1), Truncate(0.5), ZeroPage(0.0)] {
            all.push(case(file, d, Refuse)); // no longer appended to
        }
    }
    for (d, e) in [
        (Flip(0.05), Refuse), // whole records after it
        (FlipSeeded(2), Either),
        (Flip(0.999), Recover), // the last record: a torn tail
        (Truncate(0.6), Recover),
        (ZeroPage(0.5), Either),
        (SwapSibling("log/0000000000000001.seg"), Either),
    ] {
        all.push(case("log/0000000000000003.seg", d, e));
    }
    for d in [FlipSeeded(3), Truncate(0.5), ZeroPage(0.0)] {
        all.push(case("ids", d, Refuse));
    }
    all.push(case("ids", SwapOlder, Recover)); // an older mark: moved above the ids in use
    for d in [FlipSeeded(4), Truncate(0.5), ZeroPage(0.0)] {
        all.push(case("lids", d, Recover));
    }
    for d in [FlipSeeded(5), Truncate(0.5), ZeroPage(0.0)] {
        all.push(case("quarantine/0000000000000001.q", d, Refuse));
    }
    all.push(case("quarantine/0000000000000001.q", SwapSibling("quarantine/0000000000000002.q"), Refuse));
    for (d, e) in [
        (Flip(0.1), Refuse),
        (Flip(0.99), Recover),
        (Truncate(0.7), Recover),
        (ZeroPage(0.0), Recover),
        (SwapOlder, Either),
    ] {
        all.push(case("takeover", d, e));
    }
    for d in [Flip(0.2), FlipSeeded(6), Truncate(0.5), ZeroPage(0.0), SwapOlder] {
        all.push(case("receipts", d, Recover)); // not needed to recover: damaged records dropped and said
    }
    for d in [FlipSeeded(7), Truncate(0.5), ZeroPage(0.0), SwapOlder] {
        all.push(case("rhythms", d, Recover)); // a cache
    }
    for (d, e) in [
        (Flip(0.05), Either),
        (Flip(0.999), Recover),
        (Truncate(0.5), Recover),
        (ZeroPage(0.0), Either),
        (SwapOlder, Either),
    ] {
        all.push(case("dedup/0000000000000001.ids", d, e));
    }
    for (d, e) in [
        (Flip(0.0), Refuse),
        (FlipSeeded(8), Either),
        (Truncate(0.5), Refuse),
        (ZeroPage(0.0), Refuse),
        (Remove, Refuse),
    ] {
        all.push(case("trees", d, e)); // a flip that makes `\n` another blank changes nothing
    }
    for d in [FlipSeeded(16), Truncate(0.5), ZeroPage(0.0)] {
        all.push(case("seal", d, Refuse));
    }
    for d in [SwapOlder, Remove] {
        all.push(case("seal", d, Recover)); // an older seal, or none: nothing to hold sled to
    }
    for d in [
        FlipSeeded(9),
        FlipSeeded(10),
        FlipSeeded(11),
        FlipSeeded(12),
        Truncate(0.5),
        Truncate(0.98),
        ZeroPage(0.0),
        ZeroPage(0.5),
        SwapOlderAt("db"),
    ] {
        all.push(case("trees.1/db", d, Either));
    }
    for d in [FlipSeeded(13), Truncate(0.5), ZeroPage(0.0)] {
        all.push(case("trees.1/conf", d, Refuse));
    }
    for d in [FlipSeeded(14), Truncate(0.5), ZeroPage(0.0), Remove] {
        all.push(case("trees.1/snap.*", d, Recover)); // sled rebuilds it from its log
    }
    // sled keeps a value over 1 MiB in `blobs/`: the dead turn's record
    // here (and context parts of stores made before `contexts/`).
    for d in [FlipSeeded(15), Truncate(0.5), ZeroPage(0.0)] {
        all.push(case("trees.1/blobs/*", d, Refuse));
    }
    for d in [Flip(0.0), FlipSeeded(15), Truncate(0.5), ZeroPage(0.0), Remove] {
        all.push(case("contexts/*", d, Recover)); // that context's part is dropped, and said
    }
    all
}

/// `file` with its `*` resolved in `data`; `None` if there is no such file.
fn resolve(data: &Path, file: &str) -> Option<String> {
    let Some(prefix) = file.strip_suffix('*') else { return Some(file.to_owned()) };
    let (dir, start) = prefix.rsplit_once('/').unwrap_or(("", prefix));
    let name = |n: String| if dir.is_empty() { n } else { format!("{dir}/{n}") };
    files_in(&data.join(dir)).into_iter().find(|n| n.starts_with(start)).map(name)
}

fn damage(data: &Path, older: &Path, file: &str, d: Damage, salt: u64) {
    let path = data.join(file);
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    let at = |f: f64| ((len as f64 * f) as usize).min(len - 1);
    match d {
        Damage::Flip(f) => bytes[at(f)] ^= 0x5a,
        Damage::FlipSeeded(seed) => {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed * 7919 + salt));
            bytes[rng.below(len as u64) as usize] ^= 1 << rng.below(8);
        }
        Damage::Truncate(f) => bytes.truncate(at(f).min(len - 1)),
        Damage::ZeroPage(f) => {
            let start = at(f) / 4096 * 4096;
            bytes[start..(start + 4096).min(len)].fill(0);
        }
        Damage::SwapOlder => match std::fs::read(older.join(file)) {
            Ok(old) => bytes = old,
            Err(_) => {
                std::fs::remove_file(&path).unwrap();
                return;
            }
        },
        Damage::SwapSibling(other) => bytes = std::fs::read(data.join(other)).unwrap(),
        Damage::SwapOlderAt(other) => {
            let other = resolve(older, other).expect("the older copy has it");
            bytes = std::fs::read(older.join(other)).unwrap();
        }
        Damage::Remove => {
            std::fs::remove_file(&path).unwrap();
            return;
        }
    }
    std::fs::write(&path, bytes).unwrap();
}

/// What one case came to.
enum Outcome {
    Refused,
    Recovered { warned: bool, undetected: Vec<String> },
}

/// Runs one case; its outcome, or what was wrong.
async fn run(fx: Arc<Fixture>, root: PathBuf, n: usize, c: &Case) -> Result<Outcome, String> {
    let data = copy_of(&fx.current, &root.join(format!("case{n}")));
    let log = root.join(format!("case{n}.log"));
    let file = resolve(&data, c.file).ok_or_else(|| format!("the fixture has no {}", c.file))?;
    let original = std::fs::read(data.join(&file)).unwrap_or_default();
    if !c.file.is_empty() && original.is_empty() {
        return Err(format!("the fixture's {file} is empty"));
    }
    if !c.file.is_empty() {
        damage(&data, &fx.older, &file, c.damage, n as u64);
    }
    // sled does not always say which of its files (an early end of one):
    // then its directory is what the error names.
    let sled = file.starts_with("trees.1/");
    let names =
        |text: &str| !file.is_empty() && (text.contains(file.as_str()) || sled && text.contains("trees.1\""));

    let verify = Command::new(env!("CARGO_BIN_EXE_turnstile")).arg("verify").arg(&data).output().unwrap();
    let verified =
        format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    if verified.contains("panicked at") || verify.status.code().is_none() {
        return Err(format!("verify crashed ({}):\n{verified}", verify.status));
    }

    let readyz = std::sync::Mutex::new(String::new());
    let (mut daemon, started) = loop {
        let ports = Ports::free();
        let daemon = Spawned(spawn_binary(&daemon_env(ports, &data, &fx.handler, &fx.gateway), &log));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let started = Instant::now();
        let mut daemon = daemon;
        let ready = loop {
            if daemon.0.try_wait().unwrap().is_some() {
                break false;
            }
            if let Ok(r) = client.get(format!("{}/readyz", ports.admin_base())).send().await {
                if r.status() == 200 {
                    *readyz.lock().unwrap() = r.text().await.unwrap_or_default();
                    break true;
                }
            }
            if started.elapsed() > Duration::from_secs(20) {
                return Err(format!("neither served nor exited in 20 s:\n{}", log_tail(&log, 20)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !ready && text.contains("Address already in use") {
            let _ = std::fs::remove_file(&log); // a port taken meanwhile: again
            continue;
        }
        break (daemon, ready);
    };
    if started {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sigterm(&daemon.0);
    }
    let status = exited_within(&mut daemon.0, Duration::from_secs(20)).ok_or("did not exit after SIGTERM")?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if text.contains("panicked at") || status.code().is_none() {
        return Err(format!("crashed ({status}):\n{}", log_tail(&log, 30)));
    }
    if !started {
        let said = text.lines().filter(|l| l.starts_with("turnstile:")).collect::<Vec<_>>().join("\n");
        if status.success() {
            return Err(format!("exited 0 without serving:\n{}", log_tail(&log, 20)));
        }
        if !names(&said) {
            return Err(format!("refused without naming {file}: {said}"));
        }
        // Said once: the refusal does not repeat its cause.
        let cause = said.rsplit(": ").next().unwrap_or("");
        if cause.len() > 8 && said.matches(cause).count() > 1 {
            return Err(format!("the refusal says its cause twice: {said}"));
        }
        if c.offsets && !said.contains(&format!("{file}@")) {
            return Err(format!("refused without the offset in {file}: {said}"));
        }
        if verify.status.success() || !names(&verified) {
            return Err(format!("serve refused ({said}) but verify said:\n{verified}"));
        }
        return Ok(Outcome::Refused);
    }
    if !status.success() {
        return Err(format!("served, then exited {status}:\n{}", log_tail(&log, 20)));
    }
    if !verify.status.success() {
        return Err(format!("serve recovered but verify refused:\n{verified}"));
    }
    let warned = text.lines().any(|l| l.contains("WARN") && names(l));
    if warned && !names(&verified) {
        return Err(format!("serve warned about {file} but verify did not say so:\n{verified}"));
    }
    let ready_said = readyz.lock().unwrap().clone();
    if warned && !names(&ready_said) {
        return Err(format!("serve warned about {file} but /readyz did not say so: {ready_said}"));
    }
    let actual = content(&data).await.map_err(|e| format!("served, but a second open refuses: {e}"))?;
    if actual.next <= fx.expected.max_used {
        return Err(format!("ids go back: the next is {}, {} is in use", actual.next, fx.expected.max_used));
    }
    let swapped = matches!(
        c.damage,
        Damage::SwapOlder | Damage::SwapOlderAt(_) | Damage::SwapSibling(_) | Damage::Remove
    );
    let mut undetected = Vec::new();
    for (what, needle) in lost(&fx.expected, &actual) {
        // Our own formats hold their records' ids as they are.
        let verbatim = !file.starts_with("trees.1/") && !file.starts_with("dedup/");
        let held_there =
            !verbatim || needle.is_empty() || original.windows(needle.len()).any(|w| w == needle);
        if !held_there {
            return Err(format!("lost {what}, which {file} did not hold"));
        }
        if swapped {
            undetected.push(what);
        } else if !warned {
            return Err(format!("lost {what} without a word:\n{}", log_tail(&log, 20)));
        }
    }
    Ok(Outcome::Recovered { warned, undetected })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_file_is_refused_by_name_or_recovered_and_said_never_a_panic_or_a_silent_loss() {
    let started = Instant::now();
    let fx = Arc::new(populate().await);
    let populated = started.elapsed();
    let root = tempfile::tempdir().unwrap();
    let cases = cases();
    let gate = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut runs = Vec::new();
    for (n, c) in cases.iter().enumerate() {
        let (fx, root, gate) = (fx.clone(), root.path().to_owned(), gate.clone());
        let c = *c;
        runs.push(tokio::spawn(async move {
            let _slot = gate.acquire().await.unwrap();
            run(fx, root, n, &c).await
        }));
    }
    let (mut table, mut failures) = (Vec::new(), Vec::new());
    for (c, r) in cases.iter().zip(runs) {
        let name = format!(
            "{:<32} {:<22}",
            if c.file.is_empty() { "(nothing damaged)" } else { c.file },
            format!("{:?}", c.damage)
        );
        match r.await.unwrap() {
            Ok(Outcome::Refused) if c.expect != Expect::Recover => table.push(format!("{name} refused")),
            Ok(Outcome::Recovered { warned, undetected }) if c.expect != Expect::Refuse => {
                let said = if warned { ", said" } else { "" };
                let missing = if undetected.is_empty() {
                    String::new()
                } else {
                    format!(", undetected: {}", undetected.join(", "))
                };
                table.push(format!("{name} recovered{said}{missing}"));
            }
            Ok(Outcome::Refused) => failures.push(format!("{name}: refused, expected to recover")),
            Ok(Outcome::Recovered { .. }) => failures.push(format!("{name}: recovered, expected a refusal")),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    eprintln!(
        "damage: {} cases in {:.1} s (the fixture {:.1} s)\n{}",
        cases.len(),
        started.elapsed().as_secs_f64(),
        populated.as_secs_f64(),
        table.join("\n")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
