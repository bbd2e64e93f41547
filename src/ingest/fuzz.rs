//! In-process fuzzing of the webhook parsers, on stable Rust: property
//! tests (proptest) that feed the generic parser and the gateways' (in
//! `fuzz/`) arbitrary bytes, JSON shaped like the real payloads, and that
//! JSON damaged field by field (wrong types, missing fields, empty, huge
//! and unicode strings, negative and huge numbers, nested arrays).
//!
//! Each runs the parser as the HTTP layer does (`http::webhooks`: parse,
//! then the caps) and holds what it accepts to the caps' promises, checked
//! here on their own terms: a refusal is an error, never a panic, and
//! nothing outside the caps gets through.
//!
//! Also the one place the fuzz modules (`context`, `store`, `backup`) take
//! their case counts and seed from: a fixed seed, so CI runs the same cases
//! every time; `TURNSTILE_FUZZ_CASES=N` for a long run (docs/development.md),
//! `PROPTEST_RNG_SEED` for other cases.

mod evolution;
mod meta;
mod waha;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{json, Value};

use super::caps::{Caps, MAX_AHEAD_S, MAX_ID_BYTES, MAX_KIND_BYTES};
use super::{Inbound, IngestError, Lid};
use crate::message::{NewMessage, LID, MAX_COMPANY_ID_BYTES};

/// The seed of every property's cases unless `PROPTEST_RNG_SEED` says another.
const SEED: u64 = 0x7475_726e_7374_696c;
/// A property's cases when `TURNSTILE_FUZZ_CASES` does not say (the
/// heavier properties ask for a share of it).
const CASES: u32 = 256;

/// The config of a property that costs `share` of a light one's cases
/// (1.0 for most; less for those that write files): the case count scales
/// with `TURNSTILE_FUZZ_CASES`, no failure file is written, the seed is fixed.
pub(crate) fn config(share: f64) -> Config {
    let cases = std::env::var("TURNSTILE_FUZZ_CASES").ok().and_then(|n| n.parse::<u32>().ok());
    let cases = ((cases.unwrap_or(CASES) as f64 * share) as u32).max(1);
    let mut config = Config { cases, failure_persistence: None, ..Config::default() };
    if config.rng_seed == RngSeed::Random {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    config
}

/// What a sender may put in a string: empty, blank, padded, unicode,
/// control characters, long (past the text cap), digits and jids.
pub(crate) fn string() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just(" \t\n".to_owned()),
        any::<String>(),
        " {0,2}[a-zA-Zа-яё0-9?!.,:_@+-]{1,40} {0,2}",
        "\\PC{0,300}",
        (1usize..3000).prop_map(|n| "я".repeat(n)),
        "[0-9]{1,22}",
        "\\+?[0-9 ()-]{4,20}(@(c\\.us|s\\.whatsapp\\.net|lid|g\\.us))?",
    ]
    .boxed()
}

/// Any JSON value: numbers of every sign and size, strings as above, and
/// arrays and objects nested a few deep whose keys are often `keys` (the
/// fields the parser looks for).
pub(crate) fn json_value(keys: &'static [&'static str]) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        string().prop_map(Value::from),
    ];
    let key = prop_oneof![3 => proptest::sample::select(keys).prop_map(str::to_owned), 1 => string()];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
    .boxed()
}

/// One damage done to a JSON document, at its `at`-th node (pre-order,
/// modulo the node count).
#[derive(Debug, Clone)]
pub(crate) enum Damage {
    /// The node becomes another value, of any type.
    Replace(Value),
    /// An object loses one field, an array one element.
    Remove(usize),
    /// The node is wrapped in an array: `[node]`.
    Nest,
    /// The node becomes its own JSON text, as a string.
    Stringify,
    /// A string node grows past every cap; a number becomes a huge negative one.
    Huge,
    /// The node becomes a number, or a number's digits as a string (most
    /// of them huge: timestamps in digits are read as numbers).
    Number(u64, bool),
}

pub(crate) fn damages(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<(usize, Damage)>> {
    let damage = prop_oneof![
        json_value(keys).prop_map(Damage::Replace),
        any::<usize>().prop_map(Damage::Remove),
        Just(Damage::Nest),
        Just(Damage::Stringify),
        Just(Damage::Huge),
        (any::<u64>(), any::<bool>()).prop_map(|(n, text)| Damage::Number(n, text)),
    ];
    proptest::collection::vec((any::<usize>(), damage), 1..4)
}

/// `value` with the damages done, one after the other.
pub(crate) fn damaged(mut value: Value, damages: &[(usize, Damage)]) -> Value {
    for (at, damage) in damages {
        let mut n = at % nodes(&value);
        let node = nth(&mut value, &mut n).expect("the index is below the node count");
        match damage {
            Damage::Replace(v) => *node = v.clone(),
            Damage::Remove(i) => match node {
                Value::Object(o) if !o.is_empty() => {
                    let key = o.keys().nth(i % o.len()).expect("in range").clone();
                    o.remove(&key);
                }
                Value::Array(a) if !a.is_empty() => {
                    a.remove(i % a.len());
                }
                _ => *node = Value::Null,
            },
            Damage::Nest => *node = Value::Array(vec![node.take()]),
            Damage::Stringify => *node = Value::String(node.to_string()),
            Damage::Huge => {
                *node = match node {
                    Value::String(s) => Value::String(format!("{s}{}", "Ж".repeat(40_000))),
                    _ => json!(i64::MIN),
                }
            }
            Damage::Number(n, text) => *node = if *text { json!(n.to_string()) } else { json!(n) },
        }
    }
    value
}

fn nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(nodes).sum(),
        Value::Object(o) => o.values().map(nodes).sum(),
        _ => 0,
    }
}

fn nth<'a>(v: &'a mut Value, n: &mut usize) -> Option<&'a mut Value> {
    if *n == 0 {
        return Some(v);
    }
    *n -= 1;
    let children: Box<dyn Iterator<Item = &'a mut Value> + 'a> = match v {
        Value::Array(a) => Box::new(a.iter_mut()),
        Value::Object(o) => Box::new(o.values_mut()),
        _ => return None,
    };
    for child in children {
        if let Some(found) = nth(child, n) {
            return Some(found);
        }
    }
    None
}

/// A phone's digits and a spelling of them senders use.
pub(crate) fn phone() -> impl Strategy<Value = (String, String)> {
    ("[1-9][0-9]{5,14}", 0..5usize).prop_map(|(digits, spelling)| {
        let spelled = match spelling {
            0 => digits.clone(),
            1 => format!("+{digits}"),
            2 => format!("{digits}@c.us"),
            3 => format!("{digits}@s.whatsapp.net"),
            _ => format!(" +{} {}-{} ", &digits[..1], &digits[1..4], &digits[4..]),
        };
        (digits, spelled)
    })
}

/// A client's chat as a jid (phones' in `@domain`) with the alternative
/// one senders may add, and the conversation's phone and LID link it
/// must become: a phone chat (its LID in the alt, or none), a LID chat
/// whose phone the alt reveals, a LID chat whose number is hidden.
pub(crate) fn chat(domain: &'static str) -> impl Strategy<Value = Chat> {
    ("[1-9][0-9]{5,14}", "[1-9][0-9]{5,19}", 0..4usize, any::<bool>()).prop_map(
        move |(digits, lid, shape, device)| {
            let device = if device { ":12" } else { "" };
            let phone_jid = format!("{digits}{device}@{domain}");
            let lid_jid = format!("{lid}{device}@lid");
            let link = |phone: Option<&str>| Some(Lid { lid: lid.clone(), phone: phone.map(str::to_owned) });
            match shape {
                0 => Chat { jid: phone_jid, alt: None, phone: digits, lid: None },
                1 => Chat { jid: phone_jid, alt: Some(lid_jid), lid: link(Some(&digits)), phone: digits },
                2 => Chat { jid: lid_jid, alt: Some(phone_jid), lid: link(Some(&digits)), phone: digits },
                _ => Chat { jid: lid_jid, alt: None, phone: format!("{lid}{LID}"), lid: link(None) },
            }
        },
    )
}

#[derive(Debug, Clone)]
pub(crate) struct Chat {
    pub jid: String,
    pub alt: Option<String>,
    pub phone: String,
    pub lid: Option<Lid>,
}

/// A text that passes the caps: not blank, under the cap; its trimmed form.
pub(crate) fn text() -> impl Strategy<Value = String> {
    " {0,2}[a-zA-Zа-яё0-9?!.,:😀-]{1,200} {0,2}"
}

/// The caps the parsers are held to here: a small text cap, so that long
/// strings cross it.
pub(crate) const MAX_TEXT: usize = 1000;
const CAPS: Caps = Caps { max_text_bytes: MAX_TEXT };
/// The company a delivery that names none goes to.
pub(crate) const DEFAULT: &str = "d";
/// A test's own idea of now (the parsers' `received_at_ms`).
pub(crate) const NOW_MS: u64 = 1_763_800_000_000;

/// A gateway's delivery as `http::webhooks::parse` takes it: the events, capped.
pub(crate) fn capped(events: Result<Vec<Inbound>, IngestError>) -> Result<Vec<Inbound>, IngestError> {
    let events = events?;
    CAPS.inbound(&events)?;
    Ok(events)
}

/// What the caps promise of each accepted event, checked here from the
/// rules themselves, not by asking the caps again.
pub(crate) fn assert_capped(events: &[Inbound]) -> Result<(), TestCaseError> {
    for event in events {
        match event {
            Inbound::Message(m, _) => assert_message(m)?,
            Inbound::Staff(s) => {
                assert_id(&s.id)?;
                assert_conversation(&s.conv.phone, &s.conv.company_id)?;
                prop_assert!(s.text.len() <= MAX_TEXT, "staff text of {} bytes", s.text.len());
            }
            Inbound::Receipt(r) => assert_id(&r.id)?,
            Inbound::Presence { conv, .. } => assert_conversation(&conv.phone, &conv.company_id)?,
            Inbound::SessionStarted(_) | Inbound::Ignored => {}
        }
    }
    Ok(())
}

fn assert_message(m: &NewMessage) -> Result<(), TestCaseError> {
    assert_id(&m.id)?;
    assert_conversation(&m.conv.phone, &m.conv.company_id)?;
    prop_assert!(m.kind.len() <= MAX_KIND_BYTES, "kind {:?}", m.kind);
    prop_assert!(!m.text.trim().is_empty(), "a blank text");
    prop_assert!(m.text.len() <= MAX_TEXT, "text of {} bytes", m.text.len());
    if let Some(t) = m.timestamp {
        let now_s = (m.received_at_ms / 1000) as i64;
        prop_assert!((0..=now_s + MAX_AHEAD_S).contains(&t), "timestamp {t} (now {now_s})");
    }
    Ok(())
}

fn assert_id(id: &str) -> Result<(), TestCaseError> {
    prop_assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES, "id of {} bytes", id.len());
    Ok(())
}

/// A phone's 6–15 digits, or a LID's 6–20 and `@lid`; a company of 1–64
/// bytes of `[A-Za-z0-9._:-]`.
fn assert_conversation(phone: &str, company: &str) -> Result<(), TestCaseError> {
    let digits = |s: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    let ok = match phone.strip_suffix(LID) {
        Some(lid) => digits(lid, 6..=20),
        None => digits(phone, 6..=15),
    };
    prop_assert!(ok, "phone {phone:?}");
    prop_assert!(
        (1..=MAX_COMPANY_ID_BYTES).contains(&company.len())
            && company.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)),
        "company {company:?}"
    );
    Ok(())
}

/// The generic webhook as `http::webhooks::webhook` runs it: parse, then the caps.
fn generic(body: &[u8]) -> Result<NewMessage, IngestError> {
    let m = super::parse(body, DEFAULT)?;
    CAPS.message(&m)?;
    Ok(m)
}

const GENERIC_KEYS: &[&str] = &["id", "from", "message", "timestamp", "company_id"];

/// A well-formed generic payload, and the message it must become.
fn generic_payload() -> impl Strategy<Value = (Value, NewMessage)> {
    let company = prop_oneof![
        Just((None, DEFAULT.to_owned())),
        "[A-Za-z0-9_.:-]{1,64}".prop_map(|c| (Some(json!(c)), c)),
        any::<u64>().prop_map(|c| (Some(json!(c)), c.to_string())),
    ];
    let timestamp = prop_oneof![Just(None), (0..=(NOW_MS / 1000) as i64).prop_map(Some)];
    ("[!-~а-я]{1,80}", phone(), text(), timestamp, company).prop_map(
        |(id, (digits, from), text, timestamp, (company_field, company))| {
            let mut body = json!({"id": id, "from": from, "message": text});
            if let Some(t) = timestamp {
                body["timestamp"] = json!(t);
            }
            if let Some(c) = company_field {
                body["company_id"] = c;
            }
            let message = NewMessage {
                id,
                conv: crate::message::Conv { phone: digits, company_id: company },
                kind: "text".into(),
                text,
                timestamp,
                received_at_ms: 0,
            };
            (body, message)
        },
    )
}

/// The generic payload a message would have been sent as.
fn generic_json(m: &NewMessage) -> Value {
    json!({"id": m.id, "from": m.conv.phone, "message": m.text, "timestamp": m.timestamp,
           "company_id": m.conv.company_id})
}

/// Equal but for the receipt time, which the parser takes from the clock.
fn same(mut got: NewMessage, want: &NewMessage) -> NewMessage {
    got.received_at_ms = want.received_at_ms;
    got
}

/// Whatever the generic webhook accepts, it would accept again, as itself,
/// when sent back in the generic shape.
fn assert_round_trips(m: &NewMessage) -> Result<(), TestCaseError> {
    let again = generic(&serde_json::to_vec(&generic_json(m)).expect("JSON"));
    prop_assert_eq!(same(again.map_err(|e| TestCaseError::fail(e.to_string()))?, m), m.clone());
    Ok(())
}

proptest! {
    #![proptest_config(config(1.0))]

    #[test]
    fn generic_refuses_arbitrary_bytes_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(m) = generic(&body) {
            assert_message(&m)?;
        }
    }

    #[test]
    fn generic_accepts_only_capped_messages_of_any_json(value in json_value(GENERIC_KEYS)) {
        if let Ok(m) = generic(value.to_string().as_bytes()) {
            assert_message(&m)?;
            assert_round_trips(&m)?;
        }
    }

    #[test]
    fn generic_takes_a_well_formed_payload_as_sent((body, want) in generic_payload()) {
        let got = generic(body.to_string().as_bytes()).map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
        assert_message(&got)?;
        prop_assert_eq!(same(got, &want), want.clone());
        assert_round_trips(&want)?;
    }

    #[test]
    fn generic_accepts_only_capped_messages_of_damaged_payloads(
        (body, _) in generic_payload(),
        damages in damages(GENERIC_KEYS),
    ) {
        let body = damaged(body, &damages);
        if let Ok(m) = generic(body.to_string().as_bytes()) {
            assert_message(&m)?;
            assert_round_trips(&m)?;
        }
    }
}
