//! WhatsApp Cloud API (Meta) webhook deliveries, normalised into the same
//! messages the generic webhook makes.
//!
//! A delivery is `{"object", "entry": [{"changes": [{"field", "value"}]}]}`;
//! `value.messages[]` are client messages (several may come at once),
//! `value.statuses[]` are delivery receipts for our replies (ignored here),
//! `value.metadata.phone_number_id` says which business number — and so
//! which company — was written to. With coexistence (the salon also uses the
//! WhatsApp Business app on that number), the `smb_message_echoes` field's
//! `value.message_echoes[]` are what staff sent from the app: the business
//! number in `from`, the client in `to` (Meta never echoes Cloud API sends).

use std::collections::HashMap;

use serde_json::Value;

use super::{normalize_phone, Inbound, IngestError, Receipt, Staff};
use crate::message::{Conv, NewMessage};

/// The events of one delivery, in delivery order: client messages, and
/// staff messages from the Business app. `received_at_ms` is set by the caller.
pub fn parse(
    body: &[u8],
    companies: &HashMap<String, String>,
    default_company_id: &str,
    received_at_ms: u64,
) -> Result<Vec<Inbound>, IngestError> {
    let root: Value = serde_json::from_slice(body).map_err(|e| IngestError::Malformed(e.to_string()))?;
    let invalid = |m: String| IngestError::Invalid(m);
    let entries = root["entry"].as_array().ok_or_else(|| invalid("`entry` must be an array".into()))?;
    let mut out = Vec::new();
    for (e, entry) in entries.iter().enumerate() {
        let changes = entry["changes"].as_array().map(Vec::as_slice).unwrap_or_default();
        for (c, change) in changes.iter().enumerate() {
            let value = &change["value"];
            let company_id = value["metadata"]["phone_number_id"]
                .as_str()
                .and_then(|id| companies.get(id))
                .map(String::as_str)
                .unwrap_or(default_company_id);
            if change["field"] == "smb_message_echoes" {
                let echoes = value["message_echoes"].as_array().map(Vec::as_slice).unwrap_or_default();
                for (m, msg) in echoes.iter().enumerate() {
                    let at = format!("entry[{e}].changes[{c}].value.message_echoes[{m}]");
                    let field = |name: &str| {
                        msg[name]
                            .as_str()
                            .filter(|s| !s.is_empty())
                            .ok_or_else(|| invalid(format!("{at}.{name} must be a non-empty string")))
                    };
                    let phone =
                        normalize_phone(field("to")?).map_err(|err| invalid(format!("{at}.to: {err}")))?;
                    let kind = msg["type"].as_str().unwrap_or("unknown");
                    out.push(Inbound::Staff(Staff {
                        conv: Conv { phone, company_id: company_id.to_owned() },
                        lid: None,
                        id: field("id")?.to_owned(),
                        text: text_of(kind, msg),
                        source: Some("app".to_owned()),
                        by: "meta",
                    }));
                }
                continue;
            }
            if change["field"].as_str().is_some_and(|f| f != "messages") {
                continue;
            }
            let statuses = value["statuses"].as_array().map(Vec::as_slice).unwrap_or_default();
            for (i, st) in statuses.iter().enumerate() {
                out.extend(
                    status(st, received_at_ms)
                        .map_err(|m| invalid(format!("entry[{e}].changes[{c}].value.statuses[{i}]{m}")))?,
                );
            }
            let messages = value["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
            for (m, msg) in messages.iter().enumerate() {
                let at = format!("entry[{e}].changes[{c}].value.messages[{m}]");
                let field = |name: &str| {
                    msg[name]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| invalid(format!("{at}.{name} must be a non-empty string")))
                };
                let id = field("id")?;
                let phone =
                    normalize_phone(field("from")?).map_err(|err| invalid(format!("{at}.from: {err}")))?;
                let timestamp = msg["timestamp"].as_str().and_then(|t| t.parse::<i64>().ok());
                let kind = msg["type"].as_str().unwrap_or("unknown");
                let text = text_of(kind, msg);
                if text.is_empty() {
                    // A text message with no text: nothing to answer (as
                    // WAHA and Evolution have it).
                    continue;
                }
                let message = NewMessage {
                    id: id.to_owned(),
                    conv: Conv { phone, company_id: company_id.to_owned() },
                    kind: kind.to_owned(),
                    text,
                    timestamp,
                    received_at_ms,
                };
                out.push(Inbound::Message(message, None));
            }
        }
    }
    Ok(out)
}

/// A `statuses[]` entry: sent, delivered, read, failed (with its first error).
fn status(st: &Value, received_at_ms: u64) -> Result<Option<Inbound>, String> {
    use crate::store::{Delivery, Failure};
    let id = st["id"].as_str().filter(|s| !s.is_empty()).ok_or(".id must be a non-empty string")?;
    // Unix seconds; a number of them no millisecond clock holds is no time.
    let at_ms = st["timestamp"]
        .as_str()
        .and_then(|t| t.parse::<u64>().ok())
        .and_then(|t| t.checked_mul(1000))
        .unwrap_or(received_at_ms);
    let state = match st["status"].as_str() {
        Some("sent") => Delivery::Server,
        Some("delivered") => Delivery::Delivered,
        Some("read") => Delivery::Read,
        Some("played") => Delivery::Played,
        Some("failed") => Delivery::Failed,
        _ => return Ok(None),
    };
    let failure = (state == Delivery::Failed).then(|| {
        let err = &st["errors"][0];
        Failure {
            code: err["code"].as_i64(),
            title: err["title"].as_str().or(err["message"].as_str()).unwrap_or("failed").to_owned(),
            at_ms,
        }
    });
    Ok(Some(Inbound::Receipt(Receipt { id: id.to_owned(), state, at_ms, failure })))
}

/// What the handler reads for a message: the text, or for anything else a
/// bracketed type with whatever words came with it (caption, title, place).
fn text_of(kind: &str, msg: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("").trim().to_owned();
    let tagged =
        |words: String| if words.is_empty() { format!("[{kind}]") } else { format!("[{kind}] {words}") };
    let body = &msg[kind];
    match kind {
        "text" => s(&body["body"]),
        "image" | "video" | "document" | "sticker" => {
            let caption = s(&body["caption"]);
            tagged(if caption.is_empty() { s(&body["filename"]) } else { caption })
        }
        "audio" | "voice" => tagged(String::new()),
        "location" => {
            let place: Vec<String> =
                [s(&body["name"]), s(&body["address"])].into_iter().filter(|p| !p.is_empty()).collect();
            let coords = format!("{},{}", body["latitude"], body["longitude"]);
            tagged(if place.is_empty() { coords } else { format!("{} ({coords})", place.join(", ")) })
        }
        "interactive" => {
            let reply =
                if body["button_reply"].is_object() { &body["button_reply"] } else { &body["list_reply"] };
            tagged(s(&reply["title"]))
        }
        "button" => tagged(s(&body["text"])),
        "reaction" => tagged(s(&body["emoji"])),
        "contacts" => {
            let names: Vec<String> =
                body.as_array().into_iter().flatten().map(|c| s(&c["name"]["formatted_name"])).collect();
            tagged(names.join(", "))
        }
        _ => tagged(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client messages of a delivery.
    fn parse(
        body: &[u8],
        companies: &HashMap<String, String>,
        company: &str,
        at: u64,
    ) -> Result<Vec<NewMessage>, IngestError> {
        Ok(super::parse(body, companies, company, at)?
            .into_iter()
            .filter_map(|i| match i {
                Inbound::Message(m, _) => Some(m),
                _ => None,
            })
            .collect())
    }

    fn delivery(messages: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "74950000000", "phone_number_id": "1055"},
                "messages": messages,
            }}]}],
        }))
        .unwrap()
    }

    #[test]
    fn each_message_type_becomes_text_the_handler_can_read() {
        let body = delivery(serde_json::json!([
            {"from": "79001234567", "id": "wamid.1", "timestamp": "1763800000", "type": "text", "text": {"body": "Привет"}},
            {"from": "79001234567", "id": "wamid.2", "timestamp": "1763800001", "type": "image", "image": {"caption": "вот такую", "mime_type": "image/jpeg", "id": "m1"}},
            {"from": "79001234567", "id": "wamid.3", "timestamp": "1763800002", "type": "audio", "audio": {"id": "m2", "voice": true}},
            {"from": "79001234567", "id": "wamid.4", "timestamp": "1763800003", "type": "location", "location": {"latitude": 55.75, "longitude": 37.61, "name": "Салон", "address": "Тверская, 12"}},
            {"from": "79001234567", "id": "wamid.5", "timestamp": "1763800004", "type": "interactive", "interactive": {"type": "button_reply", "button_reply": {"id": "b1", "title": "Завтра в 15:00"}}},
            {"from": "79001234567", "id": "wamid.6", "timestamp": "1763800005", "type": "sticker", "sticker": {"id": "m3"}},
        ]));
        let companies = HashMap::from([("1055".to_owned(), "962302".to_owned())]);
        let got = parse(&body, &companies, "default", 7).unwrap();
        let texts: Vec<(&str, &str)> = got.iter().map(|m| (m.kind.as_str(), m.text.as_str())).collect();
        assert_eq!(
            texts,
            [
                ("text", "Привет"),
                ("image", "[image] вот такую"),
                ("audio", "[audio]"),
                ("location", "[location] Салон, Тверская, 12 (55.75,37.61)"),
                ("interactive", "[interactive] Завтра в 15:00"),
                ("sticker", "[sticker]"),
            ]
        );
        assert!(got.iter().all(|m| m.conv.company_id == "962302" && m.conv.phone == "79001234567"));
        assert_eq!(got[0].timestamp, Some(1763800000));
    }

    #[test]
    fn status_only_deliveries_have_no_messages_and_unknown_numbers_use_the_default_company() {
        let statuses = serde_json::json!({"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages",
            "value": {"metadata": {"phone_number_id": "9"}, "statuses": [{"id": "wamid.x", "status": "delivered"}]}}]}]});
        assert!(parse(&serde_json::to_vec(&statuses).unwrap(), &HashMap::new(), "d", 0).unwrap().is_empty());
        // A time past any millisecond clock is the receipt's own (an overflow once).
        let far = serde_json::json!({"entry": [{"changes": [{"field": "messages", "value": {"statuses": [
            {"id": "wamid.x", "status": "read", "timestamp": "18446744073709551615"}]}}]}]});
        let receipts = super::parse(&serde_json::to_vec(&far).unwrap(), &HashMap::new(), "d", 7).unwrap();
        assert!(matches!(&receipts[..], [Inbound::Receipt(r)] if r.at_ms == 7));
        let got = parse(&delivery(serde_json::json!([{"from": "79001234567", "id": "w", "type": "text", "text": {"body": "x"}}])), &HashMap::new(), "d", 0).unwrap();
        assert_eq!(got[0].conv.company_id, "d");
    }

    #[test]
    fn malformed_deliveries_are_refused_by_path() {
        let err = |body: &[u8]| match parse(body, &HashMap::new(), "d", 0) {
            Err(IngestError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert!(err(br#"{"object": "x"}"#).contains("entry"));
        let no_id =
            delivery(serde_json::json!([{"from": "79001234567", "type": "text", "text": {"body": "x"}}]));
        assert!(err(&no_id).contains("messages[0].id"));
        assert!(matches!(parse(b"{", &HashMap::new(), "d", 0), Err(IngestError::Malformed(_))));
    }
}
