//! What makes a configuration safe to expose: the admin API never shares the
//! public listener and wants a token off loopback, and once anything can
//! leave the machine (a real gateway or handler) every webhook served has
//! its secret — unless its section says `allow_unauthenticated`.

use std::net::SocketAddr;

use super::{Config, ConfigError, GatewayKind, HandlerKind, ServerConfig};

fn bad(key: &str, message: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key: key.to_owned(), message: message.to_owned() })
}

/// The two listeners apart; the admin token where it is needed.
pub(super) fn check_listeners(server: &ServerConfig) -> Result<(), ConfigError> {
    if overlaps(server.listen, server.admin_listen) {
        return bad(
            "server.admin_listen",
            "must differ from server.listen: the admin API never shares the public listener",
        );
    }
    if !server.admin_listen.ip().is_loopback() && server.admin_token.is_empty() {
        return bad("server.admin_token", "is required when server.admin_listen is not a loopback address");
    }
    if !server.admin_token.is_empty() && server.admin_token.len() < 16 {
        return bad("server.admin_token", "must be at least 16 characters");
    }
    Ok(())
}

/// Every served webhook has its secret once something leaves the machine,
/// or its section allows it without; the message names the key to set.
pub(super) fn check_webhooks(config: &Config) -> Result<(), ConfigError> {
    if !config.ingest.webhook_token.is_empty() && config.ingest.webhook_token.len() < 16 {
        return bad("ingest.webhook_token", "must be at least 16 characters");
    }
    let Some(reason) = config.leaves_the_machine() else {
        return Ok(());
    };
    match config.unauthenticated_webhooks().into_iter().find(|w| !w.allowed) {
        Some(w) => {
            let var = format!("TURNSTILE_{}", w.key.replace('.', "_").to_ascii_uppercase());
            let message = format!(
                "is required while {} is served with {reason} (something leaves the machine): \
                 set {} (or {var}), or {}",
                w.path, w.key, w.instead
            );
            bad(w.key, &message)
        }
        None => Ok(()),
    }
}

/// Whether two listen addresses would serve the same socket: the same port
/// on the same address or on the wildcard one. Port 0 (the OS picks) never
/// collides.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// An enabled webhook that takes deliveries without a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unauthenticated {
    pub path: &'static str,
    /// The key that would set its secret.
    pub key: &'static str,
    /// What else makes the configuration acceptable.
    pub instead: &'static str,
    /// Its section says `allow_unauthenticated = true`.
    pub allowed: bool,
}

impl Config {
    /// Why replies (or the clients' messages) can leave the machine: a real
    /// gateway or a real handler, by the key that says so. None on the trial
    /// defaults (echo handler, log gateway), where nothing leaves.
    pub fn leaves_the_machine(&self) -> Option<&'static str> {
        match (self.gateway.kind, self.handler.kind) {
            (GatewayKind::Http, _) => Some("gateway.kind = \"http\""),
            (GatewayKind::Waha, _) => Some("gateway.kind = \"waha\""),
            (GatewayKind::Meta, _) => Some("gateway.kind = \"meta\""),
            (GatewayKind::Evolution, _) => Some("gateway.kind = \"evolution\""),
            (GatewayKind::Log, HandlerKind::Http) => Some("handler.kind = \"http\""),
            (GatewayKind::Log, HandlerKind::OpenAi) => Some("handler.kind = \"openai\""),
            (GatewayKind::Log, HandlerKind::Echo) => None,
        }
    }

    /// The webhooks served without a secret: validation refuses them once
    /// something leaves the machine (unless allowed), and the daemon warns
    /// about them at every start.
    pub fn unauthenticated_webhooks(&self) -> Vec<Unauthenticated> {
        let mut open = Vec::new();
        if self.ingest.generic_webhooks && self.ingest.webhook_token.is_empty() {
            open.push(Unauthenticated {
                path: "/webhook/whatsapp",
                key: "ingest.webhook_token",
                instead: "ingest.generic_webhooks = false, or ingest.allow_unauthenticated = true",
                allowed: self.ingest.allow_unauthenticated,
            });
        }
        if self.meta.enabled() && self.meta.app_secret.is_empty() {
            open.push(Unauthenticated {
                path: "/webhook/meta",
                key: "meta.app_secret",
                instead: "meta.allow_unauthenticated = true",
                allowed: self.meta.allow_unauthenticated,
            });
        }
        if self.waha.enabled() && self.waha.hmac_key.is_empty() {
            open.push(Unauthenticated {
                path: "/webhook/waha",
                key: "waha.hmac_key",
                instead: "waha.allow_unauthenticated = true",
                allowed: self.waha.allow_unauthenticated,
            });
        }
        if self.evolution.enabled()
            && self.evolution.api_key.is_empty()
            && self.evolution.url_secret.is_empty()
        {
            open.push(Unauthenticated {
                path: "/webhook/evolution",
                key: "evolution.api_key",
                instead: "evolution.allow_unauthenticated = true",
                allowed: self.evolution.allow_unauthenticated,
            });
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{EvolutionConfig, MetaConfig, WahaConfig};

    /// A configuration whose replies leave the machine, and (given) a secret for each webhook.
    fn real(secrets: bool) -> Config {
        let mut c = Config::default();
        c.gateway.kind = GatewayKind::Http;
        c.gateway.url = "http://127.0.0.1:7100/send".into();
        if secrets {
            c.ingest.webhook_token = "a-webhook-token-of-16+".into();
            c.meta.app_secret = "meta-app-secret".into();
            c.waha.hmac_key = "waha-hmac-key".into();
            c.evolution.api_key = "evolution-api-key".into();
        }
        c
    }

    #[test]
    fn each_insecure_combination_is_refused_naming_the_key_to_set() {
        let refused = |c: &Config| c.validate().unwrap_err().to_string();
        assert!(real(true).validate().is_ok());

        // The generic webhooks, with each thing that can leave the machine.
        let mut gateways = Vec::new();
        for kind in [GatewayKind::Http, GatewayKind::Waha, GatewayKind::Meta, GatewayKind::Evolution] {
            let mut c = real(false);
            c.gateway.kind = kind;
            c.gateway.access_token = "EAAG".into();
            c.gateway.api_key = "gateway-api-key".into();
            gateways.push(c);
        }
        for kind in [HandlerKind::Http, HandlerKind::OpenAi] {
            let mut c = Config::default();
            c.handler.kind = kind;
            c.handler.url = "http://127.0.0.1:7000/turn".into();
            gateways.push(c);
        }
        for c in &gateways {
            let e = refused(c);
            assert!(
                e.contains("ingest.webhook_token") && e.contains("TURNSTILE_INGEST_WEBHOOK_TOKEN"),
                "{e}"
            );
        }

        // Meta and WAHA, once their sections are configured.
        let mut c = real(true);
        c.meta =
            MetaConfig { companies: HashMap::from([("1055".into(), "962302".into())]), ..Default::default() };
        assert!(refused(&c).contains("meta.app_secret"), "{}", refused(&c));
        c.meta.verify_token = "verify".into();
        assert!(refused(&c).contains("meta.app_secret"));
        let mut c = real(true);
        c.waha =
            WahaConfig { sessions: HashMap::from([("lotos".into(), "962302".into())]), ..Default::default() };
        assert!(refused(&c).contains("waha.hmac_key"), "{}", refused(&c));
        let mut c = real(true);
        c.evolution = EvolutionConfig {
            instances: HashMap::from([("lotos".into(), "962302".into())]),
            ..Default::default()
        };
        assert!(refused(&c).contains("evolution.api_key"), "{}", refused(&c));

        // A short token is refused whatever the rest.
        let mut c = Config::default();
        c.ingest.webhook_token = "short".into();
        assert!(refused(&c).contains("ingest.webhook_token"));
    }

    #[test]
    fn unauthenticated_webhooks_pass_only_when_allowed_or_nothing_leaves() {
        // Trial defaults: nothing leaves the machine, no secret needed.
        let mut c = Config::default();
        c.meta.verify_token = "verify".into();
        c.waha.sessions = HashMap::from([("lotos".into(), "962302".into())]);
        assert!(c.validate().is_ok());
        assert_eq!(c.unauthenticated_webhooks().len(), 3);

        // Each section's allow_unauthenticated, or the generic webhooks off.
        let mut c = real(false);
        c.ingest.allow_unauthenticated = true;
        assert!(c.validate().is_ok());
        c.ingest.allow_unauthenticated = false;
        c.ingest.generic_webhooks = false;
        assert!(c.validate().is_ok());
        c.meta.allow_unauthenticated = true;
        c.waha.allow_unauthenticated = true;
        c.evolution.allow_unauthenticated = true;
        assert!(c.validate().is_ok(), "allow_unauthenticated alone enables the section, allowed");
        assert!(c.unauthenticated_webhooks().iter().all(|w| w.allowed));
        assert_eq!(c.unauthenticated_webhooks().len(), 3);

        // Unconfigured sections are not served, so need nothing.
        assert!(!Config::default().meta.enabled() && !Config::default().waha.enabled());
        assert!(!Config::default().evolution.enabled());
        assert!(real(true).unauthenticated_webhooks().is_empty());
    }

    #[test]
    fn the_public_listener_may_leave_loopback_without_an_admin_token() {
        let env = [("TURNSTILE_SERVER_LISTEN".to_owned(), "0.0.0.0:8080".to_owned())];
        let c = Config::load(None, env).unwrap();
        assert!(c.server.admin_listen.ip().is_loopback());
    }
}
