//! The state directory: one file per pod with sidecars, holding the
//! machine's [`PodRecord`](super::machine::PodRecord) of that pod, so that a
//! restarted shim keeps its promises (see `machine/record.rs`).
//!
//! Layout: `<state_dir>/pods/<sandbox id>.json`. Each file is a header line
//! `sidecar-shim-state 1 crc32=XXXXXXXX len=N` and the JSON record; a file
//! whose header, length or checksum does not match is corrupt (truncated by
//! a crash of the machine, garbage, or edited) and is dropped with an error
//! naming it, for that pod only.
//!
//! Writes are atomic: the record goes to `<id>.json.tmp`, is fsynced,
//! renamed over `<id>.json`, and the directory is fsynced, so a file is
//! either the old record or the new one. A write that fails (full or
//! read-only disk) is kept in memory and retried ([`Store::retry`]); the
//! shim goes on forwarding meanwhile. Errors are logged at most once per
//! [`LOG_EVERY`] (with the number of failures in between) and counted in
//! [`StoreHealth`].

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

/// The first word of every state file.
const MAGIC: &str = "sidecar-shim-state";
/// The version of the file format (the header; the record has its own).
const FORMAT: u32 = 1;
/// Failed writes are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// How the state directory is doing, for the status and the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreHealth {
    pub dir: PathBuf,
    /// The last write (or removal) succeeded.
    pub writable: bool,
    /// Writes and removals that failed since the shim started.
    pub failed_writes: u64,
    pub last_error: Option<String>,
    /// Pods whose latest state is not on disk yet.
    pub pending: usize,
}

/// A state file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
}

/// One state file read back: the pod id from its name and the record's
/// bytes, or why it cannot be used.
pub type Loaded = (String, Result<Vec<u8>, LoadError>);

/// The state directory.
pub struct Store {
    root: PathBuf,
    pods: PathBuf,
    /// Checksum of what is on disk, by pod: unchanged records are not
    /// written again.
    written: HashMap<String, u32>,
    /// Latest records not on disk yet (None: the file is to be removed).
    pending: BTreeMap<String, Option<Vec<u8>>>,
    failed_writes: u64,
    /// The last write or removal failed.
    failing: bool,
    last_error: Option<String>,
    last_log: Option<Instant>,
    /// Failures since the last log line.
    unlogged: u64,
}

impl Store {
    /// The store at `dir`, created (mode 0700) if missing. Never fails: a
    /// directory that cannot be created is reported like a failed write and
    /// tried again with the next write.
    pub fn open(dir: &Path) -> Store {
        let mut store = Store {
            root: dir.to_path_buf(),
            pods: dir.join("pods"),
            written: HashMap::new(),
            pending: BTreeMap::new(),
            failed_writes: 0,
            failing: false,
            last_error: None,
            last_log: None,
            unlogged: 0,
        };
        if let Err(e) = store.ensure_dir() {
            store.failed(format!("cannot create {}: {e}", store.pods.display()));
        }
        store
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    fn ensure_dir(&self) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.pods)
    }

    fn path(&self, pod: &str) -> PathBuf {
        self.pods.join(format!("{}.json", file_stem(pod)))
    }

    /// Every state file, read and checked. Leftover temporary files (a
    /// write cut short) are removed.
    pub fn load(&mut self) -> Vec<Loaded> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.pods) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return out,
            Err(e) => {
                out.push((
                    String::new(),
                    Err(LoadError::Read {
                        path: self.pods.clone(),
                        source: e,
                    }),
                ));
                return out;
            }
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            let Some(pod) = pod_of_stem(stem) else {
                continue;
            };
            let result = match fs::read(&path) {
                Ok(bytes) => {
                    decode(&bytes)
                        .map(|body| body.to_vec())
                        .map_err(|why| LoadError::Corrupt {
                            path: path.clone(),
                            why,
                        })
                }
                Err(source) => Err(LoadError::Read {
                    path: path.clone(),
                    source,
                }),
            };
            if let Ok(body) = &result {
                self.written.insert(pod.clone(), crc32fast::hash(body));
            }
            out.push((pod, result));
        }
        out
    }

    /// Write a pod's record (unless it is what is on disk already).
    pub fn save(&mut self, pod: &str, body: Vec<u8>) {
        let crc = crc32fast::hash(&body);
        if !self.pending.contains_key(pod) && self.written.get(pod) == Some(&crc) {
            return;
        }
        match self.write(pod, &body) {
            Ok(()) => {
                self.pending.remove(pod);
                self.written.insert(pod.to_string(), crc);
                self.succeeded();
            }
            Err(e) => {
                self.pending.insert(pod.to_string(), Some(body));
                self.failed(format!("cannot write the state of pod {pod}: {e}"));
            }
        }
    }

    /// Remove a pod's file (a pod the shim forgot, or a corrupt file).
    pub fn remove(&mut self, pod: &str) {
        let had = self.written.remove(pod).is_some() || self.pending.contains_key(pod);
        match self.unlink(pod) {
            Ok(()) => {
                self.pending.remove(pod);
                if had {
                    self.succeeded();
                }
            }
            Err(e) => {
                self.pending.insert(pod.to_string(), None);
                self.failed(format!("cannot remove the state of pod {pod}: {e}"));
            }
        }
    }

    /// Try the writes that failed again; true when nothing is pending.
    pub fn retry(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let pending = std::mem::take(&mut self.pending);
        let n = pending.len();
        for (pod, body) in pending {
            match body {
                Some(body) => self.save(&pod, body),
                None => self.remove(&pod),
            }
        }
        if self.pending.is_empty() {
            info!(dir = %self.root.display(), pods = n, "caught up with the state writes that had failed");
            true
        } else {
            false
        }
    }

    /// Writes and removals that failed since the shim started.
    pub fn failed_writes(&self) -> u64 {
        self.failed_writes
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn health(&self) -> StoreHealth {
        StoreHealth {
            dir: self.root.clone(),
            writable: self.pending.is_empty() && !self.failing,
            failed_writes: self.failed_writes,
            last_error: self.last_error.clone(),
            pending: self.pending.len(),
        }
    }

    fn write(&self, pod: &str, body: &[u8]) -> io::Result<()> {
        self.ensure_dir()?;
        let path = self.path(pod);
        let tmp = path.with_extension("json.tmp");
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&encode(body))?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            File::open(&self.pods)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn unlink(&self, pod: &str) -> io::Result<()> {
        match fs::remove_file(self.path(pod)) {
            Ok(()) => File::open(&self.pods)?.sync_all(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn succeeded(&mut self) {
        if self.failing && self.pending.is_empty() {
            info!(dir = %self.root.display(), "state writes work again");
        }
        self.failing = false;
    }

    fn failed(&mut self, message: String) {
        self.failed_writes += 1;
        let now = Instant::now();
        if self.last_log.is_none_or(|t| now >= t + LOG_EVERY) {
            if self.unlogged > 0 {
                error!(dir = %self.root.display(), failed_since_last_report = self.unlogged, "{message}; the shim goes on forwarding and retries");
            } else {
                error!(dir = %self.root.display(), "{message}; the shim goes on forwarding and retries");
            }
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        self.last_error = Some(message);
        self.failing = true;
    }
}

/// Header line plus body.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{MAGIC} {FORMAT} crc32={:08x} len={}\n",
        crc32fast::hash(body),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The body of a state file, if its header matches it.
pub fn decode(bytes: &[u8]) -> Result<&[u8], String> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not text")?;
    let body = &bytes[nl + 1..];
    let mut words = header.split(' ');
    if words.next() != Some(MAGIC) {
        return Err("not a sidecar-shim state file".into());
    }
    let format: u32 = words
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or("no format version")?;
    if format != FORMAT {
        return Err(format!(
            "format {format} (this sidecar-shim reads format {FORMAT})"
        ));
    }
    let crc = words
        .next()
        .and_then(|w| w.strip_prefix("crc32="))
        .and_then(|v| u32::from_str_radix(v, 16).ok())
        .ok_or("no checksum")?;
    let len: usize = words
        .next()
        .and_then(|w| w.strip_prefix("len="))
        .and_then(|v| v.parse().ok())
        .ok_or("no length")?;
    if body.len() != len {
        return Err(format!("{} bytes of {len} (truncated?)", body.len()));
    }
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(body)
}

/// Sandbox ids are hex strings; anything else is escaped so that a file
/// name never leaves the directory.
fn file_stem(pod: &str) -> String {
    if !pod.is_empty()
        && pod.len() <= 200
        && pod
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        pod.to_string()
    } else {
        let hex: String = pod.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x.{hex}")
    }
}

fn pod_of_stem(stem: &str) -> Option<String> {
    match stem.strip_prefix("x.") {
        Some(hex) => {
            let bytes: Option<Vec<u8>> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect();
            String::from_utf8(bytes?).ok()
        }
        None => Some(stem.to_string()),
    }
}

/// Log a state file that cannot be used.
pub fn report_unusable(pod: &str, e: &dyn std::fmt::Display) {
    warn!(pod.id = %pod, error = %e, "state file dropped: the pod is rebuilt from what the runtime reports");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_is_detected() {
        let body = br#"{"pod":"abc"}"#;
        let file = encode(body);
        assert_eq!(decode(&file).unwrap(), body);
        // Truncated anywhere.
        for cut in 0..file.len() {
            assert!(decode(&file[..cut]).is_err(), "cut at {cut}");
        }
        // One byte of the body changed.
        let mut flipped = file.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x20;
        assert!(decode(&flipped).unwrap_err().contains("checksum"));
        assert!(decode(b"garbage\n{}").is_err());
        assert!(decode(b"\x00\x01\x02").is_err());
        let newer = String::from_utf8(file.clone())
            .unwrap()
            .replacen(" 1 ", " 9 ", 1);
        assert!(decode(newer.as_bytes()).unwrap_err().contains("format 9"));
    }

    #[test]
    fn odd_ids_stay_in_the_directory() {
        for id in ["abc123", "../../etc/passwd", "a/b", "", "x.41"] {
            let stem = file_stem(id);
            assert!(!stem.contains('/') && !stem.is_empty(), "{id} -> {stem}");
            assert_eq!(pod_of_stem(&stem).as_deref(), Some(id), "{id}");
        }
    }

    #[test]
    fn save_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path());
        s.save("p1", b"one".to_vec());
        s.save("p2", b"two".to_vec());
        s.save("p1", b"uno".to_vec());
        let mut again = Store::open(dir.path());
        let loaded: Vec<(String, Vec<u8>)> = again
            .load()
            .into_iter()
            .map(|(p, r)| (p, r.unwrap()))
            .collect();
        assert_eq!(
            loaded,
            vec![
                ("p1".into(), b"uno".to_vec()),
                ("p2".into(), b"two".to_vec())
            ]
        );
        again.remove("p1");
        let left: Vec<String> = Store::open(dir.path())
            .load()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(left, vec!["p2".to_string()]);
        assert!(again.health().writable);
    }
}
