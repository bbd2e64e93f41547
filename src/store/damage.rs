//! Damaged files at the open: sled's boundary, and the offline check.
//!
//! Every file the store writes has a rule for damage (ARCHITECTURE.md,
//! "Faults"): cut a torn tail a crash can leave and say so, discard a cache
//! and say so, or refuse to open, naming the file (and offset). Our own
//! files apply theirs as they are read (`log.rs`, `archive.rs`,
//! `recfile.rs`, ...). sled's are checked here, because sled 0.34 does not
//! say which file is damaged, finds damage in a page only when it reads
//! that page, and panics on some damage (measured: an index out of bounds
//! in its `segment.rs` on a `db` cut short). So before sled opens, its small
//! files are checked (`conf`'s checksum; a damaged snapshot, which sled
//! rebuilds from its log, is removed; a `db` that is gone from a directory
//! that has been used refuses the open, where sled would start an empty
//! store); then sled is opened and every tree walked inside `guarded`,
//! which turns a panic in sled, and its reports of damage, into
//! `StoreError::Corrupt` naming the file (and offset).
//!
//! sled also takes damage in its log for the torn tail of a crash: its
//! recovery stops at the first record that fails its checksum, drops
//! everything written after it and overwrites the rest of that segment
//! (measured: a byte flipped in `db` lost the oldest turns without a
//! word). So the store keeps a *seal* outside sled: a number written into
//! sled's `meta` tree, and, once sled's files are synced with it, into the
//! `seal` file — at the open, every minute while sled is written to, and at
//! the close. sled cut short before its last seal has lost the seal too,
//! and the open refuses (`Seal::check`). Writes since the last seal (at
//! most the last minute's) are not covered.
//!
//! `verify` runs the same checks without changing anything, for
//! `turnstile verify DIR` on a stopped daemon's directory: sled's files
//! are opened from a copy, since sled's open writes.

use std::cell::{Cell, RefCell};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::log;
use super::writer::Writer;
use super::StoreError;

thread_local! {
    /// What the open in progress on this thread repaired (`collecting`).
    static REPAIRS: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Runs the open `f`, and returns with it what it repaired: each repair is
/// logged where it is made and noted here (`noted`), so that `/readyz` and
/// the metrics can say so for as long as the daemon runs.
pub(super) fn collecting<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    REPAIRS.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let result = f();
    (result, REPAIRS.with(|r| r.borrow_mut().take()).unwrap_or_default())
}

/// Notes a repair the open made (`file`: what was done); logged by the caller.
pub(super) fn noted(file: &Path, what: &str) {
    REPAIRS.with(|r| {
        if let Some(repairs) = r.borrow_mut().as_mut() {
            repairs.push(format!("{}: {what}", file.display()));
        }
    });
}

/// sled's settings file, its log and its blob directory.
const CONF: &str = "conf";
const DB: &str = "db";
const BLOBS: &str = "blobs";

/// Checks sled's small files in `db_dir` before sled opens them (see the
/// module's comment); `repair`: remove a damaged snapshot, as the open
/// does (else only say so). Returns what was, or would be, repaired.
pub(super) fn check_sled_files(data: &Path, db_dir: &Path, repair: bool) -> Result<Vec<String>, StoreError> {
    let mut notes = Vec::new();
    let db = db_dir.join(DB);
    let db_len = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    // A seal is written only once sled's files were synced: from then on
    // there is a `db` to find.
    if db_len == 0 && data.join(SEAL_FILE).exists() {
        let others: Vec<String> = list(data)
            .into_iter()
            .filter(|n| n.starts_with("trees.") && data.join(n).join(DB).is_file())
            .collect();
        let reason = match others.is_empty() {
            true => "missing or empty, but this data directory has been used (it has a `seal`): sled would open it as an empty store".to_owned(),
            false => format!("missing, but {} holds sled's files: the `trees` file naming it is missing", others.join(", ")),
        };
        return Err(StoreError::Corrupt { tree: "sled", key: db.display().to_string(), reason });
    }
    let conf = db_dir.join(CONF);
    if let Ok(bytes) = std::fs::read(&conf) {
        // sled ignores a file of 8 bytes or less and writes it again.
        if bytes.len() > 8 {
            let (body, crc) = bytes.split_at(bytes.len() - 4);
            if crc32fast::hash(body).to_le_bytes() != crc {
                return Err(StoreError::Corrupt {
                    tree: "sled",
                    key: conf.display().to_string(),
                    reason: "sled's settings fail their checksum".into(),
                });
            }
        } else if db_len > 0 {
            notes.push(format!("{}: empty; sled writes it again", conf.display()));
        }
    }
    // sled reads the newest snapshot (by name); without one it rebuilds its
    // state from its whole log (measured: every record back).
    let mut snaps: Vec<String> = list(db_dir)
        .into_iter()
        .filter(|n| n.starts_with("snap.") && !n.ends_with(".generating") && !n.ends_with(".in___motion"))
        .collect();
    snaps.sort();
    while let Some(name) = snaps.pop() {
        let path = db_dir.join(&name);
        let bytes = std::fs::read(&path).map_err(|e| log::io_error(&path, e))?;
        let whole = bytes.len() > 12 && {
            let (body, tail) = bytes.split_at(bytes.len() - 12);
            crc32fast::hash(body).to_le_bytes() == tail[8..]
        };
        if whole {
            break;
        }
        if repair {
            tracing::warn!(file = %path.display(), "sled's snapshot is damaged; removed: sled rebuilds its state from its log (`db`)");
            noted(&path, "a damaged snapshot removed (sled rebuilt its state from its log)");
            std::fs::remove_file(&path).map_err(|e| log::io_error(&path, e))?;
        }
        notes.push(format!(
            "{}: a damaged sled snapshot; removed on the next start (sled rebuilds it from `db`)",
            path.display()
        ));
    }
    Ok(notes)
}

fn list(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// Runs `f` — sled's open and reads of its files in `db_dir` — turning a
/// panic inside sled and sled's reports of damage into `Corrupt` naming the
/// file. `names`: the directory the errors name (the real one, when `f`
/// reads a copy).
pub(super) fn guarded<T>(names: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    match quietly(f) {
        Ok(result) => result.map_err(|e| sled_damage(names, e)),
        Err(panic) => Err(StoreError::Corrupt {
            tree: "sled",
            key: names.join(DB).display().to_string(),
            reason: format!("sled could not read its files (it failed inside: {panic})"),
        }),
    }
}

/// sled's error, as the damage it reports (other errors pass unchanged).
fn sled_damage(names: &Path, e: StoreError) -> StoreError {
    let db = names.join(DB).display().to_string();
    let corrupt = |key: String, reason: String| StoreError::Corrupt { tree: "sled", key, reason };
    match e {
        StoreError::Sled(sled::Error::Corruption { at, .. }) => match at {
            Some(sled::DiskPtr::Inline(offset)) => {
                corrupt(format!("{db}@{offset}"), "a record there fails sled's checksum".into())
            }
            Some(sled::DiskPtr::Blob(_, blob)) => corrupt(
                names.join(BLOBS).join(blob.to_string()).display().to_string(),
                "the value fails sled's checksum".into(),
            ),
            // Recovery does not say where; a blob that fails its checksum
            // is the likely one (a file of its own: `crc32 u32 LE` of the
            // rest, then a kind byte and the value).
            None => match damaged_blobs(names).first() {
                Some(blob) => corrupt(
                    blob.display().to_string(),
                    "the blob fails sled's checksum (sled's recovery stopped at it)".into(),
                ),
                None => corrupt(db, "sled found its log damaged while recovering it".into()),
            },
        },
        StoreError::Sled(sled::Error::Io(io))
            if matches!(io.kind(), ErrorKind::UnexpectedEof | ErrorKind::InvalidData) =>
        {
            corrupt(
                names.display().to_string(),
                format!("sled's files end early or hold what it cannot read: {io}"),
            )
        }
        StoreError::Sled(sled::Error::Unsupported(m) | sled::Error::ReportableBug(m)) => corrupt(db, m),
        e => e,
    }
}

/// sled's blob files in `db_dir` that fail their checksum.
fn damaged_blobs(db_dir: &Path) -> Vec<PathBuf> {
    let dir = db_dir.join(BLOBS);
    let mut names = list(&dir);
    names.sort();
    names
        .into_iter()
        .map(|n| dir.join(n))
        .filter(|p| {
            let Ok(bytes) = std::fs::read(p) else { return false };
            bytes.len() < 5 || crc32fast::hash(&bytes[4..]).to_le_bytes() != bytes[..4]
        })
        .collect()
}

thread_local! {
    /// Set while `quietly` runs on this thread: a panic is caught, not printed.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, catching a panic: its message comes back as the error, and
/// the default hook does not print it (the open's error says it instead).
/// Panics on other threads, or outside, print as ever.
fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                return previous(info);
            }
            let payload = info.payload();
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            CAUGHT.with(|c| *c.borrow_mut() = Some(format!("{what}{at}")));
        }));
    });
    QUIET.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    result.map_err(|_| CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_else(|| "a panic".into()))
}

/// The seal's file in the data directory, and its key in sled's `meta`.
const SEAL_FILE: &str = "seal";
pub(super) const SEAL_KEY: &[u8] = b"seal";
/// How often the writer seals while sled takes writes.
const SEAL_EVERY: Duration = Duration::from_secs(60);

/// The last seal, and what the writer knows of it.
pub(crate) struct Seal {
    data: PathBuf,
    /// The highest seal written (in sled, and maybe not yet in the file).
    no: u64,
    /// The writer's applied epoch at the last seal: nothing to seal if unchanged.
    epoch: u64,
    at: Instant,
}

impl Seal {
    /// At the open, once sled has recovered: sled must hold the seal the
    /// data directory holds, or a later one (a crash between the two writes).
    pub(super) fn check(data: &Path, db_dir: &Path, meta: &sled::Tree) -> Result<Seal, StoreError> {
        let outside = read_seal(data)?;
        let inside = match meta.get(SEAL_KEY)? {
            None => 0,
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                tree: "meta",
                key: "seal".into(),
                reason: format!("{} bytes where 8 were written", v.len()),
            })?),
        };
        if let Some(outside) = outside.filter(|o| inside < *o) {
            return Err(StoreError::Corrupt {
                tree: "sled",
                key: db_dir.join(DB).display().to_string(),
                reason: format!(
                    "sled recovered less than it held: seal {inside}, where {} says {outside}. sled takes damage in its log for a crash's torn tail and drops what follows; restore a backup, or remove {} to go on with what sled kept",
                    data.join(SEAL_FILE).display(),
                    data.join(SEAL_FILE).display()
                ),
            });
        }
        Ok(Seal { data: data.to_owned(), no: inside.max(outside.unwrap_or(0)), epoch: 0, at: Instant::now() })
    }

    /// Writes the next seal into sled; it is sealed once sled's files are
    /// synced with it and `publish` has written the file.
    pub(super) fn stage(&mut self, meta: &sled::Tree) -> Result<u64, StoreError> {
        meta.insert(SEAL_KEY, &(self.no + 1).to_be_bytes())?;
        self.no += 1;
        Ok(self.no)
    }

    /// The file, after sled's files were synced holding seal `no`.
    pub(super) fn publish(&mut self, no: u64) -> Result<(), StoreError> {
        let path = self.data.join(SEAL_FILE);
        let mut bytes = no.to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32fast::hash(&no.to_le_bytes()).to_le_bytes());
        log::replace_file(&self.data, SEAL_FILE, &bytes)
            .and_then(|()| log::sync_dir(&self.data))
            .map_err(|e| log::io_error(&path, e))?;
        self.at = Instant::now();
        Ok(())
    }
}

/// The data directory's seal (`None`: none yet). Written aside and
/// renamed: anything but a checked number is damage.
fn read_seal(data: &Path) -> Result<Option<u64>, StoreError> {
    let path = data.join(SEAL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(log::io_error(&path, e)),
    };
    let checked = <[u8; 12]>::try_from(bytes.as_slice())
        .ok()
        .filter(|b| crc32fast::hash(&b[..8]).to_le_bytes() == b[8..]);
    match checked {
        Some(b) => Ok(Some(u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))),
        None => Err(StoreError::Corrupt {
            tree: "seal",
            key: path.display().to_string(),
            reason: format!("{} bytes that are not a checked seal", bytes.len()),
        }),
    }
}

impl Writer {
    /// How long the writer may sleep before a seal is due (`None`: nothing
    /// to seal).
    pub(super) fn seal_wait(&self) -> Option<Duration> {
        let epoch = self.shared.applied_epoch.load(Ordering::Acquire);
        (epoch != self.seal.epoch).then(|| SEAL_EVERY.saturating_sub(self.seal.at.elapsed()))
    }

    /// Seals what sled holds, if it took writes since the last seal and a
    /// minute has passed (or the store closes). Not while a rewrite or an
    /// export runs (the seal would be a write they do not expect).
    pub(super) fn seal(&mut self, closing: bool) {
        let epoch = self.shared.applied_epoch.load(Ordering::Acquire);
        let due = closing || self.seal.at.elapsed() >= SEAL_EVERY;
        if epoch == self.seal.epoch
            || !due
            || self.rewrite.is_some()
            || self.exporting > 0
            || self.failed().is_some()
        {
            return;
        }
        let sealed = self
            .seal
            .stage(&self.trees.meta)
            .and_then(|no| self.syncer.sync_now(&self.shared).map(|()| no))
            .and_then(|no| self.seal.publish(no));
        match sealed {
            Ok(()) => self.seal.epoch = epoch,
            Err(e) => {
                self.seal.at = Instant::now();
                tracing::warn!(error = %e, "could not seal sled's files; trying again in a minute");
            }
        }
    }
}

/// What `verify` found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The store would not open: this is the error the open stops with.
    pub refuses: bool,
    pub what: String,
}

/// Every check `Store::open` makes of `data`'s files, changing none of
/// them: what would stop the open, and what it would repair and say.
/// `Err`: the directory cannot be checked (held by a running daemon, or
/// not readable).
pub fn verify(data: &Path) -> Result<Vec<Finding>, StoreError> {
    let _lock = super::recover::lock_dir(data)?;
    let mut out = Vec::new();
    let mut note = |r: Result<Vec<String>, StoreError>| match r {
        Ok(notes) => out.extend(notes.into_iter().map(|what| Finding { refuses: false, what })),
        Err(e) => out.push(Finding { refuses: true, what: e.to_string() }),
    };
    let mut used = 0;
    match super::generation::current(data) {
        Ok((_, db_dir)) => note(check_sled_files(data, &db_dir, false).and_then(|mut notes| {
            let parts;
            (used, parts) = walk_copy(data, &db_dir)?;
            notes.extend(parts);
            Ok(notes)
        })),
        Err(e) => note(Err(e)),
    }
    note(super::recover::check_log(data).map(|(notes, in_log)| {
        used = used.max(in_log);
        notes
    }));
    note(super::ids::check(data).map(|mark| match mark {
        Some(mark) if mark <= used => vec![format!(
            "{}: the id mark ({mark}) is not above the ids the store holds ({used}); moved above them on the next start",
            data.join("ids").display()
        )],
        _ => Vec::new(),
    }));
    note(super::links::check(data));
    note(super::quarantine::check(data).map(|_| Vec::new()));
    note(super::takeover::check(data));
    note(super::receipts::check(data));
    note(super::archive::check(data));
    if let Some(reason) = super::rhythms::check(data) {
        out.push(Finding { refuses: false, what: reason });
    }
    Ok(out)
}

/// Opens a copy of sled's files in `db_dir` and walks every tree, checks
/// the seal and the context part files, as the open does; the highest id
/// its records hold, and the parts the open would drop.
fn walk_copy(data: &Path, db_dir: &Path) -> Result<(u64, Vec<String>), StoreError> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let copy =
        std::env::temp_dir().join(format!("turnstile-verify-{}-{}", std::process::id(), stamp.as_nanos()));
    let walked = copy_sled_files(db_dir, &copy).map_err(|e| log::io_error(&copy, e)).and_then(|()| {
        check_sled_files(&copy, &copy, true)?;
        guarded(db_dir, || {
            let db = super::open_db(&copy, super::Options::default())?;
            let (_, used) = super::sizes::walk(&db)?;
            Seal::check(data, db_dir, &db.open_tree(super::META)?)?;
            Ok((used, super::parts::verify(data, &db.open_tree("ctx_files")?)?))
        })
    });
    let _ = std::fs::remove_dir_all(&copy);
    walked
}

fn copy_sled_files(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for name in list(from) {
        let (src, dst) = (from.join(&name), to.join(&name));
        if name == BLOBS {
            std::fs::create_dir_all(&dst)?;
            for blob in list(&src) {
                std::fs::copy(src.join(&blob), dst.join(&blob))?;
            }
        } else if name == DB || name == CONF || name.starts_with("snap.") {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_is_an_error_naming_the_file() {
        let dir = Path::new("/var/lib/turnstile");
        let err = guarded::<()>(dir, || panic!("index out of bounds")).unwrap_err().to_string();
        assert!(err.contains("/var/lib/turnstile/db") && err.contains("index out of bounds"), "{err}");
        let damaged = sled::Error::Corruption { at: Some(sled::DiskPtr::Inline(4096)), bt: () };
        let err = guarded::<()>(dir, || Err(damaged.into())).unwrap_err().to_string();
        assert!(err.contains("/var/lib/turnstile/db@4096"), "{err}");
        let held = guarded::<()>(dir, || Err(StoreError::Held { dir: "x".into() })).unwrap_err();
        assert!(matches!(held, StoreError::Held { .. }), "other errors pass");
    }

    #[test]
    fn sleds_small_files_are_checked_before_sled_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(check_sled_files(d, d, true).unwrap().is_empty(), "a new directory");
        std::fs::write(d.join(SEAL_FILE), b"x").unwrap();
        let err = check_sled_files(d, d, true).unwrap_err().to_string();
        assert!(err.contains("db") && err.contains("has been used"), "{err}");
        drop(super::super::open_db(d, super::super::Options::default()).unwrap());
        let mut conf = std::fs::read(d.join(CONF)).unwrap();
        conf[3] ^= 1;
        std::fs::write(d.join(CONF), &conf).unwrap();
        assert!(check_sled_files(d, d, true).unwrap_err().to_string().contains("conf"));
        conf[3] ^= 1;
        std::fs::write(d.join(CONF), &conf).unwrap();
        std::fs::write(d.join("snap.00000000000000AB"), b"not a snapshot at all").unwrap();
        let notes = check_sled_files(d, d, false).unwrap();
        assert!(notes.len() == 1 && d.join("snap.00000000000000AB").exists(), "only said: {notes:?}");
        check_sled_files(d, d, true).unwrap();
        assert!(!d.join("snap.00000000000000AB").exists(), "removed");
    }
}
