//! The operator console: `GET /ui` (one self-contained page, compiled into
//! the binary) and `GET /api/events`, the Server-Sent Events it lives on.
//!
//! The stream opens with a `snapshot` event (health, one page of pending
//! batches, running and waiting work, recent turns, dead turns, the outbox,
//! the chart samples), then sends `state` at least every second and at once
//! after a turn starts or ends (this doubles as the heartbeat proxies need),
//! a `turn` event per finished turn (its `id:` is `<epoch>.<seq>`), a `sample`
//! per chart point, and `dead` when the dead turns change. A client that
//! reconnects with `Last-Event-ID` gets only the turns it missed, when this
//! process still holds them. Every figure comes from memory: the driver's
//! view (one page, built from the page alone), the feed, the store's
//! counters; the only store read is the dead list, once per change.
//!
//! The page is served without the token (it holds no data); everything it
//! reads is behind `require_token` like the rest of `/api`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http_body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{serving, ApiError, AppState, ServeState};
use crate::feed::{Feed, Finished};
use crate::message::{mask_always, unix_ms, Conv};
use crate::turns::View;

const PAGE: &str = include_str!("console.html");

/// Pending batches per page unless the page asks otherwise, and at most.
const PAGE_SIZE: usize = 50;
const PAGE_MAX: usize = 200;
/// A `state` event at least this often.
const STATE_EVERY: Duration = Duration::from_secs(1);
/// …and not more often than this, however busy.
const STATE_MIN_GAP: Duration = Duration::from_millis(200);

/// `/ui`: open, like health; it shows nothing until the stream answers.
pub(super) fn page_routes() -> Router<Arc<AppState>> {
    Router::new().route("/ui", get(page))
}

/// Behind the admin token (the caller adds the layer).
pub(super) fn api_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/events", get(events))
        .route("/api/console/turns/{turn_id}", get(turn))
        .route("/api/batches/{company_id}/{phone}", get(batch))
}

async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            // The page's own script and style only; it talks to its own origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        Html(PAGE),
    )
        .into_response()
}

/// A finished turn's messages and reply (only the last 100 are kept).
async fn turn(State(s): State<Arc<AppState>>, Path(turn_id): Path<String>) -> Result<Json<Value>, ApiError> {
    let t = s.feed.turn(&turn_id).ok_or_else(|| {
        ApiError::not_found(format!("turn {turn_id} is not among the console's recent turns"))
    })?;
    let mut v = turn_json(&t);
    v["texts"] = json!(t.texts);
    v["reply"] = json!(t.reply);
    Ok(Json(v))
}

/// The texts of one conversation's pending batch (asked for by a click).
async fn batch(
    State(s): State<Arc<AppState>>,
    Path((company_id, phone)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let phone = crate::ingest::normalize_conversation(&phone)?;
    let conv = Conv { company_id, phone };
    let snap = s.driver.snapshot().await.ok_or_else(|| ApiError::unavailable("shutting down"))?;
    let seqs: Vec<u64> = snap
        .collecting
        .iter()
        .filter(|c| c.key == conv)
        .flat_map(|c| c.seqs.iter().copied())
        .chain(snap.waiting.iter().filter(|w| w.0 == conv).flat_map(|w| w.1.iter().copied()))
        .collect();
    if seqs.is_empty() {
        return Err(ApiError::not_found(format!("no pending batch for {}", conv.masked())));
    }
    let messages: Vec<Value> = s
        .store
        .messages(&conv, &seqs)
        .iter()
        .map(|m| json!({ "id": m.id, "text": m.text, "received_at": m.received_at_ms }))
        .collect();
    Ok(Json(json!({ "company_id": conv.company_id, "phone": conv.phone, "messages": messages })))
}

fn query_number(query: &Option<String>, name: &str, default: usize, max: usize) -> Result<usize, ApiError> {
    let Some(raw) = query.as_deref().into_iter().flat_map(|q| q.split('&')).find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    }) else {
        return Ok(default);
    };
    match raw.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(ApiError::bad_request(format!("{name} must be a whole number from 0 to {max}"))),
    }
}

/// `Last-Event-ID` as `<epoch>.<seq>`: the last turn a console saw, if it
/// came from this process and the turns after it are still kept.
fn resume_point(headers: &HeaderMap, feed: &Feed) -> Option<u64> {
    let raw = headers.get("last-event-id")?.to_str().ok()?;
    let (epoch, seq) = raw.split_once('.')?;
    let seq: u64 = seq.parse().ok()?;
    (epoch.parse::<u64>().ok()? == feed.epoch && feed.can_resume_after(seq)).then_some(seq)
}

async fn events(
    State(s): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let offset = query_number(&query, "offset", 0, usize::MAX)?;
    let limit = query_number(&query, "limit", PAGE_SIZE, PAGE_MAX)?.max(1);
    let resume = resume_point(&headers, &s.feed);
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(stream(s, offset, limit, resume, tx));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
            // nginx would otherwise buffer the stream.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::new(EventBody(rx)),
    )
        .into_response())
}

/// The response body: whatever the stream's task sends, until it stops or
/// the client goes (then the task's next send fails and it ends).
struct EventBody(mpsc::Receiver<Bytes>);

impl http_body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

fn frame(event: &str, id: Option<String>, data: &Value) -> Bytes {
    let mut out = String::new();
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(&id);
        out.push('\n');
    }
    out.push_str("event: ");
    out.push_str(event);
    out.push_str("\ndata: ");
    // JSON has no raw newlines, so one data line holds it.
    out.push_str(&data.to_string());
    out.push_str("\n\n");
    Bytes::from(out)
}

async fn stream(s: Arc<AppState>, offset: usize, limit: usize, resume: Option<u64>, tx: mpsc::Sender<Bytes>) {
    let feed = s.feed.clone();
    let mut changed = feed.subscribe();
    let mut last_turn = resume;
    let mut last_sample = feed.samples().last().map(|x| x.at_ms).unwrap_or(0);
    let mut dead_seen = dead_mark(&s);
    let Some(view) = s.driver.view(offset, limit).await else { return };
    let recent: Vec<Value> = feed.recent_after(resume).iter().map(turn_json).collect();
    if let Some(t) = feed.recent_after(None).last() {
        last_turn = Some(t.seq);
    }
    let snapshot = json!({
        "epoch": feed.epoch,
        "resumed": resume.is_some(),
        "last_turn_id": last_turn.map(|seq| format!("{}.{seq}", feed.epoch)),
        "state": state_json(&s, &view, offset, limit),
        "recent": recent,
        "samples": feed.samples(),
        "dead": dead_json(&s).await,
    });
    if tx.send(frame("snapshot", None, &snapshot)).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval(STATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = s.draining.cancelled() => return,
            _ = tx.closed() => return,
            _ = tick.tick() => {}
            r = changed.changed() => {
                if r.is_err() {
                    return;
                }
                // Let a burst of changes land together.
                tokio::time::sleep(STATE_MIN_GAP).await;
                tick.reset();
            }
        }
        let mut out = Vec::new();
        for t in feed.recent_after(last_turn) {
            last_turn = Some(t.seq);
            out.push(frame("turn", Some(format!("{}.{}", feed.epoch, t.seq)), &turn_json(&t)));
        }
        let since = last_sample;
        for sample in feed.samples().into_iter().filter(|x| x.at_ms > since) {
            last_sample = sample.at_ms;
            out.push(frame("sample", None, &json!(sample)));
        }
        let mark = dead_mark(&s);
        if mark != dead_seen {
            dead_seen = mark;
            out.push(frame("dead", None, &json!({ "dead": dead_json(&s).await })));
        }
        let Some(view) = s.driver.view(offset, limit).await else { return };
        out.push(frame("state", None, &state_json(&s, &view, offset, limit)));
        for chunk in out {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    }
}

/// Changes whenever the dead list may have: a turn parked, retried or expired.
fn dead_mark(s: &AppState) -> (u64, u64) {
    let st = s.store.stats();
    (st.dead_turns, st.expired_dead)
}

async fn dead_json(s: &AppState) -> Value {
    match s.store.read(|st| st.turns()).await {
        Ok(turns) => json!(turns
            .iter()
            .filter_map(|t| {
                let dead = t.dead.as_ref()?;
                Some(json!({
                    "turn_id": t.turn_id,
                    "company_id": t.conv.company_id,
                    "phone": t.conv.phone,
                    "masked": mask_always(&t.conv.phone),
                    "messages": t.messages.len(),
                    "attempts": t.attempts,
                    "error": dead.error,
                    "died_at_ms": dead.died_at_ms,
                }))
            })
            .collect::<Vec<_>>()),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

fn turn_json(t: &Finished) -> Value {
    json!(t)
}

fn rule_name(rule: crate::batcher::CutReason) -> &'static str {
    use crate::batcher::CutReason::*;
    match rule {
        Quiet => "quiet window",
        MaxWait => "max wait",
        Full => "max messages",
        Immediate => "immediate",
        Rhythm => "learned gap window",
        Complete => "looks complete",
        Paused => "stopped typing",
        TypingStale => "typing went quiet",
        Resumed => "staff handed back",
    }
}

fn state_json(s: &AppState, view: &View, offset: usize, limit: usize) -> Value {
    let now_ms = unix_ms();
    let ms = |d: Duration| d.as_millis() as u64;
    let pending: Vec<Value> = view
        .page
        .iter()
        .map(|p| {
            let age = ms(view.now.saturating_duration_since(p.first_at));
            let fires_in = ms(p.deadline.saturating_duration_since(view.now));
            json!({
                "company_id": p.key.company_id,
                "phone": p.key.phone,
                "masked": mask_always(&p.key.phone),
                "messages": p.seqs.len(),
                "first_at_ms": now_ms.saturating_sub(age),
                "fires_at_ms": now_ms + fires_in,
                "rule": rule_name(p.rule),
            })
        })
        .collect();
    let running = s.feed.running();
    let waiting: Vec<Value> = view
        .waiting
        .iter()
        .map(|(conv, messages, what)| {
            json!({
                "company_id": conv.company_id, "phone": conv.phone, "masked": mask_always(&conv.phone),
                "messages": messages, "what": what,
            })
        })
        .collect();
    // The outbox is in memory (the store keeps it so); grouped per conversation.
    let mut outbox: BTreeMap<(String, String), (usize, usize, u64)> = BTreeMap::new();
    for item in s.store.outbox() {
        let e =
            outbox.entry((item.conv.company_id.clone(), item.conv.phone.clone())).or_insert((0, 0, u64::MAX));
        if item.failed {
            e.1 += 1;
        } else {
            e.0 += 1;
            e.2 = e.2.min(item.created_at_ms);
        }
    }
    let outbox: Vec<Value> = outbox
        .iter()
        .map(|((company_id, phone), (backlog, given_up, oldest))| {
            json!({
                "company_id": company_id, "masked": mask_always(phone), "backlog": backlog,
                "given_up": given_up, "oldest_at_ms": (*backlog > 0).then_some(*oldest),
            })
        })
        .collect();
    let samples = s.feed.samples();
    let last = samples.last();
    let turns_per_min: u64 =
        samples.iter().rev().take(12).map(|x| x.turns).sum::<u64>() * 12 / samples.len().clamp(1, 12) as u64;
    let c = s.store.context_stats();
    let st = s.store.stats();
    let store_state = if let Some(reason) = s.store.failure() {
        json!({ "state": "failed", "reason": reason.to_string() })
    } else if let Some(reason) = s.store.trouble() {
        json!({ "state": "writes failing", "reason": reason.to_string() })
    } else {
        json!({ "state": "ok" })
    };
    json!({
        "server_ms": now_ms,
        "health": {
            "status": status(s),
            "store": store_state,
            "webhooks_per_s": last.map(|x| x.webhooks_per_s),
            "syncs_per_s": last.map(|x| x.syncs_per_s),
            "turns_per_min": turns_per_min,
            "contexts": c.contexts,
            "context_bytes": c.stored_bytes,
            "dead_turns": st.dead_turns,
            "refused_for_secret": s.metrics.webhooks_refused("secret"),
            "quarantined": s.store.quarantine_len(),
        },
        "pending": {
            "batches": view.collecting.0,
            "messages": view.collecting.1,
            "offset": offset,
            "limit": limit,
            "page": pending,
        },
        "running": running,
        "waiting": { "total": view.waiting_total, "shown": waiting },
        "paused": paused_json(s, view, now_ms),
        "delivery": delivery_json(s),
        "outbox": outbox,
    })
}

/// How far the recent turns' replies got, per turn: the least advanced of
/// its pieces (a reply is read once every piece is), or how it failed.
fn delivery_json(s: &AppState) -> Value {
    let mut out = serde_json::Map::new();
    for t in s.feed.recent_after(None) {
        let receipts = s.store.receipts_of(&t.turn_id);
        if receipts.is_empty() {
            continue;
        }
        let shown = match receipts.iter().find_map(|r| r.failed.as_ref()) {
            Some(f) => format!("failed: {}", f.title),
            None => receipts.iter().map(|r| r.state).min().map_or("sent", |d| d.as_str()).to_owned(),
        };
        out.insert(t.turn_id.clone(), json!(shown));
    }
    Value::Object(out)
}

/// Conversations staff took over: who, since when, when the assistant comes
/// back, and how many client messages wait.
fn paused_json(s: &AppState, view: &View, now_ms: u64) -> Vec<Value> {
    let held: std::collections::HashMap<&Conv, usize> =
        view.paused.iter().map(|h| (&h.conv, h.messages)).collect();
    s.store
        .paused()
        .iter()
        .map(|(conv, p)| {
            json!({
                "company_id": conv.company_id, "phone": conv.phone, "masked": mask_always(&conv.phone),
                "by": p.by, "since_ms": p.since_ms, "resumes_at_ms": p.resume_at_ms,
                "messages": held.get(conv).copied().unwrap_or(0), "server_ms": now_ms,
            })
        })
        .collect()
}

/// What `/readyz` would say.
fn status(s: &AppState) -> &'static str {
    match serving(s) {
        Ok(()) => ServeState::Ready.as_str(),
        Err((state, _)) => state.as_str(),
    }
}
