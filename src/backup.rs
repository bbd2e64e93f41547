//! Backup files: one gzip-compressed file holding every record of the store
//! and a manifest (format version, counts per kind of record, SHA-256).
//!
//! Layout: the magic line `TURNSTILE-BACKUP 1\n`, then a gzip stream of
//! records — `1, tree (u16 len + bytes), key (u32 len + bytes), value
//! (u32 len + bytes)` — closed by `0`, then the manifest as `u32 len + JSON`;
//! nothing follows the gzip stream.
//! The SHA-256 covers the record bytes; gzip's CRC covers the rest. Reading a
//! file always checks both, so `verify`, `restore` and a truncated or flipped
//! file fail the same clean way.
//!
//! Offline backup and restore refuse a data directory that a running daemon
//! holds; restore builds the new store beside the target and swaps it in only
//! once complete, so a failed restore leaves the target as it was.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::bufread::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::message::unix_ms;
use crate::store::{Store, StoreError};

const MAGIC: &[u8] = b"TURNSTILE-BACKUP 1\n";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a turnstile backup (no magic line)")]
    NotABackup,
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error("{0} is not empty; restore with --force to replace it")]
    NotEmpty(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.display().to_string(), source }
}

/// What a backup holds, written at its end and checked on every read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_at_ms: u64,
    /// Ids the restored store generates start above this.
    pub next_id: u64,
    /// Records per tree (turns, history, ctx_dialogue, outbox...).
    pub counts: BTreeMap<String, u64>,
    pub records: u64,
    pub sha256: String,
}

/// Writes a backup of `store` to `out` (a consistent cut; writers wait).
pub fn write(store: &Store, out: impl Write) -> Result<Manifest, BackupError> {
    let fail = |e: std::io::Error| BackupError::Io { path: "backup output".into(), source: e };
    let mut encoder = Encoder::new(out).map_err(fail)?;
    let next_id = store.export(|tree, key, value| encoder.record(tree, key, value).map_err(fail))?;
    let (manifest, mut out) = encoder.finish(next_id).map_err(fail)?;
    out.flush().map_err(fail)?;
    Ok(manifest)
}

/// The format's writing side: the magic line, then records into the gzip
/// stream as they come, hashed and counted, then the end tag and the manifest.
struct Encoder<W: Write> {
    z: GzEncoder<W>,
    hash: Sha256,
    counts: BTreeMap<String, u64>,
    records: u64,
}

impl<W: Write> Encoder<W> {
    fn new(mut out: W) -> std::io::Result<Encoder<W>> {
        out.write_all(MAGIC)?;
        let z = GzEncoder::new(out, flate2::Compression::fast());
        Ok(Encoder { z, hash: Sha256::new(), counts: BTreeMap::new(), records: 0 })
    }

    fn record(&mut self, tree: &str, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let mut rec = Vec::with_capacity(11 + tree.len() + key.len() + value.len());
        rec.push(1u8);
        rec.extend_from_slice(&(tree.len() as u16).to_be_bytes());
        rec.extend_from_slice(tree.as_bytes());
        rec.extend_from_slice(&(key.len() as u32).to_be_bytes());
        rec.extend_from_slice(key);
        rec.extend_from_slice(&(value.len() as u32).to_be_bytes());
        rec.extend_from_slice(value);
        self.hash.update(&rec);
        *self.counts.entry(tree.to_owned()).or_insert(0) += 1;
        self.records += 1;
        self.z.write_all(&rec)
    }

    fn finish(mut self, next_id: u64) -> std::io::Result<(Manifest, W)> {
        self.hash.update([0u8]);
        self.z.write_all(&[0u8])?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            created_at_ms: unix_ms(),
            next_id,
            counts: self.counts,
            records: self.records,
            sha256: hex(&self.hash.finalize()),
        };
        let json = serde_json::to_vec(&manifest).expect("a manifest serializes");
        self.z.write_all(&(json.len() as u32).to_be_bytes())?;
        self.z.write_all(&json)?;
        Ok((manifest, self.z.finish()?))
    }
}

/// One record of a backup.
pub type Record = (String, Vec<u8>, Vec<u8>);

/// Reads a backup, handing each record to `visit`, and checks it whole.
/// `visit` sees records before the check completes: callers that must not
/// act on a damaged file run `verify` first.
pub fn read<E: From<BackupError>>(
    input: impl Read,
    mut visit: impl FnMut(Record) -> Result<(), E>,
) -> Result<Manifest, E> {
    let mut input = input;
    let mut magic = vec![0u8; MAGIC.len()];
    if input.read_exact(&mut magic).is_err() || magic != MAGIC {
        return Err(BackupError::NotABackup.into());
    }
    let mut z = BufReader::new(GzDecoder::new(BufReader::new(input)));
    let damaged = |e: std::io::Error| BackupError::Damaged(e.to_string());
    let mut hash = Sha256::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut records = 0u64;
    loop {
        let mut tag = [0u8; 1];
        z.read_exact(&mut tag).map_err(damaged)?;
        hash.update(tag);
        match tag[0] {
            0 => break,
            1 => {}
            t => return Err(BackupError::Damaged(format!("unknown record tag {t}")).into()),
        }
        let tree = read_chunk(&mut z, 2, &mut hash).map_err(damaged)?;
        let key = read_chunk(&mut z, 4, &mut hash).map_err(damaged)?;
        let value = read_chunk(&mut z, 4, &mut hash).map_err(damaged)?;
        let tree =
            String::from_utf8(tree).map_err(|_| BackupError::Damaged("tree name is not UTF-8".into()))?;
        *counts.entry(tree.clone()).or_insert(0) += 1;
        records += 1;
        visit((tree, key, value))?;
    }
    let json = read_chunk(&mut z, 4, &mut Sha256::new()).map_err(damaged)?;
    // Reading to the end makes gzip check its CRC and length.
    let mut rest = Vec::new();
    z.read_to_end(&mut rest).map_err(damaged)?;
    if !rest.is_empty() {
        return Err(BackupError::Damaged("data after the manifest".into()).into());
    }
    // The gzip stream ends the file: bytes after it were not written by us.
    let mut after = z.into_inner().into_inner();
    if !after.fill_buf().map_err(damaged)?.is_empty() {
        return Err(BackupError::Damaged("data after the compressed stream".into()).into());
    }
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| BackupError::Damaged(format!("manifest: {e}")))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(BackupError::Damaged(format!("format version {}", manifest.format_version)).into());
    }
    if manifest.sha256 != hex(&hash.finalize()) || manifest.records != records || manifest.counts != counts {
        return Err(
            BackupError::Damaged("records do not match the manifest's checksum and counts".into()).into()
        );
    }
    Ok(manifest)
}

fn read_chunk(r: &mut impl Read, len_bytes: usize, hash: &mut Sha256) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len[4 - len_bytes..])?;
    hash.update(&len[4 - len_bytes..]);
    let len = u32::from_be_bytes(len) as u64;
    // Read as it comes, not allocated up front: a length that damage made
    // huge (the CRC is checked only at the stream's end) must not claim
    // 4 GiB before the data runs out.
    let mut buf = Vec::new();
    r.take(len).read_to_end(&mut buf)?;
    if (buf.len() as u64) < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("a field of {len} bytes ends after {}", buf.len()),
        ));
    }
    hash.update(&buf);
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a backup of the live store to the scratch file `path`, on a
/// thread of its own that runs at a lower CPU priority (nice 10): while it
/// reads, deflates and hashes the whole store, acknowledging webhooks wins
/// the cores. The file is a scratch copy for streaming: not synced.
pub async fn write_online(store: Store, path: PathBuf) -> Result<Manifest, BackupError> {
    // Waited for from tokio's blocking pool, not joined by a channel: the
    // runtime then knows blocking work is under way (a paused test clock
    // does not jump past it), and no pooled thread's priority is changed.
    let waited = tokio::task::spawn_blocking(move || {
        let copy = std::thread::Builder::new().name("turnstile-backup".into()).spawn(move || {
            // This thread ends with the backup.
            crate::ops::background_priority();
            let mut w = BufWriter::new(File::create(&path).map_err(io(&path))?);
            let manifest = write(&store, &mut w)?;
            w.into_inner()
                .map_err(|e| BackupError::Io { path: path.display().to_string(), source: e.into_error() })?;
            Ok(manifest)
        });
        match copy {
            Ok(thread) => {
                thread.join().unwrap_or_else(|_| Err(BackupError::Damaged("the backup thread died".into())))
            }
            Err(e) => Err(BackupError::Io { path: "the backup thread".into(), source: e }),
        }
    });
    waited.await.unwrap_or_else(|_| Err(BackupError::Damaged("the backup thread died".into())))
}

/// `turnstile verify FILE`.
pub fn verify(file: &Path) -> Result<Manifest, BackupError> {
    let f = File::open(file).map_err(io(file))?;
    read(BufReader::new(f), |_| Ok::<(), BackupError>(()))
}

/// `turnstile backup --data DIR --out FILE`: refused while a daemon holds DIR.
/// The file appears only once complete and synced.
pub async fn backup_offline(data: &Path, out: &Path) -> Result<Manifest, BackupError> {
    if !Store::exists(data) {
        return Err(BackupError::Io {
            path: data.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no turnstile store here"),
        });
    }
    let store = Store::open(data)?;
    let partial = sibling(out, "partial");
    let result = (|| {
        let f = File::create(&partial).map_err(io(&partial))?;
        let mut w = BufWriter::new(f);
        let manifest = write(&store, &mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| BackupError::Io { path: partial.display().to_string(), source: e.into_error() })?;
        f.sync_all().map_err(io(&partial))?;
        std::fs::rename(&partial, out).map_err(io(out))?;
        Ok(manifest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    store.close().await?;
    result
}

/// `turnstile restore --from FILE --data DIR [--force]`.
pub fn restore(file: &Path, data: &Path, force: bool) -> Result<Manifest, BackupError> {
    let occupied = data.exists() && std::fs::read_dir(data).map_err(io(data))?.next().is_some();
    if occupied {
        if !force {
            return Err(BackupError::NotEmpty(data.display().to_string()));
        }
        if Store::exists(data) {
            Store::probe(data)?;
        }
    }
    // The whole file is checked before anything is written.
    let manifest = verify(file)?;
    let building = sibling(data, "restoring");
    let _ = std::fs::remove_dir_all(&building);
    let built = (|| {
        // Streamed: a reader thread hands records over as the import takes
        // them, so a store of any size restores in little memory.
        let f = File::open(file).map_err(io(file))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Record>(1024);
        let reader = std::thread::spawn(move || {
            read(BufReader::new(f), |r| {
                tx.send(r).map_err(|_| BackupError::Damaged("the import stopped reading".into()))
            })
        });
        let imported =
            Store::import_into(&building, manifest.next_id, rx.into_iter().map(Ok::<_, BackupError>));
        let read =
            reader.join().unwrap_or_else(|_| Err(BackupError::Damaged("the reader thread died".into())));
        imported.and(read.map(drop))
    })();
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&building);
        return Err(e);
    }
    let replaced = sibling(data, "replaced");
    if occupied {
        std::fs::rename(data, &replaced).map_err(io(data))?;
    } else if data.exists() {
        std::fs::remove_dir(data).map_err(io(data))?;
    }
    if let Err(e) = std::fs::rename(&building, data) {
        if occupied {
            let _ = std::fs::rename(&replaced, data);
        }
        return Err(io(data)(e));
    }
    if occupied {
        let _ = std::fs::remove_dir_all(&replaced);
    }
    Ok(manifest)
}

/// What `compact` did: the records it kept and the directory's size before and after.
pub struct Compacted {
    pub manifest: Manifest,
    pub before: u64,
    pub after: u64,
}

/// `turnstile compact --data DIR`: rewrites a stopped daemon's store into a
/// fresh directory through the backup path — an offline backup beside it
/// (every record, checked by its manifest), restored into a new directory
/// that replaces the old one in one rename — so the space the store's
/// engine had not reclaimed stays behind with the old directory. Refused
/// while a daemon holds DIR; any failure leaves DIR as it was.
pub async fn compact(data: &Path) -> Result<Compacted, BackupError> {
    let before = dir_size(data);
    let scratch = sibling(data, "compact.backup");
    let result = async {
        backup_offline(data, &scratch).await?;
        restore(&scratch, data, true)
    }
    .await;
    let _ = std::fs::remove_file(&scratch);
    Ok(Compacted { manifest: result?, before, after: dir_size(data) })
}

/// Bytes of every file under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `turnstile verify FILE`'s report: the manifest, and the key + value
/// bytes of each tree's records.
pub fn verify_sizes(file: &Path) -> Result<(Manifest, BTreeMap<String, u64>), BackupError> {
    let f = File::open(file).map_err(io(file))?;
    let mut bytes: BTreeMap<String, u64> = BTreeMap::new();
    let manifest = read(BufReader::new(f), |(tree, key, value)| {
        *bytes.entry(tree).or_insert(0) += (key.len() + value.len()) as u64;
        Ok::<(), BackupError>(())
    })?;
    Ok((manifest, bytes))
}

fn sibling(path: &Path, what: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    path.with_file_name(format!(".{name}.{what}-{}", std::process::id()))
}

#[cfg(test)]
mod fuzz;
