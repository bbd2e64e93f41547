//! Secrets: which keys hold one, and reading a secret from a file. Every
//! secret key `k` may instead be given as `k_file`, a path whose contents
//! (trailing newline cut) are the secret — in the TOML or as
//! `TURNSTILE_<SECTION>_<KEY>_FILE` — so systemd credentials and container
//! secrets never sit in the config file or the environment.

use std::path::PathBuf;

use super::ConfigError;

/// The keys whose values are secrets: read from `<key>_file` when given,
/// never printed by `turnstile check`.
pub const SECRETS: &[(&str, &str)] = &[
    ("server", "admin_token"),
    ("ingest", "webhook_token"),
    ("meta", "verify_token"),
    ("meta", "app_secret"),
    ("waha", "hmac_key"),
    ("evolution", "api_key"),
    ("evolution", "url_secret"),
    ("gateway", "api_key"),
    ("gateway", "access_token"),
    ("openai", "api_key"),
];

/// Whether `section.key` names a secret's file (`<secret>_file`).
pub(super) fn is_secret_file(section: &str, key: &str) -> bool {
    key.strip_suffix("_file").is_some_and(|stem| SECRETS.contains(&(section, stem)))
}

/// Replaces every `<secret>_file` in `table` by the secret it names.
pub(super) fn read_files(table: &mut toml::Table) -> Result<(), ConfigError> {
    for (section, key) in SECRETS {
        let Some(t) = table.get_mut(*section).and_then(|s| s.as_table_mut()) else { continue };
        let file_key = format!("{key}_file");
        let Some(path) = t.remove(&file_key) else { continue };
        let invalid =
            |message: String| ConfigError::Invalid { key: format!("{section}.{file_key}"), message };
        let path = PathBuf::from(path.as_str().ok_or_else(|| invalid("must be a path (a string)".into()))?);
        if t.get(*key).and_then(|v| v.as_str()).is_some_and(|v| !v.is_empty()) {
            return Err(invalid(format!("{section}.{key} is set too: give the secret one way")));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let secret = text.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            return Err(invalid(format!("{} is empty", path.display())));
        }
        t.insert((*key).to_owned(), toml::Value::String(secret.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn a_secret_comes_from_its_file_in_the_toml_or_the_environment_and_the_environment_wins() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("token");
        std::fs::write(&secret, "s3cr3t-from-a-file\n").unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, "another-admin-token-0123").unwrap();
        let toml = dir.path().join("t.toml");
        let p = secret.display();
        std::fs::write(
            &toml,
            format!("[ingest]\nwebhook_token_file = \"{p}\"\n[openai]\napi_key_file = \"{p}\"\n"),
        )
        .unwrap();
        let c = Config::load(Some(&toml), Vec::new()).unwrap();
        assert_eq!(c.ingest.webhook_token, "s3cr3t-from-a-file", "the trailing newline cut");
        assert_eq!(c.openai.api_key, "s3cr3t-from-a-file");

        // The environment's file beats the TOML's value, and its value beats the TOML's file.
        std::fs::write(
            &toml,
            format!(
                "[server]\nadmin_token = \"from-toml-0123456789\"\n[ingest]\nwebhook_token_file = \"{p}\"\n"
            ),
        )
        .unwrap();
        let c = Config::load(
            Some(&toml),
            env(&[
                ("TURNSTILE_SERVER_ADMIN_TOKEN_FILE", other.display().to_string()),
                ("TURNSTILE_INGEST_WEBHOOK_TOKEN", "from-the-environment-0123".into()),
            ]),
        )
        .unwrap();
        assert_eq!(
            (c.server.admin_token.as_str(), c.ingest.webhook_token.as_str()),
            ("another-admin-token-0123", "from-the-environment-0123")
        );
        // A non-secret `_file` key stays what it is.
        std::fs::write(&toml, format!("[openai]\nsystem_prompt_file = \"{p}\"\n")).unwrap();
        let c = Config::load(Some(&toml), env(&[("TURNSTILE_OPENAI_SYSTEM_PROMPT", "x".into())])).unwrap();
        assert_eq!(c.openai.system_prompt_file, secret.display().to_string());
    }

    #[test]
    fn a_secret_file_that_is_missing_empty_doubled_or_not_a_secret_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("t.toml");
        let load = |text: &str| {
            std::fs::write(&toml, text).unwrap();
            Config::load(Some(&toml), Vec::new()).unwrap_err().to_string()
        };
        let missing = dir.path().join("nope");
        let e = load(&format!("[meta]\napp_secret_file = \"{}\"\n", missing.display()));
        assert!(e.contains("nope"), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let e = load(&format!("[meta]\napp_secret_file = \"{}\"\n", empty.display()));
        assert!(e.contains("meta.app_secret_file") && e.contains("empty"), "{e}");
        let e = load(&format!("[meta]\napp_secret = \"x\"\napp_secret_file = \"{}\"\n", empty.display()));
        assert!(e.contains("one way"), "{e}");
        let e = load("[batching]\ndebounce_ms_file = \"/etc/passwd\"\n");
        assert!(e.contains("debounce_ms_file"), "{e}");
        let e = Config::load(None, env(&[("TURNSTILE_BATCHING_DEBOUNCE_MS_FILE", "/x".into())])).unwrap_err();
        assert!(e.to_string().contains("no config key batching.debounce_ms_file"), "{e}");
    }
}
