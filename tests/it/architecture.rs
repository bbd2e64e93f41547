//! The invariants ARCHITECTURE.md states about who may touch what, checked
//! against the source so they cannot silently stop being true.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (file relative to src/, its code without comments and unit tests)
fn code() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            let code: String =
                text.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n");
            (p.strip_prefix(&src).unwrap().to_string_lossy().into_owned(), code)
        })
        .collect()
}

#[test]
fn only_the_store_names_sled() {
    for (file, code) in code() {
        if !file.starts_with("store/") {
            assert!(!code.contains("sled"), "{file} names sled");
        }
    }
}

#[test]
fn only_turns_commits_turns_and_writes_contexts() {
    for (file, code) in code() {
        for write in ["store.commit(", ".park_dead(", ".update_context(", "store.claim(", ".reopen_dead("] {
            if code.contains(write) {
                assert!(file.starts_with("turns/") || file.starts_with("store/"), "{file} calls {write}");
            }
        }
    }
}

#[test]
fn nothing_but_the_store_syncs_files_or_writes_its_trees() {
    for (file, code) in code() {
        if !file.starts_with("store/") && file != "backup.rs" {
            for forbidden in ["sync_data(", "sync_all(", ".apply_batch(", "sync_file_range"] {
                assert!(!code.contains(forbidden), "{file} uses {forbidden}");
            }
        }
    }
}

#[test]
fn http_never_awaits_a_turn() {
    let http: Vec<_> = code().into_iter().filter(|(f, _)| f.starts_with("http/")).collect();
    assert!(!http.is_empty());
    for (file, code) in http {
        for forbidden in ["Runner", "Handler", "handler::", ".call("] {
            assert!(!code.contains(forbidden), "{file} uses {forbidden}");
        }
    }
}

#[test]
fn the_batcher_the_gate_and_the_schedule_are_sans_io() {
    let mut checked = 0;
    for (file, code) in code() {
        if file.starts_with("batcher/") || file == "turns/gate.rs" || file == "turns/schedule.rs" {
            checked += 1;
            for forbidden in ["tokio", "async", "std::fs", "std::net", "Instant::now"] {
                assert!(!code.contains(forbidden), "{file} uses {forbidden}");
            }
        }
    }
    assert_eq!(checked, 5, "batcher/mod.rs, learn.rs, policy.rs, turns/gate.rs, schedule.rs");
}
