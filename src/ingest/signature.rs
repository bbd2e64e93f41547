//! Webhook signatures: HMAC of the raw body with a shared secret, compared
//! in constant time (the `hmac` crate's `verify_slice`).

use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha512};

/// Meta's `X-Hub-Signature-256: sha256=<hex>`, HMAC-SHA256 with the app secret.
pub fn meta_valid(app_secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(hex) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Some(sig) = decode_hex(hex) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// WAHA's `X-Webhook-Hmac: <hex>` with `X-Webhook-Hmac-Algorithm: sha512`
/// (the default; `sha256` is accepted too), over the raw body.
pub fn waha_valid(key: &str, body: &[u8], header: Option<&str>, algorithm: Option<&str>) -> bool {
    let Some(sig) = header.and_then(|h| decode_hex(h.trim())) else {
        return false;
    };
    match algorithm.map(|a| a.trim().to_ascii_lowercase()).as_deref() {
        None | Some("sha512") => {
            let mut mac = Hmac::<Sha512>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
            mac.update(body);
            mac.verify_slice(&sig).is_ok()
        }
        Some("sha256") => {
            let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
            mac.update(body);
            mac.verify_slice(&sig).is_ok()
        }
        Some(_) => false,
    }
}

/// Equality of two secrets in time that depends on their lengths only.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Lower-case hex of an HMAC: for tests and for signing outgoing samples.
pub fn sign_hex(key: &str, body: &[u8], sha512: bool) -> String {
    let bytes = if sha512 {
        let mut mac = Hmac::<Sha512>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
        mac.update(body);
        mac.finalize().into_bytes().to_vec()
    } else {
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
        mac.update(body);
        mac.finalize().into_bytes().to_vec()
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_signatures() {
        let body = br#"{"object":"whatsapp_business_account"}"#;
        let good = format!("sha256={}", sign_hex("s3cret", body, false));
        assert!(meta_valid("s3cret", body, Some(&good)));
        assert!(!meta_valid("other", body, Some(&good)));
        assert!(!meta_valid("s3cret", b"tampered", Some(&good)));
        assert!(!meta_valid("s3cret", body, None));
        assert!(!meta_valid("s3cret", body, Some("sha256=zz")));
        assert!(!meta_valid("s3cret", body, Some(&good[7..])), "the sha256= prefix is required");
    }

    #[test]
    fn waha_signatures() {
        let body = br#"{"event":"message"}"#;
        let sig = sign_hex("k", body, true);
        assert!(waha_valid("k", body, Some(&sig), Some("sha512")));
        assert!(waha_valid("k", body, Some(&sig), None));
        assert!(!waha_valid("k", body, Some(&sig), Some("md5")));
        assert!(!waha_valid("x", body, Some(&sig), Some("sha512")));
        assert!(waha_valid("k", body, Some(&sign_hex("k", body, false)), Some("sha256")));
        assert!(!waha_valid("k", body, None, Some("sha512")));
    }
}
