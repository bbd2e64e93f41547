//! The `openai` handler against a real OpenAI-compatible server: LiteLLM's
//! proxy (from PyPI; `.ci/run` installs it into /opt/litellm) with mock
//! models, one that answers and one that answers 429. A callback of the
//! proxy's own writes down every request the proxy received, so the test
//! checks the exact messages the model would have seen. Without LiteLLM the
//! test says so loudly and skips; in CI it must run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::{sleep, Instant};
use turnstile::config::HandlerKind;

use crate::helpers::*;

const MASTER_KEY: &str = "sk-turnstile-litellm-test";
const ANSWER: &str = "Есть окно завтра в 11:00";

fn litellm_or_skip() -> Option<PathBuf> {
    let path = std::env::var_os("TURNSTILE_LITELLM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/litellm/bin/litellm"));
    if path.exists() {
        return Some(path);
    }
    skip_outside_ci("the LiteLLM test", &format!("{} is missing (.ci/run installs it)", path.display()))
}

/// A LiteLLM proxy of our own on a free port; killed (by its pid) when dropped.
struct LiteLlm {
    _child: Spawned,
    url: String,
    seen: PathBuf,
}

impl LiteLlm {
    async fn start(binary: &Path, dir: &Path) -> LiteLlm {
        let config = format!(
            r#"model_list:
  - model_name: salon-mock
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: sk-unused
      mock_response: "{ANSWER}"
  - model_name: salon-busy
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: sk-unused
      mock_response: "litellm.RateLimitError"
litellm_settings:
  callbacks: recorder.recorder
  num_retries: 0
general_settings:
  master_key: {MASTER_KEY}
"#
        );
        std::fs::write(dir.join("config.yaml"), config).unwrap();
        // The proxy imports this from the config's directory.
        std::fs::write(
            dir.join("recorder.py"),
            r#"import json, os
from litellm.integrations.custom_logger import CustomLogger

class Recorder(CustomLogger):
    def _write(self, kwargs, outcome):
        with open(os.environ["RECORDER_FILE"], "a") as f:
            f.write(json.dumps({"messages": kwargs.get("messages"), "outcome": outcome}, ensure_ascii=False) + "\n")

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs, "success")

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs, "failure")

recorder = Recorder()
"#,
        )
        .unwrap();
        let port = free_port();
        let seen = dir.join("seen.jsonl");
        let child = Command::new(binary)
            .args(["--config", "config.yaml", "--host", "127.0.0.1", "--port", &port.to_string()])
            .current_dir(dir)
            .env("RECORDER_FILE", &seen)
            .env("LITELLM_TELEMETRY", "False")
            // The model cost map ships with the package: no fetch from outside.
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("litellm.log")).unwrap())
            .stderr(Stdio::from(std::fs::File::create(dir.join("litellm.err")).unwrap()))
            .spawn()
            .unwrap();
        let proxy = LiteLlm { _child: Spawned(child), url: format!("http://127.0.0.1:{port}"), seen };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let live = client.get(format!("{}/health/liveliness", proxy.url)).send().await;
            if live.is_ok_and(|r| r.status() == 200) {
                return proxy;
            }
            let log = std::fs::read_to_string(dir.join("litellm.err")).unwrap_or_default();
            assert!(Instant::now() < deadline, "LiteLLM did not start: {log}");
            sleep(Duration::from_millis(250)).await;
        }
    }

    /// What the proxy received so far: (messages, "success" | "failure").
    fn seen(&self) -> Vec<(Value, String)> {
        std::fs::read_to_string(&self.seen)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| (v["messages"].clone(), v["outcome"].as_str().unwrap().to_owned()))
            .collect()
    }

    async fn wait_for(&self, what: &str, n: usize) -> Vec<(Value, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(Instant::now() < deadline, "{what}: the proxy saw {seen:?}");
            sleep(Duration::from_millis(100)).await;
        }
    }
}

fn openai_config(dir: &Path, proxy: &LiteLlm, model: &str) -> turnstile::Config {
    let mut c = config(dir);
    c.handler.kind = HandlerKind::OpenAi;
    c.openai.base_url = format!("{}/v1", proxy.url);
    c.openai.model = model.into();
    c.openai.system_prompt = "Ты администратор салона «Лотос».".into();
    c.openai.cache_prompt = "Данные салона:".into();
    c.openai.history_turns = 1;
    c.openai.api_key = MASTER_KEY.into();
    c.ingest.webhook_token = WEBHOOK_TOKEN.into();
    c.batching.debounce_ms = 400;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_handler_against_litellm_sends_prompt_salon_history_and_the_merged_burst() {
    let Some(binary) = litellm_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let proxy = LiteLlm::start(&binary, dir.path()).await;
    let d = Daemon::start(openai_config(&dir.path().join("data"), &proxy, "salon-mock")).await;
    let phone = "79001234567";

    // The booking side stores the salon's snapshot and an earlier exchange.
    let cache = json!({"company": "Лотос", "staff": [{"name": "Анна"}], "slots": ["11:00", "15:30"]});
    let put = json!({"cache": cache, "dialogue": {"history": [
        {"role": "user", "content": "Добрый день"}, {"role": "assistant", "content": "Здравствуйте!"}]}});
    assert_eq!(d.put(&format!("/api/contexts/default/{phone}"), &put).await.0, 200);
    // Three messages of one thought: one turn, one request.
    for (i, text) in ["Привет", "Хочу на стрижку", "Завтра можно?"].iter().enumerate()
    {
        d.send(&format!("l{i}"), phone, text).await;
    }
    let seen = proxy.wait_for("the first turn", 1).await;
    let system = json!({"role": "system", "content": "Ты администратор салона «Лотос»."});
    let salon = json!({"role": "system", "content": format!("Данные салона:\n{cache}")});
    assert_eq!(
        seen[0],
        (
            json!([system, salon,
                   {"role": "user", "content": "Добрый день"}, {"role": "assistant", "content": "Здравствуйте!"},
                   {"role": "user", "content": "Привет\nХочу на стрижку\nЗавтра можно?"}]),
            "success".to_owned()
        )
    );
    wait_until_real("the reply committed", || async {
        d.get(&format!("/api/conversations/{phone}")).await.1["turns"][0]["reply"] == ANSWER
    })
    .await;

    // The next turn: the window keeps the last exchange only (history_turns = 1).
    d.send("l3", phone, "Давайте в 11").await;
    let seen = proxy.wait_for("the second turn", 2).await;
    assert_eq!(
        seen[1].0,
        json!([system, salon,
               {"role": "user", "content": "Привет\nХочу на стрижку\nЗавтра можно?"},
               {"role": "assistant", "content": ANSWER},
               {"role": "user", "content": "Давайте в 11"}])
    );
    assert_eq!(seen.len(), 2, "one request per turn");
    d.stop().await;

    // A model that answers 429: retried like any handler error, then dead.
    let mut c = openai_config(&dir.path().join("data-busy"), &proxy, "salon-busy");
    c.handler.max_attempts = 2;
    c.handler.backoff_ms = 200;
    let d = Daemon::start(c).await;
    d.send("b1", phone, "Есть окно?").await;
    let seen = proxy.wait_for("two attempts", 4).await;
    assert_eq!(seen[2].1, "failure");
    assert_eq!(seen[3].1, "failure");
    assert_eq!(seen[2].0, seen[3].0, "the retry sent the same request");
    wait_until_real("the turn parked dead", || async {
        d.get("/api/dead").await.1["dead"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    let (_, dead) = d.get("/api/dead").await;
    assert_eq!(dead["dead"][0]["attempts"], 2);
    assert!(dead["dead"][0]["error"].as_str().unwrap().contains("429"), "{dead}");
    d.stop().await;
}

/// Polls `ok` on the real clock (the proxy is another process) for 30 s.
async fn wait_until_real<F, Fut>(what: &str, ok: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok().await {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        sleep(Duration::from_millis(100)).await;
    }
}
