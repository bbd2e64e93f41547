//! Evolution API webhook events, normalised into the same messages the
//! generic webhook makes.
//!
//! An event is `{"event", "instance", "data", "apikey", …}` (Evolution 2.3,
//! `ChannelStartupService.sendDataWebhook`); the event name comes dotted
//! (`messages.upsert`), upper case in older versions (`MESSAGES_UPSERT`).
//! `messages.upsert` from a client's own chat is a message: `conversation`
//! or `extendedTextMessage.text`, or a medium (image, video, document,
//! audio) with its caption. The chat is `key.remoteJid`: a phone's jid, or —
//! Baileys 7, a client whose number WhatsApp hides — a LID (`…@lid`), with
//! the phone in `key.remoteJidAlt` when WhatsApp reveals it (that field
//! holds "the other identity": the LID in a phone chat, so its suffix
//! decides). Our own messages (`key.fromMe`), groups, broadcasts and other
//! events are acknowledged and ignored. `presence.update`
//! (`data.presences{jid: {lastKnownPresence}}`: composing, recording,
//! paused, available, unavailable; keyed by the LID alone in a LID chat) is a
//! presence event, never a message.

use std::collections::HashMap;

use serde_json::Value;

use super::{chat, Inbound, IngestError, Staff};
use crate::message::{Conv, NewMessage, Presence};

/// The event's name in one spelling: `messages.upsert`.
fn event_name(raw: &str) -> String {
    raw.to_ascii_lowercase().replace('_', ".")
}

/// The `apikey` the event carries (the body's field — `null` unless
/// Evolution's `AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES=true` — or the
/// header a per-instance webhook's `headers` sets).
pub fn api_key<'a>(body: &'a Value, header: Option<&'a str>) -> Option<&'a str> {
    body["apikey"].as_str().or(header)
}

pub fn parse_event(
    root: &Value,
    instances: &HashMap<String, String>,
    default_company_id: &str,
    received_at_ms: u64,
) -> Result<Inbound, IngestError> {
    let invalid = |m: &str| IngestError::Invalid(m.to_owned());
    let event = event_name(root["event"].as_str().ok_or_else(|| invalid("`event` must be a string"))?);
    let company_id = root["instance"]
        .as_str()
        .and_then(|i| instances.get(i))
        .map(String::as_str)
        .unwrap_or(default_company_id)
        .to_owned();
    let data = &root["data"];
    match event.as_str() {
        "messages.upsert" => {
            if !data.is_object() {
                return Err(invalid("`data` must be an object"));
            }
            let key = &data["key"];
            let jid = key["remoteJid"].as_str().ok_or_else(|| invalid("`data.key.remoteJid` is required"))?;
            let Some((phone, lid)) = chat(jid, key["remoteJidAlt"].as_str()) else {
                return Ok(Inbound::Ignored);
            };
            let id = key["id"]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid("`data.key.id` is required"))?;
            let Some((kind, text)) = content(&data["message"]) else { return Ok(Inbound::Ignored) };
            if key["fromMe"].as_bool() == Some(true) {
                // Someone on the salon's phone: Evolution reports its own API
                // sends as `send.message`, never as an upsert.
                let conv = Conv { phone, company_id };
                let source = Some("app".to_owned());
                return Ok(Inbound::Staff(Staff {
                    conv,
                    lid,
                    id: id.to_owned(),
                    text,
                    source,
                    by: "evolution",
                }));
            }
            let timestamp = match &data["messageTimestamp"] {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.parse().ok(),
                // protobuf's Long, as Evolution sometimes passes it through.
                // (A `Map` is read with `get`: indexing one panics on a missing key.)
                Value::Object(long) => long.get("low").and_then(Value::as_i64).map(|low| {
                    (low & 0xffff_ffff) | long.get("high").and_then(Value::as_i64).unwrap_or(0) << 32
                }),
                _ => None,
            };
            let message = NewMessage {
                id: id.to_owned(),
                conv: Conv { phone, company_id },
                kind: kind.to_owned(),
                text,
                timestamp,
                received_at_ms,
            };
            Ok(Inbound::Message(message, lid))
        }
        "messages.update" => {
            use crate::store::{Delivery, Failure};
            // The WhatsApp id is `keyId`; `messageId` is Evolution's own database id.
            let Some(id) = data["keyId"].as_str().filter(|s| !s.is_empty()) else {
                return Ok(Inbound::Ignored);
            };
            if data["fromMe"].as_bool() != Some(true) {
                return Ok(Inbound::Ignored);
            }
            let state = match data["status"].as_str() {
                Some("SERVER_ACK") => Delivery::Server,
                Some("DELIVERY_ACK") => Delivery::Delivered,
                Some("READ") => Delivery::Read,
                Some("PLAYED") => Delivery::Played,
                Some("ERROR") => Delivery::Failed,
                _ => return Ok(Inbound::Ignored), // PENDING, DELETED
            };
            let failure = (state == Delivery::Failed).then(|| Failure {
                code: None,
                title: "Evolution reported status ERROR".into(),
                at_ms: received_at_ms,
            });
            Ok(Inbound::Receipt(super::Receipt { id: id.to_owned(), state, at_ms: received_at_ms, failure }))
        }
        "presence.update" => {
            let jid = data["id"].as_str().ok_or_else(|| invalid("`data.id` is required"))?;
            let Some((phone, lid)) = chat(jid, None) else { return Ok(Inbound::Ignored) };
            let presences =
                data["presences"].as_object().ok_or_else(|| invalid("`data.presences` must be an object"))?;
            let entry = presences.get(jid).or_else(|| presences.values().next());
            let Some(state) = entry.and_then(|p| p["lastKnownPresence"].as_str()) else {
                return Ok(Inbound::Ignored);
            };
            let presence = match state {
                "composing" | "recording" => Presence::Typing,
                "paused" | "available" | "unavailable" => Presence::Paused,
                other => return Err(IngestError::Invalid(format!("unknown lastKnownPresence {other:?}"))),
            };
            Ok(Inbound::Presence { conv: Conv { phone, company_id }, presence, lid })
        }
        _ => Ok(Inbound::Ignored),
    }
}

/// (kind, text) of a message's content; `None` when there is nothing to answer.
fn content(m: &Value) -> Option<(&'static str, String)> {
    let text = |v: &Value| v.as_str().map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned);
    if let Some(t) = text(&m["conversation"]).or_else(|| text(&m["extendedTextMessage"]["text"])) {
        return Some(("text", t));
    }
    for (field, label) in [
        ("imageMessage", "[image]"),
        ("videoMessage", "[video]"),
        ("documentMessage", "[document]"),
        ("audioMessage", "[audio]"),
    ] {
        if m[field].is_object() {
            let caption = text(&m[field]["caption"]);
            return Some(("media", caption.map_or(label.to_owned(), |c| format!("{label} {c}"))));
        }
    }
    // A document sent with a caption is wrapped once more.
    let wrapped = &m["documentWithCaptionMessage"]["message"];
    if wrapped.is_object() {
        return content(wrapped);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Lid;
    use serde_json::json;

    fn upsert(key: Value, message: Value) -> Value {
        json!({"event": "messages.upsert", "instance": "lotos", "apikey": "k",
               "data": {"key": key, "pushName": "Анна", "message": message, "messageTimestamp": 1763800000}})
    }

    fn key(jid: &str, from_me: bool, id: &str) -> Value {
        json!({"remoteJid": jid, "fromMe": from_me, "id": id})
    }

    #[test]
    fn texts_and_captions_become_messages_and_the_rest_is_ignored() {
        let instances = HashMap::from([("lotos".to_owned(), "962302".to_owned())]);
        let parse = |v: &Value| parse_event(v, &instances, "d", 1).unwrap();
        let jid = "79001234567@s.whatsapp.net";
        let Inbound::Message(m, _) = parse(&upsert(key(jid, false, "E1"), json!({"conversation": "Привет"})))
        else {
            panic!("a message")
        };
        assert_eq!(
            (m.id.as_str(), m.conv.phone.as_str(), m.conv.company_id.as_str()),
            ("E1", "79001234567", "962302")
        );
        assert_eq!((m.text.as_str(), m.kind.as_str(), m.timestamp), ("Привет", "text", Some(1763800000)));
        let extended =
            upsert(key(jid, false, "E2"), json!({"extendedTextMessage": {"text": "можно на завтра?"}}));
        assert!(matches!(parse(&extended), Inbound::Message(m, _) if m.text == "можно на завтра?"));
        let photo = upsert(
            key(jid, false, "E3"),
            json!({"imageMessage": {"caption": "вот такую", "mimetype": "image/jpeg"}}),
        );
        assert!(
            matches!(parse(&photo), Inbound::Message(m, _) if m.text == "[image] вот такую" && m.kind == "media")
        );
        let voice = upsert(key(jid, false, "E4"), json!({"audioMessage": {"seconds": 4}}));
        assert!(matches!(parse(&voice), Inbound::Message(m, _) if m.text == "[audio]"));
        let doc = upsert(
            key(jid, false, "E5"),
            json!({"documentWithCaptionMessage": {"message": {"documentMessage": {"caption": "прайс"}}}}),
        );
        assert!(matches!(parse(&doc), Inbound::Message(m, _) if m.text == "[document] прайс"));
        // Upper-case event names, as per-event webhooks send them.
        let mut upper = upsert(key(jid, false, "E6"), json!({"conversation": "да"}));
        upper["event"] = json!("MESSAGES_UPSERT");
        assert!(matches!(parse(&upper), Inbound::Message(_, _)));

        // protobuf's Long, with its halves or without them (a panic once).
        let mut long = upsert(key(jid, false, "E10"), json!({"conversation": "да"}));
        long["data"]["messageTimestamp"] = json!({"low": -1_000_000_000, "high": 0});
        assert!(matches!(parse(&long), Inbound::Message(m, _) if m.timestamp == Some(3_294_967_296)));
        long["data"]["messageTimestamp"] = json!({"high": 1});
        assert!(matches!(parse(&long), Inbound::Message(m, _) if m.timestamp.is_none()));

        let mine = upsert(key(jid, true, "E7"), json!({"conversation": "Записали вас"}));
        assert!(matches!(parse(&mine), Inbound::Staff(s) if s.text == "Записали вас" && s.by == "evolution"));
        let group =
            upsert(key("120363025246125486@g.us", false, "E8"), json!({"conversation": "всем привет"}));
        assert_eq!(parse(&group), Inbound::Ignored);
        let sticker = upsert(key(jid, false, "E9"), json!({"stickerMessage": {}}));
        assert_eq!(parse(&sticker), Inbound::Ignored);
        let update = json!({"event": "messages.update", "instance": "lotos", "data": {"status": "READ"}});
        assert_eq!(parse(&update), Inbound::Ignored);
    }

    #[test]
    fn presence_updates_and_bad_events() {
        let instances = HashMap::new();
        let jid = "79001234567@s.whatsapp.net";
        let presence = |state: &str| {
            json!({"event": "presence.update", "instance": "x",
                   "data": {"id": jid, "presences": {jid: {"lastKnownPresence": state, "lastSeen": null}}}})
        };
        let conv = Conv { phone: "79001234567".into(), company_id: "d".into() };
        for (state, p) in [
            ("composing", Presence::Typing),
            ("recording", Presence::Typing),
            ("paused", Presence::Paused),
            ("available", Presence::Paused),
            ("unavailable", Presence::Paused),
        ] {
            assert_eq!(
                parse_event(&presence(state), &instances, "d", 1).unwrap(),
                Inbound::Presence { conv: conv.clone(), presence: p, lid: None },
                "{state}"
            );
        }
        assert!(matches!(
            parse_event(&presence("dancing"), &instances, "d", 1),
            Err(IngestError::Invalid(_))
        ));
        let no_id = upsert(json!({"remoteJid": jid}), json!({"conversation": "x"}));
        assert!(matches!(parse_event(&no_id, &instances, "d", 1), Err(IngestError::Invalid(_))));
        assert!(matches!(
            parse_event(&json!({"data": {}}), &instances, "d", 1),
            Err(IngestError::Invalid(_))
        ));
        assert_eq!(api_key(&json!({"apikey": "a"}), Some("b")), Some("a"));
        assert_eq!(api_key(&json!({}), Some("b")), Some("b"));
        assert_eq!(api_key(&json!({"apikey": null}), Some("b")), Some("b"), "Evolution's default body");
    }

    /// A fixture built from Evolution 2.3.6's and Baileys 7's own code
    /// (`tests/fixtures/PROVENANCE.md` says where each field comes from).
    fn fixture(name: &str) -> Value {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/evolution").join(name);
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    }

    #[test]
    fn the_senders_own_shapes_lid_chats_and_all() {
        let instances = HashMap::from([("turnstile-main".to_owned(), "962302".to_owned())]);
        let parse = |name: &str| parse_event(&fixture(name), &instances, "d", 1).unwrap();
        let Inbound::Message(m, _) = parse("messages-upsert.pn-conversation.json") else {
            panic!("a phone chat")
        };
        assert_eq!((m.conv.phone.as_str(), m.conv.company_id.as_str()), ("79001234567", "962302"));
        // A LID chat whose phone WhatsApp revealed: the phone's conversation, and the link.
        let Inbound::Message(m, Some(lid)) = parse("messages-upsert.lid-with-alt.json") else {
            panic!("a LID chat")
        };
        assert_eq!(m.conv.phone, "79007654321");
        assert_eq!(lid, Lid { lid: "98765432109876".into(), phone: Some("79007654321".into()) });
        // Hidden: the LID's own conversation, never mistaken for a phone.
        let Inbound::Message(m, Some(lid)) = parse("messages-upsert.lid-hidden.json") else {
            panic!("a LID chat")
        };
        assert!(m.conv.is_lid(), "{}", m.conv.phone);
        assert_eq!((lid.phone, format!("{}@lid", lid.lid)), (None, m.conv.phone.clone()));
        let Inbound::Presence { conv, presence, lid: Some(lid) } = parse("presence-update.lid.json") else {
            panic!("a LID chat's presence")
        };
        assert_eq!(
            (conv.phone.as_str(), presence, lid.phone),
            ("98765432109876@lid", Presence::Typing, None)
        );
        assert!(matches!(
            parse("presence-update.pn-available.json"),
            Inbound::Presence { presence: Presence::Paused, .. }
        ));
        assert!(
            matches!(parse("messages-upsert.pn-image-caption.json"), Inbound::Message(m, _) if m.kind == "media")
        );
        assert!(
            matches!(parse("messages-upsert.pn-extended-text.json"), Inbound::Message(m, _) if m.kind == "text")
        );
        assert_eq!(parse("messages-upsert.group.json"), Inbound::Ignored);
        let Inbound::Staff(staff) = parse("messages-upsert.from-me-phone.json") else {
            panic!("staff on the phone")
        };
        assert_eq!((staff.conv.phone.as_str(), staff.source.as_deref()), ("79001234567", Some("app")));
        assert_eq!(parse("send-message.api-echo.json"), Inbound::Ignored);
        assert_eq!(
            fixture("messages-upsert.pn-conversation.json")["apikey"],
            Value::Null,
            "the default: no key in the body"
        );
    }
}
