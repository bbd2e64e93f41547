//! The documentation as people look things up: a short README that starts
//! with the two commands, relative links that land (file and heading), and a
//! configuration page that lists every key of the code with its default —
//! no more, no less.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// README.md, ARCHITECTURE.md and every docs/*.md.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md"), root().join("ARCHITECTURE.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "no docs/*.md");
    pages.extend(docs);
    pages
}

/// The lines of a Markdown text outside fenced code blocks, with their numbers.
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<&str> = None;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = if trimmed.starts_with("```") {
            Some("```")
        } else if trimmed.starts_with("~~~") {
            Some("~~~")
        } else {
            None
        };
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(f), Some(m)) if f == m => fence = None,
            (None, None) => out.push((i + 1, line)),
            _ => {}
        }
    }
    out
}

/// A line without its inline code spans (`...`), where brackets are not links.
fn without_code(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|&c| c == '`').count();
        let delimiter = "`".repeat(ticks);
        let after = &rest[start + ticks..];
        match after.find(&delimiter) {
            Some(end) => rest = &after[end + ticks..],
            None => {
                rest = after;
                out.push_str(&delimiter);
            }
        }
    }
    out.push_str(rest);
    out
}

/// GitHub's anchor for a heading: lowercase, spaces to `-`, punctuation
/// dropped except `-` and `_` (letters and digits of any script are kept).
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .flat_map(char::to_lowercase)
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors a page offers: one per heading, repeats numbered `-1`, `-2`...
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (_, line) in prose(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let n = seen.entry(base.clone()).or_insert(0);
        out.push(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
        *n += 1;
    }
    out
}

/// The inline links `[text](target)` and images of a page: (line, target).
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (number, line) in prose(text) {
        let line = without_code(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            // `[text](target "title")`: the target is the first word.
            let target = after[..end].split_whitespace().next().unwrap_or("");
            out.push((number, target.trim_start_matches('<').trim_end_matches('>').to_owned()));
            rest = &after[end + 1..];
        }
    }
    out
}

#[test]
fn the_readme_is_short_and_starts_with_the_two_commands() {
    let readme = read(&root().join("README.md"));
    let lines: Vec<&str> = readme.lines().collect();
    assert!(lines.len() <= 250, "README.md has {} lines, more than 250: move detail to docs/", lines.len());
    assert_eq!(lines.first(), Some(&"# turnstile"), "README.md's first line");
    assert_eq!(lines.get(1), Some(&""), "a blank line after the title");
    assert!(lines.get(2).is_some_and(|l| l.starts_with("```")), "a fenced block right after the title");
    let commands: Vec<&str> = lines[3..]
        .iter()
        .take_while(|l| !l.starts_with("```"))
        .copied()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        commands.first().is_some_and(|l| l.starts_with("cargo run --release -- serve")),
        "the first command is the daemon: {commands:?}"
    );
    assert!(
        commands.get(1).is_some_and(|l| l.starts_with("cargo test")),
        "the second command is the tests: {commands:?}"
    );
}

#[test]
fn every_relative_link_lands_on_a_file_and_a_heading() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = read(&page);
        let dir = page.parent().unwrap();
        for (line, target) in links(&text) {
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            checked += 1;
            let (file, fragment) = match target.split_once('#') {
                Some((file, fragment)) => (file, Some(fragment)),
                None => (target.as_str(), None),
            };
            let file = if file.is_empty() { page.clone() } else { dir.join(file) };
            let at = format!("{}:{line}: ({target})", page.strip_prefix(root()).unwrap().display());
            if !file.exists() {
                broken.push(format!("{at}: no file {}", file.display()));
                continue;
            }
            if let Some(fragment) = fragment {
                let is_markdown = file.extension().is_some_and(|x| x == "md");
                if !is_markdown || !anchors(&read(&file)).iter().any(|a| a == fragment) {
                    broken.push(format!("{at}: no heading #{fragment} in {}", file.display()));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} relative links found: is the link parser broken?");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// docs/configuration.md's tables: section -> key -> the default cell.
fn documented_keys() -> BTreeMap<String, BTreeMap<String, String>> {
    let text = read(&root().join("docs/configuration.md"));
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut section: Option<String> = None;
    for (number, line) in prose(&text) {
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading.strip_prefix('[').and_then(|h| h.strip_suffix(']')).map(str::to_owned);
            if let Some(s) = &section {
                assert!(!out.contains_key(s), "configuration.md:{number}: [{s}] documented twice");
                out.insert(s.clone(), BTreeMap::new());
            }
            continue;
        }
        let Some(section) = &section else { continue };
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", key, default, meaning..., ""
        assert!(cells.len() >= 5, "configuration.md:{number}: a row needs key, default and meaning: {line}");
        let key = cells[1].strip_prefix('`').and_then(|k| k.strip_suffix('`'));
        let default = cells[2].strip_prefix('`').and_then(|d| d.strip_suffix('`'));
        let (Some(key), Some(default)) = (key, default) else {
            panic!("configuration.md:{number}: key and default go in backticks: {line}");
        };
        assert!(!cells[3].is_empty(), "configuration.md:{number}: {section}.{key} has no meaning");
        let keys = out.get_mut(section).unwrap();
        assert!(
            keys.insert(key.to_owned(), default.to_owned()).is_none(),
            "{section}.{key} documented twice"
        );
    }
    out
}

#[test]
fn the_configuration_page_documents_every_key_with_its_default() {
    let defaults = toml::Value::try_from(turnstile::Config::default()).unwrap();
    let defaults = defaults.as_table().unwrap();
    let documented = documented_keys();
    let mut wrong = Vec::new();
    for (section, keys) in defaults {
        let Some(page) = documented.get(section) else {
            wrong.push(format!("[{section}]: no `## [{section}]` table"));
            continue;
        };
        for (key, value) in keys.as_table().unwrap() {
            let Some(cell) = page.get(key) else {
                wrong.push(format!("{section}.{key}: not documented (default {value})"));
                continue;
            };
            match toml::from_str::<toml::Table>(&format!("v = {cell}")) {
                Ok(parsed) if parsed["v"] == *value => {}
                Ok(parsed) => wrong.push(format!(
                    "{section}.{key}: documented {}, the code's default is {value}",
                    parsed["v"]
                )),
                Err(e) => wrong.push(format!("{section}.{key}: the default `{cell}` is not TOML: {e}")),
            }
        }
    }
    for (section, keys) in &documented {
        match defaults.get(section).and_then(toml::Value::as_table) {
            None => wrong.push(format!("[{section}]: documented, but not a section of the config")),
            Some(known) => {
                for key in keys.keys().filter(|k| !known.contains_key(*k)) {
                    wrong.push(format!("{section}.{key}: documented, but not a key of the config"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "docs/configuration.md and Config::default() disagree:\n{}", wrong.join("\n"));
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug("Stopping and restarting"), "stopping-and-restarting");
    assert_eq!(slug("Outbound: the outbox"), "outbound-the-outbox");
    assert_eq!(
        slug("Ingest, side by side — `bash benches/compare.sh`"),
        "ingest-side-by-side--bash-benchescomparesh"
    );
    assert_eq!(slug("[server]"), "server");
    assert_eq!(slug("Привет, Мир"), "привет-мир");
    assert_eq!(anchors("# A\n```\n# not a heading\n```\n## A\n"), ["a", "a-1"]);
    assert_eq!(
        links("see [x](a.md#b) and `[y](c.md)` ![i](d.png)"),
        [(1, "a.md#b".to_owned()), (1, "d.png".to_owned())]
    );
}
