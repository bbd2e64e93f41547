//! The operator's stack: the alert rules under `promtool`, the Grafana
//! dashboard's queries against a live `/metrics`, and a real Prometheus
//! (Debian's `prometheus`, installed by `.ci/run`) scraping the daemon with
//! its admin token. Without the binaries these tests say so loudly and
//! skip; in CI they must run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::helpers::*;

const ADMIN_TOKEN: &str = "prometheus-scrape-token-0042";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// `/usr/bin/<name>` if it is there; `None` (said loudly) outside CI.
fn tool_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    let path = Path::new("/usr/bin").join(name);
    if path.exists() {
        return Some(path);
    }
    skip_outside_ci(test, &format!("{} is missing (.ci/run installs Debian's prometheus)", path.display()))
}

/// Every `turnstile_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("turnstile_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

/// The sample names a live `/metrics` exposes.
async fn exported(d: &Daemon) -> BTreeSet<String> {
    let r = d.client.get(d.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_dashboard_and_the_alert_rules_query_only_metrics_the_daemon_exports() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    d.send("m1", "79001234567", "Привет").await;
    let live = exported(&d).await;
    d.stop().await;

    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/turnstile.json")).unwrap())
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("every panel has targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expression");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{}: {expr} queries no turnstile metric", panel["title"]);
            queried.extend(names);
        }
    }
    for wanted in [
        "turnstile_webhooks_total",
        "turnstile_log_syncs_total",
        "turnstile_pending_batches",
        "turnstile_oldest_pending_batch_seconds",
        "turnstile_debounce_lag_seconds_bucket",
        "turnstile_turn_duration_seconds_bucket",
        "turnstile_handler_errors_total",
        "turnstile_dead_turns",
        "turnstile_outbox_depth",
        "turnstile_contexts",
        "turnstile_context_cache_hits_total",
        "turnstile_receipts_total",
        "turnstile_delivery_failures_total",
        "turnstile_reply_delivery_seconds_bucket",
        "turnstile_outbox_outside_window",
    ] {
        assert!(queried.contains(wanted), "the dashboard shows nothing of {wanted}");
    }
    let rules = std::fs::read_to_string(deploy("prometheus/turnstile.rules.yml")).unwrap();
    queried.extend(metric_names(&rules));
    let unknown: Vec<&String> = queried.iter().filter(|n| !live.contains(*n)).collect();
    assert!(unknown.is_empty(), "queried but not exported: {unknown:?}");
}

#[test]
fn promtool_checks_the_alert_rules_and_their_tests_pass() {
    let Some(promtool) = tool_or_skip("promtool", "the alert rules' test") else { return };
    let dir = deploy("prometheus");
    for args in [["check", "rules", "turnstile.rules.yml"], ["test", "rules", "turnstile.rules.test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {}: {text}", args.join(" "));
        assert!(text.contains("SUCCESS"), "{text}");
    }
    // One test case per alert.
    let rules = std::fs::read_to_string(dir.join("turnstile.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("turnstile.rules.test.yml")).unwrap();
    for alert in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {alert}")), "no test case for {alert}");
    }
}

/// A Prometheus server of our own; killed (by its pid) when dropped.
struct Prometheus {
    _child: Spawned,
    url: String,
}

impl Prometheus {
    fn start(binary: &Path, dir: &Path, target: &str) -> Prometheus {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        let scrape = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: turnstile\n    authorization:\n      type: Bearer\n      credentials: {ADMIN_TOKEN}\n    static_configs:\n      - targets: [\"{target}\"]\n",
            deploy("prometheus/turnstile.rules.yml").display()
        );
        std::fs::write(&config, scrape).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Prometheus { _child: Spawned(child), url: format!("http://127.0.0.1:{port}") }
    }

    /// The value of an instant query's first sample, if there is one.
    async fn query(&self, client: &reqwest::Client, promql: &str) -> Option<f64> {
        let r =
            client.get(format!("{}/api/v1/query", self.url)).query(&[("query", promql)]).send().await.ok()?;
        let body: Value = r.json().await.ok()?;
        body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (at most 30 s) until `promql` gives a value that `ok` accepts.
    async fn until(&self, client: &reqwest::Client, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.query(client, promql).await.filter(|v| ok(*v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "Prometheus never saw {promql} as expected");
            sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_daemon_with_its_token_and_sees_the_counters_move() {
    let Some(binary) = tool_or_skip("prometheus", "the Prometheus scrape test") else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("data"));
    c.server.admin_token = ADMIN_TOKEN.into();
    let d = Daemon::start(c).await;
    let target = d.admin.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&binary, dir.path(), &target);
    let client = reqwest::Client::new();

    // Scraped with the token (a scrape without it would be 401: up 0).
    prometheus.until(&client, r#"up{job="turnstile"}"#, |v| v == 1.0).await;
    let ready = prometheus.until(&client, "turnstile_ready", |_| true).await;
    assert_eq!(ready, 1.0);
    for (i, text) in BURST.iter().enumerate() {
        d.send(&format!("a{i}"), "79001234567", text).await;
    }
    d.post("/webhook/whatsapp/batched", &json!({"id": "bad"})).await;
    let accepted = r#"sum(turnstile_webhooks_total{job="turnstile",status="200"})"#;
    prometheus.until(&client, accepted, |v| v == 5.0).await;
    prometheus.until(&client, r#"sum(turnstile_webhooks_total{status="422"})"#, |v| v == 1.0).await;
    prometheus.until(&client, "turnstile_pending_messages", |v| v == 5.0).await;
    // More load: the counter moves on, and the stored messages with it.
    for i in 0..20 {
        d.send(&format!("b{i}"), &format!("7900765{i:04}"), "Здравствуйте").await;
    }
    prometheus.until(&client, accepted, |v| v == 25.0).await;
    prometheus.until(&client, "turnstile_messages_stored_total", |v| v == 25.0).await;
    prometheus.until(&client, "turnstile_log_syncs_total", |v| v >= 1.0).await;
    // The alert rules are loaded and evaluated against it.
    let rules: Value =
        client.get(format!("{}/api/v1/rules", prometheus.url)).send().await.unwrap().json().await.unwrap();
    let loaded = rules["data"]["groups"][0]["rules"].as_array().map_or(0, Vec::len);
    assert_eq!(loaded, 13, "{rules}");
    let firing: Value =
        client.get(format!("{}/api/v1/alerts", prometheus.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(firing["data"]["alerts"], json!([]), "a healthy daemon fires nothing");
    drop(prometheus);
    d.stop().await;
}
