//! WAHA's events, fuzzed: the shapes of `ingest::waha` and
//! `tests/fixtures/waha` (NOWEB, GOWS and WEBJS) — client messages, staff's
//! and our own echoes, presence, acks, a session that started.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::{assert_capped, capped, chat, config, damaged, damages, json_value, text, Chat, DEFAULT, NOW_MS};
use crate::ingest::{waha, Inbound, IngestError, Lid, Receipt, Staff};
use crate::message::{Conv, NewMessage, Presence};
use crate::store::{Delivery, Failure};

const KEYS: &[&str] = &[
    "event",
    "session",
    "payload",
    "id",
    "timestamp",
    "from",
    "to",
    "fromMe",
    "source",
    "body",
    "hasMedia",
    "_data",
    "key",
    "remoteJidAlt",
    "Info",
    "SenderAlt",
    "RecipientAlt",
    "presences",
    "participant",
    "lastKnownPresence",
    "ack",
    "status",
];

fn parse(body: &[u8]) -> Result<Vec<Inbound>, IngestError> {
    let sessions = HashMap::from([("default".to_owned(), "962302".to_owned())]);
    capped(waha::parse_event(body, &sessions, DEFAULT, NOW_MS).map(|e| vec![e]))
}

fn session() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        Just(("default".to_owned(), "962302".to_owned())),
        Just(("other".to_owned(), DEFAULT.to_owned()))
    ]
}

/// Where each engine puts the chat's other identity.
fn with_alt(payload: &mut Value, alt: &Option<String>, engine: usize, from_me: bool) {
    let Some(alt) = alt else { return };
    match engine {
        0 => payload["_data"] = json!({"key": {"remoteJid": payload["from"], "remoteJidAlt": alt}}),
        _ => {
            let field = if from_me { "RecipientAlt" } else { "SenderAlt" };
            payload["_data"] = json!({"Info": {field: alt}});
        }
    }
}

/// A client's message (text or media) or one from the salon's side, and
/// what it becomes.
fn message(session: String, company: String) -> impl Strategy<Value = (Value, Inbound)> {
    let timestamp = proptest::option::of(0..=(NOW_MS / 1000) as i64);
    let source = proptest::sample::select(&["app", "api"]);
    (chat("c.us"), "[A-Za-z0-9_@.]{1,80}", text(), any::<bool>(), timestamp, 0..2usize, any::<bool>(), source)
        .prop_map(
            move |(Chat { jid, alt, phone, lid }, id, words, media, timestamp, engine, from_me, source)| {
                let (kind, said) = if media {
                    ("media", format!("[media] {}", words.trim()))
                } else {
                    ("text", words.trim().to_owned())
                };
                let mut p =
                    json!({"id": id, "from": jid, "fromMe": from_me, "body": words, "hasMedia": media});
                if let Some(t) = timestamp {
                    p["timestamp"] = json!(t);
                }
                let conv = Conv { phone, company_id: company.clone() };
                let want = if from_me {
                    // WEBJS: `from` is the salon, `to` the chat.
                    p["from"] = json!("74950000000@c.us");
                    p["to"] = json!(jid);
                    p["source"] = json!(source);
                    Inbound::Staff(Staff {
                        conv,
                        lid,
                        id,
                        text: said,
                        source: Some(source.into()),
                        by: "waha",
                    })
                } else {
                    let m = NewMessage {
                        id,
                        conv,
                        kind: kind.into(),
                        text: said,
                        timestamp,
                        received_at_ms: NOW_MS,
                    };
                    Inbound::Message(m, lid)
                };
                with_alt(&mut p, &alt, engine, from_me);
                let event = if from_me { "message.any" } else { "message" };
                (json!({"event": event, "session": session, "payload": p}), want)
            },
        )
}

/// A chat's presence (keyed by the LID in a LID chat), and what it becomes.
fn presence(session: String, company: String) -> impl Strategy<Value = (Value, Inbound)> {
    let state = proptest::sample::select(&[
        ("typing", Presence::Typing),
        ("recording", Presence::Typing),
        ("paused", Presence::Paused),
        ("online", Presence::Paused),
        ("offline", Presence::Paused),
    ]);
    (chat("c.us"), state).prop_map(move |(Chat { jid, phone, lid, .. }, (name, presence))| {
        // A presence carries no alt: a LID chat is the LID's own conversation.
        let (phone, lid) = match lid {
            Some(l) if jid.ends_with("@lid") => (format!("{}@lid", l.lid), Some(Lid { lid: l.lid, phone: None })),
            _ => (phone, None),
        };
        let payload = json!({"id": jid, "presences": [{"participant": jid, "lastKnownPresence": name, "lastSeen": null}]});
        let conv = Conv { phone, company_id: company.clone() };
        (json!({"event": "presence.update", "session": session, "payload": payload}), Inbound::Presence { conv, presence, lid })
    })
}

/// An ack of one of our messages (its id long or short), and the receipt.
fn ack() -> impl Strategy<Value = (Value, Inbound)> {
    let state = proptest::sample::select(&[
        (-1, Delivery::Failed),
        (1, Delivery::Server),
        (2, Delivery::Delivered),
        (3, Delivery::Read),
        (4, Delivery::Played),
    ]);
    ("3EB0[A-F0-9]{10,30}", any::<bool>(), state, proptest::option::of(0..=NOW_MS)).prop_map(
        |(short, long, (ack, state), at)| {
            let id = if long { format!("true_79001234567@c.us_{short}") } else { short.clone() };
            let mut event =
                json!({"event": "message.ack", "session": "default", "payload": {"id": id, "ack": ack}});
            if let Some(at) = at {
                event["timestamp"] = json!(at);
            }
            let at_ms = at.unwrap_or(NOW_MS);
            let failure = (state == Delivery::Failed).then(|| Failure {
                code: None,
                title: "WAHA reported ack ERROR".into(),
                at_ms,
            });
            (event, Inbound::Receipt(Receipt { id: short, state, at_ms, failure }))
        },
    )
}

/// Any event WAHA sends us, and what it becomes.
fn event() -> impl Strategy<Value = (Value, Inbound)> {
    session().prop_flat_map(|(session, company)| {
        let started = (
            json!({"event": "session.status", "session": session, "payload": {"status": "WORKING"}}),
            Inbound::SessionStarted(session.clone()),
        );
        prop_oneof![
            4 => message(session.clone(), company.clone()),
            2 => presence(session, company),
            2 => ack(),
            1 => Just(started),
        ]
    })
}

proptest! {
    #![proptest_config(config(1.0))]

    #[test]
    fn waha_refuses_arbitrary_bytes_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(events) = parse(&body) {
            assert_capped(&events)?;
        }
    }

    #[test]
    fn waha_accepts_only_capped_events_of_any_json(value in json_value(KEYS)) {
        if let Ok(events) = parse(value.to_string().as_bytes()) {
            assert_capped(&events)?;
        }
    }

    #[test]
    fn waha_takes_a_well_formed_event_as_sent((body, want) in event()) {
        let got = parse(body.to_string().as_bytes()).map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
        assert_capped(&got)?;
        prop_assert_eq!(got, vec![want]);
    }

    #[test]
    fn waha_accepts_only_capped_events_of_damaged_events((body, _) in event(), damages in damages(KEYS)) {
        if let Ok(events) = parse(damaged(body, &damages).to_string().as_bytes()) {
            assert_capped(&events)?;
        }
    }
}
