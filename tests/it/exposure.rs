//! Safe when exposed: the public listener serves the webhooks and health and
//! nothing else, whatever a reverse proxy forwards to it; the admin API,
//! metrics and backups answer on the admin listener only.

use serde_json::{json, Value};

use crate::helpers::*;

/// Every admin route, with a method it answers to.
pub const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/metrics"),
    ("GET", "/api/outbox"),
    ("POST", "/api/backup"),
    ("GET", "/api/batches"),
    ("GET", "/api/conversations/79001234567"),
    ("GET", "/api/dead"),
    ("POST", "/api/dead/t000000000001/retry"),
    ("GET", "/api/contexts/default/79001234567"),
    ("PUT", "/api/contexts/default/79001234567"),
    ("DELETE", "/api/contexts/default/79001234567"),
    ("POST", "/api/contexts/default/79001234567/invalidate"),
];

/// Every webhook route, with a method it answers to.
pub const WEBHOOK_ROUTES: &[(&str, &str)] = &[
    ("POST", "/webhook/whatsapp/batched"),
    ("POST", "/webhook/whatsapp"),
    ("GET", "/webhook/meta"),
    ("POST", "/webhook/meta"),
    ("POST", "/webhook/waha"),
];

/// What a listener answers for a path it does not serve.
pub fn no_such_endpoint() -> (u16, Value) {
    (404, json!({"error": "no such endpoint"}))
}

/// `method path` at `base` with a JSON body and optional bearer token.
pub async fn call(
    client: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client.request(method, format!("{base}{path}")).json(&json!({"dialogue": {}}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    status_json(request).await
}

#[tokio::test(start_paused = true)]
async fn the_public_listener_serves_webhooks_and_health_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.meta.verify_token = "meta-verify-token".into();
    c.waha.hmac_key = "waha-hmac-key".into();
    let d = Daemon::start(c).await;
    for (method, path) in ADMIN_ROUTES {
        assert_eq!(call(&d.client, &d.base, method, path, None).await, no_such_endpoint(), "{method} {path}");
        let (status, body) = call(&d.client, &d.admin, method, path, None).await;
        assert_ne!((status, body.clone()), no_such_endpoint(), "{method} {path} on the admin listener");
    }
    for (method, path) in WEBHOOK_ROUTES {
        assert_eq!(
            call(&d.client, &d.admin, method, path, None).await,
            no_such_endpoint(),
            "{method} {path}"
        );
        let (status, body) = call(&d.client, &d.base, method, path, None).await;
        assert_ne!((status, body.clone()), no_such_endpoint(), "{method} {path} on the public listener");
    }
    for base in [&d.base, &d.admin] {
        assert_eq!(call(&d.client, base, "GET", "/healthz", None).await, (200, json!({"status": "ok"})));
        assert_eq!(call(&d.client, base, "GET", "/readyz", None).await, (200, json!({"status": "ready"})));
    }
    d.stop().await;
}
