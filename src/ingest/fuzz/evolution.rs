//! Evolution API's events, fuzzed: the shapes of `ingest::evolution` and
//! `tests/fixtures/evolution` — upserts of texts and media (from clients and
//! from the salon's phone), status updates, presence.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::{assert_capped, capped, chat, config, damaged, damages, json_value, text, Chat, DEFAULT, NOW_MS};
use crate::ingest::{evolution, Inbound, IngestError, Lid, Receipt, Staff};
use crate::message::{Conv, NewMessage, Presence};
use crate::store::{Delivery, Failure};

const KEYS: &[&str] = &[
    "event",
    "instance",
    "data",
    "apikey",
    "key",
    "remoteJid",
    "remoteJidAlt",
    "fromMe",
    "id",
    "pushName",
    "message",
    "conversation",
    "extendedTextMessage",
    "text",
    "imageMessage",
    "videoMessage",
    "documentMessage",
    "audioMessage",
    "caption",
    "documentWithCaptionMessage",
    "messageTimestamp",
    "low",
    "high",
    "keyId",
    "status",
    "presences",
    "lastKnownPresence",
];

/// As `http::webhooks::parse` runs it: JSON first, then the event.
fn parse(body: &[u8]) -> Result<Vec<Inbound>, IngestError> {
    let root: Value = serde_json::from_slice(body).map_err(|e| IngestError::Malformed(e.to_string()))?;
    let instances = HashMap::from([("turnstile-main".to_owned(), "962302".to_owned())]);
    capped(evolution::parse_event(&root, &instances, DEFAULT, NOW_MS).map(|e| vec![e]))
}

fn instance() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        Just(("turnstile-main".to_owned(), "962302".to_owned())),
        Just(("lotos".to_owned(), DEFAULT.to_owned())),
    ]
}

/// A message's content in one of Evolution's shapes, and its (kind, text).
fn content() -> impl Strategy<Value = (Value, &'static str, String)> {
    (text(), 0..5usize).prop_map(|(words, shape)| {
        let t = words.trim().to_owned();
        match shape {
            0 => (json!({"conversation": words}), "text", t),
            1 => (json!({"extendedTextMessage": {"text": words}}), "text", t),
            2 => (
                json!({"imageMessage": {"caption": words, "mimetype": "image/jpeg"}}),
                "media",
                format!("[image] {t}"),
            ),
            3 => (json!({"audioMessage": {"seconds": 4}}), "media", "[audio]".to_owned()),
            _ => (
                json!({"documentWithCaptionMessage": {"message": {"documentMessage": {"caption": words}}}}),
                "media",
                format!("[document] {t}"),
            ),
        }
    })
}

/// The sender's timestamp as a number, a string or protobuf's Long.
fn timestamp() -> impl Strategy<Value = (Value, Option<i64>)> {
    (0..=(NOW_MS / 1000) as i64, 0..4usize).prop_map(|(t, shape)| match shape {
        0 => (json!(t), Some(t)),
        1 => (json!(t.to_string()), Some(t)),
        // Long's `low` is a signed 32-bit half.
        2 => (json!({"low": t as u32 as i32, "high": t >> 32, "unsigned": false}), Some(t)),
        _ => (Value::Null, None),
    })
}

/// An upsert (a client's, or one from the salon's phone), and what it becomes.
fn upsert(instance: String, company: String) -> impl Strategy<Value = (Value, Inbound)> {
    let name = proptest::sample::select(&["messages.upsert", "MESSAGES_UPSERT"]);
    (chat("s.whatsapp.net"), "[A-F0-9]{16,32}", content(), timestamp(), any::<bool>(), name).prop_map(
        move |(Chat { jid, alt, phone, lid }, id, (message, kind, said), (ts, timestamp), from_me, name)| {
            let mut key = json!({"remoteJid": jid, "fromMe": from_me, "id": id});
            if let Some(alt) = alt {
                key["remoteJidAlt"] = json!(alt);
            }
            let data = json!({"key": key, "pushName": "Анна", "message": message, "messageTimestamp": ts});
            let conv = Conv { phone, company_id: company.clone() };
            let want = if from_me {
                Inbound::Staff(Staff {
                    conv,
                    lid,
                    id,
                    text: said,
                    source: Some("app".into()),
                    by: "evolution",
                })
            } else {
                let m =
                    NewMessage { id, conv, kind: kind.into(), text: said, timestamp, received_at_ms: NOW_MS };
                Inbound::Message(m, lid)
            };
            (json!({"event": name, "instance": instance, "apikey": null, "data": data}), want)
        },
    )
}

/// A status of one of our messages, and the receipt.
fn update() -> impl Strategy<Value = (Value, Inbound)> {
    let state = proptest::sample::select(&[
        ("SERVER_ACK", Delivery::Server),
        ("DELIVERY_ACK", Delivery::Delivered),
        ("READ", Delivery::Read),
        ("PLAYED", Delivery::Played),
        ("ERROR", Delivery::Failed),
    ]);
    ("[A-F0-9]{16,32}", state).prop_map(|(id, (status, state))| {
        let data = json!({"keyId": id, "messageId": "cmf1", "fromMe": true, "status": status,
                          "remoteJid": "79001234567@s.whatsapp.net"});
        let failure = (state == Delivery::Failed).then(|| Failure {
            code: None,
            title: "Evolution reported status ERROR".into(),
            at_ms: NOW_MS,
        });
        let want = Inbound::Receipt(Receipt { id, state, at_ms: NOW_MS, failure });
        (json!({"event": "messages.update", "instance": "turnstile-main", "data": data}), want)
    })
}

/// A chat's presence (keyed by the LID alone in a LID chat), and what it becomes.
fn presence(instance: String, company: String) -> impl Strategy<Value = (Value, Inbound)> {
    let state = proptest::sample::select(&[
        ("composing", Presence::Typing),
        ("recording", Presence::Typing),
        ("paused", Presence::Paused),
        ("available", Presence::Paused),
        ("unavailable", Presence::Paused),
    ]);
    (chat("s.whatsapp.net"), state).prop_map(move |(Chat { jid, phone, lid, .. }, (name, presence))| {
        let (phone, lid) = match lid {
            Some(l) if jid.ends_with("@lid") => {
                (format!("{}@lid", l.lid), Some(Lid { lid: l.lid, phone: None }))
            }
            _ => (phone, None),
        };
        let data =
            json!({"id": jid, "presences": {jid.clone(): {"lastKnownPresence": name, "lastSeen": null}}});
        let conv = Conv { phone, company_id: company.clone() };
        let event = json!({"event": "presence.update", "instance": instance, "data": data});
        (event, Inbound::Presence { conv, presence, lid })
    })
}

fn event() -> impl Strategy<Value = (Value, Inbound)> {
    instance().prop_flat_map(|(instance, company)| {
        prop_oneof![
            4 => upsert(instance.clone(), company.clone()),
            1 => update(),
            2 => presence(instance, company),
        ]
    })
}

proptest! {
    #![proptest_config(config(1.0))]

    #[test]
    fn evolution_refuses_arbitrary_bytes_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(events) = parse(&body) {
            assert_capped(&events)?;
        }
    }

    #[test]
    fn evolution_accepts_only_capped_events_of_any_json(value in json_value(KEYS)) {
        if let Ok(events) = parse(value.to_string().as_bytes()) {
            assert_capped(&events)?;
        }
    }

    #[test]
    fn evolution_takes_a_well_formed_event_as_sent((body, want) in event()) {
        let got = parse(body.to_string().as_bytes()).map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
        assert_capped(&got)?;
        prop_assert_eq!(got, vec![want]);
    }

    #[test]
    fn evolution_accepts_only_capped_events_of_damaged_events((body, _) in event(), damages in damages(KEYS)) {
        if let Ok(events) = parse(damaged(body, &damages).to_string().as_bytes()) {
            assert_capped(&events)?;
        }
    }
}
