//! WAHA (self-hosted WhatsApp HTTP API) webhook events, normalised into the
//! same messages the generic webhook makes.
//!
//! An event is `{"event", "session", "payload"}`; only `message` events from
//! a client's own chat become messages. Our own outgoing messages (`fromMe`),
//! groups and status broadcasts are acknowledged and ignored.
//! `presence.update` (`payload.presences[].lastKnownPresence`: typing,
//! recording, paused, online, offline) becomes a presence event for the
//! chat's conversation, never a message.

use std::collections::HashMap;

use serde_json::Value;

use super::{normalize_phone, Inbound, IngestError};
use crate::message::{Conv, NewMessage, Presence};

/// What an event carries: a client message, a client's presence, or nothing for us.
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
    match event {
        "message" => Ok(match parse(body, sessions, default_company_id, received_at_ms)? {
            Some(m) => Inbound::Message(m),
            None => Inbound::Ignored,
        }),
        "presence.update" => {
            let p = &root["payload"];
            let chat = p["id"].as_str().ok_or_else(|| invalid("`payload.id` is required"))?;
            if !(chat.ends_with("@c.us") || chat.ends_with("@s.whatsapp.net")) {
                return Ok(Inbound::Ignored);
            }
            let phone =
                normalize_phone(chat).map_err(|e| IngestError::Invalid(format!("`payload.id`: {e}")))?;
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
            Ok(Inbound::Presence { conv: Conv { phone, company_id: company().to_owned() }, presence })
        }
        _ => Ok(Inbound::Ignored),
    }
}

/// The message an event carries, or `None` for events that are not client messages.
pub fn parse(
    body: &[u8],
    sessions: &HashMap<String, String>,
    default_company_id: &str,
    received_at_ms: u64,
) -> Result<Option<NewMessage>, IngestError> {
    let root: Value = serde_json::from_slice(body).map_err(|e| IngestError::Malformed(e.to_string()))?;
    let invalid = |m: &str| IngestError::Invalid(m.to_owned());
    let event = root["event"].as_str().ok_or_else(|| invalid("`event` must be a string"))?;
    if event != "message" {
        return Ok(None);
    }
    let p = &root["payload"];
    if !p.is_object() {
        return Err(invalid("`payload` must be an object"));
    }
    if p["fromMe"].as_bool() == Some(true) {
        return Ok(None);
    }
    let from =
        p["from"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| invalid("`payload.from` is required"))?;
    // Personal chats only: "…@c.us" (or the newer "…@s.whatsapp.net").
    if !(from.ends_with("@c.us") || from.ends_with("@s.whatsapp.net")) {
        return Ok(None);
    }
    let id = p["id"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| invalid("`payload.id` is required"))?;
    let phone = normalize_phone(from).map_err(|e| IngestError::Invalid(format!("`payload.from`: {e}")))?;
    let body_text = p["body"].as_str().unwrap_or("").trim();
    let has_media = p["hasMedia"].as_bool().unwrap_or(false);
    let (kind, text) = match (has_media, body_text.is_empty()) {
        (true, true) => ("media", "[media]".to_owned()),
        (true, false) => ("media", format!("[media] {body_text}")),
        (false, false) => ("text", body_text.to_owned()),
        (false, true) => return Ok(None), // nothing to answer
    };
    let company_id = root["session"]
        .as_str()
        .and_then(|s| sessions.get(s))
        .map(String::as_str)
        .unwrap_or(default_company_id);
    Ok(Some(NewMessage {
        id: id.to_owned(),
        conv: Conv { phone, company_id: company_id.to_owned() },
        kind: kind.to_owned(),
        text,
        timestamp: p["timestamp"].as_i64(),
        received_at_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let ack =
            serde_json::to_vec(&serde_json::json!({"event": "message.ack", "payload": {"id": "m"}})).unwrap();
        assert_eq!(parse(&ack, &sessions, "d", 1).unwrap(), None);
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
                Inbound::Presence { conv: conv.clone(), presence },
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
}
