//! `turnstile check`: what a config would start as, before it replaces a
//! running daemon's (as `nginx -t`). The config is loaded by the caller
//! exactly as `serve` loads it; this module says what that means — the
//! listeners, each webhook served and how it is authenticated, the handler
//! and the gateway — and what looks wrong but is allowed (warnings). It
//! reads the data directory's mount and the systemd unit; it writes only a
//! probe file in the data directory, removed at once.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, GatewayKind, HandlerKind, SECRETS};

/// What is printed in place of a set secret.
pub const MASK: &str = "********";

/// Where systemd keeps the unit and its drop-ins, in the order they apply.
pub const UNIT_PATHS: &[&str] =
    &["/lib/systemd/system/turnstile.service", "/etc/systemd/system/turnstile.service"];
pub const DROPIN_DIRS: &[&str] =
    &["/etc/systemd/system/turnstile.service.d", "/run/systemd/system/turnstile.service.d"];

/// Filesystems where a sync is not a local disk's sync (statfs magic
/// numbers, as /proc/self/mountinfo names them).
const NETWORK_FS: &[&str] =
    &["nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse", "fuse.sshfs", "ceph", "glusterfs", "afs"];

/// What the check found.
pub struct Report {
    pub text: String,
    pub warnings: Vec<String>,
}

/// The facts from outside the config that the check weighs.
pub struct Host {
    /// The `TURNSTILE_*` variables that applied (names only).
    pub overlay: Vec<String>,
    pub config_file: Option<PathBuf>,
    /// The unit and its drop-ins to read `TimeoutStopSec` from; `None`:
    /// the installed ones (`UNIT_PATHS`, `DROPIN_DIRS`).
    pub unit: Option<PathBuf>,
}

pub fn check(config: &Config, host: &Host) -> Report {
    let mut out = String::new();
    let mut warnings = Vec::new();
    let source = match &host.config_file {
        Some(p) => p.display().to_string(),
        None => "no config file (every key at its default)".to_owned(),
    };
    let _ = writeln!(out, "config: {source}");
    if !host.overlay.is_empty() {
        let _ = writeln!(out, "environment: {}", host.overlay.join(", "));
    }

    let s = &config.server;
    let admin_auth = if s.admin_token.is_empty() { "no token" } else { "Bearer server.admin_token" };
    let _ = writeln!(out, "\nlisteners:");
    let _ = writeln!(out, "  public  {:<22} webhooks", s.listen);
    let _ = writeln!(out, "  admin   {:<22} API, console, metrics ({admin_auth})", s.admin_listen);
    if s.admin_token.is_empty() && !s.listen.ip().is_loopback() {
        warnings.push(format!(
            "server.admin_token is not set while the public listener ({}) is off loopback: \
             anyone with a shell on this machine can use the API on {}",
            s.listen, s.admin_listen
        ));
    }

    let _ = writeln!(out, "\nwebhooks (on {}):", s.listen);
    for (path, auth) in webhooks(config) {
        let _ = writeln!(out, "  {path:<44} {auth}");
    }
    let leaves = config.leaves_the_machine();
    for w in config.unauthenticated_webhooks() {
        if w.allowed {
            warnings.push(format!(
                "{} takes deliveries without a secret ({}.allow_unauthenticated = true): \
                 anyone who reaches it can write as any client",
                w.path,
                w.key.split('.').next().unwrap_or("")
            ));
        } else if leaves.is_none() {
            // The trial defaults: nothing leaves the machine yet.
            warnings.push(format!(
                "{} has no secret ({} unset): fine on the trial defaults, refused once a real \
                 handler or gateway is set",
                w.path, w.key
            ));
        }
    }

    let h = &config.handler;
    let handler = match h.kind {
        HandlerKind::Echo => "echo (replies \"received: <text>\"; nothing leaves the machine)".to_owned(),
        HandlerKind::Http => format!("http POST {} (timeout {} ms)", h.url, h.timeout_ms),
        HandlerKind::OpenAi => format!(
            "openai POST {}/chat/completions, model {:?} (timeout {} ms)",
            config.openai.base_url.trim_end_matches('/'),
            config.openai.model,
            h.timeout_ms
        ),
    };
    let g = &config.gateway;
    let gateway = match g.kind {
        GatewayKind::Log => "log (replies kept in the history only)".to_owned(),
        GatewayKind::Http => format!("http POST {}", g.url),
        GatewayKind::Waha => format!("waha {} (session {:?} by default)", g.url, g.session),
        GatewayKind::Meta => format!("meta {} (Bearer gateway.access_token)", g.url),
        GatewayKind::Evolution => format!("evolution {} (apikey gateway.api_key)", g.url),
    };
    let _ = writeln!(out, "\nhandler: {handler}");
    let _ = writeln!(out, "gateway: {gateway}");

    let data = &s.data_dir;
    let _ = writeln!(out, "data: {}", data.display());
    warnings.extend(data_dir_warnings(data));

    let unit = stop_timeout_of_unit(host.unit.as_deref());
    if let Some((timeout, from)) = &unit {
        let stop = Duration::from_millis(s.stop_timeout_ms);
        if *timeout <= stop {
            warnings.push(format!(
                "TimeoutStopSec in {} is {} s, not above server.stop_timeout_ms ({} ms): systemd \
                 kills the daemon before it finishes its stop (it recovers, but running turns re-run)",
                from.display(),
                timeout.as_secs_f64(),
                s.stop_timeout_ms
            ));
        }
    }

    let _ = writeln!(out, "\neffective config (secrets masked):\n");
    out.push_str(&effective(config));
    Report { text: out, warnings }
}

/// Each webhook the config serves, and what authenticates it.
fn webhooks(config: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let bearer = |set: bool, key: &str| {
        if set {
            format!("Bearer {key} (or X-Webhook-Token)")
        } else {
            "no secret".to_owned()
        }
    };
    if config.ingest.generic_webhooks {
        let auth = bearer(!config.ingest.webhook_token.is_empty(), "ingest.webhook_token");
        out.push(("POST /webhook/whatsapp".to_owned(), auth.clone()));
        out.push(("POST /webhook/whatsapp/batched".to_owned(), auth));
    }
    let m = &config.meta;
    if m.enabled() {
        let get = if m.verify_token.is_empty() { "no verify token: refused" } else { "meta.verify_token" };
        out.push(("GET  /webhook/meta".to_owned(), format!("subscription check with {get}")));
        let auth = if m.app_secret.is_empty() {
            "no secret".to_owned()
        } else {
            "X-Hub-Signature-256 with meta.app_secret".to_owned()
        };
        out.push(("POST /webhook/meta".to_owned(), auth));
    }
    if config.waha.enabled() {
        let auth = if config.waha.hmac_key.is_empty() {
            "no secret".to_owned()
        } else {
            "X-Webhook-Hmac with waha.hmac_key".to_owned()
        };
        out.push(("POST /webhook/waha".to_owned(), auth));
    }
    let e = &config.evolution;
    if e.enabled() {
        let auth = if e.api_key.is_empty() {
            "no secret".to_owned()
        } else {
            "apikey (header or body) = evolution.api_key".to_owned()
        };
        out.push(("POST /webhook/evolution[/<event>]".to_owned(), auth));
        if !e.url_secret.is_empty() {
            out.push((
                "POST /webhook/evolution/key/<secret>[/<event>]".to_owned(),
                "evolution.url_secret in the path".to_owned(),
            ));
        }
    }
    out
}

/// The config as TOML, every key, secrets replaced by `MASK`.
pub fn effective(config: &Config) -> String {
    let mut table = toml::Table::try_from(config).expect("a config serializes");
    for (section, key) in SECRETS {
        if let Some(v) = table.get_mut(*section).and_then(|s| s.as_table_mut()).and_then(|s| s.get_mut(*key))
        {
            if v.as_str().is_some_and(|s| !s.is_empty()) {
                *v = toml::Value::String(MASK.to_owned());
            }
        }
    }
    toml::to_string(&table).expect("a table renders")
}

/// A data directory the daemon cannot write, or one on a network
/// filesystem (a sync there is not a local disk's).
fn data_dir_warnings(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    // The daemon creates a missing directory: judge the nearest that exists.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let probe = existing.join(format!(".turnstile-check-{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) if existing == dir => out.push(format!(
            "server.data_dir {} is not writable by this user ({e}): the daemon cannot store messages",
            dir.display()
        )),
        Err(e) => out.push(format!(
            "server.data_dir {} does not exist and {} is not writable by this user ({e}): \
             the daemon cannot create it",
            dir.display(),
            existing.display()
        )),
    }
    if let Some(fs) = filesystem_of(existing) {
        if NETWORK_FS.contains(&fs.as_str()) || fs.starts_with("fuse.") {
            out.push(format!(
                "server.data_dir {} is on a {fs} filesystem, not a local disk: an acknowledged \
                 message is only as durable as that filesystem's sync",
                dir.display()
            ));
        }
    }
    out
}

/// The filesystem type of the mount holding `path` (/proc/self/mountinfo:
/// the longest mount point that is a prefix of it).
fn filesystem_of(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        // id parent major:minor root mount-point options... - fstype source super-options
        let mut fields = line.split(' ');
        let mount = fields.nth(4)?.replace("\\040", " ");
        let fstype = line.split(" - ").nth(1)?.split(' ').next()?.to_owned();
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(len, _)| mount.len() >= *len) {
            best = Some((mount.len(), fstype));
        }
    }
    best.map(|(_, fs)| fs)
}

/// `TimeoutStopSec` as systemd would apply it: the unit, then its drop-ins
/// in name order (the last setting wins), or `DefaultTimeoutStopSec`'s 90 s
/// when a unit exists without one. `None` without a unit.
pub fn stop_timeout_of_unit(unit: Option<&Path>) -> Option<(Duration, PathBuf)> {
    // /etc's copy of the unit replaces /lib's whole.
    let (main, dirs): (PathBuf, Vec<PathBuf>) = match unit {
        Some(u) => (u.to_owned(), vec![PathBuf::from(format!("{}.d", u.display()))]),
        None => (
            UNIT_PATHS.iter().map(PathBuf::from).rfind(|p| p.exists())?,
            DROPIN_DIRS.iter().map(PathBuf::from).collect(),
        ),
    };
    let mut dropins: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .collect();
    dropins.sort_by_key(|p| p.file_name().map(|n| n.to_owned()));
    let files: Vec<PathBuf> = std::iter::once(main).chain(dropins).collect();
    let mut found = (Duration::from_secs(90), files[0].clone());
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        for line in text.lines() {
            let line = line.trim();
            let Some(v) = line.strip_prefix("TimeoutStopSec=").or_else(|| line.strip_prefix("TimeoutSec="))
            else {
                continue;
            };
            if let Some(d) = systemd_duration(v) {
                found = (d, f.clone());
            }
        }
    }
    Some(found)
}

/// A systemd time span: `30`, `30s`, `1min 30s`, `500ms`, `infinity`.
fn systemd_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    if v == "infinity" {
        return Some(Duration::MAX);
    }
    let mut total = 0f64;
    for part in v.split_whitespace() {
        let split = part.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(part.len());
        let (n, unit) = part.split_at(split);
        let n: f64 = n.parse().ok()?;
        let scale = match unit {
            "" | "s" | "sec" | "second" | "seconds" => 1.0,
            "ms" | "msec" => 0.001,
            "us" | "usec" => 0.000_001,
            "m" | "min" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            _ => return None,
        };
        total += n * scale;
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_secret_is_masked_and_an_unset_one_stays_empty() {
        let mut c = Config::default();
        c.server.admin_token = "an-admin-token-long-enough".into();
        c.ingest.webhook_token = "a-webhook-token-long-enough".into();
        c.meta.app_secret = "meta-app-secret-value".into();
        c.gateway.access_token = "EAAG-access-token".into();
        let text = effective(&c);
        for secret in [
            "an-admin-token-long-enough",
            "a-webhook-token-long-enough",
            "meta-app-secret-value",
            "EAAG-access-token",
        ] {
            assert!(!text.contains(secret), "{secret} printed:\n{text}");
        }
        assert!(text.contains(&format!("admin_token = \"{MASK}\"")), "{text}");
        assert!(text.contains("hmac_key = \"\""), "an unset secret shows as unset:\n{text}");
        // Every secret key names a real key.
        let table = toml::Table::try_from(&c).unwrap();
        for (section, key) in SECRETS {
            assert!(table[*section].as_table().unwrap().contains_key(*key), "{section}.{key}");
        }
    }

    #[test]
    fn systemd_time_spans_read_as_systemd_reads_them() {
        assert_eq!(systemd_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(systemd_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(systemd_duration("1min 30s"), Some(Duration::from_secs(90)));
        assert_eq!(systemd_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(systemd_duration("infinity"), Some(Duration::MAX));
        assert_eq!(systemd_duration("soon"), None);
    }

    #[test]
    fn a_drop_in_overrides_the_units_stop_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join("turnstile.service");
        std::fs::write(&unit, "[Service]\nTimeoutStopSec=30\n").unwrap();
        assert_eq!(stop_timeout_of_unit(Some(&unit)).unwrap().0, Duration::from_secs(30));
        std::fs::create_dir(dir.path().join("turnstile.service.d")).unwrap();
        std::fs::write(
            dir.path().join("turnstile.service.d/override.conf"),
            "[Service]\nTimeoutStopSec=10s\n",
        )
        .unwrap();
        let (t, from) = stop_timeout_of_unit(Some(&unit)).unwrap();
        assert_eq!(
            (t, from.file_name().unwrap().to_str().unwrap()),
            (Duration::from_secs(10), "override.conf")
        );
    }
}
