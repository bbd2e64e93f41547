//! House rules, checked over the source so they stay true: every file
//! says what it is in a `//!` opening, production files and functions stay
//! short enough to read (or say in `LONG` why not), no test is switched off
//! or passes by panicking, retired words stay retired, and `lib.rs` names
//! every module. Each rule is also run on a planted violation, so a rule
//! that stopped seeing anything would fail here.

use std::path::Path;

/// Longest production file (lines before its unit tests), and function.
const MAX_FILE_LINES: usize = 450;
const MAX_FN_LINES: usize = 100;

/// What is longer than the rules allow, and why it stays so for now.
/// An entry that no longer needs to be here fails the test too.
const LONG: &[(&str, &str)] = &[
    ("store/mod.rs", "the store's whole public API over both engines; splits with issue 24 (one engine)"),
    ("store/writer.rs", "the writer's group loop, log and tree writes; splits with issue 24"),
    ("store/generation.rs", "the online rewrite; goes with issue 24 (sled as a rebuildable index)"),
    ("batcher/mod.rs", "the sans-IO batcher and its index; its policies are already apart"),
    ("gateway.rs", "four senders' request shapes; one file per sender is issue 28's next step"),
    ("config.rs", "every setting's type and documentation comment, read as one reference"),
    ("metrics.rs", "the exposition text of every metric in one place, checked against the docs"),
    ("turns/run.rs", "one turn from claim to commit; the steps share the turn's span and state"),
    ("turns/driver.rs", "the driver task's event loop and its recovery order"),
    ("server.rs", "the wiring in order: open patiently, start, run until a stop, stop within one deadline, and the routers' state"),
    ("http/admin.rs", "the admin routes; one file per area is issue 28's next step"),
    ("config/validate.rs fn validate", "one check per setting, in the order of the docs"),
    ("outbox.rs fn run", "the sender loop: pick, send, record, back off, in one place"),
    ("ingest/evolution.rs fn parse_event", "an Evolution event's shapes, one arm per event kind"),
    ("store/writer.rs fn write_log", "one group's log append, sync and undo, in order"),
    ("store/writer.rs fn prepare", "what each tree write reads first, one arm per write"),
    (
        "store/recover.rs fn open_repairing",
        "the store's open: checks, recovery and repairs in the order they must run",
    ),
    ("turns/run.rs fn drive", "one attempt's steps: typing, the handler call, its checks, the commit"),
    ("metrics.rs fn render", "every metric's lines in the order of the docs' table"),
];

/// Words the code no longer uses, and the files where they still name
/// something real (the first store layout's tree, kept in backups).
const RETIRED: &[(&str, &[&str])] = &[("inbox", &["store/recover.rs", "store/snapshot.rs"])];

/// (path relative to the crate, text) of every Rust file in src/, tests/, benches/.
fn files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    for dir in ["src", "tests", "benches"] {
        crate::helpers::rust_sources(&root.join(dir), &mut paths);
    }
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.strip_prefix(root).unwrap().to_string_lossy().into_owned(), text)
        })
        .collect()
}

/// The production part of a file: what comes before its unit tests.
fn production(text: &str) -> &str {
    text.split("\n#[cfg(test)]\nmod tests {").next().unwrap()
}

fn opens_with_doc(path: &str, text: &str) -> Vec<String> {
    match text.starts_with("//!") {
        true => vec![],
        false => vec![format!("{path}: does not open with a `//!` comment saying what it is")],
    }
}

fn too_long_file(name: &str, text: &str) -> Vec<String> {
    let lines = production(text).lines().count();
    match lines > MAX_FILE_LINES {
        true => vec![format!("{name}: {lines} production lines (over {MAX_FILE_LINES})")],
        false => vec![],
    }
}

/// Functions over `MAX_FN_LINES`, as `fn name` (rustfmt's layout: a body
/// ends at the first `}` line at the signature's indentation).
fn too_long_fns(path: &str, text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = production(text).lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(at) = trimmed.find("fn ") else { continue };
        let head = &trimmed[..at];
        let is_fn = head
            .split_whitespace()
            .all(|w| matches!(w, "pub" | "async" | "const" | "unsafe" | "extern") || w.starts_with("pub("));
        if !is_fn || trimmed.ends_with(';') {
            continue;
        }
        let name: String =
            trimmed[at + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let indent = &line[..line.len() - trimmed.len()];
        let closing = format!("{indent}}}");
        if trimmed.ends_with('}') {
            continue; // one line
        }
        if let Some(len) = lines[i..].iter().position(|l| *l == closing) {
            if len + 1 > MAX_FN_LINES {
                out.push((
                    format!("{} fn {name}", path.trim_start_matches("src/")),
                    format!("{path}: fn {name} is {} lines (over {MAX_FN_LINES})", len + 1),
                ));
            }
        }
    }
    out
}

fn switched_off_tests(path: &str, text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start();
            l.starts_with("#[ignore") || l.starts_with("#[should_panic")
        })
        .map(|(n, _)| format!("{path}:{}: a test switched off or passing by panic", n + 1))
        .collect()
}

fn retired_words(name: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (word, allowed) in RETIRED {
        if allowed.contains(&name) {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if line.to_ascii_lowercase().contains(word) {
                out.push(format!("src/{name}:{}: the retired word {word:?}: {}", n + 1, line.trim()));
            }
        }
    }
    out
}

/// Top-level modules (src/x.rs, src/x/mod.rs) that lib.rs does not declare.
fn undeclared(lib: &str, modules: &[String]) -> Vec<String> {
    modules
        .iter()
        .filter(|m| {
            !lib.lines()
                .any(|l| l.starts_with(&format!("pub mod {m};")) || l.starts_with(&format!("mod {m};")))
        })
        .map(|m| format!("src/lib.rs does not name the module `{m}`"))
        .collect()
}

#[test]
fn the_house_rules_hold() {
    let files = files();
    let mut problems = Vec::new();
    let mut long_seen = Vec::new();
    let mut modules = Vec::new();
    for (path, text) in &files {
        problems.extend(opens_with_doc(path, text));
        problems.extend(switched_off_tests(path, text));
        let Some(name) = path.strip_prefix("src/") else { continue };
        if crate::helpers::test_only_source(name) {
            continue; // tests, by their names
        }
        if !name.contains('/') && name != "lib.rs" && name != "main.rs" {
            modules.push(name.trim_end_matches(".rs").to_owned());
        }
        problems.extend(retired_words(name, text));
        let mut longs: Vec<(String, String)> =
            too_long_file(name, text).into_iter().map(|p| (name.to_owned(), p)).collect();
        longs.extend(too_long_fns(path, text));
        for (key, problem) in longs {
            match LONG.iter().any(|(k, _)| *k == key) {
                true => long_seen.push(key),
                false => problems.push(problem),
            }
        }
    }
    let lib = files.iter().find(|(p, _)| p == "src/lib.rs").map(|(_, t)| t.as_str()).unwrap();
    problems.extend(undeclared(lib, &modules));
    for (key, _) in LONG {
        if !long_seen.iter().any(|k| k == key) {
            problems.push(format!("LONG lists {key:?}, which is within the rules now: take it out"));
        }
    }
    assert!(problems.is_empty(), "house rules broken:\n{}", problems.join("\n"));
}

#[test]
fn each_rule_sees_a_planted_violation() {
    assert_eq!(opens_with_doc("src/x.rs", "use std::fs;\n").len(), 1);
    assert!(opens_with_doc("src/x.rs", "//! What x is.\n").is_empty());
    let long = "//! x\n".to_owned() + &"let a = 1;\n".repeat(MAX_FILE_LINES);
    assert_eq!(too_long_file("x.rs", &long).len(), 1);
    assert!(too_long_file("x.rs", &format!("{long}\n#[cfg(test)]\nmod tests {{}}\n")).len() == 1);
    let tested = format!("//! x\n#[cfg(test)]\nmod tests {{\n{}}}\n", "let a = 1;\n".repeat(MAX_FILE_LINES));
    assert!(too_long_file("x.rs", &tested).is_empty(), "unit tests do not count");
    let body = "    let a = 1;\n".repeat(MAX_FN_LINES);
    let long_fn = format!("//! x\npub(crate) async fn big(\n    a: u8,\n) {{\n{body}}}\nfn small() {{}}\n");
    let found = too_long_fns("src/x.rs", &long_fn);
    assert_eq!(found.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), ["x.rs fn big"]);
    let method = format!("impl X {{\n    fn m(&self) {{\n{body}    }}\n}}\n");
    assert_eq!(too_long_fns("src/x.rs", &method).len(), 1);
    assert_eq!(switched_off_tests("t.rs", "#[test]\n#[ignore]\nfn t() {}\n").len(), 1);
    assert_eq!(
        switched_off_tests("t.rs", "#[test]\n    #[should_panic(expected = \"x\")]\nfn t() {}\n").len(),
        1
    );
    assert_eq!(retired_words("turns/x.rs", "// the Inbox of a phone\n").len(), 1);
    assert!(retired_words("store/recover.rs", "// the first layout's inbox\n").is_empty());
    assert_eq!(
        undeclared("pub mod a; // a\n", &["a".into(), "b".into()]),
        ["src/lib.rs does not name the module `b`"]
    );
}
