//! The invariants ARCHITECTURE.md states about who may touch what, checked
//! against the source so they cannot silently stop being true.

use std::path::Path;

/// (file relative to src/, its code without comments and unit tests)
fn code() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    crate::helpers::rust_sources(&src, &mut files);
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

/// Top-level module → the other top-level modules its production code
/// names (`crate::x`); test-only files (`tests.rs`, `fuzz`) left out.
fn imports() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut graph = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for (file, code) in code() {
        if crate::helpers::test_only_source(&file) {
            continue;
        }
        let module = file.split('/').next().unwrap().trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let named = graph.entry(module.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let other: String =
                code[at + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if !other.is_empty() && other != module {
                named.insert(other);
            }
        }
    }
    graph
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn cycle(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        at: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|m| m == at) {
            let mut found = path[start..].to_vec();
            found.push(at.to_owned());
            return Some(found);
        }
        if !done.insert(at.to_owned()) {
            return None;
        }
        path.push(at.to_owned());
        for next in graph.get(at).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph.keys().find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_the_server_and_the_modules_form_no_cycle() {
    let graph = imports();
    assert!(graph.len() > 20, "{graph:?}");
    for (module, named) in &graph {
        assert!(!named.contains("server"), "{module} imports server: only main and lib may");
    }
    assert_eq!(cycle(&graph), None, "an import cycle between top-level modules");
    // The check sees a planted cycle.
    let mut planted = graph.clone();
    planted.get_mut("store").unwrap().insert("http".into());
    let found = cycle(&planted).expect("a planted cycle store -> http -> store is found");
    assert!(found.contains(&"store".to_owned()) && found.contains(&"http".to_owned()), "{found:?}");
}
