//! The Debian package, installed on this machine for real (as root, with
//! `dpkg`): every path and owner, the unit verified, the installed binary
//! run as the `turnstile` user on `/var/lib/turnstile` with the installed
//! config until a webhook becomes a turn, an upgrade keeping an edited
//! config and the data, a config that would not start refused by the
//! upgrade, remove (data kept) and purge (data and user gone) — leaving
//! the machine's users, groups and paths as they were. Outside CI, without
//! root or dpkg, it says so and skips; in CI it must run.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{skip_outside_ci, Spawned};

const TEST: &str = "the package test";
const CONFIG: &str = "/etc/turnstile/turnstile.toml";
const DATA: &str = "/var/lib/turnstile";
/// What the package's trial config listens on.
const PUBLIC: &str = "http://127.0.0.1:8080";
const ADMIN: &str = "http://127.0.0.1:8081";
/// Files the package's users and groups live in: compared before and after.
const ACCOUNTS: [&str; 4] = ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"];

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    out
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    text(&out)
}

fn dpkg(args: &[&str]) -> Output {
    run(Command::new("dpkg").args(args).env("DEBIAN_FRONTEND", "noninteractive"))
}

fn installed_version() -> Option<String> {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status} ${Version}", "turnstile"]));
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    t.strip_prefix("install ok installed ").map(str::to_owned)
}

fn id_of(name: &str, db: &str) -> Option<u32> {
    let out = run(Command::new("getent").args([db, name]));
    String::from_utf8_lossy(&out.stdout).split(':').nth(2).and_then(|n| n.parse().ok())
}

/// The installed binary as the `turnstile` user, its group and only that,
/// with no `TURNSTILE_*` variable of ours.
fn as_turnstile(args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=turnstile", "--regid=turnstile", "--init-groups", "/usr/bin/turnstile"]).args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TURNSTILE_")) {
        cmd.env_remove(k);
    }
    cmd
}

/// Purges the package (and ends the daemon it ran) however the test ends.
struct Installed {
    daemon: Option<Spawned>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        drop(self.daemon.take());
        if run(Command::new("dpkg-query").args(["-W", "turnstile"])).status.success() {
            let _ = dpkg(&["--purge", "turnstile"]);
        }
    }
}

impl Installed {
    /// The installed binary as the installed unit would run it: the
    /// `turnstile` user, the installed config, no `TURNSTILE_*` of ours.
    async fn start(&mut self, log: &Path) {
        let mut cmd = as_turnstile(&["serve", "--config", CONFIG]);
        cmd.current_dir(DATA);
        let log = std::fs::File::create(log).unwrap();
        cmd.stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null());
        self.daemon = Some(Spawned(cmd.spawn().expect("the installed binary starts")));
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("{PUBLIC}/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the installed daemon did not become ready");
    }

    fn stop(&mut self) {
        let mut d = self.daemon.take().expect("running");
        unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) };
        let status = d.0.wait().unwrap();
        assert!(status.success(), "the daemon's stop: {status}");
    }
}

/// The conversation's turns: (reply) by the admin API.
async fn replies(phone: &str) -> Vec<String> {
    let client = reqwest::Client::new();
    let conv: Value =
        client.get(format!("{ADMIN}/api/conversations/{phone}")).send().await.unwrap().json().await.unwrap();
    conv["turns"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["reply"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn assert_path(path: &str, mode: u32, owner: (u32, u32)) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(
        (m.permissions().mode() & 0o7777, m.uid(), m.gid()),
        (mode, owner.0, owner.1),
        "{path}: mode and owner"
    );
}

#[tokio::test]
async fn the_package_installs_runs_a_turn_upgrades_keeping_config_and_data_and_purges_clean() {
    if unsafe { libc::geteuid() } != 0 {
        return skip_outside_ci(TEST, "needs root (dpkg -i)").unwrap_or(());
    }
    for tool in ["dpkg", "dpkg-deb", "systemd-analyze", "strip", "objdump", "setpriv"] {
        if !run(Command::new("sh").args(["-c", &format!("command -v {tool}")])).status.success() {
            return skip_outside_ci(TEST, &format!("{tool} is missing")).unwrap_or(());
        }
    }
    // The machine must not have a turnstile of its own: the test would purge it.
    let foreign = [
        run(Command::new("dpkg-query").args(["-W", "turnstile"]))
            .status
            .success()
            .then_some("a turnstile package"),
        id_of("turnstile", "passwd").map(|_| "a turnstile user"),
        Path::new(DATA).exists().then_some(DATA),
        Path::new("/etc/turnstile").exists().then_some("/etc/turnstile"),
    ];
    if let Some(what) = foreign.iter().flatten().next() {
        let why = format!("this machine already has {what}; the test installs and purges its own");
        return skip_outside_ci(TEST, &why).unwrap_or(());
    }
    let accounts: Vec<String> =
        ACCOUNTS.iter().map(|f| std::fs::read_to_string(f).unwrap_or_default()).collect();

    let work = tempfile::tempdir().unwrap();
    let build = |version: &str| -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/build-deb.sh");
        let out = ok(Command::new("bash").args([
            script,
            "--binary",
            env!("CARGO_BIN_EXE_turnstile"),
            "--version",
            version,
            "--out",
            work.path().join(version).to_str().unwrap(),
            "--fast",
        ]));
        out.lines().last().unwrap().trim().to_owned()
    };
    let first = build("0.1.0");
    let second = build("0.1.0+upgrade1");

    // Install.
    let mut installed = Installed { daemon: None };
    let out = dpkg(&["-i", &first]);
    assert!(out.status.success(), "dpkg -i: {}", text(&out));
    assert_eq!(installed_version().as_deref(), Some("0.1.0"));
    let uid = id_of("turnstile", "passwd").expect("the postinst made the turnstile user");
    let gid = id_of("turnstile", "group").expect("and its group");
    assert!(uid < 1000, "a system user: {uid}");
    let passwd = ok(Command::new("getent").args(["passwd", "turnstile"]));
    assert!(passwd.trim_end().ends_with(":/var/lib/turnstile:/usr/sbin/nologin"), "{passwd}");
    let root = (0, 0);
    assert_path("/usr/bin/turnstile", 0o755, root);
    assert_path("/lib/systemd/system/turnstile.service", 0o644, root);
    assert_path("/etc/turnstile", 0o755, root);
    assert_path(CONFIG, 0o644, root);
    assert_path("/etc/turnstile/secrets.env", 0o640, (0, gid));
    assert_path(DATA, 0o750, (uid, gid));
    for doc in ["README.md", "ARCHITECTURE.md", "copyright"] {
        assert_path(&format!("/usr/share/doc/turnstile/{doc}"), 0o644, root);
    }
    let pages = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    let docs = pages(concat!(env!("CARGO_MANIFEST_DIR"), "/docs"));
    assert!(!docs.is_empty());
    assert_eq!(pages("/usr/share/doc/turnstile/docs"), docs, "every page of docs/ is shipped");
    assert_path("/usr/share/turnstile/prometheus/turnstile.rules.yml", 0o644, root);
    assert_path("/usr/share/turnstile/grafana/turnstile.json", 0o644, root);
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "turnstile"]));
    assert!(conffiles.contains(CONFIG) && conffiles.contains("/etc/turnstile/secrets.env"), "{conffiles}");
    let config = std::fs::read_to_string(CONFIG).unwrap();
    assert!(
        config.contains("data_dir = \"/var/lib/turnstile\""),
        "the installed config keeps its data in the state directory"
    );
    let verify =
        run(Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/turnstile.service"]));
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&verify)
    );
    // The unit's pre-start check passes on what was installed.
    ok(&mut as_turnstile(&["check", "--quiet", "--config", CONFIG]));

    // The installed daemon takes a webhook and runs its turn.
    installed.start(&work.path().join("first.log")).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{PUBLIC}/webhook/whatsapp"))
        .json(&json!({"id": "pkg-1", "from": "79001234567", "message": "Запишите на стрижку"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let mut turned = Vec::new();
    for _ in 0..200 {
        turned = replies("79001234567").await;
        if !turned.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(turned, ["received: Запишите на стрижку"]);
    installed.stop();
    let log_dir = format!("{DATA}/log");
    assert_eq!(
        std::fs::metadata(&log_dir).map(|m| m.uid()).ok(),
        Some(uid),
        "the daemon's files are its user's"
    );

    // Upgrade with an edited config: both kept, the daemon's data too.
    let edited = config.replace("history_limit = 20", "history_limit = 25 # edited by the package test");
    assert_ne!(edited, config, "the example config has history_limit = 20");
    std::fs::write(CONFIG, &edited).unwrap();
    let out = dpkg(&["-i", &second]);
    assert!(out.status.success(), "the upgrade: {}", text(&out));
    assert_eq!(installed_version().as_deref(), Some("0.1.0+upgrade1"));
    assert_eq!(std::fs::read_to_string(CONFIG).unwrap(), edited, "the edited config is kept");
    installed.start(&work.path().join("second.log")).await;
    assert_eq!(replies("79001234567").await, ["received: Запишите на стрижку"], "the data is kept");
    installed.stop();

    // A config that would not start: the upgrade's check refuses it, by name.
    std::fs::write(CONFIG, edited.replace("history_limit = 25", "history_limit_typo = 25")).unwrap();
    let out = dpkg(&["-i", &first]);
    assert!(!out.status.success(), "a config that would not start fails the install");
    assert!(text(&out).contains("history_limit_typo"), "{}", text(&out));
    std::fs::write(CONFIG, &edited).unwrap();
    let out = dpkg(&["--configure", "turnstile"]);
    assert!(out.status.success(), "fixed, it configures: {}", text(&out));

    // Remove: the program goes, the data and the config stay.
    let out = dpkg(&["--remove", "turnstile"]);
    assert!(out.status.success(), "dpkg --remove: {}", text(&out));
    assert!(
        !Path::new("/usr/bin/turnstile").exists()
            && !Path::new("/lib/systemd/system/turnstile.service").exists()
    );
    assert!(Path::new(&log_dir).exists(), "remove keeps the data");
    assert_eq!(std::fs::read_to_string(CONFIG).unwrap(), edited, "remove keeps the config");

    // Purge: everything goes, and it says so.
    let out = dpkg(&["--purge", "turnstile"]);
    assert!(out.status.success(), "dpkg --purge: {}", text(&out));
    assert!(text(&out).contains("deleted /var/lib/turnstile"), "{}", text(&out));
    for gone in [DATA, "/etc/turnstile", "/usr/share/doc/turnstile", "/usr/share/turnstile"] {
        assert!(!Path::new(gone).exists(), "{gone} is left after the purge");
    }
    let after: Vec<String> =
        ACCOUNTS.iter().map(|f| std::fs::read_to_string(f).unwrap_or_default()).collect();
    for ((file, before), after) in ACCOUNTS.iter().zip(&accounts).zip(&after) {
        assert_eq!(before, after, "{file} is not as it was");
    }
}
