//! WAHA (self-hosted WhatsApp HTTP API) webhook events, normalised into the
//! same messages the generic webhook makes.
//!
//! An event is `{"event", "session", "payload"}` (WAHA 2025–2026,
//! `WebhookSender`). `message` events — and `message.any` ones not sent by
//! us (it carries everyone's) — from a client's own chat become messages.
//! The chat is `payload.from`: a phone's `…@c.us`, or a LID (`…@lid`) for a
//! client whose number WhatsApp hides; the phone, when WhatsApp reveals it,
//! is where each engine puts it — NOWEB `_data.key.remoteJidAlt`, GOWS
//! `_data.Info.SenderAlt` (both "the other identity": a LID in a phone chat),
//! WEBJS nowhere. Our own messages (`fromMe`), groups and status broadcasts
//! are acknowledged and ignored. `presence.update`
//! (`payload.presences[].lastKnownPresence`: typing, recording, paused,
//! online, offline; keyed by the LID in a LID chat) becomes a presence event
//! for the chat's conversation, never a message. `session.status` with
//! `WORKING` says the session (re)started.

use std::collections::HashMap;

use serde_json::Value;

use super::{chat, Inbound, IngestError, Staff};
use crate::message::{Conv, NewMessage, Presence};

/// What an event carries: a client message, a client's presence, a session
/// that started working, or nothing for us.
pub fn parse_event(
    body: &[u8],
    sessions: &HashMap<String, String>,
    default_company_id: &str,
    received_at_ms: u64,
) -> Result<Inbound, IngestError> {
    let root: Value = serde_json::from_slice(body).map_err(|e| IngestError::Malformed(e.to_string()))?;
    let invalid = |m: &str| IngestError::Invalid(m.to_owned());
    let event = root["event"].as_str().ok_or_else(|| invalid("`event` must be a string"))?;
    let company = || {
        root["session"]
            .as_str()
            .and_then(|s| sessions.get(s))
            .map(String::as_str)
            .unwrap_or(default_company_id)
    };
    let p = &root["payload"];
    match event {
        "message" | "message.any" => message(p, company(), received_at_ms),
        "presence.update" => {
            let jid = p["id"].as_str().ok_or_else(|| invalid("`payload.id` is required"))?;
            let Some((phone, lid)) = chat(jid, None) else { return Ok(Inbound::Ignored) };
            let presences =
                p["presences"].as_array().ok_or_else(|| invalid("`payload.presences` must be an array"))?;
            // The chat's own participant; the last one listed if several.
            let Some(state) = presences.iter().rev().find_map(|x| x["lastKnownPresence"].as_str()) else {
                return Ok(Inbound::Ignored);
            };
            let presence = match state {
                "typing" | "recording" => Presence::Typing,
                "paused" | "online" | "offline" => Presence::Paused,
                other => return Err(IngestError::Invalid(format!("unknown lastKnownPresence {other:?}"))),
            };
            Ok(Inbound::Presence { conv: Conv { phone, company_id: company().to_owned() }, presence, lid })
        }
        "message.ack" => {
            use crate::store::{Delivery, Failure};
            let id = p["id"]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid("`payload.id` is required"))?;
            let state = match p["ack"].as_i64() {
                Some(-1) => Delivery::Failed,
                Some(1) => Delivery::Server,
                Some(2) => Delivery::Delivered,
                Some(3) => Delivery::Read,
                Some(4) => Delivery::Played,
                Some(_) => return Ok(Inbound::Ignored), // pending
                None => return Err(invalid("`payload.ack` must be a number")),
            };
            let at_ms = root["timestamp"].as_u64().unwrap_or(received_at_ms);
            let failure = (state == Delivery::Failed).then(|| Failure {
                code: None,
                title: "WAHA reported ack ERROR".into(),
                at_ms,
            });
            let id = crate::gateway::short_id(id).to_owned();
            Ok(Inbound::Receipt(super::Receipt { id, state, at_ms, failure }))
        }
        "session.status" if p["status"] == "WORKING" => match root["session"].as_str() {
            Some(session) => Ok(Inbound::SessionStarted(session.to_owned())),
            None => Ok(Inbound::Ignored),
        },
        _ => Ok(Inbound::Ignored),
    }
}

/// What a `message` payload carries: a client's message, one from the
/// salon's side of the chat (`fromMe`: staff, or our own send echoed), or
/// nothing to answer.
fn message(p: &Value, company_id: &str, received_at_ms: u64) -> Result<Inbound, IngestError> {
    let invalid = |m: &str| IngestError::Invalid(m.to_owned());
    if !p.is_object() {
        return Err(invalid("`payload` must be an object"));
    }
    let from_me = p["fromMe"].as_bool() == Some(true);
    let from =
        p["from"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| invalid("`payload.from` is required"))?;
    // Our side's messages name the chat in `to` on WEBJS (`from` is us), in
    // `from` on NOWEB and GOWS.
    let jid = match p["to"].as_str() {
        Some(to) if from_me && !to.is_empty() => to,
        _ => from,
    };
    let alt = p["_data"]["key"]["remoteJidAlt"]
        .as_str()
        .or(p["_data"]["Info"][if from_me { "RecipientAlt" } else { "SenderAlt" }].as_str());
    // Personal chats only: a phone's or a LID's.
    let Some((phone, lid)) = chat(jid, alt.filter(|a| !a.is_empty())) else { return Ok(Inbound::Ignored) };
    let id = p["id"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| invalid("`payload.id` is required"))?;
    let body_text = p["body"].as_str().unwrap_or("").trim();
    let has_media = p["hasMedia"].as_bool().unwrap_or(false);
    let (kind, text) = match (has_media, body_text.is_empty()) {
        (true, true) => ("media", "[media]".to_owned()),
        (true, false) => ("media", format!("[media] {body_text}")),
        (false, false) => ("text", body_text.to_owned()),
        (false, true) => return Ok(Inbound::Ignored), // nothing to answer
    };
    let conv = Conv { phone, company_id: company_id.to_owned() };
    if from_me {
        let source = p["source"].as_str().map(str::to_owned);
        return Ok(Inbound::Staff(Staff { conv, lid, id: id.to_owned(), text, source, by: "waha" }));
    }
    let message = NewMessage {
        id: id.to_owned(),
        conv,
        kind: kind.to_owned(),
        text,
        timestamp: p["timestamp"].as_i64(),
        received_at_ms,
    };
    Ok(Inbound::Message(message, lid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message an event carries, if any.
    fn parse(
        body: &[u8],
        sessions: &HashMap<String, String>,
        company: &str,
        at: u64,
    ) -> Result<Option<NewMessage>, IngestError> {
        Ok(match parse_event(body, sessions, company, at)? {
            Inbound::Message(m, _) => Some(m),
            _ => None,
        })
    }

    fn event(payload: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"event": "message", "session": "salon", "payload": payload}))
            .unwrap()
    }

    #[test]
    fn messages_media_and_what_is_ignored() {
        let sessions = HashMap::from([("salon".to_owned(), "962302".to_owned())]);
        let text = event(serde_json::json!({"id": "false_79001234567@c.us_AAA", "timestamp": 1763800000,
            "from": "79001234567@c.us", "fromMe": false, "body": "Привет", "hasMedia": false}));
        let m = parse(&text, &sessions, "d", 1).unwrap().unwrap();
        assert_eq!(
            (m.conv.phone.as_str(), m.conv.company_id.as_str(), m.text.as_str()),
            ("79001234567", "962302", "Привет")
        );
        assert_eq!(m.timestamp, Some(1763800000));

        let media = event(
            serde_json::json!({"id": "m2", "from": "79001234567@c.us", "body": "фото", "hasMedia": true}),
        );
        assert_eq!(parse(&media, &sessions, "d", 1).unwrap().unwrap().text, "[media] фото");

        let mine =
            event(serde_json::json!({"id": "m3", "from": "79001234567@c.us", "fromMe": true, "body": "x"}));
        assert_eq!(parse(&mine, &sessions, "d", 1).unwrap(), None);
        let group = event(serde_json::json!({"id": "m4", "from": "120363025246125486@g.us", "body": "x"}));
        assert_eq!(parse(&group, &sessions, "d", 1).unwrap(), None);
        // An ack is a receipt, never a message; one without its state is refused.
        let ack = |payload: serde_json::Value| {
            serde_json::to_vec(&serde_json::json!({"event": "message.ack", "payload": payload})).unwrap()
        };
        assert_eq!(parse(&ack(serde_json::json!({"id": "m", "ack": 3})), &sessions, "d", 1).unwrap(), None);
        assert!(parse(&ack(serde_json::json!({"id": "m"})), &sessions, "d", 1).is_err());
    }

    #[test]
    fn presence_updates_become_presence_never_messages() {
        let sessions = HashMap::from([("salon".to_owned(), "962302".to_owned())]);
        let update = |state: &str| {
            serde_json::to_vec(&serde_json::json!({"event": "presence.update", "session": "salon", "payload": {
                "id": "79001234567@c.us",
                "presences": [{"participant": "79001234567@c.us", "lastKnownPresence": state, "lastSeen": null}]}}))
            .unwrap()
        };
        let conv = Conv { phone: "79001234567".into(), company_id: "962302".into() };
        for (state, presence) in [
            ("typing", Presence::Typing),
            ("recording", Presence::Typing),
            ("paused", Presence::Paused),
            ("online", Presence::Paused),
            ("offline", Presence::Paused),
        ] {
            assert_eq!(
                parse_event(&update(state), &sessions, "d", 1).unwrap(),
                Inbound::Presence { conv: conv.clone(), presence, lid: None },
                "{state}"
            );
            assert_eq!(parse(&update(state), &sessions, "d", 1).unwrap(), None, "not a message");
        }
        assert!(matches!(parse_event(&update("dancing"), &sessions, "d", 1), Err(IngestError::Invalid(_))));
        let group = serde_json::to_vec(&serde_json::json!({"event": "presence.update", "payload": {
            "id": "120363025246125486@g.us", "presences": [{"lastKnownPresence": "typing"}]}}))
        .unwrap();
        assert_eq!(parse_event(&group, &sessions, "d", 1).unwrap(), Inbound::Ignored);
    }

    #[test]
    fn malformed_events_are_refused() {
        assert!(matches!(parse(b"[", &HashMap::new(), "d", 0), Err(IngestError::Malformed(_))));
        assert!(matches!(
            parse(br#"{"payload": {}}"#, &HashMap::new(), "d", 0),
            Err(IngestError::Invalid(_))
        ));
        let no_id = event(serde_json::json!({"from": "79001234567@c.us", "body": "x"}));
        assert!(matches!(parse(&no_id, &HashMap::new(), "d", 0), Err(IngestError::Invalid(_))));
    }

    /// A fixture built from WAHA's own code, per engine
    /// (`tests/fixtures/PROVENANCE.md` says where each field comes from).
    fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/waha").join(path))
            .unwrap()
    }

    #[test]
    fn each_engines_own_shapes_lid_chats_and_all() {
        let sessions = HashMap::from([("default".to_owned(), "962302".to_owned())]);
        let parse = |name: &str| parse_event(&fixture(name), &sessions, "d", 1).unwrap();
        for engine in ["noweb", "gows", "webjs"] {
            let Inbound::Message(m, _) = parse(&format!("{engine}/message.pn.json")) else {
                panic!("{engine}: a message")
            };
            assert_eq!(
                (m.conv.phone.as_str(), m.conv.company_id.as_str()),
                ("79001234567", "962302"),
                "{engine}"
            );
            let Inbound::Presence { conv, .. } = parse(&format!("{engine}/presence-update.lid.json")) else {
                panic!("{engine}: a presence")
            };
            assert!(conv.is_lid(), "{engine}: keyed by the LID: {}", conv.phone);
            let Inbound::Staff(echo) = parse(&format!("{engine}/message-any.api-echo.json")) else {
                panic!("{engine}: ours")
            };
            assert_eq!(
                (echo.conv.phone.as_str(), echo.source.as_deref()),
                ("79001234567", Some("api")),
                "{engine}"
            );
            let Inbound::Staff(staff) = parse(&format!("{engine}/message-any.from-phone.json")) else {
                panic!("{engine}: staff")
            };
            assert_eq!(
                (staff.conv.phone.as_str(), staff.source.as_deref()),
                ("79001234567", Some("app")),
                "{engine}"
            );
        }
        // NOWEB and GOWS reveal the phone of a LID chat, each its own way.
        for engine in ["noweb", "gows"] {
            let Inbound::Message(m, Some(lid)) = parse(&format!("{engine}/message.lid-with-alt.json")) else {
                panic!("{engine}: a LID chat")
            };
            assert_eq!(
                (m.conv.phone.as_str(), lid.phone.as_deref()),
                ("79007654321", Some("79007654321")),
                "{engine}"
            );
            let Inbound::Message(m, Some(lid)) = parse(&format!("{engine}/message.lid-hidden.json")) else {
                panic!("{engine}: a hidden number")
            };
            assert_eq!((m.conv.is_lid(), lid.phone), (true, None), "{engine}");
        }
        let Inbound::Message(m, Some(lid)) = parse("webjs/message.lid.json") else {
            panic!("WEBJS: a LID chat")
        };
        assert_eq!(
            (m.conv.phone.as_str(), lid.phone),
            ("98765432109876@lid", None),
            "WEBJS says nothing of the phone"
        );
        let started =
            br#"{"event": "session.status", "session": "default", "payload": {"status": "WORKING"}}"#;
        assert_eq!(
            parse_event(started, &sessions, "d", 1).unwrap(),
            Inbound::SessionStarted("default".into())
        );
    }
}
