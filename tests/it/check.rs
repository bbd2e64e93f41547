//! `turnstile check`, the real binary: the example config passes and every
//! section is printed; each combination the validation refuses (insecure
//! or invalid) exits 2 naming the key; secrets never reach the output;
//! warnings for what is allowed but risky.

use std::path::Path;
use std::process::{Command, Output, Stdio};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/turnstile.example.toml");

/// Runs `turnstile check` with only the given `TURNSTILE_*` variables.
fn check(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnstile"));
    cmd.arg("check").args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TURNSTILE_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn all(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn config_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn the_example_config_passes_and_every_section_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let out = check(&["--config", EXAMPLE], &[("TURNSTILE_SERVER_DATA_DIR", data)]);
    let text = all(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let example: toml::Table = std::fs::read_to_string(EXAMPLE).unwrap().parse().unwrap();
    for section in example.keys() {
        assert!(text.contains(&format!("\n[{section}]\n")), "[{section}] not printed:\n{text}");
    }
    for line in [
        "public  127.0.0.1:8080",
        "admin   127.0.0.1:8081",
        "POST /webhook/whatsapp/batched",
        "handler: echo",
        "gateway: log",
        &format!("data: {data}"),
        "environment: TURNSTILE_SERVER_DATA_DIR",
        "ok: this config would start",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    // --quiet: only warnings (the trial's open generic webhook here).
    let out = check(&["--quiet", "--config", EXAMPLE], &[("TURNSTILE_SERVER_DATA_DIR", data)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty(), "{}", all(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: /webhook/whatsapp has no secret"),
        "{}",
        all(&out)
    );
}

/// What is wrong, the config file, the variables, the key the refusal names.
type Refused<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn each_refused_combination_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let real_gateway = "[gateway]\nkind = \"http\"\nurl = \"http://127.0.0.1:7100/send\"\n";
    let token = "[ingest]\nwebhook_token = \"a-webhook-token-of-16+\"\n";
    let cases: Vec<Refused> = vec![
        ("a real gateway, the generic webhooks open", real_gateway.into(), vec![], "ingest.webhook_token"),
        (
            "a real handler, the generic webhooks open",
            "[handler]\nkind = \"http\"\nurl = \"http://127.0.0.1:7000/turn\"\n".into(),
            vec![],
            "ingest.webhook_token",
        ),
        (
            "Meta served without its app secret",
            format!("{real_gateway}{token}[meta]\ncompanies = {{ \"1055\" = \"962302\" }}\n"),
            vec![],
            "meta.app_secret",
        ),
        (
            "WAHA served without its key",
            format!("{real_gateway}{token}[waha]\nsessions = {{ lotos = \"962302\" }}\n"),
            vec![],
            "waha.hmac_key",
        ),
        (
            "Evolution served without its key",
            format!("{real_gateway}{token}[evolution]\ninstances = {{ lotos = \"962302\" }}\n"),
            vec![],
            "evolution.api_key",
        ),
        (
            "a short webhook token",
            "[ingest]\nwebhook_token = \"short\"\n".into(),
            vec![],
            "ingest.webhook_token",
        ),
        (
            "the admin API off loopback without a token",
            "[server]\nadmin_listen = \"0.0.0.0:8081\"\n".into(),
            vec![],
            "server.admin_token",
        ),
        (
            "the admin API on the public listener",
            "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n".into(),
            vec![],
            "server.admin_listen",
        ),
        ("an unknown key", "[turns]\nhistory_limt = 5\n".into(), vec![], "history_limt"),
        (
            "a company id with a space",
            "[waha]\nsessions = { lotos = \"salon one\" }\n".into(),
            vec![],
            "waha.sessions.lotos",
        ),
        (
            "a 65-byte default company",
            format!("[ingest]\ndefault_company_id = \"{}\"\n", "c".repeat(65)),
            vec![],
            "ingest.default_company_id",
        ),
        ("a wrong type", "[batching]\ndebounce_ms = \"ten\"\n".into(), vec![], "batching.debounce_ms"),
        (
            "a stop shorter than the turns' grace",
            "[server]\nstop_timeout_ms = 1000\n".into(),
            vec![],
            "server.stop_timeout_ms",
        ),
        (
            "an unknown variable",
            String::new(),
            vec![("TURNSTILE_SERVER_LISTN", "127.0.0.1:1")],
            "TURNSTILE_SERVER_LISTN",
        ),
        (
            "a variable of the wrong type",
            String::new(),
            vec![("TURNSTILE_BATCHING_MAX_MESSAGES", "lots")],
            "batching.max_messages",
        ),
    ];
    for (i, (what, text, env, key)) in cases.iter().enumerate() {
        let path = config_file(dir.path(), &format!("{i}.toml"), text);
        let out = check(&["--config", &path], env);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", all(&out));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(key), "{what}: the message does not name {key}: {said}");
        assert!(said.contains("would not start"), "{what}: {said}");
    }
    let missing = check(&["--config", "/nonexistent/turnstile.toml"], &[]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(all(&missing).contains("/nonexistent/turnstile.toml"), "{}", all(&missing));
}

#[test]
fn secrets_never_appear_and_what_is_risky_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = [
        ("TURNSTILE_SERVER_ADMIN_TOKEN", "secret-admin-token-0001"),
        ("TURNSTILE_INGEST_WEBHOOK_TOKEN", "secret-webhook-token-0002"),
        ("TURNSTILE_META_VERIFY_TOKEN", "secret-verify-token-0003"),
        ("TURNSTILE_META_APP_SECRET", "secret-app-secret-0004"),
        ("TURNSTILE_WAHA_HMAC_KEY", "secret-hmac-key-0005"),
        ("TURNSTILE_EVOLUTION_API_KEY", "secret-evolution-key-0006"),
        ("TURNSTILE_EVOLUTION_URL_SECRET", "secret-evolution-url-secret-0007"),
        ("TURNSTILE_GATEWAY_API_KEY", "secret-gateway-key-0008"),
        ("TURNSTILE_GATEWAY_ACCESS_TOKEN", "secret-access-token-0009"),
    ];
    let text = "[gateway]\nkind = \"meta\"\nurl = \"http://127.0.0.1:7100/v21.0\"\n\
                [meta]\ncompanies = { \"1055\" = \"962302\" }\n\
                [waha]\nsessions = { lotos = \"962302\" }\n\
                [evolution]\ninstances = { lotos = \"962302\" }\n";
    let path = config_file(dir.path(), "real.toml", text);
    let data = dir.path().join("data");
    let mut env: Vec<(&str, &str)> = secrets.to_vec();
    env.push(("TURNSTILE_SERVER_DATA_DIR", data.to_str().unwrap()));
    let out = check(&["--config", &path], &env);
    let said = all(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    for (var, secret) in secrets {
        assert!(!said.contains(secret), "{var}'s value is printed:\n{said}");
    }
    assert!(said.contains(turnstile::check::MASK));
    for line in [
        "X-Hub-Signature-256 with meta.app_secret",
        "X-Webhook-Hmac with waha.hmac_key",
        "POST /webhook/evolution/key/<secret>[/<event>]",
        "gateway: meta http://127.0.0.1:7100/v21.0",
    ] {
        assert!(said.contains(line), "no {line:?} in:\n{said}");
    }

    // Allowed but risky: an open webhook by choice, a data directory the
    // user cannot write, a unit that kills the daemon before its stop ends.
    let text = "[gateway]\nkind = \"http\"\nurl = \"http://127.0.0.1:7100/send\"\n\
                [ingest]\nallow_unauthenticated = true\n";
    let path = config_file(dir.path(), "risky.toml", text);
    let unit = config_file(dir.path(), "turnstile.service", "[Service]\nTimeoutStopSec=20\n");
    // /proc/1: a directory nobody can create files in, root included.
    let out =
        check(&["--quiet", "--config", &path, "--unit", &unit], &[("TURNSTILE_SERVER_DATA_DIR", "/proc/1")]);
    let said = all(&out);
    assert_eq!(out.status.code(), Some(0), "warnings do not fail the check: {said}");
    assert!(said.contains("ingest.allow_unauthenticated = true"), "{said}");
    assert!(said.contains("is not writable"), "{said}");
    assert!(said.contains("TimeoutStopSec") && said.contains("server.stop_timeout_ms"), "{said}");
}
