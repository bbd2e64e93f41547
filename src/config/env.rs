//! The `TURNSTILE_<SECTION>_<KEY>` overlay: environment variables over the
//! file, typed by each key's default.

use super::{Config, ConfigError};

const ENV_PREFIX: &str = "TURNSTILE_";
/// Faults for tests of the real binary (`server::TestFaults`), read by
/// `main` alone.
pub const TEST_FAULTS_ENV: &str = "TURNSTILE_TEST_FAULTS";
/// Environment variables with the prefix that are not config keys (the
/// config file's path, the test faults, the fuzz properties' case count).
pub(super) const ENV_RESERVED: &[&str] = &["TURNSTILE_CONFIG", TEST_FAULTS_ENV, "TURNSTILE_FUZZ_CASES"];

/// Overlays `TURNSTILE_<SECTION>_<KEY>` variables. The type of each value is
/// taken from the key's default, so `TURNSTILE_INGEST_DEFAULT_COMPANY_ID=962302`
/// stays a string and `TURNSTILE_BATCHING_DEBOUNCE_MS=abc` is refused by name.
pub(super) fn apply(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).expect("default config serializes");
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !ENV_RESERVED.contains(&k.as_str()))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let err = |message: String| ConfigError::Env { var: var.clone(), message };
        let (section, key) =
            rest.split_once('_').ok_or_else(|| err("expected TURNSTILE_<SECTION>_<KEY>".to_owned()))?;
        let secret_file = toml::Value::String(String::new());
        let default = match defaults.get(section).and_then(|s| s.as_table()).and_then(|s| s.get(key)) {
            Some(default) => default,
            // A secret's file (`secrets.rs`): a path.
            None if super::secrets::is_secret_file(section, key) => &secret_file,
            None => return Err(err(format!("no config key {section}.{key}"))),
        };
        let value = match default {
            toml::Value::Integer(_) => raw
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| err(format!("{section}.{key} must be an integer, got {raw:?}")))?,
            toml::Value::Table(_) => {
                return Err(err(format!("{section}.{key} is a table: set it in the config file")));
            }
            toml::Value::Boolean(_) => raw
                .trim()
                .parse::<bool>()
                .map(toml::Value::Boolean)
                .map_err(|_| err(format!("{section}.{key} must be true or false, got {raw:?}")))?,
            _ => toml::Value::String(raw),
        };
        let section_table =
            table.entry(section.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section_table.as_table_mut() {
            Some(t) => {
                // The environment wins over the file, either way a secret is given.
                let secrets = super::secrets::SECRETS;
                match key.strip_suffix("_file") {
                    Some(stem) if super::secrets::is_secret_file(section, key) => t.remove(stem),
                    _ if secrets.contains(&(section, key)) => t.remove(&format!("{key}_file")),
                    _ => None,
                };
                t.insert(key.to_owned(), value);
            }
            None => return Err(err(format!("[{section}] in the config file is not a table"))),
        }
    }
    Ok(())
}
