//! Meta's (WhatsApp Cloud API) deliveries, fuzzed: the shapes of
//! `ingest::meta` and `tests/fixtures/meta` — entries of changes of client
//! messages of each type, statuses, and the Business app's echoes.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::{assert_capped, capped, config, damaged, damages, json_value, phone, text, DEFAULT, NOW_MS};
use crate::ingest::{meta, Inbound, IngestError, Receipt, Staff};
use crate::message::{Conv, NewMessage};
use crate::store::{Delivery, Failure};

const KEYS: &[&str] = &[
    "object",
    "entry",
    "id",
    "changes",
    "field",
    "value",
    "metadata",
    "phone_number_id",
    "messages",
    "statuses",
    "message_echoes",
    "from",
    "to",
    "timestamp",
    "type",
    "text",
    "body",
    "image",
    "caption",
    "filename",
    "location",
    "latitude",
    "longitude",
    "name",
    "address",
    "interactive",
    "button_reply",
    "list_reply",
    "title",
    "reaction",
    "emoji",
    "contacts",
    "formatted_name",
    "status",
    "errors",
    "code",
];

fn parse(body: &[u8]) -> Result<Vec<Inbound>, IngestError> {
    let companies = HashMap::from([("1055".to_owned(), "962302".to_owned())]);
    capped(meta::parse(body, &companies, DEFAULT, NOW_MS))
}

fn company() -> impl Strategy<Value = (Value, String)> {
    prop_oneof![
        Just((json!("1055"), "962302".to_owned())),
        Just((json!("77"), DEFAULT.to_owned())),
        Just((Value::Null, DEFAULT.to_owned())),
    ]
}

/// A client's message (a text, or a captioned image) and what it becomes.
fn message(company: String) -> impl Strategy<Value = (Value, Inbound)> {
    let timestamp = prop_oneof![Just(None), (0..=(NOW_MS / 1000) as i64).prop_map(Some)];
    ("wamid\\.[A-Za-z0-9=_-]{1,60}", phone(), text(), timestamp, any::<bool>()).prop_map(
        move |(id, (digits, from), words, timestamp, image)| {
            let (kind, body, said) = if image {
                (
                    "image",
                    json!({"image": {"caption": words, "mime_type": "image/jpeg", "id": "m1"}}),
                    format!("[image] {}", words.trim()),
                )
            } else {
                ("text", json!({"text": {"body": words}}), words.trim().to_owned())
            };
            let mut msg = json!({"from": from, "id": id, "type": kind});
            msg[kind] = body[kind].clone();
            if let Some(t) = timestamp {
                msg["timestamp"] = json!(t.to_string());
            }
            let conv = Conv { phone: digits, company_id: company.clone() };
            let want =
                NewMessage { id, conv, kind: kind.into(), text: said, timestamp, received_at_ms: NOW_MS };
            (msg, Inbound::Message(want, None))
        },
    )
}

/// A status of one of our messages, and the receipt it becomes.
fn status() -> impl Strategy<Value = (Value, Inbound)> {
    let state = proptest::sample::select(&[
        ("sent", Delivery::Server),
        ("delivered", Delivery::Delivered),
        ("read", Delivery::Read),
        ("played", Delivery::Played),
        ("failed", Delivery::Failed),
    ]);
    ("wamid\\.[A-Za-z0-9=_-]{1,60}", state, proptest::option::of(0..=NOW_MS / 1000), any::<i32>()).prop_map(
        |(id, (name, state), timestamp, code)| {
            let mut st = json!({"id": id, "status": name, "recipient_id": "79001234567"});
            if let Some(t) = timestamp {
                st["timestamp"] = json!(t.to_string());
            }
            let at_ms = timestamp.map_or(NOW_MS, |t| t * 1000);
            let failure = (state == Delivery::Failed).then(|| {
                st["errors"] = json!([{"code": code, "title": "Message failed to send"}]);
                Failure { code: Some(code.into()), title: "Message failed to send".into(), at_ms }
            });
            (st, Inbound::Receipt(Receipt { id, state, at_ms, failure }))
        },
    )
}

/// What staff wrote from the Business app, and the staff message it becomes.
fn echo(company: String) -> impl Strategy<Value = (Value, Inbound)> {
    ("wamid\\.[A-Za-z0-9=_-]{1,60}", phone(), text()).prop_map(move |(id, (digits, to), words)| {
        let msg = json!({"from": "74950000000", "to": to, "id": id, "type": "text", "text": {"body": words}});
        let conv = Conv { phone: digits, company_id: company.clone() };
        let text = words.trim().to_owned();
        (msg, Inbound::Staff(Staff { conv, lid: None, id, text, source: Some("app".into()), by: "meta" }))
    })
}

/// One change of a delivery: messages and statuses, or echoes.
fn change() -> impl Strategy<Value = (Value, Vec<Inbound>)> {
    (company(), any::<bool>()).prop_flat_map(|((number, company), echoes)| {
        let metadata = json!({"display_phone_number": "74950000000", "phone_number_id": number});
        if echoes {
            proptest::collection::vec(echo(company), 0..3)
                .prop_map(move |echoes| {
                    let (values, want): (Vec<Value>, Vec<Inbound>) = echoes.into_iter().unzip();
                    let value = json!({"metadata": metadata, "message_echoes": values});
                    (json!({"field": "smb_message_echoes", "value": value}), want)
                })
                .boxed()
        } else {
            let messages = proptest::collection::vec(message(company), 0..4);
            (proptest::collection::vec(status(), 0..3), messages)
                .prop_map(move |(statuses, messages)| {
                    let (sv, mut want): (Vec<Value>, Vec<Inbound>) = statuses.into_iter().unzip();
                    let (mv, mw): (Vec<Value>, Vec<Inbound>) = messages.into_iter().unzip();
                    want.extend(mw);
                    let value = json!({"messaging_product": "whatsapp", "metadata": metadata,
                                       "statuses": sv, "messages": mv});
                    (json!({"field": "messages", "value": value}), want)
                })
                .boxed()
        }
    })
}

/// A whole delivery, and its events in delivery order.
fn delivery() -> impl Strategy<Value = (Value, Vec<Inbound>)> {
    let entry = proptest::collection::vec(change(), 1..3).prop_map(|changes| {
        let (values, want): (Vec<Value>, Vec<Vec<Inbound>>) = changes.into_iter().unzip();
        (json!({"id": "WABA", "changes": values}), want.concat())
    });
    proptest::collection::vec(entry, 1..3).prop_map(|entries| {
        let (values, want): (Vec<Value>, Vec<Vec<Inbound>>) = entries.into_iter().unzip();
        (json!({"object": "whatsapp_business_account", "entry": values}), want.concat())
    })
}

proptest! {
    #![proptest_config(config(1.0))]

    #[test]
    fn meta_refuses_arbitrary_bytes_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(events) = parse(&body) {
            assert_capped(&events)?;
        }
    }

    #[test]
    fn meta_accepts_only_capped_events_of_any_json(value in json_value(KEYS)) {
        if let Ok(events) = parse(value.to_string().as_bytes()) {
            assert_capped(&events)?;
        }
    }

    #[test]
    fn meta_takes_a_well_formed_delivery_as_sent((body, want) in delivery()) {
        let got = parse(body.to_string().as_bytes()).map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
        assert_capped(&got)?;
        prop_assert_eq!(got, want);
    }

    #[test]
    fn meta_accepts_only_capped_events_of_damaged_deliveries(
        (body, _) in delivery(),
        damages in damages(KEYS),
    ) {
        if let Ok(events) = parse(damaged(body, &damages).to_string().as_bytes()) {
            assert_capped(&events)?;
        }
    }
}
